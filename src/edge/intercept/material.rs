//! Operator material: a CA certificate and key in PEM, as the CA directory holds them,
//! checked before use. The certificate must be a CA's, valid now, and the key its
//! own; and leaves signed with it must verify against it, since rcgen re-encodes the
//! subject it names as their issuer. Error texts are the proxy's own: a parser's
//! could quote bytes of the key.

use std::time::SystemTime;

use rcgen::{CertificateParams, IsCa, KeyPair};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::ring;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::sign::CertifiedKey;

use super::constraints::Permitted;
use super::error::CaError;
use super::issue::{Signer, CLOCK_SKEW};

/// A CA's parts, read from PEM and checked.
pub(super) struct Checked {
    pub(super) signer: Signer,
    pub(super) permitted: Permitted,
    pub(super) not_after: SystemTime,
}

/// Checks `cert_pem` and `key_pem`, named in errors as `cert_from` and `key_from`.
/// They go through rcgen's certificate parser, which panics on some malformed names
/// (an empty RDN set): that must be a clear error, not a crash.
pub(super) fn check(
    cert_pem: &str,
    key_pem: &str,
    cert_from: &str,
    key_from: &str,
) -> Result<Checked, CaError> {
    std::panic::catch_unwind(|| check_unguarded(cert_pem, key_pem, cert_from, key_from))
        .unwrap_or_else(|_| Err(invalid(cert_from, "a certificate the parser cannot handle")))
}

fn check_unguarded(
    cert_pem: &str,
    key_pem: &str,
    cert_from: &str,
    key_from: &str,
) -> Result<Checked, CaError> {
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
    if !keys_match(&cert_der, &key) {
        let (cert, key) = (cert_from.to_owned(), key_from.to_owned());
        return Err(CaError::KeyMismatch { cert, key });
    }
    let permitted = Permitted::of(&params);
    let not_after = params.not_after.into();
    let issuer = params.self_signed(&key)?;
    let random = ring::default_provider().secure_random;
    let checked = Checked {
        signer: Signer::new(issuer, key, cert_der, random),
        permitted,
        not_after,
    };
    leaves_verify(&checked).map_err(|e| {
        let why = "repeated or multi-valued name attributes are not supported";
        invalid(
            cert_from,
            format!("leaves signed with it do not verify ({e}); {why}"),
        )
    })?;
    Ok(checked)
}

/// The signer's issuer is a re-encoding of the subject, and rcgen cannot reproduce
/// every subject exactly; leaves naming a different issuer would fail every handshake.
fn leaves_verify(ca: &Checked) -> Result<(), CaError> {
    // A name the CA may sign for, so that its own constraints do not fail the probe.
    let host = ca.permitted.probe_host();
    let probe = ca.signer.issue_leaf(&host, CLOCK_SKEW, SystemTime::now())?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.signer.cert_der().clone())?;
    let leaf = rustls::server::ParsedCertificate::try_from(&probe.chain[0])?;
    let algs = ring::default_provider()
        .signature_verification_algorithms
        .all;
    verify_server_cert_signed_by_trust_anchor(&leaf, &roots, &[], UnixTime::now(), algs)?;
    Ok(())
}

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

fn invalid(origin: &str, reason: impl Into<String>) -> CaError {
    CaError::Invalid(origin.to_owned(), reason.into())
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, DnType};

    use super::*;
    use crate::edge::intercept::ca::{CaPlan, CertificateAuthority};

    #[test]
    fn operator_material_is_validated() {
        let (a, b) = (
            CertificateAuthority::generate(&CaPlan::default()).unwrap(),
            CertificateAuthority::generate(&CaPlan::default()).unwrap(),
        );
        let a_key = a.key_pem();
        assert!(CertificateAuthority::from_pem(a.cert_pem(), &a_key).is_ok());
        let err = CertificateAuthority::from_pem(a.cert_pem(), &b.key_pem());
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
}
