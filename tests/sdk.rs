//! The official SDKs as real bots run them, against the proxy and a mock LINE:
//! Python's legacy (requests) client and v3 (urllib3) client, in HTTPS_PROXY mode and
//! in base-URL mode; Node's @line/bot-sdk when a Node that honours NODE_USE_ENV_PROXY
//! is installed. Each push must arrive at the mock exactly once, with an injected
//! key, and the same script run again (the bot's resend) must not deliver again.
//!
//! The environments come from `scripts/setup-sdk-env.sh` (run by `scripts/test.sh`).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::mock_line::MockLine;
use support::proxy::Proxy;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    let python = repo().join(".venv/bin/python");
    assert!(
        python.exists(),
        "no .venv: run scripts/setup-sdk-env.sh (scripts/test.sh does)"
    );
    python
}

/// A clean environment: nothing from the developer's shell (their own HTTPS_PROXY,
/// CA bundles) may decide the outcome.
fn command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "HOME",
            std::env::var("HOME").unwrap_or_else(|_| "/tmp".into()),
        )
        .env("LRP_TOKEN", "channel-token-sdk")
        .env("LRP_TO", "U0123456789abcdef0123456789abcdef")
        .env("NO_PROXY", "")
        .env("no_proxy", "");
    cmd
}

#[derive(Debug)]
struct Run {
    json: serde_json::Value,
}

fn run(cmd: Command, what: &str) -> Run {
    let (success, run, stderr) = run_any(cmd, what);
    assert!(success, "{what} failed: {:?}\nstderr: {stderr}", run.json);
    run
}

/// The script's JSON line whether it succeeded or not, and its stderr.
fn run_any(mut cmd: Command, what: &str) -> (bool, Run, String) {
    let out = support::output_within(&mut cmd, std::time::Duration::from_secs(120), what);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let line = stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("{what}: no output; stderr: {stderr}"));
    let json =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {line}"));
    (out.status.success(), Run { json }, stderr)
}

/// Where a bot finds the proxy: its address and the CA it must trust.
#[derive(Clone)]
struct Target {
    url: String,
    ca: PathBuf,
}

impl Target {
    fn of(proxy: &Proxy) -> Target {
        Target {
            url: format!("http://{}", proxy.addr),
            ca: proxy.ca_dir.join("ca.pem"),
        }
    }
}

fn python_push(target: &Target, mode: &str, text: &str) -> Run {
    let mut cmd = command(&python());
    cmd.arg(repo().join("tests/sdk/python_push.py"))
        .arg(mode)
        .env("LRP_TEXT", text);
    match mode {
        "legacy-proxy" => cmd
            .env("HTTPS_PROXY", &target.url)
            .env("REQUESTS_CA_BUNDLE", &target.ca),
        "v3-proxy" => cmd
            .env("LRP_PROXY_URL", &target.url)
            .env("LRP_CA_FILE", &target.ca),
        _ => cmd.env("LRP_BASE_URL", &target.url),
    };
    run(cmd, mode)
}

/// One mode: a push delivered once with a derived key; the same push again (the bot's
/// resend) answered from the store with the same message ids.
async fn push_twice(mode: &'static str, send: fn(&Target, &str, &str) -> Run) {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let target = Target::of(&proxy);
    let text = format!("hello from {mode}");
    let (first, again) = {
        let text = text.clone();
        // Each run is bounded inside; this bounds the pair once more for its message.
        let runs = tokio::task::spawn_blocking(move || {
            (send(&target, mode, &text), send(&target, mode, &text))
        });
        support::within(std::time::Duration::from_secs(300), mode, runs)
            .await
            .unwrap()
    };

    let delivered = mock.deliveries();
    assert_eq!(delivered.len(), 1, "{mode}: exactly one delivery");
    let key = delivered[0].retry_key.clone().expect("an injected key");
    assert_eq!(key.len(), 36, "{key}");
    assert_eq!(
        delivered[0].authorization.as_deref(),
        Some("Bearer channel-token-sdk")
    );
    assert!(String::from_utf8_lossy(&delivered[0].body).contains(&text));
    assert_eq!(first.json["status"], 200, "{:?}", first.json);
    assert_eq!(
        first.json["sent_messages"].as_array().map(Vec::len),
        Some(1),
        "{:?}",
        first.json
    );
    assert_eq!(
        first.json["sent_messages"], again.json["sent_messages"],
        "the resend gets the original answer"
    );
    let replayed = "line_retry_proxy_requests_total{endpoint=\"push\",outcome=\"replayed\"}";
    assert_eq!(
        proxy.metric(replayed).await,
        1.0,
        "{mode}: the second run was a replay"
    );
    if mode.ends_with("-proxy") {
        let handshakes = proxy.metric("line_retry_proxy_tls_handshakes_total").await;
        assert_eq!(
            handshakes, 2.0,
            "{mode}: each run came through CONNECT and the proxy's CA"
        );
    }
}

/// A `requests`-based bot (the legacy SDK's client) through HTTPS_PROXY, its roots from
/// `ca_file` (REQUESTS_CA_BUNDLE replaces them): first the intercepted push, then a
/// push to `tunnelled`, another host behind the same proxy.
fn requests_bot(proxy: &Proxy, ca_file: &Path, tunnelled: &MockLine) -> (Run, (bool, Run, String)) {
    let target = Target {
        url: format!("http://{}", proxy.addr),
        ca: ca_file.to_owned(),
    };
    let intercepted = python_push(&target, "legacy-proxy", "to the intercepted host");
    let mut cmd = command(&python());
    cmd.arg(repo().join("tests/sdk/python_push.py"))
        .arg("tunnel")
        .env("LRP_TEXT", "to the tunnelled host")
        .env("HTTPS_PROXY", &target.url)
        .env("REQUESTS_CA_BUNDLE", ca_file)
        .env(
            "LRP_TUNNEL_URL",
            format!("https://{}/v2/bot/message/push", tunnelled.addr()),
        );
    (intercepted, run_any(cmd, "tunnel"))
}

/// The README's recipe for clients whose CA file replaces their roots: the bundle from
/// `ca --bundle`. With it a bot reaches both the intercepted LINE API and a tunnelled
/// host (api-data.line.me in production); with the proxy's CA alone, the tunnelled
/// host fails verification, which is why the bundle exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_with_the_bundle_reaches_intercepted_and_tunnelled_hosts() {
    let line = MockLine::start().await;
    // A host with a certificate from a "public" CA: the system roots' stand-in.
    let data = MockLine::start().await;
    let proxy = Proxy::start(&line, &["--tunnel-allow=127.0.0.1"]).await;
    let bundle = proxy.ca_dir.join("bundle.pem");
    let mut ca = Command::new(env!("CARGO_BIN_EXE_line-retry-proxy"));
    ca.env_clear().args([
        "ca",
        "--ca-dir",
        proxy.ca_dir.to_str().unwrap(),
        "--bundle",
        "--system-roots",
        data.ca_path().to_str().unwrap(),
    ]);
    let out = support::output_within(&mut ca, std::time::Duration::from_secs(30), "ca --bundle");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&bundle, &out.stdout).unwrap();

    let (proxy_ca_only, with_bundle) = {
        let (proxy_ca, bundle) = (proxy.ca_dir.join("ca.pem"), bundle.clone());
        let (proxy_ref, data_ref) = (&proxy, &data);
        tokio::task::block_in_place(|| {
            (
                requests_bot(proxy_ref, &proxy_ca, data_ref),
                requests_bot(proxy_ref, &bundle, data_ref),
            )
        })
    };

    let (intercepted, (tunnel_ok, tunnel, stderr)) = with_bundle;
    assert_eq!(intercepted.json["status"], 200, "{:?}", intercepted.json);
    assert!(
        tunnel_ok,
        "the tunnelled host with the bundle: {:?} {stderr}",
        tunnel.json
    );
    assert_eq!(tunnel.json["status"], 200, "{:?}", tunnel.json);
    let tunnelled = data.deliveries();
    assert_eq!(
        tunnelled.len(),
        1,
        "only the bundle's run reached the tunnelled host"
    );
    assert_eq!(tunnelled[0].retry_key, None, "a tunnel is not intercepted");

    // The proxy's CA alone: the intercepted host works, the tunnelled one cannot.
    let (intercepted, (tunnel_ok, tunnel, _)) = proxy_ca_only;
    assert_eq!(intercepted.json["status"], 200, "{:?}", intercepted.json);
    assert!(!tunnel_ok, "{:?}", tunnel.json);
    let error = tunnel.json["error"].as_str().unwrap_or_default();
    assert!(error.contains("CERTIFICATE_VERIFY_FAILED"), "{error}");
    // Both runs' intercepted pushes: one text, so the second was the first's replay.
    assert_eq!(line.deliveries().len(), 1);
}

#[tokio::test]
async fn python_legacy_client_through_https_proxy() {
    push_twice("legacy-proxy", python_push).await;
}

#[tokio::test]
async fn python_legacy_client_with_base_url() {
    push_twice("legacy-base-url", python_push).await;
}

#[tokio::test]
async fn python_v3_client_through_its_proxy_setting() {
    push_twice("v3-proxy", python_push).await;
}

#[tokio::test]
async fn python_v3_client_with_base_url() {
    push_twice("v3-base-url", python_push).await;
}

/// A bot that refreshes its token: each run issues a new stateless token with the
/// SDK's own ChannelAccessToken API through the proxy, then pushes with it. The second
/// run (the resend) carries another token of the same channel: LINE's 409 fences it,
/// and the bot gets the original answer. The channel is learned once, at the first
/// issuance; the second token needs no lookup.
async fn stateless_rotation(mode: &'static str) {
    let mock = MockLine::start().await;
    let proxy = Proxy::start(&mock, &[]).await;
    let channel = mock.channel();
    let target = Target::of(&proxy);
    let text = format!("hello from {mode}");
    let run_once = {
        let (target, channel, text) = (target.clone(), channel.clone(), text.clone());
        move || {
            let mut cmd = command(&python());
            cmd.arg(repo().join("tests/sdk/python_push.py"))
                .arg(mode)
                .env("LRP_TEXT", &text)
                .env("LRP_CHANNEL_ID", &channel.id)
                .env("LRP_CHANNEL_SECRET", &channel.secret)
                .env("LRP_BASE_URL", &target.url)
                .env("LRP_PROXY_URL", &target.url)
                .env("LRP_CA_FILE", &target.ca);
            run(cmd, mode)
        }
    };
    let runs = tokio::task::spawn_blocking(move || (run_once(), run_once()));
    let (first, again) = support::within(std::time::Duration::from_secs(300), mode, runs)
        .await
        .unwrap();

    let delivered = mock.deliveries_for(&channel);
    assert_eq!(delivered.len(), 1, "{mode}: exactly one delivery");
    let issued: Vec<_> = mock
        .requests()
        .into_iter()
        .filter(|r| r.path == "/oauth2/v3/token")
        .collect();
    assert_eq!(issued.len(), 2, "{mode}: each run issued its own token");
    assert_eq!(first.json["status"], 200, "{:?}", first.json);
    assert_eq!(first.json["outcome"], "fresh", "{:?}", first.json);
    assert_eq!(again.json["status"], 200, "{:?}", again.json);
    assert_eq!(
        again.json["outcome"], "conflict-resolved",
        "{:?}",
        again.json
    );
    assert_eq!(first.json["sent_messages"], again.json["sent_messages"]);
    assert_eq!(first.json["retry_key"], again.json["retry_key"]);
    assert!(
        mock.lookup_count() <= 1,
        "{mode}: {} lookups for one channel",
        mock.lookup_count()
    );
}

#[tokio::test]
async fn python_v3_stateless_token_issued_through_the_proxy_setting() {
    stateless_rotation("v3-stateless-proxy").await;
}

#[tokio::test]
async fn python_v3_stateless_token_issued_through_the_base_url() {
    stateless_rotation("v3-stateless-base-url").await;
}

/// A Node that honours NODE_USE_ENV_PROXY, installed by setup-sdk-env.sh when npm could.
fn node() -> Result<PathBuf, String> {
    let record = repo().join("tests/sdk/node/.node-path");
    let path = std::fs::read_to_string(&record).map_err(|_| {
        format!(
            "{} is missing (npm could not install Node 22)",
            record.display()
        )
    })?;
    let path = PathBuf::from(path.trim());
    if !path.exists() {
        return Err(format!("{} does not exist", path.display()));
    }
    if !repo()
        .join("tests/sdk/node/node_modules/@line/bot-sdk")
        .exists()
    {
        return Err("@line/bot-sdk is not installed in tests/sdk/node".into());
    }
    Ok(path)
}

fn node_push(target: &Target, mode: &str, text: &str) -> Run {
    let node = node().expect("checked before");
    let mut cmd = command(&node);
    cmd.arg(repo().join("tests/sdk/node/push.mjs"))
        .arg(mode)
        .env("LRP_TEXT", text);
    match mode {
        "node-proxy" => cmd
            .env("HTTPS_PROXY", &target.url)
            .env("NODE_USE_ENV_PROXY", "1")
            .env("NODE_EXTRA_CA_CERTS", &target.ca),
        _ => cmd.env("LRP_BASE_URL", &target.url),
    };
    run(cmd, mode)
}

#[tokio::test]
async fn node_sdk_through_https_proxy() {
    match node() {
        Ok(_) => push_twice("node-proxy", node_push).await,
        Err(why) => println!("node sdk test skipped: {why}"),
    }
}

#[tokio::test]
async fn node_sdk_with_base_url() {
    match node() {
        Ok(_) => push_twice("node-base-url", node_push).await,
        Err(why) => println!("node sdk test skipped: {why}"),
    }
}
