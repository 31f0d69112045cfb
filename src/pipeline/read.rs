//! Phase 2, read: buffer a keyed request's body, up to the limit, in bounded time, and
//! within the proxy-wide budget of buffered bytes.
//!
//! Keyed bodies are small JSON (LINE refuses over 2 MB), and the body must be hashed
//! and resent on every retry, so it is read once into one `Bytes` and never copied.
//! What it costs is held as a [`Charge`] against `buffer-limit` for as long as the body
//! lives: through the upstream work too, which goes on after a bot hangs up. So the
//! bytes held for clients, present or gone, have one bound.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout, timeout_at, Instant};

use crate::error::ProxyError;
use crate::metrics::{Limit, Metrics};

/// Each buffered request counts at least this much: its task, headers and answer cost
/// memory too, so many tiny requests cannot slip past the budget.
pub(crate) const MIN_CHARGE: usize = 16 * 1024;
/// How long a keyed request waits for room under `buffer-limit` before its 503.
pub(crate) const BUFFER_WAIT: Duration = Duration::from_secs(1);

/// How request bodies are taken in: size, time, and the proxy-wide byte budget.
pub struct Intake {
    /// The largest keyed body buffered (`body-limit`).
    pub(crate) body_limit: usize,
    /// A keyed body must arrive whole within it; a streamed one may not pause longer.
    pub(crate) body_timeout: Duration,
    /// A streamed answer from the upstream may not pause longer than this.
    pub(crate) stream_idle: Duration,
    /// One permit per byte of `buffer-limit`.
    buffer: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

/// Bytes of `buffer-limit` held by one request; given back on drop.
pub(crate) struct Charge {
    permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.metrics.buffered(-(self.permit.num_permits() as i64));
    }
}

impl Intake {
    pub fn new(
        body_limit: usize,
        body_timeout: Duration,
        stream_idle: Duration,
        buffer_limit: u64,
        metrics: Arc<Metrics>,
    ) -> Self {
        let permits = usize::try_from(buffer_limit)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Intake {
            body_limit,
            body_timeout,
            stream_idle,
            buffer: Arc::new(Semaphore::new(permits)),
            metrics,
        }
    }

    /// `bytes` more of the budget, waiting at most [`BUFFER_WAIT`] for them.
    async fn charge(&self, held: Option<Charge>, bytes: usize) -> Result<Charge, ProxyError> {
        let Ok(n) = u32::try_from(bytes) else {
            return Err(ProxyError::BodyTooLarge {
                limit: self.body_limit,
            });
        };
        let acquired = timeout(BUFFER_WAIT, self.buffer.clone().acquire_many_owned(n)).await;
        let Ok(Ok(permit)) = acquired else {
            self.metrics.limit_hit(Limit::BufferBytes);
            return Err(ProxyError::Overloaded);
        };
        self.metrics.buffered(bytes as i64);
        Ok(match held {
            Some(mut held) => {
                held.permit.merge(permit);
                held
            }
            None => Charge {
                permit,
                metrics: self.metrics.clone(),
            },
        })
    }
}

/// The whole body, and the share of the budget it holds.
pub(crate) async fn body<B>(
    body: B,
    headers: &HeaderMap,
    intake: &Intake,
) -> Result<(Bytes, Charge), ProxyError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limit = intake.body_limit;
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Refuse before reading a byte: a client announcing 1 GB should not make us wait for it.
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let deadline = Instant::now() + intake.body_timeout;
    // What the client announced is reserved at once; a body of unknown length grows its
    // share as it arrives.
    let mut charged = declared.map_or(0, |n| n as usize).max(MIN_CHARGE);
    let mut charge = intake.charge(None, charged).await?;
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut received = 0usize;
    tokio::pin!(body);
    loop {
        let frame = match timeout_at(deadline, body.frame()).await {
            Err(_) => {
                intake.metrics.limit_hit(Limit::BodyTimeout);
                return Err(ProxyError::BodyTimeout);
            }
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(ProxyError::ClientBody),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        received += data.len();
        if received > limit {
            return Err(ProxyError::BodyTooLarge { limit });
        }
        if received > charged {
            charge = intake.charge(Some(charge), received - charged).await?;
            charged = received;
        }
        chunks.push(data);
    }
    let bytes = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut joined = BytesMut::with_capacity(received);
            for chunk in chunks {
                joined.extend_from_slice(&chunk);
            }
            joined.freeze()
        }
    };
    Ok((bytes, charge))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    fn intake(limit: usize, buffer: u64) -> Intake {
        Intake::new(
            limit,
            Duration::from_secs(1),
            Duration::from_secs(1),
            buffer,
            Arc::new(Metrics::default()),
        )
    }

    #[tokio::test]
    async fn reads_within_the_limit_and_refuses_beyond() {
        let intake = intake(5, 1 << 20);
        let (ok, _) = body(
            Full::new(Bytes::from_static(b"hello")),
            &HeaderMap::new(),
            &intake,
        )
        .await
        .unwrap();
        assert_eq!(ok, "hello");
        let err = body(
            Full::new(Bytes::from_static(b"hello!")),
            &HeaderMap::new(),
            &intake,
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(err, ProxyError::BodyTooLarge { limit: 5 }));
        let mut declared = HeaderMap::new();
        declared.insert(http::header::CONTENT_LENGTH, "99".parse().unwrap());
        let err = body(Full::new(Bytes::new()), &declared, &intake)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, ProxyError::BodyTooLarge { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_times_out_and_gives_its_bytes_back() {
        let intake = intake(1 << 20, 1 << 20);
        let err = body(Stalled(false), &HeaderMap::new(), &intake)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, ProxyError::BodyTimeout));
        assert_eq!(intake.buffer.available_permits(), 1 << 20);
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_budget_a_request_waits_briefly_then_is_overloaded() {
        let intake = intake(64 * 1024, 64 * 1024);
        let held = body(
            Full::new(Bytes::from(vec![0u8; 40_000])),
            &HeaderMap::new(),
            &intake,
        )
        .await
        .unwrap();
        let started = Instant::now();
        let err = body(
            Full::new(Bytes::from(vec![0u8; 40_000])),
            &HeaderMap::new(),
            &intake,
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(err, ProxyError::Overloaded));
        assert_eq!(started.elapsed(), BUFFER_WAIT);
        drop(held);
        body(
            Full::new(Bytes::from(vec![0u8; 40_000])),
            &HeaderMap::new(),
            &intake,
        )
        .await
        .unwrap();
    }

    /// One byte, then nothing, ever.
    struct Stalled(bool);

    impl hyper::body::Body for Stalled {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
            if std::mem::replace(&mut self.0, true) {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(b"{")))))
            }
        }
    }
}
