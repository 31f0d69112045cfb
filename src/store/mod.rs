//! The answer store: phase 5 (claim) and the keeping half of phase 7 (settle).
//!
//! One interface, chosen by `--store`. A claim on a fingerprint returns one of:
//! - [`Claim::Done`]: a stored answer, replayed to the bot;
//! - [`Claim::InFlight`]: another request with the same fingerprint is being sent;
//!   the future resolves to its answer (coalescing), or `None` if its owner gave up,
//!   in which case the caller claims again;
//! - [`Claim::Owner`]: this caller sends, and must hand the answer to the [`Ticket`].
//!   A ticket dropped unsettled releases the claim, so waiters never wait on a dead owner.
//!
//! A store failure is never a reason to refuse a send: the derived key still makes
//! LINE refuse a duplicate. The caller counts it and sends without the store.

pub mod memory;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};

use crate::pipeline::fingerprint::Fingerprint;
use crate::pipeline::key::RetryKey;
use crate::pipeline::respond::Outcome;

/// An answer's few headers, exactly sized: a `HeaderMap` costs several hundred bytes
/// of tables per stored answer, more than the answers themselves.
pub type KeptHeaders = Box<[(HeaderName, HeaderValue)]>;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

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
}

impl Answer {
    /// Bytes this answer holds, for the store's memory bound.
    pub fn weight(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| {
                std::mem::size_of::<(HeaderName, HeaderValue)>() + k.as_str().len() + v.len()
            })
            .sum();
        std::mem::size_of::<Answer>() + headers + self.body.len()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("answer store unavailable: {0}")]
    Unavailable(String),
}

pub enum Claim {
    Done(Arc<Answer>),
    InFlight(BoxFuture<'static, Option<Arc<Answer>>>),
    Owner(Box<dyn Ticket>),
}

pub trait Ticket: Send {
    /// Publishes `answer` to everyone waiting on this fingerprint and, when `keep_for`
    /// is set, keeps it for replay that long.
    fn settle(
        self: Box<Self>,
        answer: Arc<Answer>,
        keep_for: Option<Duration>,
    ) -> BoxFuture<'static, Result<(), StoreError>>;
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub entries: u64,
    pub bytes: u64,
}

pub trait Store: Send + Sync + 'static {
    /// Claims `fp` for at most `lease` (the owner's deadline plus a margin), after
    /// which a claim whose owner vanished without settling lapses.
    fn claim(&self, fp: Fingerprint, lease: Duration) -> BoxFuture<'_, Result<Claim, StoreError>>;

    fn stats(&self) -> StoreStats;
}
