//! Phase 3, fingerprint: what makes two requests "the same send".
//!
//! Getting this wrong is cache poisoning: two different sends sharing a fingerprint
//! would answer one bot with another's result, and two channels sharing one would leak
//! answers across tenants. So the hash covers, length-prefixed and versioned:
//! the caller scope (a hash of the Authorization credential, never the credential),
//! the method, the path and query, the bot's own retry key if it sent one, and the body.

use http::{HeaderMap, Method};
use sha2::{Digest, Sha256};

use super::canonical::canonical;
use crate::domain::Fingerprint;

/// Bump when the hashed tuple changes: old fingerprints must never match new ones.
const VERSION: &[u8] = b"line-retry-proxy/fingerprint/v1\0";
const SCOPE_VERSION: &[u8] = b"line-retry-proxy/scope/v1\0";

/// Who is asking: a hash of the Authorization value. Requests without one share the
/// empty scope, which LINE rejects anyway.
pub fn caller_scope(headers: &HeaderMap) -> [u8; 32] {
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
        caller_scope(&h)
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
