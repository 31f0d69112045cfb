//! Interception of CONNECT tunnels to LINE's hosts: the proxy's own CA ([`ca`], kept
//! in the CA directory by [`ca_dir`]) and the per-host leaf certificates it issues
//! ([`leaf`]), cached; and the trust bundle bots are given ([`bundle`]).

pub mod bundle;
pub mod ca;
pub mod ca_dir;
pub mod leaf;
