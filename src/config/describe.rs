//! `check-config`'s view of a [`Config`]: the effective settings, secrets masked.

use std::path::Path;
use std::time::Duration;

use super::{Config, LogFormat};
use crate::domain::Endpoint;

impl Config {
    /// The effective settings, one `key = value` a line, secrets masked.
    pub fn describe(&self) -> String {
        let d = |d: Duration| format!("{:?}", humantime::format_duration(d).to_string());
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
        line(
            "intercept-hosts",
            format!("{:?}", self.policy.intercept_hosts),
        );
        line("tunnel-allow", format!("{:?}", self.policy.tunnel_allow));
        line(
            "proxy-auth",
            if self.proxy_auth.is_some() {
                "\"***\""
            } else {
                "\"\""
            }
            .into(),
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
