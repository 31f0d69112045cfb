//! `Retry-After` on a 429: any header value gives a delay or none, never a panic or an
//! overflow, and whole seconds are read as such.
#![no_main]

use libfuzzer_sys::fuzz_target;
use line_retry_proxy::pipeline::send::retry_after;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = http::HeaderValue::from_bytes(data) else {
        return;
    };
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::RETRY_AFTER, value);
    if let Some(delay) = retry_after(&headers) {
        let text = std::str::from_utf8(data).expect("a delay comes from ASCII digits");
        assert_eq!(Some(delay.as_secs()), text.trim().parse::<u64>().ok());
    }
});
