//! What the memory store's tests share: answers, requests, and claims taken on them.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::StatusCode;

use super::MemoryStore;
use crate::domain::{Answer, Fingerprint, Outcome, RetryKey, LINE_KEY_LIFETIME};
use crate::store::{Claim, ClaimRequest, Store, Ticket};

pub(super) const LEASE: Duration = Duration::from_secs(60);
pub(super) const DAY: Duration = LINE_KEY_LIFETIME;

pub(super) fn answer(body: impl Into<Bytes>) -> Arc<Answer> {
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

pub(super) fn request(fp: u8, window: Duration, now: SystemTime) -> ClaimRequest {
    ClaimRequest {
        fp: Fingerprint([fp; 32]),
        lease: LEASE,
        window,
        now,
    }
}

/// The `i`th of many fingerprints, spread over the shards.
pub(super) fn numbered(i: u32, now: SystemTime) -> ClaimRequest {
    let mut fp = [0u8; 32];
    fp[..4].copy_from_slice(&i.to_le_bytes());
    fp[8] = (i % 251) as u8;
    ClaimRequest {
        fp: Fingerprint(fp),
        ..request(0, DAY, now)
    }
}

pub(super) async fn claim(store: &MemoryStore, fp: u8) -> Claim {
    store
        .claim(request(fp, DAY, SystemTime::now()))
        .await
        .unwrap()
}

pub(super) fn owner(claim: Claim) -> (Box<dyn Ticket>, SystemTime) {
    match claim {
        Claim::Owner { ticket, first_seen } => (ticket, first_seen),
        Claim::Done(_) => panic!("expected to own the claim, got a stored answer"),
        Claim::InFlight(_) => panic!("expected to own the claim, got a wait"),
    }
}
