//! The composition root: builds the request path's context ([`Pipeline`]) and the
//! edge's ([`Edge`]) from a validated [`Config`], binds, runs, and drains. Imported
//! by nothing in the crate; `main` and the tests start the proxy through it. The
//! layers it composes are drawn in docs/design.md ("Layers").

use std::future::Future;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Policy, RedisTarget, StoreKind, UpstreamProxy};
use crate::edge::intercept::ca::{CaError, CaPlan, CertificateAuthority};
use crate::edge::intercept::leaf::LeafCache;
use crate::edge::{Edge, Limits};
use crate::metrics::Metrics;
use crate::pipeline::read::Intake;
use crate::pipeline::Pipeline;
use crate::store::memory::MemoryStore;
use crate::store::redis::{RedisOptions, RedisStore};
use crate::store::{Store, StoreError};
use crate::upstream::egress::Egress;
use crate::upstream::{Client, UpstreamError};

/// Bounds the intercept leaf cache: one entry per intercepted host name.
const MAX_LEAF_HOSTS: u64 = 1024;
/// A CA this close to its end is warned about at every start.
const CA_RENEW_WARNING: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("intercept CA: {0}")]
    Ca(#[from] CaError),
    #[error("answer store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// A proxy ready to run: its configuration and both contexts.
pub struct App {
    pub config: Config,
    pub(crate) pipeline: Arc<Pipeline>,
    pub edge: Arc<Edge>,
}

impl App {
    pub fn new(config: Config) -> Result<Arc<App>, StartError> {
        let store: Box<dyn Store> = match &config.store {
            StoreKind::Memory => Box::new(MemoryStore::new(config.store_max_bytes)),
            StoreKind::Redis(target) => Box::new(RedisStore::new(redis_options(&config, target))?),
        };
        // One way out for the client to LINE and for the tunnels alike.
        let egress = Arc::new(Egress::new(config.upstream_proxy.clone()));
        if config.upstream_proxy != UpstreamProxy::Direct {
            tracing::info!(upstream_proxy = %config.upstream_proxy, "outbound connections go through an egress proxy");
        }
        let upstream = Client::new(
            config.upstream.clone(),
            config.upstream_ca.as_deref(),
            egress.clone(),
            config.policy.retry.attempt_timeout,
        )?;
        let metrics = Arc::new(Metrics::default());
        let pipeline = Arc::new(
            Pipeline::new(
                store,
                Arc::new(upstream),
                metrics.clone(),
                config.policy.clone(),
                Intake::new(
                    config.body_limit,
                    config.body_timeout,
                    config.idle_timeout,
                    config.buffer_limit,
                    metrics.clone(),
                ),
                config.canonical_json,
            )
            .with_key_scope(config.key_scope),
        );

        let plan = ca_plan(&config);
        let ca = CertificateAuthority::load_or_create(&config.ca_dir, &plan)?;
        check_constraints(&ca, &plan)?;
        if !ca.is_constrained() {
            tracing::warn!("the intercept CA has no name constraint: its key could sign for any site; make a constrained one with `line-retry-proxy ca --renew`");
        }
        let left = ca
            .not_after()
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        if left < CA_RENEW_WARNING {
            tracing::warn!(
                days_left = left.as_secs() / 86_400,
                "the intercept CA expires soon: make the next one with `line-retry-proxy ca --renew`"
            );
        }
        let leaves = LeafCache::new(Arc::new(ca), config.leaf_lifetime, MAX_LEAF_HOSTS);
        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_timeout)
            .keep_alive(true);
        http.http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(std::time::Duration::from_secs(30)));
        let edge = Arc::new(Edge {
            // One tracker for both sides: shutdown waits for connections, tunnels and
            // the upstream work they started.
            tasks: pipeline.tasks.clone(),
            pipeline: pipeline.clone(),
            leaves,
            http,
            proxy_auth: config.proxy_auth.clone(),
            egress,
            limits: Limits {
                max_connections: config.max_connections,
                admin_max_connections: config.admin_max_connections,
                header_timeout: config.header_timeout,
                idle_timeout: config.idle_timeout,
                handshake_timeout: config.handshake_timeout,
            },
            metrics,
            shutdown: CancellationToken::new(),
        });
        Ok(Arc::new(App {
            config,
            pipeline,
            edge,
        }))
    }

    /// Swaps in a new policy; requests already running keep the one they started with.
    pub fn reload(&self, policy: Policy) {
        self.pipeline.reload(policy);
    }
}

/// What [`App::new`] would refuse, found without starting anything (`check-config`):
/// the store's settings and CA, the upstream CA, and the intercept CA directory (its
/// CA loaded and checked if there is one, or the place to create it writable).
pub fn check(config: &Config) -> Result<(), StartError> {
    if let StoreKind::Redis(target) = &config.store {
        crate::store::redis::check(&redis_options(config, target))?;
    }
    Client::new(
        config.upstream.clone(),
        config.upstream_ca.as_deref(),
        Arc::new(Egress::new(config.upstream_proxy.clone())),
        config.policy.retry.attempt_timeout,
    )?;
    if let Some(ca) = CertificateAuthority::check(&config.ca_dir)? {
        check_constraints(&ca, &ca_plan(config))?;
    }
    Ok(())
}

fn ca_plan(config: &Config) -> CaPlan {
    CaPlan {
        hosts: config.policy.intercept_hosts.clone(),
        lifetime: config.ca_lifetime,
    }
}

/// Bots refuse a leaf outside the CA's name constraints: refuse to start instead.
fn check_constraints(ca: &CertificateAuthority, plan: &CaPlan) -> Result<(), CaError> {
    match plan.hosts.iter().find(|h| !ca.permits(h)) {
        Some(host) => Err(CaError::OutsideConstraints(host.clone())),
        None => Ok(()),
    }
}

fn redis_options(config: &Config, target: &RedisTarget) -> RedisOptions {
    RedisOptions {
        tls: target.tls,
        host: target.host.clone(),
        port: target.port,
        db: target.db,
        username: target.username.clone(),
        password: target.password.as_ref().map(|p| p.expose().to_owned()),
        ca: config.store_ca.clone(),
        timeout: config.store_timeout,
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
    let edge = app.edge.clone();
    let admin = tokio::spawn(crate::edge::admin::serve(edge.clone(), admin));
    // A shared store connects in the background; the first sends wait for that (in
    // the listen backlog, within the store's connect bound) so they find it as it is.
    app.pipeline.store.ready().await;
    let proxy = tokio::spawn(crate::edge::listener::serve(edge.clone(), listener));
    tokio::select! {
        _ = shutdown => {}
        _ = edge.shutdown.cancelled() => {}
    }
    tracing::info!(grace = ?app.config.shutdown_grace, "shutting down: no new connections, finishing requests in flight");
    edge.shutdown.cancel();
    edge.tasks.close();
    let drained = tokio::time::timeout(app.config.shutdown_grace, edge.tasks.wait())
        .await
        .is_ok();
    if drained {
        tracing::info!("all requests finished");
    } else {
        tracing::warn!(
            in_flight = edge.metrics.in_flight_now(),
            "grace period over, stopping with work in flight"
        );
    }
    let _ = proxy.await;
    admin.abort();
    drained
}
