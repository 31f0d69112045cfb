//! What the mock LINE can be told to do wrong: scripted faults, one per keyed request
//! in order, and a seeded random mix for requests with nothing scripted.

use std::time::Duration;

#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer this status with a LINE-style body; nothing delivered.
    Status(u16),
    /// Accept and deliver (consuming the key), then answer this status instead.
    AcceptThenStatus(u16),
    /// Never answer; nothing delivered.
    Hang,
    /// Accept and deliver, then never answer.
    AcceptThenHang,
    /// Drop the whole connection unanswered, as a RST; nothing delivered.
    Reset,
    RateLimited {
        retry_after: Option<u64>,
    },
    MonthlyLimit,
    /// Wait, then behave normally.
    Delay(Duration),
    /// Accept and deliver, then drop the whole connection unanswered, as a RST.
    AcceptThenReset,
    /// Wait until `n` requests in all (this one included) have arrived, then behave
    /// normally: a barrier that holds the first ones until the rest are there.
    HoldUntil(usize),
}

impl Fault {
    /// A short stable name, for counts and summaries.
    pub fn name(&self) -> &'static str {
        match self {
            Fault::Status(_) => "status",
            Fault::AcceptThenStatus(_) => "accept_then_status",
            Fault::Hang => "hang",
            Fault::AcceptThenHang => "accept_then_hang",
            Fault::Reset => "reset",
            Fault::RateLimited { .. } => "rate_limited",
            Fault::MonthlyLimit => "monthly_limit",
            Fault::Delay(_) => "delay",
            Fault::AcceptThenReset => "accept_then_reset",
            Fault::HoldUntil(_) => "hold_until",
        }
    }
}

/// Random faults for keyed requests that have nothing scripted: each probability is
/// that of one fault, the rest is normal behaviour. Seeded, so a run can be repeated
/// (as far as the order of arrivals allows).
#[derive(Clone, Debug, Default)]
pub struct Chaos {
    pub seed: u64,
    /// 500, nothing delivered.
    pub status_500: f64,
    /// Delivered, then 500.
    pub accept_then_500: f64,
    /// Never answered, nothing delivered.
    pub hang: f64,
    /// Delivered, never answered.
    pub accept_then_hang: f64,
    /// The connection reset, nothing delivered.
    pub reset: f64,
    /// Delivered, then the connection reset.
    pub accept_then_reset: f64,
    /// A delay up to `max_delay`, then normal behaviour.
    pub delay: f64,
    pub max_delay: Duration,
}

impl Chaos {
    /// The fault for one request, or `None` for normal behaviour.
    pub(super) fn draw(&self, rng: &mut fastrand::Rng) -> Option<Fault> {
        let mut roll = rng.f64();
        let table = [
            (self.status_500, Fault::Status(500)),
            (self.accept_then_500, Fault::AcceptThenStatus(500)),
            (self.hang, Fault::Hang),
            (self.accept_then_hang, Fault::AcceptThenHang),
            (self.reset, Fault::Reset),
            (self.accept_then_reset, Fault::AcceptThenReset),
        ];
        for (p, fault) in table {
            if roll < p {
                return Some(fault);
            }
            roll -= p;
        }
        if roll < self.delay {
            let max = self.max_delay.as_millis().max(1) as u64;
            return Some(Fault::Delay(Duration::from_millis(rng.u64(0..=max))));
        }
        None
    }
}
