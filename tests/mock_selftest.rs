//! Proves the mock LINE behaves as documented: every proxy test trusts it.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::mock_line::{stream_body, Fault, MockLine, STREAM_CHUNK, WAIT_LIMIT};
use support::within;

const TOKEN: &str = "Bearer channel-a";
const KEY: &str = "123e4567-e89b-42d3-a456-426614174000";
const PUSH: &str = "/v2/bot/message/push";

type Https = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A fresh client (so a fresh connection) trusting only the mock's CA.
fn client(mock: &MockLine, h2: bool) -> Https {
    let config = (*mock.pki().client_config_alpn(&[])).clone();
    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let connector = if h2 {
        builder.enable_all_versions().wrap_connector(http)
    } else {
        builder.enable_http1().wrap_connector(http)
    };
    Client::builder(TokioExecutor::new()).build(connector)
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    version: Version,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON answer")
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header"))
    }
}

type SendResult = Result<Reply, Box<dyn std::error::Error + Send + Sync>>;

/// One request, failing the test if the mock has not answered within [`WAIT_LIMIT`]
/// (tests that expect no answer bound it more tightly themselves).
async fn try_send<C>(
    client: &Client<C, Full<Bytes>>,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> SendResult
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let what = format!("the mock answered {method} {url}");
    within(
        WAIT_LIMIT,
        &what,
        try_send_unbounded(client, method, url, headers, body),
    )
    .await
}

async fn try_send_unbounded<C>(
    client: &Client<C, Full<Bytes>>,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> SendResult
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let mut req = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(Full::new(Bytes::from(body.to_owned())))?;
    let res = client.request(req).await?;
    let version = res.version();
    let (parts, body) = res.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
        version,
    })
}

async fn push_with(client: &Https, mock: &MockLine, headers: &[(&str, &str)]) -> SendResult {
    let body = json!({"to": "U1", "messages": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]});
    let url = format!("{}{PUSH}", mock.url());
    try_send(client, Method::POST, &url, headers, &body.to_string()).await
}

async fn push(client: &Https, mock: &MockLine, key: Option<&str>) -> Reply {
    let mut headers = vec![
        ("authorization", TOKEN),
        ("content-type", "application/json"),
    ];
    headers.extend(key.map(|k| ("x-line-retry-key", k)));
    push_with(client, mock, &headers)
        .await
        .expect("the mock answers")
}

async fn call(client: &Https, mock: &MockLine, method: Method, path: &str) -> Reply {
    let url = format!("{}{path}", mock.url());
    try_send(client, method, &url, &[("authorization", TOKEN)], "{}")
        .await
        .expect("the mock answers")
}

#[tokio::test]
async fn push_answers_one_sent_message_per_message() {
    let mock = MockLine::start().await;
    let reply = push(&client(&mock, false), &mock, Some(KEY)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-type"), "application/json");
    let sent = reply.json()["sentMessages"]
        .as_array()
        .cloned()
        .expect("sentMessages");
    assert_eq!(sent.len(), 2);
    assert_ne!(sent[0]["id"], sent[1]["id"]);
    for m in &sent {
        let id = m["id"].as_str().expect("id is a string");
        assert!(id.bytes().all(|b| b.is_ascii_digit()), "{id}");
        assert!(m["quoteToken"].is_string());
    }
    let delivered = mock.deliveries();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].retry_key.as_deref(), Some(KEY));
    assert_eq!(delivered[0].authorization.as_deref(), Some(TOKEN));
    assert_eq!(delivered[0].request_id, reply.header("x-line-request-id"));
    assert_eq!(
        delivered[0].sent_messages,
        Some(Value::Array(sent)),
        "the delivery records the answer"
    );
    let recorded = mock.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].method, "POST");
    assert_eq!(recorded[0].path, PUSH);
    assert_eq!(recorded[0].retry_key.as_deref(), Some(KEY));
    assert_eq!(recorded[0].version, Version::HTTP_11);
    assert_eq!(recorded[0].body, delivered[0].body);
}

#[tokio::test]
async fn a_used_key_gets_409_naming_the_accepted_request() {
    let mock = MockLine::start().await;
    let client = client(&mock, false);
    let first = push(&client, &mock, Some(KEY)).await;
    let second = push(&client, &mock, Some(KEY)).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(second.status, StatusCode::CONFLICT);
    let first_id = first.header("x-line-request-id");
    assert_eq!(second.header("x-line-accepted-request-id"), first_id);
    assert_ne!(second.header("x-line-request-id"), first_id);
    assert_eq!(
        second.json()["message"],
        "The retry key is already accepted"
    );
    assert_eq!(second.json()["sentMessages"], first.json()["sentMessages"]);
    assert_eq!(mock.delivered_count(), 1);
    assert_eq!(mock.requests().len(), 2);
}

#[tokio::test]
async fn keys_are_scoped_per_channel_and_unkeyed_pushes_always_deliver() {
    let mock = MockLine::start().await;
    let client = client(&mock, false);
    push(&client, &mock, Some(KEY)).await;
    let other = [
        ("authorization", "Bearer channel-b"),
        ("x-line-retry-key", KEY),
    ];
    let reply = push_with(&client, &mock, &other).await.expect("answer");
    assert_eq!(reply.status, StatusCode::OK);
    push(&client, &mock, None).await;
    assert_eq!(push(&client, &mock, None).await.status, StatusCode::OK);
    assert_eq!(mock.delivered_count(), 4);
}

#[tokio::test]
async fn multicast_409_has_no_sent_messages() {
    let mock = MockLine::start().await;
    let client = client(&mock, false);
    let url = format!("{}/v2/bot/message/multicast", mock.url());
    let headers = [("authorization", TOKEN), ("x-line-retry-key", KEY)];
    let first = try_send(&client, Method::POST, &url, &headers, "{}")
        .await
        .expect("answer");
    assert_eq!((first.status, first.json()), (StatusCode::OK, json!({})));
    let second = try_send(&client, Method::POST, &url, &headers, "{}")
        .await
        .expect("answer");
    assert_eq!(second.status, StatusCode::CONFLICT);
    assert!(second.json().get("sentMessages").is_none());
}

#[tokio::test]
async fn a_key_on_another_endpoint_is_rejected() {
    let mock = MockLine::start().await;
    let client = client(&mock, false);
    let url = format!("{}/v2/bot/message/reply", mock.url());
    let headers = [("authorization", TOKEN), ("x-line-retry-key", KEY)];
    let reply = try_send(&client, Method::POST, &url, &headers, "{}")
        .await
        .expect("answer");
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        reply.json()["message"],
        "The retry key is not supported for this endpoint"
    );
    assert_eq!(mock.delivered_count(), 0);
    let reply = call(&client, &mock, Method::POST, "/v2/bot/message/reply").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(mock.deliveries()[0].retry_key, None);
}

#[tokio::test]
async fn empty_or_malformed_keys_are_rejected() {
    let mock = MockLine::start().await;
    let client = client(&mock, false);
    for key in [
        "",
        "not-a-uuid",
        "123e4567e89b42d3a456426614174000",
        "123e4567-e89b-42d3-a456-42661417400g",
    ] {
        let reply = push(&client, &mock, Some(key)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{key:?}");
        assert_eq!(
            reply.json()["message"],
            "The value for the 'X-Line-Retry-Key' header is invalid"
        );
    }
    assert_eq!(mock.requests()[0].retry_key.as_deref(), Some(""));
    assert_eq!(mock.delivered_count(), 0);
}

#[tokio::test]
async fn a_missing_token_is_401() {
    let mock = MockLine::start().await;
    let client = client(&mock, false);
    let reply = push_with(&client, &mock, &[("x-line-retry-key", KEY)])
        .await
        .expect("answer");
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(reply.json()["message"]
        .as_str()
        .is_some_and(|m| m.starts_with("Authentication failed")));
    assert_eq!(mock.delivered_count(), 0);
    // The key was not consumed.
    assert_eq!(push(&client, &mock, Some(KEY)).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_status_fault_answers_once_then_normal() {
    let mock = MockLine::start().await;
    mock.script([Fault::Status(500)]);
    let client = client(&mock, false);
    let failed = push(&client, &mock, Some(KEY)).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(failed.json()["message"].is_string());
    assert!(!failed.header("x-line-request-id").is_empty());
    assert_eq!(mock.delivered_count(), 0);
    assert_eq!(push(&client, &mock, Some(KEY)).await.status, StatusCode::OK);
    assert_eq!(mock.delivered_count(), 1);
}

#[tokio::test]
async fn faults_only_hit_keyed_endpoints() {
    let mock = MockLine::start().await;
    mock.script([Fault::Status(503)]);
    let client = client(&mock, false);
    assert_eq!(
        call(&client, &mock, Method::GET, "/v2/bot/info")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        call(&client, &mock, Method::POST, "/v2/bot/message/reply")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        push(&client, &mock, None).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn accept_then_status_delivers_once_and_the_retry_gets_409() {
    let mock = MockLine::start().await;
    mock.script([Fault::AcceptThenStatus(500)]);
    let client = client(&mock, false);
    let failed = push(&client, &mock, Some(KEY)).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(mock.delivered_count(), 1);
    let retry = push(&client, &mock, Some(KEY)).await;
    assert_eq!(retry.status, StatusCode::CONFLICT);
    assert_eq!(
        retry.header("x-line-accepted-request-id"),
        failed.header("x-line-request-id")
    );
    assert_eq!(
        mock.deliveries()[0].request_id,
        failed.header("x-line-request-id")
    );
    assert_eq!(
        retry.json()["sentMessages"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(mock.delivered_count(), 1);
}

#[tokio::test]
async fn an_accepting_fault_on_a_used_key_is_409_and_still_consumed() {
    let mock = MockLine::start().await;
    let client = client(&mock, false);
    push(&client, &mock, Some(KEY)).await;
    mock.script([Fault::AcceptThenStatus(500)]);
    assert_eq!(
        push(&client, &mock, Some(KEY)).await.status,
        StatusCode::CONFLICT
    );
    assert_eq!(push(&client, &mock, None).await.status, StatusCode::OK);
    assert_eq!(mock.delivered_count(), 2);
}

#[tokio::test]
async fn hang_never_answers_and_delivers_nothing() {
    let mock = MockLine::start().await;
    mock.script([Fault::Hang]);
    let client = client(&mock, false);
    let waited =
        tokio::time::timeout(Duration::from_millis(300), push(&client, &mock, Some(KEY))).await;
    assert!(waited.is_err(), "timed out");
    assert_eq!(mock.requests().len(), 1);
    assert_eq!(mock.delivered_count(), 0);
    assert_eq!(push(&client, &mock, Some(KEY)).await.status, StatusCode::OK);
}

#[tokio::test]
async fn accept_then_hang_delivers_but_never_answers() {
    let mock = MockLine::start().await;
    mock.script([Fault::AcceptThenHang]);
    let client = client(&mock, false);
    let waited =
        tokio::time::timeout(Duration::from_millis(300), push(&client, &mock, Some(KEY))).await;
    assert!(waited.is_err(), "timed out");
    assert_eq!(mock.delivered_count(), 1);
    assert_eq!(
        push(&client, &mock, Some(KEY)).await.status,
        StatusCode::CONFLICT
    );
}

/// Walks an error's sources for the io::Error underneath.
fn io_kind(err: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cur = e.source();
    }
    None
}

#[tokio::test]
async fn reset_drops_the_connection_without_answer() {
    let mock = MockLine::start().await;
    mock.script([Fault::Reset]);
    let client = client(&mock, false);
    let err = match push_with(&client, &mock, &[("authorization", TOKEN)]).await {
        Ok(reply) => panic!("answered {}", reply.status),
        Err(err) => err,
    };
    eprintln!("h1 reset as the client sees it: {err:?}");
    assert_eq!(mock.delivered_count(), 0);
    assert_eq!(push(&client, &mock, Some(KEY)).await.status, StatusCode::OK);
    assert_eq!(mock.connections(), 2, "the reset connection was not reused");
}

#[tokio::test]
async fn reset_is_a_tcp_rst() {
    let mock = MockLine::start_plain().await;
    mock.script([Fault::Reset]);
    let mut stream = tokio::net::TcpStream::connect(mock.addr())
        .await
        .expect("connect");
    let head = format!(
        "POST {PUSH} HTTP/1.1\r\nhost: api.line.me\r\nauthorization: {TOKEN}\r\ncontent-length: 2\r\n\r\n{{}}"
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let read = within(WAIT_LIMIT, "the mock closed", stream.read_to_end(&mut buf)).await;
    assert_eq!(buf, b"", "no answer at all");
    let err = read.expect_err("a reset, not a clean EOF");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn reset_kills_an_http2_connection_too() {
    let mock = MockLine::start().await;
    mock.script([Fault::Reset]);
    let client = client(&mock, true);
    let err = match push_with(&client, &mock, &[("authorization", TOKEN)]).await {
        Ok(reply) => panic!("answered {}", reply.status),
        Err(err) => err,
    };
    eprintln!("h2 reset as the client sees it: {err:?}");
    assert_eq!(
        io_kind(err.as_ref()),
        Some(std::io::ErrorKind::ConnectionReset)
    );
    assert_eq!(mock.delivered_count(), 0);
}

#[tokio::test]
async fn http2_is_negotiated_by_alpn() {
    let mock = MockLine::start().await;
    let reply = push(&client(&mock, true), &mock, Some(KEY)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.version, Version::HTTP_2);
    assert_eq!(mock.requests()[0].version, Version::HTTP_2);
    assert_eq!(mock.delivered_count(), 1);
}

#[tokio::test]
async fn wait_requests_resolves_on_arrival_not_on_answer() {
    let mock = MockLine::start().await;
    mock.wait_requests(0).await;
    mock.script([Fault::Delay(Duration::from_millis(500))]);
    let client = client(&mock, false);
    let started = Instant::now();
    let request = {
        let (client, url) = (client.clone(), format!("{}{PUSH}", mock.url()));
        tokio::spawn(async move {
            try_send(
                &client,
                Method::POST,
                &url,
                &[("authorization", TOKEN)],
                "{}",
            )
            .await
            .map(|r| r.status)
            .map_err(|e| e.to_string())
        })
    };
    mock.wait_requests(1).await;
    assert!(!request.is_finished());
    assert_eq!(
        mock.delivered_count(),
        0,
        "the delay comes before acceptance"
    );
    let status = within(WAIT_LIMIT, "the delayed answer came", request)
        .await
        .expect("task")
        .expect("answer");
    assert_eq!(status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(mock.delivered_count(), 1);
}

#[tokio::test]
async fn limits_answer_429() {
    let mock = MockLine::start().await;
    mock.script([
        Fault::RateLimited {
            retry_after: Some(7),
        },
        Fault::RateLimited { retry_after: None },
        Fault::MonthlyLimit,
    ]);
    let client = client(&mock, false);
    let first = push(&client, &mock, Some(KEY)).await;
    assert_eq!(first.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(first.header("retry-after"), "7");
    assert_eq!(
        first.json()["message"],
        "The API rate limit has been exceeded. Try again later."
    );
    let second = push(&client, &mock, Some(KEY)).await;
    assert!(second.headers.get("retry-after").is_none());
    let third = push(&client, &mock, Some(KEY)).await;
    assert_eq!(third.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        third.json()["message"],
        "You have reached your monthly limit."
    );
    assert_eq!(mock.delivered_count(), 0);
    assert_eq!(push(&client, &mock, Some(KEY)).await.status, StatusCode::OK);
}

#[tokio::test]
async fn the_other_endpoints() {
    let mock = MockLine::start().await;
    let client = client(&mock, false);
    // `/v2/bot/info` names the token's channel's bot: see the channel tests below.
    let cases = [
        (
            Method::GET,
            "/v2/bot/message/quota",
            StatusCode::OK,
            json!({"type": "limited", "value": 1000}),
        ),
        (
            Method::POST,
            "/v2/bot/message/validate/push",
            StatusCode::OK,
            json!({}),
        ),
        (
            Method::POST,
            "/v2/bot/message/narrowcast",
            StatusCode::ACCEPTED,
            json!({}),
        ),
        (
            Method::POST,
            "/v2/bot/message/broadcast",
            StatusCode::OK,
            json!({}),
        ),
        (
            Method::GET,
            "/v2/bot/nothing",
            StatusCode::NOT_FOUND,
            json!({"message": "Not found"}),
        ),
        (
            Method::GET,
            PUSH,
            StatusCode::NOT_FOUND,
            json!({"message": "Not found"}),
        ),
    ];
    let mut ids = std::collections::HashSet::new();
    for (method, path, status, body) in cases {
        let reply = call(&client, &mock, method, path).await;
        assert_eq!((reply.status, reply.json()), (status, body), "{path}");
        assert_eq!(reply.header("content-type"), "application/json");
        assert!(ids.insert(reply.header("x-line-request-id").to_owned()));
    }
    assert_eq!(mock.delivered_count(), 2, "narrowcast and broadcast");
}

#[tokio::test]
async fn echo_shows_what_arrived() {
    let mock = MockLine::start().await;
    let client = client(&mock, false);
    let url = format!("{}/echo/x?q=1", mock.url());
    let headers = [("x-a", "1"), ("x-a", "2"), ("x-b", "b")];
    let reply = try_send(&client, Method::PUT, &url, &headers, "hello")
        .await
        .expect("answer");
    assert_eq!(reply.status, StatusCode::OK);
    let seen = reply.json();
    assert_eq!(seen["method"], "PUT");
    assert_eq!(seen["path"], "/echo/x?q=1");
    assert_eq!(seen["headers"]["x-a"], "1, 2");
    assert_eq!(seen["headers"]["x-b"], "b");
    assert_eq!(seen["body_len"], 5);
    assert_eq!(mock.requests()[0].path, "/echo/x?q=1");
}

#[tokio::test]
async fn stream_sends_n_patterned_bytes_in_chunks() {
    let mock = MockLine::start().await;
    let client = client(&mock, false);
    let len = 3 * STREAM_CHUNK + 5;
    let url = format!("{}/stream/{len}", mock.url());
    let req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let res = within(WAIT_LIMIT, "the stream's head came", client.request(req))
        .await
        .expect("answer");
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.headers().get("content-length").is_none(),
        "streamed, not sized"
    );
    let mut body = res.into_body();
    let mut frames = Vec::new();
    within(WAIT_LIMIT, "the whole stream came", async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("frame").into_data() {
                frames.push(data);
            }
        }
    })
    .await;
    let all: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
    assert_eq!(Bytes::from(all), stream_body(len));
    assert!(frames.len() >= 4, "{} frames", frames.len());
}

#[tokio::test]
async fn plain_mode_serves_http() {
    let mock = MockLine::start_plain().await;
    assert!(mock.url().starts_with("http://127.0.0.1:"));
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let url = format!("{}{PUSH}", mock.url());
    let reply = try_send(
        &client,
        Method::POST,
        &url,
        &[("authorization", TOKEN)],
        "{}",
    )
    .await
    .expect("answer");
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(mock.delivered_count(), 1);
    assert_eq!(mock.connections(), 1);
}

#[tokio::test]
async fn the_ca_file_matches_the_pem() {
    let mock = MockLine::start().await;
    assert!(mock.url().starts_with("https://127.0.0.1:"));
    let file = std::fs::read_to_string(mock.ca_path()).expect("ca.pem");
    assert_eq!(file, mock.ca_pem());
    assert!(mock.ca_path().starts_with(&mock.pki().dir));
    let dir = mock.pki().dir.clone();
    drop(mock);
    assert!(!dir.exists(), "the PKI cleans up after itself");
}

#[tokio::test]
async fn an_untrusting_client_is_refused() {
    let mock = MockLine::start().await;
    let stranger = support::pki::TestPki::new();
    let config = (*stranger.client_config_alpn(&[])).clone();
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .build();
    let client: Https = Client::builder(TokioExecutor::new()).build(connector);
    let url = format!("{}/v2/bot/info", mock.url());
    assert!(
        try_send(&client, Method::GET, &url, &[("authorization", TOKEN)], "")
            .await
            .is_err()
    );
    assert_eq!(mock.requests().len(), 0);
    assert_eq!(mock.lookup_count(), 0);
}

#[tokio::test]
async fn shutdown_ends_hanging_requests_and_closes_the_port() {
    let mock = MockLine::start().await;
    mock.script([Fault::Hang]);
    let client = client(&mock, false);
    let hanging = {
        let (client, url) = (client.clone(), format!("{}{PUSH}", mock.url()));
        tokio::spawn(async move {
            try_send(
                &client,
                Method::POST,
                &url,
                &[("authorization", TOKEN)],
                "{}",
            )
            .await
            .map(|r| r.status)
            .map_err(|e| e.to_string())
        })
    };
    mock.wait_requests(1).await;
    mock.shutdown().await;
    let outcome = tokio::time::timeout(Duration::from_secs(5), hanging)
        .await
        .expect("shutdown ended the hang")
        .expect("task");
    assert!(outcome.is_err(), "{outcome:?}");
    assert!(tokio::net::TcpStream::connect(mock.addr()).await.is_err());
    assert_eq!(mock.requests().len(), 1, "records survive shutdown");
}

#[tokio::test]
async fn dropping_the_mock_ends_hanging_requests() {
    let mock = MockLine::start().await;
    mock.script([Fault::AcceptThenHang]);
    let client = client(&mock, true);
    let hanging = {
        let (client, url) = (client.clone(), format!("{}{PUSH}", mock.url()));
        tokio::spawn(async move {
            try_send(
                &client,
                Method::POST,
                &url,
                &[("authorization", TOKEN)],
                "{}",
            )
            .await
            .map(|r| r.status)
            .map_err(|e| e.to_string())
        })
    };
    mock.wait_requests(1).await;
    drop(mock);
    let outcome = tokio::time::timeout(Duration::from_secs(5), hanging)
        .await
        .expect("drop ended the hang")
        .expect("task");
    assert!(outcome.is_err(), "{outcome:?}");
}

/// Sends a push with `key` on a task of its own, for tests that hold requests.
fn spawn_push(
    client: &Https,
    mock: &MockLine,
    key: &'static str,
) -> tokio::task::JoinHandle<Result<Reply, String>> {
    let (client, url) = (client.clone(), format!("{}{PUSH}", mock.url()));
    tokio::spawn(async move {
        let headers = [("authorization", TOKEN), ("x-line-retry-key", key)];
        try_send(&client, Method::POST, &url, &headers, "{\"messages\":[{}]}")
            .await
            .map_err(|e| e.to_string())
    })
}

const KEY_B: &str = "223e4567-e89b-42d3-a456-426614174000";
const KEY_C: &str = "323e4567-e89b-42d3-a456-426614174000";

#[tokio::test]
async fn hold_keeps_keyed_requests_until_released() {
    let mock = MockLine::start().await;
    let client = client(&mock, true);
    let hold = mock.hold();
    let a = spawn_push(&client, &mock, KEY);
    let b = spawn_push(&client, &mock, KEY_B);
    mock.wait_held(2).await;
    assert_eq!(mock.held(), 2);
    assert_eq!(mock.requests().len(), 2, "recorded on arrival");
    assert_eq!(mock.delivered_count(), 0, "held before acceptance");
    // Other endpoints are not held.
    let info = call(&client, &mock, Method::GET, "/v2/bot/info").await;
    assert_eq!(info.status, StatusCode::OK);
    assert!(!a.is_finished() && !b.is_finished());

    hold.release();
    for held in [a, b] {
        let reply = within(WAIT_LIMIT, "a held push was answered", held)
            .await
            .expect("task")
            .expect("answer");
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(mock.held(), 0);
    assert_eq!(mock.delivered_count(), 2);
    // Released for good: the next push is not held.
    assert_eq!(
        push(&client, &mock, Some(KEY_C)).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_held_request_whose_client_goes_away_is_no_longer_counted() {
    let mock = MockLine::start().await;
    let _hold = mock.hold();
    let client = client(&mock, false);
    let gone = spawn_push(&client, &mock, KEY);
    mock.wait_held(1).await;
    gone.abort();
    drop(client);
    let mut held = mock.held();
    let deadline = Instant::now() + WAIT_LIMIT;
    while held != 0 {
        assert!(Instant::now() < deadline, "still {held} held");
        tokio::time::sleep(Duration::from_millis(10)).await;
        held = mock.held();
    }
    assert_eq!(mock.delivered_count(), 0);
}

#[tokio::test]
async fn hold_until_n_is_a_barrier() {
    let mock = MockLine::start().await;
    mock.script([Fault::HoldUntil(3), Fault::HoldUntil(3)]);
    let client = client(&mock, true);
    let a = spawn_push(&client, &mock, KEY);
    let b = spawn_push(&client, &mock, KEY_B);
    mock.wait_requests(2).await;
    assert_eq!(mock.delivered_count(), 0, "both wait for the third");
    let c = push(&client, &mock, Some(KEY_C)).await;
    assert_eq!(c.status, StatusCode::OK);
    for held in [a, b] {
        let reply = within(WAIT_LIMIT, "a push at the barrier was answered", held)
            .await
            .expect("task")
            .expect("answer");
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(mock.delivered_count(), 3);
    assert_eq!(mock.faults_applied().get("hold_until"), Some(&2));
}

#[tokio::test]
async fn accept_then_reset_delivers_then_kills_the_connection() {
    for h2 in [false, true] {
        let mock = MockLine::start().await;
        mock.script([Fault::AcceptThenReset]);
        let client = client(&mock, h2);
        let err = match push_with(
            &client,
            &mock,
            &[("authorization", TOKEN), ("x-line-retry-key", KEY)],
        )
        .await
        {
            Ok(reply) => panic!("h2={h2}: answered {}", reply.status),
            Err(err) => err,
        };
        if h2 {
            assert_eq!(
                io_kind(err.as_ref()),
                Some(std::io::ErrorKind::ConnectionReset),
                "{err:?}"
            );
        }
        assert_eq!(
            mock.delivered_count(),
            1,
            "h2={h2}: delivered before the reset"
        );
        let retry = push(&client, &mock, Some(KEY)).await;
        assert_eq!(retry.status, StatusCode::CONFLICT);
        let delivered = &mock.deliveries()[0];
        assert_eq!(
            retry.header("x-line-accepted-request-id"),
            delivered.request_id
        );
        assert_eq!(
            Some(&retry.json()["sentMessages"]),
            delivered.sent_messages.as_ref(),
            "h2={h2}: the delivery records what LINE answered"
        );
        assert_eq!(
            mock.connections(),
            2,
            "h2={h2}: the reset connection was not reused"
        );
    }
}

#[tokio::test]
async fn arrival_times_are_recorded() {
    let mock = MockLine::start().await;
    let client = client(&mock, false);
    let before = Instant::now();
    push(&client, &mock, Some(KEY)).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    push(&client, &mock, Some(KEY_B)).await;
    let requests = mock.requests();
    let deliveries = mock.deliveries();
    assert!(before <= requests[0].at && requests[0].at <= deliveries[0].at);
    assert!(requests[1].at.duration_since(requests[0].at) >= Duration::from_millis(20));
}

/// Statuses of `n` sequential pushes (fresh keys) under chaos with `seed`.
async fn chaos_statuses(seed: u64, n: usize) -> (Vec<u16>, usize, usize) {
    let mock = MockLine::start().await;
    mock.chaos(support::mock_line::Chaos {
        seed,
        status_500: 0.3,
        accept_then_500: 0.2,
        ..Default::default()
    });
    let client = client(&mock, true);
    let mut statuses = Vec::new();
    for _ in 0..n {
        statuses.push(push(&client, &mock, None).await.status.as_u16());
    }
    let applied = mock.faults_applied();
    assert_eq!(
        statuses.iter().filter(|s| **s == 500).count(),
        applied.get("status").copied().unwrap_or(0)
            + applied.get("accept_then_status").copied().unwrap_or(0)
    );
    (
        statuses,
        applied.get("accept_then_status").copied().unwrap_or(0),
        mock.delivered_count(),
    )
}

#[tokio::test]
async fn chaos_draws_the_given_mix_from_its_seed() {
    let (statuses, accepted_500s, delivered) = chaos_statuses(42, 200).await;
    let failed = statuses.iter().filter(|s| **s == 500).count();
    // Half of 200 on average; far outside this band means the mix is not applied.
    assert!((70..=130).contains(&failed), "{failed} of 200 failed");
    assert_eq!(
        delivered,
        200 - failed + accepted_500s,
        "a 500 after acceptance is still a delivery"
    );
    let (again, _, _) = chaos_statuses(42, 200).await;
    assert_eq!(statuses, again, "the same seed, the same faults");
    let (other, _, _) = chaos_statuses(43, 200).await;
    assert_ne!(statuses, other);
}

#[tokio::test]
async fn scripted_faults_come_before_chaos_and_calm_ends_it() {
    let mock = MockLine::start().await;
    mock.chaos(support::mock_line::Chaos {
        seed: 1,
        status_500: 1.0,
        ..Default::default()
    });
    mock.script([Fault::Status(503)]);
    let client = client(&mock, false);
    assert_eq!(
        push(&client, &mock, None).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        push(&client, &mock, None).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    mock.calm();
    assert_eq!(push(&client, &mock, None).await.status, StatusCode::OK);
    assert_eq!(mock.faults_applied().get("status"), Some(&2));
}

// --- channels and tokens --------------------------------------------------------------

use support::mock_line::{automatic_bot_user_id, client_assertion, Channel, TokenKind};

const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");
const UNAUTHORIZED: &str =
    "Authentication failed. Confirm that the access token in the authorization header is valid.";

fn form(fields: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish()
}

async fn post_form(client: &Https, mock: &MockLine, path: &str, fields: &[(&str, &str)]) -> Reply {
    let url = format!("{}{path}", mock.url());
    try_send(client, Method::POST, &url, &[FORM], &form(fields))
        .await
        .expect("the mock answers")
}

async fn verify_v2(client: &Https, mock: &MockLine, token: &str) -> Reply {
    post_form(client, mock, "/v2/oauth/verify", &[("access_token", token)]).await
}

async fn verify_v21(client: &Https, mock: &MockLine, token: &str) -> Reply {
    let query = form(&[("access_token", token)]);
    let url = format!("{}/oauth2/v2.1/verify?{query}", mock.url());
    try_send(client, Method::GET, &url, &[], "")
        .await
        .expect("the mock answers")
}

async fn bot_info(client: &Https, mock: &MockLine, token: &str) -> Reply {
    let url = format!("{}/v2/bot/info", mock.url());
    let bearer = format!("Bearer {token}");
    try_send(client, Method::GET, &url, &[("authorization", &bearer)], "")
        .await
        .expect("the mock answers")
}

/// A push of two messages as `token` (raw, without `Bearer `).
async fn push_as(client: &Https, mock: &MockLine, token: &str, key: Option<&str>) -> Reply {
    let bearer = format!("Bearer {token}");
    let mut headers = vec![
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
    ];
    headers.extend(key.map(|k| ("x-line-retry-key", k)));
    push_with(client, mock, &headers)
        .await
        .expect("the mock answers")
}

/// Sends a request on a task of its own: the answer's status, or the error.
fn spawn_send(
    client: &Https,
    method: Method,
    url: String,
    headers: Vec<(&'static str, String)>,
    body: String,
) -> tokio::task::JoinHandle<Result<StatusCode, String>> {
    let client = client.clone();
    tokio::spawn(async move {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        try_send(&client, method, &url, &headers, &body)
            .await
            .map(|r| r.status)
            .map_err(|e| e.to_string())
    })
}

/// The field names of a JSON object, sorted.
fn fields(value: &Value) -> Vec<&str> {
    let mut names: Vec<&str> = value
        .as_object()
        .expect("a JSON object")
        .keys()
        .map(String::as_str)
        .collect();
    names.sort_unstable();
    names
}

/// Long opaque printable ASCII, no spaces: what a LINE channel access token looks like.
fn assert_token_shape(token: &str) {
    assert!(token.len() >= 100, "{token}");
    assert!(token.bytes().all(|b| b.is_ascii_graphic()), "{token}");
    assert!(!token.starts_with("Bearer"), "{token}");
}

fn assert_oauth_error(reply: &Reply, error: &str) {
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{:?}", reply.body);
    let body = reply.json();
    assert_eq!(fields(&body), ["error", "error_description"]);
    assert_eq!(body["error"], error);
    assert!(body["error_description"].is_string());
}

fn assert_expired(reply: &Reply) {
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{:?}", reply.body);
    assert_eq!(
        reply.json(),
        json!({"error": "invalid_request", "error_description": "access token expired"})
    );
}

fn assert_unauthorized(reply: &Reply) {
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.json(), json!({ "message": UNAUTHORIZED }));
}

/// `expires_in` as verify answers it: counting down from `lifetime`, a little spent.
fn assert_expires_in(reply: &Reply, ch: &Channel, lifetime: u64) {
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let body = reply.json();
    assert_eq!(fields(&body), ["client_id", "expires_in", "scope"]);
    assert_eq!(body["client_id"], ch.id.as_str());
    assert_eq!(body["scope"], "profile chat_message.write");
    let left = body["expires_in"].as_u64().expect("expires_in is a number");
    assert!(
        lifetime.saturating_sub(60) <= left && left <= lifetime,
        "{left} of {lifetime}"
    );
}

#[tokio::test]
async fn short_lived_tokens_are_issued_for_the_channel_id_and_secret() {
    let mock = MockLine::start().await;
    let client = client(&mock, false);
    let ch = mock.channel();
    assert!(ch.id.len() == 10 && ch.id.bytes().all(|b| b.is_ascii_digit()));
    let credentials = |secret: &str| {
        form(&[
            ("grant_type", "client_credentials"),
            ("client_id", &ch.id),
            ("client_secret", secret),
        ])
    };
    let url = format!("{}/v2/oauth/accessToken", mock.url());
    let issue = |body: String| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            try_send(&client, Method::POST, &url, &[FORM], &body)
                .await
                .expect("the mock answers")
        }
    };
    let first = issue(credentials(&ch.secret)).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    assert_eq!(first.header("content-type"), "application/json");
    let body = first.json();
    assert_eq!(fields(&body), ["access_token", "expires_in", "token_type"]);
    assert_eq!(body["expires_in"], 2_592_000);
    assert_eq!(body["token_type"], "Bearer");
    let token = body["access_token"].as_str().expect("a token").to_owned();
    assert_token_shape(&token);
    let second = issue(credentials(&ch.secret)).await.json();
    assert_ne!(second["access_token"], token.as_str(), "each token is new");

    assert_oauth_error(
        &issue(credentials("not-the-secret")).await,
        "invalid_client",
    );
    let stranger = form(&[
        ("grant_type", "client_credentials"),
        ("client_id", "1000000000"),
        ("client_secret", &ch.secret),
    ]);
    assert_oauth_error(&issue(stranger).await, "invalid_client");

    // The token works, for its channel.
    assert_eq!(
        push_as(&client, &mock, &token, Some(KEY)).await.status,
        StatusCode::OK
    );
    assert_eq!(mock.deliveries_for(&ch).len(), 1);
    assert_eq!(mock.deliveries()[0].channel, ch.id);
    assert_eq!(mock.channel_of(&token), ch);
    // Issuing is bot traffic: it is among the requests; nothing was a lookup.
    let paths: Vec<String> = mock.requests().into_iter().map(|r| r.path).collect();
    let mut expected = vec!["/v2/oauth/accessToken".to_owned(); 4];
    expected.push(PUSH.to_owned());
    assert_eq!(paths, expected);
    assert_eq!(mock.lookup_count(), 0);
}

#[tokio::test]
async fn v21_tokens_are_issued_for_a_jwt_assertion() {
    let mock = MockLine::start().await;
    let client = client(&mock, true);
    let ch = mock.channel();
    let assertion = client_assertion(&ch);
    assert_eq!(assertion.split('.').count(), 3, "header.payload.signature");
    let issue = |assertion_type: &str, assertion: &str| {
        let fields = [
            ("grant_type", "client_credentials"),
            ("client_assertion_type", assertion_type),
            ("client_assertion", assertion),
        ];
        let body = form(&fields);
        let (client, url) = (client.clone(), format!("{}/oauth2/v2.1/token", mock.url()));
        async move {
            try_send(&client, Method::POST, &url, &[FORM], &body)
                .await
                .expect("the mock answers")
        }
    };
    const JWT: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
    let reply = issue(JWT, &assertion).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let body = reply.json();
    assert_eq!(
        fields(&body),
        ["access_token", "expires_in", "key_id", "token_type"]
    );
    assert_eq!(body["expires_in"], 2_592_000);
    assert_eq!(body["token_type"], "Bearer");
    assert!(!body["key_id"].as_str().expect("a key id").is_empty());
    let token = body["access_token"].as_str().expect("a token");
    assert_token_shape(token);
    assert_expires_in(&verify_v21(&client, &mock, token).await, &ch, 2_592_000);

    // A channel this mock does not know, and an assertion whose iss is not its sub.
    let unknown = Channel {
        id: "1000000000".into(),
        ..ch.clone()
    };
    assert_oauth_error(
        &issue(JWT, &client_assertion(&unknown)).await,
        "invalid_client",
    );
    let b64 = |v: Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let mismatched = format!(
        "{}.{}.c2ln",
        b64(json!({"alg": "RS256", "typ": "JWT"})),
        b64(json!({"iss": ch.id, "sub": "1000000000"}))
    );
    assert_oauth_error(&issue(JWT, &mismatched).await, "invalid_client");
    assert_oauth_error(&issue(JWT, "not.a-jwt").await, "invalid_client");
    assert_eq!(
        issue("basic", &assertion).await.status,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn stateless_tokens_are_issued_for_a_secret_or_an_assertion() {
    let mock = MockLine::start().await;
    let client = client(&mock, false);
    let ch = mock.channel();
    let assertion = client_assertion(&ch);
    let by_secret = [
        ("grant_type", "client_credentials"),
        ("client_id", ch.id.as_str()),
        ("client_secret", ch.secret.as_str()),
    ];
    let by_assertion = [
        ("grant_type", "client_credentials"),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("client_assertion", assertion.as_str()),
    ];
    let mut tokens = Vec::new();
    for fields_sent in [&by_secret, &by_assertion] {
        let reply = post_form(&client, &mock, "/oauth2/v3/token", fields_sent).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        let body = reply.json();
        assert_eq!(fields(&body), ["access_token", "expires_in", "token_type"]);
        assert_eq!(body["expires_in"], 900);
        assert_eq!(body["token_type"], "Bearer");
        let token = body["access_token"].as_str().expect("a token").to_owned();
        assert_token_shape(&token);
        assert_eq!(
            bot_info(&client, &mock, &token).await.json()["userId"],
            ch.bot_user_id.as_str(),
            "a stateless token is good for its channel"
        );
        tokens.push(token);
    }
    assert_ne!(tokens[0], tokens[1]);

    let wrong_secret = [
        ("grant_type", "client_credentials"),
        ("client_id", ch.id.as_str()),
        ("client_secret", "wrong"),
    ];
    let reply = post_form(&client, &mock, "/oauth2/v3/token", &wrong_secret).await;
    assert_oauth_error(&reply, "invalid_client");
    let stranger = Channel {
        id: "1000000000".into(),
        ..ch.clone()
    };
    let wrong_assertion = [
        ("grant_type", "client_credentials"),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("client_assertion", &client_assertion(&stranger)),
    ];
    let reply = post_form(&client, &mock, "/oauth2/v3/token", &wrong_assertion).await;
    assert_oauth_error(&reply, "invalid_client");
}

#[tokio::test]
async fn v2_verify_knows_short_and_long_lived_tokens_only() {
    let mock = MockLine::start().await;
    let client = client(&mock, false);
    let ch = mock.channel();
    let short = mock.issue_token(&ch, TokenKind::ShortLived);
    let long = mock.issue_token(&ch, TokenKind::LongLived);
    for token in [&short, &long] {
        assert_token_shape(token);
    }
    assert_expires_in(&verify_v2(&client, &mock, &short).await, &ch, 2_592_000);
    let ten_years = 10 * 365 * 24 * 3600;
    assert_expires_in(&verify_v2(&client, &mock, &long).await, &ch, ten_years);

    let stateless = mock.issue_token(&ch, TokenKind::Stateless);
    let v21 = mock.issue_token(&ch, TokenKind::V21);
    let revoked = mock.issue_token(&ch, TokenKind::ShortLived);
    mock.revoke(&revoked);
    for token in [&stateless, &v21, &revoked, &"never-issued".to_owned()] {
        assert_expired(&verify_v2(&client, &mock, token).await);
    }
    // Issued elsewhere: no request at all; each verify was a lookup of its token.
    assert!(mock.requests().is_empty());
    let lookups = mock.lookups();
    assert_eq!(lookups.len(), 6);
    assert!(lookups
        .iter()
        .all(|l| l.method == "POST" && l.path == "/v2/oauth/verify"));
    assert_eq!(lookups[0].token.as_deref(), Some(short.as_str()));
    assert_eq!(lookups[5].token.as_deref(), Some("never-issued"));
}

#[tokio::test]
async fn v21_verify_knows_v21_tokens_only() {
    let mock = MockLine::start().await;
    let client = client(&mock, true);
    let ch = mock.channel();
    let v21 = mock.issue_token(&ch, TokenKind::V21);
    assert_token_shape(&v21);
    assert_expires_in(&verify_v21(&client, &mock, &v21).await, &ch, 2_592_000);
    let revoked = mock.issue_token(&ch, TokenKind::V21);
    mock.revoke(&revoked);
    let others = [
        mock.issue_token(&ch, TokenKind::ShortLived),
        mock.issue_token(&ch, TokenKind::LongLived),
        mock.issue_token(&ch, TokenKind::Stateless),
        revoked,
        "never-issued".to_owned(),
    ];
    for token in &others {
        assert_expired(&verify_v21(&client, &mock, token).await);
    }
    let lookups = mock.lookups();
    assert_eq!(lookups.len(), 6);
    assert!(lookups
        .iter()
        .all(|l| l.method == "GET" && l.path == "/oauth2/v2.1/verify"));
    assert_eq!(lookups[0].token.as_deref(), Some(v21.as_str()));
}

#[tokio::test]
async fn expires_in_counts_down_and_an_expired_token_is_refused() {
    let mock = MockLine::start().await;
    let client = client(&mock, false);
    let ch = mock.channel();
    let token = mock.issue_token(&ch, TokenKind::ShortLived);
    mock.age(&token, Duration::from_secs(1000));
    assert_expires_in(
        &verify_v2(&client, &mock, &token).await,
        &ch,
        2_592_000 - 1000,
    );
    mock.age(&token, Duration::from_secs(2_592_000));
    assert_expired(&verify_v2(&client, &mock, &token).await);
    assert_unauthorized(&push_as(&client, &mock, &token, Some(KEY)).await);
    assert_unauthorized(&bot_info(&client, &mock, &token).await);
    assert_eq!(mock.delivered_count(), 0);
}

#[tokio::test]
async fn bot_info_names_the_one_bot_of_the_tokens_channel() {
    let mock = MockLine::start().await;
    let client = client(&mock, false);
    let (a, b) = (mock.channel(), mock.channel());
    assert_ne!(a.id, b.id);
    assert_ne!(a.bot_user_id, b.bot_user_id);
    let kinds = [
        TokenKind::LongLived,
        TokenKind::ShortLived,
        TokenKind::V21,
        TokenKind::Stateless,
    ];
    for ch in [&a, &b] {
        let mut answers = Vec::new();
        for kind in kinds {
            let reply = bot_info(&client, &mock, &mock.issue_token(ch, kind)).await;
            assert_eq!(reply.status, StatusCode::OK);
            answers.push(reply.json());
        }
        let info = &answers[0];
        assert_eq!(
            fields(info),
            [
                "basicId",
                "chatMode",
                "displayName",
                "markAsReadMode",
                "userId"
            ]
        );
        let user_id = info["userId"].as_str().expect("userId");
        assert_eq!(user_id, ch.bot_user_id);
        assert!(user_id.len() == 33 && user_id.starts_with('U'));
        assert!(user_id[1..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert!(info["basicId"].as_str().expect("basicId").starts_with('@'));
        assert!(info["displayName"].is_string());
        assert_eq!(info["chatMode"], "bot");
        assert_eq!(info["markAsReadMode"], "auto");
        assert!(answers.iter().all(|other| other == info), "{answers:?}");
    }
    // Another mock's channels are other channels.
    let elsewhere = MockLine::start().await;
    let c = elsewhere.channel();
    assert!(c.id != a.id && c.id != b.id);
}

#[tokio::test]
async fn a_key_is_consumed_for_the_channel_not_the_token() {
    let mock = MockLine::start().await;
    let client = client(&mock, true);
    let (ch, other) = (mock.channel(), mock.channel());
    let token_a = mock.issue_token(&ch, TokenKind::ShortLived);
    let token_b = mock.issue_token(&ch, TokenKind::V21);
    let first = push_as(&client, &mock, &token_a, Some(KEY)).await;
    assert_eq!(first.status, StatusCode::OK);
    // The bot rotated its token: LINE still knows the key.
    let again = push_as(&client, &mock, &token_b, Some(KEY)).await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert_eq!(again.json()["message"], "The retry key is already accepted");
    assert_eq!(
        again.header("x-line-accepted-request-id"),
        first.header("x-line-request-id")
    );
    assert_eq!(again.json()["sentMessages"], first.json()["sentMessages"]);
    // Multicast answers its 409 without sentMessages, across tokens too.
    let url = format!("{}/v2/bot/message/multicast", mock.url());
    for (token, status) in [(&token_b, StatusCode::OK), (&token_a, StatusCode::CONFLICT)] {
        let bearer = format!("Bearer {token}");
        let headers = [
            ("authorization", bearer.as_str()),
            ("x-line-retry-key", KEY_B),
        ];
        let reply = try_send(&client, Method::POST, &url, &headers, "{}")
            .await
            .expect("answer");
        assert_eq!(reply.status, status);
        assert!(reply.json().get("sentMessages").is_none());
    }
    // Another channel's key of the same text is its own.
    let token_c = mock.issue_token(&other, TokenKind::ShortLived);
    assert_eq!(
        push_as(&client, &mock, &token_c, Some(KEY)).await.status,
        StatusCode::OK
    );
    let mine = mock.deliveries_for(&ch);
    assert_eq!(mine.len(), 2, "the push and the multicast");
    let bearer_a = format!("Bearer {token_a}");
    assert_eq!(mine[0].authorization.as_deref(), Some(bearer_a.as_str()));
    assert_eq!(mine[0].request_id, first.header("x-line-request-id"));
    assert!(mine.iter().all(|d| d.channel == ch.id));
    let theirs = mock.deliveries_for(&other);
    assert_eq!(theirs.len(), 1);
    assert_eq!(theirs[0].retry_key.as_deref(), Some(KEY));
    assert_eq!(theirs[0].channel, other.id);
    assert_eq!(mock.delivered_count(), 3);
}

#[tokio::test]
async fn a_revoked_token_gets_401_and_its_channel_lives_on() {
    let mock = MockLine::start().await;
    let client = client(&mock, false);
    let ch = mock.channel();
    let old = mock.issue_token(&ch, TokenKind::ShortLived);
    assert_eq!(
        push_as(&client, &mock, &old, Some(KEY)).await.status,
        StatusCode::OK
    );
    mock.revoke(&old);
    assert_unauthorized(&push_as(&client, &mock, &old, Some(KEY_B)).await);
    assert_unauthorized(&push_as(&client, &mock, &old, None).await);
    assert_unauthorized(&bot_info(&client, &mock, &old).await);
    assert_expired(&verify_v2(&client, &mock, &old).await);
    // The channel's next token is good, and its first key is still consumed.
    let new = mock.issue_token(&ch, TokenKind::ShortLived);
    assert_eq!(
        push_as(&client, &mock, &new, Some(KEY)).await.status,
        StatusCode::CONFLICT
    );
    assert_eq!(
        push_as(&client, &mock, &new, Some(KEY_B)).await.status,
        StatusCode::OK
    );
    assert_eq!(mock.deliveries_for(&ch).len(), 2);
    // A token the mock never saw can be revoked too.
    mock.revoke("channel-z");
    assert_unauthorized(&push_as(&client, &mock, "channel-z", None).await);
}

#[tokio::test]
async fn lookups_are_logged_apart_from_requests() {
    let mock = MockLine::start().await;
    let client = client(&mock, false);
    let ch = mock.channel();
    let short = mock.issue_token(&ch, TokenKind::ShortLived);
    let v21 = mock.issue_token(&ch, TokenKind::V21);
    let before = Instant::now();
    assert_eq!(
        bot_info(&client, &mock, &short).await.status,
        StatusCode::OK
    );
    assert_eq!(
        verify_v2(&client, &mock, &short).await.status,
        StatusCode::OK
    );
    assert_eq!(
        verify_v21(&client, &mock, &v21).await.status,
        StatusCode::OK
    );
    let info = call(&client, &mock, Method::GET, "/v2/bot/info").await;
    assert_eq!(info.status, StatusCode::OK, "an unknown token's channel");
    mock.wait_lookups(4).await;
    assert!(mock.requests().is_empty(), "no lookup is a request");
    push_as(&client, &mock, &short, Some(KEY)).await;
    mock.wait_requests(1).await;
    assert_eq!(mock.requests().len(), 1);
    assert_eq!(mock.requests()[0].path, PUSH);

    let lookups = mock.lookups();
    assert_eq!(mock.lookup_count(), 4);
    let seen: Vec<(&str, &str, Option<&str>)> = lookups
        .iter()
        .map(|l| (l.method.as_str(), l.path.as_str(), l.token.as_deref()))
        .collect();
    assert_eq!(
        seen,
        [
            ("GET", "/v2/bot/info", Some(short.as_str())),
            ("POST", "/v2/oauth/verify", Some(short.as_str())),
            ("GET", "/oauth2/v2.1/verify", Some(v21.as_str())),
            ("GET", "/v2/bot/info", Some("channel-a")),
        ]
    );
    assert!(before <= lookups[0].at);
    assert!(lookups.windows(2).all(|w| w[0].at <= w[1].at));
    // A bot/info without a token is still a lookup (of no token), and a 401.
    let url = format!("{}/v2/bot/info", mock.url());
    let reply = try_send(&client, Method::GET, &url, &[], "")
        .await
        .expect("answer");
    assert_unauthorized(&reply);
    assert_eq!(mock.lookups()[4].token, None);
    assert_eq!(mock.requests().len(), 1);
}

#[tokio::test]
async fn scripted_lookup_faults_hit_lookups_only() {
    let mock = MockLine::start().await;
    let client = client(&mock, false);
    let ch = mock.channel();
    let token = mock.issue_token(&ch, TokenKind::ShortLived);
    mock.script([Fault::Status(503)]);
    mock.script_lookups([
        Fault::Status(500),
        Fault::Delay(Duration::from_millis(200)),
        Fault::Reset,
    ]);
    // The keyed script is for keyed requests, the lookup script for lookups.
    let push = push_as(&client, &mock, &token, Some(KEY)).await;
    assert_eq!(push.status, StatusCode::SERVICE_UNAVAILABLE);
    let failed = bot_info(&client, &mock, &token).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(failed.json()["message"], "Internal Server Error");
    let started = Instant::now();
    assert_eq!(
        verify_v2(&client, &mock, &token).await.status,
        StatusCode::OK
    );
    assert!(started.elapsed() >= Duration::from_millis(200), "delayed");
    let url = format!("{}/v2/bot/info", mock.url());
    let bearer = format!("Bearer {token}");
    let reset = try_send(
        &client,
        Method::GET,
        &url,
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert!(reset.is_err(), "reset: {:?}", reset.map(|r| r.status));
    // The script is spent: back to normal.
    assert_eq!(
        bot_info(&client, &mock, &token).await.status,
        StatusCode::OK
    );
    assert_eq!(mock.lookup_count(), 4);
    assert_eq!(mock.faults_applied().get("status"), Some(&1), "the push's");

    // A hanging lookup hangs until the mock goes.
    mock.script_lookups([Fault::Hang]);
    let hanging = spawn_send(
        &client,
        Method::GET,
        url,
        vec![("authorization", bearer)],
        String::new(),
    );
    mock.wait_lookups(5).await;
    assert!(!hanging.is_finished());
    mock.shutdown().await;
    let outcome = within(WAIT_LIMIT, "shutdown ended the hanging lookup", hanging)
        .await
        .expect("task");
    assert!(outcome.is_err(), "{outcome:?}");
}

#[tokio::test]
async fn hold_lookups_keeps_lookups_until_released() {
    let mock = MockLine::start().await;
    let client = client(&mock, true);
    let ch = mock.channel();
    let token = mock.issue_token(&ch, TokenKind::ShortLived);
    let hold = mock.hold_lookups();
    let info = spawn_send(
        &client,
        Method::GET,
        format!("{}/v2/bot/info", mock.url()),
        vec![("authorization", format!("Bearer {token}"))],
        String::new(),
    );
    let verify = spawn_send(
        &client,
        Method::POST,
        format!("{}/v2/oauth/verify", mock.url()),
        vec![(FORM.0, FORM.1.to_owned())],
        form(&[("access_token", &token)]),
    );
    mock.wait_lookups_held(2).await;
    assert_eq!(mock.lookups_held(), 2);
    assert_eq!(mock.lookup_count(), 2, "logged on arrival");
    // Keyed requests have their own gate, open.
    assert_eq!(
        push_as(&client, &mock, &token, Some(KEY)).await.status,
        StatusCode::OK
    );
    assert_eq!(mock.held(), 0);
    assert!(!info.is_finished() && !verify.is_finished());

    hold.release();
    for held in [info, verify] {
        let status = within(WAIT_LIMIT, "a held lookup was answered", held)
            .await
            .expect("task")
            .expect("answer");
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(mock.lookups_held(), 0);
    assert_eq!(
        bot_info(&client, &mock, &token).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn an_unknown_token_is_a_channel_of_its_own() {
    let mock = MockLine::start().await;
    let client = client(&mock, false);
    for token in ["unknown-a", "unknown-b"] {
        assert_eq!(
            push_as(&client, &mock, token, Some(KEY)).await.status,
            StatusCode::OK,
            "{token}: a channel of its own, its key fresh"
        );
    }
    assert_eq!(
        push_as(&client, &mock, "unknown-a", Some(KEY)).await.status,
        StatusCode::CONFLICT,
        "the same token, the same channel"
    );
    assert_eq!(mock.delivered_count(), 2);
    let (a, b) = (mock.channel_of("unknown-a"), mock.channel_of("unknown-b"));
    assert_ne!(a.id, b.id);
    assert_eq!(mock.deliveries_for(&a).len(), 1);
    assert_eq!(mock.deliveries_for(&b).len(), 1);
    let channels: Vec<String> = mock.deliveries().into_iter().map(|d| d.channel).collect();
    assert_eq!(channels, [a.id.clone(), b.id.clone()]);

    // Its bot is derived from the token's text: U and SHA-256's first 32 hex digits.
    use sha2::Digest;
    let digest: String = sha2::Sha256::digest(b"unknown-a")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let expected = format!("U{}", &digest[..32]);
    assert_eq!(automatic_bot_user_id("unknown-a"), expected);
    assert_eq!(a.bot_user_id, expected);
    let info = bot_info(&client, &mock, "unknown-a").await;
    assert_eq!(info.status, StatusCode::OK);
    assert_eq!(info.json()["userId"], expected.as_str());
    assert_eq!(
        bot_info(&client, &mock, "unknown-b").await.json()["userId"],
        b.bot_user_id.as_str()
    );
    // The same in another mock: the bot depends on the text alone.
    let elsewhere = MockLine::start().await;
    assert_eq!(elsewhere.channel_of("unknown-a").bot_user_id, expected);
    // No verify endpoint knows it; no token at all is still a 401.
    assert_expired(&verify_v2(&client, &mock, "unknown-a").await);
    for authorization in ["Bearer ", "Basic dXNlcjpwYXNz"] {
        let reply = push_with(&client, &mock, &[("authorization", authorization)])
            .await
            .expect("answer");
        assert_unauthorized(&reply);
    }
}
