//! The binary as an operator runs it: the command-line contract, exit codes,
//! precedence of flag over env over file, the CA subcommand, and a real process
//! serving, logging without secrets, and stopping cleanly on SIGTERM.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::mock_line::MockLine;
use support::proxy::temp_dir;
use support::{output_within, within};

const BIN: &str = env!("CARGO_BIN_EXE_line-retry-proxy");
/// The longest a subcommand, a log line or the process's exit may take.
const LIMIT: Duration = Duration::from_secs(30);

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = output_within(&mut cmd, LIMIT, &format!("line-retry-proxy {args:?}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn setting<'a>(stdout: &'a str, key: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(" = ")))
        .unwrap_or_else(|| panic!("no {key} in:\n{stdout}"))
}

#[test]
fn bad_values_are_one_line_and_exit_64() {
    for args in [
        &["check-config", "--attempt-timeout", "5 parsecs"][..],
        &["check-config", "--max-attempts", "many"],
        &["check-config", "--listen", "localhost"],
        &["check-config", "--dedup-window", "25h"],
        &["check-config", "--store", "memcached"],
        &[
            "check-config",
            "--listen",
            "127.0.0.1:18080",
            "--admin-listen",
            "127.0.0.1:18080",
        ],
        &["--no-such-flag"],
    ] {
        let (code, _, stderr) = run(args, &[]);
        assert_eq!(code, 64, "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
    }
    let (_, _, stderr) = run(&["check-config", "--attempt-timeout", "5 parsecs"], &[]);
    assert!(stderr.contains("attempt-timeout"), "{stderr}");
}

#[test]
fn unknown_file_keys_are_an_error_naming_the_key() {
    let dir = temp_dir("cli");
    let file = dir.join("bad.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:8080\"\nattempt_timout = \"5s\"\n",
    )
    .unwrap();
    let (code, _, stderr) = run(&["check-config", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 64);
    assert!(stderr.contains("attempt_timout"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn the_shipped_config_is_valid_and_states_the_defaults() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/line-retry-proxy.toml");
    let (code, with_file, stderr) = run(&["check-config", "--config", shipped], &[]);
    assert_eq!(code, 0, "{stderr}");
    let (_, defaults, _) = run(&["check-config"], &[]);
    assert_eq!(
        with_file, defaults,
        "the documented values are the defaults"
    );
}

#[test]
fn flag_wins_over_env_wins_over_file() {
    let dir = temp_dir("cli");
    let file = dir.join("p.toml");
    std::fs::write(
        &file,
        "max-attempts = 2\nattempt-timeout = \"3s\"\nretry-base-delay = \"1s\"\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let env = [
        ("LINE_RETRY_PROXY_MAX_ATTEMPTS", "7"),
        ("LINE_RETRY_PROXY_ATTEMPT_TIMEOUT", "4s"),
    ];
    let (code, out, err) = run(
        &["check-config", "--config", f, "--max-attempts", "9"],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(setting(&out, "max-attempts"), "9", "flag over env");
    assert_eq!(setting(&out, "attempt-timeout"), "\"4s\"", "env over file");
    assert_eq!(
        setting(&out, "retry-base-delay"),
        "\"1s\"",
        "file over default"
    );
    let (_, out, _) = run(
        &["check-config", "--config", f],
        &[("LINE_RETRY_PROXY_CONFIG", "/nonexistent")],
    );
    assert_eq!(
        setting(&out, "max-attempts"),
        "2",
        "--config flag over its env"
    );
}

#[test]
fn check_config_masks_secrets() {
    let (code, out, _) = run(
        &["check-config"],
        &[("LINE_RETRY_PROXY_PROXY_AUTH", "bot:hunter2")],
    );
    assert_eq!(code, 0);
    assert!(!out.contains("hunter2"));
    assert_eq!(setting(&out, "proxy-auth"), "\"<masked>\"");
}

#[test]
fn ca_subcommand_creates_then_reuses_the_ca() {
    let dir = temp_dir("ca").join("nested");
    let d = dir.to_str().unwrap();
    let (code, first, err) = run(&["ca", "--ca-dir", d], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(first.starts_with("-----BEGIN CERTIFICATE-----"), "{first}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("ca.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let (_, second, _) = run(&["ca"], &[("LINE_RETRY_PROXY_CA_DIR", d)]);
    assert_eq!(first, second, "the same CA on every call");
}

#[test]
fn ca_renew_replaces_the_ca_and_prints_both_for_the_change_over() {
    let dir = temp_dir("renew").join("ca");
    let d = dir.to_str().unwrap();
    let (code, old, err) = run(&["ca", "--ca-dir", d], &[]);
    assert_eq!(code, 0, "{err}");
    let (code, bundle, err) = run(
        &[
            "ca",
            "--renew",
            "--ca-dir",
            d,
            "--intercept-hosts",
            "api.line.me,api-data.line.me",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("restart the proxy"), "{err}");
    let (_, new, _) = run(&["ca", "--ca-dir", d], &[]);
    assert_ne!(new, old);
    assert_eq!(
        bundle,
        format!("{new}{old}"),
        "the new certificate, then the old"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("ca-previous.pem")).unwrap(),
        old
    );
    let (code, _, err) = run(
        &["ca", "--renew", "--ca-dir", d, "--ca-lifetime", "50years"],
        &[],
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("`ca-lifetime`"), "{err}");
}

/// `proxy-auth`: its scope said in --help; a warning when it is a flag (every user can
/// read it with `ps`), none when it comes from the environment; never the value itself.
#[tokio::test]
async fn proxy_auth_as_a_flag_is_warned_about() {
    let (_, help, _) = run(&["--help"], &[]);
    assert!(
        help.contains("CONNECT and absolute-form requests only"),
        "{help}"
    );
    let warning = "visible to every user";
    let mock = MockLine::start().await;
    let mut flagged = Process::start(&mock, &["--proxy-auth=bot:hunter2"], &[]).await;
    let mut from_env = Process::start(
        &mock,
        &[],
        &[("LINE_RETRY_PROXY_PROXY_AUTH", "bot:hunter2")],
    )
    .await;
    for p in [&flagged, &from_env] {
        p.signal("-TERM");
    }
    assert_eq!(flagged.child.wait().await.unwrap().code(), Some(0));
    assert_eq!(from_env.child.wait().await.unwrap().code(), Some(0));
    let flagged_log = [flagged.seen.clone(), flagged.rest_of_log().await].concat();
    let env_log = [from_env.seen.clone(), from_env.rest_of_log().await].concat();
    assert!(
        flagged_log.iter().any(|l| l.contains(warning)),
        "{flagged_log:?}"
    );
    assert!(!env_log.iter().any(|l| l.contains(warning)), "{env_log:?}");
    assert!(!flagged_log
        .iter()
        .chain(&env_log)
        .any(|l| l.contains("hunter2")));
}

/// The real process: serve, log one JSON line per request without the credential or
/// the message, answer the healthcheck and stats subcommands, and exit 0 on SIGTERM.
#[tokio::test]
async fn serves_logs_safely_and_stops_on_sigterm() {
    let mock = MockLine::start().await;
    let mut proxy = Process::start(&mock, &[], &[("RUST_LOG", "debug")]).await;

    let secret_text = "a message nobody may log";
    let reply = support::proxy::send(
        http::Method::POST,
        &format!("http://{}/v2/bot/message/push", proxy.listen),
        &[("authorization", "Bearer very-secret-token")],
        support::proxy::push_body(secret_text),
    )
    .await;
    assert_eq!(reply.status, http::StatusCode::OK);
    assert_eq!(mock.delivered_count(), 1);

    let admin = proxy.admin.clone();
    let health = output_within(
        Command::new(BIN).args(["healthcheck", "--admin-listen", &admin]),
        LIMIT,
        "healthcheck",
    );
    assert!(health.status.success());
    let stats = output_within(
        Command::new(BIN).args(["stats", "--admin-listen", &admin]),
        LIMIT,
        "stats",
    );
    let table = String::from_utf8_lossy(&stats.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("keys injected") && l.trim_end().ends_with(" 1")),
        "{table}"
    );

    proxy.signal("-TERM");
    assert_eq!(proxy.exit_code().await, Some(0));
    let log = proxy.rest_of_log().await;
    let access = log
        .iter()
        .find(|l| l.contains("\"outcome\":\"fresh\""))
        .unwrap_or_else(|| panic!("an access line:\n{}", log.join("\n")));
    let access: serde_json::Value = serde_json::from_str(access).unwrap();
    assert_eq!(access["endpoint"], "push");
    assert_eq!(access["status"], 200);
    assert_eq!(access["attempts"], 1);
    assert_eq!(access["key"].as_str().unwrap().len(), 36);
    assert!(access["latency_ms"].as_f64().is_some());
    let everything = format!("{}\n{}", proxy.seen.join("\n"), log.join("\n"));
    assert!(
        !everything.contains("very-secret-token"),
        "credential in the log"
    );
    assert!(!everything.contains(secret_text), "message body in the log");
    let after = output_within(
        Command::new(BIN).args(["healthcheck", "--admin-listen", &admin]),
        LIMIT,
        "healthcheck after exit",
    );
    assert!(!after.status.success(), "nothing listens after exit");
}

/// A running process picks up a changed retry policy on SIGHUP, keeps its old one when
/// the new file is bad, and keeps serving throughout.
#[tokio::test]
async fn sighup_reloads_the_retry_policy() {
    let mock = MockLine::start().await;
    let dir = temp_dir("hup");
    let file = dir.join("proxy.toml");
    std::fs::write(
        &file,
        "max-attempts = 1\nretry-base-delay = \"1ms\"\nretry-max-delay = \"2ms\"\n",
    )
    .unwrap();
    let mut proxy = Process::start(&mock, &[&format!("--config={}", file.display())], &[]).await;

    mock.script([support::mock_line::Fault::Status(500)]);
    assert_eq!(
        proxy.push("before reload").await,
        http::StatusCode::INTERNAL_SERVER_ERROR,
        "one attempt only"
    );

    std::fs::write(
        &file,
        "max-attempts = 3\nretry-base-delay = \"1ms\"\nretry-max-delay = \"2ms\"\n",
    )
    .unwrap();
    proxy.signal("-HUP");
    proxy.wait_for_log("configuration reloaded").await;
    mock.script([support::mock_line::Fault::Status(500)]);
    assert_eq!(
        proxy.push("after reload").await,
        http::StatusCode::OK,
        "retried under the new policy"
    );

    std::fs::write(&file, "max-attempts = \"lots\"\n").unwrap();
    proxy.signal("-HUP");
    proxy.wait_for_log("reload failed").await;
    mock.script([support::mock_line::Fault::Status(500)]);
    assert_eq!(
        proxy.push("bad file ignored").await,
        http::StatusCode::OK,
        "the previous policy stays"
    );
    proxy.signal("-TERM");
    assert_eq!(proxy.exit_code().await, Some(0));
}

/// The binary run as a child process, with its JSON log lines readable as they come.
struct Process {
    child: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Every log line read so far.
    seen: Vec<String>,
    listen: String,
    admin: String,
}

impl Process {
    async fn start(mock: &MockLine, extra: &[&str], env: &[(&str, &str)]) -> Process {
        let ca_dir = temp_dir("ca");
        let mut child = tokio::process::Command::new(BIN)
            .args([
                "--listen=127.0.0.1:0",
                "--admin-listen=127.0.0.1:0",
                "--log-format=json",
                &format!("--upstream={}", mock.url()),
                &format!("--upstream-ca={}", mock.ca_path().display()),
                &format!("--ca-dir={}", ca_dir.display()),
            ])
            .args(extra)
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut reader = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let _ = tx.send(line);
            }
        });
        let mut process = Process {
            child,
            lines,
            seen: Vec::new(),
            listen: String::new(),
            admin: String::new(),
        };
        let ready = process.wait_for_log("line-retry-proxy ready").await;
        process.listen = ready["listen"].as_str().unwrap().to_owned();
        process.admin = ready["admin"].as_str().unwrap().to_owned();
        process
    }

    async fn wait_for_log(&mut self, text: &str) -> serde_json::Value {
        let what = format!("the process logged {text:?}");
        let (lines, seen) = (&mut self.lines, &mut self.seen);
        within(LIMIT, &what, async {
            loop {
                let line = lines
                    .recv()
                    .await
                    .unwrap_or_else(|| panic!("process ended before logging {text:?}"));
                seen.push(line.clone());
                if line.contains(text) {
                    return serde_json::from_str(&line).expect("json log line");
                }
            }
        })
        .await
    }

    /// The log lines after those already read, up to the process's end.
    async fn rest_of_log(&mut self) -> Vec<String> {
        let mut rest = Vec::new();
        let lines = &mut self.lines;
        within(LIMIT, "the process closed its log", async {
            while let Some(line) = lines.recv().await {
                rest.push(line);
            }
        })
        .await;
        rest
    }

    /// Waits (bounded) for the process to exit and returns its exit code.
    async fn exit_code(&mut self) -> Option<i32> {
        within(LIMIT, "the process exited", self.child.wait())
            .await
            .expect("wait for the child")
            .code()
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().unwrap().to_string();
        let kill = output_within(Command::new("kill").args([sig, &pid]), LIMIT, "kill");
        assert!(kill.status.success());
    }

    async fn push(&self, text: &str) -> http::StatusCode {
        support::proxy::send(
            http::Method::POST,
            &format!("http://{}/v2/bot/message/push", self.listen),
            &[("authorization", support::proxy::TOKEN)],
            support::proxy::push_body(text),
        )
        .await
        .status
    }
}

/// Host lists are reloadable too: a tunnel refused before SIGHUP is opened after it.
#[tokio::test]
async fn sighup_reloads_the_tunnel_allowlist() {
    let mock = MockLine::start().await;
    let dir = temp_dir("hup");
    let file = dir.join("proxy.toml");
    std::fs::write(&file, "tunnel-allow = []\n").unwrap();
    let mut proxy = Process::start(&mock, &[&format!("--config={}", file.display())], &[]).await;
    let listen: std::net::SocketAddr = proxy.listen.parse().unwrap();
    let connect = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", mock.addr());

    let (_, before, _) = support::tunnel::connect_raw(listen, &connect).await;
    assert_eq!(before, 403);
    std::fs::write(&file, "tunnel-allow = [\"127.0.0.1\"]\n").unwrap();
    proxy.signal("-HUP");
    proxy.wait_for_log("configuration reloaded").await;
    let (_, after, _) = support::tunnel::connect_raw(listen, &connect).await;
    assert_eq!(after, 200);
    proxy.signal("-TERM");
    assert_eq!(proxy.exit_code().await, Some(0));
}

/// `check-config` refuses what `serve` refuses: a missing or unreadable upstream CA, and
/// a CA directory that cannot be used (a file in its place, a world-writable directory).
#[test]
fn check_config_checks_what_serve_checks() {
    let dir = temp_dir("checks");
    let missing = dir.join("no-such-ca.pem");
    let (code, _, err) = run(
        &["check-config", "--upstream-ca", missing.to_str().unwrap()],
        &[("LINE_RETRY_PROXY_CA_DIR", dir.join("ca").to_str().unwrap())],
    );
    assert_eq!(
        code, 64,
        "a missing upstream-ca must fail as serve does: {err}"
    );
    assert!(err.contains("no-such-ca.pem"), "{err}");

    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let (code, _, err) = run(
        &["check-config", "--upstream-ca", garbage.to_str().unwrap()],
        &[("LINE_RETRY_PROXY_CA_DIR", dir.join("ca").to_str().unwrap())],
    );
    assert_eq!(code, 64, "an upstream-ca without a certificate: {err}");

    let file_in_the_way = dir.join("ca-file");
    std::fs::write(&file_in_the_way, "").unwrap();
    let (code, _, err) = run(
        &[
            "check-config",
            "--ca-dir",
            file_in_the_way.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 64, "a CA dir that is a file: {err}");

    use std::os::unix::fs::PermissionsExt;
    let open = dir.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, _, err) = run(&["check-config", "--ca-dir", open.to_str().unwrap()], &[]);
    assert_eq!(code, 64, "a world-writable CA dir: {err}");

    // A CA made for other hosts than the ones to intercept: serve refuses it.
    let narrow = dir.join("narrow");
    let (code, _, err) = run(&["ca", "--ca-dir", narrow.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(
        &[
            "check-config",
            "--ca-dir",
            narrow.to_str().unwrap(),
            "--intercept-hosts",
            "api.line.me,example.com",
        ],
        &[],
    );
    assert_eq!(
        code, 64,
        "a CA that may not sign for an intercepted host: {err}"
    );
    assert!(err.contains("example.com"), "{err}");

    let (code, out, err) = run(&["check-config", "--ca-dir", narrow.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("max-attempts = 4"), "{out}");
}

/// What `check-config` prints is a config file: read back, it gives the same settings;
/// masked secrets are recognised and refused with a message that says so.
#[test]
fn check_config_output_reads_back_and_masked_secrets_are_refused_clearly() {
    let dir = temp_dir("readback");
    let ca_dir = dir.join("ca");
    let env = [("LINE_RETRY_PROXY_CA_DIR", ca_dir.to_str().unwrap())];
    let (code, printed, err) = run(
        &[
            "check-config",
            "--dedup-window",
            "24h",
            "--attempt-timeout",
            "1500ms",
            "--tunnel-allow",
            "api-data.line.me,127.0.0.1:4443",
        ],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(setting(&printed, "attempt-timeout"), "\"1500ms\"");
    assert!(printed.contains("dedup-window = \"24h\""), "{printed}");
    assert!(
        !printed.contains("1day"),
        "durations in the units people write: {printed}"
    );
    let file = dir.join("printed.toml");
    std::fs::write(&file, &printed).unwrap();
    let (code, again, err) = run(&["check-config", "--config", file.to_str().unwrap()], &env);
    assert_eq!(code, 0, "check-config's output must load: {err}");
    assert_eq!(again, printed);

    for (var, value, key) in [
        ("LINE_RETRY_PROXY_PROXY_AUTH", "bot:hunter2", "proxy-auth"),
        (
            "LINE_RETRY_PROXY_STORE",
            "redis://proxy:hunter2@127.0.0.1:6379/0",
            "store",
        ),
    ] {
        let mut with_secret = env.to_vec();
        with_secret.push((var, value));
        let (code, printed, err) = run(&["check-config"], &with_secret);
        assert_eq!(code, 0, "{err}");
        assert!(!printed.contains("hunter2"), "{printed}");
        std::fs::write(&file, &printed).unwrap();
        let (code, _, err) = run(&["check-config", "--config", file.to_str().unwrap()], &env);
        assert_eq!(code, 64, "a masked {key} must not load as a credential");
        assert!(
            err.contains(&format!("`{key}`")) && err.contains("masked"),
            "the error must name {key} and say it is masked: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

/// `ca` reads the same config file as `serve`, so both find the same CA directory.
#[test]
fn ca_takes_the_config_file() {
    let dir = temp_dir("ca-config");
    let ca_dir = dir.join("from-file");
    let file = dir.join("proxy.toml");
    std::fs::write(
        &file,
        format!(
            "ca-dir = {:?}\nintercept-hosts = [\"api.line.me\"]\n",
            ca_dir.to_str().unwrap()
        ),
    )
    .unwrap();
    let (code, printed, err) = run(&["ca", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap(),
        printed,
        "the CA of the file's ca-dir"
    );
    let (code, again, err) = run(
        &["ca"],
        &[("LINE_RETRY_PROXY_CONFIG", file.to_str().unwrap())],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(again, printed, "LINE_RETRY_PROXY_CONFIG as well");
    let (code, _, err) = run(
        &["ca", "--config", dir.join("nope.toml").to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 64, "{err}");
}

/// `ca --bundle`: the system roots and the proxy's CA, PEM only, for the bot's
/// REQUESTS_CA_BUNDLE / SSL_CERT_FILE, which replace a trust store rather than add.
#[test]
fn ca_bundle_adds_the_proxy_ca_to_the_system_roots() {
    let dir = temp_dir("bundle");
    let ca_dir = dir.join("ca");
    // A stand-in for the system bundle: two roots, one of them the proxy's own CA
    // already (it must not appear twice), with the comments such files carry.
    let (code, ca_pem, err) = run(&["ca", "--ca-dir", ca_dir.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    let other = rcgen::generate_simple_self_signed(vec!["root.test".into()])
        .unwrap()
        .cert
        .pem();
    let roots = dir.join("roots.pem");
    std::fs::write(&roots, format!("# a root\n{other}\n# ours\n{ca_pem}")).unwrap();
    let (code, bundle, err) = run(
        &[
            "ca",
            "--ca-dir",
            ca_dir.to_str().unwrap(),
            "--bundle",
            "--system-roots",
            roots.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(bundle.matches("-----BEGIN CERTIFICATE-----").count(), 2);
    assert!(bundle.contains(other.trim()) && bundle.contains(ca_pem.trim()));
    assert!(!bundle.contains('#'), "PEM only: {bundle}");

    // The machine's own roots, found where the distribution keeps them.
    if std::path::Path::new("/etc/ssl/certs/ca-certificates.crt").exists() {
        let (code, bundle, err) = run(
            &["ca", "--ca-dir", ca_dir.to_str().unwrap(), "--bundle"],
            &[],
        );
        assert_eq!(code, 0, "{err}");
        assert!(bundle.matches("-----BEGIN CERTIFICATE-----").count() > 10);
        assert!(bundle.contains(ca_pem.trim()));
    }
    let (code, _, err) = run(
        &[
            "ca",
            "--ca-dir",
            ca_dir.to_str().unwrap(),
            "--bundle",
            "--system-roots",
            dir.join("none.pem").to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("none.pem"), "{err}");
}

/// `--help` says what the code does.
#[test]
fn help_texts_match_the_behaviour() {
    let (code, help, _) = run(&["serve", "--help"], &[]);
    assert_eq!(code, 0);
    assert!(
        !help.contains("kernel backlog"),
        "extra connections are closed: {help}"
    );
    let listen = help
        .lines()
        .skip_while(|l| !l.contains("--listen <"))
        .take(3)
        .collect::<String>();
    assert!(
        listen.contains("IP"),
        "listen takes an IP address: {listen}"
    );
}
