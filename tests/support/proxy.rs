//! Starts the real proxy in-process on 127.0.0.1:0, pointed at a mock LINE, and a
//! small HTTP client to talk to it as a bot in base-URL mode would.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use line_retry_proxy::app::{self, App};
use line_retry_proxy::config::{Config, ServeArgs};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::mock_line::MockLine;
use super::{eventually, within};

/// The longest a test waits for the proxy's answer: above the test proxy's request
/// deadline (20 s), so a slow answer is still told from none.
pub const ANSWER_LIMIT: Duration = Duration::from_secs(30);
/// The longest a test waits for the proxy to finish shutting down.
pub const STOP_LIMIT: Duration = Duration::from_secs(20);

/// Later flags override earlier ones, so a test can override the defaults below.
#[derive(Parser)]
#[command(args_override_self = true)]
struct Args {
    #[command(flatten)]
    serve: ServeArgs,
}

pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub app: Arc<App>,
    pub ca_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<bool>>,
}

static NEXT_DIR: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub fn temp_dir(tag: &str) -> PathBuf {
    let n = NEXT_DIR.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!("lrp-{tag}-{}-{n}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

impl Proxy {
    /// The proxy in front of `mock`, with fast retry timings unless `extra` overrides them.
    pub async fn start(mock: &MockLine, extra: &[&str]) -> Proxy {
        let ca_dir = temp_dir("ca");
        let mut argv: Vec<String> = vec![
            "line-retry-proxy".into(),
            "--listen=127.0.0.1:0".into(),
            "--admin-listen=127.0.0.1:0".into(),
            format!("--upstream={}", mock.url()),
            format!("--upstream-ca={}", mock.ca_path().display()),
            format!("--ca-dir={}", ca_dir.display()),
            "--attempt-timeout=2s".into(),
            "--retry-base-delay=10ms".into(),
            "--retry-max-delay=50ms".into(),
            "--request-deadline=20s".into(),
            "--shutdown-grace=10s".into(),
        ];
        // LINE_RETRY_PROXY_TEST_STORE=redis: the same suite on the shared store.
        if let Some(store) = super::redis::suite_store().await {
            argv.push(format!("--store={store}"));
        }
        argv.extend(extra.iter().map(|s| s.to_string()));
        let args = Args::try_parse_from(&argv).expect("test arguments parse");
        let config = Config::load(&args.serve).expect("test config is valid");
        Proxy::start_with(config, ca_dir).await
    }

    pub async fn start_with(config: Config, ca_dir: PathBuf) -> Proxy {
        let app = App::new(config).expect("app starts");
        let (listener, admin) = app::bind(&app.config).await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app::run(app.clone(), listener, admin, async move {
            let _ = stopped.await;
        }));
        Proxy {
            addr,
            admin: admin_addr,
            app,
            ca_dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Begins shutdown; the returned handle resolves to whether everything drained.
    pub fn begin_stop(&mut self) -> JoinHandle<bool> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().expect("stopped once")
    }

    /// Shuts down and waits (bounded) for the drain; returns whether everything drained.
    pub async fn stop(mut self) -> bool {
        let task = self.begin_stop();
        within(STOP_LIMIT, "the proxy stopped", task)
            .await
            .expect("the proxy task did not panic")
    }

    /// Polls one metric until `ok` holds for its value, bounded; returns the value.
    pub async fn wait_metric(&self, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let what = format!("metric {series} reached the expected value");
        eventually(Duration::from_secs(10), &what, || async {
            let value = self.metric(series).await;
            ok(value).then_some(value)
        })
        .await
    }

    pub async fn metrics(&self) -> String {
        let (status, _, body) = get(&format!("http://{}/metrics", self.admin)).await;
        assert_eq!(status, StatusCode::OK);
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// The value of one metric line, e.g. `line_retry_proxy_requests_total{endpoint="push",outcome="fresh"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .unwrap_or_else(|| panic!("no series {series} in metrics"))
            .parse()
            .unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or_else(|| panic!("no {name} header"))
    }

    pub fn outcome(&self) -> &str {
        self.header("x-line-retry-proxy")
    }

    pub fn outcome_or_none(&self) -> Option<&str> {
        self.headers
            .get("x-line-retry-proxy")
            .map(|v| v.to_str().unwrap())
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    let mut http = HttpConnector::new();
    // As bots' HTTP clients do; without it a delayed ACK can add ~40 ms to an exchange.
    http.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(http)
}

/// One request on a fresh connection; panics if the proxy does not answer in full
/// within [`ANSWER_LIMIT`].
pub async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let what = format!("the proxy answered {method} {url}");
    within(
        ANSWER_LIMIT,
        &what,
        try_send(method.clone(), url, headers, body),
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// One request on a fresh connection, unbounded: the caller bounds it (a bot with
/// its own timeout) and decides what a failure means.
pub async fn try_send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Reply, String> {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(body.into()))
        .map_err(|e| e.to_string())?;
    let res = client().request(req).await.map_err(|e| format!("{e:?}"))?;
    let (parts, body) = res.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

pub const TOKEN: &str = "Bearer channel-token-a";

/// A push as a bot sends it.
pub async fn push(proxy: &Proxy, body: &str) -> Reply {
    post(proxy, "/v2/bot/message/push", TOKEN, body).await
}

pub async fn post(proxy: &Proxy, path: &str, token: &str, body: &str) -> Reply {
    send(
        Method::POST,
        &proxy.url(path),
        &[
            ("authorization", token),
            ("content-type", "application/json"),
        ],
        body.to_owned(),
    )
    .await
}

pub async fn get(url: &str) -> (StatusCode, HeaderMap, Bytes) {
    let r = send(Method::GET, url, &[], Bytes::new()).await;
    (r.status, r.headers, r.body)
}

pub fn push_body(text: &str) -> String {
    serde_json::json!({"to": "U4af4980629", "messages": [{"type": "text", "text": text}]})
        .to_string()
}
