//! HTTPS_PROXY mode: CONNECT to api.line.me is intercepted with the proxy's own CA and
//! goes through the same pipeline as base-URL mode; other hosts are tunnelled if
//! allowed and refused otherwise; hostile input never takes the proxy down.

mod support;

use std::process::Command;

use http::{Method, StatusCode};
use support::mock_line::{Fault, MockLine};
use support::proxy::{push, push_body, send, Proxy, ANSWER_LIMIT, TOKEN};
use support::tunnel::{self, closed_by_peer, connect, connect_raw, read_to_close};
use support::within;
use tokio::io::AsyncWriteExt;

const PUSH_URL: &str = "https://api.line.me/v2/bot/message/push";

fn ca_pem(proxy: &Proxy) -> std::path::PathBuf {
    proxy.ca_dir.join("ca.pem")
}

async fn intercepted_push(proxy: &Proxy, alpn: &[&[u8]], body: &str) -> support::proxy::Reply {
    let stream = connect(proxy.addr, "api.line.me:443").await;
    let tls = tunnel::tls(
        stream,
        "api.line.me",
        tunnel::client_config(&ca_pem(proxy), alpn),
    )
    .await
    .expect("proxy CA is trusted");
    tunnel::request(tls, tunnel::push_request(PUSH_URL, TOKEN, body)).await
}

#[tokio::test]
async fn intercepted_push_gets_a_key_over_http1_and_http2() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let h1 = intercepted_push(&proxy, &[b"http/1.1"], &push_body("over h1")).await;
    let h2 = intercepted_push(&proxy, &[b"h2"], &push_body("over h2")).await;
    for reply in [&h1, &h2] {
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.outcome(), "fresh");
    }
    let delivered = mock.deliveries();
    assert_eq!(delivered.len(), 2);
    assert!(delivered
        .iter()
        .all(|d| d.retry_key.as_deref().is_some_and(|k| k.len() == 36)));
    assert_eq!(
        proxy.metric("line_retry_proxy_tls_handshakes_total").await,
        2.0
    );
}

#[tokio::test]
async fn intercepted_traffic_shares_keys_retries_and_replay_with_base_url_mode() {
    let mock = MockLine::start().await;
    mock.script([Fault::AcceptThenStatus(500)]);
    let proxy = Proxy::start(&mock, &[]).await;
    let body = push_body("same everywhere");
    let intercepted = intercepted_push(&proxy, &[b"http/1.1"], &body).await;
    assert_eq!(intercepted.status, StatusCode::OK);
    assert_eq!(intercepted.outcome(), "conflict-resolved");
    let direct = push(&proxy, &body).await;
    assert_eq!(direct.outcome(), "replayed");
    assert_eq!(
        direct.header("x-line-retry-key"),
        intercepted.header("x-line-retry-key")
    );
    assert_eq!(mock.delivered_count(), 1);
}

#[tokio::test]
async fn connect_variants_real_clients_send() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    // Python's urllib3: HTTP/1.0, no headers at all. Node: Connection: close.
    for head in [
        "CONNECT api.line.me:443 HTTP/1.0\r\n\r\n",
        "CONNECT api.line.me:443 HTTP/1.1\r\nHost: api.line.me:443\r\nConnection: close\r\n\r\n",
        "CONNECT api.line.me:443 HTTP/1.1\r\n\r\n",
    ] {
        let (stream, status, answer) = connect_raw(proxy.addr, head).await;
        assert_eq!(status, 200, "{head:?} → {answer}");
        let tls = tunnel::tls(
            stream,
            "api.line.me",
            tunnel::client_config(&ca_pem(&proxy), &[b"http/1.1"]),
        )
        .await
        .unwrap();
        let reply =
            tunnel::request(tls, tunnel::push_request(PUSH_URL, TOKEN, &push_body(head))).await;
        assert_eq!(reply.status, StatusCode::OK, "{head:?}");
    }
    assert_eq!(mock.delivered_count(), 3);
}

#[tokio::test]
async fn hosts_off_the_lists_are_refused_not_relayed() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let target = mock.addr().to_string();
    let (_, status, answer) = connect_raw(
        proxy.addr,
        &format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer.contains("x-line-retry-proxy-error: host_not_allowed"),
        "{answer}"
    );
    assert!(mock.requests().is_empty());
    assert_eq!(mock.connections(), 0, "nothing was opened to the target");
    // The proxy keeps serving.
    assert_eq!(
        push(&proxy, &push_body("still here")).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn allowlisted_hosts_are_tunnelled_byte_for_byte() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--tunnel-allow=127.0.0.1"]).await;
    let stream = connect(proxy.addr, &mock.addr().to_string()).await;
    // TLS end to end with the target itself: the proxy's CA is not involved.
    let config = tunnel::client_config(mock.ca_path(), &[b"http/1.1"]);
    let tls = tunnel::tls(stream, "127.0.0.1", config)
        .await
        .expect("the target's own certificate");
    let reply = tunnel::request(
        tls,
        tunnel::push_request(
            &format!("https://{}/v2/bot/message/push", mock.addr()),
            TOKEN,
            &push_body("raw"),
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        mock.requests()[0].retry_key,
        None,
        "a tunnel is not intercepted"
    );
    assert_eq!(
        proxy
            .metric("line_retry_proxy_keys_injected_total{endpoint=\"push\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn an_unreachable_tunnel_target_is_a_502_with_a_reason() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--tunnel-allow=127.0.0.1"]).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (_, status, answer) =
        connect_raw(proxy.addr, &format!("CONNECT {closed} HTTP/1.1\r\n\r\n")).await;
    assert_eq!(status, 502, "{answer}");
    assert!(answer.contains("tunnel_target_unreachable"), "{answer}");
}

#[tokio::test]
async fn proxy_authorization_is_required_when_configured() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--proxy-auth=bot:s3cret"]).await;
    let (_, status, answer) =
        connect_raw(proxy.addr, "CONNECT api.line.me:443 HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, 407);
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("proxy-authenticate: basic"),
        "{answer}"
    );
    let (_, status, _) = connect_raw(
        proxy.addr,
        "CONNECT api.line.me:443 HTTP/1.1\r\nProxy-Authorization: Basic Ym90Ondyb25n\r\n\r\n",
    )
    .await;
    assert_eq!(status, 407, "wrong password");
    // base64("bot:s3cret")
    let (_, status, _) = connect_raw(
        proxy.addr,
        "CONNECT api.line.me:443 HTTP/1.1\r\nProxy-Authorization: Basic Ym90OnMzY3JldA==\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    // Base-URL mode reaches only LINE, with the bot's own LINE credential: no proxy auth.
    let base_url = send(
        Method::POST,
        &proxy.url("/v2/bot/message/push"),
        &[("authorization", TOKEN)],
        push_body("origin-form"),
    )
    .await;
    assert_eq!(base_url.status, StatusCode::OK);
    let mut plain = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    plain.write_all(b"GET http://api.line.me/v2/bot/info HTTP/1.1\r\nHost: api.line.me\r\nConnection: close\r\n\r\n").await.unwrap();
    let answer = String::from_utf8(read_to_close(&mut plain).await.unwrap()).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 407"),
        "absolute-form needs proxy auth: {answer}"
    );
}

#[tokio::test]
async fn tls_garbage_after_connect_is_dropped_and_the_proxy_goes_on() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let mut stream = connect(proxy.addr, "api.line.me:443").await;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: api.line.me\r\n\r\n")
        .await
        .unwrap();
    assert!(closed_by_peer(&mut stream).await);
    let mut stream = connect(proxy.addr, "api.line.me:443").await;
    stream
        .write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 0, 1, 2, 3])
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    assert!(closed_by_peer(&mut stream).await);
    assert_eq!(
        intercepted_push(&proxy, &[b"http/1.1"], &push_body("after garbage"))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        proxy
            .metric("line_retry_proxy_tls_handshake_failures_total")
            .await,
        2.0
    );
}

#[tokio::test]
async fn a_client_that_never_finishes_the_handshake_is_timed_out() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--handshake-timeout=200ms"]).await;
    let mut stream = connect(proxy.addr, "api.line.me:443").await;
    assert!(
        closed_by_peer(&mut stream).await,
        "the proxy closes a silent tunnel"
    );
    assert_eq!(proxy.metric("line_retry_proxy_tunnels_open").await, 0.0);
}

#[tokio::test]
async fn a_slow_header_client_is_timed_out() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--header-timeout=200ms"]).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /v2/bot/message/push HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        closed_by_peer(&mut stream).await,
        "the proxy closes a slow header"
    );
    assert!(mock.requests().is_empty());
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_and_service_resumes() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--max-connections=2"]).await;
    let mut held = vec![
        tokio::net::TcpStream::connect(proxy.addr).await.unwrap(),
        tokio::net::TcpStream::connect(proxy.addr).await.unwrap(),
    ];
    // Both are being served once the proxy reports them open.
    proxy
        .wait_metric("line_retry_proxy_connections_open", |v| v >= 2.0)
        .await;
    let mut third = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    assert!(
        closed_by_peer(&mut third).await,
        "over the limit: closed at once"
    );
    held.pop();
    proxy
        .wait_metric("line_retry_proxy_connections_open", |v| v <= 1.0)
        .await;
    assert_eq!(
        push(&proxy, &push_body("room again")).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn absolute_form_requests_are_proxied_like_base_url() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    // A plain HTTP proxy client writes the full URL in the request line.
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let body = push_body("absolute");
    let head = format!(
        "POST http://api.line.me/v2/bot/message/push HTTP/1.1\r\nHost: api.line.me\r\nAuthorization: {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let answer = String::from_utf8(read_to_close(&mut stream).await.unwrap()).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("x-line-retry-proxy: fresh"), "{answer}");
    assert_eq!(mock.delivered_count(), 1);

    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let answer = String::from_utf8(read_to_close(&mut stream).await.unwrap()).unwrap();
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
}

fn curl_available() -> bool {
    Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// curl as a bot would run it: `-x` to the proxy, `--cacert` the proxy's CA, the real
/// api.line.me URL (which the proxy sends to the mock).
#[tokio::test]
async fn curl_through_the_proxy() {
    assert!(curl_available(), "curl is required (the CI installs it)");
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let proxy_url = format!("http://{}", proxy.addr);
    let ca = ca_pem(&proxy);
    let body = push_body("from curl");
    let (ok, first, err) = tokio::task::spawn_blocking(move || {
        let run = |extra: &[&str]| {
            let out = Command::new("curl")
                .args([
                    "-sS",
                    "--max-time",
                    "30",
                    "--fail-with-body",
                    "-D",
                    "-",
                    "-x",
                    &proxy_url,
                    "--cacert",
                    ca.to_str().unwrap(),
                ])
                .args(extra)
                .args([
                    "-H",
                    &format!("Authorization: {TOKEN}"),
                    "-H",
                    "Content-Type: application/json",
                    "--data",
                    &body,
                    PUSH_URL,
                ])
                .env_remove("HTTPS_PROXY")
                .env_remove("https_proxy")
                .output()
                .unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).to_lowercase(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let a = run(&["--http1.1"]);
        let b = run(&["--http2"]);
        (
            a.0 && b.0,
            format!("{}\n---\n{}", a.1, b.1),
            format!("{}{}", a.2, b.2),
        )
    })
    .await
    .unwrap();
    assert!(ok, "{err}\n{first}");
    assert!(first.contains("x-line-retry-proxy: fresh"), "{first}");
    assert!(
        first.contains("x-line-retry-proxy: replayed"),
        "the second curl is a resend: {first}"
    );
    assert_eq!(mock.delivered_count(), 1);
    assert!(mock.deliveries()[0].retry_key.is_some());
}

#[tokio::test]
async fn shutdown_closes_open_tunnels() {
    let mock = MockLine::start().await;
    let mut proxy = Proxy::start(&mock, &["--tunnel-allow=127.0.0.1"]).await;
    let mut tunnel = connect(proxy.addr, &mock.addr().to_string()).await;
    proxy
        .wait_metric("line_retry_proxy_tunnels_open", |v| v >= 1.0)
        .await;
    let stopped = proxy.begin_stop();
    assert!(
        closed_by_peer(&mut tunnel).await,
        "the idle tunnel is closed"
    );
    let drained = within(ANSWER_LIMIT, "the proxy stopped", stopped).await;
    assert!(drained.unwrap(), "nothing was left running");
}

#[tokio::test]
async fn open_tunnels_count_against_the_connection_limit() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--max-connections=2"]).await;
    let config = tunnel::client_config(&ca_pem(&proxy), &[b"http/1.1"]);
    // Two intercepted tunnels, handshaken and idle: the HTTP connections that carried the
    // CONNECTs are gone, the tunnels are not.
    let first = tunnel::tls(
        connect(proxy.addr, "api.line.me:443").await,
        "api.line.me",
        config.clone(),
    )
    .await
    .unwrap();
    let second = tunnel::tls(
        connect(proxy.addr, "api.line.me:443").await,
        "api.line.me",
        config.clone(),
    )
    .await
    .unwrap();
    let mut third = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    assert!(
        closed_by_peer(&mut third).await,
        "two tunnels fill a limit of two"
    );
    drop(first);
    proxy
        .wait_metric("line_retry_proxy_tunnels_open", |v| v <= 1.0)
        .await;
    let reply = tunnel::request(
        second,
        tunnel::push_request(PUSH_URL, TOKEN, &push_body("room again")),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        push(&proxy, &push_body("and a new connection"))
            .await
            .status,
        StatusCode::OK
    );
}
