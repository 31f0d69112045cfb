//! CONNECT authority-form and absolute-form targets, as the proxy port reads them:
//! any request target http accepts must give a host and port or a clean error, and
//! the allowlist checks must take whatever host comes out.
#![no_main]

use libfuzzer_sys::fuzz_target;
use line_retry_proxy::config::Config;
use line_retry_proxy::edge::connect::connect_target;
use line_retry_proxy::edge::serve::absolute_target;
use line_retry_proxy::pipeline::classify;

fuzz_target!(|data: &[u8]| {
    let Ok(uri) = http::Uri::try_from(data) else {
        return;
    };
    let policy = &POLICY.policy;
    if let Ok((host, port)) = connect_target(&uri) {
        assert_eq!(host, host.to_ascii_lowercase());
        assert!(!host.starts_with('[') && !host.ends_with(']'));
        let _ = policy.intercepts(&host);
        let _ = policy.tunnel_allowed(&host, port);
    }
    if let Ok((host, port)) = absolute_target(&uri) {
        let _ = policy.intercepts(&host);
        let _ = policy.tunnel_allowed(&host, port);
        let _ = classify::classify(&http::Method::POST, uri.path());
    }
});

static POLICY: std::sync::LazyLock<Config> = std::sync::LazyLock::new(|| {
    Config::from_toml("tunnel-allow = [\"api-data.line.me\", \"127.0.0.1:4443\", \"[::1]:443\"]")
        .expect("a valid config")
});
