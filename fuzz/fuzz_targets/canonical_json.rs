//! Canonical JSON and the fingerprint over it: canonicalising is idempotent, never
//! panics on any bytes, and canonical-json on makes a body and its canonical form the
//! same send.
#![no_main]

use http::Method;
use libfuzzer_sys::fuzz_target;
use line_retry_proxy::pipeline::canonical::canonical;
use line_retry_proxy::pipeline::fingerprint::{fingerprint, Request};

fuzz_target!(|data: &[u8]| {
    let fp = |body: &[u8], canonical_json: bool| {
        fingerprint(
            &Request {
                scope: &[7; 32],
                method: &Method::POST,
                path_and_query: "/v2/bot/message/push",
                client_key: None,
                body,
            },
            canonical_json,
        )
    };
    let raw = fp(data, true);
    assert_eq!(raw, fp(data, true), "deterministic");
    if let Some(once) = canonical(data) {
        assert_eq!(canonical(&once).as_deref(), Some(&once[..]), "idempotent");
        assert_eq!(
            fp(&once, true),
            raw,
            "a body and its canonical form are one send"
        );
        // Where serde_json can read the input (it refuses numbers past f64, which
        // canonical keeps as written), it reads the canonical form as the same JSON.
        if let Ok(a) = serde_json::from_slice::<serde_json::Value>(data) {
            let b: serde_json::Value =
                serde_json::from_slice(&once).expect("serde_json reads the canonical form too");
            assert_eq!(a, b);
        }
    }
});
