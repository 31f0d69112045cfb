//! One connection, HTTP/1.1 or HTTP/2, served until it closes, for the listener and
//! for the decrypted side of an intercepted CONNECT alike; and the routing of each of
//! its requests by its form:
//! - `CONNECT host:port` → [`super::connect`] (intercept, tunnel, or refuse);
//! - absolute-form `http://host/…` (a plain HTTP proxy client) → LINE's hosts go
//!   through the pipeline, allowlisted hosts are forwarded, the rest refused;
//! - origin-form `/v2/…` (base-URL mode) → the pipeline, to `--upstream`.
//!
//! Where a named host goes is one decision, [`crate::config::Policy::destination`], for CONNECT and
//! absolute-form alike.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use super::auth::authorized;
use super::connect;
use super::idle::{drive, hold, Activity};
use super::slot::ConnectionSlot;
use super::Edge;
use crate::body::{boxed, BoxFuture, ProxyBody};
use crate::config::Destination;
use crate::error::ProxyError;
use crate::pipeline::{classify, forward, respond};

/// Where a connection came from: decides how its requests are routed.
#[derive(Debug, Clone)]
pub(crate) enum Front {
    /// The proxy port itself.
    Listener {
        peer: SocketAddr,
        slot: ConnectionSlot,
    },
    /// Decrypted from a CONNECT tunnel to an intercepted host: every request is for LINE.
    Intercepted,
}

/// Serves HTTP/1.1 or HTTP/2 on one connection until it closes, or until shutdown
/// asks it to finish the requests it has and close.
///
/// Boxed because it is recursive through CONNECT: a connection's request may open
/// an intercepted tunnel, which serves a connection of its own.
pub(crate) fn serve_connection<I>(edge: Arc<Edge>, io: I, front: Front) -> BoxFuture<'static, ()>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    Box::pin(serve_connection_inner(edge, io, front))
}

/// The decrypted side of an intercepted CONNECT, handed to [`connect::handle`] so that
/// `connect` need not know this file: every request on it is for LINE.
fn serve_intercepted(edge: Arc<Edge>, tls: connect::Decrypted) -> BoxFuture<'static, ()> {
    serve_connection(edge, tls, Front::Intercepted)
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
    if classify::malformed_escape(req.uri().path()) {
        return respond::error_response(&ProxyError::BadRequest(
            "a `%` in the path that does not start a %XX escape",
        ));
    }
    let req = normalize(req);
    match front {
        Front::Intercepted if req.method() == Method::CONNECT => respond::error_response(
            &ProxyError::MethodNotAllowed("CONNECT inside a tunnel to LINE is not allowed"),
        ),
        Front::Intercepted => edge.pipeline.handle(req).await,
        Front::Listener { peer, slot } => {
            if req.method() == Method::CONNECT && req.version() >= Version::HTTP_2 {
                // Streams of one HTTP/2 connection would share its one place under
                // max-connections; HTTPS_PROXY clients use HTTP/1.1 CONNECT anyway.
                edge.metrics.connect_refused();
                respond::error_response(&ProxyError::MethodNotAllowed(
                    "CONNECT over HTTP/2 is not supported; use HTTP/1.1",
                ))
            } else if req.method() == Method::CONNECT {
                connect::handle(edge, req, peer, slot, serve_intercepted).await
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

/// The host (lower case) and port of an absolute-form target; the port defaults by scheme.
pub fn absolute_target(uri: &Uri) -> Result<(String, u16), ProxyError> {
    let host = uri
        .host()
        .map(str::to_ascii_lowercase)
        .ok_or(ProxyError::BadRequest(
            "absolute-form target without a host",
        ))?;
    let default = if uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
        443
    } else {
        80
    };
    Ok((host, uri.port_u16().unwrap_or(default)))
}

/// A plain HTTP proxy request: `POST http://api.line.me/v2/bot/message/push`.
async fn absolute_form(edge: Arc<Edge>, req: Request<Incoming>) -> Response<ProxyBody> {
    if !authorized(edge.proxy_auth.as_ref(), req.headers()) {
        return respond::error_response(&ProxyError::ProxyAuthRequired);
    }
    let (host, port) = match absolute_target(req.uri()) {
        Ok(target) => target,
        Err(err) => return respond::error_response(&err),
    };
    match edge.pipeline.settings().policy.destination(&host, port) {
        Destination::Intercept => return edge.pipeline.handle(req).await,
        Destination::Tunnel => {}
        Destination::Refuse => {
            edge.metrics.connect_refused();
            return respond::error_response(&ProxyError::HostNotAllowed { host });
        }
    }
    let (mut parts, body) = req.into_parts();
    let uri = parts.uri.clone();
    match forward::forward(&edge.pipeline, &mut parts, boxed(body), uri).await {
        Ok(res) => res,
        Err(err) => respond::error_response(&err),
    }
}
