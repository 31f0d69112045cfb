//! Phase 4, key: the `X-Line-Retry-Key` this request is sent with.
//!
//! A bot's own non-empty key is kept exactly. Otherwise the key is a name-based UUID
//! (v5) of the fingerprint under a fixed namespace: the same request yields the same
//! key after a restart, on another replica, or with no store at all, so LINE itself
//! still refuses a duplicate the store did not catch.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use uuid::Uuid;

use super::fingerprint::Fingerprint;
use crate::config::MAX_DEDUP_WINDOW;

/// The project's namespace for derived keys. Changing it changes every key.
const NAMESPACE: Uuid = Uuid::from_u128(0x6c1e_7e2a_55b0_4f0e_9d3c_2b7a_1f48_c0de);

pub const HEADER: &str = "x-line-retry-key";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryKey {
    /// The bot sent its own: we forward it and pass its 409s through untranslated.
    Client(HeaderValue),
    /// Derived here: a 409 means one of our own earlier attempts was accepted.
    Derived(Uuid),
}

impl RetryKey {
    pub fn header_value(&self) -> HeaderValue {
        match self {
            RetryKey::Client(v) => v.clone(),
            RetryKey::Derived(u) => {
                let mut buf = Uuid::encode_buffer();
                let text = u.hyphenated().encode_lower(&mut buf);
                // Hyphenated lower-case hex is always a valid header value.
                HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static(""))
            }
        }
    }

    pub fn is_derived(&self) -> bool {
        matches!(self, RetryKey::Derived(_))
    }
}

impl std::fmt::Display for RetryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RetryKey::Client(v) => f.write_str(v.to_str().unwrap_or("<non-ascii>")),
            RetryKey::Derived(u) => write!(f, "{}", u.hyphenated()),
        }
    }
}

/// The key for `fp` when the dedup window is `window`. With the full 24 h window the
/// key is the fingerprint's alone, as LINE forgets keys after 24 h. With a shorter
/// window the window's index in time is mixed in, so an identical request in a later
/// window is a new send at LINE too, not a 409.
pub fn derive(fp: &Fingerprint, window: Duration, now: SystemTime) -> RetryKey {
    if window >= MAX_DEDUP_WINDOW || window.is_zero() {
        return RetryKey::Derived(Uuid::new_v5(&NAMESPACE, &fp.0));
    }
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
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

    const DAY: Duration = MAX_DEDUP_WINDOW;

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

    proptest! {
        #[test]
        fn distinct_fingerprints_give_distinct_keys(a: [u8; 32], b: [u8; 32]) {
            prop_assume!(a != b);
            let now = SystemTime::now();
            prop_assert_ne!(derive(&Fingerprint(a), DAY, now), derive(&Fingerprint(b), DAY, now));
        }
    }
}
