//! Phase 3a, channel: which LINE channel a send belongs to, on LINE's word only.
//!
//! LINE keeps retry keys per channel, and a channel has many live tokens at once, so
//! the fingerprint's scope is the channel: a bot that sends with one token and resends
//! with another derives the same key, and LINE's 409 fences the resend. A channel is
//! named by its bot's user ID, the one identity `GET /v2/bot/info` gives for every
//! kind of token (docs/channels.md says why this lookup and not the others).
//!
//! Where a token's channel comes from, cheapest first:
//! 1. this process's cache (token tag → channel, for the token's lifetime or a day,
//!    bounded in bytes);
//! 2. the shared store's directory, when there is one (other replicas, earlier runs);
//! 3. a token issued through the proxy ([`super::issuance`]) names its channel id, and
//!    a channel id seen once with its bot user ID needs no lookup again;
//! 4. `GET /v2/bot/info` under the token, once per token: identical concurrent
//!    lookups wait for the first one.
//!
//! A token LINE rejects learns nothing and is forwarded as it is (LINE answers it).
//! When LINE cannot be asked in time, the send is not sent: under any other scope it
//! could carry a key that differs from an earlier attempt's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::{AUTHORIZATION, USER_AGENT};
use http::{HeaderValue, Method, Request, StatusCode};
use moka::sync::Cache;
use tokio::sync::watch;
use tokio::time::Instant;

use super::send::{read_answer, MIN_ATTEMPT_TIME};
use super::Pipeline;
use crate::body::full;
use crate::domain::{AttemptFailure, ChannelId, TokenTag};
use crate::metrics::ChannelSource;
use crate::store::ChannelName;

/// The longest a token's channel is cached: LINE forgets a retry key after a day, and
/// a lookup a day per token is nothing.
pub(crate) const CHANNEL_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// The byte bound of the token cache (about 80 000 tokens) and of the channel id map.
const TOKEN_CACHE_BYTES: u64 = 8 * 1024 * 1024;
const ID_CACHE_BYTES: u64 = 1024 * 1024;
/// What one cached entry weighs: key, value, moka's own entry.
const ENTRY_WEIGHT: u32 = 104;
const BOT_INFO: &str = "/v2/bot/info";
const USER_AGENT_VALUE: &str = concat!("line-retry-proxy/", env!("CARGO_PKG_VERSION"));

/// What LINE said of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Vouched {
    /// The token belongs to this channel.
    Channel(ChannelId),
    /// LINE refused the token (401, 400 or 403): it learns nothing, and the request is
    /// forwarded for LINE to refuse again.
    Rejected,
}

/// Why a token's channel could not be learned in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LookupFailed {
    pub(crate) attempts: u32,
    pub(crate) last: AttemptFailure,
}

/// A lookup that gave no answer within the request's deadline.
const NO_ANSWER: LookupFailed = LookupFailed {
    attempts: 0,
    last: AttemptFailure::Timeout,
};

#[derive(Clone)]
struct Entry {
    channel: ChannelId,
    ttl: Duration,
}

struct PerEntryTtl;

impl moka::Expiry<TokenTag, Entry> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _key: &TokenTag,
        entry: &Entry,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

type Pending = watch::Receiver<Option<Result<Vouched, LookupFailed>>>;

/// What [`Pipeline::lookup`] found.
enum Looked {
    /// The token became known between the caller's cache miss and its lookup: a
    /// lookup that just ended remembered it.
    Known(ChannelId),
    /// What LINE said, or why it could not be asked.
    Answered(Result<Vouched, LookupFailed>),
}

/// The proxy's directory of channels: what it has learned, and the lookups under way.
pub(crate) struct Channels {
    /// Token tag → channel. Never the token.
    tokens: Cache<TokenTag, Entry>,
    /// LINE's numeric channel id → the bot user ID, learned when a token issued for
    /// that id was looked up: later tokens of the channel need no lookup.
    ids: Cache<Box<str>, ChannelId>,
    /// Lookups at LINE in flight, by token: a second request for the same token waits
    /// for the first lookup's answer instead of asking again.
    pending: Mutex<HashMap<TokenTag, Pending>>,
}

impl Default for Channels {
    fn default() -> Self {
        Channels {
            tokens: Cache::builder()
                .max_capacity(TOKEN_CACHE_BYTES)
                .weigher(|_, _| ENTRY_WEIGHT)
                .expire_after(PerEntryTtl)
                .build(),
            ids: Cache::builder()
                .max_capacity(ID_CACHE_BYTES)
                .weigher(|_, _| ENTRY_WEIGHT)
                .time_to_live(CHANNEL_TTL)
                .build(),
            pending: Mutex::default(),
        }
    }
}

impl Channels {
    fn remember(&self, tag: TokenTag, channel: ChannelId, ttl: Duration) {
        let ttl = ttl.min(CHANNEL_TTL);
        if !ttl.is_zero() {
            self.tokens.insert(tag, Entry { channel, ttl });
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<TokenTag, Pending>> {
        // A panic elsewhere while holding it leaves a map that is still whole.
        crate::sync::lock(&self.pending)
    }
}

/// Removes a lookup from the pending map however it ends, so a lookup whose request
/// was dropped midway is taken over by the next request, not waited on for ever.
struct PendingGuard<'a>(&'a Channels, TokenTag);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.pending().remove(&self.1);
    }
}

impl Pipeline {
    /// The channel of `token`, by the cheapest way that knows it, within `deadline`.
    pub(super) async fn channel_of(
        self: &Arc<Self>,
        token: &str,
        tag: TokenTag,
        deadline: Instant,
    ) -> Result<Vouched, LookupFailed> {
        if let Some(entry) = self.channels.tokens.get(&tag) {
            self.metrics.channel(ChannelSource::Cache);
            return Ok(Vouched::Channel(entry.channel));
        }
        match self.store.channel(&ChannelName::Token(tag)).await {
            Ok(Some(channel)) => {
                self.metrics.channel(ChannelSource::Store);
                self.channels.remember(tag, channel.clone(), CHANNEL_TTL);
                return Ok(Vouched::Channel(channel));
            }
            Ok(None) => {}
            // Counted; the store logs its own outage. LINE is asked instead.
            Err(_) => self.metrics.store_error(),
        }
        let looked = tokio::time::timeout_at(deadline, self.lookup(token, tag, deadline)).await;
        let result = match looked.unwrap_or(Looked::Answered(Err(NO_ANSWER))) {
            Looked::Known(channel) => {
                self.metrics.channel(ChannelSource::Cache);
                return Ok(Vouched::Channel(channel));
            }
            Looked::Answered(result) => result,
        };
        match &result {
            Ok(Vouched::Channel(_)) => self.metrics.channel(ChannelSource::BotInfo),
            Ok(Vouched::Rejected) => self.metrics.channel(ChannelSource::Rejected),
            Err(_) => self.metrics.channel(ChannelSource::Failed),
        }
        result
    }

    /// One lookup per token at a time, in a task of its own: the requests that need it
    /// wait for its answer, and a request that goes away (a bot's timeout) leaves it
    /// running for the next one instead of making that one ask LINE again.
    async fn lookup(self: &Arc<Self>, token: &str, tag: TokenTag, deadline: Instant) -> Looked {
        let mut answer = {
            let mut pending = self.channels.pending();
            match pending.get(&tag) {
                Some(waiting) => waiting.clone(),
                None => {
                    // A lookup remembers its answer before it leaves the map, so one
                    // that ended since the caller's cache miss is seen here, under the
                    // lock, instead of being asked for a second time.
                    if let Some(entry) = self.channels.tokens.get(&tag) {
                        return Looked::Known(entry.channel);
                    }
                    let (tx, rx) = watch::channel(None);
                    pending.insert(tag, rx.clone());
                    let pipeline = self.clone();
                    let token = token.to_owned();
                    self.tasks.spawn(async move {
                        let _guard = PendingGuard(&pipeline.channels, tag);
                        let result = pipeline.ask_line(&token, deadline).await;
                        if let Ok(Vouched::Channel(channel)) = &result {
                            pipeline
                                .channels
                                .remember(tag, channel.clone(), CHANNEL_TTL);
                            let name = ChannelName::Token(tag);
                            if pipeline
                                .store
                                .record_channel(&name, channel, CHANNEL_TTL)
                                .await
                                .is_err()
                            {
                                pipeline.metrics.store_error();
                            }
                        }
                        tx.send_replace(Some(result));
                    });
                    rx
                }
            }
        };
        let result = match answer.wait_for(Option::is_some).await {
            Ok(result) => result.clone().unwrap_or(Err(NO_ANSWER)),
            // The lookup's task ended without an answer: only a panic does that.
            Err(_) => Err(NO_ANSWER),
        };
        Looked::Answered(result)
    }

    /// `GET /v2/bot/info` under the token, retried as a send is (it is idempotent):
    /// transport failures, 5xx and 429 again with backoff, within the deadline.
    async fn ask_line(&self, token: &str, deadline: Instant) -> Result<Vouched, LookupFailed> {
        let settings = self.settings();
        let policy = &settings.policy.retry;
        let Ok(mut auth) = HeaderValue::from_str(&format!("Bearer {token}")) else {
            return Ok(Vouched::Rejected);
        };
        auth.set_sensitive(true);
        let uri = self
            .upstream
            .uri(Some(&http::uri::PathAndQuery::from_static(BOT_INFO)));
        let mut rng = fastrand::Rng::new();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = Request::new(full(bytes::Bytes::new()));
            *req.method_mut() = Method::GET;
            *req.uri_mut() = uri.clone();
            req.headers_mut().insert(AUTHORIZATION, auth.clone());
            req.headers_mut()
                .insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
            let started = Instant::now();
            let remaining = deadline.saturating_duration_since(started);
            let answer = tokio::time::timeout(policy.attempt_timeout.min(remaining), async {
                let (parts, body) = self.upstream.request(req).await?.into_parts();
                Ok::<_, AttemptFailure>((parts.status, read_answer(body).await?))
            })
            .await
            .unwrap_or(Err(AttemptFailure::Timeout));
            self.metrics.channel_lookup(started.elapsed());
            let failure = match answer {
                Ok((status, body)) if status.is_success() => match bot_user_id(&body) {
                    Some(channel) => return Ok(Vouched::Channel(channel)),
                    // A 2xx without a user ID is not LINE as documented: not retried.
                    None => {
                        return Err(LookupFailed {
                            attempts: attempt,
                            last: AttemptFailure::ServerError,
                        })
                    }
                },
                Ok((
                    StatusCode::UNAUTHORIZED | StatusCode::BAD_REQUEST | StatusCode::FORBIDDEN,
                    _,
                )) => return Ok(Vouched::Rejected),
                Ok((StatusCode::TOO_MANY_REQUESTS, _)) => AttemptFailure::RateLimited,
                Ok((status, _)) if status.is_server_error() => AttemptFailure::ServerError,
                Ok(_) => {
                    return Err(LookupFailed {
                        attempts: attempt,
                        last: AttemptFailure::ServerError,
                    })
                }
                Err(failure) => failure,
            };
            let wait = policy.backoff.delay(attempt, &mut rng);
            let fits = Instant::now()
                .checked_add(wait + MIN_ATTEMPT_TIME.min(policy.attempt_timeout))
                .is_some_and(|next| next <= deadline);
            if attempt >= policy.max_attempts || !fits {
                return Err(LookupFailed {
                    attempts: attempt,
                    last: failure,
                });
            }
            tracing::debug!(
                attempt,
                reason = failure.label(),
                "asking LINE for the token's channel again"
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// A token seen issued through the proxy for LINE's channel `id`, valid for
    /// `lifetime`. Known at once when the channel id has been seen with its bot user ID;
    /// otherwise the token is looked up now, in the background, so the bot's first
    /// send with it finds the answer (or waits for this very lookup).
    pub(super) fn learn_issued(self: &Arc<Self>, token: String, id: Box<str>, lifetime: Duration) {
        let tag = super::fingerprint::token_tag(token.as_bytes());
        let pipeline = self.clone();
        let deadline = Instant::now() + self.settings().policy.retry.deadline;
        self.tasks.spawn(async move {
            let name = ChannelName::Id(id.clone());
            let known = match pipeline.channels.ids.get(&id) {
                Some(channel) => Some(channel),
                None => pipeline.store.channel(&name).await.ok().flatten(),
            };
            let (channel, source) = match known {
                Some(channel) => (channel, ChannelSource::Issued),
                None => match pipeline.lookup(&token, tag, deadline).await {
                    Looked::Known(channel) | Looked::Answered(Ok(Vouched::Channel(channel))) => {
                        let _ = pipeline
                            .store
                            .record_channel(&name, &channel, CHANNEL_TTL)
                            .await;
                        (channel, ChannelSource::BotInfo)
                    }
                    // Learned at the first send instead (or never, for a refused one).
                    _ => return,
                },
            };
            pipeline.channels.ids.insert(id, channel.clone());
            pipeline.channels.remember(tag, channel.clone(), lifetime);
            // Counted once known: a test (or an operator) that sees the count can rely on it.
            pipeline.metrics.channel(source);
            let ttl = lifetime.min(CHANNEL_TTL);
            let _ = pipeline
                .store
                .record_channel(&ChannelName::Token(tag), &channel, ttl)
                .await;
        });
    }
}

/// The `userId` of LINE's bot info answer.
fn bot_user_id(body: &[u8]) -> Option<ChannelId> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    ChannelId::parse(value.get("userId")?.as_str()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bot_user_id_is_read_from_lines_answer_only() {
        let id = "U4af4980629aaaaaaaaaaaaaaaaaaaaaa";
        assert_eq!(
            bot_user_id(format!(r#"{{"userId":"{id}","basicId":"@216ru"}}"#).as_bytes()),
            ChannelId::parse(id)
        );
        for bad in [
            r#"{"userId":"U123"}"#,
            r#"{"userId":"X4af4980629aaaaaaaaaaaaaaaaaaaaaa"}"#,
            r#"{"userId":4}"#,
            r#"{"basicId":"@x"}"#,
            "not json",
        ] {
            assert_eq!(bot_user_id(bad.as_bytes()), None, "{bad}");
        }
    }
}
