//! line-retry-proxy: retry safety for LINE Messaging API bots, without touching them.
//!
//! The proxy adds an `X-Line-Retry-Key` derived from the request to the four LINE
//! endpoints that accept one (push, multicast, narrowcast, broadcast), retries
//! upstream failures itself under that same key, and keeps each answer so that a
//! bot's own resend gets the original answer instead of a second message.
//!
//! # Layout
//! - [`config`]: command line + environment + TOML file (its `sources`) → values
//!   validated by name → one `Config`.
//! - [`app`]: the composition root; `run(app, listener, admin, shutdown)`.
//! - [`listener`]: the proxy port: accept loop, connections, routing by request form.
//! - [`connect`]: `CONNECT`: intercept (TLS with our CA), tunnel, or refuse.
//! - [`pipeline`]: the request path for LINE, one module per phase:
//!   [`pipeline::classify`] → [`pipeline::read`] → [`pipeline::fingerprint`] →
//!   [`pipeline::key`] → claim ([`store`]) → [`pipeline::send`] →
//!   [`pipeline::settle`] → [`pipeline::respond`]; [`pipeline::forward`] for the rest.
//! - [`retry`]: backoff with full jitter, and the proxy-wide retry budget.
//! - [`store`]: the answer store interface and its in-memory implementation.
//! - [`tls`]: intercept CA and leaves; the upstream client.
//! - [`admin`], [`metrics`], [`telemetry`]: health, Prometheus metrics, logs.
//! - [`admin_client`]: the `healthcheck` and `stats` subcommands' side of the admin port.
//! - [`error`]: the request path's error type: side, retryability, HTTP answer.

#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_client;
pub mod app;
pub mod config;
pub mod connect;
pub mod error;
pub mod listener;
pub mod metrics;
pub mod pipeline;
pub mod retry;
pub mod store;
pub mod telemetry;
pub mod tls;
