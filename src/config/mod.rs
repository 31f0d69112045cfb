//! Configuration: command line (clap) + environment (`LINE_RETRY_PROXY_*`) + TOML file,
//! parsed raw, then validated into one [`Config`]. A flag wins over the environment,
//! which wins over the file, which wins over the default.
//!
//! Every value is validated here, once, by name: a bad one becomes a [`ConfigError`]
//! whose one line names the option, and `main` exits 64 with it.

mod describe;
mod egress;
mod sources;
mod values;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::uri::{Authority, Scheme};

pub(crate) use egress::{EgressProxy, UpstreamProxy};
pub use sources::ServeArgs;
use sources::{list, pick, read_file, FileConfig};
use values::{
    addr, boolean, duration, hosts, key_scope, log_format, number, proxy_auth, ratio, store,
    upstream, window,
};
pub use values::{ConfigError, Secret, MASKED};

use crate::domain::{Endpoint, PerEndpoint, LINE_KEY_LIFETIME};
use crate::retry::ExponentialBackoff;

/// A longer dedup window would replay what LINE itself has forgotten.
pub(crate) const MAX_DEDUP_WINDOW: Duration = LINE_KEY_LIFETIME;

/// A year as the duration syntax spells it (`1year`, 365.25 days).
pub(super) const ONE_YEAR: Duration = Duration::from_secs(31_557_600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// What a send's fingerprint, and so its derived key, is scoped to: `--key-scope`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyScope {
    /// The LINE channel the token belongs to: every token of a channel derives the
    /// same key, so a resend after a token rotation is fenced by LINE (docs/channels.md).
    Channel,
    /// The Authorization value, as before channels were known: keys exactly as those
    /// versions derived them, for an upgrade (README "Upgrading").
    Token,
}

impl KeyScope {
    pub(crate) fn name(self) -> &'static str {
        match self {
            KeyScope::Channel => "channel",
            KeyScope::Token => "token",
        }
    }
}

/// Which answer store: `--store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoreKind {
    /// Embedded, per process.
    Memory,
    /// A Redis (or Valkey) shared by every replica, surviving restarts.
    Redis(RedisTarget),
}

impl fmt::Display for StoreKind {
    /// The store as `check-config` shows it: the password masked.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreKind::Memory => f.write_str("memory"),
            StoreKind::Redis(target) => target.fmt(f),
        }
    }
}

/// Where the Redis store is: `redis[s]://[USER:PASSWORD@]HOST[:PORT][/DB]`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RedisTarget {
    /// `rediss://`: TLS, the server's certificate always verified.
    pub(crate) tls: bool,
    /// A name or an IP address (an IPv6 one without brackets).
    pub(crate) host: String,
    pub(crate) port: u16,
    /// The database number (`SELECT`).
    pub(crate) db: i64,
    /// For Redis ACLs; none means the default user.
    pub(crate) username: Option<String>,
    /// Never printed: `Debug` shows `***`, `Display` [`MASKED`].
    pub(crate) password: Option<Secret>,
}

impl fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.tls { "rediss://" } else { "redis://" })?;
        match (&self.username, &self.password) {
            (Some(user), Some(_)) => write!(f, "{user}:{MASKED}@")?,
            (None, Some(_)) => write!(f, ":{MASKED}@")?,
            (Some(user), None) => write!(f, "{user}@")?,
            (None, None) => {}
        }
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        write!(f, ":{}/{}", self.port, self.db)
    }
}

/// Where base-URL and intercepted traffic is forwarded.
#[derive(Debug, Clone)]
pub struct UpstreamTarget {
    pub(crate) scheme: Scheme,
    pub(crate) authority: Authority,
}

impl fmt::Display for UpstreamTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

/// How one request is retried. Reloadable.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RetryPolicy {
    pub(crate) attempt_timeout: Duration,
    pub(crate) max_attempts: u32,
    pub(crate) backoff: ExponentialBackoff,
    pub(crate) deadline: Duration,
    pub(crate) retry_on_429: bool,
    pub(crate) budget_ratio: f64,
    pub(crate) budget_min_per_second: u32,
}

/// Per keyed endpoint: how long answers are replayed, and whether failures are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointPolicy {
    pub dedup_window: Duration,
    pub retry: bool,
}

/// Everything SIGHUP may change without dropping a connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub(crate) retry: RetryPolicy,
    pub endpoints: PerEndpoint<EndpointPolicy>,
    pub intercept_hosts: Vec<String>,
    pub(crate) tunnel_allow: Vec<String>,
}

/// Where a host a client names (CONNECT, or an absolute-form target) goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Destination {
    /// One of LINE's hosts: its requests go through the request path.
    Intercept,
    /// Allowlisted: bytes (or requests) go through untouched.
    Tunnel,
    /// Anything else: 403, the proxy is not an open relay.
    Refuse,
}

impl Policy {
    /// The one routing decision for a named host, for CONNECT and absolute-form alike.
    pub(crate) fn destination(&self, host: &str, port: u16) -> Destination {
        if self.intercepts(host) {
            Destination::Intercept
        } else if self.tunnel_allowed(host, port) {
            Destination::Tunnel
        } else {
            Destination::Refuse
        }
    }

    pub fn endpoint(&self, endpoint: Endpoint) -> EndpointPolicy {
        self.endpoints[endpoint]
    }

    pub fn intercepts(&self, host: &str) -> bool {
        self.intercept_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host))
    }

    /// `*` admits every host; `host` admits any port; `host:port` admits that port only.
    pub fn tunnel_allowed(&self, host: &str, port: u16) -> bool {
        self.tunnel_allow.iter().any(|entry| {
            if entry == "*" {
                return true;
            }
            match entry.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') || h.starts_with('[') => {
                    h.trim_matches(['[', ']']).eq_ignore_ascii_case(host)
                        && p.parse::<u16>() == Ok(port)
                }
                _ => entry.trim_matches(['[', ']']).eq_ignore_ascii_case(host),
            }
        })
    }
}

/// Whether two listeners would need the same port: one address, or one port where
/// either takes every address. Port 0 asks the system for a free port each time, so
/// two of those never meet.
fn one_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// The keyed endpoints' names as an error lists them: `push, multicast, narrowcast or broadcast`.
fn endpoint_names() -> String {
    let names = Endpoint::ALL.map(Endpoint::name);
    match names.split_last() {
        Some((last, [])) => (*last).to_owned(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) listen: SocketAddr,
    pub(crate) admin_listen: SocketAddr,
    pub upstream: UpstreamTarget,
    pub(crate) upstream_ca: Option<PathBuf>,
    /// The company egress proxy every outbound connection goes through, if any.
    pub(crate) upstream_proxy: UpstreamProxy,
    pub ca_dir: PathBuf,
    pub(crate) store: StoreKind,
    /// Longest a send waits on a shared store before it goes on without it.
    pub(crate) store_timeout: Duration,
    /// CA trusted for a `rediss://` store instead of the system roots.
    pub(crate) store_ca: Option<PathBuf>,
    pub log_format: LogFormat,
    pub body_limit: usize,
    pub store_max_bytes: u64,
    pub(crate) canonical_json: bool,
    /// What fingerprints are scoped to; changing it changes every derived key, so it
    /// takes a restart.
    pub key_scope: KeyScope,
    pub proxy_auth: Option<Secret>,
    pub(crate) max_connections: usize,
    pub(crate) header_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// A keyed body must arrive whole within it; a streamed body may not pause longer.
    pub body_timeout: Duration,
    /// Request bytes buffered at once, across every keyed request and its upstream work.
    pub buffer_limit: u64,
    pub(crate) admin_max_connections: usize,
    pub(crate) handshake_timeout: Duration,
    pub(crate) shutdown_grace: Duration,
    pub(crate) leaf_lifetime: Duration,
    /// Lifetime of an intercept CA created by this proxy.
    pub ca_lifetime: Duration,
    pub policy: Policy,
    /// Kept so SIGHUP can read the file again and merge it under the same flags.
    pub args: ServeArgs,
}

impl Config {
    /// Merges flags/env (already in `args`, clap did that) over the file over defaults.
    pub fn load(args: &ServeArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Config::merge(args, file)
    }

    /// The configuration a TOML text gives, over the defaults, with no flags or
    /// environment: what `--config FILE` alone would give.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Config::merge(&ServeArgs::default(), sources::parse_file(text, "<text>")?)
    }

    /// The keys of the startup-only settings that differ in `next`: a reload swaps in
    /// only [`Policy`], so each of these waits for a restart and is named as such.
    pub fn changed_until_restart(&self, next: &Config) -> Vec<&'static str> {
        [
            (
                "upstream",
                self.upstream.to_string() != next.upstream.to_string(),
            ),
            ("listen", self.listen != next.listen),
            ("admin-listen", self.admin_listen != next.admin_listen),
            ("upstream-ca", self.upstream_ca != next.upstream_ca),
            ("upstream-proxy", self.upstream_proxy != next.upstream_proxy),
            ("ca-dir", self.ca_dir != next.ca_dir),
            ("store", self.store != next.store),
            ("store-timeout", self.store_timeout != next.store_timeout),
            ("store-ca", self.store_ca != next.store_ca),
            ("log-format", self.log_format != next.log_format),
            ("body-limit", self.body_limit != next.body_limit),
            (
                "store-max-bytes",
                self.store_max_bytes != next.store_max_bytes,
            ),
            ("canonical-json", self.canonical_json != next.canonical_json),
            ("key-scope", self.key_scope != next.key_scope),
            ("proxy-auth", self.proxy_auth != next.proxy_auth),
            (
                "max-connections",
                self.max_connections != next.max_connections,
            ),
            ("header-timeout", self.header_timeout != next.header_timeout),
            ("idle-timeout", self.idle_timeout != next.idle_timeout),
            ("body-timeout", self.body_timeout != next.body_timeout),
            ("buffer-limit", self.buffer_limit != next.buffer_limit),
            (
                "admin-max-connections",
                self.admin_max_connections != next.admin_max_connections,
            ),
            (
                "handshake-timeout",
                self.handshake_timeout != next.handshake_timeout,
            ),
            ("shutdown-grace", self.shutdown_grace != next.shutdown_grace),
            ("leaf-lifetime", self.leaf_lifetime != next.leaf_lifetime),
            ("ca-lifetime", self.ca_lifetime != next.ca_lifetime),
        ]
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
    }

    fn merge(args: &ServeArgs, file: FileConfig) -> Result<Config, ConfigError> {
        let listen = addr("listen", pick(&args.listen, file.listen), "127.0.0.1:8080")?;
        let admin_listen = addr(
            "admin-listen",
            pick(&args.admin_listen, file.admin_listen),
            "127.0.0.1:9090",
        )?;
        if one_port(listen, admin_listen) {
            return Err(ConfigError::new(format!(
                "option `admin-listen` ({admin_listen}) must differ from `listen`: one port cannot serve both"
            )));
        }
        let upstream = upstream(pick(&args.upstream, file.upstream))?;
        let upstream_proxy = egress::upstream_proxy(
            pick(&args.upstream_proxy, file.upstream_proxy),
            &|name| std::env::var(name).ok(),
            listen,
        )?;
        let dedup_window = window(
            "dedup-window",
            pick(&args.dedup_window, file.dedup_window),
            MAX_DEDUP_WINDOW,
        )?;
        let base_delay = duration(
            "retry-base-delay",
            pick(&args.retry_base_delay, file.retry_base_delay),
            Duration::from_millis(200),
            Duration::ZERO..=Duration::from_secs(60),
        )?;
        let max_delay = duration(
            "retry-max-delay",
            pick(&args.retry_max_delay, file.retry_max_delay),
            Duration::from_secs(5),
            Duration::ZERO..=Duration::from_secs(600),
        )?;
        let backoff = ExponentialBackoff::try_new(base_delay, max_delay).map_err(|_| {
            ConfigError::new(format!(
                "option `retry-base-delay` ({}) must not exceed `retry-max-delay` ({})",
                humantime::format_duration(base_delay),
                humantime::format_duration(max_delay)
            ))
        })?;
        let retry = RetryPolicy {
            attempt_timeout: duration(
                "attempt-timeout",
                pick(&args.attempt_timeout, file.attempt_timeout),
                Duration::from_secs(10),
                Duration::from_millis(10)..=Duration::from_secs(600),
            )?,
            max_attempts: number(
                "max-attempts",
                pick(&args.max_attempts, file.max_attempts.map(|n| n.to_string())),
                4,
                1..=20,
            )?,
            backoff,
            deadline: duration(
                "request-deadline",
                pick(&args.request_deadline, file.request_deadline),
                Duration::from_secs(45),
                Duration::from_millis(10)..=Duration::from_secs(3600),
            )?,
            retry_on_429: boolean(
                "retry-on-429",
                pick(&args.retry_on_429, file.retry_on_429.map(|b| b.to_string())),
                false,
            )?,
            budget_ratio: ratio(
                "retry-budget-ratio",
                pick(
                    &args.retry_budget_ratio,
                    file.retry_budget_ratio.map(|r| r.to_string()),
                ),
            )?,
            budget_min_per_second: number(
                "retry-budget-min-per-second",
                pick(
                    &args.retry_budget_min_per_second,
                    file.retry_budget_min_per_second.map(|n| n.to_string()),
                ),
                10,
                0..=1_000_000,
            )?,
        };

        let mut endpoints = PerEndpoint::from_fn(|_| EndpointPolicy {
            dedup_window,
            retry: true,
        });
        for (name, table) in file.endpoints {
            let endpoint = Endpoint::from_name(&name).ok_or_else(|| {
                ConfigError::new(format!(
                    "unknown endpoint `{name}` in [endpoints]: expected {}",
                    endpoint_names()
                ))
            })?;
            let slot = &mut endpoints[endpoint];
            if let Some(w) = table.dedup_window {
                slot.dedup_window = window(
                    &format!("endpoints.{name}.dedup-window"),
                    Some(w),
                    dedup_window,
                )?;
            }
            if let Some(r) = table.retry {
                slot.retry = r;
            }
        }

        let policy = Policy {
            retry,
            endpoints,
            intercept_hosts: hosts(
                "intercept-hosts",
                list(&args.intercept_hosts, file.intercept_hosts),
                &["api.line.me"],
            )?,
            tunnel_allow: hosts(
                "tunnel-allow",
                list(&args.tunnel_allow, file.tunnel_allow),
                &["api-data.line.me"],
            )?,
        };

        let store = store(pick(&args.store, file.store))?;
        // Empty, as check-config prints an unset one: none.
        let store_ca = args
            .store_ca
            .clone()
            .or(file.store_ca)
            .filter(|p| !p.as_os_str().is_empty());
        if store_ca.is_some() && !matches!(&store, StoreKind::Redis(t) if t.tls) {
            return Err(ConfigError::new(
                "option `store-ca` applies only to a rediss:// store",
            ));
        }

        let body_limit = number(
            "body-limit",
            pick(&args.body_limit, file.body_limit.map(|n| n.to_string())),
            2 * 1024 * 1024,
            1..=64 * 1024 * 1024,
        )?;
        let buffer_limit: u64 = number(
            "buffer-limit",
            pick(&args.buffer_limit, file.buffer_limit.map(|n| n.to_string())),
            64 * 1024 * 1024,
            64 * 1024..=1 << 40,
        )?;
        if buffer_limit < body_limit as u64 {
            return Err(ConfigError::new(format!(
                "option `buffer-limit` ({buffer_limit}) must be at least `body-limit` ({body_limit}), or no body that large could ever be buffered"
            )));
        }

        Ok(Config {
            listen,
            admin_listen,
            upstream,
            // Empty, as check-config prints an unset one: none.
            upstream_ca: args
                .upstream_ca
                .clone()
                .or(file.upstream_ca)
                .filter(|p| !p.as_os_str().is_empty()),
            upstream_proxy,
            ca_dir: args
                .ca_dir
                .clone()
                .or(file.ca_dir)
                .unwrap_or_else(|| PathBuf::from("ca")),
            store,
            store_timeout: duration(
                "store-timeout",
                pick(&args.store_timeout, file.store_timeout),
                Duration::from_millis(50),
                Duration::from_millis(1)..=Duration::from_secs(10),
            )?,
            store_ca,
            log_format: log_format(pick(&args.log_format, file.log_format))?,
            body_limit,
            store_max_bytes: number(
                "store-max-bytes",
                pick(
                    &args.store_max_bytes,
                    file.store_max_bytes.map(|n| n.to_string()),
                ),
                256 * 1024 * 1024,
                1024 * 1024..=1 << 40,
            )?,
            canonical_json: boolean(
                "canonical-json",
                pick(
                    &args.canonical_json,
                    file.canonical_json.map(|b| b.to_string()),
                ),
                false,
            )?,
            key_scope: key_scope(pick(&args.key_scope, file.key_scope))?,
            proxy_auth: proxy_auth(args.proxy_auth.clone().or(file.proxy_auth.map(Secret)))?,
            max_connections: number(
                "max-connections",
                pick(
                    &args.max_connections,
                    file.max_connections.map(|n| n.to_string()),
                ),
                4096,
                1..=1_000_000,
            )?,
            header_timeout: duration(
                "header-timeout",
                pick(&args.header_timeout, file.header_timeout),
                Duration::from_secs(10),
                Duration::from_millis(10)..=Duration::from_secs(600),
            )?,
            idle_timeout: duration(
                "idle-timeout",
                pick(&args.idle_timeout, file.idle_timeout),
                Duration::from_secs(60),
                Duration::from_millis(10)..=Duration::from_secs(3600),
            )?,
            body_timeout: duration(
                "body-timeout",
                pick(&args.body_timeout, file.body_timeout),
                Duration::from_secs(10),
                Duration::from_millis(10)..=Duration::from_secs(600),
            )?,
            buffer_limit,
            admin_max_connections: number(
                "admin-max-connections",
                pick(
                    &args.admin_max_connections,
                    file.admin_max_connections.map(|n| n.to_string()),
                ),
                64,
                1..=100_000,
            )?,
            handshake_timeout: duration(
                "handshake-timeout",
                pick(&args.handshake_timeout, file.handshake_timeout),
                Duration::from_secs(10),
                Duration::from_millis(10)..=Duration::from_secs(600),
            )?,
            shutdown_grace: duration(
                "shutdown-grace",
                pick(&args.shutdown_grace, file.shutdown_grace),
                Duration::from_secs(30),
                Duration::ZERO..=Duration::from_secs(3600),
            )?,
            leaf_lifetime: duration(
                "leaf-lifetime",
                pick(&args.leaf_lifetime, file.leaf_lifetime),
                Duration::from_secs(24 * 3600),
                Duration::from_secs(60)..=Duration::from_secs(90 * 24 * 3600),
            )?,
            ca_lifetime: duration(
                "ca-lifetime",
                pick(&args.ca_lifetime, file.ca_lifetime),
                ONE_YEAR,
                Duration::from_secs(24 * 3600)..=10 * ONE_YEAR,
            )?,
            policy,
            args: args.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::new(e.to_string()))?;
        Config::merge(&ServeArgs::default(), file)
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = Config::load(&ServeArgs::default()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.upstream.to_string(), "https://api.line.me");
        assert_eq!(c.ca_dir, PathBuf::from("ca"));
        assert_eq!(
            c.policy.endpoint(Endpoint::Push).dedup_window,
            MAX_DEDUP_WINDOW
        );
        assert_eq!(c.body_limit, 2 * 1024 * 1024);
    }

    #[test]
    fn flag_wins_over_file() {
        let args = ServeArgs {
            max_attempts: Some("7".into()),
            ..Default::default()
        };
        let parsed: FileConfig =
            toml::from_str("max-attempts = 2\nattempt-timeout = \"3s\"").unwrap();
        let c = Config::merge(&args, parsed).unwrap();
        assert_eq!(c.policy.retry.max_attempts, 7);
        assert_eq!(c.policy.retry.attempt_timeout, Duration::from_secs(3));
    }

    #[test]
    fn bad_values_name_the_option() {
        let err = file("attempt-timeout = \"5 parsecs\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`attempt-timeout`"), "{err}");
        let err = file("dedup-window = \"48h\"").unwrap_err().to_string();
        assert!(err.contains("`dedup-window`"), "{err}");
        let err = file("[endpoints.reply]\nretry = false")
            .unwrap_err()
            .to_string();
        assert!(err.contains("reply"), "{err}");
        let err = file("upstream = \"https://api.line.me/v2\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`upstream`"), "{err}");
        assert!(toml::from_str::<FileConfig>("colour = 1").is_err());
    }

    #[test]
    fn per_endpoint_overrides() {
        let c = file(
            "dedup-window = \"2h\"\n[endpoints.narrowcast]\ndedup-window = \"10m\"\nretry = false",
        )
        .unwrap();
        assert_eq!(
            c.policy.endpoint(Endpoint::Push).dedup_window,
            Duration::from_secs(7200)
        );
        let n = c.policy.endpoint(Endpoint::Narrowcast);
        assert_eq!(n.dedup_window, Duration::from_secs(600));
        assert!(!n.retry);
    }

    #[test]
    fn proxy_auth_is_masked_everywhere() {
        let c = file("proxy-auth = \"bot:hunter2\"").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!c.describe().contains("hunter2"));
        let err = file("proxy-auth = \"hunter2\"").unwrap_err().to_string();
        assert!(!err.contains("hunter2"));
    }

    /// Found by the config_toml fuzz target: check-config printed `proxy-auth = ""` for
    /// an unset credential, which did not load again.
    #[test]
    fn check_config_output_loads_to_the_same_settings() {
        let defaults = Config::from_toml("").unwrap();
        let again = Config::from_toml(&defaults.describe()).unwrap();
        assert_eq!(again.describe(), defaults.describe());
        assert!(again.proxy_auth.is_none() && again.upstream_ca.is_none());
    }

    #[test]
    fn redis_store_urls() {
        let c = file("store = \"rediss://proxy:p%40ss@redis.internal:6380/3\"").unwrap();
        let StoreKind::Redis(t) = &c.store else {
            panic!("not redis: {:?}", c.store)
        };
        assert!(t.tls);
        assert_eq!((t.host.as_str(), t.port, t.db), ("redis.internal", 6380, 3));
        assert_eq!(t.username.as_deref(), Some("proxy"));
        assert_eq!(t.password.as_ref().map(Secret::expose), Some("p@ss"));
        assert_eq!(
            c.store.to_string(),
            "rediss://proxy:<masked>@redis.internal:6380/3"
        );
        let plain = file("store = \"redis://[::1]\"").unwrap();
        assert_eq!(plain.store.to_string(), "redis://[::1]:6379/0");
        assert_eq!(plain.store_timeout, Duration::from_millis(50));
        for bad in [
            "redis://",
            "redis://host/db",
            "rediss://host#insecure",
            "redis://host?timeout=1",
            "memcached://host",
        ] {
            let err = file(&format!("store = {bad:?}")).unwrap_err().to_string();
            assert!(err.contains("`store`"), "{bad}: {err}");
        }
        let err = file("store = \"redis://host\"\nstore-ca = \"ca.pem\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("store-ca"), "{err}");
    }

    #[test]
    fn the_redis_password_is_masked_everywhere() {
        let c = file("store = \"redis://:hunter2@127.0.0.1:6379/0\"").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!c.describe().contains("hunter2"));
        assert!(c
            .describe()
            .contains("store = \"redis://:<masked>@127.0.0.1:6379/0\""));
        for bad in [
            "redis://u:hunter2@host/x",
            "redis://u:hunter2@",
            "rediss://u:hunter2@host#insecure",
            "u:hunter2@host",
        ] {
            let err = file(&format!("store = {bad:?}")).unwrap_err().to_string();
            assert!(!err.contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn the_upstream_proxy_password_is_masked_everywhere() {
        let c = file("upstream-proxy = \"http://corp:hunter2@127.0.0.1:3128\"").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(c
            .describe()
            .contains("upstream-proxy = \"http://corp:<masked>@127.0.0.1:3128\""));
        // The mask read back is refused by name, never taken for the password.
        let err = Config::from_toml(&c.describe()).unwrap_err().to_string();
        assert!(err.contains("`upstream-proxy` holds <masked>"), "{err}");
        let err = file("upstream-proxy = \"http://corp:hunter2@127.0.0.1\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`upstream-proxy`") && !err.contains("hunter2"),
            "{err}"
        );
        let direct = Config::from_toml("").unwrap();
        let again = Config::from_toml(&direct.describe()).unwrap();
        assert_eq!(again.upstream_proxy, UpstreamProxy::Direct);
    }

    #[test]
    fn key_scope_is_channel_unless_told_token() {
        assert_eq!(file("").unwrap().key_scope, KeyScope::Channel);
        assert_eq!(
            file("key-scope = \"token\"").unwrap().key_scope,
            KeyScope::Token
        );
        let err = file("key-scope = \"bot\"").unwrap_err().to_string();
        assert!(
            err.contains("`key-scope`") && err.contains("channel or token"),
            "{err}"
        );
        let token = file("key-scope = \"token\"").unwrap();
        assert!(token.describe().contains("key-scope = \"token\"\n"));
        assert_eq!(
            Config::from_toml(&token.describe()).unwrap().key_scope,
            KeyScope::Token
        );
    }

    #[test]
    fn a_named_host_is_intercepted_tunnelled_or_refused() {
        let c = file("intercept-hosts = [\"api.line.me\"]\ntunnel-allow = [\"api-data.line.me\", \"api.line.me\"]").unwrap();
        assert_eq!(
            c.policy.destination("API.line.me", 443),
            Destination::Intercept
        );
        assert_eq!(
            c.policy.destination("api-data.line.me", 8443),
            Destination::Tunnel
        );
        assert_eq!(
            c.policy.destination("example.com", 443),
            Destination::Refuse
        );
    }

    /// check-config passed a listener and an admin listener on one address, and serve
    /// then failed to bind the second.
    #[test]
    fn the_admin_listener_must_not_share_the_proxy_port() {
        let err = file("listen = \"127.0.0.1:8080\"\nadmin-listen = \"127.0.0.1:8080\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`admin-listen`") && err.contains("`listen`"),
            "{err}"
        );
        assert!(
            file("listen = \"0.0.0.0:8080\"\nadmin-listen = \"127.0.0.1:8080\"").is_err(),
            "every address includes the admin's"
        );
        assert!(file("listen = \"127.0.0.1:0\"\nadmin-listen = \"127.0.0.1:0\"").is_ok());
        assert!(file("listen = \"127.0.0.1:8080\"\nadmin-listen = \"127.0.0.1:8081\"").is_ok());
    }

    #[test]
    fn tunnel_allowlist_matching() {
        let c = file("tunnel-allow = [\"api-data.line.me\", \"127.0.0.1:4443\"]").unwrap();
        assert!(c.policy.tunnel_allowed("API-DATA.line.me", 443));
        assert!(c.policy.tunnel_allowed("127.0.0.1", 4443));
        assert!(!c.policy.tunnel_allowed("127.0.0.1", 4444));
        assert!(!c.policy.tunnel_allowed("example.com", 443));
        let open = file("tunnel-allow = [\"*\"]").unwrap();
        assert!(open.policy.tunnel_allowed("example.com", 443));
    }
}
