//! Backoff and the retry budget: pure policy, no I/O, tested with paused time.
//!
//! Backoff is exponential with *full jitter*: the n-th delay is uniform in
//! `[0, min(cap, base * 2^(n-1))]`, so many bots failing together do not retry in step.
//! The budget bounds retries proxy-wide to a fraction of first attempts (plus a floor
//! per second), so an outage at LINE does not turn every request into `max_attempts`.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("backoff base {base:?} must not exceed its cap {cap:?}")]
pub(crate) struct InvalidBackoff {
    base: Duration,
    cap: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExponentialBackoff {
    base: Duration,
    cap: Duration,
}

impl ExponentialBackoff {
    pub(crate) fn try_new(base: Duration, cap: Duration) -> Result<Self, InvalidBackoff> {
        if base > cap {
            return Err(InvalidBackoff { base, cap });
        }
        Ok(ExponentialBackoff { base, cap })
    }

    pub(crate) fn base(&self) -> Duration {
        self.base
    }

    pub(crate) fn cap(&self) -> Duration {
        self.cap
    }

    /// The ceiling of the delay before retry number `retry` (1 = first retry).
    pub(crate) fn ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32
            .checked_shl(retry.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A delay drawn uniformly from `[0, ceiling(retry)]`.
    pub(crate) fn delay(&self, retry: u32, rng: &mut fastrand::Rng) -> Duration {
        let ceiling = self.ceiling(retry).as_nanos().min(u64::MAX as u128) as u64;
        Duration::from_nanos(rng.u64(0..=ceiling))
    }
}

/// Millitokens, so that a ratio like 0.2 per request adds up without floats or locks.
const MILLI: i64 = 1000;

/// A lock-free token bucket: each first attempt deposits `ratio` tokens, time adds
/// `min_per_second`, each retry withdraws one. The balance is capped at ten seconds'
/// worth so that a quiet hour does not bank an unbounded storm.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    deposit: i64,
    per_second: i64,
    cap: i64,
    balance: AtomicI64,
    epoch: Instant,
    /// Milliseconds since `epoch` up to which time refills have been credited.
    refilled_to: AtomicU64,
}

impl RetryBudget {
    pub(crate) fn new(ratio: f64, min_per_second: u32) -> Self {
        let deposit = (ratio * MILLI as f64).round() as i64;
        let per_second = i64::from(min_per_second) * MILLI;
        let cap = (per_second * 10).max(deposit * 100).max(MILLI);
        RetryBudget {
            deposit,
            per_second,
            cap,
            balance: AtomicI64::new(cap.min(per_second.max(MILLI))),
            epoch: Instant::now(),
            refilled_to: AtomicU64::new(0),
        }
    }

    /// Called once per request that reaches the upstream.
    pub(crate) fn deposit(&self) {
        self.add(self.deposit);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub(crate) fn try_withdraw(&self) -> bool {
        self.refill(Instant::now());
        self.balance
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (b >= MILLI).then_some(b - MILLI)
            })
            .is_ok()
    }

    fn refill(&self, now: Instant) {
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        // Each caller claims the interval it swapped out, so no interval is credited twice.
        let previous = self.refilled_to.fetch_max(now_ms, Ordering::AcqRel);
        if now_ms > previous {
            let earned = (now_ms - previous) as i64 * self.per_second / 1000;
            self.add(earned);
        }
    }

    fn add(&self, amount: i64) {
        if amount > 0 {
            let _ = self
                .balance
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                    Some((b + amount).min(self.cap))
                });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn base_above_cap_is_refused() {
        assert!(
            ExponentialBackoff::try_new(Duration::from_secs(2), Duration::from_secs(1)).is_err()
        );
    }

    #[test]
    fn ceilings_double_then_cap() {
        let b = ExponentialBackoff::try_new(Duration::from_millis(100), Duration::from_millis(700))
            .unwrap();
        let ceilings: Vec<_> = (1..=5).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 700, 700]);
        assert_eq!(b.ceiling(200), Duration::from_millis(700));
    }

    proptest! {
        #[test]
        fn delay_stays_within_its_ceiling(base in 0u64..10_000, extra in 0u64..100_000, retry in 0u32..64, seed: u64) {
            let b = ExponentialBackoff::try_new(Duration::from_millis(base), Duration::from_millis(base + extra)).unwrap();
            let mut rng = fastrand::Rng::with_seed(seed);
            let d = b.delay(retry, &mut rng);
            prop_assert!(d <= b.ceiling(retry));
            prop_assert!(d <= Duration::from_millis(base + extra));
        }
    }

    #[test]
    fn jitter_spreads_delays() {
        let b =
            ExponentialBackoff::try_new(Duration::from_secs(1), Duration::from_secs(1)).unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        let delays: std::collections::HashSet<_> = (0..50).map(|_| b.delay(1, &mut rng)).collect();
        assert!(
            delays.len() > 40,
            "full jitter should rarely repeat a delay"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn budget_runs_out_and_refills_with_time() {
        let budget = RetryBudget::new(0.0, 2);
        // Starts with one second's floor, then nothing until time passes.
        assert!(budget.try_withdraw());
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn budget_grows_with_traffic_but_is_capped() {
        let budget = RetryBudget::new(0.5, 0);
        assert!(budget.try_withdraw(), "a fresh budget allows one retry");
        assert!(!budget.try_withdraw());
        for _ in 0..4 {
            budget.deposit();
        }
        assert!(budget.try_withdraw());
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw());
        for _ in 0..1_000_000 {
            budget.deposit();
        }
        let mut granted = 0;
        while budget.try_withdraw() {
            granted += 1;
        }
        assert_eq!(granted, 50, "the balance is capped at 100 deposits' worth");
    }
}
