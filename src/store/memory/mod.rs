//! The embedded store, for one process (a sidecar). Fingerprints are spread over
//! [`SHARDS`] shards, each one lock over:
//! - claims of requests in flight ([`claims`]), never evicted while their owner lives;
//! - published answers ([`answers`]), each a compact [`record`], bounded by bytes and
//!   evicted oldest first;
//! - and, beside the shards, first sightings for short windows ([`sightings`]), kept
//!   for the whole window whatever became of the send.
//!
//! An answer is kept before its claim ends, under the shard's one lock: whoever finds
//! no claim finds the answer.
//!
//! Nothing here survives a restart: after one, a resend is sent again under the same
//! derived key (24 h window) and LINE's 409 is turned into the original success.

mod answers;
mod claims;
mod sightings;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::record;
use super::{Claim, ClaimRequest, Store, StoreError, Ticket};
use crate::body::BoxFuture;
use crate::domain::{Answer, Fingerprint, StoreStats};
use crate::sync::lock;
use answers::Answers;
use claims::Claims;
use sightings::Sightings;

/// Fingerprints are spread over this many locks, so identical sends meet and
/// different ones rarely do.
const SHARDS: usize = 64;

struct Shard {
    claims: Claims,
    answers: Answers,
}

pub struct MemoryStore {
    shards: Arc<[Mutex<Shard>]>,
    sightings: Sightings,
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
        // Each shard's share of the bytes for answers.
        let shard_bound = usize::try_from(answer_bytes / SHARDS as u64).unwrap_or(usize::MAX);
        let shard = || {
            Mutex::new(Shard {
                claims: Claims::default(),
                answers: Answers::bounded(shard_bound),
            })
        };
        MemoryStore {
            shards: (0..SHARDS).map(|_| shard()).collect(),
            sightings: Sightings::bounded(sighting_bytes),
            next_owner: AtomicU64::new(1),
            max_bytes,
        }
    }

    fn claim_now(&self, req: ClaimRequest) -> Claim {
        let fp = req.fp;
        let mut shard = lock(&self.shards[shard_of(&fp)]);
        // An owner at work: wait for its answer, unless its lease has lapsed.
        if let Some(wait) = shard.claims.wait(&fp) {
            return Claim::InFlight(wait);
        }
        // Answers are kept before their claim is removed, under this lock: whoever
        // finds no claim finds the answer.
        if let Some(answer) = shard.answers.get(&req) {
            return Claim::Done(answer);
        }
        let first_seen = self.sightings.first_seen(&req);
        let owner = self.next_owner.fetch_add(1, Ordering::Relaxed);
        shard.claims.take(fp, owner, req.lease);
        Claim::Owner {
            ticket: Box::new(MemoryTicket {
                shards: self.shards.clone(),
                fp,
                owner,
                first_seen,
                expires_ms: record::unix_millis(first_seen)
                    .saturating_add(u64::try_from(req.window.as_millis()).unwrap_or(u64::MAX)),
                claimed_ms: record::unix_millis(req.now),
                published: false,
            }),
            first_seen,
        }
    }
}

impl Store for MemoryStore {
    fn claim(&self, req: ClaimRequest) -> BoxFuture<'_, Result<Claim, StoreError>> {
        let claim = self.claim_now(req);
        Box::pin(std::future::ready(Ok(claim)))
    }

    fn stats(&self) -> StoreStats {
        let sighting_bytes = self.sightings.bytes();
        let (mut entries, mut bytes, mut claims) = (0, 0, 0);
        for shard in self.shards.iter() {
            let shard = lock(shard);
            entries += shard.answers.len() as u64;
            bytes += shard.answers.bytes() as u64;
            claims += shard.claims.len() as u64;
        }
        StoreStats {
            entries,
            bytes: bytes + sighting_bytes,
            max_bytes: self.max_bytes,
            claims,
            up: true,
        }
    }

    fn status_line(&self) -> String {
        "store: memory (this process only)".to_owned()
    }
}

fn shard_of(fp: &Fingerprint) -> usize {
    // The table hash uses the first eight bytes; the shard takes another one.
    usize::from(fp.0[8]) % SHARDS
}

/// The owner's ticket: keeps the answer (if asked) and ends the claim under the
/// shard's lock, or ends the claim without an answer when dropped unpublished.
struct MemoryTicket {
    shards: Arc<[Mutex<Shard>]>,
    fp: Fingerprint,
    owner: u64,
    first_seen: SystemTime,
    expires_ms: u64,
    /// The clock when the claim was taken: answers expired by then are trimmed.
    claimed_ms: u64,
    published: bool,
}

impl Ticket for MemoryTicket {
    fn publish(
        mut self: Box<Self>,
        answer: Arc<Answer>,
        keep: bool,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        self.published = true;
        // Encoded before taking the lock: nobody waits on it.
        let kept = (keep && self.expires_ms > self.claimed_ms)
            .then(|| record::encode(self.first_seen, &answer).into_boxed_slice());
        let mut shard = lock(&self.shards[shard_of(&self.fp)]);
        // Kept before the claim ends, under one lock: whoever is woken, or arrives
        // next, finds the answer.
        if let Some(record) = kept {
            shard
                .answers
                .keep(self.fp, record, self.expires_ms, self.claimed_ms);
        }
        shard.claims.end(&self.fp, self.owner, Some(answer));
        Box::pin(std::future::ready(Ok(())))
    }
}

impl Drop for MemoryTicket {
    fn drop(&mut self) {
        if !self.published {
            let mut shard = lock(&self.shards[shard_of(&self.fp)]);
            shard.claims.end(&self.fp, self.owner, None);
        }
    }
}

#[cfg(test)]
mod testing;
