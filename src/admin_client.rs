//! Talks to a running proxy's admin listener, for the `healthcheck` and `stats`
//! subcommands: the container needs no curl, and an operator needs no Grafana.
//! Blocking std I/O on purpose: one short request, no runtime needed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::domain::{Endpoint, Outcome};

#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error("cannot reach the admin listener at {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the admin listener at {addr} answered: {status_line}")]
    Status {
        addr: SocketAddr,
        status_line: String,
    },
    #[error("the admin listener at {addr} sent a malformed answer")]
    Malformed { addr: SocketAddr },
}

/// A listener bound to all interfaces is reached through loopback.
pub(crate) fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        other => other,
    }
}

/// GET `path` and return the body of a 200 answer.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, AdminClientError> {
    let addr = reachable(addr);
    let io = |source| AdminClientError::Io { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(io)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or(AdminClientError::Malformed { addr })?;
    let status_line = head.lines().next().unwrap_or_default().to_owned();
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(AdminClientError::Status { addr, status_line });
    }
    Ok(body.to_owned())
}

/// One sample of the Prometheus text: name, labels, value.
struct Sample<'a> {
    name: &'a str,
    labels: BTreeMap<&'a str, &'a str>,
    value: f64,
}

fn parse(text: &str) -> Vec<Sample<'_>> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k, v.trim_matches('"')))
                .collect();
            Some(Sample {
                name,
                labels,
                value,
            })
        })
        .collect()
}

/// A human table of what matters from `/metrics`.
pub fn stats_table(metrics: &str) -> String {
    let samples = parse(metrics);
    let value = |name: &str| {
        samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum::<f64>()
    };
    let mut out = String::new();

    let outcomes = Outcome::ALL.map(Outcome::label);
    let _ = writeln!(
        out,
        "{:<11}{}",
        "endpoint",
        outcomes.map(|o| format!(" {o:>17}")).join("")
    );
    let endpoints = Endpoint::ALL.map(Endpoint::name);
    for endpoint in endpoints.into_iter().chain(["other"]) {
        let row: String = outcomes
            .iter()
            .map(|o| {
                let n: f64 = samples
                    .iter()
                    .filter(|s| s.name == "line_retry_proxy_requests_total")
                    .filter(|s| {
                        s.labels.get("endpoint") == Some(&endpoint)
                            && s.labels.get("outcome") == Some(o)
                    })
                    .map(|s| s.value)
                    .sum();
                format!(" {n:>17}")
            })
            .collect();
        let _ = writeln!(out, "{endpoint:<11}{row}");
    }
    let _ = writeln!(out);
    let lines = [
        (
            "keys injected",
            value("line_retry_proxy_keys_injected_total"),
        ),
        (
            "client keys kept",
            value("line_retry_proxy_client_keys_total"),
        ),
        (
            "stray keys removed",
            value("line_retry_proxy_stray_keys_removed_total"),
        ),
        (
            "upstream attempts",
            value("line_retry_proxy_upstream_attempts_total"),
        ),
        ("retries", value("line_retry_proxy_retries_total")),
        (
            "retry budget exhausted",
            value("line_retry_proxy_retry_budget_exhausted_total"),
        ),
        ("in flight", value("line_retry_proxy_in_flight_requests")),
        ("store up", value("line_retry_proxy_store_up")),
        ("store entries", value("line_retry_proxy_store_entries")),
        ("store bytes", value("line_retry_proxy_store_bytes")),
        ("store errors", value("line_retry_proxy_store_errors_total")),
        (
            "connections open",
            value("line_retry_proxy_connections_open"),
        ),
        ("tunnels open", value("line_retry_proxy_tunnels_open")),
        (
            "TLS handshakes",
            value("line_retry_proxy_tls_handshakes_total"),
        ),
        (
            "TLS handshake failures",
            value("line_retry_proxy_tls_handshake_failures_total"),
        ),
        (
            "CONNECT refused",
            value("line_retry_proxy_connect_refused_total"),
        ),
    ];
    for (label, n) in lines {
        let _ = writeln!(out, "{label:<24} {n}");
    }
    let retries: Vec<String> = samples
        .iter()
        .filter(|s| s.name == "line_retry_proxy_retries_total" && s.value > 0.0)
        .filter_map(|s| s.labels.get("reason").map(|r| format!("{r}={}", s.value)))
        .collect();
    if !retries.is_empty() {
        let _ = writeln!(out, "{:<24} {}", "retries by reason", retries.join(" "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_sums_series_and_reads_labels() {
        let text = "# HELP x y\nline_retry_proxy_requests_total{endpoint=\"push\",outcome=\"replayed\"} 3\n\
                    line_retry_proxy_keys_injected_total{endpoint=\"push\"} 2\n\
                    line_retry_proxy_keys_injected_total{endpoint=\"broadcast\"} 1\n\
                    line_retry_proxy_retries_total{reason=\"timeout\"} 4\n";
        let table = stats_table(text);
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("push") && l.contains(" 3")),
            "{table}"
        );
        assert!(table.contains("keys injected            3"), "{table}");
        assert!(table.contains("timeout=4"), "{table}");
    }

    #[test]
    fn column_headers_stay_apart() {
        let table = stats_table("");
        let header = table.lines().next().unwrap();
        let columns: Vec<_> = header.split_whitespace().collect();
        assert_eq!(
            columns,
            [
                "endpoint",
                "fresh",
                "replayed",
                "coalesced",
                "conflict_resolved",
                "passthrough",
                "error"
            ]
        );
    }

    #[test]
    fn unspecified_addresses_are_reached_through_loopback() {
        assert_eq!(
            reachable("0.0.0.0:9090".parse().unwrap()).to_string(),
            "127.0.0.1:9090"
        );
        assert_eq!(
            reachable("10.1.2.3:9090".parse().unwrap()).to_string(),
            "10.1.2.3:9090"
        );
    }
}
