//! Phase 8, respond: LINE's answer, plus the key it was sent with and how it was obtained.

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderName, HeaderValue, Response};

use crate::body::{full, ProxyBody};
use crate::domain::{Answer, KeptHeaders, Outcome, RETRY_KEY_HEADER};
use crate::error::ProxyError;

/// Says how the answer was obtained: fresh, replayed, coalesced, conflict-resolved, …
pub(crate) const OUTCOME_HEADER: HeaderName = HeaderName::from_static("x-line-retry-proxy");
/// On answers made by the proxy itself: the error's stable reason.
pub(crate) const ERROR_HEADER: HeaderName = HeaderName::from_static("x-line-retry-proxy-error");

/// The response for a stored or fresh answer, as seen through `outcome`.
pub(crate) fn answer_response(answer: &Answer, outcome: Outcome) -> Response<ProxyBody> {
    let mut res = Response::new(full(answer.body.clone()));
    *res.status_mut() = answer.status;
    let headers = res.headers_mut();
    headers.reserve(answer.headers.len() + 2);
    for (name, value) in answer.headers.iter() {
        headers.insert(name.clone(), value.clone());
    }
    headers.insert(RETRY_KEY_HEADER, answer.key.header_value());
    headers.insert(OUTCOME_HEADER, outcome.header_value());
    res
}

/// The one place a request-path error becomes an HTTP answer.
pub(crate) fn error_response(err: &ProxyError) -> Response<ProxyBody> {
    let (status, kept, body) = error_parts(err);
    let mut res = Response::new(full(body));
    *res.status_mut() = status;
    let headers = res.headers_mut();
    for (name, value) in kept.into_vec() {
        headers.insert(name, value);
    }
    headers.insert(OUTCOME_HEADER, Outcome::Error.header_value());
    if err.closes_connection() {
        headers.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    if matches!(err, ProxyError::ProxyAuthRequired) {
        headers.insert(
            http::header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"line-retry-proxy\""),
        );
    }
    res
}

/// An error as a storable-shaped answer, so coalesced waiters get it too.
pub(crate) fn error_parts(err: &ProxyError) -> (http::StatusCode, KeptHeaders, Bytes) {
    let headers = Box::new([
        (CONTENT_TYPE, HeaderValue::from_static("application/json")),
        (ERROR_HEADER, err.reason_header()),
    ]);
    (err.status(), headers, err.json_body())
}
