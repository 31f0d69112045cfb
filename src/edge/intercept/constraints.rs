//! The CA's name constraint: the names a CA made here may sign for (the intercept
//! hosts and their subdomains), and whether a host is one of them. Clients that verify
//! with webpki, OpenSSL, Go or Node refuse any other leaf it signs; a CA without a
//! constraint (made before, or by the operator) may sign for any name.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rcgen::{CertificateParams, CidrSubnet, GeneralSubtree, NameConstraints, SanType};

use super::error::CaError;
use super::issue::subject_alt_name;

/// The names a CA may sign for; `None`: any.
pub(super) struct Permitted(Option<Vec<GeneralSubtree>>);

impl Permitted {
    /// Only `hosts`: each name and its subdomains, each address exactly.
    pub(super) fn only(hosts: &[String]) -> Result<Self, CaError> {
        let subtrees = hosts
            .iter()
            .map(|h| subtree(h))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Permitted(Some(subtrees)))
    }

    /// What a CA certificate's own constraint permits.
    pub(super) fn of(params: &CertificateParams) -> Self {
        let subtrees = params
            .name_constraints
            .as_ref()
            .map(|c| c.permitted_subtrees.clone());
        Permitted(subtrees)
    }

    /// The constraint to write into a CA certificate.
    pub(super) fn name_constraints(&self) -> Option<NameConstraints> {
        self.0.as_ref().map(|subtrees| NameConstraints {
            permitted_subtrees: subtrees.clone(),
            excluded_subtrees: Vec::new(),
        })
    }

    pub(super) fn is_constrained(&self) -> bool {
        self.0.is_some()
    }

    /// Whether leaves signed for `host` pass the constraint.
    pub(super) fn permits(&self, host: &str) -> bool {
        let Some(permitted) = &self.0 else {
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

    /// A name the constraint permits, for a probe leaf that must not fail on it.
    pub(super) fn probe_host(&self) -> String {
        match self.0.as_deref().and_then(<[_]>::first) {
            Some(GeneralSubtree::DnsName(name)) => name.trim_start_matches('.').to_owned(),
            Some(GeneralSubtree::IpAddress(CidrSubnet::V4(net, _))) => {
                Ipv4Addr::from(*net).to_string()
            }
            Some(GeneralSubtree::IpAddress(CidrSubnet::V6(net, _))) => {
                Ipv6Addr::from(*net).to_string()
            }
            _ => "probe.invalid".to_owned(),
        }
    }
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use rustls::client::verify_server_cert_signed_by_trust_anchor;
    use rustls::crypto::ring;
    use rustls::pki_types::UnixTime;

    use crate::edge::intercept::ca::{CaPlan, CertificateAuthority, DEFAULT_CA_LIFETIME};

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
        let loaded = CertificateAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert!(loaded.is_constrained() && !loaded.permits("example.com"));
    }
}
