//! Per-host rustls server configs for intercepted tunnels, issued on first use and
//! cached: a TLS handshake with a bot costs a lookup, not a key generation. A leaf
//! is renewed (new key, new certificate) once less than a quarter of its life is left,
//! so a long-running proxy never serves an expired one.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use moka::ops::compute::Op;
use moka::sync::Cache;
use rustls::crypto::CryptoProvider;
use rustls::ServerConfig;

use super::ca::{CaError, CertificateAuthority};

#[derive(Clone)]
struct Leaf {
    config: Arc<ServerConfig>,
    renew_at: SystemTime,
}

pub struct LeafCache {
    ca: Arc<CertificateAuthority>,
    provider: Arc<CryptoProvider>,
    leaves: Cache<String, Leaf>,
    lifetime: Duration,
}

impl LeafCache {
    pub(crate) fn new(ca: Arc<CertificateAuthority>, lifetime: Duration, max_hosts: u64) -> Self {
        LeafCache {
            ca,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            leaves: Cache::new(max_hosts),
            lifetime,
        }
    }

    pub fn ca(&self) -> &Arc<CertificateAuthority> {
        &self.ca
    }

    /// The config for `host`: a DNS name or an IP literal, without port.
    pub(crate) fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, CaError> {
        self.server_config_at(host, SystemTime::now())
    }

    pub(crate) fn server_config_at(
        &self,
        host: &str,
        now: SystemTime,
    ) -> Result<Arc<ServerConfig>, CaError> {
        let host = normalize(host);
        if let Some(leaf) = self.leaves.get(&host) {
            if now < leaf.renew_at {
                return Ok(leaf.config);
            }
        }
        // moka runs this under a per-key lock: concurrent first handshakes (or
        // renewals) for one host wait for a single new leaf instead of each making one.
        let computed =
            self.leaves
                .entry(host.clone())
                .and_try_compute_with(|current| match current {
                    Some(entry) if now < entry.value().renew_at => Ok(Op::Nop),
                    _ => self.issue(&host, now).map(Op::Put),
                })?;
        match computed.into_entry() {
            Some(entry) => Ok(entry.into_value().config),
            // Only a Nop on a missing entry gets here, which the closure never asks for.
            None => self.issue(&host, now).map(|leaf| leaf.config),
        }
    }

    fn issue(&self, host: &str, now: SystemTime) -> Result<Leaf, CaError> {
        let issued = self.ca.issue_leaf_at(host, self.lifetime, now)?;
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(issued.chain, issued.key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let renew_at = issued
            .not_after
            .checked_sub(self.lifetime / 4)
            .unwrap_or(now);
        Ok(Leaf {
            config: Arc::new(config),
            renew_at,
        })
    }

    /// Hosts with a cached config (possibly one due for renewal).
    pub(crate) fn len(&self) -> u64 {
        // entry_count lags inserts until moka's housekeeping has run.
        self.leaves.run_pending_tasks();
        self.leaves.entry_count()
    }
}

/// One cache entry per name as DNS compares them (case-insensitive, root dot
/// optional), and one per IP address however the authority spelled it.
fn normalize(host: &str) -> String {
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    match bare.unwrap_or(host).parse::<IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::intercept::ca::CaPlan;
    use rustls::pki_types::ServerName;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn cache(max_hosts: u64) -> LeafCache {
        let plan = CaPlan {
            hosts: ["api.line.me", "api-data.line.me", "127.0.0.1", "::1"]
                .map(String::from)
                .to_vec(),
            ..CaPlan::default()
        };
        let ca = CertificateAuthority::generate(&plan).unwrap();
        LeafCache::new(Arc::new(ca), DAY, max_hosts)
    }

    /// A client that trusts only our CA, against a server using the cached config.
    async fn handshake(
        leaves: &LeafCache,
        served: &str,
        sni: &str,
        alpn: &[&[u8]],
    ) -> Result<Option<Vec<u8>>, std::io::Error> {
        let server = tokio_rustls::TlsAcceptor::from(leaves.server_config(served).unwrap());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(leaves.ca().cert_der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let (a, b) = tokio::io::duplex(64 * 1024);
        let name = ServerName::try_from(sni.to_owned()).unwrap();
        let (server, client) = tokio::join!(server.accept(a), connector.connect(name, b));
        let client = client?;
        server?;
        Ok(client.get_ref().1.alpn_protocol().map(<[u8]>::to_vec))
    }

    #[tokio::test]
    async fn a_bot_trusting_the_ca_completes_tls() {
        let leaves = cache(16);
        let h2 = handshake(&leaves, "api.line.me", "api.line.me", &[b"h2"]).await;
        assert_eq!(h2.unwrap(), Some(b"h2".to_vec()));
        let h1 = handshake(&leaves, "API.line.me.", "api.line.me", &[b"http/1.1"]).await;
        assert_eq!(h1.unwrap(), Some(b"http/1.1".to_vec()));
        let ip = handshake(&leaves, "127.0.0.1", "127.0.0.1", &[b"h2"]).await;
        assert_eq!(ip.unwrap(), Some(b"h2".to_vec()));
        let v6 = handshake(&leaves, "[::1]", "::1", &[]).await;
        assert_eq!(v6.unwrap(), None);
    }

    #[tokio::test]
    async fn a_leaf_covers_its_own_host_only() {
        let leaves = cache(16);
        let other = handshake(&leaves, "api.line.me", "api-data.line.me", &[b"h2"]).await;
        assert!(other.is_err());
        let ip = handshake(&leaves, "127.0.0.1", "127.0.0.2", &[b"h2"]).await;
        assert!(ip.is_err());
    }

    #[test]
    fn configs_are_cached_then_renewed_before_expiry() {
        let leaves = cache(16);
        let now = SystemTime::now();
        let first = leaves.server_config_at("API.line.me.", now).unwrap();
        let again = leaves.server_config("api.line.me").unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        let at = |hours: u64| now + Duration::from_secs(hours * 3600);
        let still = leaves.server_config_at("api.line.me", at(17)).unwrap();
        assert!(
            Arc::ptr_eq(&first, &still),
            "18h of 24h is the renewal point"
        );
        let renewed = leaves.server_config_at("api.line.me", at(19)).unwrap();
        assert!(!Arc::ptr_eq(&first, &renewed), "less than a quarter left");
        // The renewed leaf was issued at +19h, so it lasts until +37h.
        let later = leaves.server_config_at("api.line.me", at(36)).unwrap();
        assert!(Arc::ptr_eq(&renewed, &later));
        assert_eq!(leaves.len(), 1);
        let v6 = leaves.server_config("[::1]").unwrap();
        assert!(Arc::ptr_eq(&v6, &leaves.server_config("0:0::1").unwrap()));
    }

    #[test]
    fn concurrent_first_calls_issue_one_leaf() {
        let leaves = cache(16);
        let configs: Vec<_> = std::thread::scope(|s| {
            let calls: Vec<_> = (0..8)
                .map(|_| s.spawn(|| leaves.server_config("api.line.me").unwrap()))
                .collect();
            calls.into_iter().map(|c| c.join().unwrap()).collect()
        });
        assert!(configs.iter().all(|c| Arc::ptr_eq(c, &configs[0])));
    }

    #[test]
    fn bad_hosts_are_errors_and_not_cached() {
        let leaves = cache(16);
        assert_eq!(leaves.len(), 0);
        for host in ["api.line.me:443", "", "."] {
            let err = leaves.server_config(host).map(drop).unwrap_err();
            assert!(matches!(err, CaError::InvalidHost(_)), "{host}: {err}");
        }
        assert_eq!(leaves.len(), 0);
    }

    #[test]
    fn the_cache_is_bounded() {
        let leaves = cache(4);
        for i in 0..20 {
            leaves.server_config(&format!("h{i}.example")).unwrap();
        }
        assert!(leaves.len() <= 4, "{}", leaves.len());
    }
}
