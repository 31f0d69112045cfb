//! The way in: the proxy port (base-URL, absolute-form and CONNECT traffic), the
//! interception of CONNECT tunnels to LINE (the proxy's CA and its per-host leaves),
//! and the admin port. The edge hands every request bound for LINE to the
//! [`Pipeline`]; it never looks inside one. The ways in, and how each is routed, are in
//! docs/design.md ("Ways in").
//!
//! Files: `listener` accepts; `serve` serves one connection (the listener's, or the
//! decrypted side of an intercepted tunnel) and routes its requests; `connect` opens
//! CONNECT tunnels; `slot` is a connection's place under `max-connections`; `idle`
//! bounds idle and slow connections; `auth` checks Proxy-Authorization; `admin` serves
//! the admin port; `intercept` holds the CA and its leaves.

pub(crate) mod admin;
pub(crate) mod auth;
pub mod connect;
pub(crate) mod idle;
pub mod intercept;
pub(crate) mod listener;
pub mod serve;
pub(crate) mod slot;

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Secret;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::upstream::egress::Egress;
use intercept::leaf::LeafCache;

/// What the edge holds the outside world to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Client connections served at once; more are closed at accept. Each CONNECT
    /// tunnel keeps the place of the connection that opened it.
    pub(crate) max_connections: usize,
    /// Connections to the admin port at once: a flood there cannot take the
    /// descriptors the proxy port needs.
    pub(crate) admin_max_connections: usize,
    /// Time a client has to send its first request head, from accept (or from the end
    /// of the TLS handshake inside a tunnel).
    pub(crate) header_timeout: Duration,
    /// Time a connection may have no request in flight before it is closed.
    pub(crate) idle_timeout: Duration,
    /// Time a client has to finish a TLS handshake inside CONNECT.
    pub(crate) handshake_timeout: Duration,
}

/// The edge's context.
pub struct Edge {
    /// Where requests bound for LINE go.
    pub(crate) pipeline: Arc<Pipeline>,
    /// Leaf certificates for intercepted hosts, issued by the proxy's CA.
    pub leaves: LeafCache,
    /// Shared by every client connection: HTTP/1.1 and HTTP/2, with timeouts.
    pub(crate) http: auto::Builder<TokioExecutor>,
    /// `Proxy-Authorization: Basic` required on CONNECT and absolute-form requests.
    pub(crate) proxy_auth: Option<Secret>,
    /// How tunnels to allowlisted hosts reach them: directly or through the company
    /// egress proxy, as the client to LINE does.
    pub(crate) egress: Arc<Egress>,
    pub(crate) limits: Limits,
    pub(crate) metrics: Arc<Metrics>,
    /// Connections and tunnels: shutdown waits for all of them.
    pub(crate) tasks: TaskTracker,
    /// Cancelled when shutdown begins: listeners stop accepting, connections drain.
    pub(crate) shutdown: CancellationToken,
}

impl Edge {
    /// The Prometheus text of everything this proxy counts. A shared store is asked
    /// for its figures first (bounded by its timeout).
    pub(crate) async fn render_metrics(&self) -> String {
        self.pipeline.store.refresh().await;
        self.metrics
            .render(self.pipeline.store.stats(), self.leaves.len())
    }
}
