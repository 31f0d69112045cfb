//! Upstream work that runs in the task awaiting it, and goes on by itself if that task
//! lets it go: how a send survives the bot that asked for it without a task per request.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

use crate::body::BoxFuture;

/// Work that runs in the task awaiting it, and, should that task drop it unfinished
/// (the bot hung up), goes on in a tracked task of its own. Until then its tracker
/// token counts it as a task, so shutdown waits for it either way. A panic in it is
/// caught and answered, as a task of its own would have: it must not take down the
/// bot's connection and every other request on it.
pub(super) struct Detachable<T: Send + 'static> {
    work: Option<BoxFuture<'static, T>>,
    tasks: TaskTracker,
    _counted: TaskTrackerToken,
}

impl<T: Send + 'static> Detachable<T> {
    pub(super) fn new(work: BoxFuture<'static, T>, tasks: &TaskTracker) -> Self {
        Detachable {
            work: Some(work),
            tasks: tasks.clone(),
            _counted: tasks.token(),
        }
    }
}

/// The work panicked.
pub(super) struct Panicked;

impl<T: Send + 'static> Future for Detachable<T> {
    type Output = Result<T, Panicked>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(work) = self.work.as_mut() else {
            // Polled again after it finished: nothing more will come.
            return Poll::Pending;
        };
        // Unwind safety: after a panic the work is dropped, never polled again.
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| work.as_mut().poll(cx)));
        let done = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(done)) => Ok(done),
            Err(_) => Err(Panicked),
        };
        self.work = None;
        Poll::Ready(done)
    }
}

impl<T: Send + 'static> Drop for Detachable<T> {
    fn drop(&mut self) {
        let Some(work) = self.work.take() else {
            return;
        };
        // Dropped outside a runtime only when the runtime itself is going away, and
        // the work with it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.tasks.spawn_on(
                async move {
                    let _ = work.await;
                },
                &runtime,
            );
        }
    }
}
