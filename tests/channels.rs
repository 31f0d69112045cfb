//! One key per channel, not per token: a bot that resends with another token of the
//! same channel (rotated, refreshed, another worker's) is not delivered twice, in
//! base-URL and HTTPS_PROXY mode, across restarts, and whether the token was issued
//! through the proxy or elsewhere. LINE stays the judge of tokens: a kept answer is
//! replayed only to the token that obtained it.

mod support;

use http::{Method, StatusCode};
use support::mock_line::{client_assertion, Channel, Fault, MockLine, TokenKind};
use support::proxy::{post, push_body, send, Proxy, Reply};
use support::tunnel;

const PUSH: &str = "/v2/bot/message/push";
/// The bot gets LINE's 500 at once: the answer of an accepted send is lost to it.
const NO_RETRY: &[&str] = &["--max-attempts=1"];

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn push_with(proxy: &Proxy, token: &str, body: &str) -> Reply {
    post(proxy, PUSH, &bearer(token), body).await
}

/// A token issued through the proxy, as a bot's SDK asks for one.
async fn issue_through(proxy: &Proxy, path: &str, form: &str) -> (String, Reply) {
    let reply = send(
        Method::POST,
        &proxy.url(path),
        &[("content-type", "application/x-www-form-urlencoded")],
        form.to_owned(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{path}: {:?}", reply.body);
    let token = reply.json()["access_token"]
        .as_str()
        .expect("an access token")
        .to_owned();
    (token, reply)
}

fn stateless_form(ch: &Channel) -> String {
    format!(
        "grant_type=client_credentials&client_id={}&client_secret={}",
        ch.id, ch.secret
    )
}

/// The reproduction: a push LINE accepted whose answer the bot never got (a 500 after
/// acceptance), resent with a second token of the same channel.
async fn rotate_and_resend(mock: &MockLine, proxy: &Proxy, first: &str, second: &str) {
    let body = push_body("rotated between send and resend");
    mock.script([Fault::AcceptThenStatus(500)]);
    let lost = push_with(proxy, first, &body).await;
    assert_eq!(lost.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(mock.delivered_count(), 1, "LINE accepted the first attempt");
    let resent = push_with(proxy, second, &body).await;
    assert_eq!(resent.status, StatusCode::OK, "{:?}", resent.body);
    assert_eq!(resent.outcome(), "conflict-resolved");
    assert_eq!(
        mock.delivered_count(),
        1,
        "the resend under a new token was delivered again"
    );
    let delivered = &mock.deliveries()[0];
    assert_eq!(
        resent.json()["sentMessages"],
        delivered.sent_messages.clone().unwrap()
    );
    assert_eq!(resent.header("x-line-request-id"), delivered.request_id);
}

#[tokio::test]
async fn a_resend_with_a_token_issued_elsewhere_is_fenced_by_line() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, NO_RETRY).await;
    let ch = mock.channel();
    for kinds in [
        [TokenKind::Stateless, TokenKind::Stateless],
        [TokenKind::ShortLived, TokenKind::V21],
        [TokenKind::LongLived, TokenKind::Stateless],
    ] {
        let before = mock.delivered_count();
        let (a, b) = (
            mock.issue_token(&ch, kinds[0]),
            mock.issue_token(&ch, kinds[1]),
        );
        let body = push_body(&format!("{kinds:?}"));
        mock.script([Fault::AcceptThenStatus(500)]);
        assert_eq!(
            push_with(&proxy, &a, &body).await.status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        let resent = push_with(&proxy, &b, &body).await;
        assert_eq!(resent.outcome(), "conflict-resolved", "{kinds:?}");
        assert_eq!(
            mock.delivered_count(),
            before + 1,
            "{kinds:?}: delivered twice"
        );
    }
    // Each token was looked up once, and never again for the resend.
    assert_eq!(mock.lookup_count(), 6);
    assert_eq!(
        proxy
            .metric("line_retry_proxy_channel_lookups_total{source=\"bot_info\"}")
            .await,
        6.0
    );
}

#[tokio::test]
async fn tokens_issued_through_the_proxy_need_one_lookup_per_channel() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, NO_RETRY).await;
    let ch = mock.channel();
    let (first, _) = issue_through(&proxy, "/oauth2/v3/token", &stateless_form(&ch)).await;
    // The first token of a channel id is looked up once, right after its issuance;
    // from then on the channel id is known.
    proxy
        .wait_metric(
            "line_retry_proxy_channel_lookups_total{source=\"bot_info\"}",
            |n| n >= 1.0,
        )
        .await;
    let v21 = format!(
        "grant_type=client_credentials&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={}",
        client_assertion(&ch)
    );
    let (second, issued) = issue_through(&proxy, "/oauth2/v2.1/token", &v21).await;
    assert!(
        issued.json()["key_id"].is_string(),
        "LINE's answer passes unchanged"
    );
    let short = format!(
        "grant_type=client_credentials&client_id={}&client_secret={}",
        ch.id, ch.secret
    );
    let (third, _) = issue_through(&proxy, "/v2/oauth/accessToken", &short).await;
    proxy
        .wait_metric(
            "line_retry_proxy_channel_lookups_total{source=\"issued\"}",
            |n| n >= 2.0,
        )
        .await;
    rotate_and_resend(&mock, &proxy, &first, &second).await;
    let body = push_body("third token");
    assert_eq!(push_with(&proxy, &third, &body).await.outcome(), "fresh");
    assert_eq!(
        mock.lookup_count(),
        1,
        "tokens of a known channel id were looked up"
    );
}

#[tokio::test]
async fn https_proxy_mode_rotates_tokens_too() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, NO_RETRY).await;
    let ch = mock.channel();
    let (a, b) = (
        mock.issue_token(&ch, TokenKind::Stateless),
        mock.issue_token(&ch, TokenKind::Stateless),
    );
    let ca = proxy.ca_dir.join("ca.pem");
    let intercepted = |token: String, body: String| {
        let ca = ca.clone();
        async move {
            let stream = tunnel::connect(proxy.addr, "api.line.me:443").await;
            let tls = tunnel::tls(stream, "api.line.me", tunnel::client_config(&ca, &[b"h2"]))
                .await
                .expect("the proxy's CA is trusted");
            let req = tunnel::push_request(
                "https://api.line.me/v2/bot/message/push",
                &bearer(&token),
                &body,
            );
            tunnel::request(tls, req).await
        }
    };
    let body = push_body("intercepted rotation");
    mock.script([Fault::AcceptThenStatus(500)]);
    let lost = intercepted(a.clone(), body.clone()).await;
    assert_eq!(lost.status, StatusCode::INTERNAL_SERVER_ERROR);
    let resent = intercepted(b.clone(), body.clone()).await;
    assert_eq!(resent.status, StatusCode::OK);
    assert_eq!(resent.outcome(), "conflict-resolved");
    assert_eq!(mock.delivered_count(), 1);
}

#[tokio::test]
async fn a_rotation_across_a_restart_is_fenced_by_lines_409() {
    let mock = MockLine::start().await;
    let ch = mock.channel();
    let (a, b) = (
        mock.issue_token(&ch, TokenKind::ShortLived),
        mock.issue_token(&ch, TokenKind::ShortLived),
    );
    let body = push_body("across a restart");
    let first = Proxy::start(&mock, NO_RETRY).await;
    mock.script([Fault::AcceptThenStatus(500)]);
    assert_eq!(
        push_with(&first, &a, &body).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert!(first.stop().await);
    // A new process: an empty memory store and an empty cache.
    let second = Proxy::start(&mock, NO_RETRY).await;
    let resent = push_with(&second, &b, &body).await;
    assert_eq!(resent.outcome(), "conflict-resolved");
    assert_eq!(mock.delivered_count(), 1);
}

#[tokio::test]
async fn two_channels_with_identical_bodies_stay_apart() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let (one, two) = (mock.channel(), mock.channel());
    let body = push_body("the same words for two bots");
    let a = push_with(&proxy, &mock.issue_token(&one, TokenKind::Stateless), &body).await;
    let b = push_with(&proxy, &mock.issue_token(&two, TokenKind::Stateless), &body).await;
    assert_eq!((a.outcome(), b.outcome()), ("fresh", "fresh"));
    assert_ne!(a.header("x-line-retry-key"), b.header("x-line-retry-key"));
    assert_eq!(mock.deliveries_for(&one).len(), 1);
    assert_eq!(mock.deliveries_for(&two).len(), 1);
}

#[tokio::test]
async fn another_token_never_reads_a_kept_answer() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let ch = mock.channel();
    let owner = mock.issue_token(&ch, TokenKind::Stateless);
    let body = push_body("kept for its own token");
    let sent = push_with(&proxy, &owner, &body).await;
    assert_eq!(sent.outcome(), "fresh");
    assert_eq!(push_with(&proxy, &owner, &body).await.outcome(), "replayed");

    // A live token of the same channel: LINE is asked, and its 409 is the original success.
    let sibling = mock.issue_token(&ch, TokenKind::Stateless);
    let other = push_with(&proxy, &sibling, &body).await;
    assert_eq!(other.outcome(), "conflict-resolved");
    assert_eq!(other.json()["sentMessages"], sent.json()["sentMessages"]);

    // A token the proxy knows for the channel, revoked since: LINE's 401, not the answer.
    let revoked = mock.issue_token(&ch, TokenKind::Stateless);
    assert_eq!(
        push_with(&proxy, &revoked, &push_body("learn it"))
            .await
            .outcome(),
        "fresh"
    );
    mock.revoke(&revoked);
    let refused = push_with(&proxy, &revoked, &body).await;
    assert_eq!(
        refused.status,
        StatusCode::UNAUTHORIZED,
        "{:?}",
        refused.body
    );
    assert!(refused.json().get("sentMessages").is_none());

    // A token LINE never issued: it learns nothing, and LINE refuses it.
    mock.revoke("forged-token");
    let forged = push_with(&proxy, "forged-token", &body).await;
    assert_eq!(forged.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        proxy
            .metric("line_retry_proxy_channel_lookups_total{source=\"rejected\"}")
            .await,
        1.0
    );
    assert_eq!(
        mock.deliveries_for(&ch).len(),
        2,
        "the kept send and `learn it`"
    );
}

#[tokio::test]
async fn many_sends_with_one_token_cost_one_lookup() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let ch = mock.channel();
    let token = mock.issue_token(&ch, TokenKind::Stateless);
    let hold = mock.hold_lookups();
    let sends: Vec<_> = (0..16)
        .map(|i| {
            let (proxy, token) = (&proxy, token.clone());
            async move { push_with(proxy, &token, &push_body(&format!("message {i}"))).await }
        })
        .collect();
    let all = futures_util::future::join_all(sends);
    let released = async {
        mock.wait_lookups_held(1).await;
        hold.release();
    };
    let (replies, ()) = tokio::join!(all, released);
    assert!(replies.iter().all(|r| r.outcome() == "fresh"));
    for i in 16..32 {
        let reply = push_with(&proxy, &token, &push_body(&format!("message {i}"))).await;
        assert_eq!(reply.outcome(), "fresh");
    }
    assert_eq!(mock.lookup_count(), 1, "one token, one lookup");
    assert_eq!(mock.deliveries_for(&ch).len(), 32);
}

#[tokio::test]
async fn a_send_whose_channel_cannot_be_learned_is_not_sent() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--max-attempts=2"]).await;
    let ch = mock.channel();
    let token = mock.issue_token(&ch, TokenKind::Stateless);
    mock.script_lookups([Fault::Status(500), Fault::Status(503)]);
    let body = push_body("channel unknown");
    let refused = push_with(&proxy, &token, &body).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.json()["reason"], "channel_unknown");
    assert_eq!(refused.json()["retryable"], true);
    assert_eq!(
        refused.header("x-line-retry-proxy-error"),
        "channel_unknown"
    );
    assert!(
        mock.requests().iter().all(|r| r.path != PUSH),
        "a send without its channel reached LINE"
    );
    assert_eq!(
        proxy
            .metric("line_retry_proxy_channel_lookups_total{source=\"failed\"}")
            .await,
        1.0
    );
    // The bot's resend, once LINE answers again.
    let resent = push_with(&proxy, &token, &body).await;
    assert_eq!(resent.outcome(), "fresh");
    assert_eq!(mock.delivered_count(), 1);
}

#[tokio::test]
async fn key_scope_token_keeps_the_old_keys_and_asks_nothing() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--key-scope=token", "--max-attempts=1"]).await;
    let ch = mock.channel();
    let (a, b) = (
        mock.issue_token(&ch, TokenKind::Stateless),
        mock.issue_token(&ch, TokenKind::Stateless),
    );
    let body = push_body("token scope");
    let first = push_with(&proxy, &a, &body).await;
    let second = push_with(&proxy, &b, &body).await;
    // Two tokens, two keys: what channel scope exists to prevent.
    assert_ne!(
        first.header("x-line-retry-key"),
        second.header("x-line-retry-key")
    );
    assert_eq!(mock.lookup_count(), 0);
}

/// Replicas on one Redis share what they learned: a token looked up by one is known to
/// the other without asking LINE, and a rotation between replicas is fenced.
#[tokio::test]
async fn replicas_on_one_redis_share_the_channel_directory() {
    if !support::redis::available("replicas_on_one_redis_share_the_channel_directory") {
        return;
    }
    let redis = support::redis::RedisServer::start().await;
    let mock = MockLine::start().await;
    let store = format!("--store={}", redis.url(0));
    let one = Proxy::start(&mock, &[&store, "--max-attempts=1"]).await;
    let two = Proxy::start(&mock, &[&store, "--max-attempts=1"]).await;
    let ch = mock.channel();
    let (a, b) = (
        mock.issue_token(&ch, TokenKind::Stateless),
        mock.issue_token(&ch, TokenKind::Stateless),
    );
    assert_eq!(
        push_with(&one, &a, &push_body("learned by one"))
            .await
            .outcome(),
        "fresh"
    );
    assert_eq!(
        push_with(&two, &a, &push_body("known to two"))
            .await
            .outcome(),
        "fresh"
    );
    assert_eq!(
        mock.lookup_count(),
        1,
        "the second replica asked LINE again"
    );
    assert_eq!(
        two.metric("line_retry_proxy_channel_lookups_total{source=\"store\"}")
            .await,
        1.0
    );
    // Accepted on one, its answer lost; resent to the other with another token.
    let body = push_body("rotated across replicas");
    mock.script([Fault::AcceptThenStatus(500)]);
    assert_eq!(
        push_with(&one, &a, &body).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    let resent = push_with(&two, &b, &body).await;
    assert_eq!(resent.outcome(), "conflict-resolved");
    assert_eq!(mock.deliveries_for(&ch).len(), 3);
}

/// LINE unreachable for a token never seen: nothing can be keyed safely, so nothing is
/// sent, within the bounded lookup attempts.
#[tokio::test]
async fn an_unreachable_line_for_an_unseen_token_is_a_503_not_a_send() {
    let mock = MockLine::start().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let upstream = format!("--upstream=https://{closed}");
    let proxy = Proxy::start(&mock, &[&upstream, "--max-attempts=3"]).await;
    let reply = push_with(&proxy, "never-seen", &push_body("x")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["reason"], "channel_unknown");
    assert_eq!(reply.json()["retryable"], true);
    assert_eq!(
        proxy
            .metric("line_retry_proxy_channel_lookup_seconds_count")
            .await,
        3.0,
        "max-attempts bounds the lookup's attempts too"
    );
}

/// A bot that gives up while its token's lookup is out leaves the lookup running: the
/// next send with that token waits for it instead of asking LINE again.
#[tokio::test]
async fn a_bot_that_gives_up_does_not_cancel_its_tokens_lookup() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let ch = mock.channel();
    let token = mock.issue_token(&ch, TokenKind::Stateless);
    let hold = mock.hold_lookups();
    let url = proxy.url(PUSH);
    let auth = bearer(&token);
    let impatient = {
        let (url, auth) = (url.clone(), auth.clone());
        tokio::spawn(async move {
            let headers = [("authorization", auth.as_str())];
            support::proxy::try_send(Method::POST, &url, &headers, push_body("first")).await
        })
    };
    mock.wait_lookups_held(1).await;
    // The bot's own timeout: its request is dropped mid-lookup.
    impatient.abort();
    let _ = impatient.await;
    // The proxy sees the bot go: its request is no longer in flight.
    proxy
        .wait_metric("line_retry_proxy_in_flight_requests", |n| n == 0.0)
        .await;
    let patient = tokio::spawn(async move {
        let headers = [("authorization", auth.as_str())];
        support::proxy::try_send(Method::POST, &url, &headers, push_body("second")).await
    });
    hold.release();
    let reply = support::within(support::proxy::ANSWER_LIMIT, "the second send", patient)
        .await
        .unwrap()
        .expect("an answer");
    assert_eq!(reply.outcome(), "fresh");
    assert_eq!(mock.lookup_count(), 1);
}
