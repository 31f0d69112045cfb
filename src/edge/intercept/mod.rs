//! Interception of CONNECT tunnels to LINE's hosts: the proxy's own CA ([`ca`]), kept
//! in the CA directory by [`ca_dir`], its material checked by [`material`], limited by
//! its name constraint ([`constraints`]); the certificates it makes ([`issue`]) and the
//! per-host leaf configs, cached ([`leaf`]); and the trust bundle bots are given
//! ([`bundle`]).

pub mod bundle;
pub mod ca;
pub mod ca_dir;
mod constraints;
mod error;
mod issue;
pub(crate) mod leaf;
mod material;
