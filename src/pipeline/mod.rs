//! The request path for traffic bound for LINE, one phase per module, in order:
//!
//! ```text
//!  request ─► classify ─┬─ passthrough ─► forward (streamed, untouched) ─────────────┐
//!                       └─ keyed ─► read ─► fingerprint ─► key ─► claim ─┬─ done ─────┤ replayed
//!                                                                       ├─ in flight ┤ coalesced
//!                                                                       └─ owner     │
//!                                    (own task) send ⟲ retries ─► settle ─► store ───┤ fresh /
//!                                                                                     │ conflict-resolved
//!                                                                         respond ◄───┘
//! ```
//! Phase 5 (claim) lives in [`crate::store`]; the others are the modules below.

pub mod classify;
pub mod fingerprint;
pub mod forward;
pub mod key;
pub mod read;
pub mod respond;
pub mod send;
pub mod settle;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::app::{App, Live};
use crate::config::EndpointPolicy;
use crate::error::ProxyError;
use crate::store::{Answer, Claim, Ticket};
use classify::{Endpoint, Route};
use key::RetryKey;
use respond::{Outcome, RETRY_KEY_HEADER};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A claim lapses this long after the owner's deadline, should the owner vanish.
const LEASE_MARGIN: Duration = Duration::from_secs(5);
/// Owners that vanish repeatedly are not waited for forever: send without the store.
const MAX_CLAIMS: usize = 3;

/// What happened to one request: the answer, and what the access log and metrics say.
struct Exchange {
    response: Response<ProxyBody>,
    endpoint: Option<Endpoint>,
    outcome: Outcome,
    key: Option<RetryKey>,
    attempts: u32,
    upstream_status: Option<StatusCode>,
}

impl Exchange {
    fn answered(endpoint: Endpoint, answer: &Answer, outcome: Outcome) -> Self {
        Exchange {
            response: respond::answer_response(answer, outcome),
            endpoint: Some(endpoint),
            outcome,
            key: Some(answer.key.clone()),
            attempts: if matches!(outcome, Outcome::Replayed | Outcome::Coalesced) {
                0
            } else {
                answer.attempts
            },
            upstream_status: answer.upstream_status,
        }
    }

    fn failed(endpoint: Option<Endpoint>, err: &ProxyError) -> Self {
        Exchange {
            response: respond::error_response(err),
            endpoint,
            outcome: Outcome::Error,
            key: None,
            attempts: 0,
            upstream_status: None,
        }
    }
}

/// Handles one request bound for LINE: base-URL mode, or decrypted from a CONNECT tunnel.
pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<ProxyBody> {
    let started = Instant::now();
    let _in_flight = app.metrics.in_flight();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();

    let exchange = match classify::classify(&method, &path) {
        Route::Keyed(endpoint) => keyed(&app, endpoint, req).await,
        Route::Passthrough => match forward::to_line(&app, req).await {
            Ok(response) => Exchange {
                upstream_status: Some(response.status()),
                response,
                endpoint: None,
                outcome: Outcome::Passthrough,
                key: None,
                attempts: 1,
            },
            Err(err) => Exchange::failed(None, &err),
        },
    };

    app.metrics.request(exchange.endpoint, exchange.outcome);
    tracing::info!(
        target: "line_retry_proxy::access",
        %method,
        path,
        endpoint = exchange.endpoint.map_or("other", Endpoint::name),
        key = exchange.key.as_ref().map(tracing::field::display),
        outcome = exchange.outcome.label(),
        attempts = exchange.attempts,
        status = exchange.response.status().as_u16(),
        upstream_status = exchange.upstream_status.map(|s| s.as_u16()),
        latency_ms = started.elapsed().as_micros() as f64 / 1000.0,
    );
    exchange.response
}

async fn keyed(app: &Arc<App>, endpoint: Endpoint, req: Request<Incoming>) -> Exchange {
    let (parts, body) = req.into_parts();
    let body = match read::body(body, &parts.headers, app.config.body_limit).await {
        Ok(body) => body,
        Err(err) => return Exchange::failed(Some(endpoint), &err),
    };
    let live = app.live();
    let policy = live.policy.endpoint(endpoint);
    let client_key = client_key(&parts.headers);
    let path_and_query = parts.uri.path_and_query();

    let scope = fingerprint::caller_scope(&parts.headers);
    let fp = fingerprint::fingerprint(
        &fingerprint::Request {
            scope: &scope,
            method: &parts.method,
            path_and_query: path_and_query.map_or("/", |p| p.as_str()),
            client_key: client_key.as_ref().map(HeaderValue::as_bytes),
            body: &body,
        },
        app.config.canonical_json,
    );
    let key = match client_key {
        Some(value) => RetryKey::Client(value),
        None => key::derive(&fp, policy.dedup_window, SystemTime::now()),
    };

    let mut headers = parts.headers;
    forward::strip_hop_by_hop(&mut headers);
    headers.remove(HOST);
    headers.insert(RETRY_KEY_HEADER, key.header_value());
    headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    let out = send::Outbound {
        method: parts.method,
        uri: app.upstream.uri(path_and_query),
        headers,
        body,
    };

    let lease = live.policy.retry.deadline + LEASE_MARGIN;
    for _ in 0..MAX_CLAIMS {
        match app.store.claim(fp, lease).await {
            Ok(Claim::Done(answer)) => {
                return Exchange::answered(endpoint, &answer, Outcome::Replayed)
            }
            Ok(Claim::InFlight(waiting)) => match tokio::time::timeout(lease, waiting).await {
                Ok(Some(answer)) => {
                    return Exchange::answered(endpoint, &answer, Outcome::Coalesced)
                }
                // The owner vanished or outlived its lease: claim again.
                _ => continue,
            },
            Ok(Claim::Owner(ticket)) => {
                return own(app, live, endpoint, policy, key, out, Some(ticket)).await
            }
            Err(err) => {
                app.metrics.store_error();
                tracing::warn!(error = %err, "sending without the store; the retry key still prevents duplicates at LINE");
                break;
            }
        }
    }
    own(app, live, endpoint, policy, key, out, None).await
}

/// Phases 6–7 in a task of their own: a bot that disconnects does not cancel the
/// upstream work, so its resend finds the result.
async fn own(
    app: &Arc<App>,
    live: Arc<Live>,
    endpoint: Endpoint,
    policy: EndpointPolicy,
    key: RetryKey,
    out: send::Outbound,
    ticket: Option<Box<dyn Ticket>>,
) -> Exchange {
    if key.is_derived() {
        app.metrics.key_injected(endpoint);
    } else {
        app.metrics.client_key(endpoint);
    }
    let (tx, rx) = oneshot::channel();
    let task_app = app.clone();
    app.tasks.spawn(async move {
        let app = task_app;
        let sender = send::Sender {
            upstream: &app.upstream,
            policy: &live.policy.retry,
            retry: policy.retry,
            budget: &live.budget,
            metrics: &app.metrics,
            endpoint,
        };
        let sent = sender.send(&out).await;
        let settled = settle::settle(endpoint, key, sent);
        if let Some(ticket) = ticket {
            let keep_for = settled.keep.then_some(policy.dedup_window);
            if let Err(err) = ticket.settle(settled.answer.clone(), keep_for).await {
                app.metrics.store_error();
                tracing::warn!(error = %err, "could not store the answer");
            }
        }
        // The bot may be gone; its resend will find the stored answer.
        let _ = tx.send(settled.answer);
    });
    match rx.await {
        Ok(answer) => Exchange::answered(endpoint, &answer, answer.outcome),
        Err(_) => Exchange::failed(
            Some(endpoint),
            &ProxyError::Internal("the upstream task ended without an answer"),
        ),
    }
}

/// The bot's own key, if it sent a non-empty one. An empty header (Go v8 given "")
/// counts as absent.
fn client_key(headers: &HeaderMap) -> Option<HeaderValue> {
    headers
        .get(RETRY_KEY_HEADER)
        .filter(|v| !v.as_bytes().iter().all(u8::is_ascii_whitespace))
        .cloned()
}
