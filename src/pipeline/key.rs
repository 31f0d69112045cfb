//! Phase 4, key: the `X-Line-Retry-Key` this request is sent with.
//!
//! A bot's own non-empty key is kept exactly. Otherwise the key is a name-based UUID
//! (v5) of the fingerprint under a fixed namespace: the same request yields the same
//! key after a restart, on another replica, or with no store at all, so LINE itself
//! still refuses a duplicate the store did not catch.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use crate::domain::{Fingerprint, RetryKey, LINE_KEY_LIFETIME};

/// The project's namespace for derived keys. Changing it changes every key.
const NAMESPACE: Uuid = Uuid::from_u128(0x6c1e_7e2a_55b0_4f0e_9d3c_2b7a_1f48_c0de);

/// The key for `fp` when the dedup window is `window`. With the full 24 h window the
/// key is the fingerprint's alone, as LINE forgets keys after 24 h. With a shorter
/// window, the index of the window in which the send was *first seen* is mixed in: an
/// identical request a window after that is a new send at LINE too, not a 409, while
/// a resend of a send whose outcome was unknown keeps its key across a boundary.
pub(crate) fn derive(fp: &Fingerprint, window: Duration, first_seen: SystemTime) -> RetryKey {
    if window >= LINE_KEY_LIFETIME || window.is_zero() {
        return RetryKey::Derived(Uuid::new_v5(&NAMESPACE, &fp.0));
    }
    let since_epoch = first_seen.duration_since(UNIX_EPOCH).unwrap_or_default();
    let index = since_epoch.as_secs() / window.as_secs().max(1);
    let mut name = [0u8; 40];
    name[..32].copy_from_slice(&fp.0);
    name[32..].copy_from_slice(&index.to_be_bytes());
    RetryKey::Derived(Uuid::new_v5(&NAMESPACE, &name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DAY: Duration = LINE_KEY_LIFETIME;

    #[test]
    fn derived_key_is_a_v5_uuid_in_line_format() {
        let key = derive(&Fingerprint([7; 32]), DAY, SystemTime::now());
        let text = key.to_string();
        assert_eq!(text.len(), 36);
        assert_eq!(&text[14..15], "5", "version nibble");
        assert_eq!(key.header_value().to_str().unwrap(), text);
        assert!(key.is_derived());
    }

    #[test]
    fn full_window_key_does_not_depend_on_time() {
        let fp = Fingerprint([1; 32]);
        let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            derive(&fp, DAY, t0),
            derive(&fp, DAY, t0 + Duration::from_secs(90_000))
        );
    }

    #[test]
    fn short_window_key_changes_between_windows() {
        let fp = Fingerprint([1; 32]);
        let hour = Duration::from_secs(3600);
        let t0 = UNIX_EPOCH + Duration::from_secs(3600 * 1000);
        assert_eq!(
            derive(&fp, hour, t0),
            derive(&fp, hour, t0 + Duration::from_secs(3599))
        );
        assert_ne!(derive(&fp, hour, t0), derive(&fp, hour, t0 + hour));
    }

    /// `key-scope = token` is the upgrade path: its keys must be, byte for byte, the
    /// keys of the versions before channel scope. These were printed by version 0.1.
    #[test]
    fn token_scope_keys_are_those_of_the_versions_before_channels() {
        use crate::pipeline::fingerprint::{fingerprint, token_scope, Request};
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_static("Bearer channel-token-1"),
        );
        let scope = token_scope(&headers);
        let fp = fingerprint(
            &Request {
                scope: &scope,
                method: &http::Method::POST,
                path_and_query: "/v2/bot/message/push",
                client_key: None,
                body: br#"{"to":"U1","messages":[{"type":"text","text":"hi"}]}"#,
            },
            false,
        );
        assert_eq!(
            derive(&fp, DAY, SystemTime::now()).to_string(),
            "beaba90c-7cac-53e8-b111-bbf5b29fd027"
        );
        let hour = Duration::from_secs(3600);
        let at = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(
            derive(&fp, hour, at).to_string(),
            "82fb0007-0249-5388-a688-6c3af2c814ba"
        );
    }

    proptest! {
        #[test]
        fn distinct_fingerprints_give_distinct_keys(a: [u8; 32], b: [u8; 32]) {
            prop_assume!(a != b);
            let now = SystemTime::now();
            prop_assert_ne!(derive(&Fingerprint(a), DAY, now), derive(&Fingerprint(b), DAY, now));
        }
    }
}
