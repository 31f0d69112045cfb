//! Prometheus metrics: plain atomics indexed by small enums, so the hot path never
//! takes a lock or hashes a label set. Rendered to the text format on scrape.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use crate::domain::{AttemptFailure, Endpoint, Outcome, StoreStats};

/// Series per endpoint: the four keyed endpoints, then everything else.
const ENDPOINT_SLOTS: usize = Endpoint::ALL.len() + 1;
const OTHER: usize = Endpoint::ALL.len();

/// The `endpoint` label of slot `i`, from the enum itself so the two cannot drift.
fn endpoint_label(i: usize) -> &'static str {
    Endpoint::ALL.get(i).map_or("other", |e| e.name())
}
const BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

fn endpoint_index(endpoint: Option<Endpoint>) -> usize {
    endpoint.map_or(OTHER, Endpoint::index)
}

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        // `le` joins the other labels; a histogram without any has braces for it alone.
        let (le, plain) = if labels.is_empty() {
            (String::new(), String::new())
        } else {
            (format!("{labels},"), format!("{{{labels}}}"))
        };
        let mut cumulative = 0;
        for (bound, count) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += count.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{le}le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{le}le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum{plain} {}",
            self.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{plain} {count}");
    }
}

/// A bound the proxy holds clients to: each one counted when it bites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// A connection sent no whole request head within `header-timeout` of accept.
    HeaderTimeout,
    /// A connection had no request in flight for `idle-timeout`.
    IdleTimeout,
    /// A body arrived too slowly (`body-timeout`), or a streamed body paused too long.
    BodyTimeout,
    /// A keyed request found no room under `buffer-limit` in time.
    BufferBytes,
    /// The proxy port was full (`max-connections`).
    MaxConnections,
    /// The admin port was full (`admin-max-connections`).
    AdminMaxConnections,
}

impl Limit {
    pub(crate) const ALL: [Limit; 6] = [
        Limit::HeaderTimeout,
        Limit::IdleTimeout,
        Limit::BodyTimeout,
        Limit::BufferBytes,
        Limit::MaxConnections,
        Limit::AdminMaxConnections,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Limit::HeaderTimeout => "header_timeout",
            Limit::IdleTimeout => "idle_timeout",
            Limit::BodyTimeout => "body_timeout",
            Limit::BufferBytes => "buffer_limit",
            Limit::MaxConnections => "max_connections",
            Limit::AdminMaxConnections => "admin_max_connections",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How a keyed send learned the channel of its token (or, for `issued`, how a token
/// seen issued through the proxy was placed in its channel without a send).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChannelSource {
    /// This process had it cached.
    Cache,
    /// The shared store's directory had it (another replica, or an earlier run).
    Store,
    /// A token issued through the proxy, for a channel whose bot was already known.
    Issued,
    /// Asked of LINE: `GET /v2/bot/info`.
    BotInfo,
    /// LINE refused the token: forwarded as it is, under its own scope.
    Rejected,
    /// LINE could not be asked in time: the send was answered 503 and not sent.
    Failed,
}

impl ChannelSource {
    pub(crate) const ALL: [ChannelSource; 6] = [
        ChannelSource::Cache,
        ChannelSource::Store,
        ChannelSource::Issued,
        ChannelSource::BotInfo,
        ChannelSource::Rejected,
        ChannelSource::Failed,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            ChannelSource::Cache => "cache",
            ChannelSource::Store => "store",
            ChannelSource::Issued => "issued",
            ChannelSource::BotInfo => "bot_info",
            ChannelSource::Rejected => "rejected",
            ChannelSource::Failed => "failed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Every counter the proxy keeps. One instance per running proxy, no globals.
#[derive(Default)]
pub struct Metrics {
    requests: [[AtomicU64; Outcome::ALL.len()]; ENDPOINT_SLOTS],
    upstream_attempts: [AtomicU64; ENDPOINT_SLOTS],
    retries: [AtomicU64; AttemptFailure::ALL.len()],
    retry_budget_exhausted: AtomicU64,
    keys_injected: [AtomicU64; Endpoint::ALL.len()],
    client_keys: [AtomicU64; Endpoint::ALL.len()],
    stray_keys_removed: AtomicU64,
    upstream_latency: [Histogram; ENDPOINT_SLOTS],
    store_errors: AtomicU64,
    in_flight: AtomicI64,
    connections_open: AtomicI64,
    connections_total: AtomicU64,
    tls_handshakes: AtomicU64,
    tls_handshake_failures: AtomicU64,
    tunnels_open: AtomicI64,
    tunnels_total: AtomicU64,
    connect_refused: AtomicU64,
    limits_hit: [AtomicU64; Limit::ALL.len()],
    buffered_bytes: AtomicI64,
    channels: [AtomicU64; ChannelSource::ALL.len()],
    channel_lookup_latency: Histogram,
}

/// One request in flight, shared by its handler and any work it left behind.
#[derive(Clone)]
pub(crate) struct InFlight(#[allow(dead_code)] Arc<InFlightCount>);

struct InFlightCount(Arc<Metrics>);

impl Drop for InFlightCount {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// Decrements its gauge when dropped, so an early return or a panic cannot leak a count.
pub(crate) struct GaugeGuard<'a>(&'a AtomicI64);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Metrics {
    pub(crate) fn request(&self, endpoint: Option<Endpoint>, outcome: Outcome) {
        self.requests[endpoint_index(endpoint)][outcome.index()].fetch_add(1, Relaxed);
    }

    pub(crate) fn attempt(&self, endpoint: Option<Endpoint>, latency: Duration) {
        let i = endpoint_index(endpoint);
        self.upstream_attempts[i].fetch_add(1, Relaxed);
        self.upstream_latency[i].observe(latency);
    }

    pub(crate) fn retry(&self, reason: AttemptFailure) {
        self.retries[reason.index()].fetch_add(1, Relaxed);
    }

    pub(crate) fn retry_budget_exhausted(&self) {
        self.retry_budget_exhausted.fetch_add(1, Relaxed);
    }

    pub(crate) fn key_injected(&self, endpoint: Endpoint) {
        self.keys_injected[endpoint.index()].fetch_add(1, Relaxed);
    }

    pub(crate) fn client_key(&self, endpoint: Endpoint) {
        self.client_keys[endpoint.index()].fetch_add(1, Relaxed);
    }

    pub(crate) fn stray_key_removed(&self) {
        self.stray_keys_removed.fetch_add(1, Relaxed);
    }

    pub(crate) fn store_error(&self) {
        self.store_errors.fetch_add(1, Relaxed);
    }

    pub(crate) fn channel(&self, source: ChannelSource) {
        self.channels[source.index()].fetch_add(1, Relaxed);
    }

    /// One `GET /v2/bot/info` attempt, answered or not.
    pub(crate) fn channel_lookup(&self, latency: Duration) {
        self.channel_lookup_latency.observe(latency);
    }

    pub(crate) fn tls_handshake(&self, ok: bool) {
        self.tls_handshakes.fetch_add(1, Relaxed);
        if !ok {
            self.tls_handshake_failures.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn limit_hit(&self, limit: Limit) {
        self.limits_hit[limit.index()].fetch_add(1, Relaxed);
    }

    /// Request bytes buffered now, proxy-wide: `delta` added or (negative) released.
    pub(crate) fn buffered(&self, delta: i64) {
        self.buffered_bytes.fetch_add(delta, Relaxed);
    }

    /// A share of the in-flight gauge that can outlive the request's handler: the
    /// request counts once, until its last share (handler or detached upstream work)
    /// is dropped.
    pub(crate) fn in_flight_shared(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Relaxed);
        InFlight(Arc::new(InFlightCount(self.clone())))
    }

    pub(crate) fn connect_refused(&self) {
        self.connect_refused.fetch_add(1, Relaxed);
    }

    fn gauge<'a>(&'a self, gauge: &'a AtomicI64) -> GaugeGuard<'a> {
        gauge.fetch_add(1, Relaxed);
        GaugeGuard(gauge)
    }

    pub(crate) fn connection(&self) -> GaugeGuard<'_> {
        self.connections_total.fetch_add(1, Relaxed);
        self.gauge(&self.connections_open)
    }

    pub(crate) fn tunnel(&self) -> GaugeGuard<'_> {
        self.tunnels_total.fetch_add(1, Relaxed);
        self.gauge(&self.tunnels_open)
    }

    pub(crate) fn in_flight_now(&self) -> i64 {
        self.in_flight.load(Relaxed)
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub(crate) fn render(&self, store: StoreStats, leaf_certificates: u64) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let o = &mut out;

        header(
            o,
            "line_retry_proxy_requests_total",
            "counter",
            "Requests answered, by endpoint and outcome.",
        );
        for (i, row) in self.requests.iter().enumerate() {
            let e = endpoint_label(i);
            for (outcome, n) in Outcome::ALL.iter().zip(row) {
                let _ = writeln!(
                    o,
                    "line_retry_proxy_requests_total{{endpoint=\"{e}\",outcome=\"{}\"}} {}",
                    outcome.label(),
                    n.load(Relaxed)
                );
            }
        }
        header(
            o,
            "line_retry_proxy_upstream_attempts_total",
            "counter",
            "Requests sent to the upstream, retries included.",
        );
        per_endpoint(
            o,
            "line_retry_proxy_upstream_attempts_total",
            &self.upstream_attempts,
        );
        header(
            o,
            "line_retry_proxy_retries_total",
            "counter",
            "Upstream attempts repeated, by the reason the previous one failed.",
        );
        for (reason, n) in AttemptFailure::ALL.iter().zip(&self.retries) {
            let _ = writeln!(
                o,
                "line_retry_proxy_retries_total{{reason=\"{}\"}} {}",
                reason.label(),
                n.load(Relaxed)
            );
        }
        counter(
            o,
            "line_retry_proxy_retry_budget_exhausted_total",
            "Retries not made because the proxy-wide retry budget was spent.",
            &self.retry_budget_exhausted,
        );
        header(
            o,
            "line_retry_proxy_keys_injected_total",
            "counter",
            "Requests sent with a retry key derived by the proxy.",
        );
        per_endpoint(
            o,
            "line_retry_proxy_keys_injected_total",
            &self.keys_injected,
        );
        header(
            o,
            "line_retry_proxy_client_keys_total",
            "counter",
            "Requests that brought their own retry key, forwarded unchanged.",
        );
        per_endpoint(o, "line_retry_proxy_client_keys_total", &self.client_keys);
        counter(
            o,
            "line_retry_proxy_stray_keys_removed_total",
            "Retry keys removed from endpoints that reject them.",
            &self.stray_keys_removed,
        );
        header(
            o,
            "line_retry_proxy_upstream_latency_seconds",
            "histogram",
            "Time of one upstream attempt until its answer head (keyed: whole answer).",
        );
        for (i, h) in self.upstream_latency.iter().enumerate() {
            let e = endpoint_label(i);
            h.render(
                o,
                "line_retry_proxy_upstream_latency_seconds",
                &format!("endpoint=\"{e}\""),
            );
        }
        header(
            o,
            "line_retry_proxy_channel_lookups_total",
            "counter",
            "How keyed sends learned their token's channel (issued: tokens placed at issuance).",
        );
        for (source, n) in ChannelSource::ALL.iter().zip(&self.channels) {
            let _ = writeln!(
                o,
                "line_retry_proxy_channel_lookups_total{{source=\"{}\"}} {}",
                source.label(),
                n.load(Relaxed)
            );
        }
        header(
            o,
            "line_retry_proxy_channel_lookup_seconds",
            "histogram",
            "Time of one GET /v2/bot/info attempt asking LINE for a token's channel.",
        );
        self.channel_lookup_latency
            .render(o, "line_retry_proxy_channel_lookup_seconds", "");
        gauge(
            o,
            "line_retry_proxy_store_entries",
            "Answers kept by the store for replay (Redis: keys in its database).",
            store.entries as i64,
        );
        gauge(
            o,
            "line_retry_proxy_store_claims",
            "Sends in flight holding a claim in the store.",
            store.claims as i64,
        );
        gauge(
            o,
            "line_retry_proxy_store_bytes",
            "Bytes held by the store, as weighed for its bound (Redis: its used_memory).",
            store.bytes as i64,
        );
        gauge(
            o,
            "line_retry_proxy_store_max_bytes",
            "The bound of store_bytes: store-max-bytes (Redis: its maxmemory; 0 if none).",
            store.max_bytes as i64,
        );
        gauge(
            o,
            "line_retry_proxy_store_up",
            "1 while the store serves; 0 while sends go without it (a shared store unreachable).",
            i64::from(store.up),
        );
        counter(
            o,
            "line_retry_proxy_store_errors_total",
            "Store operations that failed; the request was sent without the store.",
            &self.store_errors,
        );
        gauge(
            o,
            "line_retry_proxy_in_flight_requests",
            "Requests being handled now, including upstream work whose bot has hung up.",
            self.in_flight.load(Relaxed),
        );
        gauge(
            o,
            "line_retry_proxy_connections_open",
            "Client connections open now.",
            self.connections_open.load(Relaxed),
        );
        counter(
            o,
            "line_retry_proxy_connections_total",
            "Client connections accepted.",
            &self.connections_total,
        );
        counter(
            o,
            "line_retry_proxy_tls_handshakes_total",
            "TLS handshakes with bots inside CONNECT, successful or not.",
            &self.tls_handshakes,
        );
        counter(
            o,
            "line_retry_proxy_tls_handshake_failures_total",
            "TLS handshakes with bots that failed or timed out.",
            &self.tls_handshake_failures,
        );
        gauge(
            o,
            "line_retry_proxy_tunnels_open",
            "CONNECT tunnels open now (intercepted or byte-for-byte).",
            self.tunnels_open.load(Relaxed),
        );
        counter(
            o,
            "line_retry_proxy_tunnels_total",
            "CONNECT tunnels opened.",
            &self.tunnels_total,
        );
        counter(
            o,
            "line_retry_proxy_connect_refused_total",
            "CONNECT requests refused (host not allowed, auth, target unreachable).",
            &self.connect_refused,
        );
        header(
            o,
            "line_retry_proxy_limits_hit_total",
            "counter",
            "Clients cut off or refused by a limit: connections closed, 408s, 503s.",
        );
        for (limit, n) in Limit::ALL.iter().zip(&self.limits_hit) {
            let _ = writeln!(
                o,
                "line_retry_proxy_limits_hit_total{{limit=\"{}\"}} {}",
                limit.label(),
                n.load(Relaxed)
            );
        }
        gauge(
            o,
            "line_retry_proxy_buffered_bytes",
            "Request bytes buffered now (keyed bodies, with their upstream work), as counted for buffer-limit.",
            self.buffered_bytes.load(Relaxed),
        );
        gauge(
            o,
            "line_retry_proxy_leaf_certificates",
            "Intercept leaf certificates cached.",
            leaf_certificates as i64,
        );
        out
    }
}

fn header(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn counter(o: &mut String, name: &str, help: &str, value: &AtomicU64) {
    header(o, name, "counter", help);
    let _ = writeln!(o, "{name} {}", value.load(Relaxed));
}

fn gauge(o: &mut String, name: &str, help: &str, value: i64) {
    header(o, name, "gauge", help);
    let _ = writeln!(o, "{name} {value}");
}

fn per_endpoint(o: &mut String, name: &str, values: &[AtomicU64]) {
    for (i, n) in values.iter().enumerate() {
        let e = endpoint_label(i);
        let _ = writeln!(o, "{name}{{endpoint=\"{e}\"}} {}", n.load(Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Arc::new(Metrics::default());
        m.request(Some(Endpoint::Push), Outcome::Replayed);
        m.attempt(Some(Endpoint::Push), Duration::from_millis(30));
        m.attempt(Some(Endpoint::Push), Duration::from_millis(3));
        m.retry(AttemptFailure::Timeout);
        {
            let _g = m.in_flight_shared();
            assert_eq!(m.in_flight_now(), 1);
        }
        let text = m.render(
            StoreStats {
                entries: 2,
                bytes: 300,
                max_bytes: 1000,
                claims: 0,
                up: true,
            },
            1,
        );
        assert!(text
            .contains("line_retry_proxy_requests_total{endpoint=\"push\",outcome=\"replayed\"} 1"));
        assert!(text.contains("line_retry_proxy_retries_total{reason=\"timeout\"} 1"));
        assert!(text.contains(
            "line_retry_proxy_upstream_latency_seconds_bucket{endpoint=\"push\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "line_retry_proxy_upstream_latency_seconds_bucket{endpoint=\"push\",le=\"0.05\"} 2"
        ));
        assert!(text.contains("line_retry_proxy_store_bytes 300"));
        assert!(text.contains("line_retry_proxy_store_max_bytes 1000"));
        assert!(text.contains("line_retry_proxy_store_up 1"));
        assert!(text.contains("line_retry_proxy_in_flight_requests 0"));
    }

    #[test]
    fn channel_lookups_by_source_and_their_latency() {
        let m = Metrics::default();
        m.channel(ChannelSource::BotInfo);
        m.channel(ChannelSource::Cache);
        m.channel(ChannelSource::Cache);
        m.channel_lookup(Duration::from_millis(4));
        let text = m.render(StoreStats::default(), 0);
        assert!(text.contains("line_retry_proxy_channel_lookups_total{source=\"cache\"} 2"));
        assert!(text.contains("line_retry_proxy_channel_lookups_total{source=\"bot_info\"} 1"));
        assert!(text.contains("line_retry_proxy_channel_lookups_total{source=\"failed\"} 0"));
        assert!(text.contains("line_retry_proxy_channel_lookup_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("line_retry_proxy_channel_lookup_seconds_count 1"));
    }
}
