//! Phase 2, read: buffer a keyed request's body, up to the limit.
//!
//! Keyed bodies are small JSON (LINE refuses over 2 MB), and the body must be hashed
//! and resent on every retry, so it is read once into one `Bytes` and never copied.

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, LengthLimitError, Limited};

use crate::error::ProxyError;

pub async fn body<B>(body: B, headers: &HeaderMap, limit: usize) -> Result<Bytes, ProxyError>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Refuse before reading a byte: a client announcing 1 GB should not make us wait for it.
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ProxyError::BodyTooLarge { limit }),
        Err(_) => Err(ProxyError::ClientBody),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    #[tokio::test]
    async fn reads_within_the_limit_and_refuses_beyond() {
        let ok = body(
            Full::new(Bytes::from_static(b"hello")),
            &HeaderMap::new(),
            5,
        )
        .await
        .unwrap();
        assert_eq!(ok, "hello");
        let err = body(
            Full::new(Bytes::from_static(b"hello!")),
            &HeaderMap::new(),
            5,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ProxyError::BodyTooLarge { limit: 5 }));
        let mut declared = HeaderMap::new();
        declared.insert(http::header::CONTENT_LENGTH, "99".parse().unwrap());
        let err = body(Full::new(Bytes::new()), &declared, 5)
            .await
            .unwrap_err();
        assert!(matches!(err, ProxyError::BodyTooLarge { .. }));
    }
}
