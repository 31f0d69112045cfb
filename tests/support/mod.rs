#![allow(dead_code)]

pub mod mock_line;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod tunnel;
