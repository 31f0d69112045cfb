//! A throwaway PKI: its own CA, leaves for whatever names a test server answers to,
//! and client configs that trust this CA and nothing else, so a test can never pass by
//! accidentally reaching something with a real certificate.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

pub struct TestPki {
    pub ca_pem: String,
    /// A fresh directory of this PKI's own; removed when the PKI is dropped.
    pub dir: PathBuf,
    pub ca_path: PathBuf,
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
}

/// An explicit provider everywhere: tests must not depend on (or set) the process-wide
/// default, which the proxy under test may install differently.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TestPki {
    pub fn new() -> TestPki {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(DnType::CommonName, "line-retry-proxy test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = params.self_signed(&ca_key).expect("CA cert");
        let ca_pem = ca_cert.pem();
        let dir = super::proxy::temp_dir("pki");
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, &ca_pem).expect("write ca.pem");
        TestPki {
            ca_pem,
            dir,
            ca_path,
            ca_cert,
            ca_key,
        }
    }

    /// A server config with a fresh leaf for `names` (DNS names or IP literals).
    pub fn server_config(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        let key = KeyPair::generate().expect("leaf key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("leaf names are DNS names or IP literals");
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.ca_cert, &self.ca_key)
            .expect("leaf cert");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .expect("server config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// A fresh leaf for `names` as PEM files (certificate, key) in this PKI's
    /// directory, for servers that read their own (redis-server).
    pub fn leaf_files(&self, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("leaf key");
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("leaf names are DNS names or IP literals");
        let cert = params
            .signed_by(&key, &self.ca_cert, &self.ca_key)
            .expect("leaf cert");
        let cert_path = self.dir.join("leaf.pem");
        let key_path = self.dir.join("leaf.key");
        std::fs::write(&cert_path, cert.pem()).expect("write leaf.pem");
        std::fs::write(&key_path, key.serialize_pem()).expect("write leaf.key");
        (cert_path, key_path)
    }

    /// Trusts only this CA; offers HTTP/1.1 by ALPN.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client_config_alpn(&[b"http/1.1"])
    }

    /// Trusts only this CA; offers exactly `alpn` (empty for hyper-rustls, which
    /// insists on setting ALPN itself).
    pub fn client_config_alpn(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.ca_cert.der().clone())
            .expect("the test CA is a valid root");
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        // Best effort: a leftover directory in the temp dir harms nothing.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
