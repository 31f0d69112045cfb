//! First sightings under short windows, beside the shards in a small moka cache: a
//! send must keep its key until the window has passed since it was first seen,
//! whatever became of it, so a sighting is kept for the whole window, apart from the
//! answer.

use std::time::{Duration, Instant, SystemTime};

use moka::sync::Cache;

use crate::domain::{BuildFingerprintHasher, Fingerprint, LINE_KEY_LIFETIME};
use crate::store::ClaimRequest;

/// What one sighting weighs: key, time, moka's entry.
const SIGHTING_WEIGHT: u32 = 96;

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

/// First sightings, at most `max_bytes` of them, each gone when its window has passed.
pub(super) struct Sightings(Cache<Fingerprint, Sighting, BuildFingerprintHasher>);

impl Sightings {
    pub(super) fn bounded(max_bytes: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_: &Fingerprint, _: &Sighting| SIGHTING_WEIGHT)
            .expire_after(PerEntryTtl)
            .build_with_hasher(BuildFingerprintHasher::default());
        Sightings(cache)
    }

    /// The first sighting inside the window, recorded now if there is none. Only short
    /// windows need one: a 24 h window's key does not depend on time.
    pub(super) fn first_seen(&self, req: &ClaimRequest) -> SystemTime {
        if req.window >= LINE_KEY_LIFETIME {
            return req.now;
        }
        if let Some(seen) = self.0.get(&req.fp) {
            if req.within_window(seen.first_seen) {
                return seen.first_seen;
            }
        }
        self.0.insert(
            req.fp,
            Sighting {
                first_seen: req.now,
                ttl: req.window,
            },
        );
        req.now
    }

    /// What the sightings weigh, in bytes, as of now.
    pub(super) fn bytes(&self) -> u64 {
        // moka counts lazily; its pending work is done first so a scrape sees what is
        // held now.
        self.0.run_pending_tasks();
        self.0.weighted_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::testing::{answer, owner, request};
    use crate::store::memory::MemoryStore;
    use crate::store::Store;

    #[tokio::test]
    async fn a_short_window_keeps_its_first_sighting_whatever_the_outcome() {
        let store = MemoryStore::new(1 << 20);
        let window = Duration::from_secs(6);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_004);
        let (ticket, first) = owner(store.claim(request(1, window, t0)).await.unwrap());
        assert_eq!(first, t0);
        // The send's outcome is unknown: nothing kept.
        ticket.publish(answer("504"), false).await.unwrap();
        let resend = t0 + Duration::from_secs(3);
        let (ticket, first) = owner(store.claim(request(1, window, resend)).await.unwrap());
        assert_eq!(first, t0, "the resend keeps the first sighting");
        drop(ticket);
        let after = t0 + window;
        let (_, first) = owner(store.claim(request(1, window, after)).await.unwrap());
        assert_eq!(first, after, "a window later it is a new send");
    }
}
