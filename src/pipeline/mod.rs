//! The request path for traffic bound for LINE, one phase per module, in order:
//!
//! ```text
//!  request ─► classify ─┬─ passthrough ─► forward (streamed, untouched) ─────────────┐
//!                       └─ keyed ─► read ─► fingerprint ─► key ─► claim ─┬─ done ─────┤ replayed
//!                                                                       ├─ in flight ┤ coalesced
//!                                                                       └─ owner     │
//!                                  (detachable) send ⟲ retries ─► settle ─► store ───┤ fresh /
//!                                                                                     │ conflict-resolved
//!                                                                         respond ◄───┘
//! ```
//! Phase 5 (claim) lives in [`crate::store`]; the others are the modules below.
//! docs/design.md tells each phase's rules and why; docs/channels.md the channel phase.
//!
//! The request path has its own narrow context, [`Pipeline`]: the store, the way out to
//! LINE, the live settings, the metrics and the task tracker. It knows nothing of how
//! a request arrived (base URL, absolute form, or decrypted from a CONNECT tunnel).

pub mod canonical;
mod channel;
pub mod classify;
mod detach;
pub mod fingerprint;
pub(crate) mod forward;
mod issuance;
pub(crate) mod key;
pub mod read;
pub(crate) mod respond;
pub mod send;
pub mod settle;

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use http::header::{CONTENT_LENGTH, HOST};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::body::{BoxError, BoxFuture, ProxyBody};
use crate::config::{EndpointPolicy, KeyScope, Policy};
use crate::domain::{Answer, ChannelId, Endpoint, Outcome, RetryKey, TokenTag, RETRY_KEY_HEADER};
use crate::error::ProxyError;
use crate::metrics::{InFlight, Metrics};
use crate::retry::RetryBudget;
use crate::store::{Claim, ClaimRequest, Store, Ticket};
use crate::telemetry;
use crate::upstream::Upstream;
use channel::{Channels, Vouched};
use classify::Route;
use detach::{Detachable, Panicked};

/// A claim lapses this long after the owner's deadline, should the owner vanish.
const LEASE_MARGIN: Duration = Duration::from_secs(5);
/// Owners that vanish repeatedly are not waited for forever: send without the store.
const MAX_CLAIMS: usize = 3;

/// The wall clock, replaceable so that tests can cross window boundaries at will.
pub(crate) type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// What SIGHUP may replace: read once per request, swapped whole.
pub(crate) struct Settings {
    pub(crate) policy: Policy,
    /// Rebuilt with the policy, so a new ratio takes effect at once.
    pub(crate) budget: RetryBudget,
}

impl Settings {
    pub(crate) fn new(policy: Policy) -> Self {
        let budget = RetryBudget::new(
            policy.retry.budget_ratio,
            policy.retry.budget_min_per_second,
        );
        Settings { policy, budget }
    }
}

/// The request path's context.
pub struct Pipeline {
    /// Claims of sends in flight and the answers kept for replay (phases 5 and 7).
    pub store: Box<dyn Store>,
    /// The way out to LINE.
    pub(crate) upstream: Arc<dyn Upstream>,
    pub(crate) metrics: Arc<Metrics>,
    /// Upstream work runs in tasks of its own, tracked so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// How bodies are read: size, time, and the proxy-wide byte budget (phase 2).
    pub(crate) intake: read::Intake,
    /// Fingerprint JSON bodies in canonical form (phase 3).
    pub(crate) canonical_json: bool,
    /// What a fingerprint is scoped to: the token's channel, or the token (phase 3).
    key_scope: KeyScope,
    /// Tokens' channels, learned and being learned (phase 3a).
    channels: Channels,
    settings: RwLock<Arc<Settings>>,
    clock: Clock,
}

impl Pipeline {
    pub fn new(
        store: Box<dyn Store>,
        upstream: Arc<dyn Upstream>,
        metrics: Arc<Metrics>,
        policy: Policy,
        intake: read::Intake,
        canonical_json: bool,
    ) -> Self {
        Pipeline {
            store,
            upstream,
            metrics,
            tasks: TaskTracker::new(),
            intake,
            canonical_json,
            key_scope: KeyScope::Channel,
            channels: Channels::default(),
            settings: RwLock::new(Arc::new(Settings::new(policy))),
            clock: Arc::new(SystemTime::now),
        }
    }

    /// The same pipeline with fingerprints scoped otherwise.
    pub fn with_key_scope(mut self, key_scope: KeyScope) -> Self {
        self.key_scope = key_scope;
        self
    }

    /// The same pipeline on another clock.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The settings in force. A read lock held for one `Arc` clone: never contended
    /// except for the instant of a reload.
    pub(crate) fn settings(&self) -> Arc<Settings> {
        crate::sync::read(&self.settings).clone()
    }

    /// Swaps in a new policy; requests already running keep the one they started with.
    pub(crate) fn reload(&self, policy: Policy) {
        let next = Arc::new(Settings::new(policy));
        *crate::sync::write(&self.settings) = next;
    }

    /// Handles one request bound for LINE, however it arrived.
    pub async fn handle<B>(self: &Arc<Self>, req: Request<B>) -> Response<ProxyBody>
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        let in_flight = self.metrics.in_flight_shared();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let route = classify::classify(&method, &path);
        // With debug logging on, every line logged on behalf of this request carries
        // its method, path, endpoint and key. Without it, a span per request is most of
        // the cost of logging (bench/README.md), and the few lines logged at info and
        // above (giving up, budget exhausted) name their request themselves.
        let span = if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::info_span!(
                "request",
                %method,
                path,
                endpoint = tracing::field::Empty,
                key = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };

        let exchange = match route {
            Route::Keyed(endpoint) => {
                span.record("endpoint", endpoint.name());
                self.keyed(endpoint, req, &in_flight).instrument(span).await
            }
            Route::Passthrough => {
                let forwarded = if issuance::is_issuance(&method, &path) {
                    // Boxed before the call: the body's own error type stays out of the
                    // `Send` check of a future the compiler cannot prove general enough.
                    issuance::forward_issuance(self, req.map(crate::body::boxed))
                        .instrument(span)
                        .await
                } else {
                    forward::to_line(self, req).instrument(span).await
                };
                match forwarded {
                    Ok(response) => Exchange {
                        upstream_status: Some(response.status()),
                        response,
                        endpoint: None,
                        outcome: Outcome::Passthrough,
                        key: None,
                        attempts: 1,
                        channel: None,
                    },
                    Err(err) => Exchange::failed(None, &err),
                }
            }
        };

        self.metrics.request(exchange.endpoint, exchange.outcome);
        telemetry::access(&telemetry::Access {
            method: &method,
            path: &path,
            endpoint: exchange.endpoint.map_or("other", Endpoint::name),
            key: exchange.key.as_ref(),
            channel: exchange.channel.as_ref().map(ChannelId::as_str),
            request_id: exchange
                .response
                .headers()
                .get(settle::REQUEST_ID)
                .and_then(|v| v.to_str().ok()),
            outcome: exchange.outcome.label(),
            attempts: exchange.attempts,
            status: exchange.response.status().as_u16(),
            upstream_status: exchange.upstream_status.map(|s| s.as_u16()),
            latency: started.elapsed(),
        });
        exchange.response
    }

    async fn keyed<B>(
        self: &Arc<Self>,
        endpoint: Endpoint,
        req: Request<B>,
        in_flight: &InFlight,
    ) -> Exchange
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = req.into_parts();
        let (body, charge) = match read::body(body, &parts.headers, &self.intake).await {
            Ok(read) => read,
            Err(err) => return Exchange::failed(Some(endpoint), &err),
        };
        let settings = self.settings();
        let policy = settings.policy.endpoint(endpoint);
        let client_key = client_key(&parts.headers);
        let path_and_query = parts.uri.path_and_query();

        let deadline = Instant::now() + settings.policy.retry.deadline;
        let caller = match self.caller(&parts.headers, deadline).await {
            Ok(caller) => caller,
            Err(err) => {
                tracing::warn!(
                    endpoint = endpoint.name(),
                    reason = %err,
                    "not sending: the token's channel is unknown, and a key under any other scope could deliver twice"
                );
                return Exchange::failed(Some(endpoint), &err);
            }
        };
        let fp = fingerprint::fingerprint(
            &fingerprint::Request {
                scope: &caller.scope,
                method: &parts.method,
                path_and_query: path_and_query.map_or("/", |p| p.as_str()),
                client_key: client_key.as_ref().map(HeaderValue::as_bytes),
                body: &body,
            },
            self.canonical_json,
        );
        let key_for = |first_seen: SystemTime| match &client_key {
            Some(value) => RetryKey::Client(value.clone()),
            None => key::derive(&fp, policy.dedup_window, first_seen),
        };
        let outbound = |key: &RetryKey| {
            let mut headers = parts.headers.clone();
            forward::strip_hop_by_hop(&mut headers);
            headers.remove(HOST);
            headers.insert(RETRY_KEY_HEADER, key.header_value());
            headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
            send::Outbound {
                method: parts.method.clone(),
                uri: self.upstream.uri(path_and_query),
                headers,
                body: body.clone(),
            }
        };
        let send = KeyedSend {
            settings,
            endpoint,
            policy,
            caller: &caller,
        };
        let now = (self.clock)();
        let claim = ClaimRequest {
            fp,
            lease: send.settings.policy.retry.deadline + LEASE_MARGIN,
            window: policy.dedup_window,
            now,
        };
        let (key, ticket) = match self.claim(claim, &caller).await {
            Claimed::Answered(answer, outcome) => {
                return Exchange::answered(endpoint, &answer, outcome, &caller)
            }
            // Another token's answer is LINE's to give: the send goes out again under
            // the very key that answer was obtained with, and LINE judges the token
            // (its 409 becomes the original success, its 401 reaches the bot).
            Claimed::NotYours(answer) => (answer.key.clone(), None),
            Claimed::Owner { ticket, first_seen } => (key_for(first_seen), Some(ticket)),
            Claimed::NoStore => (key_for(now), None),
        };
        let out = outbound(&key);
        self.own(&send, key, out, ticket, (in_flight.clone(), charge))
            .await
    }

    /// Phase 5, claim: replay, coalesce, or own the send. An answer is given only to
    /// the token that obtained it.
    async fn claim(&self, claim: ClaimRequest, caller: &Caller) -> Claimed {
        for _ in 0..MAX_CLAIMS {
            match self.store.claim(claim).await {
                Ok(Claim::Done(answer)) if caller.owns(&answer) => {
                    return Claimed::Answered(answer, Outcome::Replayed)
                }
                Ok(Claim::Done(answer)) => return Claimed::NotYours(answer),
                Ok(Claim::InFlight(waiting)) => {
                    match tokio::time::timeout(claim.lease, waiting).await {
                        Ok(Some(answer)) if caller.owns(&answer) => {
                            return Claimed::Answered(answer, Outcome::Coalesced)
                        }
                        Ok(Some(answer)) => return Claimed::NotYours(answer),
                        // The owner vanished or outlived its lease: claim again.
                        _ => continue,
                    }
                }
                Ok(Claim::Owner { ticket, first_seen }) => {
                    return Claimed::Owner { ticket, first_seen }
                }
                Err(err) => {
                    // Counted here; a shared store logs its outage once, not per send.
                    self.metrics.store_error();
                    tracing::debug!(error = %err, "sending without the store; the retry key still prevents duplicates at LINE");
                    break;
                }
            }
        }
        Claimed::NoStore
    }

    /// Phase 3a: who is sending, as far as keys and replays are concerned.
    async fn caller(
        self: &Arc<Self>,
        headers: &HeaderMap,
        deadline: Instant,
    ) -> Result<Caller, ProxyError> {
        let token = fingerprint::bearer_token(headers);
        let tag = match token {
            Some(token) => fingerprint::token_tag(token.as_bytes()),
            None => fingerprint::token_tag(
                headers
                    .get(http::header::AUTHORIZATION)
                    .map_or(&b""[..], HeaderValue::as_bytes),
            ),
        };
        let (scope, channel) = match (self.key_scope, token) {
            (KeyScope::Token, _) => (fingerprint::token_scope(headers), None),
            // LINE refuses a request without a token; there is nothing to look up.
            (KeyScope::Channel, None) => (fingerprint::unvouched_scope(&tag), None),
            (KeyScope::Channel, Some(token)) => match self.channel_of(token, tag, deadline).await {
                Ok(Vouched::Channel(channel)) => {
                    (fingerprint::channel_scope(&channel), Some(channel))
                }
                Ok(Vouched::Rejected) => (fingerprint::unvouched_scope(&tag), None),
                Err(failed) => {
                    return Err(ProxyError::ChannelUnknown {
                        attempts: failed.attempts,
                        last: failed.last,
                    })
                }
            },
        };
        Ok(Caller {
            tag,
            scope,
            channel,
        })
    }

    /// Phases 6–7. The upstream work runs in the request's own task while the bot
    /// waits for it (no hand-off to another task and back), and moves into a task of
    /// its own the moment the bot goes away: a disconnect never cancels it, so the
    /// bot's resend finds the result. It holds the request's place in the in-flight
    /// gauge and its body's share of `buffer-limit` until it ends.
    async fn own(
        self: &Arc<Self>,
        send: &KeyedSend<'_>,
        key: RetryKey,
        out: send::Outbound,
        ticket: Option<Box<dyn Ticket>>,
        held: (InFlight, read::Charge),
    ) -> Exchange {
        tracing::Span::current().record("key", tracing::field::display(&key));
        let endpoint = send.endpoint;
        if key.is_derived() {
            self.metrics.key_injected(endpoint);
        } else {
            self.metrics.client_key(endpoint);
        }
        let pipeline = self.clone();
        let settings = send.settings.clone();
        let retry = send.policy.retry;
        let owner = send.caller.tag;
        let channel = send.caller.channel.clone();
        // Boxed to a plain `'static` future at once: left to a generic bound, the
        // compiler loses the body error's lifetime in the `Send` check.
        let work: BoxFuture<'static, Arc<Answer>> = Box::pin(
            async move {
                let _held = held;
                let sender = send::Sender {
                    upstream: pipeline.upstream.as_ref(),
                    policy: &settings.policy.retry,
                    retry,
                    budget: &settings.budget,
                    metrics: &pipeline.metrics,
                    endpoint,
                    key: &key,
                    channel: channel.as_ref(),
                };
                let sent = sender.send(&out).await;
                let settled = settle::settle(endpoint, key, owner, sent);
                if let Some(ticket) = ticket {
                    if let Err(err) = ticket.publish(settled.answer.clone(), settled.keep).await {
                        pipeline.metrics.store_error();
                        tracing::debug!(error = %err, "could not store the answer");
                    }
                }
                settled.answer
            }
            .instrument(tracing::Span::current()),
        );
        match Detachable::new(work, &self.tasks).await {
            Ok(answer) => Exchange::answered(endpoint, &answer, answer.outcome, send.caller),
            // Its ticket was dropped on the way out: waiters claim again.
            Err(Panicked) => Exchange::failed(
                Some(endpoint),
                &ProxyError::Internal("the upstream work ended without an answer"),
            ),
        }
    }
}

/// What the claim came to.
enum Claimed {
    /// This caller's own answer, kept or just settled by another request.
    Answered(Arc<Answer>, Outcome),
    /// An answer obtained with another token.
    NotYours(Arc<Answer>),
    Owner {
        ticket: Box<dyn Ticket>,
        first_seen: SystemTime,
    },
    /// The store is out of reach, or its owners keep vanishing: send without it.
    NoStore,
}

/// Who sends, as phase 3a found it.
struct Caller {
    /// The token's tag: who may read a kept answer.
    tag: TokenTag,
    /// What the fingerprint is scoped to.
    scope: [u8; 32],
    /// The channel LINE vouched for, when it did.
    channel: Option<ChannelId>,
}

impl Caller {
    /// Whether a kept answer may be given to this caller without asking LINE.
    fn owns(&self, answer: &Answer) -> bool {
        answer.owner == Some(self.tag)
    }
}

/// One keyed send's fixed facts, shared by its phases.
struct KeyedSend<'a> {
    settings: Arc<Settings>,
    endpoint: Endpoint,
    policy: EndpointPolicy,
    caller: &'a Caller,
}

/// What happened to one request: the answer, and what the access log and metrics say.
struct Exchange {
    response: Response<ProxyBody>,
    endpoint: Option<Endpoint>,
    outcome: Outcome,
    key: Option<RetryKey>,
    attempts: u32,
    upstream_status: Option<StatusCode>,
    /// The channel the send was keyed under, for the access line.
    channel: Option<ChannelId>,
}

impl Exchange {
    fn answered(endpoint: Endpoint, answer: &Answer, outcome: Outcome, caller: &Caller) -> Self {
        Exchange {
            response: respond::answer_response(answer, outcome),
            endpoint: Some(endpoint),
            outcome,
            key: Some(answer.key.clone()),
            attempts: if matches!(outcome, Outcome::Replayed | Outcome::Coalesced) {
                0
            } else {
                answer.attempts
            },
            upstream_status: answer.upstream_status,
            channel: caller.channel.clone(),
        }
    }

    fn failed(endpoint: Option<Endpoint>, err: &ProxyError) -> Self {
        Exchange {
            response: respond::error_response(err),
            endpoint,
            outcome: Outcome::Error,
            key: None,
            attempts: 0,
            upstream_status: None,
            channel: None,
        }
    }
}

/// The bot's own key, if it sent a non-empty one. An empty header (Go v8 given "")
/// counts as absent.
fn client_key(headers: &HeaderMap) -> Option<HeaderValue> {
    headers
        .get(RETRY_KEY_HEADER)
        .filter(|v| !v.as_bytes().iter().all(u8::is_ascii_whitespace))
        .cloned()
}
