//! `upstream-proxy`: from a network that lets out only a company egress proxy, every
//! connection the proxy opens (base-URL and intercepted traffic to LINE, allowlisted
//! tunnels) is a CONNECT through that egress proxy, with its credentials, which are
//! never shown. The egress proxy is a small CONNECT proxy the test starts on loopback
//! (tests/support/egress.rs); it counts what passed through it, the mock LINE counts
//! what arrived, and the two must agree.

mod support;

use std::process::Command;
use std::time::Duration;

use base64::Engine;
use http::{Method, StatusCode};
use support::egress::EgressProxy;
use support::mock_line::MockLine;
use support::process::{Process, BIN};
use support::proxy::{push, push_body, send, Proxy};
use support::tunnel::{self, connect, connect_raw};

const PUSH_URL: &str = "https://api.line.me/v2/bot/message/push";
/// The credential the egress proxy requires, decoded; the flag carries it
/// percent-encoded, as a URL must.
const USER: &str = "corp\\bot";
const PASSWORD: &str = "p@ss/w0rd-hunter2";
const USER_ENCODED: &str = "corp%5Cbot";
const PASSWORD_ENCODED: &str = "p%40ss%2Fw0rd-hunter2";

fn upstream_proxy_flag(egress: &EgressProxy) -> String {
    format!(
        "--upstream-proxy={}",
        egress.url_with(USER_ENCODED, PASSWORD_ENCODED)
    )
}

/// Every connection the mock LINE accepted came out of a tunnel of the egress proxy,
/// and every tunnel went to the mock: the proxy never reached LINE by itself.
fn assert_all_through(egress: &EgressProxy, mock: &MockLine) {
    let tunnels = egress.tunnels();
    assert!(!tunnels.is_empty(), "no tunnel through the egress proxy");
    assert!(
        tunnels.iter().all(|t| *t == mock.addr().to_string()),
        "tunnels to elsewhere than the mock LINE {}: {tunnels:?}",
        mock.addr()
    );
    assert_eq!(
        mock.connections(),
        tunnels.len(),
        "connections at the mock LINE vs tunnels through the egress proxy"
    );
    assert_eq!(
        egress.accepted(),
        tunnels.len(),
        "connections at the egress proxy vs tunnels it opened"
    );
}

async fn intercepted_push(proxy: &Proxy, alpn: &[&[u8]], body: &str) -> support::proxy::Reply {
    let stream = connect(proxy.addr, "api.line.me:443").await;
    let tls = tunnel::tls(
        stream,
        "api.line.me",
        tunnel::client_config(&proxy.ca_dir.join("ca.pem"), alpn),
    )
    .await
    .expect("proxy CA is trusted");
    tunnel::request(
        tls,
        tunnel::push_request(PUSH_URL, support::proxy::TOKEN, body),
    )
    .await
}

#[tokio::test]
async fn base_url_traffic_reaches_line_only_through_the_egress_proxy() {
    let mock = MockLine::start().await;
    let egress = EgressProxy::start_with_auth(USER, PASSWORD).await;
    let proxy = Proxy::start(&mock, &[&upstream_proxy_flag(&egress)]).await;
    for n in 0..3 {
        let reply = push(&proxy, &push_body(&format!("through the egress proxy {n}"))).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        assert_eq!(reply.outcome(), "fresh");
    }
    // A passthrough request takes the same way out.
    let other = send(Method::GET, &proxy.url("/echo/other"), &[], "").await;
    assert!(other.status.is_success(), "{:?}", other.status);

    assert_eq!(mock.delivered_count(), 3);
    assert_all_through(&egress, &mock);
    assert_eq!(egress.refused(), 0);
    let offered = egress.offered();
    assert_eq!(offered.len(), egress.tunnels().len());
    assert!(
        offered.iter().all(|o| o == &format!("{USER}:{PASSWORD}")),
        "percent-decoded credentials on every CONNECT: {offered:?}"
    );
}

#[tokio::test]
async fn intercepted_traffic_reaches_line_only_through_the_egress_proxy() {
    let mock = MockLine::start().await;
    let egress = EgressProxy::start_with_auth(USER, PASSWORD).await;
    let proxy = Proxy::start(&mock, &[&upstream_proxy_flag(&egress)]).await;
    let h1 = intercepted_push(&proxy, &[b"http/1.1"], &push_body("intercepted h1")).await;
    let h2 = intercepted_push(&proxy, &[b"h2"], &push_body("intercepted h2")).await;
    for reply in [&h1, &h2] {
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        assert_eq!(reply.outcome(), "fresh");
    }
    assert_eq!(mock.delivered_count(), 2);
    assert!(mock
        .deliveries()
        .iter()
        .all(|d| d.retry_key.as_deref().is_some_and(|k| k.len() == 36)));
    assert_all_through(&egress, &mock);
}

#[tokio::test]
async fn allowlisted_tunnels_go_through_the_egress_proxy() {
    let mock = MockLine::start().await;
    let egress = EgressProxy::start_with_auth(USER, PASSWORD).await;
    let proxy = Proxy::start(
        &mock,
        &["--tunnel-allow=127.0.0.1", &upstream_proxy_flag(&egress)],
    )
    .await;
    let stream = connect(proxy.addr, &mock.addr().to_string()).await;
    // TLS end to end with the target, through both proxies.
    let config = tunnel::client_config(mock.ca_path(), &[b"http/1.1"]);
    let tls = tunnel::tls(stream, "127.0.0.1", config)
        .await
        .expect("the target's own certificate, through both tunnels");
    let reply = tunnel::request(
        tls,
        tunnel::push_request(
            &format!("https://{}/v2/bot/message/push", mock.addr()),
            support::proxy::TOKEN,
            &push_body("tunnelled"),
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(mock.requests()[0].retry_key, None, "a tunnel is untouched");
    assert_eq!(egress.tunnels(), [mock.addr().to_string()]);
    assert_all_through(&egress, &mock);
}

#[tokio::test]
async fn wrong_credentials_are_a_502_and_nothing_reaches_line() {
    let mock = MockLine::start().await;
    let egress = EgressProxy::start_with_auth(USER, "the-right-one").await;
    let proxy = Proxy::start(
        &mock,
        &[
            "--tunnel-allow=127.0.0.1",
            "--max-attempts=3",
            &upstream_proxy_flag(&egress),
            // The send's own attempts through the egress proxy, not a channel lookup's.
            "--key-scope=token",
        ],
    )
    .await;

    let reply = push(&proxy, &push_body("never leaves")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{:?}", reply.body);
    assert_eq!(
        reply.header("x-line-retry-proxy-error"),
        "upstream_unreachable"
    );
    assert_eq!(reply.json()["retryable"], true);
    assert_eq!(
        egress.refused(),
        3,
        "each attempt was a CONNECT refused with 407, retried as a connect failure"
    );

    let (_, status, head) = connect_raw(
        proxy.addr,
        &format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", mock.addr()),
    )
    .await;
    assert_eq!(status, 502, "{head}");
    assert!(head.contains("tunnel_target_unreachable"), "{head}");
    assert_eq!(egress.refused(), 4);

    assert!(egress.tunnels().is_empty());
    assert_eq!(mock.connections(), 0, "nothing reached the mock LINE");
    assert_eq!(mock.delivered_count(), 0);
    // What the bot sees names neither the credentials nor the egress proxy.
    for body in [&reply.body[..], head.as_bytes()] {
        let text = String::from_utf8_lossy(body);
        for hidden in [PASSWORD, PASSWORD_ENCODED, &egress.addr().to_string()] {
            assert!(!text.contains(hidden), "{hidden:?} in {text}");
        }
    }
}

/// An egress proxy that accepts and never answers holds nothing up: each attempt and
/// each tunnel gives up within `attempt-timeout`.
#[tokio::test]
async fn a_silent_egress_proxy_is_bounded_by_the_attempt_timeout() {
    let mock = MockLine::start().await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let (held_tx, mut held) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = silent.accept().await {
            // Kept open, unanswered, until the test ends.
            let _ = held_tx.send(stream);
        }
    });
    let proxy = Proxy::start(
        &mock,
        &[
            "--tunnel-allow=127.0.0.1",
            "--attempt-timeout=300ms",
            "--max-attempts=2",
            &format!("--upstream-proxy=http://{silent_addr}"),
            // The send's own attempts through the egress proxy, not a channel lookup's.
            "--key-scope=token",
        ],
    )
    .await;

    let started = std::time::Instant::now();
    let reply = push(&proxy, &push_body("into the silence")).await;
    assert!(
        matches!(
            reply.status,
            StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT
        ),
        "{:?}",
        reply.status
    );
    let (_, status, head) = connect_raw(
        proxy.addr,
        &format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", mock.addr()),
    )
    .await;
    assert_eq!(status, 502, "{head}");
    assert!(head.contains("tunnel_target_unreachable"), "{head}");
    // Two attempts and one tunnel of 300 ms each, plus a backoff of at most 50 ms.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let mut reached = 0;
    while held.try_recv().is_ok() {
        reached += 1;
    }
    assert_eq!(
        reached, 3,
        "two attempts and one tunnel tried the egress proxy"
    );
    assert_eq!(mock.connections(), 0);
}

#[tokio::test]
async fn env_mode_is_opt_in_and_honours_no_proxy() {
    let mock = MockLine::start().await;
    let egress = EgressProxy::start().await;
    let https_proxy = egress.url();

    // HTTPS_PROXY in the proxy's environment alone changes nothing: the bots beside
    // it use that variable to reach the proxy itself.
    let ignored = Process::start(&mock, &[], &[("HTTPS_PROXY", &https_proxy)]).await;
    let reply = ignored.push(&push_body("direct by default")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(egress.accepted(), 0, "upstream-proxy is off by default");
    let direct = mock.connections();
    assert!(direct >= 1);

    let via_env = Process::start(
        &mock,
        &["--upstream-proxy=env"],
        &[("https_proxy", &https_proxy)],
    )
    .await;
    let reply = via_env.push(&push_body("through HTTPS_PROXY")).await;
    assert_eq!(reply.status, StatusCode::OK);
    let tunnels = egress.tunnels();
    assert!(!tunnels.is_empty(), "env mode used https_proxy");
    assert_eq!(mock.connections() - direct, tunnels.len());

    let bypassed = Process::start(
        &mock,
        &["--upstream-proxy=env"],
        &[
            ("HTTPS_PROXY", &https_proxy),
            ("NO_PROXY", "localhost,127.0.0.1"),
        ],
    )
    .await;
    let reply = bypassed.push(&push_body("NO_PROXY")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(egress.tunnels(), tunnels, "NO_PROXY sent it directly");
    assert_eq!(mock.delivered_count(), 3);
}

#[tokio::test]
async fn credentials_never_reach_the_log() {
    let mock = MockLine::start().await;
    let egress = EgressProxy::start_with_auth(USER, "the-right-one").await;
    let https_proxy = egress.url_with(USER_ENCODED, PASSWORD_ENCODED);
    let mut process = Process::start(
        &mock,
        // Token scope: these tests are about the send's own attempts through the egress
        // proxy, which a channel lookup would otherwise meet first.
        &[
            "--upstream-proxy=env",
            "--max-attempts=2",
            "--key-scope=token",
        ],
        &[
            ("HTTPS_PROXY", &https_proxy),
            // Every debug line, hyper's and rustls' included.
            ("RUST_LOG", "debug"),
        ],
    )
    .await;
    let reply = process
        .push(&push_body("refused by the egress proxy"))
        .await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    let refused = process.wait_for_log("egress proxy refused CONNECT").await;
    assert_eq!(refused["status"], 407, "{refused}");
    assert_eq!(refused["connect_to"], mock.addr().to_string(), "{refused}");
    process.wait_for_log("giving up on the upstream").await;
    assert!(process.terminate().await);

    let log = process.log_so_far().join("\n");
    assert!(
        log.contains(&format!("http://corp\\\\bot:<masked>@{}", egress.addr())),
        "the egress proxy is named, masked:\n{log}"
    );
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    for secret in [PASSWORD, PASSWORD_ENCODED, "hunter2", basic.as_str()] {
        assert!(!log.contains(secret), "{secret:?} in the log:\n{log}");
    }
}

#[test]
fn check_config_masks_the_password() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        support::output_within(
            Command::new(BIN)
                .args(args)
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .envs(env.iter().copied()),
            Duration::from_secs(30),
            "check-config ended",
        )
    };
    let fixed = format!("http://{USER_ENCODED}:{PASSWORD_ENCODED}@127.0.0.1:3128");
    let out = run(&["check-config", &format!("--upstream-proxy={fixed}")], &[]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "upstream-proxy = \"http://{}:<masked>@127.0.0.1:3128\"",
            "corp\\\\bot"
        )),
        "{stdout}"
    );

    let out = run(
        &["check-config"],
        &[
            ("LINE_RETRY_PROXY_UPSTREAM_PROXY", "env"),
            ("HTTPS_PROXY", &fixed),
            ("NO_PROXY", ".internal"),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let env_stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        env_stdout.contains("upstream-proxy = \"env\" # HTTPS_PROXY: http://corp\\bot:<masked>@127.0.0.1:3128; NO_PROXY: .internal"),
        "{env_stdout}"
    );

    // A refused value: one line, exit 64, no password either.
    let out = run(
        &[
            "check-config",
            &format!("--upstream-proxy=https://u:{PASSWORD_ENCODED}@proxy:3128"),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("upstream-proxy"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    for text in [&stdout, &env_stdout, &stderr] {
        for secret in [PASSWORD, PASSWORD_ENCODED, "hunter2"] {
            assert!(!text.contains(secret), "{secret:?} shown:\n{text}");
        }
    }
}
