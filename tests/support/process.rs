//! The real binary as a child process on 127.0.0.1:0, pointed at a mock LINE, with its
//! JSON log lines readable as they come: for what only a process shows (two replicas,
//! a process killed outright, what it logs).

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

use super::mock_line::MockLine;
use super::proxy::{temp_dir, Reply, TOKEN};

pub const BIN: &str = env!("CARGO_BIN_EXE_line-retry-proxy");

pub struct Process {
    pub child: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Every log line read so far.
    pub seen: Vec<String>,
    pub listen: String,
    pub admin: String,
}

impl Process {
    /// The proxy in front of `mock` with fast retry timings, plus `extra` flags and `env`.
    pub async fn start(mock: &MockLine, extra: &[&str], env: &[(&str, &str)]) -> Process {
        let ca_dir = temp_dir("ca");
        let mut child = tokio::process::Command::new(BIN)
            .args([
                "--listen=127.0.0.1:0",
                "--admin-listen=127.0.0.1:0",
                "--log-format=json",
                &format!("--upstream={}", mock.url()),
                &format!("--upstream-ca={}", mock.ca_path().display()),
                &format!("--ca-dir={}", ca_dir.display()),
                "--retry-base-delay=10ms",
                "--retry-max-delay=50ms",
                "--shutdown-grace=5s",
            ])
            .args(extra)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the binary runs");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
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
        process.listen = ready["listen"].as_str().expect("listen").to_owned();
        process.admin = ready["admin"].as_str().expect("admin").to_owned();
        process
    }

    /// The next log line containing `text`, within 30 s.
    pub async fn wait_for_log(&mut self, text: &str) -> serde_json::Value {
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let line = self
                    .lines
                    .recv()
                    .await
                    .unwrap_or_else(|| panic!("process ended before logging {text:?}"));
                self.seen.push(line.clone());
                if line.contains(text) {
                    return line;
                }
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no log line {text:?} within 30 s:\n{}",
                self.seen.join("\n")
            )
        });
        serde_json::from_str(&found).expect("json log line")
    }

    /// Every log line logged so far, read without waiting.
    pub fn log_so_far(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        &self.seen
    }

    /// How many log lines so far contain `text`.
    pub fn count_log(&mut self, text: &str) -> usize {
        self.log_so_far()
            .iter()
            .filter(|l| l.contains(text))
            .count()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.listen, path)
    }

    pub async fn push(&self, body: &str) -> Reply {
        super::proxy::send(
            http::Method::POST,
            &self.url("/v2/bot/message/push"),
            &[
                ("authorization", TOKEN),
                ("content-type", "application/json"),
            ],
            body.to_owned(),
        )
        .await
    }

    pub async fn admin_get(&self, path: &str) -> String {
        let (_, _, body) = super::proxy::get(&format!("http://{}{path}", self.admin)).await;
        String::from_utf8_lossy(&body).into_owned()
    }

    /// Kills the process outright, as a crash would: no drain, no settle.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("kill the proxy");
    }

    /// Stops it as an operator would; true if it exited 0.
    pub async fn terminate(&mut self) -> bool {
        let pid = self.child.id().expect("running").to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs");
        assert!(sent.success());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("exited within 30 s")
            .expect("wait");
        status.code() == Some(0)
    }
}
