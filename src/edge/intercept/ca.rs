//! The intercept CA: loaded from `--ca-dir` (`ca.pem`, `ca.key`) or created there on
//! first use. It signs a short-lived leaf, with a key of its own, per intercepted host.
//!
//! Whoever holds `ca.key` could impersonate any site to a process that trusts
//! `ca.pem`, so a CA made here is limited twice: a name constraint names the intercept
//! hosts as the only names it may sign for (clients that verify with webpki, OpenSSL,
//! Go or Node refuse any other leaf it signs), and it lives a year by default
//! (`ca-lifetime`), to be replaced with `line-retry-proxy ca --renew`. The key is
//! created 0600 from its first byte, and a key file that others can read or anyone but
//! its owner can write is refused. A CA made before (without a constraint, or by the
//! operator) is loaded as it is and keeps working.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CidrSubnet, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, Ia5String, IsCa, KeyPair, KeyUsagePurpose, NameConstraints, SanType,
    SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{ring, SecureRandom};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::sign::CertifiedKey;

pub(super) const CERT_FILE: &str = "ca.pem";
pub(super) const KEY_FILE: &str = "ca.key";
/// The default lifetime of a CA made here: a year (as `1year` spells it, 365.25 days).
pub const DEFAULT_CA_LIFETIME: Duration = Duration::from_secs(31_557_600);
/// Clocks disagree; a certificate valid only from "now" fails on a bot running behind.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);
/// 9999-12-31T23:59:59Z, the last instant X.509 can encode; later ones panic in `time`.
const LAST_X509_SECOND: u64 = 253_402_300_799;
/// RFC 5280's upper bound for a common name; longer names go in the SAN only.
const MAX_CN_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("{0} is missing but {1} exists: restore it, or remove both to create a new CA")]
    Incomplete(PathBuf, PathBuf),
    #[error("{0} is too open (mode {1:03o}): run `chmod 600 {0}`")]
    KeyPermissions(PathBuf, u32),
    /// Where the material came from (a path, or "CA certificate"/"CA key"), and why.
    #[error("{0}: {1}")]
    Invalid(String, String),
    #[error("{0}: not a CA certificate (basicConstraints CA:TRUE is missing)")]
    NotACa(String),
    #[error("{key} does not belong to the certificate in {cert}")]
    KeyMismatch { cert: String, key: String },
    #[error("invalid host {0:?}: expected a DNS name or an IP address, without port")]
    InvalidHost(String),
    #[error("invalid leaf lifetime {0:?}: must be positive and end before the year 10000")]
    InvalidLifetime(Duration),
    #[error("{0} is writable by other users (mode {1:o}): run `chmod o-w {0}`; whoever can write there can put in a CA of their own")]
    DirWritable(PathBuf, u32),
    #[error("{0} is in a directory others can write to and belongs to another user")]
    ForeignKey(PathBuf),
    #[error("the intercept CA may not sign for {0} (its name constraints): make a new one with `line-retry-proxy ca --renew --intercept-hosts …`")]
    OutsideConstraints(String),
    #[error("the system random number generator failed")]
    Random,
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
}

/// What a CA created here is made for.
#[derive(Debug, Clone)]
pub struct CaPlan {
    /// The only names it may sign for (its name constraint): the intercept hosts.
    pub hosts: Vec<String>,
    /// From now (less an hour for clock skew) to its end.
    pub lifetime: Duration,
}

impl Default for CaPlan {
    fn default() -> Self {
        CaPlan {
            hosts: vec!["api.line.me".to_owned()],
            lifetime: DEFAULT_CA_LIFETIME,
        }
    }
}

pub struct CertificateAuthority {
    pub(super) cert_pem: String,
    cert_der: CertificateDer<'static>,
    /// rcgen signs with a `Certificate`, not DER: this one is re-made from `cert_der`'s
    /// subject and key identifier, so leaves name the original as their issuer.
    issuer: Certificate,
    pub(super) key: KeyPair,
    random: &'static dyn SecureRandom,
    /// The names it may sign for; `None`: any (a CA made before constraints, or elsewhere).
    permitted: Option<Vec<GeneralSubtree>>,
    not_after: SystemTime,
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
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        Self::build_guarded(cert_pem, key_pem, "CA certificate", "CA key")
    }

    /// Operator material goes through rcgen's certificate parser, which panics on some
    /// malformed names (an empty RDN set): that must be a clear error, not a crash.
    pub(super) fn build_guarded(
        cert_pem: &str,
        key_pem: &str,
        cert_from: &str,
        key_from: &str,
    ) -> Result<Self, CaError> {
        std::panic::catch_unwind(|| Self::build(cert_pem, key_pem, cert_from, key_from))
            .unwrap_or_else(|_| Err(invalid(cert_from, "a certificate the parser cannot handle")))
    }

    /// A new CA held in memory only, constrained to `plan.hosts`.
    pub fn generate(plan: &CaPlan) -> Result<Self, CaError> {
        let random = ring::default_provider().secure_random;
        let permitted = plan
            .hosts
            .iter()
            .map(|h| subtree(h))
            .collect::<Result<Vec<_>, _>>()?;
        let now = whole_seconds(SystemTime::now());
        let not_after = now
            .checked_add(plan.lifetime)
            .filter(|t| {
                !plan.lifetime.is_zero() && *t <= UNIX_EPOCH + Duration::from_secs(LAST_X509_SECOND)
            })
            .ok_or(CaError::InvalidLifetime(plan.lifetime))?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.name_constraints = Some(NameConstraints {
            permitted_subtrees: permitted.clone(),
            excluded_subtrees: Vec::new(),
        });
        let name = &mut params.distinguished_name;
        name.push(DnType::CommonName, "line-retry-proxy intercept CA");
        name.push(DnType::OrganizationName, "line-retry-proxy");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now.checked_sub(CLOCK_SKEW).unwrap_or(now).into();
        params.not_after = not_after.into();
        params.serial_number = Some(serial(random)?);
        let issuer = params.self_signed(&key)?;
        let cert_der = issuer.der().clone();
        Ok(CertificateAuthority {
            cert_pem: pem_encode(&cert_der),
            cert_der,
            issuer,
            key,
            random,
            permitted: Some(permitted),
            not_after,
        })
    }

    /// Whether leaves this CA signs for `host` pass its name constraints.
    pub fn permits(&self, host: &str) -> bool {
        let Some(permitted) = &self.permitted else {
            return true;
        };
        let bare = host.trim_matches(['[', ']']).trim_end_matches('.');
        let ip = bare.parse::<IpAddr>().ok();
        permitted.iter().any(|subtree| match (subtree, ip) {
            (GeneralSubtree::DnsName(name), None) => {
                let name = name.trim_start_matches('.');
                bare.eq_ignore_ascii_case(name)
                    || bare.len() > name.len()
                        && bare.as_bytes()[bare.len() - name.len() - 1] == b'.'
                        && bare[bare.len() - name.len()..].eq_ignore_ascii_case(name)
            }
            (GeneralSubtree::IpAddress(CidrSubnet::V4(net, mask)), Some(IpAddr::V4(ip))) => {
                ip.octets().iter().zip(mask).map(|(b, m)| b & m).eq(*net)
            }
            (GeneralSubtree::IpAddress(CidrSubnet::V6(net, mask)), Some(IpAddr::V6(ip))) => {
                ip.octets().iter().zip(mask).map(|(b, m)| b & m).eq(*net)
            }
            _ => false,
        })
    }

    /// Whether the CA carries a name constraint at all.
    pub fn is_constrained(&self) -> bool {
        self.permitted.is_some()
    }

    /// The end of the CA's validity: renew before it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    fn build(
        cert_pem: &str,
        key_pem: &str,
        cert_from: &str,
        key_from: &str,
    ) -> Result<Self, CaError> {
        let cert_der = match rustls_pemfile::certs(&mut cert_pem.as_bytes()).next() {
            Some(Ok(der)) => der,
            Some(Err(e)) => return Err(invalid(cert_from, format!("unreadable PEM: {e}"))),
            None => return Err(invalid(cert_from, "no PEM certificate found")),
        };
        let key = parse_key(key_pem).map_err(|reason| invalid(key_from, reason))?;
        let params = CertificateParams::from_ca_cert_der(&cert_der)
            .map_err(|e| invalid(cert_from, format!("unsupported certificate: {e}")))?;
        if !matches!(params.is_ca, IsCa::Ca(_)) {
            return Err(CaError::NotACa(cert_from.to_owned()));
        }
        let now = SystemTime::now();
        if params.not_after < now || params.not_before > now {
            return Err(invalid(cert_from, "expired or not yet valid"));
        }
        let permitted = params
            .name_constraints
            .as_ref()
            .map(|c| c.permitted_subtrees.clone());
        let not_after = params.not_after.into();
        if !keys_match(&cert_der, &key) {
            let (cert, key) = (cert_from.to_owned(), key_from.to_owned());
            return Err(CaError::KeyMismatch { cert, key });
        }
        let ca = CertificateAuthority {
            issuer: params.self_signed(&key)?,
            cert_pem: pem_encode(&cert_der),
            cert_der,
            key,
            random: ring::default_provider().secure_random,
            permitted,
            not_after,
        };
        ca.self_check().map_err(|e| {
            let why = "repeated or multi-valued name attributes are not supported";
            invalid(
                cert_from,
                format!("leaves signed with it do not verify ({e}); {why}"),
            )
        })?;
        Ok(ca)
    }

    /// `issuer` is a re-encoding of the subject, and rcgen cannot reproduce every
    /// subject exactly; leaves naming a different issuer would fail every handshake.
    fn self_check(&self) -> Result<(), CaError> {
        // A name the CA may sign for, so that its own constraints do not fail the probe.
        let host = match self.permitted.as_deref().and_then(<[_]>::first) {
            Some(GeneralSubtree::DnsName(name)) => name.trim_start_matches('.').to_owned(),
            Some(GeneralSubtree::IpAddress(CidrSubnet::V4(net, _))) => {
                std::net::Ipv4Addr::from(*net).to_string()
            }
            Some(GeneralSubtree::IpAddress(CidrSubnet::V6(net, _))) => {
                std::net::Ipv6Addr::from(*net).to_string()
            }
            _ => "probe.invalid".to_owned(),
        };
        let probe = self.issue_leaf(&host, CLOCK_SKEW)?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert_der.clone())?;
        let leaf = rustls::server::ParsedCertificate::try_from(&probe.chain[0])?;
        let algs = ring::default_provider()
            .signature_verification_algorithms
            .all;
        verify_server_cert_signed_by_trust_anchor(&leaf, &roots, &[], UnixTime::now(), algs)?;
        Ok(())
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn issue_leaf(&self, host: &str, lifetime: Duration) -> Result<IssuedLeaf, CaError> {
        self.issue_leaf_at(host, lifetime, SystemTime::now())
    }

    pub(crate) fn issue_leaf_at(
        &self,
        host: &str,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<IssuedLeaf, CaError> {
        let (san, name) = subject_alt_name(host)?;
        // Certificates carry whole seconds; `not_after` must be the instant they encode.
        let now = whole_seconds(now);
        let not_after = now
            .checked_add(lifetime)
            .filter(|t| {
                !lifetime.is_zero() && *t <= UNIX_EPOCH + Duration::from_secs(LAST_X509_SECOND)
            })
            .ok_or(CaError::InvalidLifetime(lifetime))?;
        // A key per leaf: a leaked leaf key is bounded to one host and one lifetime.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![san];
        // Never an empty subject: that would need a critical SAN, which rcgen cannot mark.
        let subject = &mut params.distinguished_name;
        *subject = rcgen::DistinguishedName::new();
        subject.push(DnType::OrganizationName, "line-retry-proxy");
        if name.len() <= MAX_CN_LEN {
            subject.push(DnType::CommonName, name);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now.checked_sub(CLOCK_SKEW).unwrap_or(now).into();
        params.not_after = not_after.into();
        params.serial_number = Some(serial(self.random)?);
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        Ok(IssuedLeaf {
            chain: vec![cert.der().clone(), self.cert_der.clone()],
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            not_after,
        })
    }
}

/// The SAN for `host` and the name to put in the CN (IPv6 without brackets).
fn subject_alt_name(host: &str) -> Result<(SanType, String), CaError> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok((SanType::IpAddress(ip), ip.to_string()));
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(CaError::InvalidHost(host.to_owned()));
    }
    let dns = Ia5String::try_from(host).map_err(|_| CaError::InvalidHost(host.to_owned()))?;
    Ok((SanType::DnsName(dns), host.to_owned()))
}

/// The name constraint entry for one intercept host: the host and its subdomains, or
/// exactly that address.
fn subtree(host: &str) -> Result<GeneralSubtree, CaError> {
    let (san, _) = subject_alt_name(host.trim_end_matches('.'))?;
    Ok(match san {
        SanType::IpAddress(ip @ IpAddr::V4(_)) => {
            GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(ip, 32))
        }
        SanType::IpAddress(ip) => GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(ip, 128)),
        _ => GeneralSubtree::DnsName(host.trim_end_matches('.').to_ascii_lowercase()),
    })
}

/// Error texts are our own: a parser's could quote bytes of the key.
fn parse_key(pem: &str) -> Result<KeyPair, &'static str> {
    match rustls_pemfile::private_key(&mut pem.as_bytes()) {
        Ok(Some(PrivateKeyDer::Pkcs8(der))) => KeyPair::try_from(der.secret_pkcs8_der())
            .map_err(|_| "unsupported key (ECDSA P-256/P-384, Ed25519 or RSA expected)"),
        Ok(Some(_)) => {
            Err("the key must be PKCS#8 (convert it with `openssl pkcs8 -topk8 -nocrypt`)")
        }
        Ok(None) => Err("no unencrypted PEM private key found"),
        Err(_) => Err("unreadable PEM"),
    }
}

fn keys_match(cert: &CertificateDer<'static>, key: &KeyPair) -> bool {
    let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    ring::default_provider()
        .key_provider
        .load_private_key(der)
        .is_ok_and(|signing| {
            CertifiedKey::new(vec![cert.clone()], signing)
                .keys_match()
                .is_ok()
        })
}

pub(super) fn invalid(origin: &str, reason: impl Into<String>) -> CaError {
    CaError::Invalid(origin.to_owned(), reason.into())
}

fn serial(random: &dyn SecureRandom) -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    random.fill(&mut bytes).map_err(|_| CaError::Random)?;
    // DER integers are signed and minimal: top bit clear, next bit set keeps all 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn whole_seconds(t: SystemTime) -> SystemTime {
    t.duration_since(UNIX_EPOCH)
        .map_or(t, |d| UNIX_EPOCH + Duration::from_secs(d.as_secs()))
}

fn pem_encode(der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .flat_map(std::str::from_utf8)
        .collect();
    let body = lines.join("\n");
    format!("-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_material_is_validated() {
        let (a, b) = (
            CertificateAuthority::generate(&CaPlan::default()).unwrap(),
            CertificateAuthority::generate(&CaPlan::default()).unwrap(),
        );
        let a_key = a.key.serialize_pem();
        assert!(CertificateAuthority::from_pem(a.cert_pem(), &a_key).is_ok());
        let err = CertificateAuthority::from_pem(a.cert_pem(), &b.key.serialize_pem());
        assert!(matches!(err, Err(CaError::KeyMismatch { .. })), "{err:?}");
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["x.test".into()])
            .unwrap()
            .self_signed(&leaf_key)
            .unwrap();
        let err = CertificateAuthority::from_pem(&leaf.pem(), &leaf_key.serialize_pem());
        assert!(matches!(err, Err(CaError::NotACa(_))), "{err:?}");
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nMAA=\n-----END EC PRIVATE KEY-----\n";
        for (cert, key, says) in [
            ("garbage", &*a_key, "CA certificate: no PEM certificate"),
            (
                a.cert_pem(),
                "garbage",
                "CA key: no unencrypted PEM private key",
            ),
            (a.cert_pem(), sec1, "PKCS#8"),
        ] {
            let err = CertificateAuthority::from_pem(cert, key)
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn a_ca_made_elsewhere_still_chains() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let mut params = CertificateParams::default();
        let printable = |s: &str| rcgen::DnValue::PrintableString(s.try_into().unwrap());
        let name = &mut params.distinguished_name;
        *name = rcgen::DistinguishedName::new();
        name.push(DnType::CountryName, printable("JP"));
        name.push(DnType::CommonName, printable("Ops CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let ca = CertificateAuthority::from_pem(&cert.pem(), &key.serialize_pem()).unwrap();
        assert!(!ca.is_constrained() && ca.permits("anything.test"));
    }

    fn verify(ca: &CertificateAuthority, host: &str) -> Result<(), rustls::Error> {
        let leaf = ca.issue_leaf(host, Duration::from_secs(3600)).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let parsed = rustls::server::ParsedCertificate::try_from(&leaf.chain[0]).unwrap();
        let algs = ring::default_provider()
            .signature_verification_algorithms
            .all;
        verify_server_cert_signed_by_trust_anchor(&parsed, &roots, &[], UnixTime::now(), algs)
    }

    #[test]
    fn a_new_ca_signs_only_for_the_intercept_hosts_and_lives_a_year() {
        let plan = CaPlan {
            hosts: vec!["api.line.me".into(), "127.0.0.1".into()],
            ..CaPlan::default()
        };
        let ca = CertificateAuthority::generate(&plan).unwrap();
        verify(&ca, "api.line.me").unwrap();
        verify(&ca, "127.0.0.1").unwrap();
        for other in [
            "example.com",
            "api.line.me.evil.test",
            "line.me",
            "127.0.0.2",
        ] {
            let err = verify(&ca, other).unwrap_err();
            assert!(
                format!("{err:?}").contains("NameConstraint"),
                "{other}: {err:?}"
            );
            assert!(!ca.permits(other), "{other}");
        }
        assert!(
            ca.permits("API.LINE.ME") && ca.permits("x.api.line.me") && ca.permits("127.0.0.1")
        );
        let life = ca.not_after().duration_since(SystemTime::now()).unwrap();
        assert!(
            life <= DEFAULT_CA_LIFETIME && life > DEFAULT_CA_LIFETIME - Duration::from_secs(60)
        );
        // Loaded again, the constraint is read back, not lost.
        let loaded =
            CertificateAuthority::from_pem(ca.cert_pem(), &ca.key.serialize_pem()).unwrap();
        assert!(loaded.is_constrained() && !loaded.permits("example.com"));
    }

    #[test]
    fn leaves_have_their_own_key_and_chain_to_the_ca() {
        let plan = CaPlan {
            hosts: ["api.line.me", "127.0.0.1", "::1", "x_y.test", "example"]
                .map(String::from)
                .to_vec(),
            ..CaPlan::default()
        };
        let ca = CertificateAuthority::generate(&plan).unwrap();
        let hour = Duration::from_secs(3600);
        let before = SystemTime::now();
        let a = ca.issue_leaf("api.line.me", hour).unwrap();
        let b = ca.issue_leaf("api.line.me", hour).unwrap();
        assert_eq!((a.chain.len(), &a.chain[1]), (2, ca.cert_der()));
        assert_ne!(a.key.secret_der(), b.key.secret_der());
        assert!(a.not_after > before + hour - Duration::from_secs(1));
        assert!(a.not_after <= SystemTime::now() + hour);
        let long = format!("{}.example", "a".repeat(60));
        for host in ["127.0.0.1", "[::1]", "::1", "x_y.test", &long] {
            ca.issue_leaf(host, hour).unwrap();
        }
    }

    #[test]
    fn bad_hosts_and_lifetimes_are_errors_not_panics() {
        let ca = CertificateAuthority::generate(&CaPlan::default()).unwrap();
        let hour = Duration::from_secs(3600);
        for host in [
            "",
            "api.line.me:443",
            "a..b",
            "a.b.",
            "a b",
            "bücher.de",
            "fe80::1%eth0",
        ] {
            let err = ca.issue_leaf(host, hour);
            assert!(matches!(err, Err(CaError::InvalidHost(_))), "{host}");
        }
        for lifetime in [
            Duration::ZERO,
            Duration::MAX,
            Duration::from_secs(9000 * 365 * 86400),
        ] {
            let err = ca.issue_leaf("api.line.me", lifetime);
            assert!(
                matches!(err, Err(CaError::InvalidLifetime(_))),
                "{lifetime:?}"
            );
        }
    }
}
