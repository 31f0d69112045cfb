//! LINE's 409 body, turned into the endpoint's success: any bytes give valid JSON,
//! never a panic; push keeps an array of sentMessages.
#![no_main]

use libfuzzer_sys::fuzz_target;
use line_retry_proxy::domain::Endpoint;
use line_retry_proxy::pipeline::settle::success_body;

fuzz_target!(|data: &[u8]| {
    for endpoint in Endpoint::ALL {
        let body = success_body(endpoint, data);
        let value: serde_json::Value =
            serde_json::from_slice(&body).expect("the success body is JSON");
        if endpoint == Endpoint::Push {
            assert!(value.get("sentMessages").is_some());
        } else {
            assert_eq!(&body[..], b"{}");
        }
    }
});
