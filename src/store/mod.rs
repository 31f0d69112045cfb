//! The answer store: phase 5 (claim), and the answer's publishing at the end of phase 7
//! (settle).
//!
//! One interface, chosen by `--store`; it knows the domain only. A claim on a
//! fingerprint returns one of:
//! - [`Claim::Done`]: a stored answer still inside the window in force, replayed;
//! - [`Claim::InFlight`]: another request with the same fingerprint is being sent;
//!   the future resolves to its answer (coalescing), or `None` if its owner gave up,
//!   in which case the caller claims again;
//! - [`Claim::Owner`]: this caller sends, and must hand the answer to the [`Ticket`].
//!   A ticket dropped unpublished releases the claim, so waiters never wait on a dead owner.
//!
//! The owner also learns when the fingerprint was *first seen*: with a dedup window
//! shorter than LINE's 24 h, the key mixes in that window, and a send must keep its key
//! until the window has passed since its first sighting, whatever became of it (also
//! when its answer was not kept). So the sighting is recorded for the whole window,
//! apart from the answer.
//!
//! A store failure is never a reason to refuse a send: the derived key still makes
//! LINE refuse a duplicate. The caller counts it and sends without the store. A
//! shared store logs its own changes of state (one line each), so the caller need not.

pub mod memory;
pub(crate) mod record;
pub mod redis;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::body::BoxFuture;
use crate::domain::{Answer, ChannelId, Fingerprint, StoreStats, TokenTag};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached in time, or refused the operation. The text never
    /// holds a credential.
    #[error("answer store unavailable: {0}")]
    Unavailable(String),
    /// A stored record could not be read back; it was discarded, so the next claim
    /// finds nothing.
    #[error("answer store held a record it cannot read; discarded")]
    Corrupt,
    /// The store cannot be built from its settings (at start).
    #[error("{0}")]
    Setup(String),
}

/// One claim: which send, for how long, under which window, at what time.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest {
    pub fp: Fingerprint,
    /// A claim whose owner vanished without settling lapses after this long (the
    /// owner's deadline plus a margin).
    pub lease: Duration,
    /// The dedup window in force now: answers and sightings older than this are gone,
    /// even if they were kept under a longer window before a reload.
    pub window: Duration,
    /// The wall clock now: sightings are compared across restarts and replicas.
    pub now: SystemTime,
}

impl ClaimRequest {
    /// Whether something first seen at `first_seen` is still inside the window.
    pub(crate) fn within_window(&self, first_seen: SystemTime) -> bool {
        // A clock that went backwards makes the age zero: still inside.
        let age = self.now.duration_since(first_seen).unwrap_or_default();
        age < self.window
    }

    /// How much of the window is left for something first seen at `first_seen`.
    pub(crate) fn window_left(&self, first_seen: SystemTime) -> Duration {
        self.window
            .saturating_sub(self.now.duration_since(first_seen).unwrap_or_default())
    }
}

pub enum Claim {
    Done(Arc<Answer>),
    InFlight(BoxFuture<'static, Option<Arc<Answer>>>),
    Owner {
        ticket: Box<dyn Ticket>,
        /// When this fingerprint was first seen inside the window (now, if never).
        first_seen: SystemTime,
    },
}

pub trait Ticket: Send {
    /// Publishes `answer` to everyone waiting on this fingerprint and, when `keep` is
    /// set, keeps it for replay until the window has passed since the first sighting.
    fn publish(
        self: Box<Self>,
        answer: Arc<Answer>,
        keep: bool,
    ) -> BoxFuture<'static, Result<(), StoreError>>;
}

/// A name a channel is known by, in the directory a shared store keeps for every
/// replica: a token (by its tag), or LINE's numeric channel id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelName {
    Token(TokenTag),
    Id(Box<str>),
}

pub trait Store: Send + Sync + 'static {
    fn claim(&self, req: ClaimRequest) -> BoxFuture<'_, Result<Claim, StoreError>>;

    /// The channel `name` belongs to, as a replica (or this process before a restart)
    /// recorded it. The embedded store keeps no directory: the proxy's own cache is it.
    fn channel(&self, _name: &ChannelName) -> BoxFuture<'_, Result<Option<ChannelId>, StoreError>> {
        Box::pin(std::future::ready(Ok(None)))
    }

    /// Records that `name` belongs to `channel`, for `ttl`.
    fn record_channel(
        &self,
        _name: &ChannelName,
        _channel: &ChannelId,
        _ttl: Duration,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// What the store holds, as of the last [`Store::refresh`] for a shared store.
    fn stats(&self) -> StoreStats;

    /// Brings what [`Store::stats`] reports up to date before a scrape. A shared
    /// store asks its server, bounded by its timeout; the embedded one has nothing
    /// to ask.
    fn refresh(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    /// Resolves once the store has been tried: a shared store has connected, or
    /// found its server down, within its own bounds. The proxy serves after this, so
    /// its first sends find the store as it is. The embedded store is ready at once.
    fn ready(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    /// One line for `/readyz`: which store, and whether it is serving. The proxy is
    /// ready either way: without its store it still sends, keyed.
    fn status_line(&self) -> String;
}
