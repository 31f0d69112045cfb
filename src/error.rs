//! The request path's one error type: its side, status and reason. It becomes an HTTP
//! answer in one place, [`crate::pipeline::respond::error_response`].
//!
//! Every error knows its *side* (who is at fault: the bot, the upstream, or the proxy
//! itself) and whether a retry *by the bot* may help. The JSON body names a stable
//! `reason` a program can match on and a `message` a person can read; neither ever
//! carries a credential, a body, or an internal detail such as a file path.

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

use crate::domain::AttemptFailure;

/// Who caused a failure: decides the status class and the log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Upstream,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },

    #[error("malformed request: {0}")]
    BadRequest(&'static str),

    #[error("the request body could not be read from the client")]
    ClientBody,

    #[error("the request body did not arrive in time")]
    BodyTimeout,

    #[error("{0}")]
    MethodNotAllowed(&'static str),

    #[error("the proxy is holding as many request bytes as it may; try again shortly")]
    Overloaded,

    #[error("proxy authentication required")]
    ProxyAuthRequired,

    #[error("{host} is not in the tunnel allowlist of this proxy")]
    HostNotAllowed { host: String },

    #[error("upstream unreachable after {attempts} attempts: {last}")]
    UpstreamUnreachable { attempts: u32, last: AttemptFailure },

    #[error("could not reach {host}: {reason}")]
    TunnelTarget { host: String, reason: String },

    #[error("upstream failed while forwarding: {0}")]
    Forward(AttemptFailure),

    /// Sending under any other scope than the token's channel could carry a key that
    /// differs from an earlier attempt's, so the send is not sent at all.
    #[error("could not learn the access token's channel from LINE ({last}, {attempts} attempts); not sent, send it again")]
    ChannelUnknown { attempts: u32, last: AttemptFailure },

    #[error("a token request body over {limit} bytes")]
    TokenRequestTooLarge { limit: usize },

    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl ProxyError {
    pub(crate) fn side(&self) -> Side {
        match self {
            ProxyError::BodyTooLarge { .. }
            | ProxyError::BadRequest(_)
            | ProxyError::ClientBody
            | ProxyError::BodyTimeout
            | ProxyError::MethodNotAllowed(_)
            | ProxyError::ProxyAuthRequired
            | ProxyError::HostNotAllowed { .. }
            | ProxyError::TokenRequestTooLarge { .. } => Side::Client,
            ProxyError::UpstreamUnreachable { .. }
            | ProxyError::ChannelUnknown { .. }
            | ProxyError::TunnelTarget { .. }
            | ProxyError::Forward(_) => Side::Upstream,
            ProxyError::Overloaded | ProxyError::Internal(_) => Side::Internal,
        }
    }

    /// Whether the bot may succeed by sending the same request again. Upstream
    /// failures qualify: a resend carries the same derived key, so it cannot duplicate.
    pub(crate) fn retryable(&self) -> bool {
        matches!(self.side(), Side::Upstream | Side::Internal)
    }

    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ProxyError::BodyTooLarge { .. } | ProxyError::TokenRequestTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ProxyError::ChannelUnknown { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BadRequest(_) | ProxyError::ClientBody => StatusCode::BAD_REQUEST,
            ProxyError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::ProxyAuthRequired => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            ProxyError::HostNotAllowed { .. } => StatusCode::FORBIDDEN,
            ProxyError::UpstreamUnreachable { last, .. } | ProxyError::Forward(last) => {
                if *last == AttemptFailure::Timeout {
                    StatusCode::GATEWAY_TIMEOUT
                } else {
                    StatusCode::BAD_GATEWAY
                }
            }
            ProxyError::TunnelTarget { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A stable token for programs and for the `x-line-retry-proxy-error` header.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::ClientBody => "client_body",
            ProxyError::BodyTimeout => "body_timeout",
            ProxyError::MethodNotAllowed(_) => "method_not_allowed",
            ProxyError::Overloaded => "overloaded",
            ProxyError::ProxyAuthRequired => "proxy_auth_required",
            ProxyError::HostNotAllowed { .. } => "host_not_allowed",
            ProxyError::UpstreamUnreachable {
                last: AttemptFailure::Timeout,
                ..
            } => "upstream_timeout",
            ProxyError::UpstreamUnreachable { .. } => "upstream_unreachable",
            ProxyError::TunnelTarget { .. } => "tunnel_target_unreachable",
            ProxyError::Forward(_) => "upstream_forward_failed",
            ProxyError::ChannelUnknown { .. } => "channel_unknown",
            ProxyError::TokenRequestTooLarge { .. } => "token_request_too_large",
            ProxyError::Internal(_) => "internal",
        }
    }

    /// The JSON body of the answer: LINE's own `message` field, plus our `reason`.
    pub(crate) fn json_body(&self) -> Bytes {
        let body = serde_json::json!({
            "message": format!("line-retry-proxy: {self}"),
            "reason": self.reason(),
            "retryable": self.retryable(),
        });
        Bytes::from(body.to_string())
    }

    /// Whether the connection must close after this answer: the request's body was cut
    /// off or left unread, so what follows on the connection is not worth reading.
    pub(crate) fn closes_connection(&self) -> bool {
        matches!(
            self,
            ProxyError::ClientBody | ProxyError::BodyTimeout | ProxyError::Overloaded
        )
    }

    pub(crate) fn reason_header(&self) -> HeaderValue {
        HeaderValue::from_static(self.reason())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_body_names_reason_and_is_valid_json() {
        let err = ProxyError::BodyTooLarge { limit: 10 };
        let value: serde_json::Value = serde_json::from_slice(&err.json_body()).unwrap();
        assert_eq!(value["reason"], "body_too_large");
        assert_eq!(value["retryable"], false);
        assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn exhausted_timeouts_are_gateway_timeouts() {
        let err = ProxyError::UpstreamUnreachable {
            attempts: 3,
            last: AttemptFailure::Timeout,
        };
        assert_eq!(err.status(), StatusCode::GATEWAY_TIMEOUT);
        let err = ProxyError::UpstreamUnreachable {
            attempts: 3,
            last: AttemptFailure::Reset,
        };
        assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
        assert!(err.retryable());
    }
}
