//! A mock api.line.me on 127.0.0.1:0: TLS with its own test CA, HTTP/1.1 and HTTP/2,
//! LINE's documented retry-key semantics, and scriptable faults. It records every
//! request that arrives and every message it *delivers* (accepts), so tests assert on
//! what users would have received.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::pki::TestPki;

const KEYED: [&str; 4] = [
    "/v2/bot/message/push",
    "/v2/bot/message/multicast",
    "/v2/bot/message/narrowcast",
    "/v2/bot/message/broadcast",
];

#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer this status with a LINE-style body; nothing delivered.
    Status(u16),
    /// Accept and deliver (consuming the key), then answer this status instead.
    AcceptThenStatus(u16),
    /// Never answer; nothing delivered.
    Hang,
    /// Accept and deliver, then never answer.
    AcceptThenHang,
    /// Drop the connection without an answer (a RST: sockets have SO_LINGER 0).
    Reset,
    RateLimited {
        retry_after: Option<u64>,
    },
    MonthlyLimit,
    /// Wait, then behave normally.
    Delay(Duration),
}

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub retry_key: Option<String>,
    pub version: Version,
}

#[derive(Clone, Debug)]
pub struct Delivery {
    pub path: String,
    pub retry_key: Option<String>,
    pub request_id: String,
    pub body: Bytes,
    pub authorization: Option<String>,
}

struct Accepted {
    request_id: String,
    sent_messages: Option<Value>,
}

#[derive(Default)]
struct Log {
    faults: VecDeque<Fault>,
    requests: Vec<Recorded>,
    deliveries: Vec<Delivery>,
    /// (Authorization, key) → the accepted request: keys are per channel.
    accepted: HashMap<(String, String), Accepted>,
}

struct State {
    log: Mutex<Log>,
    arrived: watch::Sender<usize>,
    connections: AtomicUsize,
    next_id: AtomicU64,
    stop: CancellationToken,
}

impl State {
    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().expect("mock state lock")
    }

    fn request_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("00000000-0000-4000-8000-{n:012x}")
    }
}

pub struct MockLine {
    addr: SocketAddr,
    pki: TestPki,
    tls: bool,
    state: Arc<State>,
}

impl Drop for MockLine {
    fn drop(&mut self) {
        self.state.stop.cancel();
    }
}

/// The service's error: makes hyper drop the connection (the Reset fault).
#[derive(Debug)]
struct DropConnection;

impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mock drops the connection")
    }
}

impl std::error::Error for DropConnection {}

type Answer = Result<Response<Full<Bytes>>, DropConnection>;

impl MockLine {
    pub async fn start() -> MockLine {
        MockLine::start_with(true).await
    }

    pub async fn start_plain() -> MockLine {
        MockLine::start_with(false).await
    }

    async fn start_with(tls: bool) -> MockLine {
        let pki = TestPki::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("mock binds");
        let addr = listener.local_addr().expect("mock address");
        let (arrived, _) = watch::channel(0);
        let state = Arc::new(State {
            log: Mutex::new(Log::default()),
            arrived,
            connections: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            stop: CancellationToken::new(),
        });
        let acceptor = tls.then(|| {
            tokio_rustls::TlsAcceptor::from(pki.server_config(&[
                "127.0.0.1",
                "localhost",
                "api.line.me",
            ]))
        });
        tokio::spawn(accept_loop(listener, acceptor, state.clone()));
        MockLine {
            addr,
            pki,
            tls,
            state,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.addr
        )
    }

    pub fn ca_path(&self) -> &Path {
        &self.pki.ca_path
    }

    pub fn ca_pem(&self) -> &str {
        &self.pki.ca_pem
    }

    pub fn script(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state.log().faults.extend(faults);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.log().requests.clone()
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.state.log().deliveries.clone()
    }

    pub fn delivered_count(&self) -> usize {
        self.state.log().deliveries.len()
    }

    pub async fn wait_requests(&self, n: usize) {
        let mut arrived = self.state.arrived.subscribe();
        arrived
            .wait_for(|count| *count >= n)
            .await
            .expect("mock alive");
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::Relaxed)
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<State>,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = state.stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
        };
        state.connections.fetch_add(1, Ordering::Relaxed);
        // Linger 0 makes a dropped connection a RST, as a crashed LINE front end would;
        // the deprecation warns about blocking on close, which linger 0 never does.
        #[allow(deprecated)]
        let _ = stream.set_linger(Some(Duration::ZERO));
        let state = state.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let stop = state.stop.clone();
            let service = service_fn(move |req| handle(state.clone(), req));
            let builder = auto::Builder::new(TokioExecutor::new());
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = async {
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                } => {}
            }
        });
    }
}

fn json_answer(status: StatusCode, request_id: &str, body: Value) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    res.headers_mut().insert(
        "x-line-request-id",
        HeaderValue::from_str(request_id).expect("ascii id"),
    );
    res
}

fn is_uuid(key: &str) -> bool {
    let groups: Vec<&str> = key.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.chars().all(|c| c.is_ascii_hexdigit()))
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Answer {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let retry_key = parts
        .headers
        .get("x-line-retry-key")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let authorization = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let recorded = Recorded {
        method: parts.method.to_string(),
        path: path.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
        retry_key: retry_key.clone(),
        version: parts.version,
    };
    let count = {
        let mut log = state.log();
        log.requests.push(recorded);
        log.requests.len()
    };
    state.arrived.send_replace(count);

    let id = state.request_id();
    let bare_path = parts.uri.path();
    let keyed = parts.method == Method::POST && KEYED.contains(&bare_path);

    if bare_path.starts_with("/echo") {
        let headers: serde_json::Map<String, Value> = parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Value::from(String::from_utf8_lossy(v.as_bytes()).into_owned()),
                )
            })
            .collect();
        return Ok(json_answer(
            StatusCode::OK,
            &id,
            json!({"method": parts.method.as_str(), "path": path, "headers": headers, "body_len": body.len()}),
        ));
    }
    if !authorization
        .as_deref()
        .is_some_and(|a| a.starts_with("Bearer "))
    {
        return Ok(json_answer(
            StatusCode::UNAUTHORIZED,
            &id,
            json!({"message": "Authentication failed. Confirm that the access token in the authorization header is valid."}),
        ));
    }
    if let Some(key) = &retry_key {
        if !is_uuid(key) {
            return Ok(json_answer(
                StatusCode::BAD_REQUEST,
                &id,
                json!({"message": "The value for the 'X-Line-Retry-Key' header is invalid"}),
            ));
        }
        if !keyed {
            return Ok(json_answer(
                StatusCode::BAD_REQUEST,
                &id,
                json!({"message": "The retry key is not supported for this endpoint"}),
            ));
        }
    }
    if !keyed {
        return Ok(other_endpoint(
            &state,
            &parts.method,
            bare_path,
            &id,
            &body,
            authorization,
        ));
    }

    let fault = state.log().faults.pop_front();
    let accept = |state: &State| {
        accept(
            state,
            bare_path,
            &id,
            &body,
            retry_key.clone(),
            authorization.clone(),
        )
    };
    match fault {
        None => Ok(accept(&state)),
        Some(Fault::Delay(d)) => {
            tokio::time::sleep(d).await;
            Ok(accept(&state))
        }
        Some(Fault::Status(code)) => Ok(json_answer(
            status(code),
            &id,
            json!({"message": "An error occurred in the mock"}),
        )),
        Some(Fault::AcceptThenStatus(code)) => {
            let answer = accept(&state);
            if answer.status() == StatusCode::CONFLICT {
                return Ok(answer);
            }
            Ok(json_answer(
                status(code),
                &id,
                json!({"message": "An error occurred in the mock"}),
            ))
        }
        Some(Fault::Hang) => hang(&state).await,
        Some(Fault::AcceptThenHang) => {
            let answer = accept(&state);
            if answer.status() == StatusCode::CONFLICT {
                return Ok(answer);
            }
            hang(&state).await
        }
        Some(Fault::Reset) => Err(DropConnection),
        Some(Fault::RateLimited { retry_after }) => {
            let mut res = json_answer(
                StatusCode::TOO_MANY_REQUESTS,
                &id,
                json!({"message": "The API rate limit has been exceeded. Try again later."}),
            );
            if let Some(secs) = retry_after {
                res.headers_mut()
                    .insert("retry-after", HeaderValue::from(secs));
            }
            Ok(res)
        }
        Some(Fault::MonthlyLimit) => Ok(json_answer(
            StatusCode::TOO_MANY_REQUESTS,
            &id,
            json!({"message": "You have reached your monthly limit."}),
        )),
    }
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).expect("a valid scripted status")
}

async fn hang(state: &State) -> Answer {
    state.stop.cancelled().await;
    Err(DropConnection)
}

/// LINE's acceptance: the first success consumes the key; a later use gets 409 with
/// the accepted request's id (and, for push, its sentMessages).
fn accept(
    state: &State,
    path: &str,
    id: &str,
    body: &Bytes,
    key: Option<String>,
    authorization: Option<String>,
) -> Response<Full<Bytes>> {
    let mut log = state.log();
    let scope = (
        authorization.clone().unwrap_or_default(),
        key.clone().unwrap_or_default(),
    );
    if key.is_some() {
        if let Some(accepted) = log.accepted.get(&scope) {
            let mut answer = json!({"message": "The retry key is already accepted"});
            if let Some(sent) = &accepted.sent_messages {
                answer["sentMessages"] = sent.clone();
            }
            let mut res = json_answer(StatusCode::CONFLICT, id, answer);
            res.headers_mut().insert(
                "x-line-accepted-request-id",
                HeaderValue::from_str(&accepted.request_id).expect("ascii id"),
            );
            return res;
        }
    }
    let (status, answer, sent_messages) = if path == "/v2/bot/message/push" {
        let count = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v["messages"].as_array().map(Vec::len))
            .unwrap_or(1);
        let sent: Vec<Value> = (0..count)
            .map(|_| {
                let n = state.next_id.fetch_add(1, Ordering::Relaxed);
                json!({"id": format!("{}", 500_000_000_000_000u64 + n), "quoteToken": format!("q{n}")})
            })
            .collect();
        (
            StatusCode::OK,
            json!({"sentMessages": sent}),
            Some(Value::Array(sent)),
        )
    } else if path == "/v2/bot/message/narrowcast" {
        (StatusCode::ACCEPTED, json!({}), None)
    } else {
        (StatusCode::OK, json!({}), None)
    };
    if key.is_some() {
        log.accepted.insert(
            scope,
            Accepted {
                request_id: id.to_owned(),
                sent_messages,
            },
        );
    }
    log.deliveries.push(Delivery {
        path: path.to_owned(),
        retry_key: key,
        request_id: id.to_owned(),
        body: body.clone(),
        authorization,
    });
    json_answer(status, id, answer)
}

fn other_endpoint(
    state: &State,
    method: &Method,
    path: &str,
    id: &str,
    body: &Bytes,
    authorization: Option<String>,
) -> Response<Full<Bytes>> {
    match (method, path) {
        (&Method::POST, "/v2/bot/message/reply") => {
            state.log().deliveries.push(Delivery {
                path: path.to_owned(),
                retry_key: None,
                request_id: id.to_owned(),
                body: body.clone(),
                authorization,
            });
            json_answer(StatusCode::OK, id, json!({}))
        }
        (&Method::GET, "/v2/bot/info") => json_answer(
            StatusCode::OK,
            id,
            json!({"userId": "Ubot", "basicId": "@bot", "displayName": "mock"}),
        ),
        (&Method::GET, "/v2/bot/message/quota") => json_answer(
            StatusCode::OK,
            id,
            json!({"type": "limited", "value": 1000}),
        ),
        (&Method::POST, "/v2/bot/message/validate/push") => {
            json_answer(StatusCode::OK, id, json!({}))
        }
        (&Method::GET, p) if p.starts_with("/stream/") => {
            let n: usize = p["/stream/".len()..].parse().unwrap_or(0);
            let mut res = Response::new(Full::new(Bytes::from(vec![b'x'; n])));
            res.headers_mut().insert(
                "x-line-request-id",
                HeaderValue::from_str(id).expect("ascii id"),
            );
            res
        }
        _ => json_answer(StatusCode::NOT_FOUND, id, json!({"message": "Not found"})),
    }
}
