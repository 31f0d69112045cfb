//! Phase 1, classify: is this one of the four endpoints that take a retry key?

use bytes::Bytes;
use http::{Method, StatusCode};

/// The four LINE endpoints that accept `X-Line-Retry-Key` (LINE-API.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Push,
    Multicast,
    Narrowcast,
    Broadcast,
}

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
    match path {
        "/v2/bot/message/push" => Route::Keyed(Endpoint::Push),
        "/v2/bot/message/multicast" => Route::Keyed(Endpoint::Multicast),
        "/v2/bot/message/narrowcast" => Route::Keyed(Endpoint::Narrowcast),
        "/v2/bot/message/broadcast" => Route::Keyed(Endpoint::Broadcast),
        _ => Route::Passthrough,
    }
}

impl Endpoint {
    pub const ALL: [Endpoint; 4] = [
        Endpoint::Push,
        Endpoint::Multicast,
        Endpoint::Narrowcast,
        Endpoint::Broadcast,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    /// The name used in config tables, metric labels and log lines.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Push => "push",
            Endpoint::Multicast => "multicast",
            Endpoint::Narrowcast => "narrowcast",
            Endpoint::Broadcast => "broadcast",
        }
    }

    pub fn from_name(name: &str) -> Option<Endpoint> {
        Endpoint::ALL.into_iter().find(|e| e.name() == name)
    }

    /// What LINE answers when it accepts a request: used to turn a 409 for our own
    /// derived key back into the success the bot would have seen the first time.
    pub fn success_status(self) -> StatusCode {
        match self {
            Endpoint::Narrowcast => StatusCode::ACCEPTED,
            _ => StatusCode::OK,
        }
    }

    /// The success body when it carries nothing (`{}`); push builds its own from
    /// the 409's `sentMessages`.
    pub fn empty_success_body() -> Bytes {
        Bytes::from_static(b"{}")
    }
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
