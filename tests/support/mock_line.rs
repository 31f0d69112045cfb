//! A mock api.line.me on 127.0.0.1:0: TLS with its own test CA (or plain HTTP),
//! HTTP/1.1 and HTTP/2, LINE's documented retry-key semantics, and scriptable faults.
//! It records every request that arrives and every message it *accepts*, because the
//! proxy's whole promise is about the latter: what users would actually receive.
//! A test can hold keyed requests at a gate until it releases them (`hold`), so it
//! knows what is in flight without waiting on a timer.
//!
//! It models LINE's channels (see [`super::channels`]): every bearer token belongs to
//! a channel, retry keys are consumed per channel, and `GET /v2/bot/info` names the
//! channel's bot. A token it never issued is a channel of its own. The requests that
//! ask about a token (`GET /v2/bot/info`, `POST /v2/oauth/verify`,
//! `GET /oauth2/v2.1/verify`) are *lookups*: logged apart from [`MockLine::requests`],
//! with faults and a gate of their own, so a proxy that looks tokens up does not change
//! the request counts tests assert.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::channels::{self, Registry};
pub use super::channels::{Channel, TokenKind};
// Re-exported so tests find the mock's whole API here; not every test binary uses them.
#[allow(unused_imports)]
pub use super::channels::{automatic_bot_user_id, client_assertion};
pub use super::faults::{Chaos, Fault};
use super::pki::TestPki;

/// The endpoints that take `X-Line-Retry-Key` (POST only), and so the only ones faults hit.
pub const KEYED: [&str; 4] = [
    "/v2/bot/message/push",
    "/v2/bot/message/multicast",
    "/v2/bot/message/narrowcast",
    "/v2/bot/message/broadcast",
];

/// The requests that ask LINE about a token rather than act as its bot: logged as
/// [`Lookup`]s, not as requests.
pub const LOOKUPS: [(&str, &str); 3] = [
    ("GET", "/v2/bot/info"),
    ("POST", "/v2/oauth/verify"),
    ("GET", "/oauth2/v2.1/verify"),
];

/// The size of each chunk of a `/stream/{n}` answer.
pub const STREAM_CHUNK: usize = 16 * 1024;

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub retry_key: Option<String>,
    pub version: Version,
    /// When the whole request had arrived.
    pub at: Instant,
}

#[derive(Clone, Debug)]
pub struct Delivery {
    pub path: String,
    pub retry_key: Option<String>,
    pub request_id: String,
    pub body: Bytes,
    pub authorization: Option<String>,
    /// The id of the channel of the token it was accepted under.
    pub channel: String,
    /// What LINE answered for a push it accepted (and repeats in every 409 for its key).
    pub sent_messages: Option<Value>,
    pub at: Instant,
}

/// A request that asked about a token (one of [`LOOKUPS`]), logged when it had arrived.
#[derive(Clone, Debug)]
pub struct Lookup {
    pub method: String,
    /// The path alone: the token asked about is `token`.
    pub path: String,
    /// The bearer token (without `Bearer `) for `GET /v2/bot/info`, the `access_token`
    /// field for the verify endpoints.
    pub token: Option<String>,
    pub at: Instant,
    /// The connection it came on, numbered from 1 in the order they were accepted.
    pub conn: usize,
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
    /// (channel id, key): LINE scopes retry keys per channel.
    accepted: HashMap<(String, String), Accepted>,
    registry: Registry,
    lookup_faults: VecDeque<Fault>,
    lookups: Vec<Lookup>,
    /// Connections the mock cut (a reset fault), and when: what was in flight on one,
    /// a lookup included, never got its answer.
    cuts: Vec<(usize, Instant)>,
    chaos: Option<(Chaos, fastrand::Rng)>,
    /// How often each fault was applied, scripted or drawn.
    applied: BTreeMap<&'static str, usize>,
}

/// Where requests wait while a [`Hold`] on it is in force.
struct Gate {
    /// False while a [`Hold`] is in force.
    open: watch::Sender<bool>,
    /// Requests waiting at the gate now.
    held: watch::Sender<usize>,
}

impl Gate {
    fn new() -> Gate {
        Gate {
            open: watch::Sender::new(true),
            held: watch::Sender::new(0),
        }
    }
}

struct State {
    log: Mutex<Log>,
    arrived: watch::Sender<usize>,
    /// Lookups that have arrived.
    looked_up: watch::Sender<usize>,
    /// Keyed requests wait here.
    keyed_gate: Gate,
    /// Lookups wait here.
    lookup_gate: Gate,
    connections: AtomicUsize,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl State {
    fn log(&self) -> MutexGuard<'_, Log> {
        self.log
            .lock()
            .expect("no test panics while holding the mock's lock")
    }
}

/// Process-wide, so ids stay unique even across several mocks in one test.
fn next_number() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn request_id() -> String {
    format!("00000000-0000-4000-8000-{:012x}", next_number())
}

pub struct MockLine {
    addr: SocketAddr,
    tls: bool,
    pki: TestPki,
    state: Arc<State>,
}

impl Drop for MockLine {
    fn drop(&mut self) {
        self.state.stop.cancel();
    }
}

/// The longest any wait on the mock may take before the test fails saying what did
/// not happen.
pub const WAIT_LIMIT: Duration = Duration::from_secs(10);

/// Keeps one of the mock's gates closed (keyed requests', or lookups'); released by
/// [`Hold::release`] or by dropping it.
pub struct Hold {
    state: Arc<State>,
    lookups: bool,
}

impl Hold {
    pub fn release(self) {}
}

impl Drop for Hold {
    fn drop(&mut self) {
        let gate = if self.lookups {
            &self.state.lookup_gate
        } else {
            &self.state.keyed_gate
        };
        gate.open.send_replace(true);
    }
}

/// Counts a request as held while it waits at a gate, however the wait ends.
struct HeldGuard<'a>(&'a Gate);

impl Drop for HeldGuard<'_> {
    fn drop(&mut self) {
        self.0.held.send_modify(|n| *n -= 1);
    }
}

type Body = BoxBody<Bytes, Infallible>;
/// An `Err` makes hyper abandon the exchange without answering.
type Answer = Result<Response<Body>, std::io::Error>;

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
        let state = Arc::new(State {
            log: Mutex::new(Log::default()),
            arrived: watch::Sender::new(0),
            looked_up: watch::Sender::new(0),
            keyed_gate: Gate::new(),
            lookup_gate: Gate::new(),
            connections: AtomicUsize::new(0),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        let acceptor = tls.then(|| {
            TlsAcceptor::from(pki.server_config(&["127.0.0.1", "localhost", "api.line.me"]))
        });
        state
            .tasks
            .spawn(accept_loop(listener, acceptor, state.clone()));
        MockLine {
            addr,
            tls,
            pki,
            state,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn ca_path(&self) -> &Path {
        &self.pki.ca_path
    }

    pub fn ca_pem(&self) -> &str {
        &self.pki.ca_pem
    }

    pub fn pki(&self) -> &TestPki {
        &self.pki
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

    /// Waits until `n` requests in all have arrived; panics after [`WAIT_LIMIT`].
    pub async fn wait_requests(&self, n: usize) {
        let mut arrived = self.state.arrived.subscribe();
        let waited = tokio::time::timeout(WAIT_LIMIT, arrived.wait_for(|count| *count >= n)).await;
        if waited.is_err() {
            panic!(
                "only {} of {n} requests arrived at the mock within {WAIT_LIMIT:?}",
                *self.state.arrived.borrow()
            );
        }
    }

    /// Closes the gate: from now on keyed requests are recorded (and their fault
    /// chosen) on arrival, then wait until the returned handle is released or dropped.
    pub fn hold(&self) -> Hold {
        self.state.keyed_gate.open.send_replace(false);
        Hold {
            state: self.state.clone(),
            lookups: false,
        }
    }

    /// Keyed requests waiting at the gate now.
    pub fn held(&self) -> usize {
        *self.state.keyed_gate.held.borrow()
    }

    /// Waits until `n` keyed requests wait at the gate; panics after [`WAIT_LIMIT`].
    pub async fn wait_held(&self, n: usize) {
        let mut held = self.state.keyed_gate.held.subscribe();
        let waited = tokio::time::timeout(WAIT_LIMIT, held.wait_for(|count| *count >= n)).await;
        if waited.is_err() {
            panic!(
                "only {} of {n} requests were held at the mock's gate within {WAIT_LIMIT:?}",
                self.held()
            );
        }
    }

    /// A new channel of this mock (ids are unique in the process), with its own bot.
    pub fn channel(&self) -> Channel {
        self.state.log().registry.new_channel()
    }

    /// A token of `kind` for `ch`, as if issued elsewhere (no request is logged): the
    /// raw token, without `Bearer `. A channel of another mock is adopted.
    pub fn issue_token(&self, ch: &Channel, kind: TokenKind) -> String {
        let mut log = self.state.log();
        log.registry.adopt(ch);
        log.registry.issue(&ch.id, kind, Instant::now())
    }

    /// From now on the raw `token` gets 401 from the Messaging API and `/v2/bot/info`,
    /// 400 from the verify endpoints. A token never seen is revoked too.
    pub fn revoke(&self, token: &str) {
        self.state.log().registry.revoke(token);
    }

    /// As if `by` had passed for an issued token: its `expires_in` counts down that
    /// much, and past its lifetime it is expired (treated as revoked).
    pub fn age(&self, token: &str, by: Duration) {
        self.state.log().registry.age(token, by);
    }

    /// The channel of a raw token: the one it was issued for, or (for a token never
    /// issued) its automatic channel, made now if it was never seen.
    pub fn channel_of(&self, token: &str) -> Channel {
        self.state.log().registry.channel_of(token)
    }

    /// Every lookup that arrived (see [`LOOKUPS`]); none of them is in [`Self::requests`].
    pub fn lookups(&self) -> Vec<Lookup> {
        self.state.log().lookups.clone()
    }

    /// The connections a reset fault cut, with when.
    pub fn cuts(&self) -> Vec<(usize, Instant)> {
        self.state.log().cuts.clone()
    }

    pub fn lookup_count(&self) -> usize {
        self.state.log().lookups.len()
    }

    /// Waits until `n` lookups in all have arrived; panics after [`WAIT_LIMIT`].
    pub async fn wait_lookups(&self, n: usize) {
        let mut looked_up = self.state.looked_up.subscribe();
        let waited =
            tokio::time::timeout(WAIT_LIMIT, looked_up.wait_for(|count| *count >= n)).await;
        if waited.is_err() {
            panic!(
                "only {} of {n} lookups arrived at the mock within {WAIT_LIMIT:?}",
                *self.state.looked_up.borrow()
            );
        }
    }

    /// Faults for the next lookups, one each in order, as [`Self::script`] is for keyed
    /// requests. `HoldUntil(n)` counts lookups; the `AcceptThen…` ones answer the
    /// lookup, then do their fault. Chaos never applies to lookups.
    pub fn script_lookups(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state.log().lookup_faults.extend(faults);
    }

    /// Closes the lookups' gate: from now on lookups are logged (and their fault
    /// chosen) on arrival, then wait until the returned handle is released or dropped.
    pub fn hold_lookups(&self) -> Hold {
        self.state.lookup_gate.open.send_replace(false);
        Hold {
            state: self.state.clone(),
            lookups: true,
        }
    }

    /// Lookups waiting at their gate now.
    pub fn lookups_held(&self) -> usize {
        *self.state.lookup_gate.held.borrow()
    }

    /// Waits until `n` lookups wait at their gate; panics after [`WAIT_LIMIT`].
    pub async fn wait_lookups_held(&self, n: usize) {
        let mut held = self.state.lookup_gate.held.subscribe();
        let waited = tokio::time::timeout(WAIT_LIMIT, held.wait_for(|count| *count >= n)).await;
        if waited.is_err() {
            panic!(
                "only {} of {n} lookups were held at the mock's gate within {WAIT_LIMIT:?}",
                self.lookups_held()
            );
        }
    }

    /// The deliveries accepted under any token of `ch`.
    pub fn deliveries_for(&self, ch: &Channel) -> Vec<Delivery> {
        let log = self.state.log();
        log.deliveries
            .iter()
            .filter(|d| d.channel == ch.id)
            .cloned()
            .collect()
    }

    /// Draws a random fault for every keyed request that has nothing scripted.
    pub fn chaos(&self, chaos: Chaos) {
        let rng = fastrand::Rng::with_seed(chaos.seed);
        self.state.log().chaos = Some((chaos, rng));
    }

    /// Back to normal behaviour for requests with nothing scripted.
    pub fn calm(&self) {
        self.state.log().chaos = None;
    }

    /// How often each fault was applied so far, by [`Fault::name`].
    pub fn faults_applied(&self) -> BTreeMap<&'static str, usize> {
        self.state.log().applied.clone()
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::Relaxed)
    }

    /// Stops accepting and kills every connection; when this returns the port is closed
    /// and no connection of this mock is open. The records stay readable.
    pub async fn shutdown(&self) {
        self.state.stop.cancel();
        self.state.tasks.close();
        if tokio::time::timeout(WAIT_LIMIT, self.state.tasks.wait())
            .await
            .is_err()
        {
            panic!("the mock's connections did not all end within {WAIT_LIMIT:?} of its shutdown");
        }
    }
}

async fn accept_loop(listener: TcpListener, acceptor: Option<TlsAcceptor>, state: Arc<State>) {
    loop {
        let stream = tokio::select! {
            biased;
            _ = state.stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let id = state.connections.fetch_add(1, Ordering::Relaxed) + 1;
        // Linger 0 turns every close we do not finish politely into a RST, which is what
        // the Reset fault needs and what a crashed front end looks like.
        let _ = stream.set_zero_linger();
        // Small answers go out at once, as LINE's front ends send them: without this a
        // delayed ACK adds ~40 ms to some exchanges.
        let _ = stream.set_nodelay(true);
        let conn = Conn {
            id,
            token: state.stop.child_token(),
        };
        state
            .tasks
            .spawn(serve(stream, acceptor.clone(), state.clone(), conn));
    }
}

async fn serve(stream: TcpStream, acceptor: Option<TlsAcceptor>, state: Arc<State>, conn: Conn) {
    let service = {
        let conn = conn.clone();
        service_fn(move |req| handle(state.clone(), conn.clone(), req))
    };
    let served = async move {
        let builder = auto::Builder::new(TokioExecutor::new());
        match acceptor {
            Some(acceptor) => {
                if let Ok(tls) = acceptor.accept(stream).await {
                    let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                }
            }
            None => {
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        }
    };
    // Dropping the connection future drops the socket: no goodbye, no close_notify,
    // no GOAWAY, just the RST that linger 0 makes of it.
    tokio::select! {
        _ = conn.token.cancelled() => {}
        _ = served => {}
    }
}

fn json_answer(status: StatusCode, id: &str, body: Value) -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *res.status_mut() = status;
    res.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    set_request_id(&mut res, id);
    res
}

fn set_request_id(res: &mut Response<Body>, id: &str) {
    res.headers_mut().insert(
        "x-line-request-id",
        HeaderValue::from_str(id).expect("ids are ASCII"),
    );
}

fn message(status: StatusCode, id: &str, text: &str) -> Response<Body> {
    json_answer(status, id, json!({ "message": text }))
}

fn scripted_status(code: u16, id: &str) -> Response<Body> {
    let status = StatusCode::from_u16(code).expect("a scripted status is 100..=999");
    message(status, id, status.canonical_reason().unwrap_or("Error"))
}

fn is_uuid(key: &str) -> bool {
    let groups: Vec<&str> = key.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// What a handler needs of a request once it has fully arrived.
struct Arrived {
    method: Method,
    path: String,
    path_and_query: String,
    headers: HeaderMap,
    body: Bytes,
    key: Option<String>,
    authorization: Option<String>,
}

impl Arrived {
    /// The bearer token, without `Bearer `; `None` if there is none or it is empty.
    fn bearer(&self) -> Option<&str> {
        self.authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "))
            .filter(|t| !t.is_empty())
    }

    fn query(&self) -> &str {
        self.path_and_query.split_once('?').map_or("", |(_, q)| q)
    }

    fn is_lookup(&self) -> bool {
        LOOKUPS.contains(&(self.method.as_str(), self.path.as_str()))
    }

    /// The token a lookup asks about.
    fn looked_up_token(&self) -> Option<String> {
        match self.path.as_str() {
            "/v2/bot/info" => self.bearer().map(str::to_owned),
            "/oauth2/v2.1/verify" => channels::form(self.query().as_bytes()).remove("access_token"),
            _ => channels::form(&self.body).remove("access_token"),
        }
    }
}

/// One accepted connection: its number, and what cuts it.
#[derive(Clone)]
struct Conn {
    id: usize,
    token: CancellationToken,
}

async fn handle(state: Arc<State>, conn: Conn, req: Request<Incoming>) -> Answer {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let text = |name: &str| {
        parts
            .headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let req = Arrived {
        path: unescape_unreserved(parts.uri.path()),
        path_and_query: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned()),
        key: text("x-line-retry-key"),
        authorization: text("authorization"),
        method: parts.method,
        headers: parts.headers,
        body,
    };
    let lookup = req.is_lookup();
    if lookup {
        let count = {
            let mut log = state.log();
            log.lookups.push(Lookup {
                method: req.method.to_string(),
                path: req.path.clone(),
                token: req.looked_up_token(),
                at: Instant::now(),
                conn: conn.id,
            });
            log.lookups.len()
        };
        state.looked_up.send_replace(count);
    } else {
        let count = {
            let mut log = state.log();
            log.requests.push(Recorded {
                method: req.method.to_string(),
                path: req.path_and_query.clone(),
                headers: req.headers.clone(),
                body: req.body.clone(),
                retry_key: req.key.clone(),
                version: parts.version,
                at: Instant::now(),
            });
            log.requests.len()
        };
        state.arrived.send_replace(count);
    }

    let id = request_id();
    let keyed = req.method == Method::POST && KEYED.contains(&req.path.as_str());
    let fault = if keyed {
        next_fault(&state)
    } else if lookup {
        state.log().lookup_faults.pop_front()
    } else {
        None
    };
    if keyed {
        pass_gate(&state.keyed_gate, &conn.token).await?;
    } else if lookup {
        pass_gate(&state.lookup_gate, &conn.token).await?;
    }
    match &fault {
        Some(Fault::Status(code)) => return Ok(scripted_status(*code, &id)),
        Some(Fault::RateLimited { retry_after }) => {
            let mut res = message(
                StatusCode::TOO_MANY_REQUESTS,
                &id,
                "The API rate limit has been exceeded. Try again later.",
            );
            if let Some(secs) = retry_after {
                res.headers_mut()
                    .insert("retry-after", HeaderValue::from(*secs));
            }
            return Ok(res);
        }
        Some(Fault::MonthlyLimit) => {
            return Ok(message(
                StatusCode::TOO_MANY_REQUESTS,
                &id,
                "You have reached your monthly limit.",
            ))
        }
        Some(Fault::Hang) => return hang(&conn.token).await,
        Some(Fault::Reset) => return reset(&state, &conn).await,
        Some(Fault::Delay(pause)) => tokio::time::sleep(*pause).await,
        Some(Fault::HoldUntil(n)) => {
            let counted = if lookup {
                &state.looked_up
            } else {
                &state.arrived
            };
            let mut arrived = counted.subscribe();
            tokio::select! {
                _ = arrived.wait_for(|count| *count >= *n) => {}
                _ = conn.token.cancelled() => return Err(std::io::Error::other("mock shut down")),
            }
        }
        Some(Fault::AcceptThenStatus(_) | Fault::AcceptThenHang | Fault::AcceptThenReset)
        | None => {}
    }
    let (answer, delivered) = respond(&req, &id, &state);
    // A lookup delivers nothing: its `AcceptThen…` faults follow any answer.
    let accepted = delivered || lookup;
    match fault {
        Some(Fault::AcceptThenStatus(code)) if accepted => Ok(scripted_status(code, &id)),
        Some(Fault::AcceptThenHang) if accepted => hang(&conn.token).await,
        Some(Fault::AcceptThenReset) if accepted => reset(&state, &conn).await,
        _ => Ok(answer),
    }
}

/// The scripted fault if there is one, else a drawn one in chaos mode; counted.
fn next_fault(state: &State) -> Option<Fault> {
    let mut log = state.log();
    let fault = match log.faults.pop_front() {
        Some(fault) => Some(fault),
        None => match &mut log.chaos {
            Some((chaos, rng)) => chaos.draw(rng),
            None => None,
        },
    };
    if let Some(fault) = &fault {
        *log.applied.entry(fault.name()).or_default() += 1;
    }
    fault
}

/// Waits while a [`Hold`] on `gate` is in force (or until the connection dies).
async fn pass_gate(gate: &Gate, conn: &CancellationToken) -> Result<(), std::io::Error> {
    let mut open = gate.open.subscribe();
    if *open.borrow_and_update() {
        return Ok(());
    }
    gate.held.send_modify(|n| *n += 1);
    let _held = HeldGuard(gate);
    tokio::select! {
        _ = open.wait_for(|open| *open) => Ok(()),
        _ = conn.cancelled() => Err(std::io::Error::other("mock shut down")),
    }
}

/// Pends until the connection dies, which the mock's shutdown also causes.
async fn hang(conn: &CancellationToken) -> Answer {
    conn.cancelled().await;
    Err(std::io::Error::other("mock shut down"))
}

/// Kills the whole connection rather than returning `Err`: over HTTP/2 hyper would turn
/// an `Err` into a polite RST_STREAM on a connection that stays up, which is not a reset.
async fn reset(state: &State, conn: &Conn) -> Answer {
    state.log().cuts.push((conn.id, Instant::now()));
    conn.token.cancel();
    // Over HTTP/2 this future runs in its own task and outlives the connection, so it
    // must not return an error hyper might still try to send.
    state.stop.cancelled().await;
    Err(std::io::Error::other("mock reset the connection"))
}

/// LINE's normal behaviour; the flag says whether this request was accepted for delivery.
fn respond(req: &Arrived, id: &str, state: &State) -> (Response<Body>, bool) {
    if channels::is_token_endpoint(&req.method, &req.path) {
        let (status, body) = channels::token_endpoint(
            &mut state.log().registry,
            &req.method,
            &req.path,
            req.query(),
            &req.body,
            Instant::now(),
        );
        return (json_answer(status, id, body), false);
    }
    let instrument = ["/echo", "/stream/", "/stall/"]
        .iter()
        .any(|p| req.path.starts_with(p));
    let channel = match req.bearer() {
        _ if instrument => None,
        Some(token) => state.log().registry.authenticate(token, Instant::now()),
        None => None,
    };
    if !instrument && channel.is_none() {
        let text = "Authentication failed. Confirm that the access token in the authorization header is valid.";
        return (message(StatusCode::UNAUTHORIZED, id, text), false);
    }
    let keyed = req.method == Method::POST && KEYED.contains(&req.path.as_str());
    if let Some(key) = &req.key {
        if !is_uuid(key) {
            let text = "The value for the 'X-Line-Retry-Key' header is invalid";
            return (message(StatusCode::BAD_REQUEST, id, text), false);
        }
        if !keyed {
            let text = "The retry key is not supported for this endpoint";
            return (message(StatusCode::BAD_REQUEST, id, text), false);
        }
    }
    match channel {
        Some(channel) if keyed => accept(req, id, state, &channel),
        channel => (other_endpoint(req, id, state, channel.as_ref()), false),
    }
}

/// The first accepted request with a key consumes it for the token's channel; later
/// ones from any token of that channel get 409 naming it.
fn accept(req: &Arrived, id: &str, state: &State, channel: &Channel) -> (Response<Body>, bool) {
    let mut log = state.log();
    let scope = req.key.clone().map(|key| (channel.id.clone(), key));
    if let Some(accepted) = scope.as_ref().and_then(|s| log.accepted.get(s)) {
        let mut body = json!({"message": "The retry key is already accepted"});
        if let Some(sent) = &accepted.sent_messages {
            body["sentMessages"] = sent.clone();
        }
        let mut res = json_answer(StatusCode::CONFLICT, id, body);
        res.headers_mut().insert(
            "x-line-accepted-request-id",
            HeaderValue::from_str(&accepted.request_id).expect("ids are ASCII"),
        );
        return (res, false);
    }
    let (status, body, sent_messages): (_, _, Option<Value>) = match req.path.as_str() {
        "/v2/bot/message/push" => {
            let count = serde_json::from_slice::<Value>(&req.body)
                .ok()
                .and_then(|v| v["messages"].as_array().map(Vec::len))
                .unwrap_or(0);
            let sent: Value = (0..count)
                .map(|_| {
                    let n = next_number();
                    json!({"id": (500_000_000_000_000u64 + n).to_string(), "quoteToken": format!("qt-{n}")})
                })
                .collect();
            let body = json!({ "sentMessages": sent });
            (StatusCode::OK, body, Some(sent))
        }
        "/v2/bot/message/narrowcast" => (StatusCode::ACCEPTED, json!({}), None),
        _ => (StatusCode::OK, json!({}), None),
    };
    if let Some(scope) = scope {
        let request_id = id.to_owned();
        let accepted = Accepted {
            request_id,
            sent_messages: sent_messages.clone(),
        };
        log.accepted.insert(scope, accepted);
    }
    deliver(&mut log, req, id, sent_messages, channel);
    (json_answer(status, id, body), true)
}

fn deliver(
    log: &mut Log,
    req: &Arrived,
    id: &str,
    sent_messages: Option<Value>,
    channel: &Channel,
) {
    log.deliveries.push(Delivery {
        path: req.path.clone(),
        retry_key: req.key.clone(),
        request_id: id.to_owned(),
        body: req.body.clone(),
        authorization: req.authorization.clone(),
        channel: channel.id.clone(),
        sent_messages,
        at: Instant::now(),
    });
}

/// `channel` is that of the bearer token, `None` only for the instrument paths.
fn other_endpoint(
    req: &Arrived,
    id: &str,
    state: &State,
    channel: Option<&Channel>,
) -> Response<Body> {
    match (&req.method, req.path.as_str(), channel) {
        (&Method::POST, "/v2/bot/message/reply", Some(channel)) => {
            deliver(&mut state.log(), req, id, None, channel);
            json_answer(StatusCode::OK, id, json!({}))
        }
        (&Method::GET, "/v2/bot/info", Some(channel)) => {
            json_answer(StatusCode::OK, id, channels::bot_info(channel))
        }
        (&Method::GET, "/v2/bot/message/quota", _) => json_answer(
            StatusCode::OK,
            id,
            json!({"type": "limited", "value": 1000}),
        ),
        (&Method::POST, "/v2/bot/message/validate/push", _) => {
            json_answer(StatusCode::OK, id, json!({}))
        }
        (_, path, _) if path.starts_with("/echo") => {
            let mut headers = serde_json::Map::new();
            for (name, value) in &req.headers {
                let value = String::from_utf8_lossy(value.as_bytes());
                let joined = match headers.get(name.as_str()).and_then(Value::as_str) {
                    Some(earlier) => format!("{earlier}, {value}"),
                    None => value.into_owned(),
                };
                headers.insert(name.to_string(), Value::from(joined));
            }
            let body = json!({
                "method": req.method.as_str(),
                "path": req.path_and_query,
                "headers": headers,
                "body_len": req.body.len(),
            });
            json_answer(StatusCode::OK, id, body)
        }
        (&Method::GET, path, _) if path.starts_with("/stall/") => {
            match path["/stall/".len()..].parse::<usize>() {
                Ok(len) => {
                    let mut res = Response::new(Stall(Some(stream_body(len))).boxed());
                    set_request_id(&mut res, id);
                    res
                }
                Err(_) => message(StatusCode::BAD_REQUEST, id, "Bad stall length"),
            }
        }
        (&Method::GET, path, _) if path.starts_with("/stream/") => {
            match path["/stream/".len()..].parse::<usize>() {
                Ok(len) => {
                    let mut res = Response::new(Chunks { sent: 0, len }.boxed());
                    res.headers_mut().insert(
                        "content-type",
                        HeaderValue::from_static("application/octet-stream"),
                    );
                    set_request_id(&mut res, id);
                    res
                }
                Err(_) => message(StatusCode::BAD_REQUEST, id, "Bad stream length"),
            }
        }
        _ => message(StatusCode::NOT_FOUND, id, "Not found"),
    }
}

/// `%XX` escapes of unreserved characters decoded, as a web server normalises a path
/// before routing it (RFC 3986 §6.2.2.2): `/v2/bot/message/%70ush` is push.
fn unescape_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%')
            .then(|| path.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            .filter(|b| b.is_ascii_alphanumeric() || b"-._~".contains(b));
        match decoded {
            Some(b) => {
                out.push(b as char);
                i += 3;
            }
            None => {
                out.push(bytes[i] as char);
                i += 1;
            }
        }
    }
    out
}

/// A body that sends its bytes, then nothing more, ever (the connection dies with the
/// mock): an upstream that stalls in the middle of a body.
struct Stall(Option<Bytes>);

impl hyper::body::Body for Stall {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.0.take() {
            Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
            None => Poll::Pending,
        }
    }
}

/// The byte at `offset` of every `/stream/{n}` answer: a pattern rather than a constant,
/// so a test can tell a reordered or spliced body from the real one.
pub fn stream_byte(offset: usize) -> u8 {
    (offset % 251) as u8
}

/// The whole body `/stream/{len}` answers, for comparisons.
pub fn stream_body(len: usize) -> Bytes {
    (0..len).map(stream_byte).collect()
}

/// A body produced chunk by chunk with no length announced, so it goes out chunked
/// (HTTP/1.1) or as many DATA frames (HTTP/2) and a proxy must truly stream it.
struct Chunks {
    sent: usize,
    len: usize,
}

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let n = STREAM_CHUNK.min(self.len - self.sent);
        if n == 0 {
            return Poll::Ready(None);
        }
        let chunk: Bytes = (self.sent..self.sent + n).map(stream_byte).collect();
        self.sent += n;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent == self.len
    }
}
