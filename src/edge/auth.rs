//! `Proxy-Authorization: Basic` for CONNECT and absolute-form requests. Base-URL
//! requests never carry it (the SDKs cannot send it), so it does not apply to them.

use base64::Engine;

use crate::config::Secret;

/// Whether `headers` satisfy the proxy's credential, when one is required.
pub(crate) fn authorized(expected: Option<&Secret>, headers: &http::HeaderMap) -> bool {
    let Some(expected) = expected else {
        return true;
    };
    let Some(given) = headers
        .get(http::header::PROXY_AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, encoded)) = given.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    constant_time_eq(&decoded, expected.expose().as_bytes())
}

/// Compares without an early exit, so the time taken does not reveal a prefix match.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"bot:pw", b"bot:pw"));
        assert!(!constant_time_eq(b"bot:pw", b"bot:px"));
        assert!(!constant_time_eq(b"bot:p", b"bot:pw"));
    }
}
