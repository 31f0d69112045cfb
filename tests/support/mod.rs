#![allow(dead_code)]

pub mod mock_line;
pub mod pki;
pub mod proxy;
pub mod tunnel;
