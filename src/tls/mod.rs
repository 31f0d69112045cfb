//! TLS on both sides: the intercept CA and its per-host leaves (bot side), and the
//! verified, pooled client (LINE side).

pub mod ca;
pub mod leaf;
pub mod upstream;
