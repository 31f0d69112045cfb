//! The requests of this process waiting on a send in flight, by fingerprint. The one
//! pub/sub connection of the process hands each published answer to the waiters of its
//! fingerprint, whichever replica sent it; an owner in this process hands its answer
//! over directly too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use crate::domain::{Answer, BuildFingerprintHasher, Fingerprint};

/// What a waiter is woken with: the answer, or `None` to look again (the owner let
/// go, or messages may have been missed).
type Slot = watch::Sender<Option<Arc<Answer>>>;

#[derive(Default)]
pub(super) struct Waiters {
    slots: Mutex<HashMap<Fingerprint, (Slot, usize), BuildFingerprintHasher>>,
}

impl Waiters {
    /// Registers a waiter on `fp`; it is woken by everything delivered from now on.
    pub(super) fn register(self: &Arc<Self>, fp: Fingerprint) -> Waiter {
        let mut slots = self.lock();
        let (slot, count) = slots
            .entry(fp)
            .or_insert_with(|| (watch::Sender::new(None), 0));
        *count += 1;
        Waiter {
            answer: slot.subscribe(),
            waiters: self.clone(),
            fp,
        }
    }

    pub(super) fn deliver(&self, fp: &Fingerprint, answer: Option<Arc<Answer>>) {
        self.deliver_with(fp, || answer);
    }

    /// Delivers what `answer` makes, made only if someone here waits on `fp`: every
    /// replica hears every publish, and most are of no concern to it.
    pub(super) fn deliver_with(
        &self,
        fp: &Fingerprint,
        answer: impl FnOnce() -> Option<Arc<Answer>>,
    ) {
        if let Some((slot, _)) = self.lock().get(fp) {
            match answer() {
                Some(answer) => {
                    slot.send_replace(Some(answer));
                }
                None => slot.send_modify(|_| {}),
            }
        }
    }

    /// Every waiter looks again: used when pub/sub (re)connects, since messages sent
    /// while it was away are lost.
    pub(super) fn wake_all(&self) {
        for (slot, _) in self.lock().values() {
            slot.send_modify(|_| {});
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Fingerprint, (Slot, usize), BuildFingerprintHasher>> {
        crate::sync::lock(&self.slots)
    }
}

/// One registered waiter; dropping it unregisters.
pub(super) struct Waiter {
    answer: watch::Receiver<Option<Arc<Answer>>>,
    waiters: Arc<Waiters>,
    fp: Fingerprint,
}

impl Waiter {
    /// Resolves when something is delivered: `Some` with the answer, `None` to look again.
    pub(super) async fn woken(&mut self) -> Option<Arc<Answer>> {
        // The sender lives in the map as long as this waiter does.
        let _ = self.answer.changed().await;
        self.answer.borrow_and_update().clone()
    }
}

impl Waiter {
    /// An answer already delivered, without waiting.
    pub(super) fn delivered(&self) -> Option<Arc<Answer>> {
        self.answer.borrow().clone()
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut slots = self.waiters.lock();
        if let Some((_, count)) = slots.get_mut(&self.fp) {
            *count -= 1;
            if *count == 0 {
                slots.remove(&self.fp);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn answer() -> Arc<Answer> {
        Arc::new(Answer {
            status: http::StatusCode::OK,
            headers: Box::new([]),
            body: bytes::Bytes::from_static(b"{}"),
            key: crate::domain::RetryKey::Derived(uuid::Uuid::nil()),
            outcome: crate::domain::Outcome::Fresh,
            attempts: 1,
            upstream_status: None,
            owner: None,
        })
    }

    #[tokio::test]
    async fn delivers_to_the_waiters_of_one_fingerprint_and_forgets_them() {
        let waiters = Arc::new(Waiters::default());
        let fp = Fingerprint([1; 32]);
        let mut a = waiters.register(fp);
        let mut b = waiters.register(fp);
        let mut other = waiters.register(Fingerprint([2; 32]));
        waiters.deliver(&fp, Some(answer()));
        let bounded = Duration::from_secs(5);
        assert!(tokio::time::timeout(bounded, a.woken())
            .await
            .unwrap()
            .is_some());
        assert!(tokio::time::timeout(bounded, b.woken())
            .await
            .unwrap()
            .is_some());
        assert!(
            tokio::time::timeout(Duration::from_millis(20), other.woken())
                .await
                .is_err(),
            "another fingerprint's waiter sleeps on"
        );
        waiters.wake_all();
        assert!(tokio::time::timeout(bounded, other.woken())
            .await
            .unwrap()
            .is_none());
        drop((a, b, other));
        assert!(waiters.lock().is_empty());
    }
}
