//! The embedded store: one moka cache holding both in-flight claims and finished
//! answers, bounded by bytes, each entry expiring after its own time to live.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::ops::compute::Op;
use moka::sync::Cache;
use tokio::sync::watch;

use super::{Answer, BoxFuture, Claim, Store, StoreError, StoreStats, Ticket};
use crate::pipeline::fingerprint::{BuildFingerprintHasher, Fingerprint};

#[derive(Clone)]
enum Slot {
    InFlight {
        /// Tells this owner's claim from a later one on the same fingerprint.
        owner: u64,
        answer: watch::Receiver<Option<Arc<Answer>>>,
        lease: Duration,
    },
    Done {
        answer: Arc<Answer>,
        keep_for: Duration,
    },
}

impl Slot {
    fn ttl(&self) -> Duration {
        match self {
            Slot::InFlight { lease, .. } => *lease,
            Slot::Done { keep_for, .. } => *keep_for,
        }
    }
}

struct PerEntryTtl;

impl moka::Expiry<Fingerprint, Slot> for PerEntryTtl {
    fn expire_after_create(&self, _: &Fingerprint, slot: &Slot, _: Instant) -> Option<Duration> {
        Some(slot.ttl())
    }

    fn expire_after_update(
        &self,
        _: &Fingerprint,
        slot: &Slot,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(slot.ttl())
    }
}

pub struct MemoryStore {
    cache: Cache<Fingerprint, Slot, BuildFingerprintHasher>,
    next_owner: AtomicU64,
}

impl MemoryStore {
    pub fn new(max_bytes: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_fp: &Fingerprint, slot: &Slot| -> u32 {
                let bytes = match slot {
                    Slot::InFlight { .. } => 128,
                    Slot::Done { answer, .. } => answer.weight() + 64,
                };
                u32::try_from(bytes).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryTtl)
            .build_with_hasher(BuildFingerprintHasher::default());
        MemoryStore {
            cache,
            next_owner: AtomicU64::new(1),
        }
    }

    fn claim_now(&self, fp: Fingerprint, lease: Duration) -> Claim {
        let owner = self.next_owner.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        // The entry API inserts atomically: exactly one caller sees `is_fresh`.
        let entry = self.cache.entry(fp).or_insert_with(|| Slot::InFlight {
            owner,
            answer: rx,
            lease,
        });
        if entry.is_fresh() {
            return Claim::Owner(Box::new(MemoryTicket {
                cache: self.cache.clone(),
                fp,
                owner,
                tx: Some(tx),
            }));
        }
        match entry.into_value() {
            Slot::Done { answer, .. } => Claim::Done(answer),
            Slot::InFlight { mut answer, .. } => Claim::InFlight(Box::pin(async move {
                // An error means the owner's sender is gone without an answer.
                answer
                    .wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|a| a.clone())
            })),
        }
    }
}

impl Store for MemoryStore {
    fn claim(&self, fp: Fingerprint, lease: Duration) -> BoxFuture<'_, Result<Claim, StoreError>> {
        let claim = self.claim_now(fp, lease);
        Box::pin(std::future::ready(Ok(claim)))
    }

    fn stats(&self) -> StoreStats {
        // moka counts lazily; settle pending work so a scrape sees what is held now.
        self.cache.run_pending_tasks();
        StoreStats {
            entries: self.cache.entry_count(),
            bytes: self.cache.weighted_size(),
        }
    }
}

struct MemoryTicket {
    cache: Cache<Fingerprint, Slot, BuildFingerprintHasher>,
    fp: Fingerprint,
    owner: u64,
    tx: Option<watch::Sender<Option<Arc<Answer>>>>,
}

impl MemoryTicket {
    /// Removes the claim if it is still this owner's (it may have lapsed and been
    /// taken by another request since).
    fn release(&self) {
        let owner = self.owner;
        self.cache.entry(self.fp).and_compute_with(|current| {
            match current.map(|e| e.into_value()) {
                Some(Slot::InFlight { owner: o, .. }) if o == owner => Op::Remove,
                _ => Op::Nop,
            }
        });
    }
}

impl Ticket for MemoryTicket {
    fn settle(
        mut self: Box<Self>,
        answer: Arc<Answer>,
        keep_for: Option<Duration>,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        // Store before publishing: whoever is woken, or arrives next, must find the answer.
        match keep_for {
            Some(keep_for) => self.cache.insert(
                self.fp,
                Slot::Done {
                    answer: answer.clone(),
                    keep_for,
                },
            ),
            None => self.release(),
        }
        if let Some(tx) = self.tx.take() {
            tx.send_replace(Some(answer));
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

impl Drop for MemoryTicket {
    fn drop(&mut self) {
        if self.tx.is_some() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::key::RetryKey;
    use crate::pipeline::respond::Outcome;
    use bytes::Bytes;
    use http::StatusCode;

    const LEASE: Duration = Duration::from_secs(60);

    fn answer(body: impl Into<Bytes>) -> Arc<Answer> {
        Arc::new(Answer {
            status: StatusCode::OK,
            headers: Box::new([]),
            body: body.into(),
            key: RetryKey::Derived(uuid::Uuid::nil()),
            outcome: Outcome::Fresh,
            attempts: 1,
            upstream_status: Some(StatusCode::OK),
        })
    }

    async fn claim(store: &MemoryStore, fp: u8) -> Claim {
        store.claim(Fingerprint([fp; 32]), LEASE).await.unwrap()
    }

    #[tokio::test]
    async fn first_claims_then_others_wait_then_replay() {
        let store = MemoryStore::new(1 << 20);
        let Claim::Owner(ticket) = claim(&store, 1).await else {
            panic!("first must own")
        };
        let Claim::InFlight(waiting) = claim(&store, 1).await else {
            panic!("second must wait")
        };
        assert!(
            matches!(claim(&store, 2).await, Claim::Owner(_)),
            "other fingerprints are independent"
        );
        ticket
            .settle(answer("first"), Some(Duration::from_secs(60)))
            .await
            .unwrap();
        assert_eq!(waiting.await.unwrap().body, "first");
        let Claim::Done(replayed) = claim(&store, 1).await else {
            panic!("must replay")
        };
        assert_eq!(replayed.body, "first");
    }

    #[tokio::test]
    async fn unstored_answer_reaches_waiters_but_is_not_replayed() {
        let store = MemoryStore::new(1 << 20);
        let Claim::Owner(ticket) = claim(&store, 1).await else {
            panic!()
        };
        let Claim::InFlight(waiting) = claim(&store, 1).await else {
            panic!()
        };
        ticket.settle(answer("502"), None).await.unwrap();
        assert_eq!(waiting.await.unwrap().body, "502");
        assert!(matches!(claim(&store, 1).await, Claim::Owner(_)));
    }

    #[tokio::test]
    async fn dropped_ticket_releases_waiters() {
        let store = MemoryStore::new(1 << 20);
        let Claim::Owner(ticket) = claim(&store, 1).await else {
            panic!()
        };
        let Claim::InFlight(waiting) = claim(&store, 1).await else {
            panic!()
        };
        drop(ticket);
        assert!(waiting.await.is_none());
        assert!(matches!(claim(&store, 1).await, Claim::Owner(_)));
    }

    #[tokio::test]
    async fn entries_expire_after_their_own_window() {
        let store = MemoryStore::new(1 << 20);
        let Claim::Owner(ticket) = claim(&store, 1).await else {
            panic!()
        };
        ticket
            .settle(answer("x"), Some(Duration::from_millis(1)))
            .await
            .unwrap();
        // moka expires on its own clock, which a test cannot advance: poll it, bounded.
        let give_up = Instant::now() + Duration::from_secs(5);
        while matches!(claim(&store, 1).await, Claim::Done(_)) {
            assert!(Instant::now() < give_up, "entry never expired");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[tokio::test]
    async fn bounded_by_bytes() {
        let store = MemoryStore::new(64 * 1024);
        for i in 0..=255u8 {
            let Claim::Owner(t) = claim(&store, i).await else {
                panic!()
            };
            t.settle(answer(vec![b'x'; 1024]), Some(LEASE))
                .await
                .unwrap();
        }
        store.cache.run_pending_tasks();
        assert!(store.stats().bytes <= 64 * 1024, "{:?}", store.stats());
        assert!(store.stats().entries < 256);
    }
}
