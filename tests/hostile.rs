//! Hostile clients: every resource a client can hold has a bound, and a real bot still
//! gets through while silent, slow and vanishing clients hold what they can. Each test
//! is bounded in time and count and talks to loopback only.

mod support;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use support::mock_line::{Fault, MockLine};
use support::proxy::{push, push_body, send, Proxy, TOKEN};
use support::tunnel::{self, closed_by_peer, connect};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest any single wait in this file may take.
const BOUND: Duration = Duration::from_secs(5);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("not within {BOUND:?}: {what}"))
}

/// Polls a metric until `ok` holds, at most `BOUND`.
async fn until_metric(proxy: &Proxy, series: &str, ok: impl Fn(f64) -> bool, what: &str) {
    within(what, async {
        loop {
            if ok(proxy.metric(series).await) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// A fresh connection that has sent `bytes`.
async fn raw(proxy: &Proxy, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(proxy.addr).await.expect("proxy accepts");
    stream.write_all(bytes).await.expect("proxy reads");
    stream
}

/// One HTTP/1.1 answer: status, head, and a body framed by Content-Length.
async fn read_answer<S: AsyncRead + Unpin>(stream: &mut S) -> (u16, String, Bytes) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).await.expect("answer readable");
        assert!(
            n > 0,
            "closed before a whole answer head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.expect("whole body");
    (status, head, Bytes::from(body))
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(body)))
}

/// A keyed request head announcing `length` body bytes.
fn push_head(length: usize) -> String {
    format!(
        "POST /v2/bot/message/push HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
}

// --- 1. connections that never send a byte, idle keep-alive and HTTP/2 ---------------

#[tokio::test]
async fn silent_connections_are_closed_at_the_header_timeout_and_a_bot_gets_in() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--max-connections=4", "--header-timeout=300ms"]).await;
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    until_metric(
        &proxy,
        "line_retry_proxy_connections_open",
        |n| n >= 4.0,
        "four silent connections are being served",
    )
    .await;
    for stream in &mut silent {
        assert!(
            within(
                "a connection that never sent a byte is closed",
                closed_by_peer(stream)
            )
            .await
        );
    }
    let reply = within(
        "a bot's push",
        push(&proxy, &push_body("after the silence")),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_at_the_idle_timeout() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--idle-timeout=300ms", "--header-timeout=30s"]).await;
    let mut stream = raw(
        &proxy,
        format!("GET /v2/bot/info HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKEN}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    let (status, _, _) = within("the answer", read_answer(&mut stream)).await;
    assert_eq!(status, 200);
    assert!(
        within(
            "the idle keep-alive connection is closed",
            closed_by_peer(&mut stream)
        )
        .await
    );
}

/// An HTTP/2 client that pings every 50 ms: its PINGs are not activity.
async fn pinging_h2<I>(
    io: I,
) -> (
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<()>,
)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(50))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(io))
        .await
        .expect("HTTP/2 handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, conn)
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_although_the_client_pings() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--idle-timeout=300ms"]).await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) = pinging_h2(tcp).await;
    let req = Request::get(proxy.url("/v2/bot/info"))
        .header("authorization", TOKEN)
        .body(Empty::new())
        .unwrap();
    let res = within("an h2c answer", sender.send_request(req))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let _ = res.into_body().collect().await;
    within("the idle h2c connection is closed", conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_idle_http2_connection_inside_an_intercepted_tunnel_is_closed() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--idle-timeout=300ms"]).await;
    let tls = tunnel::tls(
        connect(proxy.addr, "api.line.me:443").await,
        "api.line.me",
        tunnel::client_config(&proxy.ca_dir.join("ca.pem"), &[b"h2"]),
    )
    .await
    .expect("proxy CA is trusted");
    let (mut sender, conn) = pinging_h2(tls).await;
    let req = Request::get("https://api.line.me/v2/bot/info")
        .header("authorization", TOKEN)
        .body(Empty::new())
        .unwrap();
    let res = within("an intercepted h2 answer", sender.send_request(req))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let _ = res.into_body().collect().await;
    within("the idle intercepted h2 connection is closed", conn)
        .await
        .unwrap();
    until_metric(
        &proxy,
        "line_retry_proxy_tunnels_open",
        |n| n == 0.0,
        "the tunnel is gone",
    )
    .await;
}

// --- 2. body time, idle streamed bodies, buffered bytes --------------------------------

#[tokio::test]
async fn a_stalled_keyed_body_gets_408_and_is_closed() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--body-timeout=300ms"]).await;
    let mut stream = raw(&proxy, format!("{}{{\"to\":", push_head(100)).as_bytes()).await;
    let (status, head, body) =
        within("an answer to the stalled body", read_answer(&mut stream)).await;
    assert_eq!(status, 408, "{head}");
    assert_eq!(json(&body)["reason"], "body_timeout");
    assert_eq!(json(&body)["retryable"], false);
    assert!(within("then the connection is closed", closed_by_peer(&mut stream)).await);
    assert!(mock.requests().is_empty(), "nothing reached LINE");
}

#[tokio::test]
async fn a_stalled_passthrough_body_gets_408() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--body-timeout=300ms"]).await;
    let head = format!(
        "POST /v2/bot/message/reply HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"replyToken\":"
    );
    let mut stream = raw(&proxy, head.as_bytes()).await;
    let (status, head, body) =
        within("an answer to the stalled body", read_answer(&mut stream)).await;
    assert_eq!(status, 408, "{head}");
    assert_eq!(json(&body)["reason"], "body_timeout");
    assert!(within("then the connection is closed", closed_by_peer(&mut stream)).await);
    assert_eq!(mock.delivered_count(), 0);
}

#[tokio::test]
async fn an_upstream_that_stalls_mid_body_is_cut_off() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--idle-timeout=300ms"]).await;
    let mut stream = raw(&proxy, b"GET /stall/1000 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut received = Vec::new();
    within("a stalled streamed answer ends", async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        !text.ends_with("\r\n0\r\n\r\n"),
        "cut off, not ended as if complete"
    );
}

#[tokio::test]
async fn buffered_bytes_have_a_global_cap_past_which_keyed_requests_get_503() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(
        &mock,
        &[
            "--body-limit=524288",
            "--buffer-limit=1048576",
            "--body-timeout=30s",
        ],
    )
    .await;
    // Two clients hold 900 KiB of the 1 MiB between them, and stall.
    let chunk = vec![b' '; 450 * 1024];
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut s = raw(&proxy, push_head(500 * 1024).as_bytes()).await;
        s.write_all(&chunk).await.unwrap();
        stalled.push(s);
    }
    until_metric(
        &proxy,
        "line_retry_proxy_buffered_bytes",
        |n| n >= 900.0 * 1024.0,
        "the stalled bodies are buffered",
    )
    .await;
    let big = format!(
        "{{\"to\":\"U1\",\"messages\":[],\"pad\":\"{}\"}}",
        "x".repeat(300 * 1024)
    );
    let reply = within("a push past the cap", push(&proxy, &big)).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["reason"], "overloaded");
    assert_eq!(reply.json()["retryable"], true);
    assert_eq!(mock.delivered_count(), 0);
    drop(stalled);
    until_metric(
        &proxy,
        "line_retry_proxy_buffered_bytes",
        |n| n == 0.0,
        "the hung-up clients' bytes are released",
    )
    .await;
    let reply = within("the same push once there is room", push(&proxy, &big)).await;
    assert_eq!(reply.status, StatusCode::OK);
}

// --- 3. upstream work left behind by bots that hung up ---------------------------------

#[tokio::test]
async fn detached_upstream_work_is_in_flight_and_bounded() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(
        &mock,
        &[
            "--body-limit=524288",
            "--buffer-limit=1048576",
            "--attempt-timeout=3s",
        ],
    )
    .await;
    mock.script([Fault::Hang, Fault::Hang, Fault::Hang]);
    // Three bots each send 300 KiB and hang up while LINE is slow.
    for i in 0..3 {
        let body = format!(
            "{{\"to\":\"U{i}\",\"messages\":[],\"pad\":\"{}\"}}",
            "x".repeat(300 * 1024)
        );
        let stream = raw(
            &proxy,
            format!("{}{body}", push_head(body.len())).as_bytes(),
        )
        .await;
        within("the push reaches LINE", mock.wait_requests(i + 1)).await;
        drop(stream);
    }
    until_metric(
        &proxy,
        "line_retry_proxy_in_flight_requests",
        |n| n == 3.0,
        "the three detached sends are counted in flight",
    )
    .await;
    // Their bodies still hold 900 KiB of the 1 MiB: a fourth large send waits, then 503.
    let big = format!(
        "{{\"to\":\"U9\",\"messages\":[],\"pad\":\"{}\"}}",
        "x".repeat(300 * 1024)
    );
    let reply = within("a push past the cap", push(&proxy, &big)).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["reason"], "overloaded");
}

// --- 4. HTTP/2 CONNECT streams -----------------------------------------------------------

#[tokio::test]
async fn connect_over_http2_is_refused() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--tunnel-allow=127.0.0.1"]).await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, _conn) = pinging_h2(tcp).await;
    for target in [mock.addr().to_string(), "api.line.me:443".to_owned()] {
        let req = Request::connect(target.as_str())
            .body(Empty::new())
            .unwrap();
        let res = within("an answer to CONNECT over h2", sender.send_request(req))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED, "{target}");
    }
    assert_eq!(proxy.metric("line_retry_proxy_tunnels_total").await, 0.0);
}

// --- 5. the admin listener ----------------------------------------------------------------

#[tokio::test]
async fn the_admin_listener_closes_silent_connections() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--header-timeout=300ms"]).await;
    let mut silent = TcpStream::connect(proxy.admin).await.unwrap();
    assert!(
        within(
            "a silent admin connection is closed",
            closed_by_peer(&mut silent)
        )
        .await
    );
}

#[tokio::test]
async fn the_admin_listener_has_a_connection_cap_and_the_proxy_port_stays_open() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--admin-max-connections=2", "--header-timeout=2s"]).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(TcpStream::connect(proxy.admin).await.unwrap());
    }
    // The held ones are being served once a third is turned away.
    let mut third = TcpStream::connect(proxy.admin).await.unwrap();
    assert!(
        within(
            "over the admin cap: closed at once",
            closed_by_peer(&mut third)
        )
        .await
    );
    let reply = within(
        "the proxy port serves meanwhile",
        push(&proxy, &push_body("admin full")),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    drop(held);
    let metrics = within("admin serves again", async {
        loop {
            let mut s = TcpStream::connect(proxy.admin).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut answer = Vec::new();
            let _ = s.read_to_end(&mut answer).await;
            if answer.starts_with(b"HTTP/1.1 200") {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(metrics.ends_with(b"ok\n"));
}

// --- 6. percent-encoded paths --------------------------------------------------------------

#[tokio::test]
async fn a_percent_encoded_push_is_keyed_and_sent_once() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let key = "5c1a7b2e-4f3d-4a8b-9c6d-0e1f2a3b4c5d";
    let body = push_body("encoded");
    for _ in 0..2 {
        let reply = send(
            Method::POST,
            &proxy.url("/v2/bot/message/%70ush"),
            &[
                ("authorization", TOKEN),
                ("content-type", "application/json"),
                ("x-line-retry-key", key),
            ],
            body.clone(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let deliveries = mock.deliveries();
    assert_eq!(deliveries.len(), 1, "delivered once: {deliveries:?}");
    assert_eq!(deliveries[0].retry_key.as_deref(), Some(key));
    // Escapes of unreserved characters are the same path: the same send, the same key.
    let derived = send(
        Method::POST,
        &proxy.url("/v2/bot/message/p%75sh"),
        &[
            ("authorization", TOKEN),
            ("content-type", "application/json"),
        ],
        push_body("derived"),
    )
    .await;
    let plain = push(&proxy, &push_body("derived")).await;
    assert_eq!(
        derived.header("x-line-retry-key"),
        plain.header("x-line-retry-key")
    );
    assert_eq!(plain.outcome(), "replayed");
    assert_eq!(mock.delivered_count(), 2);
}

#[tokio::test]
async fn a_bots_key_is_kept_on_a_path_not_known_for_certain() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let key = "5c1a7b2e-4f3d-4a8b-9c6d-0e1f2a3b4c5d";
    for path in [
        "/v2/bot/message//push",
        "/v2/bot/message/./push",
        "/v2/bot/message%2Fpush",
        "/V2/bot/message/push",
    ] {
        send(
            Method::POST,
            &proxy.url(path),
            &[("authorization", TOKEN), ("x-line-retry-key", key)],
            push_body("odd path"),
        )
        .await;
    }
    let requests = mock.requests();
    assert_eq!(requests.len(), 4);
    for r in &requests {
        assert_eq!(r.retry_key.as_deref(), Some(key), "{}", r.path);
    }
    // A path known not to take a key still loses a stray one.
    send(
        Method::POST,
        &proxy.url("/v2/bot/message/reply"),
        &[("authorization", TOKEN), ("x-line-retry-key", key)],
        "{}",
    )
    .await;
    assert_eq!(mock.requests()[4].retry_key, None);
}

// --- 7. the client's own body errors ------------------------------------------------------

#[tokio::test]
async fn a_broken_passthrough_body_is_the_clients_fault() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let mut chunked = raw(
        &proxy,
        format!(
            "POST /v2/bot/message/reply HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKEN}\r\n\
             Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"
        )
        .as_bytes(),
    )
    .await;
    let (status, head, body) =
        within("an answer to an invalid chunk", read_answer(&mut chunked)).await;
    assert_eq!(status, 400, "{head}");
    assert_eq!(json(&body)["reason"], "client_body");
    assert_eq!(json(&body)["retryable"], false);

    let mut early = raw(
        &proxy,
        format!(
            "POST /v2/bot/message/reply HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKEN}\r\n\
             Content-Length: 100\r\n\r\n{{\"replyToken\":"
        )
        .as_bytes(),
    )
    .await;
    early.shutdown().await.unwrap();
    let (status, head, body) = within("an answer to an early EOF", read_answer(&mut early)).await;
    assert_eq!(status, 400, "{head}");
    assert_eq!(json(&body)["reason"], "client_body");
    assert_eq!(mock.delivered_count(), 0);
}

// --- 8. CONNECT inside an intercepted tunnel ----------------------------------------------

#[tokio::test]
async fn connect_inside_an_intercepted_tunnel_is_405() {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &["--tunnel-allow=*"]).await;
    let mut tls = tunnel::tls(
        connect(proxy.addr, "api.line.me:443").await,
        "api.line.me",
        tunnel::client_config(&proxy.ca_dir.join("ca.pem"), &[b"http/1.1"]),
    )
    .await
    .expect("proxy CA is trusted");
    let target = mock.addr().to_string();
    tls.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (status, head, _) =
        within("an answer to CONNECT in the tunnel", read_answer(&mut tls)).await;
    assert_eq!(status, 405, "{head}");
    assert!(mock.requests().is_empty(), "nothing went upstream");
}
