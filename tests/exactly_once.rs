//! Exactly-once at the edges: what happens when LINE accepted a message but the answer
//! was lost, when the proxy restarts between a send and its resend, when LINE asks to
//! wait, when retries run out, and when the owner of a send fails while others wait
//! for it. Every test asserts what the mock LINE delivered, not only what the bot saw.

mod support;

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::json;
use support::mock_line::{Delivery, Fault, MockLine};
use support::proxy::{get, post, push, push_body, send, Proxy, Reply, ANSWER_LIMIT, TOKEN};
use support::{eventually, within};

const PUSH: &str = "/v2/bot/message/push";
const MULTICAST: &str = "/v2/bot/message/multicast";
const NARROWCAST: &str = "/v2/bot/message/narrowcast";
const BROADCAST: &str = "/v2/bot/message/broadcast";

fn the_one_delivery(mock: &MockLine) -> Delivery {
    let delivered = mock.deliveries();
    assert_eq!(delivered.len(), 1, "exactly one delivery: {delivered:?}");
    delivered.into_iter().next().unwrap()
}

/// Every request that reached LINE carried this one key.
fn all_keys_are(mock: &MockLine, key: &str) {
    let keys: Vec<_> = mock
        .requests()
        .iter()
        .map(|r| r.retry_key.clone())
        .collect();
    assert!(
        keys.iter().all(|k| k.as_deref() == Some(key)),
        "every attempt carries the key {key}: {keys:?}"
    );
}

/// LINE accepted, then answered 500; the retry gets 409. The bot must see the
/// endpoint's own success with the accepted request's id, and a resend the same.
#[tokio::test]
async fn a_409_becomes_each_endpoints_success_with_the_accepted_id() {
    let body = r#"{"to":["U1","U2"],"messages":[{"type":"text","text":"hi"}]}"#;
    for (path, status) in [
        (MULTICAST, StatusCode::OK),
        (BROADCAST, StatusCode::OK),
        (NARROWCAST, StatusCode::ACCEPTED),
    ] {
        let mock = MockLine::start().await;
        mock.script([Fault::AcceptThenStatus(500)]);
        let proxy = Proxy::start(&mock, &[]).await;
        let reply = post(&proxy, path, TOKEN, body).await;
        assert_eq!(reply.status, status, "{path}: {:?}", reply.body);
        assert_eq!(reply.outcome(), "conflict-resolved", "{path}");
        assert_eq!(reply.json(), json!({}), "{path}");
        assert_eq!(reply.header("content-type"), "application/json", "{path}");
        let delivery = the_one_delivery(&mock);
        assert_eq!(
            reply.header("x-line-request-id"),
            delivery.request_id,
            "{path}: the accepted request's id, not the 409's"
        );
        assert_eq!(mock.requests().len(), 2, "{path}: the 500, then the 409");
        all_keys_are(&mock, reply.header("x-line-retry-key"));

        let again = post(&proxy, path, TOKEN, body).await;
        assert_eq!(again.outcome(), "replayed", "{path}");
        assert_eq!(again.status, status, "{path}");
        assert_eq!(again.body, reply.body, "{path}");
        assert_eq!(
            again.header("x-line-request-id"),
            delivery.request_id,
            "{path}"
        );
        assert_eq!(mock.requests().len(), 2, "{path}: the resend stayed home");
    }
}

/// The bot's push times out at the proxy (LINE accepted it and never answered), the
/// proxy restarts with an empty store, the bot resends: LINE's 409 for the same
/// derived key becomes the original success, with the sentMessages of the accepted
/// push, and nothing is delivered twice.
#[tokio::test]
async fn a_resend_after_a_restart_gets_the_original_sent_messages() {
    let mock = MockLine::start().await;
    mock.script([Fault::AcceptThenHang]);
    let first_proxy = Proxy::start(&mock, &["--attempt-timeout=300ms", "--max-attempts=1"]).await;
    let body = push_body("before the restart");
    let failed = push(&first_proxy, &body).await;
    assert_eq!(
        failed.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{:?}",
        failed.body
    );
    assert_eq!(failed.json()["reason"], "upstream_timeout");
    let key = failed.header("x-line-retry-key").to_owned();
    let delivery = the_one_delivery(&mock);
    let original = delivery
        .sent_messages
        .clone()
        .expect("a push has sentMessages");
    assert!(
        first_proxy.stop().await,
        "the first proxy drained before the restart"
    );

    let second_proxy = Proxy::start(&mock, &[]).await;
    let resend = push(&second_proxy, &body).await;
    assert_eq!(resend.status, StatusCode::OK, "{:?}", resend.body);
    assert_eq!(resend.outcome(), "conflict-resolved");
    assert_eq!(
        resend.json(),
        json!({ "sentMessages": original }),
        "the accepted push's own message ids"
    );
    assert_eq!(resend.header("x-line-request-id"), delivery.request_id);
    assert_eq!(
        resend.header("x-line-retry-key"),
        key,
        "the same derived key"
    );
    all_keys_are(&mock, &key);
    assert_eq!(mock.requests().len(), 2);
    the_one_delivery(&mock);

    let again = push(&second_proxy, &body).await;
    assert_eq!(again.outcome(), "replayed");
    assert_eq!(again.body, resend.body);
}

/// LINE accepts the push, then the connection is reset before its answer: the retry
/// gets 409 and the bot the original answer.
#[tokio::test]
async fn line_accepting_then_resetting_the_connection_is_one_message() {
    let mock = MockLine::start().await;
    mock.script([Fault::AcceptThenReset]);
    let proxy = Proxy::start(&mock, &[]).await;
    let reply = push(&proxy, &push_body("accepted, then the line went dead")).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.outcome(), "conflict-resolved");
    let delivery = the_one_delivery(&mock);
    assert_eq!(
        reply.json(),
        json!({ "sentMessages": delivery.sent_messages.clone().unwrap() })
    );
    assert_eq!(reply.header("x-line-request-id"), delivery.request_id);
    assert_eq!(mock.requests().len(), 2);
    assert!(mock.connections() >= 2, "the reset connection was replaced");
    all_keys_are(&mock, reply.header("x-line-retry-key"));
    assert_eq!(
        proxy
            .metric("line_retry_proxy_retries_total{reason=\"reset\"}")
            .await,
        1.0
    );
}

/// `Retry-After: 1` on a temporary 429 (with --retry-on-429): the retry comes no
/// sooner than a second later, although the backoff alone would be milliseconds.
#[tokio::test]
async fn retry_after_is_waited_for() {
    let mock = MockLine::start().await;
    mock.script([Fault::RateLimited {
        retry_after: Some(1),
    }]);
    let proxy = Proxy::start(&mock, &["--retry-on-429"]).await;
    let reply = push(&proxy, &push_body("later, please")).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.outcome(), "fresh");
    let requests = mock.requests();
    assert_eq!(requests.len(), 2);
    let waited = requests[1].at.duration_since(requests[0].at);
    assert!(
        waited >= Duration::from_secs(1),
        "the retry came {waited:?} after the 429 asked for 1 s"
    );
    assert!(
        waited < Duration::from_secs(5),
        "and not much later: {waited:?}"
    );
    the_one_delivery(&mock);
    assert_eq!(
        proxy
            .metric("line_retry_proxy_retries_total{reason=\"status_429\"}")
            .await,
        1.0
    );
}

/// A `Retry-After` longer than the request deadline (up to u64::MAX seconds) is not
/// slept on: the bot gets the 429 at once, and nothing is sent again.
#[tokio::test]
async fn a_retry_after_beyond_the_deadline_is_answered_at_once() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--retry-on-429", "--request-deadline=5s"]).await;
    for (n, secs) in [60, 86_400 * 365, u64::MAX].into_iter().enumerate() {
        mock.script([Fault::RateLimited {
            retry_after: Some(secs),
        }]);
        let started = Instant::now();
        let reply = push(&proxy, &push_body(&format!("retry after {secs}"))).await;
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{secs}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "Retry-After {secs}: answered after {:?}",
            started.elapsed()
        );
        assert_eq!(
            mock.requests().len(),
            n + 1,
            "Retry-After {secs}: not retried"
        );
    }
    assert_eq!(mock.delivered_count(), 0);
}

/// With no ratio and one retry per second, the budget allows one retry, refuses the
/// next ones (LINE's 500 goes to the bot after one attempt, and the refusal is
/// counted), and allows a retry again once time has refilled it.
#[tokio::test]
async fn the_retry_budget_runs_out_and_recovers() {
    let mock = MockLine::start().await;
    let budget_since = Instant::now();
    let proxy = Proxy::start(
        &mock,
        &[
            "--retry-budget-ratio=0",
            "--retry-budget-min-per-second=1",
            "--max-attempts=4",
        ],
    )
    .await;
    // One 500, then normal: a push that is retried succeeds, one that is not gets 500.
    let mut n = 0;
    let mut failing_push = || {
        n += 1;
        mock.script([Fault::Status(500)]);
        let body = push_body(&format!("budget {n}"));
        let proxy = &proxy;
        async move { push(proxy, &body).await.status }
    };

    let mut retried = 0;
    let mut refused = 0;
    for _ in 0..5 {
        match failing_push().await {
            StatusCode::OK => retried += 1,
            StatusCode::INTERNAL_SERVER_ERROR => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    // The starting balance pays for one retry, and time adds one per second since the
    // proxy started: normally five pushes take far less than a second, so one retry
    // and four refusals; a busy machine may have earned a few more.
    let earned = budget_since.elapsed().as_secs_f64().ceil() as usize;
    assert!(retried >= 1, "the budget starts with one retry");
    assert!(
        retried <= 1 + earned && refused >= 1,
        "{retried} retried, {refused} refused in {:?}",
        budget_since.elapsed()
    );
    assert_eq!(
        proxy
            .metric("line_retry_proxy_retry_budget_exhausted_total")
            .await,
        refused as f64
    );
    assert_eq!(
        mock.requests().len(),
        5 + retried,
        "one attempt per refusal"
    );
    assert_eq!(
        proxy
            .metric("line_retry_proxy_retries_total{reason=\"status_5xx\"}")
            .await,
        retried as f64
    );

    // Refilled at one retry per second: a failing push is retried again within about
    // a second (bounded generously for a busy machine).
    eventually(
        Duration::from_secs(4),
        "the budget allowed a retry again",
        || {
            let status = failing_push();
            async move { (status.await == StatusCode::OK).then_some(()) }
        },
    )
    .await;
}

/// LINE never answers: the bot's answer comes when the request deadline is spent,
/// not after max-attempts × attempt-timeout, and says upstream_timeout.
#[tokio::test]
async fn the_request_deadline_bounds_the_bots_wait() {
    let mock = MockLine::start().await;
    mock.script(vec![Fault::Hang; 10]);
    let proxy = Proxy::start(
        &mock,
        &[
            "--attempt-timeout=300ms",
            "--max-attempts=10",
            "--request-deadline=1s",
        ],
    )
    .await;
    let started = Instant::now();
    let reply = push(&proxy, &push_body("into the void")).await;
    let took = started.elapsed();
    assert_eq!(
        reply.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{:?}",
        reply.body
    );
    assert_eq!(reply.json()["reason"], "upstream_timeout");
    assert_eq!(reply.header("x-line-retry-proxy-error"), "upstream_timeout");
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(5),
        "answered after {took:?} with a 1 s deadline"
    );
    let attempts = mock.requests().len();
    assert!(
        (1..=4).contains(&attempts),
        "{attempts} attempts of 300 ms fit a 1 s deadline"
    );

    // One attempt longer than the deadline is cut at the deadline.
    let mock = MockLine::start().await;
    mock.script([Fault::Hang]);
    let proxy = Proxy::start(&mock, &["--attempt-timeout=10s", "--request-deadline=1s"]).await;
    let started = Instant::now();
    let reply = push(&proxy, &push_body("a long attempt")).await;
    let took = started.elapsed();
    assert_eq!(reply.json()["reason"], "upstream_timeout");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "answered after {took:?} with a 1 s deadline"
    );
    assert_eq!(mock.requests().len(), 1);
}

/// Starts `n` identical pushes and returns their answers once all are in: the mock
/// holds the first upstream request until all `n` are inside the proxy, so the other
/// `n - 1` wait on it.
async fn pushes_waiting_on_one_owner(
    mock: &MockLine,
    proxy: &Proxy,
    n: usize,
    body: &str,
) -> Vec<Reply> {
    let hold = mock.hold();
    let bots: Vec<_> = (0..n)
        .map(|_| {
            let (url, body) = (proxy.url(PUSH), body.to_owned());
            tokio::spawn(async move {
                send(Method::POST, &url, &[("authorization", TOKEN)], body).await
            })
        })
        .collect();
    mock.wait_held(1).await;
    proxy
        .wait_metric("line_retry_proxy_in_flight_requests", |v| v >= n as f64)
        .await;
    assert_eq!(mock.requests().len(), 1, "only the owner reached LINE");
    hold.release();
    let mut replies = Vec::new();
    for bot in bots {
        let reply = within(ANSWER_LIMIT, "a waiting bot was answered", bot).await;
        replies.push(reply.expect("the bot's task"));
    }
    replies
}

/// The owner's send fails for good (every attempt 500, or every attempt reset) while
/// three identical requests wait on it: all four get the failure as soon as the owner
/// does, none hangs and none sends on its own; nothing is kept, so a later resend is
/// sent under the same key and delivered once.
#[tokio::test]
async fn waiters_get_the_owners_failure_and_a_later_resend_proceeds() {
    for (fault, status, what) in [
        (Fault::Status(500), StatusCode::INTERNAL_SERVER_ERROR, "500"),
        (Fault::Reset, StatusCode::BAD_GATEWAY, "reset"),
    ] {
        let mock = MockLine::start().await;
        mock.script(vec![fault; 3]);
        let proxy = Proxy::start(&mock, &["--max-attempts=3"]).await;
        let body = push_body(&format!("owner fails: {what}"));
        let started = Instant::now();
        let replies = pushes_waiting_on_one_owner(&mock, &proxy, 4, &body).await;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what}: the failure reached every waiter promptly ({:?})",
            started.elapsed()
        );
        for reply in &replies {
            assert_eq!(reply.status, status, "{what}: {:?}", reply.body);
        }
        let outcomes: Vec<_> = replies.iter().map(|r| r.outcome().to_owned()).collect();
        assert_eq!(
            outcomes.iter().filter(|o| *o == "error").count()
                + outcomes.iter().filter(|o| *o == "coalesced").count(),
            4,
            "{what}: {outcomes:?}"
        );
        assert_eq!(
            mock.requests().len(),
            3,
            "{what}: the owner's attempts only"
        );
        assert_eq!(mock.delivered_count(), 0, "{what}");
        let key = replies[0].header("x-line-retry-key").to_owned();
        assert!(
            replies.iter().all(|r| r.header("x-line-retry-key") == key),
            "{what}: one key for all"
        );

        let resend = push(&proxy, &body).await;
        assert_eq!(resend.status, StatusCode::OK, "{what}: the resend is sent");
        assert_eq!(resend.outcome(), "fresh", "{what}");
        assert_eq!(resend.header("x-line-retry-key"), key, "{what}");
        all_keys_are(&mock, &key);
        the_one_delivery(&mock);
    }
}

/// With canonical-json, the same message re-serialised (key order, spacing, a trailing
/// newline) is one send end to end: the second is replayed, not delivered again. Without
/// it, the bytes decide.
#[tokio::test]
async fn canonical_json_end_to_end() {
    let compact = r#"{"to":"U1","messages":[{"type":"text","text":"hi"}]}"#;
    let python = "{\"messages\": [{\"text\": \"hi\", \"type\": \"text\"}], \"to\": \"U1\"}";
    let go = format!("{compact}\n");
    let other = r#"{"to":"U1","messages":[{"type":"text","text":"hi!"}]}"#;

    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--canonical-json"]).await;
    let first = push(&proxy, compact).await;
    assert_eq!(first.outcome(), "fresh");
    for resend in [python, go.as_str()] {
        let reply = push(&proxy, resend).await;
        assert_eq!(reply.outcome(), "replayed", "{resend:?}");
        assert_eq!(reply.body, first.body);
        assert_eq!(
            reply.header("x-line-retry-key"),
            first.header("x-line-retry-key")
        );
    }
    assert_eq!(mock.delivered_count(), 1);
    assert_eq!(mock.requests().len(), 1);
    let different = push(&proxy, other).await;
    assert_eq!(different.outcome(), "fresh");
    assert_ne!(
        different.header("x-line-retry-key"),
        first.header("x-line-retry-key")
    );
    assert_eq!(mock.delivered_count(), 2);

    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    for body in [compact, python] {
        assert_eq!(push(&proxy, body).await.outcome(), "fresh", "{body:?}");
    }
    assert_eq!(
        mock.delivered_count(),
        2,
        "without canonical-json, bytes decide"
    );
}

/// While draining, /readyz says 503 (so a load balancer stops sending) and the
/// request in flight still finishes and is delivered.
#[tokio::test]
async fn readyz_is_503_while_draining() {
    let mock = MockLine::start().await;
    let mut proxy = Proxy::start(&mock, &[]).await;
    let admin = proxy.admin;
    let readyz = format!("http://{admin}/readyz");
    assert_eq!(get(&readyz).await.0, StatusCode::OK);

    let hold = mock.hold();
    let url = proxy.url(PUSH);
    let bot = tokio::spawn(async move {
        send(
            Method::POST,
            &url,
            &[("authorization", TOKEN)],
            push_body("in flight while draining"),
        )
        .await
    });
    mock.wait_held(1).await;
    let stopped = proxy.begin_stop();
    let (status, _, body) = eventually(Duration::from_secs(10), "/readyz said 503", || async {
        let answer = get(&readyz).await;
        (answer.0 == StatusCode::SERVICE_UNAVAILABLE).then_some(answer)
    })
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(&body[..], b"shutting down\n");
    assert_eq!(
        get(&format!("http://{admin}/healthz")).await.0,
        StatusCode::OK,
        "alive while draining"
    );
    assert!(!bot.is_finished(), "the push is still held at LINE");

    hold.release();
    let reply = within(ANSWER_LIMIT, "the held push was answered", bot)
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.outcome(), "fresh");
    let drained = within(ANSWER_LIMIT, "the proxy stopped", stopped).await;
    assert!(drained.unwrap(), "drained within the grace period");
    the_one_delivery(&mock);
}
