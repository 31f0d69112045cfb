//! Everything that is not a keyed endpoint: forwarded untouched and streamed both
//! ways, with hop-by-hop headers handled per RFC 9110 §7.6.1. No buffering, no
//! retries: the request may not be idempotent, and its body is gone once streamed.

use http::header::{
    CONNECTION, HOST, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING,
    UPGRADE,
};
use http::request::Parts;
use http::{HeaderMap, HeaderName, Request, Response, Uri, Version};
use tokio::time::{timeout, Instant};

use super::Pipeline;
use crate::body::{boxed, BoxError, ProxyBody};
use crate::domain::{AttemptFailure, RETRY_KEY_HEADER};
use crate::error::ProxyError;

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes the headers that describe one connection, not the message: those listed
/// in `Connection`, and the fixed hop-by-hop set.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
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
/// so a stray one (sticky-key client bugs) is removed rather than earning a 400.
pub async fn to_line<B>(p: &Pipeline, req: Request<B>) -> Result<Response<ProxyBody>, ProxyError>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = req.into_parts();
    if parts.headers.remove(RETRY_KEY_HEADER).is_some() {
        p.metrics.stray_key_removed();
    }
    let uri = p.upstream.uri(parts.uri.path_and_query());
    forward(p, &mut parts, boxed(body), uri).await
}

/// Sends one request to `uri`, streaming its body, and streams the answer back.
pub async fn forward(
    p: &Pipeline,
    parts: &mut Parts,
    body: ProxyBody,
    uri: Uri,
) -> Result<Response<ProxyBody>, ProxyError> {
    let mut headers = std::mem::take(&mut parts.headers);
    strip_hop_by_hop(&mut headers);
    headers.remove(HOST);

    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;

    let started = Instant::now();
    let head_timeout = p.settings().policy.retry.attempt_timeout;
    let res = match timeout(head_timeout, p.upstream.request(req)).await {
        Err(_) => Err(ProxyError::Forward(AttemptFailure::Timeout)),
        Ok(result) => result.map_err(ProxyError::Forward),
    };
    p.metrics.attempt(None, started.elapsed());
    let (mut parts, body) = res?.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // The client's connection has its own version; hyper frames the answer for it.
    parts.version = Version::default();
    Ok(Response::from_parts(parts, body))
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
