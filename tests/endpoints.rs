//! Every keyed endpoint, walked through everything an endpoint row feeds: its config
//! table, classification, the key the proxy adds, LINE's 409 for that key turned into the
//! endpoint's own success, its metric series and its row of `stats`. The walk is over
//! `Endpoint::ALL`, so an endpoint row added to the enum but missed anywhere fails here,
//! not at a bot's first request.

mod support;

use http::Method;
use line_retry_proxy::admin_client::stats_table;
use line_retry_proxy::config::Config;
use line_retry_proxy::domain::Endpoint;
use line_retry_proxy::pipeline::classify::{classify, Route};
use support::mock_line::{Fault, MockLine};
use support::proxy::{post, push_body, Proxy, TOKEN};

fn body_for(endpoint: Endpoint) -> String {
    match endpoint {
        Endpoint::Push => push_body("walked"),
        _ => r#"{"to":["U1","U2"],"messages":[{"type":"text","text":"walked"}]}"#.to_owned(),
    }
}

#[test]
fn every_endpoint_has_its_own_config_table() {
    for endpoint in Endpoint::ALL {
        let name = endpoint.name();
        let config = Config::from_toml(&format!(
            "dedup-window = \"2h\"\n[endpoints.{name}]\ndedup-window = \"10m\"\nretry = false"
        ))
        .unwrap_or_else(|e| panic!("[endpoints.{name}] is refused: {e}"));
        let own = config.policy.endpoint(endpoint);
        assert_eq!(own.dedup_window.as_secs(), 600, "{name}: its window");
        assert!(!own.retry, "{name}: its retry switch");
        for other in Endpoint::ALL.into_iter().filter(|&o| o != endpoint) {
            let theirs = config.policy.endpoint(other);
            assert_eq!(
                (theirs.dedup_window.as_secs(), theirs.retry),
                (7200, true),
                "[endpoints.{name}] changed {}",
                other.name()
            );
        }
        assert!(
            config.describe().contains(&format!(
                "[endpoints.{name}]\ndedup-window = \"10m\"\nretry = false\n"
            )),
            "check-config shows [endpoints.{name}]"
        );
        assert_eq!(Endpoint::from_name(name), Some(endpoint), "{name} by name");
    }
}

#[test]
fn every_endpoint_is_classified_keyed_and_nothing_near_it_is() {
    for endpoint in Endpoint::ALL {
        let path = endpoint.path();
        assert_eq!(
            classify(&Method::POST, path),
            Route::Keyed(endpoint),
            "{path}"
        );
        assert_eq!(
            classify(&Method::GET, path),
            Route::Passthrough,
            "GET {path}"
        );
        assert_eq!(
            classify(&Method::POST, &format!("{path}/")),
            Route::Passthrough,
            "{path}/"
        );
    }
}

/// Through the real server: LINE accepts, then answers 500; the retry under the same
/// key gets LINE's 409, which the bot must see as the endpoint's own success.
#[tokio::test]
async fn every_endpoint_is_keyed_settled_counted_and_shown() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    for (sent, endpoint) in Endpoint::ALL.into_iter().enumerate() {
        let name = endpoint.name();
        mock.script([Fault::AcceptThenStatus(500)]);
        let reply = post(&proxy, endpoint.path(), TOKEN, &body_for(endpoint)).await;
        assert_eq!(
            reply.status,
            endpoint.success_status(),
            "{name}: {:?}",
            reply.body
        );
        assert_eq!(reply.outcome(), "conflict-resolved", "{name}");
        let key = reply.header("x-line-retry-key").to_owned();
        assert!(!key.is_empty(), "{name}: the bot is told its key");

        let requests = mock.requests();
        let attempts: Vec<_> = requests
            .iter()
            .filter(|r| r.path == endpoint.path())
            .collect();
        assert_eq!(attempts.len(), 2, "{name}: the attempt and its retry");
        assert!(
            attempts
                .iter()
                .all(|r| r.retry_key.as_deref() == Some(&key)),
            "{name}: both attempts carry the key the bot was told"
        );
        assert_eq!(mock.delivered_count(), sent + 1, "{name}: delivered once");

        let series = format!(
            "line_retry_proxy_requests_total{{endpoint=\"{name}\",outcome=\"conflict_resolved\"}}"
        );
        assert_eq!(proxy.metric(&series).await, 1.0, "{series}");
        let injected = format!("line_retry_proxy_keys_injected_total{{endpoint=\"{name}\"}}");
        assert_eq!(proxy.metric(&injected).await, 1.0, "{injected}");
    }

    let stats = stats_table(&proxy.metrics().await);
    for endpoint in Endpoint::ALL {
        let name = endpoint.name();
        let row = stats
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name} in stats:\n{stats}"));
        let counts: Vec<&str> = row.split_whitespace().skip(1).collect();
        assert_eq!(
            counts,
            ["0", "0", "0", "1", "0", "0"],
            "{name}: one conflict-resolved answer, under the header's columns:\n{stats}"
        );
    }
}
