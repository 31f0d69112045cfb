//! The embedded store, for one process (a sidecar). Fingerprints are spread over
//! [`SHARDS`] shards, each one lock over:
//! - claims of requests in flight: never evicted while their owner lives, so
//!   coalescing holds however full the store is;
//! - settled answers, each a compact [`record`] (status, the few headers kept, key,
//!   body, first sighting), bounded by bytes and evicted oldest first;
//! - and, beside the shards, first sightings for short windows, in a small moka cache,
//!   kept for the whole window whatever became of the send.
//!
//! Every answer of an endpoint is kept for the same window, so the oldest answer is
//! the first to expire and the least likely to be asked for again: a queue in
//! insertion order serves both expiry and eviction, with no timer wheel and no
//! frequency sketch. An answer is weighed at what it costs (its record, its slots in
//! the map and the queue, the allocator's share), so `store-max-bytes` bounds memory.
//!
//! Nothing here survives a restart: after one, a resend is sent again under the same
//! derived key (24 h window) and LINE's 409 is turned into the original success.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use moka::sync::Cache;
use tokio::sync::watch;

use super::record;
use super::{Claim, ClaimRequest, Store, StoreError, Ticket};
use crate::body::BoxFuture;
use crate::domain::{Answer, BuildFingerprintHasher, Fingerprint, StoreStats, LINE_KEY_LIFETIME};

/// Fingerprints are spread over this many locks, so identical sends meet and
/// different ones rarely do.
const SHARDS: usize = 64;
/// What one kept answer costs beyond its record: its slot in the map and in the
/// queue, each table taken as just doubled (hashbrown and `VecDeque` grow so, and
/// memory once touched stays with the process), and the allocator's header and
/// rounding on the record. `bench/memory.sh` measures the real cost beside it.
const ENTRY_OVERHEAD: usize = {
    let map_slot = std::mem::size_of::<(Fingerprint, Kept)>() + 1;
    let queue_slot = std::mem::size_of::<Queued>();
    (map_slot + queue_slot) * 2 + 32
};
/// What one sighting weighs: key, time, moka's entry.
const SIGHTING_WEIGHT: u32 = 96;

/// A kept answer.
struct Kept {
    /// The answer and its first sighting, as [`record::encode`] writes them.
    record: Box<[u8]>,
    /// Wall-clock milliseconds after which it is gone: its first sighting plus the
    /// window in force when it was kept.
    expires_ms: u64,
    /// Tells this answer from an older one of the same fingerprint in the queue.
    seq: u32,
}

/// An answer's place in its shard's queue, oldest first.
struct Queued {
    fp: Fingerprint,
    seq: u32,
}

struct InFlight {
    /// Tells this owner's claim from a later one on the same fingerprint.
    owner: u64,
    /// Made when the first identical request comes to wait: most sends have none.
    waiters: Option<watch::Sender<Option<Arc<Answer>>>>,
    lapses: Instant,
}

#[derive(Default)]
struct Shard {
    claims: HashMap<Fingerprint, InFlight, BuildFingerprintHasher>,
    answers: HashMap<Fingerprint, Kept, BuildFingerprintHasher>,
    queue: VecDeque<Queued>,
    /// What `answers` weighs.
    bytes: usize,
    next_seq: u32,
}

impl Shard {
    /// The answer kept for `fp`, if one is inside the window of `req`.
    fn answer(&mut self, req: &ClaimRequest) -> Option<Arc<Answer>> {
        let kept = self.answers.get(&req.fp)?;
        let decoded = record::decode(&kept.record).filter(|(first_seen, _)| {
            record::millis(req.now) < kept.expires_ms && req.within_window(*first_seen)
        });
        match decoded {
            Some((_, answer)) => Some(Arc::new(answer)),
            None => {
                // Expired, kept under a longer window than the one in force now, or
                // (never written so) unreadable: gone either way.
                self.remove(&req.fp);
                None
            }
        }
    }

    fn remove(&mut self, fp: &Fingerprint) {
        if let Some(kept) = self.answers.remove(fp) {
            self.bytes -= weight(&kept);
        }
    }

    fn keep(
        &mut self,
        fp: Fingerprint,
        record: Box<[u8]>,
        expires_ms: u64,
        now_ms: u64,
        bound: usize,
    ) {
        self.next_seq = self.next_seq.wrapping_add(1);
        let kept = Kept {
            record,
            expires_ms,
            seq: self.next_seq,
        };
        self.bytes += weight(&kept);
        self.queue.push_back(Queued { fp, seq: kept.seq });
        if let Some(old) = self.answers.insert(fp, kept) {
            self.bytes -= weight(&old);
        }
        self.trim(now_ms, bound);
    }

    /// Drops answers from the old end while they have expired or the shard is over
    /// its bound. Queue entries of answers already replaced or removed are skipped.
    fn trim(&mut self, now_ms: u64, bound: usize) {
        while let Some(front) = self.queue.front() {
            let current = self
                .answers
                .get(&front.fp)
                .filter(|kept| kept.seq == front.seq);
            match current {
                Some(kept) if kept.expires_ms > now_ms && self.bytes <= bound => break,
                Some(_) => {
                    let fp = front.fp;
                    self.remove(&fp);
                }
                None => {}
            }
            self.queue.pop_front();
        }
        // A burst long gone must not pin its queue's memory.
        if self.queue.capacity() > 64 && self.queue.len() < self.queue.capacity() / 4 {
            self.queue.shrink_to(self.queue.len() * 2);
        }
    }
}

fn weight(kept: &Kept) -> usize {
    kept.record.len() + ENTRY_OVERHEAD
}

#[derive(Clone, Copy)]
struct Sighting {
    first_seen: SystemTime,
    ttl: Duration,
}

struct PerEntryTtl;

impl moka::Expiry<Fingerprint, Sighting> for PerEntryTtl {
    fn expire_after_create(&self, _: &Fingerprint, s: &Sighting, _: Instant) -> Option<Duration> {
        Some(s.ttl)
    }
}

pub struct MemoryStore {
    shards: Arc<[Mutex<Shard>]>,
    /// Each shard's share of the bytes for answers.
    shard_bound: usize,
    sightings: Cache<Fingerprint, Sighting, BuildFingerprintHasher>,
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
        let answer_bytes = max_bytes - sighting_bytes;
        let sightings = Cache::builder()
            .max_capacity(sighting_bytes)
            .weigher(|_: &Fingerprint, _: &Sighting| SIGHTING_WEIGHT)
            .expire_after(PerEntryTtl)
            .build_with_hasher(BuildFingerprintHasher::default());
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            shard_bound: usize::try_from(answer_bytes / SHARDS as u64).unwrap_or(usize::MAX),
            sightings,
            next_owner: AtomicU64::new(1),
            max_bytes,
        }
    }

    fn claim_now(&self, req: ClaimRequest) -> Claim {
        let fp = req.fp;
        let mut shard = lock(&self.shards[shard_of(&fp)]);
        // An owner at work: wait for its answer, unless its lease has lapsed.
        if let Some(in_flight) = shard.claims.get_mut(&fp) {
            if in_flight.lapses > Instant::now() {
                let mut answer = in_flight
                    .waiters
                    .get_or_insert_with(|| watch::channel(None).0)
                    .subscribe();
                return Claim::InFlight(Box::pin(async move {
                    // An error means the claim went without an answer.
                    answer
                        .wait_for(Option::is_some)
                        .await
                        .ok()
                        .and_then(|a| a.clone())
                }));
            }
        }
        // Settled answers are kept before their claim is removed, under this lock:
        // whoever finds no claim finds the answer.
        if let Some(answer) = shard.answer(&req) {
            return Claim::Done(answer);
        }
        let first_seen = self.first_seen(&req);
        let owner = self.next_owner.fetch_add(1, Ordering::Relaxed);
        // Replaces a lapsed claim, if there was one: its waiters claim again.
        shard.claims.insert(
            fp,
            InFlight {
                owner,
                waiters: None,
                lapses: Instant::now() + req.lease,
            },
        );
        Claim::Owner {
            ticket: Box::new(MemoryTicket {
                shards: self.shards.clone(),
                shard_bound: self.shard_bound,
                fp,
                owner,
                first_seen,
                expires_ms: record::millis(first_seen)
                    .saturating_add(u64::try_from(req.window.as_millis()).unwrap_or(u64::MAX)),
                claimed_ms: record::millis(req.now),
                settled: false,
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
        self.sightings.run_pending_tasks();
        let (mut entries, mut bytes, mut claims) = (0, 0, 0);
        for shard in self.shards.iter() {
            let shard = lock(shard);
            entries += shard.answers.len() as u64;
            bytes += shard.bytes as u64;
            claims += shard.claims.len() as u64;
        }
        StoreStats {
            entries,
            bytes: bytes + self.sightings.weighted_size(),
            max_bytes: self.max_bytes,
            claims,
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

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // No code panics while holding a shard lock; if one did, the shard is still whole.
    shard
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct MemoryTicket {
    shards: Arc<[Mutex<Shard>]>,
    shard_bound: usize,
    fp: Fingerprint,
    owner: u64,
    first_seen: SystemTime,
    expires_ms: u64,
    /// The clock when the claim was taken: answers expired by then are trimmed.
    claimed_ms: u64,
    settled: bool,
}

impl MemoryTicket {
    /// Ends the claim, if it is still this owner's (it may have lapsed and been taken
    /// by another request since), and hands `answer` to its waiters; without an
    /// answer, the waiters are told to claim again.
    fn end(&self, shard: &mut Shard, answer: Option<Arc<Answer>>) {
        if shard
            .claims
            .get(&self.fp)
            .is_none_or(|c| c.owner != self.owner)
        {
            return;
        }
        let ended = shard.claims.remove(&self.fp);
        if let (Some(waiters), Some(answer)) = (ended.and_then(|c| c.waiters), answer) {
            waiters.send_replace(Some(answer));
        }
    }
}

impl Ticket for MemoryTicket {
    fn settle(
        mut self: Box<Self>,
        answer: Arc<Answer>,
        keep: bool,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        self.settled = true;
        // Encoded before taking the lock: nobody waits on it.
        let kept = (keep && self.expires_ms > self.claimed_ms)
            .then(|| record::encode(self.first_seen, &answer).into_boxed_slice());
        let mut shard = lock(&self.shards[shard_of(&self.fp)]);
        // Kept before the claim ends, under one lock: whoever is woken, or arrives
        // next, finds the answer.
        if let Some(record) = kept {
            shard.keep(
                self.fp,
                record,
                self.expires_ms,
                self.claimed_ms,
                self.shard_bound,
            );
        }
        self.end(&mut shard, Some(answer));
        Box::pin(std::future::ready(Ok(())))
    }
}

impl Drop for MemoryTicket {
    fn drop(&mut self) {
        if !self.settled {
            let mut shard = lock(&self.shards[shard_of(&self.fp)]);
            self.end(&mut shard, None);
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
            owner: None,
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

    fn numbered(i: u32, now: SystemTime) -> ClaimRequest {
        let mut fp = [0u8; 32];
        fp[..4].copy_from_slice(&i.to_le_bytes());
        fp[8] = (i % 251) as u8;
        ClaimRequest {
            fp: Fingerprint(fp),
            ..request(0, DAY, now)
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
        let Claim::InFlight(also_waiting) = claim(&store, 1).await else {
            panic!("third must wait")
        };
        owner(claim(&store, 2).await);
        ticket.settle(answer("first"), true).await.unwrap();
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
    async fn a_lapsed_owner_settling_late_keeps_its_answer_but_not_the_claim() {
        let store = MemoryStore::new(1 << 20);
        let mut short = request(1, DAY, SystemTime::now());
        short.lease = Duration::ZERO;
        let (stale, _) = owner(store.claim(short).await.unwrap());
        let (fresh, _) = owner(claim(&store, 1).await);
        let Claim::InFlight(waiting) = claim(&store, 1).await else {
            panic!("waits on the new owner")
        };
        stale.settle(answer("late"), true).await.unwrap();
        assert!(matches!(claim(&store, 1).await, Claim::InFlight(_)));
        fresh.settle(answer("new"), true).await.unwrap();
        assert_eq!(waiting.await.unwrap().body, "new");
    }

    #[tokio::test]
    async fn answers_expire_when_the_window_has_passed_since_first_sight() {
        let store = MemoryStore::new(1 << 20);
        let t0 = SystemTime::now();
        let window = Duration::from_secs(60);
        let (ticket, _) = owner(store.claim(request(1, window, t0)).await.unwrap());
        ticket.settle(answer("x"), true).await.unwrap();
        let just_before = t0 + window - Duration::from_millis(1);
        assert!(matches!(
            store.claim(request(1, window, just_before)).await.unwrap(),
            Claim::Done(_)
        ));
        owner(store.claim(request(1, window, t0 + window)).await.unwrap());
        assert_eq!(store.stats().entries, 0, "the expired answer is gone");
    }

    #[tokio::test]
    async fn a_lengthened_window_does_not_bring_back_what_expired() {
        let store = MemoryStore::new(1 << 20);
        let t0 = SystemTime::now();
        let (ticket, _) = owner(
            store
                .claim(request(1, Duration::from_secs(10), t0))
                .await
                .unwrap(),
        );
        ticket.settle(answer("x"), true).await.unwrap();
        let later = t0 + Duration::from_secs(11);
        owner(store.claim(request(1, DAY, later)).await.unwrap());
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
        // Churn far more answers than the bound holds, some in the claim's shard.
        for i in 0..4096u32 {
            let (t, _) = owner(
                store
                    .claim(numbered(i + 1, SystemTime::now()))
                    .await
                    .unwrap(),
            );
            t.settle(answer(vec![b'x'; 1024]), true).await.unwrap();
        }
        assert!(
            matches!(claim(&store, 0).await, Claim::InFlight(_)),
            "an owner's claim is never evicted"
        );
        drop(ticket);
    }

    #[tokio::test]
    async fn bounded_by_bytes_oldest_evicted_first() {
        let store = MemoryStore::new(1 << 20);
        let now = SystemTime::now();
        for i in 0..4096u32 {
            let (t, _) = owner(store.claim(numbered(i, now)).await.unwrap());
            t.settle(answer(vec![b'x'; 1024]), true).await.unwrap();
        }
        let stats = store.stats();
        assert!(stats.bytes <= 1 << 20, "{stats:?}");
        assert!(stats.entries > 400 && stats.entries < 4096, "{stats:?}");
        assert_eq!(stats.claims, 0);
        assert!(
            matches!(
                store.claim(numbered(4095, now)).await.unwrap(),
                Claim::Done(_)
            ),
            "the newest answer is kept"
        );
        let (_oldest_again, _) = owner(store.claim(numbered(0, now)).await.unwrap());
    }

    #[tokio::test]
    async fn a_replaced_answer_is_weighed_once_and_its_old_queue_place_ignored() {
        let store = MemoryStore::new(1 << 20);
        let mut lapsing = request(1, DAY, SystemTime::now());
        lapsing.lease = Duration::ZERO;
        // Two owners of one fingerprint, the first's lease lapsed: both settle.
        let (first, _) = owner(store.claim(lapsing).await.unwrap());
        let (second, _) = owner(store.claim(lapsing).await.unwrap());
        first.settle(answer("one"), true).await.unwrap();
        second.settle(answer("two, longer"), true).await.unwrap();
        let Claim::Done(kept) = claim(&store, 1).await else {
            panic!("the second answer is kept")
        };
        assert_eq!(kept.body, "two, longer");
        let shard = lock(&store.shards[shard_of(&lapsing.fp)]);
        assert_eq!(shard.answers.len(), 1);
        // The first answer's place went with the trim after the second was kept,
        // and did not take the second along.
        assert_eq!(shard.queue.len(), 1);
        let record = record::encode(lapsing.now, &kept);
        assert_eq!(shard.bytes, record.len() + ENTRY_OVERHEAD);
    }
}
