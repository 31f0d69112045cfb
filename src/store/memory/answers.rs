//! A shard's kept answers: each a compact [`record`], bounded by bytes, in a queue in
//! insertion order that serves both expiry and eviction.
//!
//! Every answer of an endpoint is kept for the same window, so the oldest answer is
//! the first to expire and the least likely to be asked for again: the old end of the
//! queue is the one to drop, with no timer wheel and no frequency sketch. An answer is
//! weighed at what it costs (its record, its slots in the map and the queue, the
//! allocator's share), so `store-max-bytes` bounds memory.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::domain::{Answer, BuildFingerprintHasher, Fingerprint};
use crate::store::{record, ClaimRequest};

/// What one kept answer costs beyond its record: its slot in the map and in the
/// queue, each table taken as just doubled (hashbrown and `VecDeque` grow so, and
/// memory once touched stays with the process), and the allocator's header and
/// rounding on the record. `bench/memory.sh` measures the real cost beside it.
const ENTRY_OVERHEAD: usize = {
    let map_slot = std::mem::size_of::<(Fingerprint, Kept)>() + 1;
    let queue_slot = std::mem::size_of::<Queued>();
    (map_slot + queue_slot) * 2 + 32
};

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

/// An answer's place in the queue, oldest first.
struct Queued {
    fp: Fingerprint,
    seq: u32,
}

/// The answers of one shard, at most `bound` bytes of them.
pub(super) struct Answers {
    kept: HashMap<Fingerprint, Kept, BuildFingerprintHasher>,
    queue: VecDeque<Queued>,
    /// What `kept` weighs.
    bytes: usize,
    bound: usize,
    next_seq: u32,
}

impl Answers {
    /// Answers weighing at most `bound` bytes.
    pub(super) fn bounded(bound: usize) -> Self {
        Answers {
            kept: HashMap::default(),
            queue: VecDeque::new(),
            bytes: 0,
            bound,
            next_seq: 0,
        }
    }

    /// The answer kept for `req.fp`, if one is inside the window of `req`.
    pub(super) fn get(&mut self, req: &ClaimRequest) -> Option<Arc<Answer>> {
        let kept = self.kept.get(&req.fp)?;
        let decoded = record::decode(&kept.record).filter(|(first_seen, _)| {
            record::unix_millis(req.now) < kept.expires_ms && req.within_window(*first_seen)
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

    /// Keeps `record` for `fp` until `expires_ms`, in place of any answer kept for it
    /// before, then drops what has expired by `now_ms` or no longer fits.
    pub(super) fn keep(
        &mut self,
        fp: Fingerprint,
        record: Box<[u8]>,
        expires_ms: u64,
        now_ms: u64,
    ) {
        self.next_seq = self.next_seq.wrapping_add(1);
        let kept = Kept {
            record,
            expires_ms,
            seq: self.next_seq,
        };
        self.bytes += weight(&kept);
        self.queue.push_back(Queued { fp, seq: kept.seq });
        if let Some(old) = self.kept.insert(fp, kept) {
            self.bytes -= weight(&old);
        }
        self.trim(now_ms);
    }

    /// How many answers are kept.
    pub(super) fn len(&self) -> usize {
        self.kept.len()
    }

    /// What the kept answers weigh, in bytes.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    fn remove(&mut self, fp: &Fingerprint) {
        if let Some(kept) = self.kept.remove(fp) {
            self.bytes -= weight(&kept);
        }
    }

    /// Drops answers from the old end while they have expired or the shard is over
    /// its bound. Queue entries of answers already replaced or removed are skipped.
    fn trim(&mut self, now_ms: u64) {
        while let Some(front) = self.queue.front() {
            let current = self
                .kept
                .get(&front.fp)
                .filter(|kept| kept.seq == front.seq);
            match current {
                Some(kept) if kept.expires_ms > now_ms && self.bytes <= self.bound => break,
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::store::memory::testing::{answer, claim, numbered, owner, request, DAY};
    use crate::store::memory::{shard_of, MemoryStore};
    use crate::store::{Claim, Store};
    use crate::sync::lock;

    #[tokio::test]
    async fn answers_expire_when_the_window_has_passed_since_first_sight() {
        let store = MemoryStore::new(1 << 20);
        let t0 = SystemTime::now();
        let window = Duration::from_secs(60);
        let (ticket, _) = owner(store.claim(request(1, window, t0)).await.unwrap());
        ticket.publish(answer("x"), true).await.unwrap();
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
        ticket.publish(answer("x"), true).await.unwrap();
        let later = t0 + Duration::from_secs(11);
        owner(store.claim(request(1, DAY, later)).await.unwrap());
    }

    #[tokio::test]
    async fn a_shortened_window_applies_to_answers_already_kept() {
        let store = MemoryStore::new(1 << 20);
        let t0 = SystemTime::now();
        let (ticket, _) = owner(store.claim(request(1, DAY, t0)).await.unwrap());
        ticket.publish(answer("old"), true).await.unwrap();
        let later = t0 + Duration::from_secs(17 * 60);
        let ten_minutes = Duration::from_secs(600);
        assert!(matches!(
            store.claim(request(1, DAY, later)).await.unwrap(),
            Claim::Done(_)
        ));
        owner(store.claim(request(1, ten_minutes, later)).await.unwrap());
    }

    #[tokio::test]
    async fn bounded_by_bytes_oldest_evicted_first() {
        let store = MemoryStore::new(1 << 20);
        let now = SystemTime::now();
        for i in 0..4096u32 {
            let (t, _) = owner(store.claim(numbered(i, now)).await.unwrap());
            t.publish(answer(vec![b'x'; 1024]), true).await.unwrap();
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
        // Two owners of one fingerprint, the first's lease lapsed: both publish.
        let (first, _) = owner(store.claim(lapsing).await.unwrap());
        let (second, _) = owner(store.claim(lapsing).await.unwrap());
        first.publish(answer("one"), true).await.unwrap();
        second.publish(answer("two, longer"), true).await.unwrap();
        let Claim::Done(kept) = claim(&store, 1).await else {
            panic!("the second answer is kept")
        };
        assert_eq!(kept.body, "two, longer");
        let shard = lock(&store.shards[shard_of(&lapsing.fp)]);
        assert_eq!(shard.answers.kept.len(), 1);
        // The first answer's place went with the trim after the second was kept,
        // and did not take the second along.
        assert_eq!(shard.answers.queue.len(), 1);
        let record = record::encode(lapsing.now, &kept);
        assert_eq!(shard.answers.bytes, record.len() + ENTRY_OVERHEAD);
    }
}
