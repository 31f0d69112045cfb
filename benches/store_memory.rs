//! Memory per stored answer: fills the in-memory store with N accepted push answers
//! (a typical 64-byte body) and prints the resident-set growth per entry.
//! Run: cargo bench --bench store_memory [-- N]

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use line_retry_proxy::domain::{Answer, Fingerprint, Outcome, RetryKey, TokenTag};
use line_retry_proxy::store::memory::MemoryStore;
use line_retry_proxy::store::{Claim, ClaimRequest, Store};

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages");
    pages * 4096
}

fn answer(i: u64) -> Arc<Answer> {
    let body = format!(
        "{{\"sentMessages\":[{{\"id\":\"{:018}\",\"quoteToken\":\"q{:08}\"}}]}}",
        i,
        i % 1_0000_0000
    );
    Arc::new(Answer {
        status: StatusCode::OK,
        headers: Box::new([
            (
                HeaderName::from_static("content-type"),
                HeaderValue::from_static("application/json"),
            ),
            (
                HeaderName::from_static("x-line-request-id"),
                HeaderValue::from_bytes(format!("{:08x}-1111-4222-8333-{:012x}", i, i).as_bytes())
                    .expect("ascii"),
            ),
        ]),
        body: Bytes::copy_from_slice(body.as_bytes()),
        key: RetryKey::Derived(uuid::Uuid::from_u128(u128::from(i))),
        outcome: Outcome::Fresh,
        attempts: 1,
        upstream_status: Some(StatusCode::OK),
        owner: Some(TokenTag([1; 16])),
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(500_000);
    let store = MemoryStore::new(1 << 34);
    let body_len = answer(0).body.len() as u64;
    let before = rss_bytes();
    for i in 0..n {
        let mut fp = [0u8; 32];
        fp[..8].copy_from_slice(&i.to_le_bytes());
        fp[8..16].copy_from_slice(&(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes());
        let claim = ClaimRequest {
            fp: Fingerprint(fp),
            lease: Duration::from_secs(60),
            window: Duration::from_secs(24 * 3600),
            now: std::time::SystemTime::now(),
        };
        match store.claim(claim).await {
            Ok(Claim::Owner { ticket, .. }) => {
                let _ = ticket.publish(answer(i), true).await;
            }
            _ => panic!("every fingerprint is new"),
        }
    }
    let stats = store.stats();
    let grown = rss_bytes().saturating_sub(before);
    println!("entries            {}", stats.entries);
    println!("size_of Answer     {}", std::mem::size_of::<Answer>());
    println!("body bytes/entry   {body_len}");
    println!("weighed bytes/entry {}", stats.bytes / stats.entries.max(1));
    println!("rss bytes/entry    {}", grown / n);
    println!(
        "rss over body      {} (DESIGN bar: 512)",
        (grown / n).saturating_sub(body_len)
    );
}
