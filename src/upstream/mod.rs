//! The way out: the client to LINE. One pooled hyper client, TLS config built once,
//! HTTP/2 or HTTP/1.1 by ALPN. Certificates are always verified: webpki roots, plus
//! the operator's `--upstream-ca` (tests point it at their own CA).
//!
//! Every connection it opens goes through [`egress`]: straight to the target, or as a
//! `CONNECT` tunnel through the company egress proxy (`upstream-proxy`).
//!
//! The request path sees it through the [`Upstream`] trait, so a phase can be driven
//! against a stand-in without sockets.

pub(crate) mod egress;

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;

use crate::body::{boxed, BoxFuture, ProxyBody};
use crate::config::UpstreamTarget;
use crate::domain::AttemptFailure;
use egress::{Egress, EgressConnector};

/// Where requests bound for LINE go, and how they get there.
pub trait Upstream: Send + Sync + 'static {
    /// The upstream URI for a request's own path and query.
    fn uri(&self, path_and_query: Option<&PathAndQuery>) -> Uri;

    /// Sends one request to its URI and returns the answer head with its body still
    /// streaming. A failure is classified once, here: could not connect, or the
    /// connection broke after the request may have left.
    fn request(
        &self,
        req: Request<ProxyBody>,
    ) -> BoxFuture<'_, Result<Response<ProxyBody>, AttemptFailure>>;
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream CA file {path}: {reason}")]
    Ca { path: String, reason: String },
    #[error("upstream TLS setup: {0}")]
    Tls(#[from] rustls::Error),
}

/// The real client: pooled connections to `--upstream` (and, for allowlisted
/// absolute-form requests, to other hosts), each opened through `egress`.
pub(crate) struct Client {
    client: HyperClient<HttpsConnector<EgressConnector>, ProxyBody>,
    target: UpstreamTarget,
}

impl Client {
    pub(crate) fn new(
        target: UpstreamTarget,
        extra_ca: Option<&Path>,
        egress: Arc<Egress>,
        connect_timeout: Duration,
    ) -> Result<Self, UpstreamError> {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = extra_ca {
            add_pem_roots(&mut roots, path)?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();

        let http = EgressConnector::new(egress, connect_timeout);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);

        let client = HyperClient::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(https);
        Ok(Client { client, target })
    }
}

impl Upstream for Client {
    fn uri(&self, path_and_query: Option<&PathAndQuery>) -> Uri {
        build_uri(
            self.target.scheme.clone(),
            self.target.authority.clone(),
            path_and_query,
        )
    }

    fn request(
        &self,
        req: Request<ProxyBody>,
    ) -> BoxFuture<'_, Result<Response<ProxyBody>, AttemptFailure>> {
        Box::pin(async move {
            match self.client.request(req).await {
                Ok(res) => Ok(res.map(boxed)),
                Err(err) => {
                    // The cause (refused, certificate not trusted, reset, …) is what an
                    // operator needs; hyper's own message is only "client error (Connect)".
                    tracing::debug!(error = %chain(&err), "upstream request failed");
                    Err(if err.is_connect() {
                        AttemptFailure::Connect
                    } else {
                        AttemptFailure::Reset
                    })
                }
            }
        })
    }
}

/// An error and its causes on one line.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

pub(crate) fn build_uri(
    scheme: Scheme,
    authority: http::uri::Authority,
    path_and_query: Option<&PathAndQuery>,
) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(scheme);
    parts.authority = Some(authority);
    parts.path_and_query = Some(
        path_and_query
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    // Scheme, authority and path all came from parsed values, so the parts are valid.
    Uri::from_parts(parts).unwrap_or_default()
}

fn add_pem_roots(roots: &mut RootCertStore, path: &Path) -> Result<(), UpstreamError> {
    let err = |reason: String| UpstreamError::Ca {
        path: path.display().to_string(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut added = 0;
    for cert in rustls_pemfile::certs(&mut BufReader::new(file)) {
        let cert = cert.map_err(|e| err(e.to_string()))?;
        roots.add(cert).map_err(|e| err(e.to_string()))?;
        added += 1;
    }
    if added == 0 {
        return Err(err("no PEM certificate in it".into()));
    }
    Ok(())
}
