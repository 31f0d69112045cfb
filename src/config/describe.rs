//! `check-config`'s view of a [`Config`]: the effective settings as a config file
//! that loads to the same settings, secrets [`MASKED`] (which the loader refuses).

use std::path::Path;
use std::time::Duration;

use super::{Config, LogFormat, MASKED, ONE_YEAR};
use crate::domain::Endpoint;

/// A duration in the largest unit that states it exactly, as people write them in
/// the file: `24h`, `45s`, `1500ms`, `1year`.
pub(super) fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !d.subsec_nanos().is_multiple_of(1_000_000) || ms == 0 {
        return humantime::format_duration(d).to_string();
    }
    let year = ONE_YEAR.as_millis();
    if ms.is_multiple_of(year) {
        let n = ms / year;
        return format!("{n}{}", if n == 1 { "year" } else { "years" });
    }
    for (unit, size) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

impl Config {
    /// The effective settings, one `key = value` a line, secrets masked.
    pub fn describe(&self) -> String {
        let d = |d: Duration| format!("{:?}", duration(d));
        let r = &self.policy.retry;
        let mut out = String::new();
        let mut line = |k: &str, v: String| out.push_str(&format!("{k} = {v}\n"));
        line("listen", format!("{:?}", self.listen.to_string()));
        line(
            "admin-listen",
            format!("{:?}", self.admin_listen.to_string()),
        );
        line("upstream", format!("{:?}", self.upstream.to_string()));
        line(
            "upstream-ca",
            format!(
                "{:?}",
                self.upstream_ca
                    .as_deref()
                    .map(Path::display)
                    .map(|p| p.to_string())
                    .unwrap_or_default()
            ),
        );
        line("upstream-proxy", self.upstream_proxy.describe());
        line("ca-dir", format!("{:?}", self.ca_dir.display().to_string()));
        line("store", format!("{:?}", self.store.to_string()));
        line("store-timeout", d(self.store_timeout));
        line(
            "store-ca",
            format!(
                "{:?}",
                self.store_ca
                    .as_deref()
                    .map(Path::display)
                    .map(|p| p.to_string())
                    .unwrap_or_default()
            ),
        );
        line("attempt-timeout", d(r.attempt_timeout));
        line("max-attempts", r.max_attempts.to_string());
        line("retry-base-delay", d(r.backoff.base()));
        line("retry-max-delay", d(r.backoff.cap()));
        line("request-deadline", d(r.deadline));
        line("retry-on-429", r.retry_on_429.to_string());
        line("retry-budget-ratio", r.budget_ratio.to_string());
        line(
            "retry-budget-min-per-second",
            r.budget_min_per_second.to_string(),
        );
        line(
            "log-format",
            if self.log_format == LogFormat::Json {
                "\"json\""
            } else {
                "\"text\""
            }
            .into(),
        );
        line("body-limit", self.body_limit.to_string());
        line("store-max-bytes", self.store_max_bytes.to_string());
        line("canonical-json", self.canonical_json.to_string());
        line("key-scope", format!("{:?}", self.key_scope.name()));
        line(
            "intercept-hosts",
            format!("{:?}", self.policy.intercept_hosts),
        );
        line("tunnel-allow", format!("{:?}", self.policy.tunnel_allow));
        line(
            "proxy-auth",
            if self.proxy_auth.is_some() {
                format!("{MASKED:?}")
            } else {
                "\"\"".into()
            },
        );
        line("max-connections", self.max_connections.to_string());
        line("header-timeout", d(self.header_timeout));
        line("idle-timeout", d(self.idle_timeout));
        line("body-timeout", d(self.body_timeout));
        line("buffer-limit", self.buffer_limit.to_string());
        line(
            "admin-max-connections",
            self.admin_max_connections.to_string(),
        );
        line("handshake-timeout", d(self.handshake_timeout));
        line("shutdown-grace", d(self.shutdown_grace));
        line("leaf-lifetime", d(self.leaf_lifetime));
        line("ca-lifetime", d(self.ca_lifetime));
        for endpoint in Endpoint::ALL {
            let p = self.policy.endpoint(endpoint);
            out.push_str(&format!(
                "\n[endpoints.{}]\ndedup-window = {}\nretry = {}\n",
                endpoint.name(),
                d(p.dedup_window),
                p.retry
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_the_units_people_write() {
        let cases = [
            (Duration::from_secs(86_400), "24h"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_millis(50), "50ms"),
            (ONE_YEAR, "1year"),
            (ONE_YEAR * 2, "2years"),
        ];
        for (d, text) in cases {
            assert_eq!(duration(d), text);
            assert_eq!(
                humantime::parse_duration(text).unwrap(),
                d,
                "{text} reads back"
            );
        }
        let odd = Duration::from_nanos(1_500);
        assert_eq!(humantime::parse_duration(&duration(odd)).unwrap(), odd);
        assert_eq!(duration(Duration::ZERO), "0s");
    }
}
