//! Durations (`250ms`, `5s`, `24h`) in every option that takes one: a value or one
//! clear line naming the option, never a panic or an overflow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use line_retry_proxy::config::Config;

const OPTIONS: [&str; 8] = [
    "attempt-timeout",
    "request-deadline",
    "dedup-window",
    "header-timeout",
    "idle-timeout",
    "body-timeout",
    "leaf-lifetime",
    "ca-lifetime",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(value) = std::str::from_utf8(rest) else {
        return;
    };
    let option = OPTIONS[pick as usize % OPTIONS.len()];
    let text = format!("{option} = {}", basic_string(value));
    if let Err(err) = Config::from_toml(&text) {
        let err = err.to_string();
        assert!(!err.contains('\n') && err.contains(option), "{err}");
    }
});

/// `value` as a TOML basic string: quotes, backslashes and control characters escaped.
fn basic_string(value: &str) -> String {
    let mut out = String::from("\"");
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c < ' ' || c == '\u{7f}' => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
