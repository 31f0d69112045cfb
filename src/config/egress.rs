//! `upstream-proxy`: how the proxy's own connections leave a network that lets out
//! only a company egress proxy. Parsed and validated here; the connections themselves
//! are opened by `upstream::egress`.
//!
//! Three forms, off by default:
//! - `""` or `none`: straight to the upstream and to tunnel targets;
//! - `http://[USER:PASSWORD@]HOST:PORT`: every connection is a `CONNECT` through it;
//! - `env`: the conventional `HTTPS_PROXY` / `https_proxy`, with `NO_PROXY` /
//!   `no_proxy`, as read at start. Opt-in only: the bots beside this proxy often have
//!   `HTTPS_PROXY` pointing at *it*, and a proxy that obeyed that would loop.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use super::values::{masked, redact_userinfo, ConfigError, Secret, MASKED};

/// The option's name, as errors and `check-config` spell it.
const NAME: &str = "upstream-proxy";

/// Where the proxy's outbound connections go first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum UpstreamProxy {
    /// Straight to the target.
    #[default]
    Direct,
    /// `CONNECT` through this proxy, for every target.
    Fixed(EgressProxy),
    /// From the environment at start: the proxy (none if `HTTPS_PROXY` was unset) and
    /// the targets that bypass it.
    Env {
        proxy: Option<EgressProxy>,
        no_proxy: NoProxy,
    },
}

impl UpstreamProxy {
    /// The egress proxy a connection to `host:port` goes through, or none for a
    /// direct connection. `host` is a name or an IP address (IPv6 without brackets).
    pub(crate) fn route(&self, host: &str, port: u16) -> Option<&EgressProxy> {
        match self {
            UpstreamProxy::Direct => None,
            UpstreamProxy::Fixed(proxy) => Some(proxy),
            UpstreamProxy::Env { proxy, no_proxy } => {
                proxy.as_ref().filter(|_| !no_proxy.bypasses(host, port))
            }
        }
    }

    /// The value as `check-config` prints it (TOML), the password [`MASKED`] (refused
    /// when read back); for `env`, a comment says what the environment gave.
    pub(crate) fn describe(&self) -> String {
        match self {
            UpstreamProxy::Direct => "\"\"".to_owned(),
            UpstreamProxy::Fixed(proxy) => format!("{:?}", proxy.to_string()),
            UpstreamProxy::Env { proxy, no_proxy } => format!(
                "\"env\" # HTTPS_PROXY: {}; NO_PROXY: {}",
                proxy
                    .as_ref()
                    .map_or_else(|| "unset (direct)".to_owned(), ToString::to_string),
                if no_proxy.0.is_empty() {
                    "unset".to_owned()
                } else {
                    // The environment's text on one line, whatever it holds.
                    no_proxy.0.join(",").replace(char::is_control, "?")
                }
            ),
        }
    }
}

impl fmt::Display for UpstreamProxy {
    /// For log lines: credentials masked.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamProxy::Direct => f.write_str("none"),
            UpstreamProxy::Fixed(proxy) => proxy.fmt(f),
            UpstreamProxy::Env { proxy: None, .. } => f.write_str("env (HTTPS_PROXY unset)"),
            UpstreamProxy::Env {
                proxy: Some(proxy),
                no_proxy,
            } => write!(
                f,
                "{proxy} (from HTTPS_PROXY, {} NO_PROXY entries)",
                no_proxy.0.len()
            ),
        }
    }
}

/// An HTTP proxy that answers `CONNECT`: `http://[USER:PASSWORD@]HOST:PORT`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressProxy {
    /// A name or an IP address (an IPv6 one without brackets).
    pub(crate) host: String,
    pub(crate) port: u16,
    /// Percent-decoded; with `password`, sent as `Proxy-Authorization: Basic`.
    pub(crate) username: Option<String>,
    /// Percent-decoded. Never printed: `Debug` shows `***`, `Display` [`MASKED`].
    pub(crate) password: Option<Secret>,
}

impl fmt::Display for EgressProxy {
    /// `http://user:<masked>@host:port`: the form `check-config` and log lines use.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("http://")?;
        match (&self.username, &self.password) {
            (Some(user), Some(_)) => write!(f, "{user}:{MASKED}@")?,
            (None, Some(_)) => write!(f, ":{MASKED}@")?,
            (Some(user), None) => write!(f, "{user}@")?,
            (None, None) => {}
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// `NO_PROXY`: targets reached directly although `HTTPS_PROXY` is set. Entries as Go
/// and curl read them: `*` (everything), a name (that name and its subdomains),
/// `.name` or `*.name` (subdomains only), an IP address, a CIDR range
/// (`10.0.0.0/8`), each optionally with `:PORT` (that port only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy(Vec<String>);

impl NoProxy {
    pub(crate) fn parse(value: &str) -> NoProxy {
        NoProxy(
            value
                .split(',')
                .map(|e| e.trim().to_ascii_lowercase())
                .filter(|e| !e.is_empty())
                .collect(),
        )
    }

    pub(crate) fn bypasses(&self, host: &str, port: u16) -> bool {
        let host = host
            .trim_matches(['[', ']'])
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let ip: Option<IpAddr> = host.parse().ok();
        self.0.iter().any(|entry| {
            if entry == "*" {
                return true;
            }
            let (name, entry_port) = split_port(entry);
            if entry_port.is_some_and(|p| p != port) {
                return false;
            }
            if let Some((net, bits)) = name.split_once('/') {
                return match (ip, net.parse::<IpAddr>(), bits.parse::<u8>()) {
                    (Some(ip), Ok(net), Ok(bits)) => in_range(ip, net, bits),
                    _ => false,
                };
            }
            if let Ok(entry_ip) = name.parse::<IpAddr>() {
                return ip == Some(entry_ip);
            }
            let name = name.trim_end_matches('.');
            if let Some(suffix) = name.strip_prefix("*.").or_else(|| name.strip_prefix('.')) {
                return host.ends_with(&format!(".{suffix}"));
            }
            host == name || host.ends_with(&format!(".{name}"))
        })
    }
}

/// `host:port`, `[v6]:port`, or a bare host (an IPv6 address or range included).
fn split_port(entry: &str) -> (&str, Option<u16>) {
    if let Some(rest) = entry.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((host, tail)) => (host, tail.strip_prefix(':').and_then(|p| p.parse().ok())),
            None => (entry, None),
        };
    }
    match entry.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => match port.parse() {
            Ok(port) => (host, Some(port)),
            Err(_) => (entry, None),
        },
        _ => (entry, None),
    }
}

fn in_range(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) if bits <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) if bits <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

/// The first of `names` set to something other than blanks.
fn first_set(env: &dyn Fn(&str) -> Option<String>, names: [&str; 2]) -> Option<(String, String)> {
    names.into_iter().find_map(|name| {
        env(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .map(|v| (name.to_owned(), v))
    })
}

/// Validates `upstream-proxy`. `env` reads the environment (only for `env`); `listen`
/// is the proxy's own listener, which the egress proxy must not be.
pub(super) fn upstream_proxy(
    value: Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
    listen: SocketAddr,
) -> Result<UpstreamProxy, ConfigError> {
    let value = value.unwrap_or_default();
    let setting = match value.trim() {
        "" | "none" => return Ok(UpstreamProxy::Direct),
        "env" => {
            let proxy = match first_set(env, ["HTTPS_PROXY", "https_proxy"]) {
                // Scheme-less values (`proxy:3128`) are common there, and mean http://.
                Some((name, v)) => {
                    let v = if v.contains("://") {
                        v
                    } else {
                        format!("http://{v}")
                    };
                    Some(parse(&v, &format!(" (from {name})"))?)
                }
                None => None,
            };
            let no_proxy = first_set(env, ["NO_PROXY", "no_proxy"])
                .map(|(_, v)| NoProxy::parse(&v))
                .unwrap_or_default();
            UpstreamProxy::Env { proxy, no_proxy }
        }
        v => UpstreamProxy::Fixed(parse(v, "")?),
    };
    let own = match &setting {
        UpstreamProxy::Fixed(p) | UpstreamProxy::Env { proxy: Some(p), .. } => Some(p),
        _ => None,
    };
    if let Some(proxy) = own.filter(|p| is_own_listener(p, listen)) {
        return Err(ConfigError::new(format!(
            "invalid value for option `{NAME}`: {proxy} is this proxy's own listener; its connections would loop back to itself"
        )));
    }
    Ok(setting)
}

/// `origin` says in errors where the value came from, if not from the option itself.
fn parse(value: &str, origin: &str) -> Result<EgressProxy, ConfigError> {
    let shown = redact_userinfo(value);
    let bad = |why: &str| {
        ConfigError::new(format!(
            "invalid value {shown:?} for option `{NAME}`{origin}: {why}"
        ))
    };
    let expected = "expected http://[USER:PASSWORD@]HOST:PORT, env, or none";
    let Some((scheme, rest)) = value.split_once("://") else {
        return Err(bad(expected));
    };
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(bad(
            "the egress proxy is spoken to in plain http:// (CONNECT; TLS runs inside the tunnel); other schemes are not supported",
        ));
    }
    let url = url::Url::parse(value).map_err(|e| bad(&format!("not a URL: {e}")))?;
    let host = match url.host() {
        Some(url::Host::Domain(d)) if !d.is_empty() => d.to_ascii_lowercase(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        _ => return Err(bad("no host")),
    };
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err(bad("takes no path, query or fragment"));
    }
    // The url crate forgets an explicit `:80`; a missing port is refused rather than
    // guessed (tools disagree: 80, 1080, 3128, 8080).
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let has_port = hostport
        .rsplit_once(':')
        .is_some_and(|(h, p)| !p.is_empty() && (!h.contains(':') || h.ends_with(']')));
    if !has_port {
        return Err(bad("the port is required, e.g. http://proxy.example:3128"));
    }
    let port = url.port_or_known_default().ok_or_else(|| bad("no port"))?;
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
            NAME,
            "put the real password in the URL, or the whole URL in LINE_RETRY_PROXY_UPSTREAM_PROXY",
        ));
    }
    Ok(EgressProxy {
        host,
        port,
        username: decode(url.username())?,
        password: password.map(Secret),
    })
}

fn is_own_listener(proxy: &EgressProxy, listen: SocketAddr) -> bool {
    if proxy.port != listen.port() {
        return false;
    }
    match proxy.host.parse::<IpAddr>() {
        Ok(ip) => ip == listen.ip() || (ip.is_loopback() && listen.ip().is_loopback()),
        Err(_) => proxy.host == "localhost" && listen.ip().is_loopback(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTEN: &str = "127.0.0.1:8080";

    fn parse_with(value: &str, vars: &[(&str, &str)]) -> Result<UpstreamProxy, ConfigError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let env = move |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        upstream_proxy(Some(value.to_owned()), &env, LISTEN.parse().unwrap())
    }

    fn fixed(value: &str) -> EgressProxy {
        match parse_with(value, &[]).unwrap() {
            UpstreamProxy::Fixed(p) => p,
            other => panic!("not fixed: {other:?}"),
        }
    }

    #[test]
    fn the_accepted_forms() {
        let p = fixed("http://corp%5Cbot:p%40ss%3Aword@Proxy.Example:3128");
        assert_eq!((p.host.as_str(), p.port), ("proxy.example", 3128));
        assert_eq!(p.username.as_deref(), Some("corp\\bot"));
        assert_eq!(p.password.as_ref().map(Secret::expose), Some("p@ss:word"));
        assert_eq!(
            p.to_string(),
            "http://corp\\bot:<masked>@proxy.example:3128"
        );
        let p = fixed("http://[::1]:80/");
        assert_eq!((p.host.as_str(), p.port), ("::1", 80));
        assert_eq!(p.to_string(), "http://[::1]:80");
        assert!(p.username.is_none() && p.password.is_none());
        for direct in ["", "none", "  "] {
            assert_eq!(parse_with(direct, &[]).unwrap(), UpstreamProxy::Direct);
        }
    }

    #[test]
    fn refused_forms_name_the_option_and_never_the_password() {
        for bad in [
            "https://u:hunter2@proxy:443",
            "socks5://u:hunter2@proxy:1080",
            "http://u:hunter2@proxy",
            "http://u:hunter2@proxy:3128/path",
            "http://u:hunter2@proxy:3128?x=1",
            "http://u:hunter2@:3128",
            "u:hunter2@proxy:3128",
            "proxy:3128",
        ] {
            let err = parse_with(bad, &[]).unwrap_err().to_string();
            assert!(err.contains("`upstream-proxy`"), "{bad}: {err}");
            assert!(!err.contains("hunter2"), "{bad}: {err}");
        }
    }

    #[test]
    fn env_is_opt_in_and_reads_the_conventional_variables() {
        let vars = [
            ("HTTPS_PROXY", "corp:hunter2@proxy.example:3128"),
            ("https_proxy", "http://other:1"),
            (
                "no_proxy",
                "internal.example, .svc, 10.0.0.0/8, 127.0.0.1:9999",
            ),
        ];
        assert_eq!(parse_with("", &vars).unwrap(), UpstreamProxy::Direct);
        let setting = parse_with("env", &vars).unwrap();
        let via = setting
            .route("api.line.me", 443)
            .expect("through the proxy");
        assert_eq!(via.to_string(), "http://corp:<masked>@proxy.example:3128");
        assert!(setting.route("internal.example", 443).is_none());
        assert!(setting.route("a.internal.example", 443).is_none());
        assert!(setting.route("x.svc", 443).is_none());
        assert!(setting.route("svc", 443).is_some(), ".svc: subdomains only");
        assert!(setting.route("10.1.2.3", 443).is_none());
        assert!(setting.route("11.1.2.3", 443).is_some());
        assert!(setting.route("127.0.0.1", 9999).is_none());
        assert!(setting.route("127.0.0.1", 9998).is_some());
        assert!(!setting.describe().contains("hunter2"));
        assert!(!format!("{setting:?}").contains("hunter2"));
        assert!(!setting.to_string().contains("hunter2"));

        let unset = parse_with("env", &[("HTTPS_PROXY", " ")]).unwrap();
        assert!(unset.route("api.line.me", 443).is_none());
        let err = parse_with("env", &[("HTTPS_PROXY", "https://u:hunter2@p:1")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("from HTTPS_PROXY") && !err.contains("hunter2"),
            "{err}"
        );
    }

    #[test]
    fn no_proxy_entries() {
        let all = NoProxy::parse("*");
        assert!(all.bypasses("anything.example", 1));
        let v6 = NoProxy::parse("[::1]:8443,fd00::/8");
        assert!(v6.bypasses("::1", 8443));
        assert!(!v6.bypasses("::1", 443));
        assert!(v6.bypasses("[fd12::1]", 443));
        assert!(!v6.bypasses("fe80::1", 443));
        let names = NoProxy::parse("*.Example.com., LINE.me");
        assert!(names.bypasses("a.example.com", 443));
        assert!(!names.bypasses("example.com", 443));
        assert!(names.bypasses("api.line.me.", 443));
        assert!(!names.bypasses("notline.me", 443));
        assert!(!NoProxy::parse("10.0.0.0/99").bypasses("10.0.0.1", 1));
    }

    #[test]
    fn the_own_listener_is_refused() {
        for own in [
            "http://127.0.0.1:8080",
            "http://localhost:8080",
            "http://127.0.0.2:8080",
        ] {
            let err = parse_with(own, &[]).unwrap_err().to_string();
            assert!(err.contains("loop"), "{own}: {err}");
        }
        let err = parse_with("env", &[("HTTPS_PROXY", "http://127.0.0.1:8080")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("loop"), "{err}");
        assert!(parse_with("http://127.0.0.1:8081", &[]).is_ok());
        assert!(parse_with("http://proxy.example:8080", &[]).is_ok());
    }
}
