//! Loopback load client for `bench/run.sh`, for the mode wrk cannot drive: a bot behind
//! `HTTPS_PROXY`. Each connection sends `CONNECT api.line.me:443` once, does one TLS
//! handshake with the proxy's intercept leaf, then sends keep-alive HTTP/1.1 POSTs on it
//! for the rest of the run (a pooling SDK). Without `--connect` it sends the same POSTs
//! over plain HTTP, so base-URL mode can be measured with the same client as a control.
//!
//! Closed loop like wrk: every connection has one request outstanding. Prints one JSON
//! line: requests, errors, non-2xx, seconds, req/s, p50/p99 latency in microseconds.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const USAGE: &str = "usage: connect-load --target ADDR [--connect HOST:PORT --ca PEM] \
[--path P] [--connections N] [--threads N] [--duration SECS] [--requests N] \
[--body unique|same] [--nonce S]";

struct Cfg {
    /// The TCP address dialled: the proxy, or a server.
    target: SocketAddr,
    /// `Some("api.line.me:443")`: tunnel there with CONNECT, then TLS with that SNI.
    connect: Option<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
    path: String,
    connections: usize,
    threads: usize,
    duration: Duration,
    /// Stop after this many requests in all (the memory benchmark fills the store exactly).
    requests: Option<u64>,
    unique: bool,
    nonce: String,
}

#[derive(Default)]
struct Tally {
    ok: u64,
    non_2xx: u64,
    errors: u64,
    latencies_us: Vec<u32>,
}

fn main() {
    let cfg = match parse(std::env::args().skip(1).collect()) {
        Ok(cfg) => Arc::new(cfg),
        Err(msg) => {
            eprintln!("connect-load: {msg}\n{USAGE}");
            std::process::exit(64);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.threads)
        .enable_all()
        .build()
        .expect("a tokio runtime starts on Linux");
    let (tally, seconds) = runtime.block_on(run(cfg));
    let mut lat = tally.latencies_us;
    lat.sort_unstable();
    let pct = |p: f64| -> u32 {
        if lat.is_empty() {
            return 0;
        }
        let i = ((lat.len() as f64) * p).ceil() as usize;
        lat[i.clamp(1, lat.len()) - 1]
    };
    let done = tally.ok + tally.non_2xx;
    println!(
        "{{\"requests\":{done},\"non_2xx\":{},\"errors\":{},\"seconds\":{seconds:.3},\
\"rps\":{:.1},\"p50_us\":{},\"p99_us\":{}}}",
        tally.non_2xx,
        tally.errors,
        done as f64 / seconds,
        pct(0.50),
        pct(0.99),
    );
}

async fn run(cfg: Arc<Cfg>) -> (Tally, f64) {
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let tasks: Vec<_> = (0..cfg.connections)
        .map(|id| tokio::spawn(connection(cfg.clone(), id, deadline, issued.clone())))
        .collect();
    let mut all = Tally::default();
    for task in tasks {
        let t = task.await.unwrap_or_else(|_| Tally {
            errors: 1,
            ..Tally::default()
        });
        all.ok += t.ok;
        all.non_2xx += t.non_2xx;
        all.errors += t.errors;
        all.latencies_us.extend(t.latencies_us);
    }
    (all, start.elapsed().as_secs_f64())
}

/// One client connection; reconnects after an error, until the deadline or the quota.
async fn connection(cfg: Arc<Cfg>, id: usize, deadline: Instant, issued: Arc<AtomicU64>) -> Tally {
    let mut tally = Tally::default();
    let mut seq = 0u64;
    let same = Bytes::from(body(&cfg.nonce, 0, 0));
    'connect: while Instant::now() < deadline {
        let mut sender = match dial(&cfg).await {
            Ok(sender) => sender,
            Err(err) => {
                tally.errors += 1;
                if tally.errors == 1 {
                    eprintln!("connect-load: connection {id}: {err}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        loop {
            if Instant::now() >= deadline {
                break 'connect;
            }
            if let Some(limit) = cfg.requests {
                if issued.fetch_add(1, Ordering::Relaxed) >= limit {
                    break 'connect;
                }
            }
            seq += 1;
            let payload = if cfg.unique {
                Bytes::from(body(&cfg.nonce, id, seq))
            } else {
                same.clone()
            };
            let host = cfg.connect.as_deref().unwrap_or("127.0.0.1");
            let req = Request::post(cfg.path.as_str())
                .header("host", host.split(':').next().unwrap_or(host))
                .header("authorization", "Bearer bench-channel-access-token")
                .header("content-type", "application/json")
                .body(Full::new(payload))
                .expect("a request from constant parts");
            let t0 = Instant::now();
            let answer = async {
                let resp = sender.send_request(req).await?;
                let status = resp.status();
                resp.into_body().collect().await?;
                Ok::<_, hyper::Error>(status)
            }
            .await;
            match answer {
                Ok(status) => {
                    let us = t0.elapsed().as_micros();
                    tally
                        .latencies_us
                        .push(u32::try_from(us).unwrap_or(u32::MAX));
                    if status.is_success() {
                        tally.ok += 1;
                    } else {
                        tally.non_2xx += 1;
                    }
                }
                Err(err) => {
                    tally.errors += 1;
                    if tally.errors == 1 {
                        eprintln!("connect-load: connection {id}: {err}");
                    }
                    continue 'connect;
                }
            }
        }
    }
    tally
}

/// A push body of about 300 bytes, distinct per (nonce, connection, sequence).
fn body(nonce: &str, conn: usize, seq: u64) -> String {
    format!(
        "{{\"to\":\"U{:016x}{:016x}\",\"messages\":[{{\"type\":\"text\",\"text\":\
\"Your order {nonce}-{conn}-{seq} has shipped. Track it in the app; reply STOP to \
opt out of delivery updates. Thank you for shopping with us, and have a good day!\"}}]}}",
        conn, seq
    )
}

type Sender = http1::SendRequest<Full<Bytes>>;

async fn dial(cfg: &Cfg) -> Result<Sender, String> {
    let mut tcp = TcpStream::connect(cfg.target)
        .await
        .map_err(|e| format!("connect {}: {e}", cfg.target))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let Some(authority) = &cfg.connect else {
        return handshake(TokioIo::new(tcp)).await;
    };
    tcp.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| format!("write CONNECT: {e}"))?;
    // The proxy's answer to CONNECT is a bare head; read it byte by byte so no TLS byte is eaten.
    let mut head = Vec::with_capacity(128);
    while !head.ends_with(b"\r\n\r\n") {
        let byte = tcp
            .read_u8()
            .await
            .map_err(|e| format!("read CONNECT answer: {e}"))?;
        head.push(byte);
        if head.len() > 8192 {
            return Err("CONNECT answer head over 8 KiB".into());
        }
    }
    if !head.starts_with(b"HTTP/1.1 200") && !head.starts_with(b"HTTP/1.0 200") {
        return Err(format!(
            "CONNECT refused: {}",
            String::from_utf8_lossy(&head).trim()
        ));
    }
    let host = authority
        .rsplit_once(':')
        .map_or(authority.as_str(), |(h, _)| h);
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| format!("server name {host}: {e}"))?;
    let tls = cfg.tls.clone().ok_or("--connect needs --ca")?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with the proxy: {e}"))?;
    handshake(TokioIo::new(stream)).await
}

async fn handshake<IO>(io: IO) -> Result<Sender, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

fn parse(args: Vec<String>) -> Result<Cfg, String> {
    let mut target = None;
    let mut connect = None;
    let mut ca = None;
    let mut cfg = Cfg {
        target: "127.0.0.1:8080".parse().expect("a literal address"),
        connect: None,
        tls: None,
        path: "/v2/bot/message/push".into(),
        connections: 32,
        threads: 2,
        duration: Duration::from_secs(10),
        requests: None,
        unique: true,
        nonce: "0".into(),
    };
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--target" => target = Some(value()?),
            "--connect" => connect = Some(value()?),
            "--ca" => ca = Some(value()?),
            "--path" => cfg.path = value()?,
            "--connections" => cfg.connections = num(value()?)?.max(1) as usize,
            "--threads" => cfg.threads = num(value()?)?.max(1) as usize,
            "--duration" => {
                let v = value()?;
                let secs: f64 = v.parse().map_err(|e| format!("--duration {v}: {e}"))?;
                cfg.duration = Duration::from_secs_f64(secs);
            }
            "--requests" => cfg.requests = Some(num(value()?)?),
            "--body" => match value()?.as_str() {
                "unique" => cfg.unique = true,
                "same" => cfg.unique = false,
                other => return Err(format!("--body {other}: unique or same")),
            },
            "--nonce" => cfg.nonce = value()?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let target = target.ok_or("--target is required")?;
    cfg.target = target
        .parse()
        .map_err(|e| format!("--target {target}: {e}"))?;
    if let Some(path) = ca {
        let pem = std::fs::read(&path).map_err(|e| format!("--ca {path}: {e}"))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| format!("--ca {path}: {e}"))?;
            roots.add(cert).map_err(|e| format!("--ca {path}: {e}"))?;
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        cfg.tls = Some(Arc::new(tls));
    }
    cfg.connect = connect;
    Ok(cfg)
}
