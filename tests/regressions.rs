//! The exactly-once defects found by probing the release binary, each reproduced end
//! to end: what LINE delivered is what is asserted.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::StatusCode;
use support::mock_line::{Fault, MockLine};
use support::proxy::{post, push, push_body, Proxy, TOKEN};
use support::within;

const PUSH: &str = "/v2/bot/message/push";

/// Sleeps until `offset` past the next whole multiple of `window` on the wall clock.
/// The clock is what these tests are about, so waiting on it is the event itself.
async fn until_boundary_plus(window: Duration, offset: Duration) -> SystemTime {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let w = window.as_nanos();
    let next = (now.as_nanos() / w + 1) * w + offset.as_nanos();
    let wait = Duration::from_nanos((next - now.as_nanos()) as u64);
    tokio::time::sleep(wait).await;
    UNIX_EPOCH + Duration::from_nanos(next as u64)
}

/// Defect 1: with a dedup window shorter than 24 h, a send whose outcome was unknown
/// (LINE accepted it, the answer was lost) must keep its key when the bot resends
/// across a window boundary; a new key there is a second delivery.
#[tokio::test]
async fn a_resend_across_a_short_window_boundary_keeps_its_key() {
    let mock = MockLine::start().await;
    let window = Duration::from_secs(1);
    let proxy = Proxy::start(
        &mock,
        &[
            "--dedup-window=1s",
            "--max-attempts=1",
            "--attempt-timeout=300ms",
        ],
    )
    .await;
    // A few tries, each with its own message, in case the machine is too slow to fit
    // the first send between two boundaries.
    for attempt in 0..3 {
        let body = push_body(&format!("across the boundary {attempt}"));
        mock.script([Fault::AcceptThenHang]);
        let first_at = until_boundary_plus(window, Duration::from_millis(400)).await;
        let lost = push(&proxy, &body).await;
        assert_eq!(lost.status, StatusCode::GATEWAY_TIMEOUT, "{:?}", lost.body);
        let resend_at = first_at + Duration::from_millis(750);
        if SystemTime::now() >= resend_at {
            continue;
        }
        tokio::time::sleep(resend_at.duration_since(SystemTime::now()).unwrap()).await;
        let resent = push(&proxy, &body).await;
        let delivered = mock
            .deliveries()
            .iter()
            .filter(|d| d.body == body.as_bytes())
            .count();
        assert_eq!(delivered, 1, "the resend was delivered a second time");
        assert_eq!(resent.status, StatusCode::OK);
        assert_eq!(resent.outcome(), "conflict-resolved");
        return;
    }
    panic!("the first send never fitted before the next window boundary");
}

/// Defect 2: LINE's `Retry-After` is input; a value that cannot be waited before the
/// deadline must give the bot LINE's own 429 at once, not kill the upstream task.
#[tokio::test]
async fn a_huge_retry_after_answers_lines_429_at_once() {
    let mock = MockLine::start().await;
    mock.script([Fault::RateLimited {
        retry_after: Some(u64::MAX),
    }]);
    let proxy = Proxy::start(&mock, &["--retry-on-429"]).await;
    let reply = tokio::time::timeout(Duration::from_secs(10), push(&proxy, &push_body("x")))
        .await
        .expect("the proxy answered within 10 s");
    assert_eq!(
        reply.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{:?}",
        reply.body
    );
    assert!(
        String::from_utf8_lossy(&reply.body).contains("rate limit"),
        "LINE's own answer: {:?}",
        reply.body
    );
    assert_eq!(mock.requests().len(), 1, "no second attempt");
    // The process goes on.
    let again = push(&proxy, &push_body("after")).await;
    assert_eq!(again.status, StatusCode::OK);
}

/// Defect 3: claims of sends in flight must not be evicted by answers filling the
/// store, or identical concurrent sends each go upstream.
#[tokio::test]
async fn coalescing_holds_while_the_store_is_full() {
    const CHURN_WORKERS: usize = 8;
    const CHURN_EACH: usize = 600;
    let mock = MockLine::start().await;
    // LINE holds the first send until the churn and one more request have arrived:
    // the churn and the identical sends all happen while it is in flight, however
    // slow the machine.
    let release_at = 1 + CHURN_WORKERS * CHURN_EACH + 1;
    mock.script([Fault::HoldUntil(release_at)]);
    // The first send is held for as long as the churn takes: no timeout may end it.
    let proxy = Proxy::start(
        &mock,
        &[
            // The memory store's own bound, whatever store the suite runs on.
            "--store=memory",
            "--store-max-bytes=1048576",
            "--attempt-timeout=300s",
            "--request-deadline=300s",
        ],
    )
    .await;
    let body = push_body("held while the store churns");
    // Unbounded here: the joins below bound them.
    let send = |body: String| {
        let url = proxy.url(PUSH);
        tokio::spawn(async move {
            support::proxy::try_send(
                http::Method::POST,
                &url,
                &[
                    ("authorization", TOKEN),
                    ("content-type", "application/json"),
                ],
                body,
            )
            .await
            .expect("the proxy answered")
        })
    };
    let first = send(body.clone());
    mock.wait_requests(1).await;
    // Churn: many more answers than 1 MiB holds, each through the store.
    let churn: Vec<_> = (0..CHURN_WORKERS)
        .map(|worker| {
            let url = proxy.url(PUSH);
            tokio::spawn(async move {
                for i in 0..CHURN_EACH {
                    let text = format!("churn {worker} {i} {}", "x".repeat(400));
                    let r = support::proxy::send(
                        http::Method::POST,
                        &url,
                        &[("authorization", TOKEN)],
                        push_body(&text),
                    )
                    .await;
                    assert_eq!(r.status, StatusCode::OK);
                }
            })
        })
        .collect();
    for c in churn {
        within(Duration::from_secs(240), "the churn finished", c)
            .await
            .unwrap();
    }
    let stored = proxy.metric("line_retry_proxy_store_bytes").await;
    assert!(stored <= 1_048_576.0, "the store kept its bound: {stored}");
    assert!(!first.is_finished(), "the first send is still held at LINE");

    let waiters: Vec<_> = (0..19).map(|_| send(body.clone())).collect();
    proxy
        .wait_metric("line_retry_proxy_in_flight_requests", |v| v >= 20.0)
        .await;
    // The last arrival LINE waits for: the first send goes on.
    let trigger = push(&proxy, &push_body("the last arrival")).await;
    assert_eq!(trigger.status, StatusCode::OK);
    let first = within(Duration::from_secs(60), "the first send finished", first)
        .await
        .unwrap();
    assert_eq!(first.status, StatusCode::OK);
    for w in waiters {
        let r = within(Duration::from_secs(60), "a coalesced send finished", w)
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.body, first.body,
            "every identical send got the one answer"
        );
        assert_eq!(r.outcome(), "coalesced");
    }
    let upstream = mock
        .requests()
        .iter()
        .filter(|r| r.body == body.as_bytes())
        .count();
    assert_eq!(upstream, 1, "identical sends in flight went upstream once");
}

/// Defect 4: canonical JSON must never merge two different messages.
#[tokio::test]
async fn canonical_json_keeps_big_numbers_apart() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--canonical-json"]).await;
    let a = r#"{"to":"U1","messages":[{"type":"text","text":"n","n":12345678901234567890123}]}"#;
    let b = r#"{"to":"U1","messages":[{"type":"text","text":"n","n":12345678901234567890124}]}"#;
    let ra = post(&proxy, PUSH, TOKEN, a).await;
    let rb = post(&proxy, PUSH, TOKEN, b).await;
    assert_eq!((ra.outcome(), rb.outcome()), ("fresh", "fresh"));
    assert_eq!(mock.delivered_count(), 2, "both messages delivered");
    // The same message written another way is still one send.
    let spaced = r#"{"messages": [{"n": 12345678901234567890123, "text": "n", "type": "text"}], "to": "U1"}"#;
    let again = post(&proxy, PUSH, TOKEN, spaced).await;
    assert_eq!(again.outcome(), "replayed");
    assert_eq!(mock.delivered_count(), 2);
}

/// Defect 5: a window shortened by a reload applies to answers already kept.
#[tokio::test]
async fn a_shortened_window_applies_to_answers_already_kept() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let body = push_body("sent before the reload");
    let started = std::time::Instant::now();
    assert_eq!(push(&proxy, &body).await.outcome(), "fresh");
    assert_eq!(push(&proxy, &body).await.outcome(), "replayed");

    let mut policy = proxy.app.config.policy.clone();
    for (_, endpoint) in policy.endpoints.iter_mut() {
        endpoint.dedup_window = Duration::from_secs(1);
    }
    proxy.app.reload(policy);
    // The answer must be older than the new window: the clock is the event.
    tokio::time::sleep(Duration::from_millis(1100).saturating_sub(started.elapsed())).await;
    let after = push(&proxy, &body).await;
    assert_eq!(after.status, StatusCode::OK);
    assert_eq!(
        after.outcome(),
        "fresh",
        "an answer older than the window in force is not replayed"
    );
    assert_eq!(mock.delivered_count(), 2);
}
