//! The one proxy port: accept loop, per-connection task, graceful drain, and the
//! routing of each request by its form:
//! - `CONNECT host:port` → [`super::connect`] (intercept, tunnel, or refuse);
//! - absolute-form `http://host/…` (a plain HTTP proxy client) → LINE's hosts go
//!   through the pipeline, allowlisted hosts are forwarded, the rest refused;
//! - origin-form `/v2/…` (base-URL mode) → the pipeline, to `--upstream`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use std::borrow::Cow;

use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::auth::authorized;
use super::idle::{drive, hold, Activity};
use super::Edge;
use crate::body::{boxed, BoxFuture, ProxyBody};
use crate::error::ProxyError;
use crate::metrics::Limit;
use crate::pipeline::{classify, forward, respond};

/// A connection's place under `max-connections`. A CONNECT turns the connection into
/// a tunnel that outlives the HTTP connection, so the tunnel takes the place with it.
#[derive(Debug, Clone)]
pub struct ConnectionSlot(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl ConnectionSlot {
    pub fn take(&self) -> Option<OwnedSemaphorePermit> {
        match self.0.lock() {
            Ok(mut permit) => permit.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }
    }
}

/// Where a connection came from: decides how its requests are routed.
#[derive(Debug, Clone)]
pub enum Front {
    /// The proxy port itself.
    Listener {
        peer: SocketAddr,
        slot: ConnectionSlot,
    },
    /// Decrypted from a CONNECT tunnel to an intercepted host: every request is for LINE.
    Intercepted { peer: SocketAddr },
}

pub async fn serve(edge: Arc<Edge>, listener: TcpListener) {
    let limit = Arc::new(Semaphore::new(edge.limits.max_connections));
    loop {
        let accepted = tokio::select! {
            _ = edge.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // EMFILE and friends: back off briefly instead of spinning on the error.
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            edge.metrics.limit_hit(Limit::MaxConnections);
            tracing::warn!(%peer, limit = edge.limits.max_connections, "connection limit reached, closing new connection");
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Released when the connection and every clone of its front are gone, unless a
        // CONNECT tunnel took it along.
        let slot = ConnectionSlot(Arc::new(Mutex::new(Some(permit))));
        edge.tasks.spawn(serve_connection(
            edge.clone(),
            stream,
            Front::Listener { peer, slot },
        ));
    }
}

/// Serves HTTP/1.1 or HTTP/2 on one connection until it closes, or until shutdown
/// asks it to finish the requests it has and close.
///
/// Boxed because it is recursive through CONNECT: a connection's request may open
/// an intercepted tunnel, which serves a connection of its own.
pub fn serve_connection<I>(edge: Arc<Edge>, io: I, front: Front) -> BoxFuture<'static, ()>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    Box::pin(serve_connection_inner(edge, io, front))
}

async fn serve_connection_inner<I>(edge: Arc<Edge>, io: I, front: Front)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _open = edge.metrics.connection();
    let activity = Activity::default();
    let service_edge = edge.clone();
    let service_activity = activity.clone();
    let service = service_fn(move |req| {
        let edge = service_edge.clone();
        let front = front.clone();
        // In flight until the answer's body is sent or dropped.
        let busy = service_activity.begin();
        async move { Ok::<_, Infallible>(route(edge, req, front).await.map(|b| hold(b, busy))) }
    });
    let conn = edge
        .http
        .serve_connection_with_upgrades(TokioIo::new(io), service);
    drive(
        Box::pin(conn),
        &activity,
        &edge.limits,
        &edge.shutdown,
        &edge.metrics,
    )
    .await;
}

async fn route(edge: Arc<Edge>, req: Request<Incoming>, front: Front) -> Response<ProxyBody> {
    let req = normalize(req);
    match front {
        Front::Intercepted { .. } if req.method() == Method::CONNECT => respond::error_response(
            &ProxyError::MethodNotAllowed("CONNECT inside a tunnel to LINE is not allowed"),
        ),
        Front::Intercepted { .. } => edge.pipeline.handle(req).await,
        Front::Listener { peer, slot } => {
            if req.method() == Method::CONNECT && req.version() >= Version::HTTP_2 {
                // Streams of one HTTP/2 connection would share its one place under
                // max-connections; HTTPS_PROXY clients use HTTP/1.1 CONNECT anyway.
                edge.metrics.connect_refused();
                respond::error_response(&ProxyError::MethodNotAllowed(
                    "CONNECT over HTTP/2 is not supported; use HTTP/1.1",
                ))
            } else if req.method() == Method::CONNECT {
                super::connect::handle(edge, req, peer, slot).await
            } else if req.version() < Version::HTTP_2 && req.uri().authority().is_some() {
                absolute_form(edge, req).await
            } else {
                edge.pipeline.handle(req).await
            }
        }
    }
}

/// The request with its path in the one spelling the pipeline keys, fingerprints and
/// forwards: escapes of unreserved characters decoded (see [`classify::normalize_path`]).
fn normalize(mut req: Request<Incoming>) -> Request<Incoming> {
    let path = req.uri().path();
    let Cow::Owned(path) = classify::normalize_path(path) else {
        return req;
    };
    let target = match req.uri().query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let mut parts = req.uri().clone().into_parts();
    match PathAndQuery::try_from(target) {
        Ok(normalized) => parts.path_and_query = Some(normalized),
        Err(_) => return req,
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    req
}

/// A plain HTTP proxy request: `POST http://api.line.me/v2/bot/message/push`.
async fn absolute_form(edge: Arc<Edge>, req: Request<Incoming>) -> Response<ProxyBody> {
    if !authorized(edge.proxy_auth.as_ref(), req.headers()) {
        return respond::error_response(&ProxyError::ProxyAuthRequired);
    }
    let Some(host) = req.uri().host().map(str::to_ascii_lowercase) else {
        return respond::error_response(&ProxyError::BadRequest(
            "absolute-form target without a host",
        ));
    };
    let port =
        req.uri()
            .port_u16()
            .unwrap_or(if req.uri().scheme() == Some(&http::uri::Scheme::HTTPS) {
                443
            } else {
                80
            });
    let settings = edge.pipeline.settings();
    if settings.policy.intercepts(&host) {
        return edge.pipeline.handle(req).await;
    }
    if !settings.policy.tunnel_allowed(&host, port) {
        edge.metrics.connect_refused();
        return respond::error_response(&ProxyError::HostNotAllowed { host });
    }
    let (mut parts, body) = req.into_parts();
    let uri = parts.uri.clone();
    match forward::forward(&edge.pipeline, &mut parts, boxed(body), uri).await {
        Ok(res) => res,
        Err(err) => respond::error_response(&err),
    }
}
