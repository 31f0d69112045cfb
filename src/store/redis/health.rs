//! Whether Redis is serving, as this process sees it: up until a call fails or times
//! out, then down (sends skip Redis at once) until a probe succeeds. One log line per
//! change of state, never one per request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub(super) struct Health {
    up: AtomicBool,
    /// Since when, and why, while down.
    outage: Mutex<Option<(Instant, String)>>,
    /// Where the store is, for the log lines (no credential in it).
    location: String,
}

impl Health {
    pub(super) fn new(location: String) -> Self {
        Health {
            up: AtomicBool::new(true),
            outage: Mutex::new(None),
            location,
        }
    }

    pub(super) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub(super) fn down(&self, reason: &str) {
        if self.up.swap(false, Ordering::AcqRel) {
            *self.outage() = Some((Instant::now(), reason.to_owned()));
            tracing::warn!(
                store = %self.location,
                reason,
                "answer store unavailable: sending without it, under derived keys (LINE still refuses duplicates)"
            );
        }
    }

    pub(super) fn up(&self) {
        if !self.up.swap(true, Ordering::AcqRel) {
            let since = self.outage().take().map(|(at, _)| at.elapsed());
            tracing::info!(
                store = %self.location,
                down_for = ?since.map(|d| Duration::from_millis(d.as_millis() as u64)),
                "answer store available again"
            );
        }
    }

    /// Why sends go without the store now, for their error.
    pub(super) fn reason(&self) -> String {
        self.outage()
            .as_ref()
            .map_or_else(|| "down".to_owned(), |(_, why)| why.clone())
    }

    /// The `/readyz` line.
    pub(super) fn describe(&self) -> String {
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
        // Nothing panics while holding it; a poisoned value is still whole.
        self.outage
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_state_once_per_transition() {
        let h = Health::new("redis://127.0.0.1:6379/0".into());
        assert!(h.is_up());
        assert!(h.describe().ends_with(" up"));
        h.down("connection refused");
        h.down("timed out");
        assert!(!h.is_up());
        assert_eq!(h.reason(), "connection refused", "the first cause is kept");
        assert!(h.describe().contains("DOWN"), "{}", h.describe());
        h.up();
        assert!(h.is_up());
        assert!(h.describe().ends_with(" up"));
    }
}
