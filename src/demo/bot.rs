//! The demo's bot: a legacy LINE bot as many are written. It sends each push with a
//! short timeout and, on a 5xx, a timeout or a broken connection, sends the very same
//! request again, a few times, with no retry key. It does not know that a failure
//! may mean the message was delivered.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// How the bot behaves.
#[derive(Debug, Clone)]
pub(crate) struct Behaviour {
    /// Tries per message, the first included.
    pub(crate) tries: u32,
    /// How long one try may take before the bot gives up on it.
    pub(crate) timeout: Duration,
    /// Before a resend the bot waits a random time up to this (seeded).
    pub(crate) max_pause: Duration,
    /// Messages sent at once (each worker sends one message at a time).
    pub(crate) workers: usize,
    pub(crate) seed: u64,
}

/// What the bot experienced.
#[derive(Debug, Default, Clone)]
pub(crate) struct BotReport {
    /// Requests it sent, resends included.
    pub(crate) attempts: usize,
    /// Messages for which it finally got a 2xx.
    pub(crate) succeeded: usize,
    /// Messages it gave up on (by index): still failing after its last try, or
    /// refused (4xx).
    pub(crate) gave_up: Vec<usize>,
    /// Tries that failed: 5xx answers, timeouts, broken connections.
    pub(crate) errors_5xx: usize,
    pub(crate) timeouts: usize,
    pub(crate) broken: usize,
}

/// Sends every body as a push to `base` (`http://HOST:PORT`) and resends on errors.
pub(crate) async fn run(
    base: &str,
    token: &str,
    bodies: Arc<Vec<String>>,
    how: Behaviour,
) -> BotReport {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(http);
    let next = Arc::new(AtomicUsize::new(0));
    let report = Arc::new(Mutex::new(BotReport::default()));
    let url = format!("{base}{}", super::fake_line::PUSH);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..how.workers.max(1) {
        let (client, next, report, bodies, how) = (
            client.clone(),
            next.clone(),
            report.clone(),
            bodies.clone(),
            how.clone(),
        );
        let (url, token) = (url.clone(), token.to_owned());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { return };
                let told = send_one(&client, &url, &token, body, i, &how).await;
                let mut report = crate::sync::lock(&report);
                report.attempts += told.attempts;
                report.errors_5xx += told.errors_5xx;
                report.timeouts += told.timeouts;
                report.broken += told.broken;
                if told.succeeded {
                    report.succeeded += 1;
                } else {
                    report.gave_up.push(i);
                }
            }
        });
    }
    while workers.join_next().await.is_some() {}
    let report = crate::sync::lock(&report);
    report.clone()
}

#[derive(Default)]
struct Told {
    attempts: usize,
    succeeded: bool,
    errors_5xx: usize,
    timeouts: usize,
    broken: usize,
}

async fn send_one(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    token: &str,
    body: &str,
    index: usize,
    how: &Behaviour,
) -> Told {
    let mut rng = fastrand::Rng::with_seed(how.seed ^ (index as u64).wrapping_mul(0x2545_f491));
    let mut told = Told::default();
    for try_number in 0..how.tries {
        if try_number > 0 {
            let max = how.max_pause.as_millis() as u64;
            tokio::time::sleep(Duration::from_millis(rng.u64(0..=max))).await;
        }
        told.attempts += 1;
        let request = Request::post(url)
            .header(http::header::AUTHORIZATION, token)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_owned())));
        let Ok(request) = request else {
            return told;
        };
        let exchange = async {
            let res = client.request(request).await.map_err(|_| ())?;
            let status = res.status();
            // The whole answer, as a bot reads it; a body cut off is a broken connection.
            res.into_body().collect().await.map_err(|_| ())?;
            Ok::<StatusCode, ()>(status)
        };
        match tokio::time::timeout(how.timeout, exchange).await {
            Ok(Ok(status)) if status.is_success() => {
                told.succeeded = true;
                return told;
            }
            Ok(Ok(status)) if status.is_server_error() => told.errors_5xx += 1,
            // A 4xx will not change by resending: this bot gives up on it.
            Ok(Ok(_)) => return told,
            Ok(Err(())) => told.broken += 1,
            Err(_) => told.timeouts += 1,
        }
    }
    told
}
