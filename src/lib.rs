//! line-retry-proxy: retry safety for LINE Messaging API bots, without touching them.
//!
//! The proxy adds an `X-Line-Retry-Key` derived from the request to the four LINE
//! endpoints that accept one (push, multicast, narrowcast, broadcast), retries
//! upstream failures itself under that same key, and keeps each answer so that a
//! bot's own resend gets the original answer instead of a second message.
//!
//! # Layers (imports point down only; a test in `tests/layers.rs` keeps it so)
//! ```text
//!  app ──────────── the composition root: builds both contexts, binds, runs, drains
//!   │
//!  edge ─────────── the way in: listener, CONNECT + interception (CA, leaves), admin
//!   │
//!  pipeline ─────── the request path, one module per phase (below)
//!   │
//!  upstream, store ─ the way out to LINE; claims and kept answers
//!   │
//!  config, metrics, retry, telemetry, error
//!   │
//!  domain, body, sync ─ the vocabulary (Endpoint, Fingerprint, RetryKey, Outcome,
//!                   Answer), the body type, locks that outlive a panic
//! ```
//! [`admin_client`] is the command line's side of the admin port (`healthcheck`, `stats`).
//! [`demo`] is a second composition root beside `main`: the `demo` subcommand.
//!
//! # The request path, phase by phase (docs/design.md)
//! 1. [`pipeline::classify`]: one of the four keyed endpoints, or passthrough
//!    ([`pipeline::forward`], streamed, untouched);
//! 2. [`pipeline::read`]: buffer the body, up to the limit;
//! 3. channel (`pipeline/channel.rs`): which LINE channel the token belongs to, on
//!    LINE's word (docs/channels.md); [`pipeline::fingerprint`]: what makes two
//!    requests the same send;
//! 4. [`pipeline::key`]: the bot's own key, or one derived from the fingerprint;
//! 5. claim: [`store`] (replay, coalesce, or own the send);
//! 6. [`pipeline::send`]: upstream, with retries under the same key;
//! 7. [`pipeline::settle`]: LINE's 409 for our own key becomes the original success;
//! 8. [`pipeline::respond`]: the answer, its key, and how it was obtained.

#![forbid(unsafe_code)]

pub mod admin_client;
pub mod app;
pub mod body;
pub mod config;
pub mod demo;
pub mod domain;
pub mod edge;
pub(crate) mod error;
pub mod metrics;
pub mod pipeline;
pub(crate) mod retry;
pub mod store;
pub(crate) mod sync;
pub mod telemetry;
pub mod upstream;
