//! Whether Redis is serving, as this process sees it: connecting until the first
//! probe, then up until a call fails or times out, then down (sends skip Redis at
//! once) until a probe succeeds. One log line per change of state, never one per
//! request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

pub(super) struct Health {
    up: AtomicBool,
    /// Since when, and why, while down.
    outage: Mutex<Option<(Instant, String)>>,
    /// Set once the first probe has settled the state either way.
    tried: watch::Sender<bool>,
    /// Wakes the probe when a send finds the store down, so recovery is not left
    /// to the probe's slow pace while up.
    went_down: Notify,
    /// Where the store is, for the log lines (no credential in it).
    location: String,
}

impl Health {
    /// Not up until the first probe says so: sends skip the store meanwhile.
    pub(super) fn new(location: String) -> Self {
        Health {
            up: AtomicBool::new(false),
            outage: Mutex::new(Some((Instant::now(), "connecting".to_owned()))),
            tried: watch::Sender::new(false),
            went_down: Notify::new(),
            location,
        }
    }

    /// Resolves when the store has gone down since the last call.
    pub(super) async fn went_down(&self) {
        self.went_down.notified().await;
    }

    /// Resolves once the first probe has found the store up or down.
    pub(super) async fn tried(&self) {
        let mut tried = self.tried.subscribe();
        // The sender lives in self.
        let _ = tried.wait_for(|t| *t).await;
    }

    pub(super) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub(super) fn down(&self, reason: &str) {
        let first = !*self.tried.borrow();
        if self.up.swap(false, Ordering::AcqRel) || first {
            *self.outage() = Some((Instant::now(), reason.to_owned()));
            self.went_down.notify_one();
            tracing::warn!(
                store = %self.location,
                reason,
                "answer store unavailable: sending without it, under derived keys (LINE still refuses duplicates)"
            );
        }
        self.tried.send_replace(true);
    }

    pub(super) fn up(&self) {
        let first = !*self.tried.borrow();
        if !self.up.swap(true, Ordering::AcqRel) {
            let since = self.outage().take().map(|(at, _)| at.elapsed());
            if first {
                tracing::info!(store = %self.location, "answer store connected");
            } else {
                // `501ms`, as durations are written in the config, not Rust's debug text.
                let down_for = since.map_or_else(
                    || "unknown".to_owned(),
                    |d| {
                        humantime::format_duration(Duration::from_millis(d.as_millis() as u64))
                            .to_string()
                    },
                );
                tracing::info!(
                    store = %self.location,
                    down_for = %down_for,
                    "answer store available again"
                );
            }
        }
        self.tried.send_replace(true);
    }

    /// Why sends go without the store now, for their error.
    pub(super) fn reason(&self) -> String {
        self.outage()
            .as_ref()
            .map_or_else(|| "down".to_owned(), |(_, why)| why.clone())
    }

    /// The `/readyz` line.
    pub(super) fn status_line(&self) -> String {
        match self.outage().as_ref() {
            Some((since, why)) if !self.is_up() => format!(
                "store: redis {} DOWN for {}s ({why}); sending under derived keys without it, LINE still refuses duplicates",
                self.location,
                since.elapsed().as_secs()
            ),
            _ => format!("store: redis {} up", self.location),
        }
    }

    fn outage(&self) -> std::sync::MutexGuard<'_, Option<(Instant, String)>> {
        crate::sync::lock(&self.outage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_state_once_per_transition() {
        let h = Health::new("redis://127.0.0.1:6379/0".into());
        assert!(!h.is_up(), "not before the first probe");
        assert!(
            h.status_line().contains("connecting"),
            "{}",
            h.status_line()
        );
        h.up();
        assert!(h.is_up());
        assert!(h.status_line().ends_with(" up"));
        h.down("connection refused");
        h.down("timed out");
        assert!(!h.is_up());
        assert_eq!(h.reason(), "connection refused", "the first cause is kept");
        assert!(h.status_line().contains("DOWN"), "{}", h.status_line());
        h.up();
        assert!(h.is_up());
        assert!(h.status_line().ends_with(" up"));
    }
}
