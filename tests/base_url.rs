//! Base-URL mode end to end: a bot posts to the proxy, the proxy talks TLS to a mock
//! LINE that emulates the retry-key semantics and scripted faults. Every test asserts
//! what LINE *delivered*, not only what the bot was told.

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use support::mock_line::{Fault, MockLine};
use support::proxy::{post, push, push_body, send, Proxy, ANSWER_LIMIT, TOKEN};
use support::tunnel::read_to_close;
use support::within;

const PUSH: &str = "/v2/bot/message/push";

fn is_v5_uuid(key: &str) -> bool {
    uuid::Uuid::parse_str(key).is_ok_and(|u| u.get_version_num() == 5) && key.len() == 36
}

#[tokio::test]
async fn push_gets_a_derived_key_and_is_delivered_once() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;

    let reply = push(&proxy, &push_body("hello")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.outcome(), "fresh");
    let key = reply.header("x-line-retry-key").to_owned();
    assert!(is_v5_uuid(&key), "{key}");
    assert_eq!(reply.json()["sentMessages"].as_array().unwrap().len(), 1);

    let delivered = mock.deliveries();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].retry_key.as_deref(), Some(key.as_str()));
    assert_eq!(delivered[0].authorization.as_deref(), Some(TOKEN));
    assert_eq!(reply.header("x-line-request-id"), delivered[0].request_id);
}

#[tokio::test]
async fn the_bots_resend_is_answered_from_the_store() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let first = push(&proxy, &push_body("once")).await;
    let again = push(&proxy, &push_body("once")).await;

    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.outcome(), "replayed");
    assert_eq!(again.body, first.body, "the original sentMessages");
    assert_eq!(
        again.header("x-line-request-id"),
        first.header("x-line-request-id")
    );
    assert_eq!(
        again.header("x-line-retry-key"),
        first.header("x-line-retry-key")
    );
    assert_eq!(mock.requests().len(), 1, "the resend never reached LINE");
    assert_eq!(mock.delivered_count(), 1);
}

#[tokio::test]
async fn different_messages_channels_and_endpoints_get_different_keys() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let a = push(&proxy, &push_body("a")).await;
    let b = push(&proxy, &push_body("b")).await;
    let other_channel = post(&proxy, PUSH, "Bearer channel-token-b", &push_body("a")).await;
    let keys = [&a, &b, &other_channel].map(|r| r.header("x-line-retry-key").to_owned());
    assert!(
        keys[0] != keys[1] && keys[0] != keys[2] && keys[1] != keys[2],
        "{keys:?}"
    );
    assert!([&a, &b, &other_channel]
        .iter()
        .all(|r| r.outcome() == "fresh"));
    assert_eq!(mock.delivered_count(), 3);
}

#[tokio::test]
async fn every_keyed_endpoint_gets_its_own_success() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let body = r#"{"to":["U1","U2"],"messages":[{"type":"text","text":"hi"}]}"#;
    for (path, status) in [
        ("/v2/bot/message/multicast", StatusCode::OK),
        ("/v2/bot/message/narrowcast", StatusCode::ACCEPTED),
        ("/v2/bot/message/broadcast", StatusCode::OK),
    ] {
        let reply = post(&proxy, path, TOKEN, body).await;
        assert_eq!(reply.status, status, "{path}");
        assert!(is_v5_uuid(reply.header("x-line-retry-key")));
    }
    assert_eq!(mock.delivered_count(), 3);
    assert!(mock.deliveries().iter().all(|d| d.retry_key.is_some()));
}

/// One scripted fault, then normal behaviour: the bot must see one success and LINE
/// must have delivered exactly once.
async fn survives(faults: Vec<Fault>, extra: &[&str]) -> (MockLine, support::proxy::Reply) {
    let mock = MockLine::start().await;
    mock.script(faults);
    let proxy = Proxy::start(&mock, extra).await;
    let reply = push(&proxy, &push_body("through the storm")).await;
    assert!(
        reply.status.is_success(),
        "{} {:?}",
        reply.status,
        reply.body
    );
    assert_eq!(mock.delivered_count(), 1, "exactly one delivery");
    let keys: Vec<_> = mock
        .requests()
        .iter()
        .map(|r| r.retry_key.clone())
        .collect();
    assert!(
        keys.windows(2).all(|w| w[0] == w[1]),
        "every attempt carries the same key: {keys:?}"
    );
    (mock, reply)
}

#[tokio::test]
async fn retries_5xx_with_the_same_key() {
    let (mock, reply) = survives(vec![Fault::Status(500), Fault::Status(503)], &[]).await;
    assert_eq!(mock.requests().len(), 3);
    assert_eq!(reply.outcome(), "fresh");
}

#[tokio::test]
async fn accept_then_500_resolves_the_409_into_the_original_success() {
    let (mock, reply) = survives(vec![Fault::AcceptThenStatus(500)], &[]).await;
    assert_eq!(mock.requests().len(), 2);
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.outcome(), "conflict-resolved");
    let delivery = &mock.deliveries()[0];
    assert_eq!(
        reply.header("x-line-request-id"),
        delivery.request_id,
        "the accepted request's id"
    );
    assert_eq!(reply.json()["sentMessages"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn hang_times_out_and_is_retried() {
    let (mock, _) = survives(vec![Fault::Hang], &["--attempt-timeout=300ms"]).await;
    assert_eq!(mock.requests().len(), 2);
}

#[tokio::test]
async fn accept_then_hang_is_not_a_second_message() {
    let (mock, reply) = survives(vec![Fault::AcceptThenHang], &["--attempt-timeout=300ms"]).await;
    assert_eq!(mock.requests().len(), 2);
    assert_eq!(reply.outcome(), "conflict-resolved");
}

#[tokio::test]
async fn connection_reset_is_retried() {
    let (mock, _) = survives(vec![Fault::Reset, Fault::Reset], &[]).await;
    assert_eq!(mock.requests().len(), 3);
}

#[tokio::test]
async fn narrowcast_conflict_becomes_202() {
    let mock = MockLine::start().await;
    mock.script([Fault::AcceptThenStatus(502)]);
    let proxy = Proxy::start(&mock, &[]).await;
    let reply = post(
        &proxy,
        "/v2/bot/message/narrowcast",
        TOKEN,
        r#"{"messages":[]}"#,
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(reply.outcome(), "conflict-resolved");
    assert_eq!(reply.body, "{}");
    assert_eq!(mock.delivered_count(), 1);
}

#[tokio::test]
async fn rate_limit_is_not_retried_by_default() {
    let mock = MockLine::start().await;
    mock.script([Fault::RateLimited { retry_after: None }]);
    let proxy = Proxy::start(&mock, &[]).await;
    let reply = push(&proxy, &push_body("x")).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(mock.requests().len(), 1);
    assert_eq!(mock.delivered_count(), 0);
    // Not stored: the bot's resend goes to LINE again.
    let again = push(&proxy, &push_body("x")).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(mock.delivered_count(), 1);
}

#[tokio::test]
async fn rate_limit_is_retried_when_configured_but_never_the_monthly_limit() {
    let mock = MockLine::start().await;
    mock.script([Fault::RateLimited {
        retry_after: Some(0),
    }]);
    let proxy = Proxy::start(&mock, &["--retry-on-429"]).await;
    assert_eq!(push(&proxy, &push_body("x")).await.status, StatusCode::OK);
    assert_eq!(mock.requests().len(), 2);

    mock.script([Fault::MonthlyLimit]);
    let reply = push(&proxy, &push_body("y")).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(mock.requests().len(), 3, "the monthly limit is final");
}

#[tokio::test]
async fn client_errors_are_never_retried() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let reply = send(
        Method::POST,
        &proxy.url(PUSH),
        &[("content-type", "application/json")],
        push_body("no token"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(mock.requests().len(), 1);
}

#[tokio::test]
async fn exhausted_5xx_returns_lines_answer_and_is_not_stored() {
    let mock = MockLine::start().await;
    mock.script(vec![Fault::Status(500); 3]);
    let proxy = Proxy::start(&mock, &["--max-attempts=3"]).await;
    let reply = push(&proxy, &push_body("x")).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(reply.outcome(), "error");
    assert_eq!(mock.requests().len(), 3, "bounded by --max-attempts");
    assert_eq!(mock.delivered_count(), 0);

    let again = push(&proxy, &push_body("x")).await;
    assert_eq!(
        again.status,
        StatusCode::OK,
        "a resend after an outage is sent, under the same key"
    );
    assert_eq!(
        again.header("x-line-retry-key"),
        reply.header("x-line-retry-key")
    );
    assert_eq!(mock.delivered_count(), 1);
}

#[tokio::test]
async fn exhausted_timeouts_are_a_504_with_a_reason() {
    let mock = MockLine::start().await;
    mock.script(vec![Fault::Hang; 2]);
    let proxy = Proxy::start(&mock, &["--max-attempts=2", "--attempt-timeout=200ms"]).await;
    let reply = push(&proxy, &push_body("x")).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.json()["reason"], "upstream_timeout");
    assert_eq!(reply.header("x-line-retry-proxy-error"), "upstream_timeout");
    assert_eq!(mock.requests().len(), 2);
}

#[tokio::test]
async fn unreachable_upstream_is_a_502_after_bounded_attempts() {
    let mock = MockLine::start().await;
    // Token scope: with channel scope the token's lookup meets the closed port first
    // (tests/channels.rs has that case); this test is about the send's own attempts.
    let mut proxy_args = vec![
        "--max-attempts=3".to_owned(),
        "--key-scope=token".to_owned(),
    ];
    // A port that was just free: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    proxy_args.push(format!("--upstream=https://{closed}"));
    let args: Vec<&str> = proxy_args.iter().map(String::as_str).collect();
    let proxy = Proxy::start(&mock, &args).await;
    let reply = push(&proxy, &push_body("x")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.json()["reason"], "upstream_unreachable");
    assert_eq!(reply.json()["retryable"], true);
    assert_eq!(
        proxy
            .metric("line_retry_proxy_retries_total{reason=\"connect\"}")
            .await,
        2.0
    );
}

/// Five identical pushes at once: the first is sent, the other four wait for its
/// answer. The mock holds the upstream request until all five are inside the proxy,
/// so the outcome counts are exact, not a matter of timing.
#[tokio::test]
async fn identical_concurrent_requests_are_coalesced() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let hold = mock.hold();
    let body = push_body("same");
    let replies = tokio::spawn({
        let url = proxy.url(PUSH);
        async move {
            let sends = (0..5).map(|_| {
                let (url, body) = (url.clone(), body.clone());
                tokio::spawn(async move {
                    send(Method::POST, &url, &[("authorization", TOKEN)], body).await
                })
            });
            let mut replies = Vec::new();
            for reply in sends.collect::<Vec<_>>() {
                replies.push(reply.await.expect("the bot's task"));
            }
            replies
        }
    });
    mock.wait_held(1).await;
    proxy
        .wait_metric("line_retry_proxy_in_flight_requests", |v| v >= 5.0)
        .await;
    hold.release();
    let replies = within(ANSWER_LIMIT, "all five bots were answered", replies)
        .await
        .unwrap();

    assert_eq!(mock.requests().len(), 1, "one request reached LINE");
    assert_eq!(mock.delivered_count(), 1);
    let count = |o: &str| replies.iter().filter(|r| r.outcome() == o).count();
    let outcomes: Vec<_> = replies.iter().map(|r| r.outcome().to_owned()).collect();
    assert_eq!(count("fresh"), 1, "{outcomes:?}");
    assert_eq!(count("coalesced"), 4, "{outcomes:?}");
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body, replies[0].body, "one answer for all");
        assert_eq!(
            reply.header("x-line-request-id"),
            mock.deliveries()[0].request_id
        );
    }
    assert_eq!(
        proxy
            .metric("line_retry_proxy_requests_total{endpoint=\"push\",outcome=\"coalesced\"}")
            .await,
        4.0
    );
}

#[tokio::test]
async fn a_bot_that_gives_up_does_not_cancel_the_send() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let hold = mock.hold();
    let body = push_body("patience");
    // The bot gives up once its push is held at LINE: the answer cannot have come.
    let gave_up = tokio::select! {
        _ = push(&proxy, &body) => false,
        _ = mock.wait_held(1) => true,
    };
    assert!(gave_up, "the push was held at LINE before any answer");
    hold.release();
    let resend = push(&proxy, &body).await;
    assert_eq!(resend.status, StatusCode::OK);
    assert!(
        matches!(resend.outcome(), "coalesced" | "replayed"),
        "{}",
        resend.outcome()
    );
    assert_eq!(mock.requests().len(), 1);
    assert_eq!(mock.delivered_count(), 1);
}

/// A bot whose connection closes while its push is at LINE: the proxy's handler is
/// dropped with it, the send goes on by itself and its answer is kept, so the resend
/// is replayed from the store (a cancelled send would be sent again: conflict-resolved).
#[tokio::test]
async fn a_bot_that_hangs_up_leaves_the_send_running_to_its_answer() {
    use tokio::io::AsyncWriteExt;
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let hold = mock.hold();
    let body = push_body("hung up");
    let head = format!(
        "POST {PUSH} HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut bot = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    bot.write_all(format!("{head}{body}").as_bytes())
        .await
        .unwrap();
    within(ANSWER_LIMIT, "the push reaches LINE", mock.wait_held(1)).await;
    drop(bot);
    proxy
        .wait_metric("line_retry_proxy_connections_open", |n| n == 0.0)
        .await;
    hold.release();
    proxy
        .wait_metric("line_retry_proxy_in_flight_requests", |n| n == 0.0)
        .await;
    let resend = push(&proxy, &body).await;
    assert_eq!(resend.status, StatusCode::OK);
    assert_eq!(resend.outcome(), "replayed");
    assert_eq!(mock.requests().len(), 1);
    assert_eq!(mock.delivered_count(), 1);
}

#[tokio::test]
async fn a_bots_own_key_is_kept_and_its_409_passed_through() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let key = "123e4567-e89b-12d3-a456-426614174000";
    let headers = [
        ("authorization", TOKEN),
        ("content-type", "application/json"),
        ("x-line-retry-key", key),
    ];
    let first = send(Method::POST, &proxy.url(PUSH), &headers, push_body("mine")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(mock.requests()[0].retry_key.as_deref(), Some(key));
    // Same key, another message: LINE's 409 is the bot's business.
    let other = send(Method::POST, &proxy.url(PUSH), &headers, push_body("other")).await;
    assert_eq!(other.status, StatusCode::CONFLICT);
    assert_eq!(mock.delivered_count(), 1);
    assert_eq!(
        proxy
            .metric("line_retry_proxy_client_keys_total{endpoint=\"push\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn an_empty_key_counts_as_absent() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let headers = [("authorization", TOKEN), ("x-line-retry-key", "")];
    let reply = send(Method::POST, &proxy.url(PUSH), &headers, push_body("go")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(is_v5_uuid(mock.requests()[0].retry_key.as_deref().unwrap()));
}

#[tokio::test]
async fn a_stray_key_on_another_endpoint_is_removed() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let headers = [
        ("authorization", TOKEN),
        ("x-line-retry-key", "123e4567-e89b-12d3-a456-426614174000"),
    ];
    let reply = send(
        Method::POST,
        &proxy.url("/v2/bot/message/reply"),
        &headers,
        r#"{"replyToken":"r","messages":[]}"#,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.outcome_or_none(), None);
    assert_eq!(mock.requests()[0].retry_key, None);
    assert_eq!(
        proxy
            .metric("line_retry_proxy_stray_keys_removed_total")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_before_line() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--body-limit=1024"]).await;
    let reply = push(&proxy, &push_body(&"x".repeat(2000))).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.json()["reason"], "body_too_large");
    assert!(mock.requests().is_empty());
}

#[tokio::test]
async fn passthrough_is_forwarded_untouched_minus_hop_by_hop_headers() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let headers = [
        ("authorization", TOKEN),
        ("connection", "x-hop"),
        ("x-hop", "must go"),
        ("x-end-to-end", "must stay"),
    ];
    let reply = send(Method::GET, &proxy.url("/echo/anything?q=1"), &headers, "").await;
    assert_eq!(reply.status, StatusCode::OK);
    let seen = reply.json();
    assert_eq!(seen["path"], "/echo/anything?q=1");
    assert_eq!(seen["headers"]["x-end-to-end"], "must stay");
    assert_eq!(seen["headers"]["authorization"], TOKEN);
    assert!(seen["headers"].get("x-hop").is_none());
    assert_eq!(
        reply.outcome_or_none(),
        None,
        "passthrough answers are LINE's own"
    );
}

#[tokio::test]
async fn large_passthrough_answers_stream_through() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--body-limit=1024"]).await;
    let reply = send(
        Method::GET,
        &proxy.url("/stream/5000000"),
        &[("authorization", TOKEN)],
        "",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body.len(), 5_000_000);
}

#[tokio::test]
async fn metrics_count_what_happened() {
    let mock = MockLine::start().await;
    mock.script([Fault::Status(500)]);
    let proxy = Proxy::start(&mock, &[]).await;
    push(&proxy, &push_body("m")).await;
    push(&proxy, &push_body("m")).await;
    let m = |s: &str| format!("line_retry_proxy_{s}");
    assert_eq!(
        proxy
            .metric(&m("requests_total{endpoint=\"push\",outcome=\"fresh\"}"))
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric(&m("requests_total{endpoint=\"push\",outcome=\"replayed\"}"))
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric(&m("keys_injected_total{endpoint=\"push\"}"))
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric(&m("upstream_attempts_total{endpoint=\"push\"}"))
            .await,
        2.0
    );
    assert_eq!(
        proxy
            .metric(&m("retries_total{reason=\"status_5xx\"}"))
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric(&m("upstream_latency_seconds_count{endpoint=\"push\"}"))
            .await,
        2.0
    );
    // Redis counts the keys of its database: the answer and the token's channel there.
    let on_redis = std::env::var("LINE_RETRY_PROXY_TEST_STORE").as_deref() == Ok("redis");
    let entries = if on_redis { 2.0 } else { 1.0 };
    assert_eq!(proxy.metric(&m("store_entries")).await, entries);
    assert!(proxy.metric(&m("store_bytes")).await > 0.0);
}

#[tokio::test]
async fn retry_can_be_switched_off_per_endpoint() {
    let mock = MockLine::start().await;
    mock.script([Fault::Status(500)]);
    let dir = support::proxy::temp_dir("cfg");
    let file = dir.join("proxy.toml");
    std::fs::write(&file, "[endpoints.push]\nretry = false\n").unwrap();
    let arg = format!("--config={}", file.display());
    let proxy = Proxy::start(&mock, &[&arg]).await;
    let reply = push(&proxy, &push_body("once")).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(mock.requests().len(), 1);
}

#[tokio::test]
async fn upstream_speaks_http2_when_offered() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    push(&proxy, &push_body("h2")).await;
    assert_eq!(mock.requests()[0].version, http::Version::HTTP_2);
}

#[tokio::test]
async fn shutdown_lets_a_request_and_its_retries_finish() {
    let mock = MockLine::start().await;
    mock.script([Fault::Status(500), Fault::Delay(Duration::from_millis(300))]);
    let mut proxy = Proxy::start(&mock, &[]).await;
    let url = proxy.url(PUSH);
    let request = tokio::spawn(async move {
        send(
            Method::POST,
            &url,
            &[("authorization", TOKEN)],
            push_body("in flight"),
        )
        .await
    });
    mock.wait_requests(1).await;
    let stopped = proxy.begin_stop();
    let reply = within(ANSWER_LIMIT, "the bot was answered", request)
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    let drained = within(ANSWER_LIMIT, "the proxy stopped", stopped).await;
    assert!(drained.unwrap(), "drained within the grace period");
    assert_eq!(mock.delivered_count(), 1);
}

#[tokio::test]
async fn health_and_readiness() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let (status, _, body) = support::proxy::get(&format!("http://{}/healthz", proxy.admin)).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok\n"[..]));
    let (status, _, _) = support::proxy::get(&format!("http://{}/readyz", proxy.admin)).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn malformed_and_truncated_requests_never_reach_line() {
    use tokio::io::AsyncWriteExt;
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;

    let mut garbage = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    garbage
        .write_all(b"\x00\x01NOT HTTP AT ALL\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut garbage).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );

    let mut truncated = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    truncated
        .write_all(b"POST /v2/bot/message/push HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nContent-Length: 100\r\n\r\n{\"to\":")
        .await
        .unwrap();
    truncated.shutdown().await.unwrap();
    // Whatever the proxy says (a 400, or nothing), it must close.
    let _ = read_to_close(&mut truncated).await;

    assert!(mock.requests().is_empty(), "nothing reached LINE");
    assert_eq!(
        push(&proxy, &push_body("still serving")).await.status,
        StatusCode::OK
    );
}

/// A window shorter than LINE's 24 h: identical within it is a replay; identical after it
/// is a new message, with a new key, so LINE delivers it instead of answering 409.
#[tokio::test]
async fn after_a_short_dedup_window_an_identical_push_is_a_new_send() {
    let mock = MockLine::start().await;
    let dir = support::proxy::temp_dir("cfg");
    let file = dir.join("proxy.toml");
    std::fs::write(&file, "[endpoints.push]\ndedup-window = \"1s\"\n").unwrap();
    let arg = format!("--config={}", file.display());
    let proxy = Proxy::start(&mock, &[&arg]).await;
    let body = push_body("good morning");

    let first = push(&proxy, &body).await;
    let again = push(&proxy, &body).await;
    assert_eq!(again.outcome(), "replayed");
    // The window is time itself: nothing to await but the clock.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let later = push(&proxy, &body).await;
    assert_eq!(later.status, StatusCode::OK);
    assert_eq!(later.outcome(), "fresh");
    assert_ne!(
        later.header("x-line-retry-key"),
        first.header("x-line-retry-key")
    );
    assert_eq!(mock.delivered_count(), 2);
}
