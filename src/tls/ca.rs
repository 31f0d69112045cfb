//! The intercept CA: loaded from `--ca-dir` (`ca.pem`, `ca.key`) or created there on
//! first use. It signs a short-lived leaf, with a key of its own, per intercepted host.
//!
//! Whoever holds `ca.key` can impersonate any site to a process that trusts `ca.pem`,
//! so the key is written 0600 from the first byte (never chmod-ed afterwards) and a
//! key file others can read or anyone but its owner can write is refused.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const CERT_FILE: &str = "ca.pem";
const KEY_FILE: &str = "ca.key";
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Clocks disagree; a certificate valid only from "now" fails on a bot running behind.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);
/// Group-read is tolerated (Kubernetes secret volumes with fsGroup are 0440); nothing else.
const FORBIDDEN_KEY_BITS: u32 = 0o037;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} exists but {missing} does not: restore it, or remove both to create a new CA")]
    Incomplete { path: PathBuf, missing: PathBuf },
    #[error("{path} is accessible to others (mode {mode:o}): run chmod 600 on it")]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("the CA certificate is not a CA (no basicConstraints CA:TRUE)")]
    NotACa,
    #[error("the CA key does not belong to the CA certificate")]
    KeyMismatch,
    #[error("invalid CA material: {0}")]
    Invalid(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    /// The CA as rcgen needs it to sign: same subject and key identifier as `ca.pem`.
    issuer: Certificate,
    key: KeyPair,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("key", &"***")
            .finish_non_exhaustive()
    }
}

pub struct IssuedLeaf {
    /// Leaf first, then the CA.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_after: SystemTime,
}

impl CertificateAuthority {
    pub fn load_or_create(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                check_key_permissions(&key_path)?;
                let cert_pem = read(&cert_path)?;
                let key_pem = read(&key_path)?;
                CertificateAuthority::from_pem(&cert_pem, &key_pem)
            }
            (false, false) => {
                let ca = CertificateAuthority::generate()?;
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|source| CaError::Io {
                        path: dir.to_owned(),
                        source,
                    })?;
                // Key first: a crash between the two leaves no certificate without its key.
                write_atomically(&key_path, ca.key.serialize_pem().as_bytes(), 0o600)?;
                write_atomically(&cert_path, ca.cert_pem.as_bytes(), 0o644)?;
                Ok(ca)
            }
            (true, false) => Err(CaError::Incomplete {
                path: cert_path,
                missing: key_path,
            }),
            (false, true) => Err(CaError::Incomplete {
                path: key_path,
                missing: cert_path,
            }),
        }
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Invalid(format!("key: {e}")))?;
        let cert_der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .ok_or_else(|| CaError::Invalid("no certificate in the PEM".into()))?
            .map_err(|e| CaError::Invalid(format!("certificate: {e}")))?;
        let params = CertificateParams::from_ca_cert_der(&cert_der)
            .map_err(|e| CaError::Invalid(format!("certificate: {e}")))?;
        if !matches!(params.is_ca, IsCa::Ca(_)) {
            return Err(CaError::NotACa);
        }
        check_key_matches(&cert_der, &key)?;
        // Re-signing the parsed parameters gives rcgen an issuer with the original
        // subject and key identifier; leaves it signs chain to the original ca.pem.
        let issuer = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            issuer,
            key,
        })
    }

    fn generate() -> Result<Self, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "line-retry-proxy intercept CA");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "line-retry-proxy");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + CA_VALIDITY).into();
        params.serial_number = Some(random_serial());
        let issuer = params.self_signed(&key)?;
        let cert_pem = issuer.pem();
        let cert_der = issuer.der().clone();
        Ok(CertificateAuthority {
            cert_pem,
            cert_der,
            issuer,
            key,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn issue_leaf(&self, host: &str, lifetime: Duration) -> Result<IssuedLeaf, CaError> {
        // A leaf of its own key: a leaked leaf key is bounded to one host and one lifetime.
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![host.to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, host);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        let not_after = now + lifetime;
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        Ok(IssuedLeaf {
            chain: vec![cert.der().clone(), self.cert_der.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_after,
        })
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    fastrand::fill(&mut bytes);
    bytes[0] &= 0x7f; // a positive INTEGER
    SerialNumber::from_slice(&bytes)
}

fn check_key_matches(cert: &CertificateDer<'static>, key: &KeyPair) -> Result<(), CaError> {
    let provider = rustls::crypto::ring::default_provider();
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| CaError::Invalid(format!("key: {e}")))?;
    rustls::sign::CertifiedKey::new(vec![cert.clone()], signing)
        .keys_match()
        .map_err(|_| CaError::KeyMismatch)
}

fn check_key_permissions(path: &Path) -> Result<(), CaError> {
    let mode = fs::metadata(path)
        .map_err(|source| CaError::Io {
            path: path.to_owned(),
            source,
        })?
        .permissions()
        .mode();
    if mode & FORBIDDEN_KEY_BITS != 0 {
        return Err(CaError::KeyPermissions {
            path: path.to_owned(),
            mode: mode & 0o777,
        });
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes to a temporary name in the same directory, then renames: a crash never
/// leaves a half-written file under the real name.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let io = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let mut bytes = [0u8; 8];
        fastrand::fill(&mut bytes);
        std::env::temp_dir().join(format!(
            "lrp-ca-test-{}-{:x}",
            std::process::id(),
            u64::from_le_bytes(bytes)
        ))
    }

    #[test]
    fn created_once_then_loaded() {
        let dir = temp_dir().join("ca");
        let created = CertificateAuthority::load_or_create(&dir).unwrap();
        let mode = fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = CertificateAuthority::load_or_create(&dir).unwrap();
        assert_eq!(created.cert_pem(), loaded.cert_pem());
        assert!(!format!("{loaded:?}").contains("PRIVATE"));
    }

    #[test]
    fn a_missing_half_or_an_exposed_key_is_refused() {
        let dir = temp_dir();
        CertificateAuthority::load_or_create(&dir).unwrap();
        fs::set_permissions(dir.join(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        let err = CertificateAuthority::load_or_create(&dir).unwrap_err();
        assert!(matches!(err, CaError::KeyPermissions { .. }), "{err}");
        fs::set_permissions(dir.join(KEY_FILE), fs::Permissions::from_mode(0o440)).unwrap();
        assert!(
            CertificateAuthority::load_or_create(&dir).is_ok(),
            "group-read is tolerated"
        );
        fs::remove_file(dir.join(KEY_FILE)).unwrap();
        let err = CertificateAuthority::load_or_create(&dir).unwrap_err();
        assert!(err.to_string().contains("ca.key"), "{err}");
    }

    #[test]
    fn operator_material_is_validated() {
        let a = CertificateAuthority::generate().unwrap();
        let b = CertificateAuthority::generate().unwrap();
        assert!(CertificateAuthority::from_pem(a.cert_pem(), &a.key.serialize_pem()).is_ok());
        let err = CertificateAuthority::from_pem(a.cert_pem(), &b.key.serialize_pem()).unwrap_err();
        assert!(matches!(err, CaError::KeyMismatch), "{err}");
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["x.test".to_owned()])
            .unwrap()
            .self_signed(&leaf_key)
            .unwrap();
        let err =
            CertificateAuthority::from_pem(&leaf.pem(), &leaf_key.serialize_pem()).unwrap_err();
        assert!(matches!(err, CaError::NotACa), "{err}");
        assert!(CertificateAuthority::from_pem("garbage", "garbage").is_err());
    }

    #[test]
    fn leaves_have_their_own_key_and_chain_to_the_ca() {
        let ca = CertificateAuthority::generate().unwrap();
        let a = ca
            .issue_leaf("api.line.me", Duration::from_secs(3600))
            .unwrap();
        let b = ca
            .issue_leaf("api.line.me", Duration::from_secs(3600))
            .unwrap();
        assert_eq!(a.chain.len(), 2);
        assert_eq!(&a.chain[1], ca.cert_der());
        assert_ne!(a.key.secret_der(), b.key.secret_der());
    }
}
