//! How long a connection may hold a place while doing nothing.
//!
//! Idleness is counted in requests, not bytes: a connection is idle while it has no
//! request in flight, whatever else crosses it (HTTP/2 PINGs, SETTINGS, a byte of a
//! head that never ends). Before its first request a connection gets `header-timeout`,
//! counted from accept; between requests, `idle-timeout`. A request is in flight from
//! the moment hyper hands it over until its answer's body has been sent or dropped.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Limits;
use crate::body::{BoxError, ProxyBody};
use crate::metrics::{Limit, Metrics};

/// One connection's requests in flight.
#[derive(Debug, Clone, Default)]
pub(crate) struct Activity(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    busy: AtomicUsize,
    /// Every start and end of a request: restarts the idle clock.
    changed: Notify,
}

/// A request in flight; dropping it ends the request.
#[derive(Debug)]
pub(crate) struct Busy(Arc<Inner>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

impl Activity {
    pub(crate) fn begin(&self) -> Busy {
        self.0.busy.fetch_add(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
        Busy(self.0.clone())
    }

    /// Resolves once the connection has had no request in flight for `first` before
    /// its first request, or for `idle` since its last one ended; says which.
    pub(crate) async fn idle_for(&self, first: Duration, idle: Duration) -> Limit {
        let mut limit = first;
        let mut which = Limit::HeaderTimeout;
        loop {
            let changed = self.0.changed.notified();
            tokio::pin!(changed);
            // Registered before the count is read: a change in between still wakes us.
            changed.as_mut().enable();
            if self.0.busy.load(Ordering::Acquire) == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(limit) => {
                        if self.0.busy.load(Ordering::Acquire) == 0 {
                            return which;
                        }
                    }
                    _ = changed.as_mut() => {}
                }
            } else {
                changed.await;
            }
            limit = idle;
            which = Limit::IdleTimeout;
        }
    }
}

/// After an idle connection is asked to close, how long it gets to say goodbye
/// (HTTP/2 GOAWAY) before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// A served connection, boxed: generic over hyper's connection types, the compiler
/// loses the body error's lifetime in the `Send` check of the recursive tunnel future.
pub(crate) type Conn<'a, E> =
    Pin<Box<dyn GracefulConnection<Error = E, Output = Result<(), E>> + Send + 'a>>;

/// Runs a connection until it ends, until it is idle past its limits, or until shutdown
/// (then it finishes the requests it has).
pub(crate) async fn drive<E: Into<BoxError>>(
    mut conn: Conn<'_, E>,
    activity: &Activity,
    limits: &Limits,
    shutdown: &CancellationToken,
    metrics: &Metrics,
) {
    let idle = activity.idle_for(limits.header_timeout, limits.idle_timeout);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
        limit = idle => {
            metrics.limit_hit(limit);
            tracing::debug!(limit = limit.label(), "closing an idle connection");
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await {
                Ok(result) => result,
                Err(_) => return,
            }
        }
    };
    if let Err(err) = result {
        let err: BoxError = err.into();
        // hyper's own header timer: a head begun but not finished in time.
        if err
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
        {
            metrics.limit_hit(Limit::HeaderTimeout);
        }
        // Clients vanish mid-request all the time; not worth more than debug.
        tracing::debug!(error = %err, "connection ended with an error");
    }
}

/// An answer body that keeps its request in flight until it has been sent or dropped.
pub(crate) fn hold(body: ProxyBody, busy: Busy) -> ProxyBody {
    http_body_util::BodyExt::boxed_unsync(Held { body, _busy: busy })
}

struct Held {
    body: ProxyBody,
    _busy: Busy,
}

impl Body for Held {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
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

    #[tokio::test(start_paused = true)]
    async fn first_limit_then_idle_limit_and_never_while_busy() {
        let activity = Activity::default();
        let started = tokio::time::Instant::now();
        let limit = activity
            .idle_for(Duration::from_secs(2), Duration::from_secs(60))
            .await;
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(limit, Limit::HeaderTimeout);

        let busy = activity.begin();
        let watch = activity.clone();
        let waiting = tokio::spawn(async move {
            let limit = watch
                .idle_for(Duration::from_secs(2), Duration::from_secs(5))
                .await;
            assert_eq!(limit, Limit::IdleTimeout);
            tokio::time::Instant::now()
        });
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(
            !waiting.is_finished(),
            "never idle while a request is in flight"
        );
        drop(busy);
        let ended = tokio::time::Instant::now();
        let idle_at = waiting.await.unwrap();
        assert_eq!(idle_at - ended, Duration::from_secs(5));
    }
}
