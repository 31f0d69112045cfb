//! The shared Redis store end to end: real proxies (in-process, or the binary twice
//! as two replicas) in front of the mock LINE, a real redis-server, and assertions on
//! what LINE was asked and delivered.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::StatusCode;
use support::mock_line::{Fault, MockLine};
use support::pki::TestPki;
use support::process::{Process, BIN};
use support::proxy::{push, push_body, Proxy};
use support::redis::{available, RedisServer};

macro_rules! redis_or_skip {
    ($name:expr) => {
        if !available($name) {
            return;
        }
    };
}

fn keyed_requests(mock: &MockLine) -> usize {
    mock.requests()
        .iter()
        .filter(|r| r.path.starts_with("/v2/bot/message/"))
        .count()
}

fn deliveries_of(mock: &MockLine, body: &str) -> usize {
    mock.deliveries()
        .iter()
        .filter(|d| d.body == body.as_bytes())
        .count()
}

/// Polls the proxy's metrics until the store is up again, within 10 s (the probe
/// looks every 500 ms while it is down).
async fn until_store_up(proxy: &Proxy) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while proxy.metric("line_retry_proxy_store_up").await != 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two replicas behind a load balancer, one Redis: the same push arriving at both at
/// once goes to LINE once, is delivered once, and both bots get the same answer; a
/// resend to either is then replayed.
#[tokio::test]
async fn two_replicas_send_a_push_once_and_answer_both_alike() {
    redis_or_skip!("two_replicas_send_a_push_once_and_answer_both_alike");
    let redis = RedisServer::start().await;
    let mock = MockLine::start().await;
    // LINE takes its time, so the second copy surely arrives while the first is out.
    mock.script([Fault::Delay(Duration::from_secs(1))]);
    let store = format!("--store={}", redis.url(0));
    let a = Process::start(&mock, &[&store], &[]).await;
    let b = Process::start(&mock, &[&store], &[]).await;
    let body = push_body("to both replicas at once");

    let (from_a, from_b) = tokio::join!(a.push(&body), b.push(&body));
    assert_eq!(keyed_requests(&mock), 1, "one upstream request");
    assert_eq!(deliveries_of(&mock, &body), 1, "one delivery");
    for reply in [&from_a, &from_b] {
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    }
    assert_eq!(from_a.body, from_b.body, "the same sentMessages on both");
    assert_eq!(
        from_a.header("x-line-retry-key"),
        from_b.header("x-line-retry-key")
    );
    assert_eq!(
        from_a.header("x-line-request-id"),
        from_b.header("x-line-request-id")
    );
    let mut outcomes = [from_a.outcome(), from_b.outcome()];
    outcomes.sort_unstable();
    assert_eq!(outcomes, ["coalesced", "fresh"]);

    for replica in [&a, &b] {
        let again = replica.push(&body).await;
        assert_eq!(again.outcome(), "replayed");
        assert_eq!(again.body, from_a.body);
    }
    assert_eq!(keyed_requests(&mock), 1, "the resends never reached LINE");
}

/// A restart: the answer kept in Redis is replayed, with no request to LINE.
#[tokio::test]
async fn after_a_restart_the_stored_answer_is_replayed_without_asking_line() {
    redis_or_skip!("after_a_restart_the_stored_answer_is_replayed_without_asking_line");
    let redis = RedisServer::start().await;
    let mock = MockLine::start().await;
    let store = format!("--store={}", redis.url(0));
    let mut first = Proxy::start(&mock, &[&store]).await;
    let body = push_body("before the restart");
    let sent = push(&first, &body).await;
    assert_eq!(sent.outcome(), "fresh");
    assert!(first.begin_stop().await.unwrap(), "stopped cleanly");

    let second = Proxy::start(&mock, &[&store]).await;
    let resent = push(&second, &body).await;
    assert_eq!(resent.status, StatusCode::OK);
    assert_eq!(resent.outcome(), "replayed");
    assert_eq!(resent.body, sent.body);
    assert_eq!(
        resent.header("x-line-request-id"),
        sent.header("x-line-request-id")
    );
    assert_eq!(keyed_requests(&mock), 1, "LINE was asked once");
}

/// Sleeps until `offset` past the next whole multiple of `window` on the wall clock.
/// The clock is what this test is about, so waiting on it is the event itself.
async fn until_boundary_plus(window: Duration, offset: Duration) -> SystemTime {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let w = window.as_nanos();
    let next = (now.as_nanos() / w + 1) * w + offset.as_nanos();
    tokio::time::sleep(Duration::from_nanos((next - now.as_nanos()) as u64)).await;
    UNIX_EPOCH + Duration::from_nanos(next as u64)
}

/// A short window's first sighting lives in Redis: a send whose outcome was unknown,
/// resent after a restart and across a window boundary, keeps its key, so LINE does
/// not deliver it twice.
#[tokio::test]
async fn a_short_windows_first_sighting_survives_a_restart() {
    redis_or_skip!("a_short_windows_first_sighting_survives_a_restart");
    let redis = RedisServer::start().await;
    let mock = MockLine::start().await;
    let store = format!("--store={}", redis.url(0));
    let args = [
        store.as_str(),
        "--dedup-window=2s",
        "--max-attempts=1",
        "--attempt-timeout=300ms",
    ];
    let window = Duration::from_secs(2);
    for attempt in 0..3 {
        let mut proxy = Proxy::start(&mock, &args).await;
        let body = push_body(&format!("unknown outcome, then a restart {attempt}"));
        mock.script([Fault::AcceptThenHang]);
        let first_at = until_boundary_plus(window, Duration::from_millis(200)).await;
        let lost = push(&proxy, &body).await;
        assert_eq!(lost.status, StatusCode::GATEWAY_TIMEOUT, "{:?}", lost.body);
        assert!(proxy.begin_stop().await.unwrap());
        let proxy = Proxy::start(&mock, &args).await;
        // Resend in the next window, still inside the first sighting's.
        let resend_at = first_at + Duration::from_millis(1900);
        if SystemTime::now() >= resend_at {
            continue;
        }
        tokio::time::sleep(resend_at.duration_since(SystemTime::now()).unwrap()).await;
        let resent = push(&proxy, &body).await;
        assert_eq!(deliveries_of(&mock, &body), 1, "delivered a second time");
        assert_eq!(resent.status, StatusCode::OK);
        assert_eq!(resent.outcome(), "conflict-resolved");
        assert_eq!(
            resent.header("x-line-retry-key"),
            lost.header("x-line-retry-key"),
            "the key of the first sighting"
        );
        return;
    }
    panic!("the first send and the restart never fitted inside one window");
}

/// Redis stops mid-run: sends go on (no duplicate at LINE), the outage is in
/// /readyz, the metrics and one log line; when Redis is back the store is used again,
/// with one log line for that too.
#[tokio::test]
async fn redis_stopped_mid_run_sends_go_on_and_it_is_used_again_when_back() {
    redis_or_skip!("redis_stopped_mid_run_sends_go_on_and_it_is_used_again_when_back");
    let mut redis = RedisServer::start().await;
    let mock = MockLine::start().await;
    let store = format!("--store={}", redis.url(0));
    let mut proxy = Process::start(&mock, &[&store], &[]).await;
    let before = push_body("before the outage");
    assert_eq!(proxy.push(&before).await.outcome(), "fresh");
    assert_eq!(proxy.push(&before).await.outcome(), "replayed");

    redis.stop().await;
    let during = push_body("during the outage");
    let sent = proxy.push(&during).await;
    assert_eq!(sent.status, StatusCode::OK);
    assert_eq!(sent.outcome(), "fresh");
    proxy.wait_for_log("answer store unavailable").await;
    for _ in 0..3 {
        let resent = proxy.push(&during).await;
        assert_eq!(resent.status, StatusCode::OK);
        // No store: LINE's 409 for the same key stands in for it.
        assert_eq!(resent.outcome(), "conflict-resolved");
        assert_eq!(
            resent.header("x-line-request-id"),
            sent.header("x-line-request-id")
        );
    }
    assert_eq!(deliveries_of(&mock, &during), 1, "no duplicate at LINE");
    let ready = proxy.admin_get("/readyz").await;
    assert!(
        ready.starts_with("ready\n") && ready.contains("DOWN"),
        "{ready}"
    );
    let metrics = proxy.admin_get("/metrics").await;
    assert!(
        metrics.contains("\nline_retry_proxy_store_up 0\n"),
        "{metrics}"
    );
    assert!(!metrics.contains("\nline_retry_proxy_store_errors_total 0\n"));
    assert_eq!(
        proxy.count_log("answer store unavailable"),
        1,
        "one line per outage"
    );

    redis.restart().await;
    let back = proxy.wait_for_log("answer store available again").await;
    // How long it was down, as durations are written (`501ms`), not Rust's debug text.
    let down_for = back["down_for"].as_str().unwrap_or_default();
    assert!(
        humantime::parse_duration(down_for).is_ok(),
        "down_for reads as a duration: {back}"
    );
    let after = push_body("after the outage");
    assert_eq!(proxy.push(&after).await.outcome(), "fresh");
    assert_eq!(
        proxy.push(&after).await.outcome(),
        "replayed",
        "the store is used again"
    );
    assert!(proxy.admin_get("/readyz").await.contains(" up"));
    assert_eq!(proxy.count_log("answer store unavailable"), 1);
    assert_eq!(proxy.count_log("answer store available again"), 1);
    assert!(proxy.terminate().await);
}

/// Redis is killed while a send holds its claim, and comes back from its append-only
/// file with the lease still in it. The owner could not settle; the lease lapses by
/// itself, and the bot's resend then completes under the same key, not delivered twice.
#[tokio::test]
async fn redis_killed_while_a_claim_is_held_the_lease_lapses_and_a_resend_completes() {
    redis_or_skip!("redis_killed_while_a_claim_is_held_the_lease_lapses_and_a_resend_completes");
    let mut redis = RedisServer::start_with(&[
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ])
    .await;
    let mock = MockLine::start().await;
    // The lease is the deadline plus 5 s.
    let proxy = Proxy::start(
        &mock,
        &[
            &format!("--store={}", redis.url(0)),
            "--request-deadline=1s",
            "--attempt-timeout=1s",
            "--max-attempts=1",
        ],
    )
    .await;
    let body = push_body("held while redis dies");
    mock.script([Fault::AcceptThenHang]);
    let url = proxy.url("/v2/bot/message/push");
    let body2 = body.clone();
    let first = tokio::spawn(async move {
        support::proxy::send(
            http::Method::POST,
            &url,
            &[("authorization", support::proxy::TOKEN)],
            body2,
        )
        .await
    });
    mock.wait_requests(1).await;
    redis.kill().await;
    let lost = first.await.unwrap();
    assert_eq!(lost.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        proxy.metric("line_retry_proxy_store_errors_total").await >= 1.0,
        "the settle failed"
    );

    redis.restart().await;
    until_store_up(&proxy).await;
    let resent = tokio::time::timeout(Duration::from_secs(20), push(&proxy, &body))
        .await
        .expect("the resend completed once the lease lapsed");
    assert_eq!(resent.status, StatusCode::OK, "{:?}", resent.body);
    assert_eq!(resent.outcome(), "conflict-resolved");
    assert_eq!(
        resent.header("x-line-retry-key"),
        lost.header("x-line-retry-key")
    );
    assert_eq!(deliveries_of(&mock, &body), 1, "delivered once");
    assert_eq!(
        keyed_requests(&mock),
        2,
        "the first send and the resend, no more"
    );
}

/// A replica dies holding a claim: another replica's resend waits for the lease to
/// lapse, then sends under the same key; LINE's 409 becomes the original success.
#[tokio::test]
async fn a_replica_that_dies_holding_a_claim_does_not_block_the_others() {
    redis_or_skip!("a_replica_that_dies_holding_a_claim_does_not_block_the_others");
    let redis = RedisServer::start().await;
    let mock = MockLine::start().await;
    let store = format!("--store={}", redis.url(0));
    let flags = [
        store.as_str(),
        "--request-deadline=1s",
        "--attempt-timeout=1s",
    ];
    let mut a = Process::start(&mock, &flags, &[]).await;
    let b = Process::start(&mock, &flags, &[]).await;
    let body = push_body("its sender crashed");
    mock.script([Fault::AcceptThenHang]);
    let url = a.url("/v2/bot/message/push");
    let body2 = body.clone();
    let _lost = tokio::spawn(async move {
        support::proxy::send(
            http::Method::POST,
            &url,
            &[("authorization", support::proxy::TOKEN)],
            body2,
        )
        .await
    });
    mock.wait_requests(1).await;
    a.kill().await;

    let resent = tokio::time::timeout(Duration::from_secs(20), b.push(&body))
        .await
        .expect("the resend completed once the dead replica's lease lapsed");
    assert_eq!(resent.status, StatusCode::OK, "{:?}", resent.body);
    assert_eq!(resent.outcome(), "conflict-resolved");
    assert_eq!(deliveries_of(&mock, &body), 1, "delivered once");
    let keys: Vec<_> = mock
        .requests()
        .iter()
        .filter_map(|r| r.retry_key.clone())
        .collect();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0], keys[1], "the same key from both replicas");
}

/// rediss://: verified against --store-ca; against the system roots a private CA is
/// refused (the proxy still sends, without the store).
#[tokio::test]
async fn rediss_is_verified_against_the_store_ca() {
    redis_or_skip!("rediss_is_verified_against_the_store_ca");
    let pki = TestPki::new();
    let (cert, key) = pki.leaf_files(&["127.0.0.1"]);
    let redis = RedisServer::start_tls(&cert, &key, &pki.ca_path).await;
    let mock = MockLine::start().await;
    let url = format!("--store=rediss://127.0.0.1:{}/0", redis.port);

    let trusted = Proxy::start(
        &mock,
        &[&url, &format!("--store-ca={}", pki.ca_path.display())],
    )
    .await;
    let body = push_body("over TLS");
    assert_eq!(push(&trusted, &body).await.outcome(), "fresh");
    assert_eq!(push(&trusted, &body).await.outcome(), "replayed");

    let untrusted = Proxy::start(&mock, &[&url]).await;
    let other = push_body("not over TLS to an unknown CA");
    assert_eq!(push(&untrusted, &other).await.status, StatusCode::OK);
    assert_eq!(
        push(&untrusted, &other).await.outcome(),
        "conflict-resolved",
        "no store: the certificate was refused"
    );
    assert_eq!(deliveries_of(&mock, &other), 1);
    assert_eq!(untrusted.metric("line_retry_proxy_store_up").await, 0.0);
}

/// The Redis password: never in the log (debug level), nor in check-config, whether
/// it is right or wrong.
#[tokio::test]
async fn the_redis_password_never_appears_in_logs_or_check_config() {
    redis_or_skip!("the_redis_password_never_appears_in_logs_or_check_config");
    // A user with exactly the rights the README lists, and nothing else.
    let redis = RedisServer::start_with(&[
        "--save",
        "",
        "--requirepass",
        "the-admins-own-1",
        "--user",
        "lrp",
        "on",
        ">correct-horse-7731",
        "~lrp:*",
        "&lrp:settled",
        "-@all",
        "+get",
        "+set",
        "+del",
        "+mget",
        "+publish",
        "+subscribe",
        "+ping",
        "+multi",
        "+exec",
        "+evalsha",
        "+eval",
        "+script|load",
        "+dbsize",
        "+info",
        "+select",
    ])
    .await;
    let mock = MockLine::start().await;
    let right = format!("redis://lrp:correct-horse-7731@127.0.0.1:{}/1", redis.port);
    let wrong = format!("redis://proxy:hunter2-7731@127.0.0.1:{}/0", redis.port);

    let mut good = Process::start(
        &mock,
        &[],
        &[("LINE_RETRY_PROXY_STORE", &right), ("RUST_LOG", "debug")],
    )
    .await;
    let body = push_body("authenticated");
    assert_eq!(good.push(&body).await.outcome(), "fresh");
    assert_eq!(good.push(&body).await.outcome(), "replayed", "AUTH worked");
    let metrics = good.admin_get("/metrics").await;
    assert!(
        metrics.contains("\nline_retry_proxy_store_up 1\n"),
        "{metrics}"
    );
    assert!(
        // The answer, and the token's channel in the shared directory.
        metrics.contains("\nline_retry_proxy_store_entries 2\n"),
        "DBSIZE on database 1 allowed: {metrics}"
    );
    assert_eq!(good.count_log("no pub/sub"), 0, "SUBSCRIBE allowed");
    assert_eq!(good.count_log("answer store unavailable"), 0);

    let mut bad = Process::start(
        &mock,
        &[],
        &[("LINE_RETRY_PROXY_STORE", &wrong), ("RUST_LOG", "debug")],
    )
    .await;
    assert_eq!(bad.push(&push_body("refused")).await.status, StatusCode::OK);
    bad.wait_for_log("answer store unavailable").await;
    let ready = bad.admin_get("/readyz").await;

    assert!(good.terminate().await);
    assert!(bad.terminate().await);
    let logs = format!(
        "{}\n{}\n{ready}",
        good.log_so_far().join("\n"),
        bad.log_so_far().join("\n")
    );
    assert!(
        logs.contains("redis://127.0.0.1:"),
        "the store is named: {logs}"
    );
    assert!(
        logs.contains("Password authentication failed"),
        "the refusal is logged: {logs}"
    );
    for secret in ["correct-horse-7731", "hunter2-7731"] {
        assert!(!logs.contains(secret), "{secret} in the log:\n{logs}");
    }

    let check = std::process::Command::new(BIN)
        .arg("check-config")
        .env_clear()
        .env("LINE_RETRY_PROXY_STORE", &wrong)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success());
    assert!(
        out.contains("store = \"redis://proxy:<masked>@127.0.0.1:"),
        "{out}"
    );
    assert!(!out.contains("hunter2"), "{out}");
    let help = std::process::Command::new(BIN)
        .arg("--help")
        .env_clear()
        .env("LINE_RETRY_PROXY_STORE", &wrong)
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&help.stdout).contains("hunter2"));
}
