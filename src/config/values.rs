//! Validation of single values, each by its option's name: one clear line per mistake.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use http::uri::Scheme;

use super::{LogFormat, RedisTarget, StoreKind, UpstreamTarget, MAX_DEDUP_WINDOW};

/// One line naming the option and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        ConfigError(message.into())
    }

    fn option(name: &str, value: &str, why: impl fmt::Display) -> Self {
        ConfigError(format!(
            "invalid value {value:?} for option `{name}`: {why}"
        ))
    }
}

/// How `check-config` prints a secret. Read back from a file, it is refused by name:
/// a copied config must not turn the mask into a credential.
pub const MASKED: &str = "<masked>";

/// The error for a secret that is still [`MASKED`]; it names only the option.
pub(super) fn masked(name: &str, hint: &str) -> ConfigError {
    ConfigError(format!(
        "option `{name}` holds {MASKED}, the mask check-config prints instead of the secret: {hint}"
    ))
}

/// A value that must never reach a log line, an error, or `check-config` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub(super) String);

impl Secret {
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

pub(super) fn addr(
    name: &str,
    value: Option<String>,
    default: &str,
) -> Result<SocketAddr, ConfigError> {
    let value = value.unwrap_or_else(|| default.to_owned());
    value
        .parse()
        .map_err(|_| ConfigError::option(name, &value, "expected IP:PORT, e.g. 127.0.0.1:8080"))
}

pub(super) fn upstream(value: Option<String>) -> Result<UpstreamTarget, ConfigError> {
    let value = value.unwrap_or_else(|| "https://api.line.me".to_owned());
    let bad = |why: &str| ConfigError::option("upstream", &value, why);
    let uri: http::Uri = value.parse().map_err(|_| bad("not a URL"))?;
    let scheme = uri
        .scheme()
        .cloned()
        .ok_or_else(|| bad("expected https://HOST[:PORT]"))?;
    if scheme != Scheme::HTTPS && scheme != Scheme::HTTP {
        return Err(bad("the scheme must be https or http"));
    }
    let authority = uri.authority().cloned().ok_or_else(|| bad("no host"))?;
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("must not have a path: requests keep their own path"));
    }
    Ok(UpstreamTarget { scheme, authority })
}

pub(super) fn duration(
    name: &str,
    value: Option<String>,
    default: Duration,
    range: std::ops::RangeInclusive<Duration>,
) -> Result<Duration, ConfigError> {
    let Some(value) = value else {
        return Ok(default);
    };
    let parsed = humantime::parse_duration(value.trim())
        .map_err(|e| ConfigError::option(name, &value, format!("{e} (use e.g. 250ms, 5s, 24h)")))?;
    if !range.contains(&parsed) {
        return Err(ConfigError::option(
            name,
            &value,
            format!(
                "must be between {} and {}",
                humantime::format_duration(*range.start()),
                humantime::format_duration(*range.end())
            ),
        ));
    }
    Ok(parsed)
}

pub(super) fn window(
    name: &str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    duration(
        name,
        value,
        default,
        Duration::from_secs(1)..=MAX_DEDUP_WINDOW,
    )
}

pub(super) fn number<T>(
    name: &str,
    value: Option<String>,
    default: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
{
    let Some(value) = value else {
        return Ok(default);
    };
    let parsed: T = value
        .trim()
        .parse()
        .map_err(|_| ConfigError::option(name, &value, "expected a whole number"))?;
    if !range.contains(&parsed) {
        return Err(ConfigError::option(
            name,
            &value,
            format!("must be between {} and {}", range.start(), range.end()),
        ));
    }
    Ok(parsed)
}

pub(super) fn ratio(name: &str, value: Option<String>) -> Result<f64, ConfigError> {
    let Some(value) = value else { return Ok(0.2) };
    match value.trim().parse::<f64>() {
        Ok(r) if (0.0..=100.0).contains(&r) => Ok(r),
        _ => Err(ConfigError::option(
            name,
            &value,
            "expected a number from 0 to 100",
        )),
    }
}

pub(super) fn boolean(
    name: &str,
    value: Option<String>,
    default: bool,
) -> Result<bool, ConfigError> {
    let Some(value) = value else {
        return Ok(default);
    };
    match value.trim() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::option(name, &value, "expected true or false")),
    }
}

pub(super) fn hosts(
    name: &str,
    value: Option<Vec<String>>,
    default: &[&str],
) -> Result<Vec<String>, ConfigError> {
    let Some(values) = value else {
        return Ok(default.iter().map(|s| s.to_string()).collect());
    };
    values
        .into_iter()
        .map(|host| {
            let ok = host == "*"
                || (!host.is_empty()
                    && host
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c)));
            if ok {
                Ok(host.to_ascii_lowercase())
            } else {
                Err(ConfigError::option(
                    name,
                    &host,
                    "expected a host name, host:port, or *",
                ))
            }
        })
        .collect()
}

pub(super) fn store(value: Option<String>) -> Result<StoreKind, ConfigError> {
    let value = match value.as_deref().map(str::trim) {
        None | Some("memory") => return Ok(StoreKind::Memory),
        Some(v) => v.to_owned(),
    };
    let shown = redact_userinfo(&value);
    let bad = |why: &str| ConfigError::option("store", &shown, why);
    let tls = if value.starts_with("rediss://") {
        true
    } else if value.starts_with("redis://") {
        false
    } else {
        return Err(bad(
            "expected memory, redis://[USER:PASSWORD@]HOST[:PORT][/DB] or rediss://…",
        ));
    };
    let url = url::Url::parse(&value).map_err(|e| bad(&format!("not a URL: {e}")))?;
    let host = match url.host() {
        Some(url::Host::Domain(d)) if !d.is_empty() => d.to_owned(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        _ => return Err(bad("no host")),
    };
    if url.query().is_some() || url.fragment().is_some() {
        // `#insecure` in particular: the store's certificate is always verified.
        return Err(bad("takes no query or fragment (TLS is always verified)"));
    }
    let db = match url.path().trim_start_matches('/') {
        "" => 0,
        db => db
            .parse::<i64>()
            .ok()
            .filter(|n| (0..=i64::from(i32::MAX)).contains(n))
            .ok_or_else(|| bad("the path must be a database number, e.g. /0"))?,
    };
    let decode = |s: &str| -> Result<Option<String>, ConfigError> {
        if s.is_empty() {
            return Ok(None);
        }
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|d| Some(d.into_owned()))
            .map_err(|_| bad("the user name and password must be UTF-8"))
    };
    let password = decode(url.password().unwrap_or_default())?;
    if password.as_deref() == Some(MASKED) {
        return Err(masked(
            "store",
            "put the real password in the URL, or the whole URL in LINE_RETRY_PROXY_STORE",
        ));
    }
    Ok(StoreKind::Redis(RedisTarget {
        tls,
        host,
        port: url.port().unwrap_or(6379),
        db,
        username: decode(url.username())?,
        password: password.map(Secret),
    }))
}

/// A store URL fit for an error message: anything before an `@` may be a password.
pub(super) fn redact_userinfo(value: &str) -> String {
    match (value.find("://"), value.rfind('@')) {
        (Some(start), Some(at)) if at > start => {
            format!("{}***{}", &value[..start + 3], &value[at..])
        }
        (None, Some(_)) => "***".to_owned(),
        _ => value.to_owned(),
    }
}

pub(super) fn log_format(value: Option<String>) -> Result<LogFormat, ConfigError> {
    match value.as_deref() {
        None | Some("text") => Ok(LogFormat::Text),
        Some("json") => Ok(LogFormat::Json),
        Some(v) => Err(ConfigError::option(
            "log-format",
            v,
            "expected text or json",
        )),
    }
}

pub(super) fn key_scope(value: Option<String>) -> Result<super::KeyScope, ConfigError> {
    match value.as_deref() {
        None | Some("channel") => Ok(super::KeyScope::Channel),
        Some("token") => Ok(super::KeyScope::Token),
        Some(v) => Err(ConfigError::option(
            "key-scope",
            v,
            "expected channel or token",
        )),
    }
}

pub(super) fn proxy_auth(value: Option<Secret>) -> Result<Option<Secret>, ConfigError> {
    match value {
        // Empty, as the shipped file and check-config show an unset one: none.
        None => Ok(None),
        Some(v) if v.0.is_empty() => Ok(None),
        Some(v) if v.0 == MASKED => Err(masked(
            "proxy-auth",
            "put the real USER:PASSWORD here or in LINE_RETRY_PROXY_PROXY_AUTH",
        )),
        Some(v)
            if v.0
                .split_once(':')
                .is_some_and(|(user, _)| !user.is_empty()) =>
        {
            Ok(Some(v))
        }
        // The value is a credential: the error must not repeat it.
        Some(_) => Err(ConfigError::new(
            "invalid value for option `proxy-auth`: expected USER:PASSWORD",
        )),
    }
}
