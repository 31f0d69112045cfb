//! A model test of the request path: the real pipeline (channel lookup, fingerprint,
//! key, store, send with retries, settle, respond) driven without sockets against an
//! in-process model of LINE, with random interleavings of bot sends, concurrent
//! resends, token rotation and revocation, proxy restarts and wall-clock jumps.
//!
//! The model of LINE: each channel has several live tokens; `GET /v2/bot/info`
//! answers the channel's bot user ID for any of them (401 once a token is revoked);
//! retry keys are kept per channel for 24 h, whichever token sent them; every channel
//! sends the same bodies, so only the token tells them apart. Sends meet scripted
//! faults (5xx, accept-then-fail, resets, hangs), lookups 5xx, 429, resets and hangs.
//! A bot that stops waiting hangs up: its request is dropped where it is.
//!
//! After every step it checks the promise:
//! - every logical send (a first send and its resends within the dedup window, with
//!   any token of the channel) is delivered at most once;
//! - a bot is never told "success" for a message LINE did not deliver;
//! - the answer a bot gets (fresh, replayed, coalesced or conflict-resolved) is the
//!   one LINE gave for the delivery: the same request id, key and `sentMessages`;
//! - every answer of LINE's a bot gets was obtained with the bot's own token, so a
//!   replayed or coalesced answer is never another token's;
//! - a bot told 503 `channel_unknown` had nothing sent for it, and only after LINE's
//!   bot info failed it;
//! - a token revoked at LINE is told success only by a replay of what it obtained
//!   itself before it was revoked, never by a fresh answer or another token's;
//! - each token is looked up at most once per proxy lifetime once LINE has named its
//!   channel, and never twice at once.
//!
//! Time is tokio's paused clock (attempt timeouts and backoff pass instantly); the
//! wall clock the pipeline and the model read is moved only by the test.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Parser;
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use line_retry_proxy::body::{full, BoxFuture, ProxyBody};
use line_retry_proxy::config::{Config, ServeArgs};
use line_retry_proxy::domain::{AttemptFailure, Endpoint, LINE_KEY_LIFETIME};
use line_retry_proxy::metrics::Metrics;
use line_retry_proxy::pipeline::read::Intake;
use line_retry_proxy::pipeline::Pipeline;
use line_retry_proxy::store::memory::MemoryStore;
use line_retry_proxy::upstream::Upstream;
use proptest::prelude::*;
use serde_json::{json, Value};

const CHANNELS: usize = 2;
/// Live tokens per channel: a bot may send with any of them.
const TOKENS: usize = 3;
const MESSAGES: usize = 4;
const BOT_INFO: &str = "/v2/bot/info";
/// Names the bot request an upstream request was made for. The fingerprint ignores
/// it; the proxy forwards it.
const ASK_HEADER: &str = "x-model-ask";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Status500,
    AcceptThen500,
    Reset,
    AcceptThenReset,
    Hang,
    AcceptThenHang,
}

/// What LINE does to a `GET /v2/bot/info`, instead of answering it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LookupFault {
    Status500,
    Status429,
    Reset,
    Hang,
}

#[derive(Debug, Clone)]
enum Op {
    /// A bot sends message `msg` of `channel` (again, if it did before), the copies at
    /// once; LINE meets the first sends with `faults` and the first bot info lookups
    /// with `lookup_faults`.
    Send {
        channel: usize,
        msg: usize,
        copies: Vec<Sending>,
        faults: Vec<Fault>,
        lookup_faults: Vec<LookupFault>,
    },
    /// LINE revokes a token: its bot info and its sends are answered 401 from now on.
    Revoke { channel: usize, token: usize },
    /// The proxy restarts: a new pipeline with an empty store and channel cache.
    Restart,
    /// The wall clock moves on.
    Jump(Duration),
    /// Every bit of work left behind finishes.
    Settle,
}

/// One copy of a send.
#[derive(Debug, Clone)]
struct Sending {
    /// Which of the channel's tokens it is sent with.
    token: usize,
    /// The bot stops waiting this long after sending (its own timeout), hangs up, and
    /// leaves the work behind.
    gives_up: Option<Duration>,
}

/// A token of the model: its channel and its index among the channel's tokens.
type Token = (usize, usize);

struct Delivery {
    channel: usize,
    msg: usize,
    token: Token,
    key: String,
    at: SystemTime,
    request_id: String,
    sent_messages: Value,
}

struct Accepted {
    at: SystemTime,
    request_id: String,
    sent_messages: Value,
}

/// A keyed request that reached LINE.
struct Arrival {
    /// The bot request it was made for.
    ask: usize,
    token: Option<Token>,
    key: String,
}

/// An answer of LINE's to a keyed request that reached the proxy.
struct Answered {
    seq: u64,
    token: Option<Token>,
    key: String,
    /// The request id the answer names: its own, or for a 409 the accepted one's.
    names: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Looked {
    /// LINE named the token's channel.
    Vouched,
    /// LINE refused the token.
    Rejected,
    /// A fault: no answer, a 5xx or a 429.
    Failed,
}

/// One `GET /v2/bot/info` that reached LINE.
struct Lookup {
    lifetime: usize,
    token: Option<Token>,
    seq: u64,
    looked: Looked,
}

#[derive(Default)]
struct LineState {
    faults: VecDeque<Fault>,
    lookup_faults: VecDeque<LookupFault>,
    /// Revoked tokens, with the step at which they were.
    revoked: HashMap<Token, u64>,
    /// Retry keys accepted, per channel.
    accepted: HashMap<(usize, String), Accepted>,
    deliveries: Vec<Delivery>,
    arrivals: Vec<Arrival>,
    answered: Vec<Answered>,
    lookups: Vec<Lookup>,
    /// Hanging lookups still awaited by the proxy, per lifetime and token.
    open_lookups: HashMap<(usize, Option<Token>), usize>,
    /// Lookups of one token that overlapped: there must be none.
    overlapping_lookups: Vec<String>,
    next_id: u64,
    /// Orders everything that happens: LINE's answers, revocations, bots' requests.
    seq: u64,
}

impl LineState {
    fn tick(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn next_request_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}-{}", self.next_id)
    }

    fn is_live(&self, token: Option<Token>) -> bool {
        token.is_some_and(|t| !self.revoked.contains_key(&t))
    }
}

/// The wall clock both sides read: a fixed start plus what the test added.
#[derive(Clone)]
struct Clock(Arc<AtomicU64>);

impl Clock {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH
            + Duration::from_secs(1_800_000_000)
            + Duration::from_millis(self.0.load(Ordering::SeqCst))
    }

    fn jump(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

struct ModelLine {
    state: Mutex<LineState>,
    clock: Clock,
}

fn token_text((channel, token): Token) -> String {
    format!("tok-c{channel}-t{token}")
}

fn parse_token(text: &str) -> Option<Token> {
    let (c, t) = text.strip_prefix("tok-c")?.split_once("-t")?;
    let token = (c.parse().ok()?, t.parse().ok()?);
    (token.0 < CHANNELS && token.1 < TOKENS).then_some(token)
}

/// The bot user ID of a channel's bot: `U` and 32 hex digits, one per channel.
fn bot_user_id(channel: usize) -> String {
    format!("U{:032x}", 0x4af4_9806_29aa_u128 + channel as u128)
}

/// The message a bot's body carries. Every channel sends the same bodies: only the
/// token tells them apart.
fn parse_bot_body(body: &[u8]) -> usize {
    let v: Value = serde_json::from_slice(body).expect("the bot sends JSON");
    let text = v["messages"][0]["text"].as_str().expect("a text message");
    let msg = text.strip_prefix('m').expect("m{msg}");
    msg.parse().unwrap()
}

fn answer(status: StatusCode, request_id: &str, body: Value) -> Response<ProxyBody> {
    let mut res = Response::new(full(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    res.headers_mut()
        .insert("x-line-request-id", request_id.parse().unwrap());
    res
}

fn unauthorized(request_id: &str) -> Response<ProxyBody> {
    answer(
        StatusCode::UNAUTHORIZED,
        request_id,
        json!({"message": "Authentication failed. Confirm that the access token in the authorization header is valid."}),
    )
}

/// A hanging request the proxy is still awaiting: counted open until it gives up.
struct OpenLookup<'a> {
    line: &'a ModelLine,
    at: (usize, Option<Token>),
}

impl Drop for OpenLookup<'_> {
    fn drop(&mut self) {
        let mut s = self.line.state();
        if let Some(n) = s.open_lookups.get_mut(&self.at) {
            *n -= 1;
        }
    }
}

impl ModelLine {
    fn new() -> Self {
        ModelLine {
            state: Mutex::default(),
            clock: Clock(Arc::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, LineState> {
        self.state.lock().unwrap()
    }

    fn tick(&self) -> u64 {
        self.state().tick()
    }

    fn revoke(&self, token: Token) {
        let mut s = self.state();
        let seq = s.tick();
        s.revoked.entry(token).or_insert(seq);
    }

    /// LINE's semantics for one keyed request that arrived whole: a revoked token is
    /// refused; a key already accepted for the channel within 24 h is a 409.
    fn accept(
        &self,
        path: &str,
        token: Option<Token>,
        key: &str,
        body: &[u8],
    ) -> Response<ProxyBody> {
        let now = self.clock.now();
        let mut s = self.state();
        let request_id = s.next_request_id("req");
        let Some(token) = token.filter(|&t| s.is_live(Some(t))) else {
            return unauthorized(&request_id);
        };
        let (channel, msg) = (token.0, parse_bot_body(body));
        let scope = (token.0, key.to_owned());
        if let Some(a) = s.accepted.get(&scope) {
            if now.duration_since(a.at).unwrap_or_default() < LINE_KEY_LIFETIME {
                let mut body = json!({"message": "The retry key is already accepted"});
                if path.ends_with("/push") {
                    body["sentMessages"] = a.sent_messages.clone();
                }
                let mut res = answer(StatusCode::CONFLICT, &request_id, body);
                res.headers_mut()
                    .insert("x-line-accepted-request-id", a.request_id.parse().unwrap());
                return res;
            }
        }
        let n = s.next_id;
        let sent_messages = json!([{"id": format!("m-{n}"), "quoteToken": format!("q-{n}")}]);
        s.accepted.insert(
            scope,
            Accepted {
                at: now,
                request_id: request_id.clone(),
                sent_messages: sent_messages.clone(),
            },
        );
        s.deliveries.push(Delivery {
            channel,
            msg,
            token,
            key: key.to_owned(),
            at: now,
            request_id: request_id.clone(),
            sent_messages: sent_messages.clone(),
        });
        let (status, body) = match path {
            "/v2/bot/message/push" => (StatusCode::OK, json!({ "sentMessages": sent_messages })),
            "/v2/bot/message/narrowcast" => (StatusCode::ACCEPTED, json!({})),
            _ => (StatusCode::OK, json!({})),
        };
        answer(status, &request_id, body)
    }

    /// Notes LINE's answer to a keyed request as the proxy receives it.
    fn answered(
        &self,
        token: Option<Token>,
        key: &str,
        res: Response<ProxyBody>,
    ) -> Result<Response<ProxyBody>, AttemptFailure> {
        let names = header_of(&res, "x-line-accepted-request-id")
            .or_else(|| header_of(&res, "x-line-request-id"))
            .expect("LINE names every request");
        let mut s = self.state();
        let seq = s.tick();
        s.answered.push(Answered {
            seq,
            token,
            key: key.to_owned(),
            names,
        });
        Ok(res)
    }

    /// `GET /v2/bot/info`: the channel's bot for a live token, 401 for any other.
    async fn bot_info(
        &self,
        lifetime: usize,
        token: Option<Token>,
    ) -> Result<Response<ProxyBody>, AttemptFailure> {
        let (fault, looked, request_id) = {
            let mut s = self.state();
            let fault = s.lookup_faults.pop_front();
            let looked = match fault {
                Some(_) => Looked::Failed,
                None if s.is_live(token) => Looked::Vouched,
                None => Looked::Rejected,
            };
            let seq = s.tick();
            s.lookups.push(Lookup {
                lifetime,
                token,
                seq,
                looked,
            });
            let open = s.open_lookups.entry((lifetime, token)).or_default();
            *open += 1;
            if *open > 1 {
                let what = format!("{token:?} looked up twice at once in lifetime {lifetime}");
                s.overlapping_lookups.push(what);
            }
            (fault, looked, s.next_request_id("info"))
        };
        let _open = OpenLookup {
            line: self,
            at: (lifetime, token),
        };
        match fault {
            Some(LookupFault::Hang) => std::future::pending().await,
            Some(LookupFault::Reset) => Err(AttemptFailure::Reset),
            Some(LookupFault::Status500) => Ok(answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                &request_id,
                json!({"message": "Internal error"}),
            )),
            Some(LookupFault::Status429) => Ok(answer(
                StatusCode::TOO_MANY_REQUESTS,
                &request_id,
                json!({"message": "The API rate limit has been exceeded. Try again later."}),
            )),
            None => Ok(match (looked, token) {
                (Looked::Vouched, Some((channel, _))) => answer(
                    StatusCode::OK,
                    &request_id,
                    json!({
                        "userId": bot_user_id(channel),
                        "basicId": format!("@{channel}model"),
                        "displayName": format!("bot {channel}"),
                        "chatMode": "bot",
                        "markAsReadMode": "manual",
                    }),
                ),
                _ => unauthorized(&request_id),
            }),
        }
    }

    /// LINE as the pipeline of proxy lifetime `lifetime` reaches it.
    async fn request(
        &self,
        lifetime: usize,
        req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, AttemptFailure> {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.expect("a whole body").to_bytes();
        let header = |n: &str| parts.headers.get(n).map(|v| v.to_str().unwrap().to_owned());
        let token =
            header("authorization").and_then(|a| a.strip_prefix("Bearer ").and_then(parse_token));
        let key = header("x-line-retry-key");
        let path = parts.uri.path().to_owned();
        if path == BOT_INFO {
            assert_eq!(parts.method, Method::GET);
            assert!(key.is_none(), "a lookup carries no retry key");
            assert!(body.is_empty(), "a lookup has no body");
            return self.bot_info(lifetime, token).await;
        }
        assert_eq!(parts.method, Method::POST);
        let key = key.expect("every keyed request carries a key");
        let ask = header(ASK_HEADER)
            .expect("the bot's headers are forwarded")
            .parse()
            .unwrap();
        let fault = {
            let mut s = self.state();
            s.arrivals.push(Arrival {
                ask,
                token,
                key: key.clone(),
            });
            s.faults.pop_front()
        };
        let fault_id = self.state().next_request_id("fault");
        let status500 = || {
            answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                &fault_id,
                json!({"message": "Internal error"}),
            )
        };
        match fault {
            Some(Fault::Status500) => self.answered(token, &key, status500()),
            Some(Fault::Reset) => Err(AttemptFailure::Reset),
            Some(Fault::Hang) => std::future::pending().await,
            Some(Fault::AcceptThen500) => {
                self.accept(&path, token, &key, &body);
                self.answered(token, &key, status500())
            }
            Some(Fault::AcceptThenReset) => {
                self.accept(&path, token, &key, &body);
                Err(AttemptFailure::Reset)
            }
            Some(Fault::AcceptThenHang) => {
                self.accept(&path, token, &key, &body);
                std::future::pending().await
            }
            None => {
                let res = self.accept(&path, token, &key, &body);
                self.answered(token, &key, res)
            }
        }
    }
}

/// Where the model's requests go: nowhere, but a request needs a URI.
fn model_uri(path_and_query: Option<&PathAndQuery>) -> Uri {
    let pq = path_and_query.map_or("/", |p| p.as_str());
    format!("http://line.model{pq}").parse().unwrap()
}

/// The model of LINE as one proxy lifetime reaches it, so that what LINE sees can be
/// told apart per lifetime (each has its own channel cache).
struct Lifetime {
    line: Arc<ModelLine>,
    id: usize,
}

impl Upstream for Lifetime {
    fn uri(&self, path_and_query: Option<&PathAndQuery>) -> Uri {
        model_uri(path_and_query)
    }

    fn request(
        &self,
        req: Request<ProxyBody>,
    ) -> BoxFuture<'_, Result<Response<ProxyBody>, AttemptFailure>> {
        Box::pin(self.line.request(self.id, req))
    }
}

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    serve: ServeArgs,
}

fn pipeline(line: &Arc<ModelLine>, lifetime: usize, window: &str, scope: &str) -> Arc<Pipeline> {
    let clock = line.clock.clone();
    let upstream = Lifetime {
        line: line.clone(),
        id: lifetime,
    };
    Arc::new(
        pipeline_on(
            Arc::new(upstream),
            &[
                "--attempt-timeout=1s",
                "--max-attempts=3",
                "--retry-base-delay=10ms",
                "--retry-max-delay=100ms",
                "--request-deadline=10s",
                "--retry-budget-min-per-second=1000",
                &format!("--dedup-window={window}"),
                &format!("--key-scope={scope}"),
            ],
        )
        .with_clock(Arc::new(move || clock.now())),
    )
}

/// The real pipeline on a memory store, sending to `upstream`, configured by `flags`.
fn pipeline_on(upstream: Arc<dyn Upstream>, flags: &[&str]) -> Pipeline {
    let args =
        Args::try_parse_from(std::iter::once("line-retry-proxy").chain(flags.iter().copied()))
            .unwrap();
    let config = Config::load(&args.serve).unwrap();
    let metrics = Arc::new(Metrics::default());
    let key_scope = config.key_scope;
    Pipeline::new(
        Box::new(MemoryStore::new(config.store_max_bytes)),
        upstream,
        metrics.clone(),
        config.policy,
        Intake::new(
            config.body_limit,
            config.body_timeout,
            config.idle_timeout,
            config.buffer_limit,
            metrics,
        ),
        false,
    )
    .with_key_scope(key_scope)
}

/// One bot request: which send, with which token, in which proxy lifetime.
#[derive(Clone, Copy)]
struct Bot {
    ask: usize,
    lifetime: usize,
    token: Token,
    msg: usize,
}

struct Told {
    bot: Bot,
    /// When the bot sent it, in the model's order of events.
    started: u64,
    status: StatusCode,
    request_id: Option<String>,
    key: Option<String>,
    outcome: Option<String>,
    body: Bytes,
}

impl Told {
    fn channel(&self) -> usize {
        self.bot.token.0
    }

    /// The proxy's own error reason, when it answered the bot itself.
    fn reason(&self) -> Option<String> {
        let body: Value = serde_json::from_slice(&self.body).ok()?;
        body["reason"].as_str().map(str::to_owned)
    }
}

fn bot_request(token: Token, msg: usize, ask: usize) -> Request<Full<Bytes>> {
    let endpoint = Endpoint::ALL[msg % Endpoint::ALL.len()];
    let body = json!({"to": "U0f3b", "messages": [{"type": "text", "text": format!("m{msg}")}]});
    Request::builder()
        .method(Method::POST)
        .uri(endpoint.path())
        .header("authorization", format!("Bearer {}", token_text(token)))
        .header("content-type", "application/json")
        .header(ASK_HEADER, ask.to_string())
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn header_of(res: &Response<ProxyBody>, name: &str) -> Option<String> {
    let value = res.headers().get(name)?;
    Some(value.to_str().unwrap().to_owned())
}

async fn ask(p: Arc<Pipeline>, line: Arc<ModelLine>, bot: Bot) -> Told {
    let started = line.tick();
    let res = p.handle(bot_request(bot.token, bot.msg, bot.ask)).await;
    let status = res.status();
    let request_id = header_of(&res, "x-line-request-id");
    let key = header_of(&res, "x-line-retry-key");
    let outcome = header_of(&res, "x-line-retry-proxy");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Told {
        bot,
        started,
        status,
        request_id,
        key,
        outcome,
        body,
    }
}

async fn settle(p: &Pipeline) {
    p.tasks.close();
    // Time is paused: a task that can never finish makes time jump to this limit.
    tokio::time::timeout(Duration::from_secs(3600), p.tasks.wait())
        .await
        .expect("the upstream tasks finished");
    p.tasks.reopen();
}

/// The promise, checked against everything LINE saw and every bot was told.
/// A *logical send* of a message begins with the bot's first send of it and takes in
/// every resend within the dedup window after that, whatever token each uses; the
/// first send a full window later begins the next one (docs/design.md, the request path, phase 5: key).
fn check(
    line: &ModelLine,
    told: &[Told],
    sent: &[(usize, usize, SystemTime)],
    window: Duration,
) -> Result<(), TestCaseError> {
    let s = line.state();
    for c in 0..CHANNELS {
        for m in 0..MESSAGES {
            let mut starts: Vec<SystemTime> = Vec::new();
            for &(_, _, at) in sent.iter().filter(|x| (x.0, x.1) == (c, m)) {
                if starts
                    .last()
                    .is_none_or(|&start| at.duration_since(start).unwrap_or_default() >= window)
                {
                    starts.push(at);
                }
            }
            let mut delivered = vec![0usize; starts.len()];
            for d in s.deliveries.iter().filter(|d| (d.channel, d.msg) == (c, m)) {
                let send = starts.iter().rposition(|&start| start <= d.at);
                prop_assert!(send.is_some(), "c{c}m{m} delivered before the bot sent it");
                delivered[send.unwrap_or_default()] += 1;
            }
            for (start, n) in starts.iter().zip(&delivered) {
                prop_assert!(
                    *n <= 1,
                    "message c{c}m{m} delivered {n} times in the logical send begun at {start:?} ({window:?} window)"
                );
            }
        }
    }
    for t in told {
        let (c, m) = (t.channel(), t.bot.msg);
        let token = t.bot.token;
        let outcome = t.outcome.as_deref().unwrap_or_default();
        // Whatever LINE answered that the bot sees, it answered to the bot's own token,
        // under the key the bot is shown: an answer obtained with another token is
        // never replayed or coalesced to it.
        if let Some(id) = &t.request_id {
            let key = t.key.as_deref().unwrap_or_default();
            let obtained = s
                .answered
                .iter()
                .find(|a| a.names == *id && a.key == key && a.token == Some(token));
            prop_assert!(
                obtained.is_some(),
                "c{c}m{m} with {token:?} told {} ({outcome}) with request id {id}, key {key}: no such answer of LINE's to that token",
                t.status
            );
        }
        // The proxy's own answers to a send (its deadline passed, LINE unreachable)
        // name no request of LINE's: one replayed or coalesced was still made for a
        // request that went out with the bot's own token, under the key it is shown.
        if t.request_id.is_none() && matches!(outcome, "replayed" | "coalesced") {
            let key = t.key.as_deref().unwrap_or_default();
            let own = s
                .arrivals
                .iter()
                .any(|a| a.token == Some(token) && a.key == key && a.ask != t.bot.ask);
            prop_assert!(
                own,
                "c{c}m{m} with {token:?} told {} ({outcome}), key {key}: no request with that token sent under that key",
                t.status
            );
        }
        if t.status.is_success() {
            let delivered: Vec<_> = s
                .deliveries
                .iter()
                .filter(|d| (d.channel, d.msg) == (c, m))
                .collect();
            prop_assert!(
                !delivered.is_empty(),
                "c{c}m{m} reported {} ({outcome}) but never delivered",
                t.status
            );
            let id = t.request_id.as_deref().unwrap_or_default();
            let matching = delivered.iter().find(|d| d.request_id == id);
            prop_assert!(
                matching.is_some(),
                "c{c}m{m} ({outcome}): request id {id} names no delivery"
            );
            let delivery = matching.unwrap();
            prop_assert_eq!(
                t.key.as_deref(),
                Some(delivery.key.as_str()),
                "c{}m{} with {:?} ({}): not the key of the delivery (with {:?}) its request id names",
                c,
                m,
                token,
                outcome,
                delivery.token
            );
            if t.bot.msg % Endpoint::ALL.len() == 0 {
                let body: Value = serde_json::from_slice(&t.body).unwrap();
                prop_assert_eq!(
                    &body["sentMessages"],
                    &delivery.sent_messages,
                    "c{}m{} ({}): the answer is not the delivered one",
                    c,
                    m,
                    outcome
                );
            }
            // A token LINE revoked before the bot sent may be told success only by a
            // replay of what it obtained itself while it was live.
            if let Some(&revoked) = s.revoked.get(&token) {
                if revoked < t.started {
                    prop_assert!(
                        matches!(outcome, "replayed" | "coalesced"),
                        "c{c}m{m}: revoked {token:?} told {} ({outcome})",
                        t.status
                    );
                    let own = s.answered.iter().any(|a| {
                        a.token == Some(token)
                            && Some(&a.names) == t.request_id.as_ref()
                            && a.seq < revoked
                    });
                    prop_assert!(
                        own,
                        "c{c}m{m}: revoked {token:?} told {} ({outcome}) by an answer it did not obtain while live",
                        t.status
                    );
                }
            }
        }
        if t.status == StatusCode::SERVICE_UNAVAILABLE
            && t.reason().as_deref() == Some("channel_unknown")
        {
            prop_assert_eq!(outcome, "error");
            prop_assert!(
                !s.arrivals.iter().any(|a| a.ask == t.bot.ask),
                "c{c}m{m} with {token:?}: told channel_unknown, yet sent to LINE"
            );
            prop_assert!(
                s.lookups.iter().any(|l| l.lifetime == t.bot.lifetime
                    && l.token == Some(token)
                    && l.looked == Looked::Failed),
                "c{c}m{m} with {token:?}: told channel_unknown, yet its lookup never failed"
            );
        }
    }
    // Once LINE named a token's channel, the proxy does not ask again in that lifetime.
    let mut vouched: HashMap<(usize, Option<Token>), u64> = HashMap::new();
    for l in &s.lookups {
        let at = (l.lifetime, l.token);
        if let Some(seq) = vouched.get(&at) {
            prop_assert!(
                false,
                "{:?} looked up again (step {}) after LINE named its channel (step {seq}) in lifetime {}",
                l.token,
                l.seq,
                l.lifetime
            );
        }
        if l.looked == Looked::Vouched {
            vouched.insert(at, l.seq);
        }
    }
    prop_assert!(
        s.overlapping_lookups.is_empty(),
        "{:?}",
        s.overlapping_lookups
    );
    Ok(())
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        Just(Fault::Status500),
        Just(Fault::AcceptThen500),
        Just(Fault::Reset),
        Just(Fault::AcceptThenReset),
        Just(Fault::Hang),
        Just(Fault::AcceptThenHang),
    ]
}

fn lookup_faults() -> impl Strategy<Value = Vec<LookupFault>> {
    let one = prop_oneof![
        Just(LookupFault::Status500),
        Just(LookupFault::Status429),
        Just(LookupFault::Reset),
        Just(LookupFault::Hang),
    ];
    prop_oneof![
        3 => Just(Vec::new()),
        1 => prop::collection::vec(one, 1..=4),
    ]
}

fn op(window: Duration, restarts: bool) -> impl Strategy<Value = Op> {
    let jumps = prop_oneof![
        Just(Duration::from_secs(1)),
        Just(window / 2),
        Just(window.saturating_sub(Duration::from_secs(1))),
        Just(window + Duration::from_secs(1)),
    ];
    // Around the first attempt's timeout and the retries after it.
    let gives_up = prop_oneof![
        2 => Just(None),
        1 => Just(Some(Duration::from_millis(1500))),
        1 => prop_oneof![Just(500), Just(2500)].prop_map(|ms| Some(Duration::from_millis(ms))),
    ];
    let sending = (0..TOKENS, gives_up).prop_map(|(token, gives_up)| Sending { token, gives_up });
    let send = (
        0..CHANNELS,
        0..MESSAGES,
        prop::collection::vec(sending, 1..=3),
        prop::collection::vec(fault(), 0..4),
        lookup_faults(),
    )
        .prop_map(|(channel, msg, copies, faults, lookup_faults)| Op::Send {
            channel,
            msg,
            copies,
            faults,
            lookup_faults,
        });
    let revoke =
        (0..CHANNELS, 0..TOKENS).prop_map(|(channel, token)| Op::Revoke { channel, token });
    let restart = if restarts { 1 } else { 0 };
    prop_oneof![
        8 => send,
        1 => revoke,
        restart => Just(Op::Restart),
        2 => jumps.prop_map(Op::Jump),
        2 => Just(Op::Settle),
    ]
}

/// What a run came to, for the scripted cases.
struct Played {
    /// Per bot request answered: its token, status and outcome.
    told: Vec<(usize, u16, String)>,
    deliveries: usize,
    /// Bot info lookups that reached LINE.
    lookups: usize,
}

fn run(ops: Vec<Op>, window_text: &str, window: Duration) -> Result<(), TestCaseError> {
    play(ops, window_text, window, "channel").map(drop)
}

/// Runs `ops` against a pipeline whose fingerprints are scoped to `scope`.
fn play(
    ops: Vec<Op>,
    window_text: &str,
    window: Duration,
    scope: &str,
) -> Result<Played, TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let line = Arc::new(ModelLine::new());
        let mut lifetime = 0;
        let mut p = pipeline(&line, lifetime, window_text, scope);
        let mut told = Vec::new();
        let mut sent = Vec::new();
        let mut asks = 0;
        for op in ops {
            match op {
                Op::Send {
                    channel,
                    msg,
                    copies,
                    faults,
                    lookup_faults,
                } => {
                    {
                        let mut s = line.state();
                        s.faults = faults.into();
                        s.lookup_faults = lookup_faults.into();
                    }
                    sent.push((channel, msg, line.clock.now()));
                    let sent_at = tokio::time::Instant::now();
                    let copies: Vec<_> = copies
                        .into_iter()
                        .map(|copy| {
                            asks += 1;
                            let bot = Bot {
                                ask: asks,
                                lifetime,
                                token: (channel, copy.token),
                                msg,
                            };
                            let asked = tokio::spawn(ask(p.clone(), line.clone(), bot));
                            (asked, copy.gives_up)
                        })
                        .collect();
                    for (mut asked, gives_up) in copies {
                        let patience = gives_up.unwrap_or(Duration::from_secs(3600));
                        match tokio::time::timeout_at(sent_at + patience, &mut asked).await {
                            Ok(t) => told.push(t.unwrap()),
                            Err(_) => {
                                prop_assert!(gives_up.is_some(), "the proxy answered the bot");
                                // It hangs up: the request is dropped where it is.
                                asked.abort();
                                let _ = asked.await;
                            }
                        }
                    }
                }
                Op::Revoke { channel, token } => line.revoke((channel, token)),
                Op::Restart => {
                    settle(&p).await;
                    lifetime += 1;
                    p = pipeline(&line, lifetime, window_text, scope);
                }
                Op::Jump(by) => {
                    settle(&p).await;
                    line.clock.jump(by);
                }
                Op::Settle => settle(&p).await,
            }
            check(&line, &told, &sent, window)?;
        }
        settle(&p).await;
        prop_assert_eq!(p.store.stats().claims, 0, "no claim outlives its send");
        check(&line, &told, &sent, window)?;
        let s = line.state();
        Ok(Played {
            told: told
                .iter()
                .map(|t| {
                    let outcome = t.outcome.clone().unwrap_or_default();
                    (t.bot.token.1, t.status.as_u16(), outcome)
                })
                .collect(),
            deliveries: s.deliveries.len(),
            lookups: s.lookups.len(),
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The default 24 h window, with restarts: LINE's 409 stands in for the lost store.
    #[test]
    fn at_most_once_under_the_24h_window(ops in prop::collection::vec(op(LINE_KEY_LIFETIME, true), 1..24)) {
        run(ops, "24h", LINE_KEY_LIFETIME)?;
    }

    /// A short window, across its boundaries. No restarts: the memory store's first
    /// sightings do not survive one (the README says so; Redis keeps them).
    #[test]
    fn at_most_once_under_a_short_window(ops in prop::collection::vec(op(Duration::from_secs(10), false), 1..24)) {
        run(ops, "10s", Duration::from_secs(10))?;
    }
}

/// An upstream that names channel 0's bot for any token, and whose first send panics
/// (a defect on the way out), then answers.
struct PanicsOnce(Mutex<bool>);

impl Upstream for PanicsOnce {
    fn uri(&self, path_and_query: Option<&PathAndQuery>) -> Uri {
        model_uri(path_and_query)
    }

    fn request(
        &self,
        req: Request<ProxyBody>,
    ) -> BoxFuture<'_, Result<Response<ProxyBody>, AttemptFailure>> {
        Box::pin(async move {
            if req.uri().path() == BOT_INFO {
                let body = json!({ "userId": bot_user_id(0) }).to_string();
                return Ok(Response::new(full(body)));
            }
            let first = std::mem::replace(&mut *self.0.lock().unwrap(), false);
            assert!(!first, "a defect on the way out");
            Ok(Response::new(full(r#"{"sentMessages":[]}"#)))
        })
    }
}

/// The upstream work runs in the bot's own task: a panic in it is answered with a 500
/// and releases its claim, as a task of its own would, and the resend goes through.
#[tokio::test]
async fn a_panic_on_the_way_out_is_answered_and_releases_the_claim() {
    let p = Arc::new(pipeline_on(Arc::new(PanicsOnce(Mutex::new(true))), &[]));
    let first = p.handle(bot_request((0, 0), 0, 1)).await;
    assert_eq!(first.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(p.store.stats().claims, 0, "the claim went with the panic");
    let resend = p.handle(bot_request((0, 0), 0, 2)).await;
    assert_eq!(resend.status(), StatusCode::OK);
    assert_eq!(resend.headers()["x-line-retry-proxy"], "fresh");
}

/// A send of message 0 (a push) of channel 0 by each of `tokens` at once, waited for.
fn push(tokens: &[usize], faults: &[Fault], lookup_faults: &[LookupFault]) -> Op {
    push_on(0, tokens, faults, lookup_faults)
}

fn push_on(
    channel: usize,
    tokens: &[usize],
    faults: &[Fault],
    lookup_faults: &[LookupFault],
) -> Op {
    Op::Send {
        channel,
        msg: 0,
        copies: tokens
            .iter()
            .map(|&token| Sending {
                token,
                gives_up: None,
            })
            .collect(),
        faults: faults.to_vec(),
        lookup_faults: lookup_faults.to_vec(),
    }
}

fn scripted(ops: Vec<Op>) -> Played {
    play(ops, "24h", LINE_KEY_LIFETIME, "channel").unwrap()
}

fn told(played: &Played) -> Vec<(usize, u16, &str)> {
    let told = played.told.iter();
    told.map(|(t, status, o)| (*t, *status, o.as_str()))
        .collect()
}

/// A resend with another token of the channel is fenced by LINE's 409 and answered
/// the original success; a kept answer is replayed only to the token that obtained
/// it, also after a restart. One lookup per token per proxy lifetime.
#[test]
fn a_resend_under_a_rotated_token_is_the_original_success() {
    let played = scripted(vec![
        push(&[0], &[], &[]),
        push(&[1], &[], &[]),
        push(&[0], &[], &[]),
        push(&[1], &[], &[]),
        Op::Restart,
        push(&[2], &[], &[]),
        push(&[2, 0], &[], &[]),
    ]);
    assert_eq!(
        told(&played),
        [
            (0, 200, "fresh"),
            (1, 200, "conflict-resolved"),
            (0, 200, "replayed"),
            (1, 200, "conflict-resolved"),
            (2, 200, "conflict-resolved"),
            (2, 200, "replayed"),
            (0, 200, "conflict-resolved"),
        ]
    );
    assert_eq!(played.deliveries, 1);
    assert_eq!(played.lookups, 2 + 2);
}

/// Copies in flight at once: the same token's waits for the owner's answer, another
/// token's is sent again under the same key once the owner has its answer.
#[test]
fn a_waiter_with_another_token_asks_line_itself() {
    let played = scripted(vec![push(&[0, 0, 1], &[Fault::AcceptThenHang], &[])]);
    // Which copy of token 0 owns the send and which waits is the scheduler's choice.
    let mut answers = told(&played);
    answers.sort();
    assert_eq!(
        answers,
        [
            (0, 200, "coalesced"),
            (0, 200, "conflict-resolved"),
            (1, 200, "conflict-resolved"),
        ]
    );
    assert_eq!(played.deliveries, 1);
    assert_eq!(
        played.lookups, 2,
        "the second copy of token 0 waited for its lookup"
    );
}

/// LINE's bot info failing every attempt: 503 `channel_unknown`, nothing sent; the
/// resend looks the token up again and goes through.
#[test]
fn a_send_whose_channel_cannot_be_learned_is_not_sent() {
    use LookupFault::*;
    let played = scripted(vec![
        push(&[0], &[], &[Status500, Status429, Reset]),
        push(&[0], &[], &[Hang, Hang, Hang]),
        push(&[0], &[], &[Hang, Status500]),
    ]);
    assert_eq!(
        told(&played),
        [(0, 503, "error"), (0, 503, "error"), (0, 200, "fresh")]
    );
    assert_eq!(played.deliveries, 1);
    assert_eq!(played.lookups, 3 + 3 + 3);
}

/// A revoked token's resend of a delivered send: under another token's kept answer it
/// is sent to LINE and gets LINE's 401, delivering nothing; the token that obtained
/// the answer is still replayed it after its revocation (the proxy does not ask LINE
/// again for an answer it keeps for that very token).
#[test]
fn a_revoked_token_gets_lines_401_unless_it_obtained_the_answer() {
    let played = scripted(vec![
        push(&[0], &[], &[]),
        Op::Revoke {
            channel: 0,
            token: 1,
        },
        push(&[1], &[], &[]),
        push(&[2], &[], &[]),
        Op::Revoke {
            channel: 0,
            token: 0,
        },
        push(&[0], &[], &[]),
        push(&[1, 2], &[], &[]),
        Op::Restart,
        push(&[0], &[], &[]),
    ]);
    assert_eq!(
        told(&played),
        [
            (0, 200, "fresh"),
            (1, 401, "fresh"),
            (2, 200, "conflict-resolved"),
            (0, 200, "replayed"),
            (1, 401, "fresh"),
            (2, 200, "conflict-resolved"),
            (0, 401, "fresh"),
        ]
    );
    assert_eq!(played.deliveries, 1);
}

/// Two channels sending the same body are two sends: each delivered, each answered
/// its own, whichever of their tokens resend.
#[test]
fn identical_sends_of_two_channels_are_two_sends() {
    let played = scripted(vec![
        push_on(0, &[0], &[], &[]),
        push_on(1, &[0], &[], &[]),
        push_on(1, &[1, 0], &[], &[]),
        push_on(0, &[2], &[], &[]),
    ]);
    assert_eq!(
        told(&played),
        [
            (0, 200, "fresh"),
            (0, 200, "fresh"),
            (1, 200, "conflict-resolved"),
            (0, 200, "replayed"),
            (2, 200, "conflict-resolved"),
        ]
    );
    assert_eq!(played.deliveries, 2);
}

/// The model's teeth: with keys scoped to the token, as before channels were known, a
/// resend under a rotated token is a new key at LINE, and the model finds the second
/// delivery.
#[test]
fn token_scoped_keys_deliver_a_rotated_resend_twice() {
    let ops = vec![push(&[0], &[], &[]), push(&[1], &[], &[])];
    let found = play(ops, "24h", LINE_KEY_LIFETIME, "token").err();
    let found = found.expect("the model finds the duplicate").to_string();
    assert!(found.contains("delivered 2 times"), "{found}");
}
