//! A shard's claims of requests in flight: never evicted while their owner lives, so
//! coalescing holds however full the store is. Identical requests wait on the owner's
//! claim and are handed its answer when it ends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::body::BoxFuture;
use crate::domain::{Answer, BuildFingerprintHasher, Fingerprint};

/// Resolves to the owner's answer, or `None` if its claim ended without one.
pub(super) type Wait = BoxFuture<'static, Option<Arc<Answer>>>;

struct InFlight {
    /// Tells this owner's claim from a later one on the same fingerprint.
    owner: u64,
    /// Made when the first identical request comes to wait: most sends have none.
    waiters: Option<watch::Sender<Option<Arc<Answer>>>>,
    lapses: Instant,
}

#[derive(Default)]
pub(super) struct Claims(HashMap<Fingerprint, InFlight, BuildFingerprintHasher>);

impl Claims {
    /// A wait on the owner at work on `fp`; `None` if there is none, or its lease has
    /// lapsed.
    pub(super) fn wait(&mut self, fp: &Fingerprint) -> Option<Wait> {
        let in_flight = self.0.get_mut(fp)?;
        if in_flight.lapses <= Instant::now() {
            return None;
        }
        let mut answer = in_flight
            .waiters
            .get_or_insert_with(|| watch::channel(None).0)
            .subscribe();
        Some(Box::pin(async move {
            // An error means the claim went without an answer.
            answer
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|a| a.clone())
        }))
    }

    /// Gives the claim on `fp` to `owner` for `lease`. Replaces a lapsed claim, if
    /// there was one: its waiters claim again.
    pub(super) fn take(&mut self, fp: Fingerprint, owner: u64, lease: Duration) {
        let in_flight = InFlight {
            owner,
            waiters: None,
            lapses: Instant::now() + lease,
        };
        self.0.insert(fp, in_flight);
    }

    /// Ends the claim on `fp`, if it is still `owner`'s (it may have lapsed and been
    /// taken by another request since), and hands `answer` to its waiters; without an
    /// answer, the waiters are told to claim again.
    pub(super) fn end(&mut self, fp: &Fingerprint, owner: u64, answer: Option<Arc<Answer>>) {
        if self.0.get(fp).is_none_or(|c| c.owner != owner) {
            return;
        }
        let ended = self.0.remove(fp);
        if let (Some(waiters), Some(answer)) = (ended.and_then(|c| c.waiters), answer) {
            waiters.send_replace(Some(answer));
        }
    }

    /// How many claims are held.
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use crate::domain::RetryKey;
    use crate::store::memory::testing::{answer, claim, numbered, owner, request, DAY};
    use crate::store::memory::MemoryStore;
    use crate::store::{Claim, Store};
    use http::StatusCode;

    use super::*;

    #[tokio::test]
    async fn first_claims_then_others_wait_then_replay() {
        let store = MemoryStore::new(1 << 20);
        let (ticket, _) = owner(claim(&store, 1).await);
        let Claim::InFlight(waiting) = claim(&store, 1).await else {
            panic!("second must wait")
        };
        let Claim::InFlight(also_waiting) = claim(&store, 1).await else {
            panic!("third must wait")
        };
        owner(claim(&store, 2).await);
        ticket.publish(answer("first"), true).await.unwrap();
        assert_eq!(waiting.await.unwrap().body, "first");
        assert_eq!(also_waiting.await.unwrap().body, "first");
        let Claim::Done(replayed) = claim(&store, 1).await else {
            panic!("must replay")
        };
        assert_eq!(replayed.body, "first");
        assert_eq!(replayed.status, StatusCode::OK);
        assert_eq!(replayed.key, RetryKey::Derived(uuid::Uuid::nil()));
    }

    #[tokio::test]
    async fn unstored_answer_reaches_waiters_but_is_not_replayed() {
        let store = MemoryStore::new(1 << 20);
        let (ticket, _) = owner(claim(&store, 1).await);
        let Claim::InFlight(waiting) = claim(&store, 1).await else {
            panic!()
        };
        ticket.publish(answer("502"), false).await.unwrap();
        assert_eq!(waiting.await.unwrap().body, "502");
        owner(claim(&store, 1).await);
    }

    #[tokio::test]
    async fn dropped_ticket_releases_waiters() {
        let store = MemoryStore::new(1 << 20);
        let (ticket, _) = owner(claim(&store, 1).await);
        let Claim::InFlight(waiting) = claim(&store, 1).await else {
            panic!()
        };
        drop(ticket);
        assert!(waiting.await.is_none());
        owner(claim(&store, 1).await);
    }

    #[tokio::test]
    async fn a_lapsed_claim_is_taken_over_and_the_old_owner_cannot_release_it() {
        let store = MemoryStore::new(1 << 20);
        let mut short = request(1, DAY, SystemTime::now());
        short.lease = Duration::ZERO;
        let (stale, _) = owner(store.claim(short).await.unwrap());
        let (fresh, _) = owner(claim(&store, 1).await);
        drop(stale);
        assert!(
            matches!(claim(&store, 1).await, Claim::InFlight(_)),
            "the new owner's claim survives the old owner's release"
        );
        drop(fresh);
    }

    #[tokio::test]
    async fn a_lapsed_owner_publishing_late_keeps_its_answer_but_not_the_claim() {
        let store = MemoryStore::new(1 << 20);
        let mut short = request(1, DAY, SystemTime::now());
        short.lease = Duration::ZERO;
        let (stale, _) = owner(store.claim(short).await.unwrap());
        let (fresh, _) = owner(claim(&store, 1).await);
        let Claim::InFlight(waiting) = claim(&store, 1).await else {
            panic!("waits on the new owner")
        };
        stale.publish(answer("late"), true).await.unwrap();
        assert!(matches!(claim(&store, 1).await, Claim::InFlight(_)));
        fresh.publish(answer("new"), true).await.unwrap();
        assert_eq!(waiting.await.unwrap().body, "new");
    }

    #[tokio::test]
    async fn claims_survive_a_full_store() {
        let store = MemoryStore::new(1 << 20);
        let (ticket, _) = owner(claim(&store, 0).await);
        // Churn far more answers than the bound holds, some in the claim's shard.
        for i in 0..4096u32 {
            let (t, _) = owner(
                store
                    .claim(numbered(i + 1, SystemTime::now()))
                    .await
                    .unwrap(),
            );
            t.publish(answer(vec![b'x'; 1024]), true).await.unwrap();
        }
        assert!(
            matches!(claim(&store, 0).await, Claim::InFlight(_)),
            "an owner's claim is never evicted"
        );
        drop(ticket);
    }
}
