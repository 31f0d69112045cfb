// placeholder until the leaf module lands
use std::sync::Arc;
use super::ca::{CaError, CertificateAuthority};
pub struct LeafCache;
impl LeafCache {
    pub fn new(_ca: Arc<CertificateAuthority>, _l: std::time::Duration, _m: u64) -> Self { LeafCache }
    pub fn server_config(&self, _host: &str) -> Result<Arc<rustls::ServerConfig>, CaError> { Err(CaError) }
    pub fn len(&self) -> u64 { 0 }
}
