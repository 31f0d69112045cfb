//! The owner's ticket: publishes its answer in one script (keep it, release the lease,
//! announce it on the channel), or lets go of its lease when dropped unpublished.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{duration_millis, key, record, Shared, CHANNEL};
use crate::body::BoxFuture;
use crate::domain::{Answer, Fingerprint};
use crate::store::{StoreError, Ticket};

pub(super) struct RedisTicket {
    shared: Arc<Shared>,
    fp: Fingerprint,
    /// Names this owner in the lease, so a lapsed owner cannot release a successor's.
    token: [u8; 16],
    first_seen: SystemTime,
    /// How long the answer is kept: the window left since the first sighting.
    keep_for: Duration,
    published: bool,
}

impl RedisTicket {
    /// The ticket of a claim just taken; counted among this process's claims until
    /// dropped.
    pub(super) fn new(
        shared: Arc<Shared>,
        fp: Fingerprint,
        token: [u8; 16],
        first_seen: SystemTime,
        keep_for: Duration,
    ) -> Self {
        shared.claims.fetch_add(1, Ordering::Relaxed);
        RedisTicket {
            shared,
            fp,
            token,
            first_seen,
            keep_for,
            published: false,
        }
    }
}

impl Ticket for RedisTicket {
    fn publish(
        mut self: Box<Self>,
        answer: Arc<Answer>,
        keep: bool,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        Box::pin(async move {
            let record = record::encode(self.first_seen, &answer);
            let ttl = if keep {
                duration_millis(self.keep_for)
            } else {
                0
            };
            let mut conn = self.shared.conn.clone();
            let mut invocation = self.shared.publish.prepare_invoke();
            invocation
                .key(key(b'a', &self.fp))
                .key(key(b'l', &self.fp))
                .arg(&self.token[..])
                .arg(record)
                .arg(ttl)
                .arg(CHANNEL)
                .arg(&self.fp.0[..]);
            let stored = self
                .shared
                .call(invocation.invoke_async::<i64>(&mut conn))
                .await;
            self.published = true;
            // Waiters here get it at once, whatever became of the script.
            self.shared.waiters.deliver(&self.fp, Some(answer));
            stored.map(drop)
        })
    }
}

impl Drop for RedisTicket {
    fn drop(&mut self) {
        self.shared.claims.fetch_sub(1, Ordering::Relaxed);
        if self.published {
            return;
        }
        // Unpublished: let go of the lease, so waiters anywhere claim at once instead
        // of waiting for it to lapse.
        self.shared.waiters.deliver(&self.fp, None);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = self.shared.clone();
        let fp = self.fp;
        let token = self.token;
        runtime.spawn(async move {
            let mut conn = shared.conn.clone();
            let mut invocation = shared.delete_if_held.prepare_invoke();
            invocation
                .key(key(b'l', &fp))
                .arg(&token[..])
                .arg(CHANNEL)
                .arg(&fp.0[..]);
            let _ = shared.call(invocation.invoke_async::<i64>(&mut conn)).await;
        });
    }
}
