//! Path classification with percent-escapes: normalising is idempotent, a path and its
//! normal form classify alike, and a key is never stripped from a keyed path.
#![no_main]

use http::Method;
use libfuzzer_sys::fuzz_target;
use line_retry_proxy::pipeline::classify::{certainly_unkeyed, classify, normalize_path, Route};

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let once = normalize_path(path);
    assert_eq!(
        normalize_path(&once),
        once,
        "normalising twice changes nothing"
    );
    let route = classify(&Method::POST, path);
    assert_eq!(route, classify(&Method::POST, &once));
    if let Route::Keyed(_) = route {
        assert!(!certainly_unkeyed(&Method::POST, path), "{path:?}");
    }
    // What the edge puts in the request line must still be a valid URI path.
    if http::uri::PathAndQuery::try_from(path).is_ok() {
        assert!(
            http::uri::PathAndQuery::try_from(once.as_ref()).is_ok(),
            "{path:?}"
        );
    }
});
