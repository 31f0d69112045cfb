//! The raw sources of configuration: the command line with its environment variables
//! (clap), and the TOML file (serde, unknown keys refused). Values stay strings here,
//! so that flag, environment and file go through the same validation in `values`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::values::{ConfigError, Secret};

/// The serve options: each one is a flag, an environment variable, and a file key.
/// Values stay strings here so that flag, env and file go through the same validation.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML file with any of the options below (flags and env win over it)
    #[arg(long, env = "LINE_RETRY_PROXY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Proxy listener for bots: HTTPS_PROXY, base-URL and plain-proxy traffic; an IP address and port, not a host name [default: 127.0.0.1:8080]
    #[arg(long, env = "LINE_RETRY_PROXY_LISTEN", value_name = "IP:PORT")]
    pub listen: Option<String>,
    /// Admin listener: /healthz, /readyz, /metrics; an IP address and port [default: 127.0.0.1:9090]
    #[arg(long, env = "LINE_RETRY_PROXY_ADMIN_LISTEN", value_name = "IP:PORT")]
    pub admin_listen: Option<String>,
    /// Where base-URL and intercepted api.line.me traffic goes [default: https://api.line.me]
    #[arg(long, env = "LINE_RETRY_PROXY_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,
    /// Extra CA (PEM) trusted for the upstream, beside the webpki roots
    #[arg(long, env = "LINE_RETRY_PROXY_UPSTREAM_CA", value_name = "PEM")]
    pub upstream_ca: Option<PathBuf>,
    /// Reach the upstream and tunnel targets through a company egress proxy (CONNECT): http://[USER:PASSWORD@]HOST:PORT, `env` for HTTPS_PROXY/NO_PROXY as set at start, or none. Set a password in the environment or the file: a flag is visible in `ps` [default: none]
    #[arg(
        long,
        env = "LINE_RETRY_PROXY_UPSTREAM_PROXY",
        value_name = "URL|env|none",
        hide_env_values = true
    )]
    pub upstream_proxy: Option<String>,
    /// Directory of the intercept CA (ca.pem, ca.key) [default: ./ca]
    #[arg(long, env = "LINE_RETRY_PROXY_CA_DIR", value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,
    /// Answer store: memory, or a Redis shared by replicas: redis://[USER:PASSWORD@]HOST[:PORT][/DB], rediss://… for TLS [default: memory]
    #[arg(
        long,
        env = "LINE_RETRY_PROXY_STORE",
        value_name = "memory|redis://…",
        hide_env_values = true
    )]
    pub store: Option<String>,
    /// Longest a send waits on the Redis store; past it, the send goes on without it [default: 50ms]
    #[arg(long, env = "LINE_RETRY_PROXY_STORE_TIMEOUT", value_name = "DUR")]
    pub store_timeout: Option<String>,
    /// CA (PEM) trusted for a rediss:// store instead of the system roots
    #[arg(long, env = "LINE_RETRY_PROXY_STORE_CA", value_name = "PEM")]
    pub store_ca: Option<PathBuf>,
    /// Time one upstream attempt may take [default: 10s]
    #[arg(long, env = "LINE_RETRY_PROXY_ATTEMPT_TIMEOUT", value_name = "DUR")]
    pub attempt_timeout: Option<String>,
    /// Upstream attempts per request, the first included [default: 4]
    #[arg(long, env = "LINE_RETRY_PROXY_MAX_ATTEMPTS", value_name = "N")]
    pub max_attempts: Option<String>,
    /// First backoff ceiling; doubles per retry, full jitter [default: 200ms]
    #[arg(long, env = "LINE_RETRY_PROXY_RETRY_BASE_DELAY", value_name = "DUR")]
    pub retry_base_delay: Option<String>,
    /// Cap of one backoff delay [default: 5s]
    #[arg(long, env = "LINE_RETRY_PROXY_RETRY_MAX_DELAY", value_name = "DUR")]
    pub retry_max_delay: Option<String>,
    /// Overall time for all attempts of one request [default: 45s]
    #[arg(long, env = "LINE_RETRY_PROXY_REQUEST_DEADLINE", value_name = "DUR")]
    pub request_deadline: Option<String>,
    /// How long an identical request is answered from the store, at most 24h [default: 24h]
    #[arg(long, env = "LINE_RETRY_PROXY_DEDUP_WINDOW", value_name = "DUR")]
    pub dedup_window: Option<String>,
    /// Log lines as text or json [default: text]
    #[arg(long, env = "LINE_RETRY_PROXY_LOG_FORMAT", value_name = "text|json")]
    pub log_format: Option<String>,
    /// Largest request body on the keyed endpoints, in bytes [default: 2097152]
    #[arg(long, env = "LINE_RETRY_PROXY_BODY_LIMIT", value_name = "BYTES")]
    pub body_limit: Option<String>,
    /// Memory bound of the answer store, in bytes [default: 268435456]
    #[arg(long, env = "LINE_RETRY_PROXY_STORE_MAX_BYTES", value_name = "BYTES")]
    pub store_max_bytes: Option<String>,
    /// Retry LINE's temporary 429 (never the monthly-limit one), honouring Retry-After [default: false]
    #[arg(long, env = "LINE_RETRY_PROXY_RETRY_ON_429", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub retry_on_429: Option<String>,
    /// Retries allowed per first attempt, proxy-wide, to stop retry storms [default: 0.2]
    #[arg(
        long,
        env = "LINE_RETRY_PROXY_RETRY_BUDGET_RATIO",
        value_name = "RATIO"
    )]
    pub retry_budget_ratio: Option<String>,
    /// Retries always allowed per second, whatever the ratio [default: 10]
    #[arg(
        long,
        env = "LINE_RETRY_PROXY_RETRY_BUDGET_MIN_PER_SECOND",
        value_name = "N"
    )]
    pub retry_budget_min_per_second: Option<String>,
    /// Fingerprint JSON bodies in canonical form (key order and spacing ignored) [default: false]
    #[arg(long, env = "LINE_RETRY_PROXY_CANONICAL_JSON", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub canonical_json: Option<String>,
    /// What a derived retry key is scoped to: the token's LINE channel (every token of a channel gets the same key, so a resend after a token rotation is not delivered twice), or the token alone (keys as versions before 0.2 derived them, for an upgrade); needs a restart [default: channel]
    #[arg(long, env = "LINE_RETRY_PROXY_KEY_SCOPE", value_name = "channel|token")]
    pub key_scope: Option<String>,
    /// Hosts whose CONNECT tunnels are intercepted, comma-separated [default: api.line.me]
    #[arg(long, env = "LINE_RETRY_PROXY_INTERCEPT_HOSTS", value_name = "HOSTS")]
    pub intercept_hosts: Option<String>,
    /// Hosts (host or host:port) tunnelled untouched, comma-separated; `*` admits all [default: api-data.line.me]
    #[arg(long, env = "LINE_RETRY_PROXY_TUNNEL_ALLOW", value_name = "HOSTS")]
    pub tunnel_allow: Option<String>,
    /// Require Proxy-Authorization: Basic (USER:PASSWORD) on CONNECT and absolute-form requests only: base-URL requests are not covered, as SDKs cannot send it there. Set it in the environment or the file: a flag is visible in `ps`
    #[arg(long, env = "LINE_RETRY_PROXY_PROXY_AUTH", value_name = "USER:PASSWORD", hide_env_values = true, value_parser = secret)]
    pub proxy_auth: Option<Secret>,
    /// Client connections served at once; past it, new ones are closed at accept and counted [default: 4096]
    #[arg(long, env = "LINE_RETRY_PROXY_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<String>,
    /// Time a client has to send a request head, from accept on [default: 10s]
    #[arg(long, env = "LINE_RETRY_PROXY_HEADER_TIMEOUT", value_name = "DUR")]
    pub header_timeout: Option<String>,
    /// Time a connection (HTTP/1.1 keep-alive or HTTP/2) may sit with no request in flight; PINGs do not count [default: 60s]
    #[arg(long, env = "LINE_RETRY_PROXY_IDLE_TIMEOUT", value_name = "DUR")]
    pub idle_timeout: Option<String>,
    /// Time a client has to send a keyed body, and the longest pause in a streamed body (408) [default: 10s]
    #[arg(long, env = "LINE_RETRY_PROXY_BODY_TIMEOUT", value_name = "DUR")]
    pub body_timeout: Option<String>,
    /// Request bytes buffered at once across all keyed requests, upstream work included; past it 503 [default: 67108864]
    #[arg(long, env = "LINE_RETRY_PROXY_BUFFER_LIMIT", value_name = "BYTES")]
    pub buffer_limit: Option<String>,
    /// Connections to the admin listener at once; more are closed at accept [default: 64]
    #[arg(long, env = "LINE_RETRY_PROXY_ADMIN_MAX_CONNECTIONS", value_name = "N")]
    pub admin_max_connections: Option<String>,
    /// Time a client has to finish a TLS handshake inside CONNECT [default: 10s]
    #[arg(long, env = "LINE_RETRY_PROXY_HANDSHAKE_TIMEOUT", value_name = "DUR")]
    pub handshake_timeout: Option<String>,
    /// Time in-flight requests and their retries get to finish on SIGTERM [default: 30s]
    #[arg(long, env = "LINE_RETRY_PROXY_SHUTDOWN_GRACE", value_name = "DUR")]
    pub shutdown_grace: Option<String>,
    /// Lifetime of intercept leaf certificates; renewed at a quarter left [default: 24h]
    #[arg(long, env = "LINE_RETRY_PROXY_LEAF_LIFETIME", value_name = "DUR")]
    pub leaf_lifetime: Option<String>,
    /// Lifetime of an intercept CA this proxy creates (`ca --renew` makes the next one) [default: 1year]
    #[arg(long, env = "LINE_RETRY_PROXY_CA_LIFETIME", value_name = "DUR")]
    pub ca_lifetime: Option<String>,
}

/// The TOML file: the same names as the flags, in kebab-case, plus per-endpoint tables.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct FileConfig {
    pub(super) listen: Option<String>,
    pub(super) admin_listen: Option<String>,
    pub(super) upstream: Option<String>,
    pub(super) upstream_ca: Option<PathBuf>,
    pub(super) upstream_proxy: Option<String>,
    pub(super) ca_dir: Option<PathBuf>,
    pub(super) store: Option<String>,
    pub(super) store_timeout: Option<String>,
    pub(super) store_ca: Option<PathBuf>,
    pub(super) attempt_timeout: Option<String>,
    pub(super) max_attempts: Option<u32>,
    pub(super) retry_base_delay: Option<String>,
    pub(super) retry_max_delay: Option<String>,
    pub(super) request_deadline: Option<String>,
    pub(super) dedup_window: Option<String>,
    pub(super) log_format: Option<String>,
    pub(super) body_limit: Option<u64>,
    pub(super) store_max_bytes: Option<u64>,
    pub(super) retry_on_429: Option<bool>,
    pub(super) retry_budget_ratio: Option<f64>,
    pub(super) retry_budget_min_per_second: Option<u32>,
    pub(super) canonical_json: Option<bool>,
    pub(super) key_scope: Option<String>,
    pub(super) intercept_hosts: Option<Vec<String>>,
    pub(super) tunnel_allow: Option<Vec<String>>,
    pub(super) proxy_auth: Option<String>,
    pub(super) max_connections: Option<u32>,
    pub(super) header_timeout: Option<String>,
    pub(super) idle_timeout: Option<String>,
    pub(super) body_timeout: Option<String>,
    pub(super) buffer_limit: Option<u64>,
    pub(super) admin_max_connections: Option<u32>,
    pub(super) handshake_timeout: Option<String>,
    pub(super) shutdown_grace: Option<String>,
    pub(super) leaf_lifetime: Option<String>,
    pub(super) ca_lifetime: Option<String>,
    #[serde(default)]
    pub(super) endpoints: BTreeMap<String, FileEndpoint>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct FileEndpoint {
    pub(super) dedup_window: Option<String>,
    pub(super) retry: Option<bool>,
}

pub(super) fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(format!("config file {}: {e}", path.display())))?;
    parse_file(&text, &path.display().to_string())
}

/// The TOML text of a config file; `name` says where it came from in errors.
pub(super) fn parse_file(text: &str, name: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        // toml's message spans several lines with a source excerpt; one line is the contract.
        let message = e.message().replace('\n', " ");
        let place = e
            .span()
            .map(|s| {
                format!(
                    " (line {})",
                    // Bytes, not a str slice: a span inside a multi-byte character must not panic.
                    text.as_bytes()[..s.start.min(text.len())]
                        .iter()
                        .filter(|&&b| b == b'\n')
                        .count()
                        + 1
                )
            })
            .unwrap_or_default();
        ConfigError::new(format!("config file {name}{place}: {message}"))
    })
}

pub(super) fn pick(flag: &Option<String>, file: Option<String>) -> Option<String> {
    flag.clone().or(file)
}

pub(super) fn list(flag: &Option<String>, file: Option<Vec<String>>) -> Option<Vec<String>> {
    match flag {
        Some(csv) => Some(
            csv.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
        ),
        None => file,
    }
}

fn secret(value: &str) -> Result<Secret, std::convert::Infallible> {
    Ok(Secret(value.to_owned()))
}
