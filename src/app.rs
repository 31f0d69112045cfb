//! The composition root: builds the store, the upstream client, the CA and the
//! metrics from a validated [`Config`], and runs the listeners until shutdown.

use std::future::Future;
use std::sync::{Arc, RwLock};

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Policy, StoreKind};
use crate::metrics::Metrics;
use crate::retry::RetryBudget;
use crate::store::memory::MemoryStore;
use crate::store::Store;
use crate::tls::ca::{CaError, CertificateAuthority};
use crate::tls::leaf::LeafCache;
use crate::tls::upstream::{Upstream, UpstreamError};

/// Bounds the intercept leaf cache: one entry per intercepted host name.
const MAX_LEAF_HOSTS: u64 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("intercept CA: {0}")]
    Ca(#[from] CaError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// What SIGHUP may replace: read once per request, swapped whole.
pub struct Live {
    pub policy: Policy,
    /// Rebuilt with the policy, so a new ratio takes effect at once.
    pub budget: RetryBudget,
}

impl Live {
    fn new(policy: Policy) -> Self {
        let budget = RetryBudget::new(
            policy.retry.budget_ratio,
            policy.retry.budget_min_per_second,
        );
        Live { policy, budget }
    }
}

pub struct App {
    pub config: Config,
    live: RwLock<Arc<Live>>,
    pub store: Box<dyn Store>,
    pub upstream: Upstream,
    pub metrics: Metrics,
    pub leaves: LeafCache,
    /// Shared by every client connection: HTTP/1.1 and HTTP/2, with timeouts.
    pub http: auto::Builder<TokioExecutor>,
    /// Upstream tasks, connections and tunnels: shutdown waits for all of them.
    pub tasks: TaskTracker,
    /// Cancelled when shutdown begins: listeners stop accepting, connections drain.
    pub shutdown: CancellationToken,
}

impl App {
    pub fn new(config: Config) -> Result<Arc<App>, StartError> {
        let store: Box<dyn Store> = match config.store {
            StoreKind::Memory => Box::new(MemoryStore::new(config.store_max_bytes)),
        };
        let upstream = Upstream::new(
            config.upstream.clone(),
            config.upstream_ca.as_deref(),
            config.policy.retry.attempt_timeout,
        )?;
        let ca = CertificateAuthority::load_or_create(&config.ca_dir)?;
        let leaves = LeafCache::new(Arc::new(ca), config.leaf_lifetime, MAX_LEAF_HOSTS);

        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_timeout)
            .keep_alive(true);
        http.http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(std::time::Duration::from_secs(30)));

        Ok(Arc::new(App {
            live: RwLock::new(Arc::new(Live::new(config.policy.clone()))),
            config,
            store,
            upstream,
            metrics: Metrics::default(),
            leaves,
            http,
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        }))
    }

    /// The current policy. A read lock held for one `Arc` clone: never contended
    /// except for the instant of a reload.
    pub fn live(&self) -> Arc<Live> {
        match self.live.read() {
            Ok(live) => live.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Swaps in a new policy; requests already running keep the one they started with.
    pub fn reload(&self, policy: Policy) {
        let next = Arc::new(Live::new(policy));
        match self.live.write() {
            Ok(mut live) => *live = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }

    pub fn render_metrics(&self) -> String {
        self.metrics.render(self.store.stats(), self.leaves.len())
    }
}

/// Binds both listeners from the config.
pub async fn bind(config: &Config) -> Result<(TcpListener, TcpListener), StartError> {
    let listen = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.admin_listen,
            source,
        })?;
    Ok((listen, admin))
}

/// Serves until `shutdown` resolves, then stops accepting, lets connections finish
/// their requests, and waits for upstream work (retries included) and tunnels, at
/// most `shutdown-grace` in all. Returns whether everything finished in time.
pub async fn run(
    app: Arc<App>,
    listener: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> bool {
    let proxy = tokio::spawn(crate::listener::serve(app.clone(), listener));
    let admin = tokio::spawn(crate::admin::serve(app.clone(), admin));
    tokio::select! {
        _ = shutdown => {}
        _ = app.shutdown.cancelled() => {}
    }
    tracing::info!(grace = ?app.config.shutdown_grace, "shutting down: no new connections, finishing requests in flight");
    app.shutdown.cancel();
    app.tasks.close();
    let drained = tokio::time::timeout(app.config.shutdown_grace, app.tasks.wait())
        .await
        .is_ok();
    if drained {
        tracing::info!("all requests finished");
    } else {
        tracing::warn!(
            in_flight = app.metrics.in_flight_now(),
            "grace period over, stopping with work in flight"
        );
    }
    let _ = proxy.await;
    admin.abort();
    drained
}
