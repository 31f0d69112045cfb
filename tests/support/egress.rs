//! A small company egress proxy on 127.0.0.1:0: it answers `CONNECT host:port` (only
//! to loopback targets, so nothing a test does can leave the machine), optionally
//! requires `Proxy-Authorization: Basic`, and counts what passed through it: the
//! connections it accepted, the tunnels it opened and to where, the CONNECTs it
//! refused, and the credentials it was offered.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The longest the egress proxy waits for a CONNECT head.
const HEAD_LIMIT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct State {
    accepted: AtomicUsize,
    refused: AtomicUsize,
    /// `host:port` of every tunnel opened, in order.
    tunnels: Mutex<Vec<String>>,
    /// Every `Proxy-Authorization` value offered, decoded (`user:password`).
    offered: Mutex<Vec<String>>,
}

pub struct EgressProxy {
    addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl EgressProxy {
    /// Open to anyone on loopback.
    pub async fn start() -> EgressProxy {
        EgressProxy::start_with(None).await
    }

    /// Answers 407 unless `Proxy-Authorization: Basic` carries `user:password`.
    pub async fn start_with_auth(user: &str, password: &str) -> EgressProxy {
        EgressProxy::start_with(Some(format!("{user}:{password}"))).await
    }

    async fn start_with(required: Option<String>) -> EgressProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("egress proxy binds");
        let addr = listener.local_addr().expect("egress proxy address");
        let state = Arc::new(State::default());
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, required, state.clone(), stop.clone()));
        EgressProxy { addr, state, stop }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, no credentials.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://USER:PASSWORD@127.0.0.1:PORT`, both percent-encoded as given.
    pub fn url_with(&self, user: &str, password: &str) -> String {
        format!("http://{user}:{password}@{}", self.addr)
    }

    /// Connections accepted, whatever became of them.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// CONNECTs answered with anything but 200.
    pub fn refused(&self) -> usize {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// `host:port` of every tunnel opened.
    pub fn tunnels(&self) -> Vec<String> {
        self.state.tunnels.lock().unwrap().clone()
    }

    /// Every credential offered, decoded.
    pub fn offered(&self) -> Vec<String> {
        self.state.offered.lock().unwrap().clone()
    }
}

async fn accept_loop(
    listener: TcpListener,
    required: Option<String>,
    state: Arc<State>,
    stop: CancellationToken,
) {
    let tasks = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        state.accepted.fetch_add(1, Ordering::SeqCst);
        let (required, state, stop) = (required.clone(), state.clone(), stop.clone());
        tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = serve(stream, required, state) => {}
            }
        });
    }
}

async fn serve(mut client: TcpStream, required: Option<String>, state: Arc<State>) {
    let Ok(Some(head)) = tokio::time::timeout(HEAD_LIMIT, read_head(&mut client)).await else {
        return;
    };
    let mut lines = head.split("\r\n");
    let request = lines.next().unwrap_or_default();
    let mut words = request.split(' ');
    let (method, target) = (words.next(), words.next());
    let offered = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("proxy-authorization"))
        .and_then(|(_, v)| v.trim().strip_prefix("Basic ").map(str::to_owned))
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .map(|raw| String::from_utf8_lossy(&raw).into_owned());
    if let Some(offered) = &offered {
        state.offered.lock().unwrap().push(offered.clone());
    }
    let (Some("CONNECT"), Some(target)) = (method, target) else {
        return refuse(&mut client, &state, "405 Method Not Allowed").await;
    };
    if required.is_some() && offered != required {
        return refuse(&mut client, &state, "407 Proxy Authentication Required").await;
    }
    // Loopback only: a test that would send anything further fails instead.
    let loopback = target
        .rsplit_once(':')
        .map(|(host, _)| host.trim_matches(['[', ']']))
        .is_some_and(|host| {
            host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        });
    if !loopback {
        return refuse(&mut client, &state, "403 Forbidden").await;
    }
    let target = target.to_owned();
    let Ok(mut upstream) = TcpStream::connect(target.as_str()).await else {
        return refuse(&mut client, &state, "502 Bad Gateway").await;
    };
    state.tunnels.lock().unwrap().push(target);
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

async fn refuse(client: &mut TcpStream, state: &State, status: &str) {
    state.refused.fetch_add(1, Ordering::SeqCst);
    let answer = format!(
        "HTTP/1.1 {status}\r\nProxy-Authenticate: Basic realm=\"egress\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let _ = client.write_all(answer.as_bytes()).await;
}

/// The request head, read byte by byte so nothing of the tunnel is taken with it.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 || stream.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    String::from_utf8(head).ok()
}
