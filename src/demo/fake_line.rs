//! A stand-in for api.line.me that lives in the process: plain HTTP/1.1 on a loopback
//! port, the push endpoint with LINE's retry-key rule (a key is executed once; a repeat
//! gets 409 naming the accepted request and repeating its `sentMessages`), and faults.
//!
//! Faults are drawn per message and per attempt at that message, from the seed and the
//! body's bytes: the n-th request carrying a given message meets the same fault in
//! every run with the same seed, whoever sends it (the bot itself or the proxy) and in
//! whatever order the messages interleave. So the two runs of the demo face LINE
//! failing in exactly the same places, and differ only in what the client does next.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The one endpoint the demo's bot uses.
pub(crate) const PUSH: &str = "/v2/bot/message/push";
const BOT_INFO: &str = "/v2/bot/info";
/// The demo's one bot: every token belongs to its channel.
const BOT_USER_ID: &str = "U00000000000000000000000000000de0";

/// What can go wrong with one request, as it goes wrong at LINE's edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Fault {
    /// A 500 or 503 before anything is done: nothing delivered.
    Status(u16),
    /// The connection is reset before the request is accepted: nothing delivered.
    Reset,
    /// Accepted and delivered, then the connection is reset before the answer.
    AcceptThenReset,
    /// Accepted and delivered, then no answer until the client gives up.
    AcceptThenTimeout,
}

impl Fault {
    /// Its name in the demo's output.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Fault::Status(500) => "500",
            Fault::Status(503) => "503",
            Fault::Status(_) => "5xx",
            Fault::Reset => "reset",
            Fault::AcceptThenReset => "accepted then reset",
            Fault::AcceptThenTimeout => "accepted then no answer",
        }
    }
}

/// The chance of each fault per request; the rest are answered normally.
pub(crate) const FAULT_RATES: [(Fault, f64); 5] = [
    (Fault::Status(500), 0.06),
    (Fault::Status(503), 0.04),
    (Fault::Reset, 0.04),
    (Fault::AcceptThenReset, 0.05),
    (Fault::AcceptThenTimeout, 0.06),
];

/// The fault for the `attempt`-th request (from 0) carrying `body`, or none.
pub(crate) fn draw(seed: u64, body: &[u8], attempt: u32) -> Option<Fault> {
    let mut rng = fastrand::Rng::with_seed(
        seed ^ fnv1a(body) ^ u64::from(attempt).wrapping_mul(0x9e37_79b9_7f4a_7c15),
    );
    let mut roll = rng.f64();
    for (fault, p) in FAULT_RATES {
        if roll < p {
            return Some(fault);
        }
        roll -= p;
    }
    None
}

/// A stable hash of the body (std's hasher may change between Rust releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What the fake LINE saw and did, for the demo's table.
#[derive(Debug, Default, Clone)]
pub(crate) struct Tally {
    /// Every request to the push endpoint that arrived whole.
    pub(crate) requests: usize,
    /// Deliveries per message body: what users would have received.
    pub(crate) deliveries: HashMap<Bytes, usize>,
    /// 409s: a retry key that had already been accepted came again.
    pub(crate) conflicts: usize,
    /// How often each fault was applied.
    pub(crate) faults: BTreeMap<Fault, usize>,
}

impl Tally {
    pub(crate) fn total_deliveries(&self) -> usize {
        self.deliveries.values().sum()
    }
}

/// One accepted retry key: what a repeat of it is told.
struct Accepted {
    request_id: String,
    sent_messages: Value,
}

#[derive(Default)]
struct Log {
    tally: Tally,
    /// Requests that arrived so far per message body: the attempt number of the next.
    attempts: HashMap<Bytes, u32>,
    /// (Authorization, key): LINE scopes retry keys per channel.
    accepted: HashMap<(String, String), Accepted>,
    /// For request ids and message ids.
    next_id: u64,
}

struct State {
    seed: u64,
    /// How long an accepted-then-timeout request holds its answer before the
    /// connection is dropped: longer than any client here waits.
    hang: Duration,
    log: Mutex<Log>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl State {
    fn log(&self) -> MutexGuard<'_, Log> {
        // A panic while holding the lock leaves only counters behind: still readable.
        self.log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A running fake LINE; stopped by [`FakeLine::stop`] or when dropped.
pub(crate) struct FakeLine {
    addr: SocketAddr,
    state: Arc<State>,
}

impl FakeLine {
    /// Listens on 127.0.0.1 on a free port.
    pub(crate) async fn start(seed: u64, hang: Duration) -> std::io::Result<FakeLine> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            seed,
            hang,
            log: Mutex::new(Log::default()),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        state.tasks.spawn(accept_loop(listener, state.clone()));
        Ok(FakeLine { addr, state })
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every connection, waits (at most `limit`) for them to end, and returns
    /// what was seen.
    pub(crate) async fn stop(self, limit: Duration) -> Tally {
        self.state.stop.cancel();
        self.state.tasks.close();
        let _ = tokio::time::timeout(limit, self.state.tasks.wait()).await;
        self.state.log().tally.clone()
    }
}

impl Drop for FakeLine {
    fn drop(&mut self) {
        self.state.stop.cancel();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let stream = tokio::select! {
            biased;
            _ = state.stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        // Linger 0: a connection dropped unanswered ends in a RST, as a reset should.
        let _ = stream.set_zero_linger();
        let _ = stream.set_nodelay(true);
        let conn = state.stop.child_token();
        state.tasks.spawn(serve(stream, state.clone(), conn));
    }
}

async fn serve(stream: TcpStream, state: Arc<State>, conn: CancellationToken) {
    let service = {
        let conn = conn.clone();
        service_fn(move |req| handle(state.clone(), conn.clone(), req))
    };
    let served = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    // Dropping the connection drops the socket: with linger 0, a reset.
    tokio::select! {
        _ = conn.cancelled() => {}
        _ = served => {}
    }
}

type Answer = Result<Response<Full<Bytes>>, std::io::Error>;

async fn handle(state: Arc<State>, conn: CancellationToken, req: Request<Incoming>) -> Answer {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let authorization = header("authorization").unwrap_or_default();
    // The proxy asks which channel a token belongs to: the demo has one bot.
    if parts.method == Method::GET && parts.uri.path() == BOT_INFO {
        if authorization
            .strip_prefix("Bearer ")
            .is_none_or(str::is_empty)
        {
            let text = "Authentication failed. Confirm that the access token in the authorization header is valid.";
            return Ok(message(StatusCode::UNAUTHORIZED, "-", text));
        }
        let body =
            serde_json::json!({"userId": BOT_USER_ID, "basicId": "@demo", "displayName": "demo"});
        return Ok(json_answer(StatusCode::OK, "-", &body));
    }
    if parts.method != Method::POST || parts.uri.path() != PUSH {
        return Ok(message(StatusCode::NOT_FOUND, "-", "Not found"));
    }
    let key = header("x-line-retry-key");
    let (fault, id) = {
        let mut log = state.log();
        log.tally.requests += 1;
        let attempt = log.attempts.entry(body.clone()).or_default();
        let fault = draw(state.seed, &body, *attempt);
        *attempt += 1;
        if let Some(fault) = fault {
            *log.tally.faults.entry(fault).or_default() += 1;
        }
        (fault, request_id(&mut log))
    };
    match fault {
        Some(Fault::Status(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let text = status.canonical_reason().unwrap_or("Error");
            return Ok(message(status, &id, text));
        }
        Some(Fault::Reset) => return reset(&conn).await,
        _ => {}
    }
    if authorization
        .strip_prefix("Bearer ")
        .is_none_or(str::is_empty)
    {
        let text = "Authentication failed. Confirm that the access token in the authorization header is valid.";
        return Ok(message(StatusCode::UNAUTHORIZED, &id, text));
    }
    if key.as_deref().is_some_and(|k| !is_uuid(k)) {
        let text = "The value for the 'X-Line-Retry-Key' header is invalid";
        return Ok(message(StatusCode::BAD_REQUEST, &id, text));
    }
    let (answer, accepted) = accept(&state, authorization, key, &body, &id);
    match fault {
        Some(Fault::AcceptThenReset) if accepted => reset(&conn).await,
        Some(Fault::AcceptThenTimeout) if accepted => {
            tokio::select! {
                _ = conn.cancelled() => {}
                _ = tokio::time::sleep(state.hang) => {}
            }
            reset(&conn).await
        }
        _ => Ok(answer),
    }
}

/// LINE's rule: the first request with a key that is accepted consumes the key; any
/// later one with it is refused with 409. A request without a key is always new.
fn accept(
    state: &State,
    authorization: String,
    key: Option<String>,
    body: &Bytes,
    id: &str,
) -> (Response<Full<Bytes>>, bool) {
    let mut log = state.log();
    let scope = key.map(|key| (authorization, key));
    if let Some(earlier) = scope.as_ref().and_then(|s| log.accepted.get(s)) {
        let body = json!({
            "message": "The retry key is already accepted",
            "sentMessages": earlier.sent_messages,
        });
        let mut res = json_answer(StatusCode::CONFLICT, id, &body);
        if let Ok(value) = HeaderValue::from_str(&earlier.request_id) {
            res.headers_mut()
                .insert("x-line-accepted-request-id", value);
        }
        log.tally.conflicts += 1;
        return (res, false);
    }
    let count = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["messages"].as_array().map(Vec::len))
        .unwrap_or(0);
    let sent_messages: Value = (0..count)
        .map(|_| {
            log.next_id += 1;
            let n = log.next_id;
            json!({"id": (500_000_000_000_000u64 + n).to_string(), "quoteToken": format!("qt-{n}")})
        })
        .collect();
    if let Some(scope) = scope {
        log.accepted.insert(
            scope,
            Accepted {
                request_id: id.to_owned(),
                sent_messages: sent_messages.clone(),
            },
        );
    }
    *log.tally.deliveries.entry(body.clone()).or_default() += 1;
    let answer = json_answer(
        StatusCode::OK,
        id,
        &json!({ "sentMessages": sent_messages }),
    );
    (answer, true)
}

/// Drops the whole connection unanswered (the serving task sees the token).
async fn reset(conn: &CancellationToken) -> Answer {
    conn.cancel();
    Err(std::io::Error::other("the fake LINE reset the connection"))
}

fn request_id(log: &mut Log) -> String {
    log.next_id += 1;
    format!("00000000-0000-4000-8000-{:012x}", log.next_id)
}

fn json_answer(status: StatusCode, id: &str, body: &Value) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    let headers = res.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(value) = HeaderValue::from_str(id) {
        headers.insert("x-line-request-id", value);
    }
    res
}

fn message(status: StatusCode, id: &str, text: &str) -> Response<Full<Bytes>> {
    json_answer(status, id, &json!({ "message": text }))
}

fn is_uuid(key: &str) -> bool {
    let groups: Vec<&str> = key.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_depend_on_seed_body_and_attempt_only() {
        let body = br#"{"to":"U1","messages":[{"type":"text","text":"hi"}]}"#;
        for attempt in 0..20 {
            assert_eq!(draw(7, body, attempt), draw(7, body, attempt));
        }
        let faults = (0..2000u32)
            .filter(|n| draw(7, &n.to_be_bytes(), 0).is_some())
            .count();
        // 25% of requests fail: within a wide margin of 2000 draws.
        assert!((400..600).contains(&faults), "{faults} of 2000");
    }
}
