//! The demo's output: what was run, the two runs side by side, and the conclusion.

use std::fmt::Write as _;

use super::fake_line::{Tally, FAULT_RATES};
use super::{Report, TIME_SCALE};

impl Report {
    /// Every message delivered exactly once through the proxy.
    pub(crate) fn proxied_is_exact(&self) -> bool {
        self.proxied.duplicates == 0 && self.proxied.lost == 0
    }

    pub(crate) fn render(&self) -> String {
        let mut o = String::new();
        let b = &self.behaviour;
        let rates: Vec<String> = FAULT_RATES
            .iter()
            .map(|(f, p)| format!("{}% {}", (p * 100.0).round(), f.name()))
            .collect();
        let total: f64 = FAULT_RATES.iter().map(|(_, p)| p).sum();
        let _ = writeln!(
            o,
            "A bot pushes {} messages, {} at a time. On a 5xx, a timeout or a broken connection it\n\
             sends the same request again, up to {} more times, with no retry key.\n\
             LINE is a fake on 127.0.0.1 that fails {}% of requests, the same ones in both runs (seed {}):\n\
             {}.\n\
             Timings are the real ones divided by {TIME_SCALE}: the bot's timeout is {} (a legacy SDK's 5s).\n\
             The proxy runs with its defaults scaled alike ({}) \
             and a retry budget raised for a LINE this unreliable.\n",
            self.sends,
            b.workers,
            b.tries.saturating_sub(1),
            (total * 100.0).round(),
            self.seed,
            rates.join(", "),
            humantime::format_duration(b.timeout),
            self.proxied
                .proxy
                .as_ref()
                .map_or("", |p| p.settings.as_str()),
        );
        let (bare, prox) = (&self.bare, &self.proxied);
        let mut row = |label: &str, left: String, right: String| {
            let _ = writeln!(o, "{label:<40}{left:>12}{right:>22}");
        };
        let n = |v: usize| v.to_string();
        row("", "bot -> LINE".into(), "bot -> proxy -> LINE".into());
        row("messages to send", n(self.sends), n(self.sends));
        row(
            "requests sent by the bot",
            n(bare.bot.attempts),
            n(prox.bot.attempts),
        );
        row(
            "  answered 5xx",
            n(bare.bot.errors_5xx),
            n(prox.bot.errors_5xx),
        );
        row("  timed out", n(bare.bot.timeouts), n(prox.bot.timeouts));
        row(
            "  connection broken",
            n(bare.bot.broken),
            n(prox.bot.broken),
        );
        row(
            "messages the bot gave up on",
            n(bare.bot.gave_up.len()),
            n(prox.bot.gave_up.len()),
        );
        row(
            "  delivered all the same",
            n(bare.gave_up_delivered),
            n(prox.gave_up_delivered),
        );
        row(
            "requests that reached LINE",
            n(bare.line.requests),
            n(prox.line.requests),
        );
        let failed = |t: &Tally| t.faults.values().sum::<usize>();
        row(
            "  failed by the fake LINE",
            n(failed(&bare.line)),
            n(failed(&prox.line)),
        );
        row(
            "  refused: key already accepted (409)",
            n(bare.line.conflicts),
            n(prox.line.conflicts),
        );
        row(
            "deliveries",
            n(bare.line.total_deliveries()),
            n(prox.line.total_deliveries()),
        );
        row("messages delivered", n(bare.delivered), n(prox.delivered));
        row(
            "duplicate deliveries",
            n(bare.duplicates),
            n(prox.duplicates),
        );
        row("lost messages", n(bare.lost), n(prox.lost));
        if let Some(proxy) = &prox.proxy {
            for (outcome, count) in &proxy.outcomes {
                let label = format!(
                    "proxy answers: {}",
                    outcome.header_value().to_str().unwrap_or("?")
                );
                row(&label, "-".into(), count.to_string());
            }
            row("proxy retries", "-".into(), proxy.retries.to_string());
        }
        let _ = writeln!(o);
        let dup_messages = bare.line.deliveries.values().filter(|&&d| d > 1).count();
        let _ = writeln!(
            o,
            "Without the proxy, {} of {} messages reached their user more than once ({} extra deliveries){}{}.",
            dup_messages,
            self.sends,
            bare.duplicates,
            if bare.lost > 0 {
                format!(", {} never did", bare.lost)
            } else {
                String::new()
            },
            if bare.gave_up_delivered > 0 {
                let n = bare.gave_up_delivered;
                let noun = if n == 1 { "message" } else { "messages" };
                format!(".\nThe bot also gave up on {n} {noun} that LINE had in fact delivered")
            } else {
                String::new()
            },
        );
        if self.proxied_is_exact() {
            let _ = writeln!(
                o,
                "Through the proxy, every message was delivered exactly once: 0 duplicates, 0 lost."
            );
        } else {
            let _ = writeln!(
                o,
                "Through the proxy: {} duplicate deliveries and {} lost messages. That is a defect.",
                prox.duplicates, prox.lost
            );
        }
        o
    }
}
