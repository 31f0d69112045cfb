//! The store's two background tasks: the probe that decides whether Redis serves,
//! and the pub/sub listener that wakes this process's waiters.

use std::sync::Arc;
use std::time::Duration;

use ::redis::Client;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{record, Shared, CHANNEL, CONNECT_TIMEOUT};
use crate::domain::Fingerprint;

/// While up, a probe confirms it now and then, so `/readyz` is true without traffic.
const PROBE_WHILE_UP: Duration = Duration::from_secs(5);
/// While down, how soon the store is tried again.
const PROBE_WHILE_DOWN: Duration = Duration::from_millis(500);
/// Written and deleted by the probe.
const PROBE_KEY: &str = "lrp:probe";

/// Confirms the store serves: often while down, now and then while up.
pub(super) async fn probe(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        match shared.try_write().await {
            Ok(()) => shared.health.up(),
            Err(reason) => shared.health.down(&reason),
        }
        if shared.health.is_up() {
            // Until the next routine look, or until a send finds the store down.
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(PROBE_WHILE_UP) => continue,
                _ = shared.health.went_down() => {}
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PROBE_WHILE_DOWN) => {}
        }
    }
}

impl Shared {
    /// A PING, bounded by the connect timeout since it may have to connect (TLS,
    /// AUTH: slower than a send may wait, but off the request path); then a write,
    /// bounded like any send's call, so a full or read-only Redis counts as down too,
    /// and one slower than the store timeout does not flap up and down.
    async fn try_write(&self) -> Result<(), String> {
        let mut conn = self.conn.clone();
        let fail = |err: ::redis::RedisError| self.scrub(err.to_string());
        let ping = ::redis::cmd("PING");
        tokio::time::timeout(CONNECT_TIMEOUT, ping.query_async::<()>(&mut conn))
            .await
            .map_err(|_| format!("could not connect within {CONNECT_TIMEOUT:?}"))?
            .map_err(fail)?;
        // Written and deleted at once (MULTI): nothing is left to count or expire.
        let mut write = ::redis::pipe();
        write
            .atomic()
            .cmd("SET")
            .arg(PROBE_KEY)
            .arg(1)
            .ignore()
            .cmd("DEL")
            .arg(PROBE_KEY)
            .ignore();
        self.bounded(write.query_async::<()>(&mut conn)).await
    }
}

/// The process's one pub/sub connection: hands every published answer to the waiters
/// of its fingerprint. Reconnects by itself; after each (re)connect every waiter looks
/// again, since what was published meanwhile is lost.
pub(super) async fn listen(shared: Arc<Shared>, client: Client, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let connect = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(CHANNEL).await?;
            Ok::<_, ::redis::RedisError>(pubsub)
        };
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            connected = tokio::time::timeout(CONNECT_TIMEOUT, connect) => connected,
        };
        let pubsub = match connected {
            Ok(Ok(pubsub)) => Some(pubsub),
            Ok(Err(err)) => {
                let error = shared.scrub(err.to_string());
                tracing::debug!(error, "answer store: no pub/sub; waiters poll meanwhile");
                None
            }
            Err(_) => {
                tracing::debug!(
                    "answer store: no pub/sub within {CONNECT_TIMEOUT:?}; waiters poll meanwhile"
                );
                None
            }
        };
        if let Some(pubsub) = pubsub {
            backoff = Duration::from_millis(100);
            shared.waiters.wake_all();
            let mut messages = pubsub.into_on_message();
            loop {
                let message = tokio::select! {
                    _ = stop.cancelled() => return,
                    message = messages.next() => message,
                };
                let Some(message) = message else { break };
                let payload = message.get_payload_bytes();
                if payload.len() < 32 {
                    continue;
                }
                let (fp, rest) = payload.split_at(32);
                let mut bytes = [0u8; 32];
                bytes.copy_from_slice(fp);
                shared.waiters.deliver_with(&Fingerprint(bytes), || {
                    record::decode(rest).map(|(_, answer)| Arc::new(answer))
                });
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
