//! The proxy's own vocabulary, at the bottom of the import graph: the endpoints that
//! take a retry key, what makes two requests the same send ([`Fingerprint`]), the key a
//! send goes out with ([`RetryKey`]), how an answer was obtained ([`Outcome`]), why an
//! upstream attempt failed ([`AttemptFailure`]), and the answer itself ([`Answer`]).
//!
//! Nothing here imports the rest of the crate: the store, the config and the metrics
//! build on these types without knowing the request path.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use uuid::Uuid;

/// LINE keeps a retry key for 24 hours; a longer dedup window would replay what LINE
/// itself has forgotten.
pub const LINE_KEY_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// The header LINE reads the key from.
pub const RETRY_KEY_HEADER: HeaderName = HeaderName::from_static("x-line-retry-key");

/// The four LINE endpoints that accept `X-Line-Retry-Key` (docs/line-api.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Push,
    Multicast,
    Narrowcast,
    Broadcast,
}

impl Endpoint {
    /// How many rows the endpoint table has: every per-endpoint table is this long.
    pub const COUNT: usize = 4;

    pub const ALL: [Endpoint; Endpoint::COUNT] = [
        Endpoint::Push,
        Endpoint::Multicast,
        Endpoint::Narrowcast,
        Endpoint::Broadcast,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    /// The name used in config tables, metric labels and log lines.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Push => "push",
            Endpoint::Multicast => "multicast",
            Endpoint::Narrowcast => "narrowcast",
            Endpoint::Broadcast => "broadcast",
        }
    }

    pub fn from_name(name: &str) -> Option<Endpoint> {
        Endpoint::ALL.into_iter().find(|e| e.name() == name)
    }

    /// The exact path LINE serves this endpoint on.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Push => "/v2/bot/message/push",
            Endpoint::Multicast => "/v2/bot/message/multicast",
            Endpoint::Narrowcast => "/v2/bot/message/narrowcast",
            Endpoint::Broadcast => "/v2/bot/message/broadcast",
        }
    }

    /// What LINE answers when it accepts a request: used to turn a 409 for our own
    /// derived key back into the success the bot would have seen the first time.
    pub fn success_status(self) -> StatusCode {
        match self {
            Endpoint::Narrowcast => StatusCode::ACCEPTED,
            _ => StatusCode::OK,
        }
    }
}

/// One value per [`Endpoint`], indexed by it: a table sized by the endpoint enum, so a
/// new endpoint row cannot leave a table one short.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PerEndpoint<T>([T; Endpoint::COUNT]);

impl<T> PerEndpoint<T> {
    /// The table whose row for each endpoint is `row(endpoint)`.
    pub fn from_fn(mut row: impl FnMut(Endpoint) -> T) -> Self {
        PerEndpoint(Endpoint::ALL.map(&mut row))
    }

    /// Every row, in [`Endpoint::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (Endpoint, &T)> {
        Endpoint::ALL.into_iter().zip(self.0.iter())
    }

    /// Every row, mutable, in [`Endpoint::ALL`] order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (Endpoint, &mut T)> {
        Endpoint::ALL.into_iter().zip(self.0.iter_mut())
    }
}

impl<T> std::ops::Index<Endpoint> for PerEndpoint<T> {
    type Output = T;

    fn index(&self, endpoint: Endpoint) -> &T {
        &self.0[endpoint.index()]
    }
}

impl<T> std::ops::IndexMut<Endpoint> for PerEndpoint<T> {
    fn index_mut(&mut self, endpoint: Endpoint) -> &mut T {
        &mut self.0[endpoint.index()]
    }
}

/// SHA-256 over everything that makes two requests the same send (see
/// `pipeline::fingerprint`). Two different sends must never share one: that would
/// answer one bot with another's result.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

/// A fingerprint is already a uniform hash: eight of its bytes are a perfect table
/// hash, and hashing all 32 again (SipHash, per lookup) is wasted work on the hot path.
impl std::hash::Hash for Fingerprint {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(prefix));
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A prefix is enough to correlate log lines.
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The hasher for maps keyed by [`Fingerprint`]: passes its `write_u64` through.
#[derive(Default, Clone, Copy)]
pub struct FingerprintHasher(u64);

impl std::hash::Hasher for FingerprintHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached for keys other than a fingerprint; fold them in, FNV-style.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

pub type BuildFingerprintHasher = std::hash::BuildHasherDefault<FingerprintHasher>;

/// The `X-Line-Retry-Key` a send goes out with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryKey {
    /// The bot sent its own: we forward it and pass its 409s through untranslated.
    Client(HeaderValue),
    /// Derived here: a 409 means one of our own earlier attempts was accepted.
    Derived(Uuid),
}

impl RetryKey {
    pub fn header_value(&self) -> HeaderValue {
        match self {
            RetryKey::Client(v) => v.clone(),
            RetryKey::Derived(u) => {
                let mut buf = Uuid::encode_buffer();
                let text = u.hyphenated().encode_lower(&mut buf);
                // Hyphenated lower-case hex is always a valid header value.
                HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static(""))
            }
        }
    }

    pub fn is_derived(&self) -> bool {
        matches!(self, RetryKey::Derived(_))
    }
}

impl fmt::Display for RetryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetryKey::Client(v) => f.write_str(v.to_str().unwrap_or("<non-ascii>")),
            RetryKey::Derived(u) => write!(f, "{}", u.hyphenated()),
        }
    }
}

/// How the bot's answer was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Sent upstream for this request; LINE's answer as it came.
    Fresh,
    /// Answered from the store: an identical request was answered before.
    Replayed,
    /// An identical request was in flight; this one got its answer.
    Coalesced,
    /// LINE said 409 for our own key: an earlier attempt was accepted, so the bot gets success.
    ConflictResolved,
    /// Not a keyed endpoint: forwarded untouched.
    Passthrough,
    /// The proxy could not get an answer it may give (all attempts failed, bad input).
    Error,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Fresh,
        Outcome::Replayed,
        Outcome::Coalesced,
        Outcome::ConflictResolved,
        Outcome::Passthrough,
        Outcome::Error,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    /// Metric and log label (Prometheus style).
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Fresh => "fresh",
            Outcome::Replayed => "replayed",
            Outcome::Coalesced => "coalesced",
            Outcome::ConflictResolved => "conflict_resolved",
            Outcome::Passthrough => "passthrough",
            Outcome::Error => "error",
        }
    }

    /// Header value (HTTP style).
    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Outcome::ConflictResolved => "conflict-resolved",
            other => other.label(),
        })
    }
}

/// Why one upstream attempt failed. Each of these is retried with the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttemptFailure {
    /// The TCP or TLS connection could not be established.
    Connect,
    /// The connection broke after the request may have left: LINE may have accepted it.
    Reset,
    /// No complete answer within the per-attempt timeout: LINE may have accepted it.
    Timeout,
    /// LINE answered 5xx: it may still have accepted the message.
    ServerError,
    /// LINE answered the temporary 429, and retrying 429 is configured.
    RateLimited,
}

impl AttemptFailure {
    pub const ALL: [AttemptFailure; 5] = [
        AttemptFailure::Connect,
        AttemptFailure::Reset,
        AttemptFailure::Timeout,
        AttemptFailure::ServerError,
        AttemptFailure::RateLimited,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    /// The `reason` label of the retry metrics.
    pub fn label(self) -> &'static str {
        match self {
            AttemptFailure::Connect => "connect",
            AttemptFailure::Reset => "reset",
            AttemptFailure::Timeout => "timeout",
            AttemptFailure::ServerError => "status_5xx",
            AttemptFailure::RateLimited => "status_429",
        }
    }
}

impl fmt::Display for AttemptFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttemptFailure::Connect => "could not connect",
            AttemptFailure::Reset => "connection reset before an answer",
            AttemptFailure::Timeout => "attempt timed out",
            AttemptFailure::ServerError => "server error",
            AttemptFailure::RateLimited => "rate limited",
        })
    }
}

/// An answer's few headers, exactly sized: a `HeaderMap` costs several hundred bytes
/// of tables per stored answer, more than the answers themselves.
pub type KeptHeaders = Box<[(HeaderName, HeaderValue)]>;

/// What the bot is answered with, fresh or replayed. Only the headers worth replaying
/// are kept (content type and LINE's request ids), never the request's credential.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: KeptHeaders,
    pub body: Bytes,
    pub key: RetryKey,
    /// How the answer was obtained upstream: fresh, conflict-resolved, or error.
    pub outcome: Outcome,
    pub attempts: u32,
    /// LINE's own status on the last attempt, when there was one (a 409 settled into
    /// 200 keeps 409 here, for the log).
    pub upstream_status: Option<StatusCode>,
    /// The token the answer was obtained with. A kept answer is replayed only to that
    /// token: any other, even one of the same channel, is sent to LINE under the same
    /// key, and LINE judges it. `None` (a record from before tokens were kept) is
    /// replayed to no one.
    pub owner: Option<TokenTag>,
}

/// A hash of a request's access token: who may read a kept answer, and the name a
/// token's channel is cached under. Never the token itself.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenTag(pub [u8; 16]);

impl fmt::Debug for TokenTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The LINE channel a token belongs to, named by its bot's user ID (`U` and 32
/// lower-case hex digits): one per channel, and the one identity LINE gives for every
/// kind of token, stateless ones included (docs/channels.md). Not a secret.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ChannelId(Box<str>);

impl ChannelId {
    /// A bot user ID as LINE writes it, or `None`: bytes from LINE or from a shared
    /// store are input like any other.
    pub fn parse(text: &str) -> Option<ChannelId> {
        let hex = text.strip_prefix('U')?;
        (hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| ChannelId(format!("U{}", hex.to_ascii_lowercase()).into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a store holds, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Settled answers kept for replay.
    pub entries: u64,
    /// Bytes those answers weigh against the store's bound.
    pub bytes: u64,
    /// The bound `bytes` is held to; 0 when there is none (a Redis without
    /// `maxmemory`).
    pub max_bytes: u64,
    /// Claims held by requests in flight now.
    pub claims: u64,
    /// Whether the store is serving. A shared store may be unreachable, and the
    /// proxy then sends without it.
    pub up: bool,
}
