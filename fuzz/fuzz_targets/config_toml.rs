//! The config file: any text gives a config or one clear line, never a panic, and a
//! valid config describes itself as a file that loads to the same settings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use line_retry_proxy::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text) {
        // check-config masks a proxy-auth credential, so that output cannot load again.
        Ok(config) if config.proxy_auth.is_none() => {
            let described = config.describe();
            let again = Config::from_toml(&described).expect("check-config output loads");
            assert_eq!(again.describe(), described);
        }
        Ok(_) => {}
        Err(err) => assert!(!err.to_string().contains('\n'), "one line: {err}"),
    }
});
