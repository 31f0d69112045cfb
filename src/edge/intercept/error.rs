//! What can go wrong with the intercept CA: its directory, its material, the leaves
//! it signs.

use std::path::PathBuf;
use std::time::Duration;

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
