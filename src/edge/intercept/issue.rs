//! Certificates the proxy makes: the validity, serial and names of its CA's own and of
//! every leaf, and the signing of a leaf, with a key of its own, for one intercepted
//! host.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, Ia5String, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::crypto::SecureRandom;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::error::CaError;

/// Clocks disagree; a certificate valid only from "now" fails on a bot running behind.
pub(super) const CLOCK_SKEW: Duration = Duration::from_secs(3600);
/// 9999-12-31T23:59:59Z, the last instant X.509 can encode; later ones panic in `time`.
const LAST_X509_SECOND: u64 = 253_402_300_799;
/// RFC 5280's upper bound for a common name; longer names go in the SAN only.
const MAX_CN_LEN: usize = 64;

pub(crate) struct IssuedLeaf {
    /// Leaf first, then the CA.
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
    pub(crate) not_after: SystemTime,
}

/// When a certificate made now is valid: from [`CLOCK_SKEW`] before `now` to its
/// lifetime after, in the whole seconds certificates carry.
pub(super) struct Validity {
    not_before: SystemTime,
    /// The instant the certificate encodes as its end.
    pub(super) not_after: SystemTime,
}

impl Validity {
    /// A positive `lifetime` from `now`, ending no later than X.509 can encode.
    pub(super) fn starting(now: SystemTime, lifetime: Duration) -> Result<Self, CaError> {
        let now = whole_seconds(now);
        let not_after = now
            .checked_add(lifetime)
            .filter(|t| {
                !lifetime.is_zero() && *t <= UNIX_EPOCH + Duration::from_secs(LAST_X509_SECOND)
            })
            .ok_or(CaError::InvalidLifetime(lifetime))?;
        Ok(Validity {
            not_before: now.checked_sub(CLOCK_SKEW).unwrap_or(now),
            not_after,
        })
    }

    pub(super) fn apply(&self, params: &mut CertificateParams) {
        params.not_before = self.not_before.into();
        params.not_after = self.not_after.into();
    }
}

/// What signs leaves: the CA's certificate as rcgen re-made it (it signs with a
/// `Certificate`, not DER), the CA's key, and the CA's own DER the leaves chain to.
pub(super) struct Signer {
    /// Re-made from `cert_der`'s subject and key identifier, so leaves name the
    /// original as their issuer.
    issuer: Certificate,
    key: KeyPair,
    cert_der: CertificateDer<'static>,
    random: &'static dyn SecureRandom,
}

impl Signer {
    pub(super) fn new(
        issuer: Certificate,
        key: KeyPair,
        cert_der: CertificateDer<'static>,
        random: &'static dyn SecureRandom,
    ) -> Self {
        Signer {
            issuer,
            key,
            cert_der,
            random,
        }
    }

    pub(super) fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA's key in PEM, to be written to the CA directory.
    pub(super) fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A leaf for `host`, valid for `lifetime` from `now`.
    pub(super) fn issue_leaf(
        &self,
        host: &str,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<IssuedLeaf, CaError> {
        let (san, name) = subject_alt_name(host)?;
        let validity = Validity::starting(now, lifetime)?;
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
        validity.apply(&mut params);
        params.serial_number = Some(serial(self.random)?);
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        Ok(IssuedLeaf {
            chain: vec![cert.der().clone(), self.cert_der.clone()],
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            not_after: validity.not_after,
        })
    }
}

/// The SAN for `host` and the name to put in the CN (IPv6 without brackets).
pub(super) fn subject_alt_name(host: &str) -> Result<(SanType, String), CaError> {
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

pub(super) fn serial(random: &dyn SecureRandom) -> Result<SerialNumber, CaError> {
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

#[cfg(test)]
mod tests {
    use crate::edge::intercept::ca::{CaPlan, CertificateAuthority};

    use super::*;

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
