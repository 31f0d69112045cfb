//! `CONNECT host:port`: HTTPS_PROXY mode.
//!
//! - host in the intercept list: answer 200, terminate TLS with a leaf for the SNI
//!   name issued by the proxy's CA, and serve the decrypted requests through the same
//!   pipeline as base-URL mode (HTTP/1.1 or HTTP/2 by ALPN);
//! - host in the tunnel allowlist: connect first (so an unreachable target is a clear
//!   502, not a dead tunnel), through the egress proxy when `upstream-proxy` is set,
//!   answer 200, copy bytes both ways;
//! - anything else: 403 with the reason. Not an open relay.
//!
//! Every tunnel task is tracked: shutdown drains intercepted connections request by
//! request and closes opaque tunnels.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::LazyConfigAcceptor;

use super::auth::authorized;
use super::slot::ConnectionSlot;
use super::Edge;
use crate::body::{full, BoxFuture, ProxyBody};
use crate::config::Destination;
use crate::error::ProxyError;
use crate::pipeline::respond;

/// The bot's side of an intercepted tunnel, decrypted.
pub(crate) type Decrypted = tokio_rustls::server::TlsStream<TokioIo<Upgraded>>;

/// Serves the requests of an intercepted tunnel: the caller's connection serving, passed
/// in so that this file does not import the one that imports it.
pub(crate) type ServeIntercepted = fn(Arc<Edge>, Decrypted) -> BoxFuture<'static, ()>;

pub(crate) async fn handle(
    edge: Arc<Edge>,
    req: Request<Incoming>,
    peer: SocketAddr,
    slot: ConnectionSlot,
    serve: ServeIntercepted,
) -> Response<ProxyBody> {
    match open(&edge, req, peer, slot, serve).await {
        Ok(res) => res,
        Err(err) => {
            edge.metrics.connect_refused();
            tracing::info!(%peer, reason = err.reason(), "CONNECT refused: {err}");
            respond::error_response(&err)
        }
    }
}

async fn open(
    edge: &Arc<Edge>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    slot: ConnectionSlot,
    serve: ServeIntercepted,
) -> Result<Response<ProxyBody>, ProxyError> {
    if !authorized(edge.proxy_auth.as_ref(), req.headers()) {
        return Err(ProxyError::ProxyAuthRequired);
    }
    let (host, port) = connect_target(req.uri())?;
    let settings = edge.pipeline.settings();

    match settings.policy.destination(&host, port) {
        Destination::Intercept => {
            let task_edge = edge.clone();
            after_upgrade(edge, &mut req, &slot, move |upgraded| {
                intercept(task_edge, upgraded, host, peer, serve)
            });
            return Ok(established());
        }
        Destination::Tunnel => {}
        Destination::Refuse => return Err(ProxyError::HostNotAllowed { host }),
    }
    let connect_timeout = settings.policy.retry.attempt_timeout;
    let target = edge
        .egress
        .connect(&host, port, connect_timeout)
        .await
        .map_err(|err| ProxyError::TunnelTarget {
            host: host.clone(),
            reason: err.to_string(),
        })?;
    let task_edge = edge.clone();
    after_upgrade(edge, &mut req, &slot, move |upgraded| {
        tunnel(task_edge, upgraded, target)
    });
    Ok(established())
}

/// The host (lower case, IPv6 without brackets) and port a CONNECT names.
pub fn connect_target(uri: &http::Uri) -> Result<(String, u16), ProxyError> {
    let authority = uri
        .authority()
        .ok_or(ProxyError::BadRequest("CONNECT needs a host:port target"))?;
    let host = authority
        .host()
        .trim_matches(['[', ']'])
        .to_ascii_lowercase();
    let port = authority
        .port_u16()
        .ok_or(ProxyError::BadRequest("CONNECT target has no port"))?;
    Ok((host, port))
}

/// Runs `then` on the raw connection once the 200 has gone out, in a tracked task that
/// takes the connection's place under `max-connections` along.
fn after_upgrade<F, Fut>(edge: &Edge, req: &mut Request<Incoming>, slot: &ConnectionSlot, then: F)
where
    F: FnOnce(Upgraded) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let upgrade = hyper::upgrade::on(req);
    let permit = slot.take();
    edge.tasks.spawn(async move {
        let _permit = permit;
        match upgrade.await {
            Ok(upgraded) => then(upgraded).await,
            Err(err) => tracing::debug!(error = %err, "CONNECT upgrade failed"),
        }
    });
}

fn established() -> Response<ProxyBody> {
    let mut res = Response::new(full(bytes::Bytes::new()));
    *res.status_mut() = StatusCode::OK;
    res
}

/// TLS with the bot, as `host` (or the SNI name, when that is intercepted too).
async fn intercept(
    edge: Arc<Edge>,
    upgraded: Upgraded,
    host: String,
    peer: SocketAddr,
    serve: ServeIntercepted,
) {
    let counted = edge.clone();
    let _open = counted.metrics.tunnel();
    let acceptor =
        LazyConfigAcceptor::new(rustls::server::Acceptor::default(), TokioIo::new(upgraded));
    let handshake = async {
        let start = acceptor.await?;
        let sni = start
            .client_hello()
            .server_name()
            .map(str::to_ascii_lowercase);
        let name = match sni {
            Some(sni) if edge.pipeline.settings().policy.intercepts(&sni) => sni,
            _ => host,
        };
        let config = edge
            .leaves
            .server_config(&name)
            .map_err(std::io::Error::other)?;
        start.into_stream(config).await
    };
    let tls = match timeout(edge.limits.handshake_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            edge.metrics.tls_handshake(false);
            tracing::info!(%peer, error = %err, "TLS handshake with client failed (is the proxy CA trusted?)");
            return;
        }
        Err(_) => {
            edge.metrics.tls_handshake(false);
            tracing::info!(%peer, "TLS handshake with client timed out");
            return;
        }
    };
    edge.metrics.tls_handshake(true);
    serve(edge, tls).await;
}

/// Bytes both ways until either side closes, or shutdown.
async fn tunnel(edge: Arc<Edge>, upgraded: Upgraded, mut target: TcpStream) {
    let _open = edge.metrics.tunnel();
    let mut client = TokioIo::new(upgraded);
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut target) => {
            if let Err(err) = result {
                tracing::debug!(error = %err, "tunnel ended with an error");
            }
        }
        _ = edge.shutdown.cancelled() => {
            tracing::debug!("closing tunnel for shutdown");
        }
    }
}
