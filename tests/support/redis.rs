//! A real redis-server on a free loopback port, for the tests of the shared store.
//!
//! Each server runs under a small shell that holds it by the hand: when the test
//! process ends however it ends, the shell's stdin closes and it kills its server, so
//! no server outlives its test. Without redis-server on PATH the tests that need one
//! say so and pass, except in CI (`CI` set), where that is a failure.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

use super::proxy::temp_dir;

/// Set to `redis` to run a test suite's proxies on the Redis store.
pub const STORE_ENV: &str = "LINE_RETRY_PROXY_TEST_STORE";

pub struct RedisServer {
    pub port: u16,
    /// Its working directory (append-only file, TLS material).
    pub dir: PathBuf,
    args: Vec<String>,
    /// The redis-server's own pid, to stop or kill it on purpose.
    pid: Option<u32>,
    /// Held open: closing it makes the shell kill the server.
    keeper: Option<(Child, ChildStdin)>,
}

/// Whether redis-server can be run here; outside CI a missing one skips the test.
pub fn available(test: &str) -> bool {
    let found = std::process::Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: redis-server is not installed, and CI must run every test (apt-get install redis-server)"
        );
        eprintln!("{test}: SKIPPED, redis-server is not installed (apt-get install redis-server)");
    }
    found
}

/// A port that was free a moment ago: redis-server cannot be told to pick one itself.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free loopback port")
        .port()
}

impl RedisServer {
    /// A throwaway server: no persistence, loopback only.
    pub async fn start() -> RedisServer {
        RedisServer::start_with(&["--save", "", "--appendonly", "no"]).await
    }

    /// A server that speaks TLS only, with this certificate and key (and CA, which
    /// redis-server insists on even when it asks clients for no certificate).
    pub async fn start_tls(
        cert: &std::path::Path,
        key: &std::path::Path,
        ca: &std::path::Path,
    ) -> RedisServer {
        RedisServer::start_on(
            "--tls-port",
            &[
                "--port",
                "0",
                "--tls-cert-file",
                &cert.display().to_string(),
                "--tls-key-file",
                &key.display().to_string(),
                "--tls-ca-cert-file",
                &ca.display().to_string(),
                "--tls-auth-clients",
                "no",
                "--save",
                "",
            ],
        )
        .await
    }

    /// A server with these extra arguments (e.g. persistence, a password).
    pub async fn start_with(extra: &[&str]) -> RedisServer {
        RedisServer::start_on("--port", extra).await
    }

    /// `port_flag` takes the free port: `--port`, or `--tls-port`.
    async fn start_on(port_flag: &str, extra: &[&str]) -> RedisServer {
        let dir = temp_dir("redis");
        // A port taken between our probe and redis-server's bind: try another.
        for _ in 0..5 {
            let port = free_port();
            let mut args: Vec<String> = [
                port_flag,
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--dir",
                &dir.display().to_string(),
                "--databases",
                "4096",
                "--logfile",
                "",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            args.extend(extra.iter().map(|s| s.to_string()));
            let mut server = RedisServer {
                port,
                dir: dir.clone(),
                args,
                pid: None,
                keeper: None,
            };
            if server.launch().await {
                return server;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// Starts the server process; true once it accepts connections.
    async fn launch(&mut self) -> bool {
        // `$$`-free: the shell prints the server's pid, then waits for its stdin to close.
        let script = r#"redis-server "$@" & pid=$!; echo "pid $pid"; read _; kill -9 $pid 2>/dev/null; wait"#;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh runs");
        let stdin = child.stdin.take().expect("piped stdin");
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let started = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(pid) = line.strip_prefix("pid ") {
                    self.pid = pid.trim().parse().ok();
                }
                if line.contains("Ready to accept connections") {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        // The rest of its log is not needed, but must be read or the server blocks.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.keeper = Some((child, stdin));
        if !started {
            if let Some((child, stdin)) = self.keeper.take() {
                drop(stdin);
                drop(child);
            }
            self.pid = None;
        }
        started
    }

    /// `redis://127.0.0.1:PORT/DB`.
    pub fn url(&self, db: i64) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    /// Stops the server as an operator would (SIGTERM), and waits until it is gone.
    pub async fn stop(&mut self) {
        self.signal("-TERM").await;
    }

    /// Kills the server outright (SIGKILL): nothing is saved, connections just die.
    pub async fn kill(&mut self) {
        self.signal("-KILL").await;
    }

    async fn signal(&mut self, sig: &str) {
        let pid = self.pid.take().expect("the server is running");
        let status = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .await
            .expect("kill runs");
        assert!(status.success(), "kill {sig} {pid}");
        if let Some((mut child, stdin)) = self.keeper.take() {
            drop(stdin);
            tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .expect("redis-server ended within 10 s")
                .expect("wait for the shell");
        }
    }

    /// Starts it again on the same port, with the same directory and arguments.
    pub async fn restart(&mut self) {
        assert!(self.launch().await, "redis-server restarted on its port");
    }

    /// One command over a raw connection, its reply as RESP text (for checks only).
    pub async fn command(&self, args: &[&[u8]]) -> Vec<u8> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("connect to redis-server");
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg);
            request.extend_from_slice(b"\r\n");
        }
        stream.write_all(&request).await.expect("send");
        let mut reply = vec![0u8; 64 * 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut reply))
            .await
            .expect("redis-server replied within 5 s")
            .expect("read");
        reply.truncate(n);
        reply
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Closing the keeper's stdin makes it kill the server; the keeper itself must
        // not be killed first, or the server would be orphaned.
        if let Some((child, stdin)) = self.keeper.take() {
            drop(stdin);
            drop(child);
        }
    }
}

/// The process-wide server the e2e suites use under `LINE_RETRY_PROXY_TEST_STORE=redis`,
/// and a database of its own for each proxy, so tests running at once never share answers.
pub async fn suite_store() -> Option<String> {
    match std::env::var(STORE_ENV).as_deref() {
        Ok("redis") => {}
        Ok("memory") | Ok("") | Err(_) => return None,
        Ok(other) => panic!("{STORE_ENV}={other}: expected redis or memory"),
    }
    static SERVER: tokio::sync::OnceCell<u16> = tokio::sync::OnceCell::const_new();
    static NEXT_DB: AtomicI64 = AtomicI64::new(0);
    let port = *SERVER
        .get_or_init(|| async {
            assert!(
                available("the Redis store suite"),
                "{STORE_ENV}=redis needs redis-server"
            );
            // Started once and held for the life of the test process, on a thread with a
            // runtime of its own: each test's runtime ends with its test.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the suite's redis-server");
                runtime.block_on(async move {
                    let server = RedisServer::start().await;
                    tx.send(server.port)
                        .expect("the suite waits for its server");
                    // Park: the server lives until the process ends.
                    std::future::pending::<()>().await;
                    drop(server);
                });
            });
            tokio::task::spawn_blocking(move || {
                rx.recv().expect("the suite's redis-server started")
            })
            .await
            .expect("join")
        })
        .await;
    let db = NEXT_DB.fetch_add(1, Ordering::Relaxed) % 4096;
    Some(format!("redis://127.0.0.1:{port}/{db}"))
}
