//! The proxy's own way out: a TCP stream to `host:port`, opened directly or as a
//! `CONNECT` tunnel through the company egress proxy (`upstream-proxy`). Both the
//! pooled client to LINE ([`EgressConnector`], under rustls) and the allowlisted
//! tunnels of `edge::connect` open their connections here, so no outbound
//! connection can bypass the egress proxy once one is set.
//!
//! The egress proxy's answer is read byte by byte up to the end of its head: nothing
//! after it may be swallowed, as it belongs to the tunnel. A non-2xx answer (407 for
//! wrong credentials, 403, 502 …) is a failure to connect: nothing was sent to the
//! target, so the pipeline may retry it safely.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use http::{StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tower_service::Service;

use crate::config::{EgressProxy, UpstreamProxy};

/// The longest answer head accepted from the egress proxy.
const MAX_ANSWER_HEAD: usize = 16 * 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a connection could not be opened. Its text reaches the bot in a tunnel's 502,
/// so it names the target and a status or an error kind only: never the egress
/// proxy's address or credentials (the log line of a refusal names the proxy, masked).
#[derive(Debug, thiserror::Error)]
pub(crate) enum EgressError {
    #[error("connect timed out")]
    Timeout,
    /// Straight to the target: the error kind, as the tunnel's 502 reports it.
    #[error("{}", .0.kind())]
    Direct(std::io::Error),
    #[error("egress proxy unreachable: {}", .0.kind())]
    ProxyUnreachable(std::io::Error),
    #[error("egress proxy answered {status} to CONNECT {target}")]
    Refused { target: String, status: StatusCode },
    #[error("egress proxy sent no valid answer to CONNECT {target}")]
    Malformed { target: String },
}

/// `Proxy-Authorization: Basic …`, built once. Never printed.
struct Credentials(String);

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// How outbound connections are opened: the route, and the egress proxy's credentials.
#[derive(Debug)]
pub(crate) struct Egress {
    route: UpstreamProxy,
    credentials: Option<Credentials>,
}

impl Egress {
    pub(crate) fn new(route: UpstreamProxy) -> Egress {
        let credentials = match &route {
            UpstreamProxy::Fixed(proxy)
            | UpstreamProxy::Env {
                proxy: Some(proxy), ..
            } => basic(proxy),
            _ => None,
        };
        Egress { route, credentials }
    }

    /// The egress proxy a connection to `host:port` goes through, if any.
    pub(crate) fn route(&self, host: &str, port: u16) -> Option<&EgressProxy> {
        self.route.route(host, port)
    }

    /// A TCP stream to `host:port` (an IPv6 host without brackets), through the
    /// egress proxy when one applies, within `limit` (connect and CONNECT together).
    pub(crate) async fn connect(
        &self,
        host: &str,
        port: u16,
        limit: Duration,
    ) -> Result<TcpStream, EgressError> {
        let opened = async {
            match self.route(host, port) {
                None => TcpStream::connect((host, port))
                    .await
                    .map_err(EgressError::Direct),
                Some(proxy) => self.tunnel(proxy, host, port).await,
            }
        };
        let stream = timeout(limit, opened)
            .await
            .map_err(|_| EgressError::Timeout)??;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    async fn tunnel(
        &self,
        proxy: &EgressProxy,
        host: &str,
        port: u16,
    ) -> Result<TcpStream, EgressError> {
        let target = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let unreachable = EgressError::ProxyUnreachable;
        let mut stream = TcpStream::connect((proxy.host.as_str(), proxy.port))
            .await
            .map_err(unreachable)?;
        let _ = stream.set_nodelay(true);
        let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(Credentials(value)) = &self.credentials {
            head.push_str("Proxy-Authorization: ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(unreachable)?;
        let answer = read_head(&mut stream).await.map_err(unreachable)?;
        let status = answer.as_deref().and_then(status_of);
        match status {
            Some(status) if status.is_success() => Ok(stream),
            Some(status) => {
                // The one place this is logged: the pipeline sees a connect failure
                // and retries; the operator needs to know why (407: credentials).
                tracing::warn!(
                    egress_proxy = %proxy,
                    connect_to = %target,
                    status = status.as_u16(),
                    "egress proxy refused CONNECT: {status}"
                );
                Err(EgressError::Refused { target, status })
            }
            None => Err(EgressError::Malformed { target }),
        }
    }
}

fn basic(proxy: &EgressProxy) -> Option<Credentials> {
    if proxy.username.is_none() && proxy.password.is_none() {
        return None;
    }
    let pair = format!(
        "{}:{}",
        proxy.username.as_deref().unwrap_or_default(),
        proxy
            .password
            .as_ref()
            .map(|p| p.expose())
            .unwrap_or_default()
    );
    Some(Credentials(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )))
}

/// The answer head up to its blank line, one byte at a time so that nothing of the
/// tunnel is read with it; `None` if the proxy closed first or sent too much.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(128);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_ANSWER_HEAD || stream.read(&mut byte).await? == 0 {
            return Ok(None);
        }
        head.push(byte[0]);
    }
    Ok(Some(head))
}

/// `HTTP/1.x NNN …` → NNN.
fn status_of(head: &[u8]) -> Option<StatusCode> {
    let line = head.split(|&b| b == b'\n').next()?;
    let mut words = line.split(|&b| b == b' ');
    let version = words.next()?;
    if !version.starts_with(b"HTTP/1.") {
        return None;
    }
    let code = words.next()?;
    let code = code.strip_suffix(b"\r").unwrap_or(code);
    (code.len() == 3)
        .then(|| StatusCode::from_bytes(code).ok())
        .flatten()
}

/// The client's connector: hyper's own for direct routes (happy eyeballs, its DNS
/// resolver), a `CONNECT` tunnel through the egress proxy otherwise. rustls runs on
/// top of either (hyper-rustls wraps this), so TLS is end to end with the upstream.
#[derive(Clone)]
pub(crate) struct EgressConnector {
    direct: HttpConnector,
    egress: Arc<Egress>,
    connect_timeout: Duration,
}

impl EgressConnector {
    pub(crate) fn new(egress: Arc<Egress>, connect_timeout: Duration) -> EgressConnector {
        let mut direct = HttpConnector::new();
        direct.enforce_http(false);
        direct.set_nodelay(true);
        direct.set_connect_timeout(Some(connect_timeout));
        EgressConnector {
            direct,
            egress,
            connect_timeout,
        }
    }
}

impl Service<Uri> for EgressConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Service::<Uri>::poll_ready(&mut self.direct, cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
        let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
            Some("http") => 80,
            _ => 443,
        });
        if self.egress.route(host, port).is_none() {
            let direct = self.direct.call(uri);
            return Box::pin(async move { direct.await.map_err(Into::into) });
        }
        let host = host.to_owned();
        let egress = self.egress.clone();
        let limit = self.connect_timeout;
        Box::pin(async move {
            egress
                .connect(&host, port, limit)
                .await
                .map(TokioIo::new)
                .map_err(Into::into)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        let ok = b"HTTP/1.1 200 Connection established\r\n\r\n";
        assert_eq!(status_of(ok), Some(StatusCode::OK));
        let auth = b"HTTP/1.0 407 Proxy Authentication Required\r\nX: y\r\n\r\n";
        assert_eq!(
            status_of(auth),
            Some(StatusCode::PROXY_AUTHENTICATION_REQUIRED)
        );
        assert_eq!(status_of(b"HTTP/1.1 200\r\n\r\n"), Some(StatusCode::OK));
        for bad in [
            &b"SSH-2.0-x\r\n\r\n"[..],
            b"HTTP/1.1 2000 x\r\n\r\n",
            b"\r\n\r\n",
        ] {
            assert_eq!(status_of(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
