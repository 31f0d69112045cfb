//! Phase 8, respond: LINE's answer, plus the key it was sent with and how it was obtained.

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderName, HeaderValue, Response};

use super::{full, ProxyBody};
use crate::error::ProxyError;
use crate::store::{Answer, KeptHeaders};

/// Says how the answer was obtained: fresh, replayed, coalesced, conflict-resolved, …
pub const OUTCOME_HEADER: HeaderName = HeaderName::from_static("x-line-retry-proxy");
/// On answers made by the proxy itself: the error's stable reason.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("x-line-retry-proxy-error");
pub const RETRY_KEY_HEADER: HeaderName = HeaderName::from_static(super::key::HEADER);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Sent upstream for this request; LINE's answer as it came.
    Fresh,
    /// Answered from the store: an identical request was answered before.
    Replayed,
    /// An identical request was in flight; this one got its answer.
    Coalesced,
    /// LINE said 409 for our own key: an earlier attempt was accepted, so the bot gets success.
    ConflictResolved,
    /// Not a keyed endpoint: forwarded untouched.
    Passthrough,
    /// The proxy could not get an answer it may give (all attempts failed, bad input).
    Error,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Fresh,
        Outcome::Replayed,
        Outcome::Coalesced,
        Outcome::ConflictResolved,
        Outcome::Passthrough,
        Outcome::Error,
    ];

    /// Metric label (Prometheus style).
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Fresh => "fresh",
            Outcome::Replayed => "replayed",
            Outcome::Coalesced => "coalesced",
            Outcome::ConflictResolved => "conflict_resolved",
            Outcome::Passthrough => "passthrough",
            Outcome::Error => "error",
        }
    }

    /// Header value (HTTP style).
    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Outcome::ConflictResolved => "conflict-resolved",
            other => other.label(),
        })
    }
}

/// The response for a stored or fresh answer, as seen through `outcome`.
pub fn answer_response(answer: &Answer, outcome: Outcome) -> Response<ProxyBody> {
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
pub fn error_response(err: &ProxyError) -> Response<ProxyBody> {
    let (status, kept, body) = error_parts(err);
    let mut res = Response::new(full(body));
    *res.status_mut() = status;
    let headers = res.headers_mut();
    for (name, value) in kept.into_vec() {
        headers.insert(name, value);
    }
    headers.insert(OUTCOME_HEADER, Outcome::Error.header_value());
    if matches!(err, ProxyError::ProxyAuthRequired) {
        headers.insert(
            http::header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"line-retry-proxy\""),
        );
    }
    res
}

/// An error as a storable-shaped answer, so coalesced waiters get it too.
pub fn error_parts(err: &ProxyError) -> (http::StatusCode, KeptHeaders, Bytes) {
    let headers = Box::new([
        (CONTENT_TYPE, HeaderValue::from_static("application/json")),
        (ERROR_HEADER, err.reason_header()),
    ]);
    (err.status(), headers, err.json_body())
}
