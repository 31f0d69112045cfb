//! The trust bundle for bots (`ca --bundle`): the system's roots and the proxy's CA in
//! one PEM file. `REQUESTS_CA_BUNDLE` and `SSL_CERT_FILE` replace a client's roots
//! rather than add to them, so the proxy's CA alone would break every other HTTPS
//! call the bot makes, tunnelled hosts such as api-data.line.me included.

use std::path::{Path, PathBuf};

/// Where distributions keep the system roots as one PEM file: Debian, Ubuntu and
/// distroless; Fedora and RHEL; openSUSE; Alpine.
pub(crate) const SYSTEM_ROOTS: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The system roots file: `explicit` if given, else the first of [`SYSTEM_ROOTS`]
/// that exists. Returns its path and text.
pub fn system_roots(explicit: Option<&Path>) -> Result<(PathBuf, String), String> {
    let path = match explicit {
        Some(path) => path.to_owned(),
        None => SYSTEM_ROOTS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or_else(|| {
                format!(
                    "no system CA bundle in {}: name one with --system-roots",
                    SYSTEM_ROOTS.join(", ")
                )
            })?,
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("system roots {}: {e}", path.display()))?;
    Ok((path, text))
}

/// Every certificate of `sources`, in order, each once, as PEM blocks and nothing
/// else (no comments, no other kinds of block).
pub fn bundle<'a>(sources: impl IntoIterator<Item = &'a str>) -> String {
    let mut seen = std::collections::HashSet::new();
    let mut out = String::new();
    for source in sources {
        for block in certificates(source) {
            // The same certificate with other line breaks is still the same.
            let body: String = block.iter().flat_map(|l| l.chars()).collect();
            if seen.insert(body) {
                for line in block {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
    }
    out
}

/// How many certificates a PEM text holds.
pub fn count(pem: &str) -> usize {
    certificates(pem).len()
}

/// The `CERTIFICATE` blocks of a PEM text, as trimmed lines; an unterminated block
/// is dropped.
fn certificates(pem: &str) -> Vec<Vec<&str>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in pem.lines().map(str::trim) {
        match (&mut current, line) {
            (_, "-----BEGIN CERTIFICATE-----") => current = Some(vec![line]),
            (Some(block), "-----END CERTIFICATE-----") => {
                block.push(line);
                blocks.extend(current.take());
            }
            (Some(_), l) if l.starts_with("-----") => current = None,
            (Some(block), l) if !l.is_empty() => block.push(l),
            _ => {}
        }
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "-----BEGIN CERTIFICATE-----\nAAAA\nBBBB\n-----END CERTIFICATE-----\n";
    const B: &str = "-----BEGIN CERTIFICATE-----\nCCCC\n-----END CERTIFICATE-----\n";

    #[test]
    fn certificates_once_each_and_nothing_else() {
        let system = format!("# Issuer: someone\n{A}\r\n# another\n{B}");
        let ours = "-----BEGIN CERTIFICATE-----\r\nAAAA\r\nBBBB\r\n-----END CERTIFICATE-----\r\n";
        assert_eq!(bundle([system.as_str(), ours]), format!("{A}{B}"));
        let key = "-----BEGIN PRIVATE KEY-----\nKKKK\n-----END PRIVATE KEY-----\n";
        assert_eq!(bundle([key, B]), B, "never a key");
        let cut = "-----BEGIN CERTIFICATE-----\nDDDD\n";
        assert_eq!(bundle([cut, B]), B, "an unterminated block is dropped");
        let interrupted = format!("-----BEGIN CERTIFICATE-----\nDDDD\n{B}");
        assert_eq!(bundle([interrupted.as_str()]), B);
        assert_eq!(count(&format!("{A}{B}")), 2);
    }
}
