//! Everything that is not a keyed endpoint: forwarded untouched and streamed both
//! ways, with hop-by-hop headers handled per RFC 9110 §7.6.1. No buffering, no
//! retries: the request may not be idempotent, and its body is gone once streamed.
//!
//! Neither side may stall a stream for ever: the client's body may not pause longer
//! than `body-timeout`, the upstream's answer not longer than `idle-timeout`. When the
//! client's body breaks or stalls, the failure is the client's (400/408), not LINE's.

use http::header::{
    CONNECTION, HOST, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING,
    UPGRADE,
};
use http::request::Parts;
use http::{HeaderMap, HeaderName, Request, Response, Uri, Version};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{timeout, Instant, Sleep};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::{classify, Pipeline};
use crate::body::{boxed, BoxError, ProxyBody};
use crate::domain::{AttemptFailure, RETRY_KEY_HEADER};
use crate::error::ProxyError;
use crate::metrics::Limit;

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes the headers that describe one connection, not the message: those listed
/// in `Connection`, and the fixed hop-by-hop set.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(CONNECTION) {
        let listed: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    for name in [
        CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        PROXY_AUTHENTICATE,
        PROXY_AUTHORIZATION,
        TE,
        TRAILER,
        TRANSFER_ENCODING,
        UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// A non-keyed request to LINE. LINE rejects a retry key on every other endpoint,
/// so a stray one (sticky-key client bugs) is removed rather than earning a 400; but
/// only where the path is certainly not a keyed one: on a path the proxy cannot read
/// for certain, the bot's key is all that stands between a resend and a duplicate.
pub(crate) async fn to_line<B>(
    p: &Pipeline,
    req: Request<B>,
) -> Result<Response<ProxyBody>, ProxyError>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = req.into_parts();
    if classify::certainly_unkeyed(&parts.method, parts.uri.path())
        && parts.headers.remove(RETRY_KEY_HEADER).is_some()
    {
        p.metrics.stray_key_removed();
    }
    let uri = p.upstream.uri(parts.uri.path_and_query());
    forward(p, &mut parts, boxed(body), uri).await
}

/// Sends one request to `uri`, streaming its body, and streams the answer back.
pub(crate) async fn forward(
    p: &Pipeline,
    parts: &mut Parts,
    body: ProxyBody,
    uri: Uri,
) -> Result<Response<ProxyBody>, ProxyError> {
    let mut headers = std::mem::take(&mut parts.headers);
    strip_hop_by_hop(&mut headers);
    headers.remove(HOST);

    let sent = Arc::new(Progress::default());
    let body = Watched::new(body, p.intake.body_timeout, Some(sent.clone()));
    let mut req = Request::new(boxed(body));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;

    let started = Instant::now();
    let head_timeout = p.settings().policy.retry.attempt_timeout;
    let res = match timeout(head_timeout, p.upstream.request(req)).await {
        // Still waiting for the client's body: the request never arrived whole in time.
        Err(_) if sent.state() == Progress::STREAMING => Err(ProxyError::BodyTimeout),
        Err(_) => Err(ProxyError::Forward(AttemptFailure::Timeout)),
        Ok(result) => result.map_err(ProxyError::Forward),
    };
    p.metrics.attempt(None, started.elapsed());
    // Whatever the upstream client made of it, a body that broke or stalled on the
    // client's side is the client's failure, not LINE's.
    let res = res.map_err(|err| match sent.state() {
        Progress::BROKEN => ProxyError::ClientBody,
        Progress::STALLED => ProxyError::BodyTimeout,
        _ => err,
    });
    if matches!(res, Err(ProxyError::BodyTimeout)) {
        p.metrics.limit_hit(Limit::BodyTimeout);
    }
    let res = res?;
    let (mut parts, body) = res.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // The client's connection has its own version; hyper frames the answer for it.
    parts.version = Version::default();
    let body = boxed(Watched::new(body, p.intake.stream_idle, None));
    Ok(Response::from_parts(parts, body))
}

/// How far a streamed request body got.
#[derive(Debug, Default)]
struct Progress(AtomicU8);

impl Progress {
    const STREAMING: u8 = 0;
    const DONE: u8 = 1;
    const STALLED: u8 = 2;
    const BROKEN: u8 = 3;

    fn state(&self) -> u8 {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self, state: u8) {
        self.0.store(state, Ordering::Release);
    }
}

/// The client's body paused longer than `body-timeout`, or the upstream's answer longer
/// than `idle-timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the stream paused for longer than {0:?}")]
struct Stalled(Duration);

/// A streamed body that may not pause longer than `idle` between frames, and that
/// says (through `progress`) how far it got.
struct Watched {
    body: ProxyBody,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    /// The clock starts at the first poll, not when the upstream is still connecting.
    polled: bool,
    progress: Option<Arc<Progress>>,
}

impl Watched {
    fn new(body: ProxyBody, idle: Duration, progress: Option<Arc<Progress>>) -> Self {
        if let Some(progress) = &progress {
            if body.is_end_stream() {
                progress.set(Progress::DONE);
            }
        }
        Watched {
            body,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            polled: false,
            progress,
        }
    }

    fn mark(&self, state: u8) {
        if let Some(progress) = &self.progress {
            progress.set(state);
        }
    }
}

impl Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if !std::mem::replace(&mut this.polled, true) {
            let deadline = Instant::now() + this.idle;
            this.timer.as_mut().reset(deadline);
        }
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let deadline = Instant::now() + this.idle;
                this.timer.as_mut().reset(deadline);
                if this.body.is_end_stream() {
                    this.mark(Progress::DONE);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                this.mark(Progress::BROKEN);
                Poll::Ready(Some(Err(err)))
            }
            Poll::Ready(None) => {
                this.mark(Progress::DONE);
                Poll::Ready(None)
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.mark(Progress::STALLED);
                    Poll::Ready(Some(Err(Box::new(Stalled(this.idle)))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_fixed_and_listed_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, "keep-alive, X-Custom-Hop".parse().unwrap());
        h.insert("x-custom-hop", "1".parse().unwrap());
        h.insert(KEEP_ALIVE, "timeout=5".parse().unwrap());
        h.insert(PROXY_AUTHORIZATION, "Basic eA==".parse().unwrap());
        h.insert(TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(TE, "trailers".parse().unwrap());
        h.insert("authorization", "Bearer t".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "content-type"]);
    }
}
