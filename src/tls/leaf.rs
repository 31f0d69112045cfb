//! Per-host rustls server configs for intercepted tunnels, issued on first use and
//! cached: a TLS handshake with a bot costs a lookup, not a key generation. A leaf
//! is renewed (new key, new certificate) once less than a quarter of its life is left.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use moka::sync::Cache;

use super::ca::{CaError, CertificateAuthority};

struct Leaf {
    config: Arc<rustls::ServerConfig>,
    renew_at: SystemTime,
}

pub struct LeafCache {
    ca: Arc<CertificateAuthority>,
    cache: Cache<String, Arc<Leaf>>,
    lifetime: Duration,
}

impl LeafCache {
    pub fn new(ca: Arc<CertificateAuthority>, lifetime: Duration, max_hosts: u64) -> Self {
        LeafCache {
            ca,
            cache: Cache::new(max_hosts),
            lifetime,
        }
    }

    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// The config for `host` (a name or an IP literal, without port).
    pub fn server_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, CaError> {
        self.server_config_at(host, SystemTime::now())
    }

    fn server_config_at(
        &self,
        host: &str,
        now: SystemTime,
    ) -> Result<Arc<rustls::ServerConfig>, CaError> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if let Some(leaf) = self.cache.get(&host) {
            if now < leaf.renew_at {
                return Ok(leaf.config.clone());
            }
            self.cache.invalidate(&host);
        }
        // try_get_with: concurrent first handshakes for one host issue one leaf.
        let leaf = self
            .cache
            .try_get_with(host.clone(), || self.issue(&host, now).map(Arc::new))
            .map_err(|e| CaError::Invalid(e.to_string()))?;
        Ok(leaf.config.clone())
    }

    fn issue(&self, host: &str, now: SystemTime) -> Result<Leaf, CaError> {
        let issued = self.ca.issue_leaf(host, self.lifetime)?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| CaError::Invalid(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(issued.chain, issued.key)
        .map_err(|e| CaError::Invalid(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Leaf {
            config: Arc::new(config),
            renew_at: now + self.lifetime - self.lifetime / 4,
        })
    }

    pub fn len(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;

    fn cache() -> LeafCache {
        let dir = std::env::temp_dir().join(format!(
            "lrp-leaf-test-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        let ca = CertificateAuthority::load_or_create(&dir).unwrap();
        LeafCache::new(Arc::new(ca), Duration::from_secs(24 * 3600), 16)
    }

    async fn handshake(
        leaves: &LeafCache,
        served: &str,
        sni: &str,
        alpn: &[u8],
    ) -> Result<Option<Vec<u8>>, std::io::Error> {
        let server = tokio_rustls::TlsAcceptor::from(leaves.server_config(served).unwrap());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(leaves.ca().cert_der().clone()).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        client.alpn_protocols = vec![alpn.to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let (a, b) = tokio::io::duplex(64 * 1024);
        let name = ServerName::try_from(sni.to_owned()).unwrap();
        let (server, client) = tokio::join!(server.accept(a), connector.connect(name, b));
        let client = client?;
        server?;
        Ok(client.get_ref().1.alpn_protocol().map(<[u8]>::to_vec))
    }

    #[tokio::test]
    async fn a_bot_trusting_the_ca_completes_tls_and_gets_h2() {
        let leaves = cache();
        assert_eq!(
            handshake(&leaves, "api.line.me", "api.line.me", b"h2")
                .await
                .unwrap(),
            Some(b"h2".to_vec())
        );
        assert!(
            handshake(&leaves, "127.0.0.1", "127.0.0.1", b"http/1.1")
                .await
                .is_ok(),
            "IP leaves"
        );
        assert!(
            handshake(&leaves, "api.line.me", "evil.example", b"h2")
                .await
                .is_err(),
            "the leaf covers its host only"
        );
    }

    #[test]
    fn configs_are_cached_then_renewed_before_expiry() {
        let leaves = cache();
        let now = SystemTime::now();
        let first = leaves.server_config_at("API.line.me.", now).unwrap();
        let again = leaves
            .server_config_at("api.line.me", now + Duration::from_secs(3600))
            .unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        let late = leaves
            .server_config_at("api.line.me", now + Duration::from_secs(19 * 3600))
            .unwrap();
        assert!(
            !Arc::ptr_eq(&first, &late),
            "renewed with a quarter of the lifetime left"
        );
        assert_eq!(leaves.len(), 1);
    }
}
