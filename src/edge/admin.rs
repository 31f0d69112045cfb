//! The admin listener: `/healthz` (the process answers), `/readyz` (it accepts
//! traffic: false once shutdown begins; the body also says how the store is, since
//! the proxy serves without it), `/metrics` (Prometheus text).
//!
//! Held to the proxy port's time limits, and to a connection cap of its own
//! (`admin-max-connections`): a flood of sockets here must not use up the descriptors
//! that the proxy port needs for bots.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::idle::{drive, hold, Activity};
use super::Edge;
use crate::body::full;
use crate::metrics::Limit;

pub(crate) async fn serve(edge: Arc<Edge>, listener: TcpListener) {
    let limit = Arc::new(Semaphore::new(edge.limits.admin_max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(error = %err, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            edge.metrics.limit_hit(Limit::AdminMaxConnections);
            tracing::warn!(%peer, limit = edge.limits.admin_max_connections, "admin connection limit reached, closing new connection");
            continue;
        };
        tokio::spawn(serve_connection(edge.clone(), stream, permit));
    }
}

async fn serve_connection(edge: Arc<Edge>, stream: TcpStream, _permit: OwnedSemaphorePermit) {
    let activity = Activity::default();
    let service_edge = edge.clone();
    let service_activity = activity.clone();
    let service = service_fn(move |req| {
        let busy = service_activity.begin();
        let edge = service_edge.clone();
        async move {
            let res = answer(&edge, &req).await.map(|body| hold(full(body), busy));
            Ok::<_, Infallible>(res)
        }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(edge.limits.header_timeout);
    let conn = http.serve_connection(TokioIo::new(stream), service);
    // Not the proxy's shutdown: /readyz must go on answering (503) while it drains.
    let never = CancellationToken::new();
    drive(
        Box::pin(conn),
        &activity,
        &edge.limits,
        &never,
        &edge.metrics,
    )
    .await;
}

async fn answer(edge: &Edge, req: &Request<Incoming>) -> Response<Bytes> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
        (&Method::GET, "/readyz") if edge.shutdown.is_cancelled() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            Bytes::from_static(b"shutting down\n"),
        ),
        (&Method::GET, "/readyz") => (
            StatusCode::OK,
            "text/plain",
            Bytes::from(format!("ready\n{}\n", edge.pipeline.store.status_line())),
        ),
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            Bytes::from(edge.render_metrics().await),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found: try /healthz, /readyz, /metrics\n"),
        ),
    };
    let mut res = Response::new(body);
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    res
}
