//! Phase 3, fingerprint: what makes two requests "the same send".
//!
//! Getting this wrong is cache poisoning: two different sends sharing a fingerprint
//! would answer one bot with another's result, and two channels sharing one would leak
//! answers across tenants. So the hash covers, length-prefixed and versioned:
//! the caller scope, the method, the path and query, the bot's own retry key if it sent
//! one, and the body.
//!
//! The scope is the LINE channel the token belongs to ([`channel_scope`]), so every
//! token of one channel derives the same key, as LINE keeps keys per channel. A token
//! LINE did not vouch for is its own scope ([`unvouched_scope`]); with
//! `key-scope = token` the scope is the Authorization value's hash, exactly as before
//! channels were known ([`token_scope`]). See docs/channels.md.

use http::{HeaderMap, Method};
use sha2::{Digest, Sha256};

use super::canonical::canonical;
use crate::domain::{ChannelId, Fingerprint, TokenTag};

/// Bump when the hashed tuple changes: old fingerprints must never match new ones.
const VERSION: &[u8] = b"line-retry-proxy/fingerprint/v1\0";
/// `key-scope = token`: byte for byte the scope of the versions before channels.
const SCOPE_VERSION: &[u8] = b"line-retry-proxy/scope/v1\0";
const CHANNEL_SCOPE: &[u8] = b"line-retry-proxy/scope/v2/channel\0";
const UNVOUCHED_SCOPE: &[u8] = b"line-retry-proxy/scope/v2/token\0";
const TOKEN_TAG: &[u8] = b"line-retry-proxy/token/v1\0";

/// The access token of `Authorization: Bearer <token>`. The scheme is matched in any
/// letter case (RFC 9110 §11.1) and the spaces around the token are not part of it, so
/// `Bearer  tok` and `bearer tok` are the same token.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The tag of a token (or, for a request without one, of its Authorization value):
/// who may read a kept answer, and the name its channel is cached under.
pub(crate) fn token_tag(token: &[u8]) -> TokenTag {
    let mut h = Sha256::new();
    h.update(TOKEN_TAG);
    h.update(token);
    let digest: [u8; 32] = h.finalize().into();
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&digest[..16]);
    TokenTag(tag)
}

/// The scope of every token LINE says belongs to `channel`.
pub(crate) fn channel_scope(channel: &ChannelId) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(CHANNEL_SCOPE);
    h.update(channel.as_str().as_bytes());
    h.finalize().into()
}

/// The scope of a token LINE did not vouch for (or a request with none): its own,
/// apart from every channel's.
pub(crate) fn unvouched_scope(tag: &TokenTag) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(UNVOUCHED_SCOPE);
    h.update(tag.0);
    h.finalize().into()
}

/// `key-scope = token`: a hash of the Authorization value, as the versions before
/// channel scope derived it. Requests without one share the empty scope, which LINE
/// rejects anyway.
pub(crate) fn token_scope(headers: &HeaderMap) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(SCOPE_VERSION);
    if let Some(auth) = headers.get(http::header::AUTHORIZATION) {
        h.update(auth.as_bytes());
    }
    h.finalize().into()
}

pub struct Request<'a> {
    pub scope: &'a [u8; 32],
    pub method: &'a Method,
    pub path_and_query: &'a str,
    pub client_key: Option<&'a [u8]>,
    pub body: &'a [u8],
}

pub fn fingerprint(req: &Request<'_>, canonical_json: bool) -> Fingerprint {
    let mut h = Sha256::new();
    h.update(VERSION);
    h.update(req.scope);
    field(&mut h, req.method.as_str().as_bytes());
    field(&mut h, req.path_and_query.as_bytes());
    match req.client_key {
        Some(k) => {
            h.update([1]);
            field(&mut h, k);
        }
        None => h.update([0]),
    }
    match canonical_json.then(|| canonical(req.body)).flatten() {
        Some(c) => {
            h.update([1]);
            field(&mut h, &c);
        }
        None => {
            h.update([0]);
            field(&mut h, req.body);
        }
    }
    Fingerprint(h.finalize().into())
}

fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::canonical::tests::json_value;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn scope(token: &str) -> [u8; 32] {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        token_scope(&h)
    }

    fn fp(
        scope: &[u8; 32],
        path: &str,
        key: Option<&str>,
        body: &[u8],
        canonical: bool,
    ) -> Fingerprint {
        fingerprint(
            &Request {
                scope,
                method: &Method::POST,
                path_and_query: path,
                client_key: key.map(str::as_bytes),
                body,
            },
            canonical,
        )
    }

    #[test]
    fn each_part_of_the_tuple_matters() {
        let a = scope("a");
        let base = fp(&a, "/v2/bot/message/push", None, b"{}", false);
        assert_eq!(base, fp(&a, "/v2/bot/message/push", None, b"{}", false));
        assert_ne!(
            base,
            fp(&scope("b"), "/v2/bot/message/push", None, b"{}", false)
        );
        assert_ne!(
            base,
            fp(&a, "/v2/bot/message/broadcast", None, b"{}", false)
        );
        assert_ne!(
            base,
            fp(&a, "/v2/bot/message/push", Some("k"), b"{}", false)
        );
        assert_ne!(base, fp(&a, "/v2/bot/message/push", None, b"{ }", false));
    }

    #[test]
    fn table_hash_is_the_fingerprints_own_prefix() {
        use crate::domain::BuildFingerprintHasher;
        use std::hash::BuildHasher;
        let a = fp(&scope("a"), "/p", None, b"1", false);
        let b = fp(&scope("a"), "/p", None, b"2", false);
        let hasher = BuildFingerprintHasher::default();
        assert_eq!(
            hasher.hash_one(a),
            u64::from_le_bytes(a.0[..8].try_into().unwrap())
        );
        assert_ne!(hasher.hash_one(a), hasher.hash_one(b));
    }

    #[test]
    fn length_prefixes_prevent_boundary_games() {
        let a = scope("a");
        assert_ne!(
            fp(&a, "/p", Some("ab"), b"c", false),
            fp(&a, "/p", Some("a"), b"bc", false)
        );
    }

    #[test]
    fn canonical_json_ignores_spacing_and_key_order() {
        let a = scope("a");
        let python = br#"{"to": "U1", "messages": [{"type": "text", "text": "hi"}]}"#;
        let go = b"{\"messages\":[{\"text\":\"hi\",\"type\":\"text\"}],\"to\":\"U1\"}\n";
        assert_eq!(
            fp(&a, "/p", None, python, true),
            fp(&a, "/p", None, go, true)
        );
        assert_ne!(
            fp(&a, "/p", None, python, false),
            fp(&a, "/p", None, go, false)
        );
        // Not JSON: hashed raw, and never equal to a JSON body's canonical form.
        assert_ne!(
            fp(&a, "/p", None, b"{}", true),
            fp(&a, "/p", None, b"{} x", true)
        );
    }

    fn auth(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(value).unwrap(),
        );
        h
    }

    #[test]
    fn the_bearer_token_ignores_scheme_case_and_spacing() {
        for value in ["Bearer tok", "bearer tok", "BEARER  tok", " Bearer tok  "] {
            assert_eq!(bearer_token(&auth(value)), Some("tok"), "{value:?}");
        }
        for value in ["Bearer", "Bearer   ", "Basic dXNlcg==", "tok", ""] {
            assert_eq!(bearer_token(&auth(value)), None, "{value:?}");
        }
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }

    #[test]
    fn scopes_of_channels_and_unvouched_tokens_never_meet() {
        let a = ChannelId::parse("U0123456789abcdef0123456789abcdef").unwrap();
        let b = ChannelId::parse("U0123456789abcdef0123456789abcdee").unwrap();
        assert_eq!(channel_scope(&a), channel_scope(&a.clone()));
        assert_ne!(channel_scope(&a), channel_scope(&b));
        let tag = token_tag(b"tok");
        assert_ne!(unvouched_scope(&tag), channel_scope(&a));
        assert_ne!(unvouched_scope(&tag), unvouched_scope(&token_tag(b"tok2")));
        assert_ne!(unvouched_scope(&tag), token_scope(&auth("Bearer tok")));
    }

    proptest! {
        #[test]
        fn canonical_fingerprint_is_stable_under_reserialisation(v in json_value()) {
            let a = scope("a");
            let compact = serde_json::to_vec(&v).unwrap();
            let pretty = serde_json::to_vec_pretty(&v).unwrap();
            prop_assert_eq!(fp(&a, "/p", None, &compact, true), fp(&a, "/p", None, &pretty, true));
        }

        #[test]
        fn distinct_bodies_give_distinct_fingerprints(x in prop::collection::vec(any::<u8>(), 0..64), y in prop::collection::vec(any::<u8>(), 0..64)) {
            prop_assume!(x != y);
            let a = scope("a");
            prop_assert_ne!(fp(&a, "/p", None, &x, false), fp(&a, "/p", None, &y, false));
        }
    }
}
