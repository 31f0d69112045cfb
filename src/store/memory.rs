//! The embedded store, for one process (a sidecar):
//! - claims of requests in flight, in a sharded map of their own: never evicted while
//!   their owner lives, so coalescing holds however full the store is;
//! - settled answers, in a moka cache bounded by bytes, each expiring when the window
//!   has passed since its send was first seen;
//! - first sightings for short windows, in a second small moka cache, kept for the
//!   whole window whatever became of the send.
//!
//! Nothing here survives a restart: after one, a resend is sent again under the same
//! derived key (24 h window) and LINE's 409 is turned into the original success.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use moka::sync::Cache;
use tokio::sync::watch;

use super::{Claim, ClaimRequest, Store, StoreError, Ticket};
use crate::body::BoxFuture;
use crate::domain::{Answer, BuildFingerprintHasher, Fingerprint, StoreStats, LINE_KEY_LIFETIME};

/// Claims are spread over this many locks, so identical sends meet and different
/// ones rarely do.
const SHARDS: usize = 64;
/// Bookkeeping per kept answer beyond what it weighs itself (moka's entry, the Arc).
const ENTRY_OVERHEAD: usize = 64;
/// What one sighting weighs: key, time, moka's entry.
const SIGHTING_WEIGHT: u32 = 96;

#[derive(Clone)]
struct Kept {
    answer: Arc<Answer>,
    first_seen: SystemTime,
    /// Until the window has passed since the first sighting, counted from the insert.
    ttl: Duration,
}

#[derive(Clone, Copy)]
struct Sighting {
    first_seen: SystemTime,
    ttl: Duration,
}

struct InFlight {
    /// Tells this owner's claim from a later one on the same fingerprint.
    owner: u64,
    answer: watch::Receiver<Option<Arc<Answer>>>,
    lapses: Instant,
}

type Shard = Mutex<HashMap<Fingerprint, InFlight, BuildFingerprintHasher>>;

struct PerEntryTtl;

impl moka::Expiry<Fingerprint, Kept> for PerEntryTtl {
    fn expire_after_create(&self, _: &Fingerprint, kept: &Kept, _: Instant) -> Option<Duration> {
        Some(kept.ttl)
    }

    fn expire_after_update(
        &self,
        _: &Fingerprint,
        kept: &Kept,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(kept.ttl)
    }
}

impl moka::Expiry<Fingerprint, Sighting> for PerEntryTtl {
    fn expire_after_create(&self, _: &Fingerprint, s: &Sighting, _: Instant) -> Option<Duration> {
        Some(s.ttl)
    }
}

pub struct MemoryStore {
    answers: Cache<Fingerprint, Kept, BuildFingerprintHasher>,
    sightings: Cache<Fingerprint, Sighting, BuildFingerprintHasher>,
    claims: Arc<[Shard]>,
    next_owner: AtomicU64,
    /// The bound, reported beside what is held.
    max_bytes: u64,
}

impl MemoryStore {
    /// A store holding at most `max_bytes` of answers and sightings together.
    pub fn new(max_bytes: u64) -> Self {
        // Sightings exist only under short windows and weigh little: an eighth of the
        // bound holds millions of them.
        let sighting_bytes = max_bytes / 8;
        let answers = Cache::builder()
            .max_capacity(max_bytes - sighting_bytes)
            .weigher(|_: &Fingerprint, kept: &Kept| -> u32 {
                u32::try_from(kept.answer.weight() + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryTtl)
            .build_with_hasher(BuildFingerprintHasher::default());
        let sightings = Cache::builder()
            .max_capacity(sighting_bytes)
            .weigher(|_: &Fingerprint, _: &Sighting| SIGHTING_WEIGHT)
            .expire_after(PerEntryTtl)
            .build_with_hasher(BuildFingerprintHasher::default());
        MemoryStore {
            answers,
            sightings,
            claims: (0..SHARDS).map(|_| Mutex::default()).collect(),
            next_owner: AtomicU64::new(1),
            max_bytes,
        }
    }

    fn claim_now(&self, req: ClaimRequest) -> Claim {
        let fp = req.fp;
        let mut claims = lock(&self.claims[shard_of(&fp)]);
        // An owner at work: wait for its answer, unless its lease has lapsed.
        if let Some(in_flight) = claims.get(&fp) {
            if in_flight.lapses > Instant::now() {
                let mut answer = in_flight.answer.clone();
                return Claim::InFlight(Box::pin(async move {
                    // An error means the owner's sender is gone without an answer.
                    answer
                        .wait_for(Option::is_some)
                        .await
                        .ok()
                        .and_then(|a| a.clone())
                }));
            }
        }
        // Settled answers are stored before their claim is removed, under this lock:
        // whoever finds no claim finds the answer.
        if let Some(kept) = self.answers.get(&fp) {
            if req.within_window(kept.first_seen) {
                return Claim::Done(kept.answer);
            }
            // Kept under a longer window than the one in force now.
            self.answers.invalidate(&fp);
        }
        let first_seen = self.first_seen(&req);
        let owner = self.next_owner.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        claims.insert(
            fp,
            InFlight {
                owner,
                answer: rx,
                lapses: Instant::now() + req.lease,
            },
        );
        Claim::Owner {
            ticket: Box::new(MemoryTicket {
                answers: self.answers.clone(),
                claims: self.claims.clone(),
                fp,
                owner,
                first_seen,
                keep_for: req.window_left(first_seen),
                tx: Some(tx),
            }),
            first_seen,
        }
    }

    /// The first sighting inside the window, recorded now if there is none. Only short
    /// windows need one: a 24 h window's key does not depend on time.
    fn first_seen(&self, req: &ClaimRequest) -> SystemTime {
        if req.window >= LINE_KEY_LIFETIME {
            return req.now;
        }
        if let Some(seen) = self.sightings.get(&req.fp) {
            if req.within_window(seen.first_seen) {
                return seen.first_seen;
            }
        }
        self.sightings.insert(
            req.fp,
            Sighting {
                first_seen: req.now,
                ttl: req.window,
            },
        );
        req.now
    }
}

impl Store for MemoryStore {
    fn claim(&self, req: ClaimRequest) -> BoxFuture<'_, Result<Claim, StoreError>> {
        let claim = self.claim_now(req);
        Box::pin(std::future::ready(Ok(claim)))
    }

    fn stats(&self) -> StoreStats {
        // moka counts lazily; settle pending work so a scrape sees what is held now.
        self.answers.run_pending_tasks();
        self.sightings.run_pending_tasks();
        StoreStats {
            entries: self.answers.entry_count(),
            bytes: self.answers.weighted_size() + self.sightings.weighted_size(),
            max_bytes: self.max_bytes,
            claims: self.claims.iter().map(|s| lock(s).len() as u64).sum(),
            up: true,
        }
    }

    fn describe(&self) -> String {
        "store: memory (this process only)".to_owned()
    }
}

fn shard_of(fp: &Fingerprint) -> usize {
    // The table hash uses the first eight bytes; the shard takes another one.
    usize::from(fp.0[8]) % SHARDS
}

fn lock(shard: &Shard) -> MutexGuard<'_, HashMap<Fingerprint, InFlight, BuildFingerprintHasher>> {
    // No code panics while holding a shard lock; if one did, the map is still whole.
    shard
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct MemoryTicket {
    answers: Cache<Fingerprint, Kept, BuildFingerprintHasher>,
    claims: Arc<[Shard]>,
    fp: Fingerprint,
    owner: u64,
    first_seen: SystemTime,
    keep_for: Duration,
    tx: Option<watch::Sender<Option<Arc<Answer>>>>,
}

impl MemoryTicket {
    /// Removes the claim if it is still this owner's (it may have lapsed and been
    /// taken by another request since).
    fn release(&self) {
        let mut claims = lock(&self.claims[shard_of(&self.fp)]);
        if claims.get(&self.fp).is_some_and(|c| c.owner == self.owner) {
            claims.remove(&self.fp);
        }
    }
}

impl Ticket for MemoryTicket {
    fn settle(
        mut self: Box<Self>,
        answer: Arc<Answer>,
        keep: bool,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        // Store before releasing and publishing: whoever is woken, or arrives next,
        // must find the answer.
        if keep && !self.keep_for.is_zero() {
            self.answers.insert(
                self.fp,
                Kept {
                    answer: answer.clone(),
                    first_seen: self.first_seen,
                    ttl: self.keep_for,
                },
            );
        }
        self.release();
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
    use crate::domain::{Outcome, RetryKey};
    use bytes::Bytes;
    use http::StatusCode;

    const LEASE: Duration = Duration::from_secs(60);
    const DAY: Duration = LINE_KEY_LIFETIME;

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

    fn request(fp: u8, window: Duration, now: SystemTime) -> ClaimRequest {
        ClaimRequest {
            fp: Fingerprint([fp; 32]),
            lease: LEASE,
            window,
            now,
        }
    }

    async fn claim(store: &MemoryStore, fp: u8) -> Claim {
        store
            .claim(request(fp, DAY, SystemTime::now()))
            .await
            .unwrap()
    }

    fn owner(claim: Claim) -> (Box<dyn Ticket>, SystemTime) {
        match claim {
            Claim::Owner { ticket, first_seen } => (ticket, first_seen),
            Claim::Done(_) => panic!("expected to own the claim, got a stored answer"),
            Claim::InFlight(_) => panic!("expected to own the claim, got a wait"),
        }
    }

    #[tokio::test]
    async fn first_claims_then_others_wait_then_replay() {
        let store = MemoryStore::new(1 << 20);
        let (ticket, _) = owner(claim(&store, 1).await);
        let Claim::InFlight(waiting) = claim(&store, 1).await else {
            panic!("second must wait")
        };
        owner(claim(&store, 2).await);
        ticket.settle(answer("first"), true).await.unwrap();
        assert_eq!(waiting.await.unwrap().body, "first");
        let Claim::Done(replayed) = claim(&store, 1).await else {
            panic!("must replay")
        };
        assert_eq!(replayed.body, "first");
    }

    #[tokio::test]
    async fn unstored_answer_reaches_waiters_but_is_not_replayed() {
        let store = MemoryStore::new(1 << 20);
        let (ticket, _) = owner(claim(&store, 1).await);
        let Claim::InFlight(waiting) = claim(&store, 1).await else {
            panic!()
        };
        ticket.settle(answer("502"), false).await.unwrap();
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
    async fn answers_expire_when_the_window_has_passed_since_first_sight() {
        let store = MemoryStore::new(1 << 20);
        let (ticket, _) = owner(
            store
                .claim(request(1, Duration::from_millis(1), SystemTime::now()))
                .await
                .unwrap(),
        );
        ticket.settle(answer("x"), true).await.unwrap();
        // moka expires on its own clock, which a test cannot advance: poll it, bounded.
        let give_up = Instant::now() + Duration::from_secs(5);
        while matches!(claim(&store, 1).await, Claim::Done(_)) {
            assert!(Instant::now() < give_up, "entry never expired");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[tokio::test]
    async fn a_shortened_window_applies_to_answers_already_kept() {
        let store = MemoryStore::new(1 << 20);
        let t0 = SystemTime::now();
        let (ticket, _) = owner(store.claim(request(1, DAY, t0)).await.unwrap());
        ticket.settle(answer("old"), true).await.unwrap();
        let later = t0 + Duration::from_secs(17 * 60);
        let ten_minutes = Duration::from_secs(600);
        assert!(matches!(
            store.claim(request(1, DAY, later)).await.unwrap(),
            Claim::Done(_)
        ));
        owner(store.claim(request(1, ten_minutes, later)).await.unwrap());
    }

    #[tokio::test]
    async fn a_short_window_keeps_its_first_sighting_whatever_the_outcome() {
        let store = MemoryStore::new(1 << 20);
        let window = Duration::from_secs(6);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_004);
        let (ticket, first) = owner(store.claim(request(1, window, t0)).await.unwrap());
        assert_eq!(first, t0);
        // The send's outcome is unknown: nothing kept.
        ticket.settle(answer("504"), false).await.unwrap();
        let resend = t0 + Duration::from_secs(3);
        let (ticket, first) = owner(store.claim(request(1, window, resend)).await.unwrap());
        assert_eq!(first, t0, "the resend keeps the first sighting");
        drop(ticket);
        let after = t0 + window;
        let (_, first) = owner(store.claim(request(1, window, after)).await.unwrap());
        assert_eq!(first, after, "a window later it is a new send");
    }

    #[tokio::test]
    async fn claims_survive_a_full_store() {
        let store = MemoryStore::new(1 << 20);
        let (ticket, _) = owner(claim(&store, 0).await);
        // Churn far more answers than the bound holds.
        for i in 0..4096u32 {
            let mut fp = [0u8; 32];
            fp[..4].copy_from_slice(&i.to_le_bytes());
            fp[8] = 1;
            let req = ClaimRequest {
                fp: Fingerprint(fp),
                ..request(0, DAY, SystemTime::now())
            };
            let (t, _) = owner(store.claim(req).await.unwrap());
            t.settle(answer(vec![b'x'; 1024]), true).await.unwrap();
        }
        store.answers.run_pending_tasks();
        assert!(
            matches!(claim(&store, 0).await, Claim::InFlight(_)),
            "an owner's claim is never evicted"
        );
        drop(ticket);
    }

    #[tokio::test]
    async fn bounded_by_bytes() {
        let store = MemoryStore::new(1 << 20);
        for i in 0..2048u32 {
            let mut fp = [0u8; 32];
            fp[..4].copy_from_slice(&i.to_le_bytes());
            let req = ClaimRequest {
                fp: Fingerprint(fp),
                ..request(0, DAY, SystemTime::now())
            };
            let (t, _) = owner(store.claim(req).await.unwrap());
            t.settle(answer(vec![b'x'; 1024]), true).await.unwrap();
        }
        let stats = store.stats();
        assert!(stats.bytes <= 1 << 20, "{stats:?}");
        assert!(stats.entries < 2048);
        assert_eq!(stats.claims, 0);
    }
}
