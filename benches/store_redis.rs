//! Redis memory per stored answer, for provisioning: fills a fresh redis-server with N
//! accepted push answers (a typical one-message body) through the Redis store, and
//! prints `MEMORY USAGE` per answer key and the growth of `used_memory` per answer
//! (which also counts the key tables and the expiry index), per entry and per million.
//! Starts its own redis-server on a free loopback port (redis-server must be on PATH).
//! Run: cargo bench --bench store_redis [-- N]

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use line_retry_proxy::domain::{Answer, Fingerprint, Outcome, RetryKey, TokenTag};
use line_retry_proxy::store::redis::{RedisOptions, RedisStore};
use line_retry_proxy::store::{Claim, ClaimRequest, Store};

/// Sends at once, as many bots' requests would.
const CONCURRENCY: u64 = 64;

fn answer(i: u64) -> Arc<Answer> {
    let body = format!(
        "{{\"sentMessages\":[{{\"id\":\"{:018}\",\"quoteToken\":\"q{:08}IStG5h1Tz7b\"}}]}}",
        461_230_966_842_064_897 + i,
        i % 1_0000_0000
    );
    Arc::new(Answer {
        status: StatusCode::OK,
        headers: Box::new([
            (
                HeaderName::from_static("content-type"),
                HeaderValue::from_static("application/json"),
            ),
            (
                HeaderName::from_static("x-line-request-id"),
                HeaderValue::from_bytes(format!("{:08x}-1111-4222-8333-{:012x}", i, i).as_bytes())
                    .expect("ascii"),
            ),
        ]),
        body: Bytes::copy_from_slice(body.as_bytes()),
        key: RetryKey::Derived(uuid::Uuid::from_u128(u128::from(i))),
        outcome: Outcome::Fresh,
        attempts: 1,
        upstream_status: Some(StatusCode::OK),
        owner: Some(TokenTag([1; 16])),
    })
}

fn fingerprint(i: u64) -> [u8; 32] {
    let mut fp = [0u8; 32];
    fp[..8].copy_from_slice(&i.to_le_bytes());
    fp[8..16].copy_from_slice(&(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes());
    fp
}

/// redis-server on a port that was free a moment ago; killed when dropped.
struct Server {
    port: u16,
    child: Child,
}

impl Server {
    fn start() -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--logfile", ""])
            .stdout(Stdio::piped())
            .spawn()
            .expect("redis-server on PATH");
        let out = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(out).lines();
        loop {
            let line = lines
                .next()
                .expect("redis-server started")
                .expect("its log");
            if line.contains("Ready to accept connections") {
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Server { port, child }
    }

    fn command(&self, args: &[&[u8]]) -> String {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg);
            request.extend_from_slice(b"\r\n");
        }
        stream.write_all(&request).expect("send");
        let mut reply = vec![0u8; 64 * 1024];
        let n = stream.read(&mut reply).expect("reply");
        String::from_utf8_lossy(&reply[..n]).into_owned()
    }

    fn used_memory(&self) -> u64 {
        self.command(&[b"INFO", b"memory"])
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("used_memory")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::main]
async fn main() {
    let n: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200_000);
    let server = Server::start();
    let store = Arc::new(
        RedisStore::new(RedisOptions {
            tls: false,
            host: "127.0.0.1".into(),
            port: server.port,
            db: 0,
            username: None,
            password: None,
            ca: None,
            timeout: Duration::from_secs(5),
        })
        .expect("store"),
    );
    store.ready().await;
    let body_len = answer(0).body.len() as u64;
    let before = server.used_memory();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..CONCURRENCY {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while i < n {
                let claim = ClaimRequest {
                    fp: Fingerprint(fingerprint(i)),
                    lease: Duration::from_secs(60),
                    window: Duration::from_secs(24 * 3600),
                    now: SystemTime::now(),
                };
                match store.claim(claim).await {
                    Ok(Claim::Owner { ticket, .. }) => {
                        ticket.publish(answer(i), true).await.expect("settled");
                    }
                    Ok(_) => panic!("every fingerprint is new"),
                    Err(err) => panic!("store failed: {err}"),
                }
                i += CONCURRENCY;
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let elapsed = started.elapsed();
    let grown = server.used_memory().saturating_sub(before);
    let step = (n / 1000).max(1);
    let (mut usage, mut sampled) = (0u64, 0u64);
    for i in (0..n).step_by(step as usize) {
        let mut key = b"lrp:a:".to_vec();
        key.extend_from_slice(&fingerprint(i));
        let reply = server.command(&[b"MEMORY", b"USAGE", &key, b"SAMPLES", b"0"]);
        usage += reply
            .trim()
            .strip_prefix(':')
            .and_then(|v| v.parse::<u64>().ok())
            .expect("MEMORY USAGE");
        sampled += 1;
    }
    let keys = server.command(&[b"DBSIZE"]);
    println!(
        "answers stored        {n} (DBSIZE {})",
        keys.trim().trim_start_matches(':')
    );
    println!(
        "claim+settle rate     {:.0}/s ({CONCURRENCY} at once)",
        n as f64 / elapsed.as_secs_f64()
    );
    println!("body bytes/answer     {body_len}");
    println!("MEMORY USAGE/answer   {}", usage / sampled.max(1));
    println!("used_memory/answer    {}", grown / n.max(1));
    println!(
        "per million answers   {} MiB (used_memory growth)",
        grown * 1_000_000 / n.max(1) / (1 << 20)
    );
}
