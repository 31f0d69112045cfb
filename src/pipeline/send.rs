//! Phase 6, send: forward with the key, retry what may be retried, under one deadline.
//!
//! Retried, always with the same key: connect errors, resets, per-attempt timeouts,
//! 5xx (LINE may have accepted the message: the key makes that safe), and the
//! temporary 429 when configured. Never 4xx otherwise, never the monthly-limit 429.
//! Each retry waits a full-jitter backoff, or `Retry-After` when LINE gives one, and
//! must fit the overall deadline and the proxy-wide retry budget.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::BodyExt;
use tokio::time::{timeout, Instant};

use crate::body::{full, ProxyBody};
use crate::config::RetryPolicy;
use crate::domain::{AttemptFailure, ChannelId, Endpoint, RetryKey};
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::retry::{ExponentialBackoff, RetryBudget};
use crate::upstream::Upstream;

/// LINE's answers on these endpoints are small JSON; more is a broken upstream.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;
/// A retry is started only if at least this much of an attempt (or the whole attempt
/// timeout, if shorter) fits before the deadline: an attempt cut off at once may
/// still be accepted by LINE, and only adds an unknown outcome.
pub(super) const MIN_ATTEMPT_TIME: Duration = Duration::from_millis(200);

/// The request as it goes upstream, reusable across attempts without copying the body.
pub(crate) struct Outbound {
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

/// LINE's answer to the last attempt.
#[derive(Debug)]
pub(crate) struct Sent {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) attempts: u32,
}

pub(crate) struct Sender<'a> {
    pub(crate) upstream: &'a dyn Upstream,
    pub(crate) policy: &'a RetryPolicy,
    /// The endpoint's own switch: false sends once.
    pub(crate) retry: bool,
    pub(crate) budget: &'a RetryBudget,
    pub(crate) metrics: &'a Metrics,
    pub(crate) endpoint: Endpoint,
    /// Named by the lines logged when the proxy gives up, so they say which send.
    pub(crate) key: &'a RetryKey,
    /// The channel the send was keyed under, when LINE vouched for one: named there too.
    pub(crate) channel: Option<&'a ChannelId>,
}

impl Sender<'_> {
    /// Sends until LINE gives an answer that may be kept or returned. An exhausted
    /// series of 5xx returns LINE's last 5xx; exhausted transport failures are errors.
    pub(crate) async fn send(&self, out: &Outbound) -> Result<Sent, ProxyError> {
        let started = Instant::now();
        let deadline = started + self.policy.deadline;
        let backoff = self.policy.backoff;
        let mut rng = fastrand::Rng::new();
        self.budget.deposit();

        let mut attempt = 0;
        loop {
            attempt += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let attempt_started = Instant::now();
            let result = match timeout(
                self.policy.attempt_timeout.min(remaining),
                self.attempt(out),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => Err(AttemptFailure::Timeout),
            };
            self.metrics
                .attempt(Some(self.endpoint), attempt_started.elapsed());

            let (failure, answer) = match result {
                Ok(sent) => match self.verdict(&sent) {
                    None => {
                        return Ok(Sent {
                            attempts: attempt,
                            ..sent
                        })
                    }
                    Some(failure) => (failure, Some(sent)),
                },
                Err(failure) => (failure, None),
            };

            let wait = self.next_wait(attempt, failure, answer.as_ref(), &backoff, &mut rng);
            let least = MIN_ATTEMPT_TIME.min(self.policy.attempt_timeout);
            // Checked: a wait comes from LINE's Retry-After, which may be any number.
            let fits = wait.is_some_and(|w| {
                w.checked_add(least)
                    .and_then(|w| Instant::now().checked_add(w))
                    .is_some_and(|start| start <= deadline)
            });
            if !fits {
                tracing::warn!(
                    endpoint = self.endpoint.name(),
                    key = %self.key,
                    channel = self.channel.map(ChannelId::as_str),
                    attempts = attempt,
                    reason = failure.label(),
                    "giving up on the upstream (RUST_LOG=line_retry_proxy=debug shows each attempt's cause)"
                );
                return exhausted(answer, attempt, failure);
            }
            if !self.budget.try_withdraw() {
                self.metrics.retry_budget_exhausted();
                tracing::warn!(
                    endpoint = self.endpoint.name(),
                    key = %self.key,
                    channel = self.channel.map(ChannelId::as_str),
                    attempt,
                    reason = failure.label(),
                    "retry budget exhausted, not retrying"
                );
                return exhausted(answer, attempt, failure);
            }
            self.metrics.retry(failure);
            tracing::debug!(
                attempt,
                reason = failure.label(),
                "retrying with the same key"
            );
            tokio::time::sleep(wait.unwrap_or_default()).await;
        }
    }

    async fn attempt(&self, out: &Outbound) -> Result<Sent, AttemptFailure> {
        let mut req = Request::new(full(out.body.clone()));
        *req.method_mut() = out.method.clone();
        *req.uri_mut() = out.uri.clone();
        *req.headers_mut() = out.headers.clone();
        let (parts, body) = self.upstream.request(req).await?.into_parts();
        let body = read_answer(body).await?;
        Ok(Sent {
            status: parts.status,
            headers: parts.headers,
            body,
            attempts: 0,
        })
    }

    /// `None`: an answer to give the bot. `Some`: a failure that a retry may fix.
    fn verdict(&self, sent: &Sent) -> Option<AttemptFailure> {
        if sent.status.is_server_error() {
            return Some(AttemptFailure::ServerError);
        }
        if sent.status == StatusCode::TOO_MANY_REQUESTS
            && self.policy.retry_on_429
            && !is_monthly_limit(&sent.body)
        {
            return Some(AttemptFailure::RateLimited);
        }
        None
    }

    /// How long to wait before the next attempt, or `None` if there must be none.
    fn next_wait(
        &self,
        attempt: u32,
        failure: AttemptFailure,
        answer: Option<&Sent>,
        backoff: &ExponentialBackoff,
        rng: &mut fastrand::Rng,
    ) -> Option<Duration> {
        if !self.retry || attempt >= self.policy.max_attempts {
            return None;
        }
        let jittered = backoff.delay(attempt, rng);
        if failure == AttemptFailure::RateLimited {
            let asked = answer
                .and_then(|a| retry_after(&a.headers))
                .unwrap_or_default();
            return Some(jittered.max(asked));
        }
        Some(jittered)
    }
}

/// LINE's whole answer body, up to [`MAX_ANSWER_BYTES`]. A body that breaks off (or
/// never ends within bounds) is a failed attempt: LINE may have accepted the request.
pub(super) async fn read_answer(mut body: ProxyBody) -> Result<Bytes, AttemptFailure> {
    // The usual answer is one small frame: kept as it is, without a copy.
    let mut first = Bytes::new();
    let mut more = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| AttemptFailure::Reset)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if first.len() + more.len() + data.len() > MAX_ANSWER_BYTES {
            return Err(AttemptFailure::Reset);
        }
        if first.is_empty() && more.is_empty() {
            first = data;
        } else {
            if more.is_empty() {
                more.extend_from_slice(&first);
            }
            more.extend_from_slice(&data);
        }
    }
    Ok(if more.is_empty() {
        first
    } else {
        more.freeze()
    })
}

/// No more attempts: LINE's last answer if there was one, else the transport failure.
fn exhausted(
    answer: Option<Sent>,
    attempts: u32,
    last: AttemptFailure,
) -> Result<Sent, ProxyError> {
    match answer {
        Some(sent) => Ok(Sent { attempts, ..sent }),
        None => Err(ProxyError::UpstreamUnreachable { attempts, last }),
    }
}

fn is_monthly_limit(body: &[u8]) -> bool {
    // The only documented way to tell the two 429s apart is the message text.
    body.windows(b"monthly limit".len())
        .any(|w| w.eq_ignore_ascii_case(b"monthly limit"))
}

pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monthly_limit_is_told_apart() {
        assert!(is_monthly_limit(
            br#"{"message":"You have reached your monthly limit."}"#
        ));
        assert!(!is_monthly_limit(
            br#"{"message":"The API rate limit has been exceeded. Try again later."}"#
        ));
    }

    #[test]
    fn retry_after_in_seconds() {
        let mut h = HeaderMap::new();
        h.insert(http::header::RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(
            http::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
        h.insert(
            http::header::RETRY_AFTER,
            "18446744073709551615".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::from_secs(u64::MAX)));
    }
}
