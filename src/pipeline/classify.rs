//! Phase 1, classify: is this one of the four endpoints that take a retry key?
//!
//! A path is read as a web server routes it: `%XX` escapes of unreserved characters
//! (RFC 3986 §2.3) are the characters themselves, so `/v2/bot/message/%70ush` is push
//! and gets its key like any push. The edge rewrites such paths before the pipeline
//! sees them ([`normalize_path`]), so the fingerprint and the upstream see one spelling.

use std::borrow::Cow;

use http::Method;

use crate::domain::Endpoint;

/// Where a request goes: the keyed path with fingerprint, key, store and retries,
/// or straight through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Keyed(Endpoint),
    Passthrough,
}

pub fn classify(method: &Method, path: &str) -> Route {
    if method != Method::POST {
        return Route::Passthrough;
    }
    let path = normalize_path(path);
    Endpoint::ALL
        .into_iter()
        .find(|e| e.path() == path)
        .map_or(Route::Passthrough, Route::Keyed)
}

/// `path` with every `%XX` escape of an unreserved character decoded; other escapes
/// are kept as written. Borrowed when there is nothing to decode.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if let Some(c) = unreserved_escape(bytes, i) {
            out.push(c);
            i += 3;
        } else if bytes[i] == b'%' && !is_escape(bytes, i) {
            // A stray `%` is escaped itself, so that a decoded character can never
            // complete it into a new escape (`%%370ush` must not become `%70ush`).
            out.push_str("%25");
            i += 1;
        } else {
            // Only ASCII is decoded, so every other byte is copied within its character.
            let len = utf8_len(bytes[i]);
            out.push_str(path.get(i..i + len).unwrap_or_default());
            i += len;
        }
    }
    Cow::Owned(out)
}

/// Whether `bytes[i..i + 3]` is a `%XX` escape.
fn is_escape(bytes: &[u8], i: usize) -> bool {
    bytes.get(i) == Some(&b'%')
        && bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
        && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
}

/// Whether `path` has a `%` that does not start a `%XX` escape: no valid request
/// target does, and servers disagree on what it means.
pub(crate) fn malformed_escape(path: &str) -> bool {
    let bytes = path.as_bytes();
    bytes
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'%' && !is_escape(bytes, i))
}

/// The unreserved character escaped at `bytes[i..i + 3]`, if that is one.
fn unreserved_escape(bytes: &[u8], i: usize) -> Option<char> {
    if bytes.get(i) != Some(&b'%') {
        return None;
    }
    let hex = |b: u8| (b as char).to_digit(16);
    let high = hex(*bytes.get(i + 1)?)?;
    let low = hex(*bytes.get(i + 2)?)?;
    let c = char::from((high * 16 + low) as u8);
    is_unreserved(c).then_some(c)
}

fn is_unreserved(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~')
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0.. => 4,
        0xE0.. => 3,
        0xC0.. => 2,
        _ => 1,
    }
}

/// Whether a request is certainly not one of the keyed sends, whatever LINE's router
/// makes of its path: any method but POST, or a plain path (unreserved characters
/// and single slashes, no dot segments, no trailing slash) that is not a keyed
/// endpoint's in any letter case. Only then may a stray retry key be removed.
pub fn certainly_unkeyed(method: &Method, path: &str) -> bool {
    if method != Method::POST {
        return true;
    }
    let path = normalize_path(path);
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let plain = rest
        .split('/')
        .all(|s| !s.is_empty() && s != "." && s != ".." && s.chars().all(is_unreserved));
    plain
        && !Endpoint::ALL
            .into_iter()
            .any(|e| e.path().eq_ignore_ascii_case(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_post_on_exact_paths_is_keyed() {
        assert_eq!(
            classify(&Method::POST, "/v2/bot/message/push"),
            Route::Keyed(Endpoint::Push)
        );
        assert_eq!(
            classify(&Method::POST, "/v2/bot/message/narrowcast"),
            Route::Keyed(Endpoint::Narrowcast)
        );
        assert_eq!(
            classify(&Method::GET, "/v2/bot/message/push"),
            Route::Passthrough
        );
        assert_eq!(
            classify(&Method::POST, "/v2/bot/message/reply"),
            Route::Passthrough
        );
        assert_eq!(
            classify(&Method::POST, "/v2/bot/message/push/"),
            Route::Passthrough
        );
        assert_eq!(
            classify(&Method::POST, "/v2/bot/message/validate/push"),
            Route::Passthrough
        );
    }

    #[test]
    fn unreserved_escapes_are_the_characters_themselves() {
        for path in [
            "/v2/bot/message/%70ush",
            "/v2/bot/message/%70%75%73%68",
            "/v2/bot/%6Dessage/push",
            "/v2/bot/%6dessage/push",
        ] {
            assert_eq!(
                classify(&Method::POST, path),
                Route::Keyed(Endpoint::Push),
                "{path}"
            );
        }
        assert_eq!(normalize_path("/a%2Fb%zz%7e%"), "/a%2Fb%25zz~%25");
        assert!(
            malformed_escape("/a%zz") && malformed_escape("/a%4") && !malformed_escape("/a%41")
        );
        assert_eq!(normalize_path("/caf\u{e9}%41"), "/caf\u{e9}A");
        assert!(matches!(normalize_path("/plain"), Cow::Borrowed(_)));
        assert_eq!(
            classify(&Method::POST, "/v2/bot/message%2Fpush"),
            Route::Passthrough
        );
    }

    /// Found by the classify_path fuzz target: decoding `%35` completed the stray `%3`
    /// before it into a new escape, so a second pass decoded again.
    #[test]
    fn normalising_never_makes_a_new_escape() {
        for path in ["v)btv/;%3%35ush", "/v2/bot/message/%%370ush", "/%%%37%30"] {
            let once = normalize_path(path);
            assert_eq!(normalize_path(&once), once, "{path}");
        }
        assert_eq!(
            classify(&Method::POST, "/v2/bot/message/%%370ush"),
            Route::Passthrough
        );
    }

    #[test]
    fn a_key_is_stripped_only_where_the_path_is_certainly_unkeyed() {
        assert!(certainly_unkeyed(&Method::POST, "/v2/bot/message/reply"));
        assert!(certainly_unkeyed(&Method::GET, "/v2/bot/message/push"));
        for uncertain in [
            "/v2/bot/message/push",
            "/v2/bot/message/%70ush",
            "/v2/bot/message//push",
            "/v2/bot/message/./push",
            "/v2/bot/message/x/../push",
            "/v2/bot/message/push/",
            "/v2/bot/message%2Fpush",
            "/V2/BOT/message/push",
            "v2/bot/message/push",
            "/v2/bot/message/p%C3%BCsh",
        ] {
            assert!(!certainly_unkeyed(&Method::POST, uncertain), "{uncertain}");
        }
    }

    #[test]
    fn names_round_trip() {
        for e in Endpoint::ALL {
            assert_eq!(Endpoint::from_name(e.name()), Some(e));
            assert_eq!(Endpoint::ALL[e.index()], e);
        }
    }
}
