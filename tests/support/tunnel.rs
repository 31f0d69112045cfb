//! A bot's side of HTTPS_PROXY mode, by hand: CONNECT, then TLS trusting the proxy's
//! CA, then HTTP/1.1 or HTTP/2 inside.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::proxy::{Reply, ANSWER_LIMIT};
use super::within;

/// The longest a test waits for a peer to close a connection it should close.
pub const CLOSE_LIMIT: Duration = Duration::from_secs(10);

/// Sends `head` (a whole CONNECT request head) and reads the proxy's answer head.
/// Returns the stream (positioned after the head) and the status code.
pub async fn connect_raw(proxy: SocketAddr, head: &str) -> (TcpStream, u16, String) {
    let mut stream = TcpStream::connect(proxy).await.expect("proxy accepts");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    let read_head = async {
        while !answer.ends_with(b"\r\n\r\n") {
            let n = stream.read(&mut byte).await.unwrap();
            assert!(
                n > 0,
                "proxy closed during the CONNECT answer: {:?}",
                String::from_utf8_lossy(&answer)
            );
            answer.push(byte[0]);
        }
    };
    within(ANSWER_LIMIT, "the proxy answered the CONNECT", read_head).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    (stream, status, text)
}

/// CONNECT to `target`, asserting 200.
pub async fn connect(proxy: SocketAddr, target: &str) -> TcpStream {
    let (stream, status, head) = connect_raw(
        proxy,
        &format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 200, "{head}");
    stream
}

pub fn client_config(ca_pem_path: &Path, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca_pem_path).expect("CA file");
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

pub async fn tls(
    stream: TcpStream,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    let handshake = tokio_rustls::TlsConnector::from(config).connect(name, stream);
    within(ANSWER_LIMIT, "the TLS handshake ended", handshake).await
}

/// One request over an established TLS stream, HTTP/2 if ALPN chose it; bounded by
/// [`ANSWER_LIMIT`].
pub async fn request(stream: TlsStream<TcpStream>, req: Request<Full<Bytes>>) -> Reply {
    let what = format!("the proxy answered {} inside the tunnel", req.uri());
    within(ANSWER_LIMIT, &what, request_unbounded(stream, req)).await
}

async fn request_unbounded(stream: TlsStream<TcpStream>, req: Request<Full<Bytes>>) -> Reply {
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(stream);
    let res = if h2 {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        sender.send_request(req).await.unwrap()
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        sender.send_request(req).await.unwrap()
    };
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub fn push_request(uri: &str, token: &str, body: &str) -> Request<Full<Bytes>> {
    Request::post(uri)
        .header("host", "api.line.me")
        .header("authorization", token)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

/// Reads until the peer closes; true if it closed after at most a short goodbye (a TLS
/// alert), false if it kept talking. Fails the test if the peer neither closes nor
/// talks within [`CLOSE_LIMIT`].
pub async fn closed_by_peer(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    let mut received = 0;
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => received += n,
            }
            if received > 64 {
                return false;
            }
        }
    };
    within(CLOSE_LIMIT, "the peer closed the connection", read).await
}

/// Reads a whole answer up to the peer's close, bounded by [`ANSWER_LIMIT`].
pub async fn read_to_close(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut answer = Vec::new();
    let read = stream.read_to_end(&mut answer);
    within(ANSWER_LIMIT, "the peer answered and closed", read).await?;
    Ok(answer)
}

pub fn ok(status: StatusCode) -> bool {
    status.is_success()
}
