//! Phase 7, settle: turn LINE's last answer into what the bot gets and what is kept.
//!
//! The one translation: a 409 for a key *this proxy derived* means an earlier attempt
//! (this process, another replica, or before a restart) was accepted, so the bot gets
//! the endpoint's success, with `x-line-request-id` set to the accepted request's id.
//! A bot's own key keeps its 409: the bot asked for LINE's semantics.
//! Kept for replay: accepted outcomes only. Exhausted 5xx and transport failures are
//! not kept: a later resend retries under the same key, which is safe.

use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::respond::error_parts;
use super::send::Sent;
use crate::domain::{Answer, Endpoint, KeptHeaders, Outcome, RetryKey, TokenTag};
use crate::error::ProxyError;

pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-line-request-id");
pub(crate) const ACCEPTED_REQUEST_ID: HeaderName =
    HeaderName::from_static("x-line-accepted-request-id");

/// LINE's headers worth keeping with an answer; everything else is per-connection.
const KEPT_HEADERS: [HeaderName; 4] = [
    CONTENT_TYPE,
    REQUEST_ID,
    ACCEPTED_REQUEST_ID,
    http::header::RETRY_AFTER,
];

pub(crate) struct Settled {
    pub(crate) answer: Arc<Answer>,
    /// Whether the answer may be replayed to an identical request.
    pub(crate) keep: bool,
}

/// `owner` is the token the send went out with: the only one a kept answer is replayed to.
pub(crate) fn settle(
    endpoint: Endpoint,
    key: RetryKey,
    owner: TokenTag,
    sent: Result<Sent, ProxyError>,
) -> Settled {
    let owner = Some(owner);
    let sent = match sent {
        Ok(sent) => sent,
        Err(err) => {
            let (status, headers, body) = error_parts(&err);
            let answer = Answer {
                status,
                headers,
                body,
                key,
                outcome: Outcome::Error,
                attempts: attempts_of(&err),
                upstream_status: None,
                owner,
            };
            return Settled {
                answer: Arc::new(answer),
                keep: false,
            };
        }
    };
    let upstream_status = Some(sent.status);

    if sent.status == StatusCode::CONFLICT && key.is_derived() {
        if let Some(accepted) = sent.headers.get(&ACCEPTED_REQUEST_ID) {
            let mut headers = vec![(CONTENT_TYPE, HeaderValue::from_static("application/json"))];
            if let Ok(accepted) = HeaderValue::from_bytes(accepted.as_bytes()) {
                headers.push((REQUEST_ID, accepted));
            }
            let answer = Answer {
                status: endpoint.success_status(),
                headers: headers.into_boxed_slice(),
                body: success_body(endpoint, &sent.body),
                key,
                outcome: Outcome::ConflictResolved,
                attempts: sent.attempts,
                upstream_status,
                owner,
            };
            return Settled {
                answer: Arc::new(answer),
                keep: true,
            };
        }
    }

    let keep = sent.status.is_success();
    let outcome = if sent.status.is_server_error() {
        Outcome::Error
    } else {
        Outcome::Fresh
    };
    let answer = Answer {
        status: sent.status,
        headers: kept_headers(&sent.headers),
        // Same reason as the headers: the body may be a slice of a larger read buffer.
        body: if keep {
            Bytes::copy_from_slice(&sent.body)
        } else {
            sent.body
        },
        key,
        outcome,
        attempts: sent.attempts,
        upstream_status,
        owner,
    };
    Settled {
        answer: Arc::new(answer),
        keep,
    }
}

fn attempts_of(err: &ProxyError) -> u32 {
    match err {
        ProxyError::UpstreamUnreachable { attempts, .. } => *attempts,
        _ => 0,
    }
}

/// Copies, not clones: a parsed header value is a slice of the connection's whole
/// read buffer, and a kept answer must not pin that buffer for the dedup window.
fn kept_headers(from: &HeaderMap) -> KeptHeaders {
    KEPT_HEADERS
        .iter()
        .filter_map(|name| {
            let value = from.get(name)?;
            let owned = HeaderValue::from_bytes(value.as_bytes()).ok()?;
            Some((name.clone(), owned))
        })
        .collect()
}

/// Push's success carries the accepted request's `sentMessages`, which LINE repeats
/// in the 409; the other endpoints answer `{}`.
pub fn success_body(endpoint: Endpoint, conflict_body: &[u8]) -> Bytes {
    if endpoint != Endpoint::Push {
        return Bytes::from_static(b"{}");
    }
    let sent_messages = serde_json::from_slice::<serde_json::Value>(conflict_body)
        .ok()
        .and_then(|mut v| v.get_mut("sentMessages").map(serde_json::Value::take))
        .unwrap_or_else(|| serde_json::Value::Array(Vec::new()));
    Bytes::from(serde_json::json!({ "sentMessages": sent_messages }).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::AttemptFailure;

    fn conflict(body: &'static str) -> Sent {
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, "new-id".parse().unwrap());
        headers.insert(ACCEPTED_REQUEST_ID, "first-id".parse().unwrap());
        Sent {
            status: StatusCode::CONFLICT,
            headers,
            body: Bytes::from_static(body.as_bytes()),
            attempts: 2,
        }
    }

    const OWNER: TokenTag = TokenTag([3; 16]);

    fn derived() -> RetryKey {
        RetryKey::Derived(uuid::Uuid::nil())
    }

    #[test]
    fn conflict_on_derived_push_becomes_success_with_sent_messages() {
        let s = settle(
            Endpoint::Push,
            derived(),
            OWNER,
            Ok(conflict(
                r#"{"message":"The retry key is already accepted","sentMessages":[{"id":"1","quoteToken":"q"}]}"#,
            )),
        );
        assert!(s.keep);
        assert_eq!(s.answer.status, StatusCode::OK);
        assert_eq!(s.answer.outcome, Outcome::ConflictResolved);
        assert_eq!(s.answer.owner, Some(OWNER));
        assert!(s
            .answer
            .headers
            .contains(&(REQUEST_ID, HeaderValue::from_static("first-id"))));
        let body: serde_json::Value = serde_json::from_slice(&s.answer.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"sentMessages":[{"id":"1","quoteToken":"q"}]})
        );
    }

    #[test]
    fn conflict_on_narrowcast_becomes_202() {
        let s = settle(
            Endpoint::Narrowcast,
            derived(),
            OWNER,
            Ok(conflict(r#"{"message":"x"}"#)),
        );
        assert_eq!(s.answer.status, StatusCode::ACCEPTED);
        assert_eq!(s.answer.body, "{}");
    }

    #[test]
    fn conflict_on_a_client_key_is_left_alone() {
        let key = RetryKey::Client(HeaderValue::from_static(
            "123e4567-e89b-12d3-a456-426614174000",
        ));
        let s = settle(Endpoint::Push, key, OWNER, Ok(conflict("{}")));
        assert_eq!(s.answer.status, StatusCode::CONFLICT);
        assert!(!s.keep);
    }

    #[test]
    fn only_accepted_answers_are_kept() {
        let ok = Sent {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            attempts: 1,
        };
        assert!(settle(Endpoint::Broadcast, derived(), OWNER, Ok(ok)).keep);
        let bad = Sent {
            status: StatusCode::BAD_GATEWAY,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            attempts: 3,
        };
        let s = settle(Endpoint::Broadcast, derived(), OWNER, Ok(bad));
        assert!(!s.keep);
        assert_eq!(s.answer.outcome, Outcome::Error);
        let err = ProxyError::UpstreamUnreachable {
            attempts: 4,
            last: AttemptFailure::Timeout,
        };
        let s = settle(Endpoint::Broadcast, derived(), OWNER, Err(err));
        assert!(!s.keep);
        assert_eq!(s.answer.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(s.answer.attempts, 4);
    }
}
