//! Phase 1, classify: is this one of the four endpoints that take a retry key?

use http::Method;

use crate::domain::Endpoint;

/// Where a request goes: the keyed path with fingerprint, key, store and retries,
/// or straight through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Keyed(Endpoint),
    Passthrough,
}

pub fn classify(method: &Method, path: &str) -> Route {
    if method != Method::POST {
        return Route::Passthrough;
    }
    Endpoint::ALL
        .into_iter()
        .find(|e| e.path() == path)
        .map_or(Route::Passthrough, Route::Keyed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_post_on_exact_paths_is_keyed() {
        assert_eq!(
            classify(&Method::POST, "/v2/bot/message/push"),
            Route::Keyed(Endpoint::Push)
        );
        assert_eq!(
            classify(&Method::POST, "/v2/bot/message/narrowcast"),
            Route::Keyed(Endpoint::Narrowcast)
        );
        assert_eq!(
            classify(&Method::GET, "/v2/bot/message/push"),
            Route::Passthrough
        );
        assert_eq!(
            classify(&Method::POST, "/v2/bot/message/reply"),
            Route::Passthrough
        );
        assert_eq!(
            classify(&Method::POST, "/v2/bot/message/push/"),
            Route::Passthrough
        );
        assert_eq!(
            classify(&Method::POST, "/v2/bot/message/validate/push"),
            Route::Passthrough
        );
    }

    #[test]
    fn names_round_trip() {
        for e in Endpoint::ALL {
            assert_eq!(Endpoint::from_name(e.name()), Some(e));
            assert_eq!(Endpoint::ALL[e.index()], e);
        }
    }
}
