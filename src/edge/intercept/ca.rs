//! The intercept CA: loaded from `--ca-dir` (`ca.pem`, `ca.key`, see [`super::ca_dir`])
//! or created there on first use. It signs a short-lived leaf, with a key of its own,
//! per intercepted host ([`super::issue`]).
//!
//! Whoever holds `ca.key` could impersonate any site to a process that trusts
//! `ca.pem`, so a CA made here is limited twice: a name constraint names the intercept
//! hosts as the only names it may sign for ([`super::constraints`]), and it lives a
//! year by default (`ca-lifetime`), to be replaced with `line-retry-proxy ca --renew`.
//! A CA made before (without a constraint, or by the operator) is loaded as it is,
//! once its material is checked ([`super::material`]), and keeps working.

use std::fmt;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::crypto::ring;

use super::constraints::Permitted;
pub(crate) use super::error::CaError;
pub(crate) use super::issue::IssuedLeaf;
use super::issue::{serial, Signer, Validity};
use super::material;

/// The default lifetime of a CA made here: a year (as `1year` spells it, 365.25 days).
pub(crate) const DEFAULT_CA_LIFETIME: Duration = Duration::from_secs(31_557_600);

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
    cert_pem: String,
    signer: Signer,
    permitted: Permitted,
    not_after: SystemTime,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("key", &"***")
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    fn new(signer: Signer, permitted: Permitted, not_after: SystemTime) -> Self {
        CertificateAuthority {
            cert_pem: pem_encode(signer.cert_der()),
            signer,
            permitted,
            not_after,
        }
    }

    /// A new CA held in memory only, constrained to `plan.hosts`.
    pub(crate) fn generate(plan: &CaPlan) -> Result<Self, CaError> {
        let random = ring::default_provider().secure_random;
        let permitted = Permitted::only(&plan.hosts)?;
        let validity = Validity::starting(SystemTime::now(), plan.lifetime)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.name_constraints = permitted.name_constraints();
        let name = &mut params.distinguished_name;
        name.push(DnType::CommonName, "line-retry-proxy intercept CA");
        name.push(DnType::OrganizationName, "line-retry-proxy");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity.apply(&mut params);
        params.serial_number = Some(serial(random)?);
        let issuer = params.self_signed(&key)?;
        let cert_der = issuer.der().clone();
        let signer = Signer::new(issuer, key, cert_der, random);
        Ok(Self::new(signer, permitted, validity.not_after))
    }

    /// The CA in `cert_pem` and `key_pem`, once checked; errors name them `cert_from`
    /// and `key_from` (their paths).
    pub(super) fn from_material(
        cert_pem: &str,
        key_pem: &str,
        cert_from: &str,
        key_from: &str,
    ) -> Result<Self, CaError> {
        let checked = material::check(cert_pem, key_pem, cert_from, key_from)?;
        Ok(Self::new(
            checked.signer,
            checked.permitted,
            checked.not_after,
        ))
    }

    /// Whether leaves this CA signs for `host` pass its name constraints.
    pub fn permits(&self, host: &str) -> bool {
        self.permitted.permits(host)
    }

    /// Whether the CA carries a name constraint at all.
    pub(crate) fn is_constrained(&self) -> bool {
        self.permitted.is_constrained()
    }

    /// The end of the CA's validity: renew before it.
    pub(crate) fn not_after(&self) -> SystemTime {
        self.not_after
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    #[cfg(test)]
    pub(crate) fn cert_der(&self) -> &rustls::pki_types::CertificateDer<'static> {
        self.signer.cert_der()
    }

    /// The CA's key in PEM, for the CA directory to write.
    pub(super) fn key_pem(&self) -> String {
        self.signer.key_pem()
    }

    #[cfg(test)]
    pub(crate) fn issue_leaf(&self, host: &str, lifetime: Duration) -> Result<IssuedLeaf, CaError> {
        self.issue_leaf_at(host, lifetime, SystemTime::now())
    }

    pub(crate) fn issue_leaf_at(
        &self,
        host: &str,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<IssuedLeaf, CaError> {
        self.signer.issue_leaf(host, lifetime, now)
    }
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
impl CertificateAuthority {
    /// Material given as text, named in errors as the CA certificate and the CA key.
    pub(super) fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        Self::from_material(cert_pem, key_pem, "CA certificate", "CA key")
    }
}
