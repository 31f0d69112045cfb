//! An answer as the stores keep it: compact, versioned, and read back without trust.
//! The memory store holds one such record per answer; Redis holds it as a string value.
//!
//! ```text
//! <first seen, ms since the epoch, ASCII> ':'   read by Redis' claim script for the window
//! version u8 | status u16 | outcome u8 | attempts u16 | upstream status u16 (0: none)
//! owner:   0 (none) | 1, 16 bytes (the token tag the answer is replayed to); since v2
//! key:     0, 16 bytes (derived UUID)  |  1, len u16, bytes (the bot's own)
//! headers: count u8, then per header: name (index u8 into KNOWN, or 0, len u8, bytes),
//!          value (0, len u16, bytes | 1, 16 bytes: a lower-case UUID, as LINE's request
//!          ids are | 2: application/json)
//! body:    the rest
//! ```
//! Integers are big-endian. Decoding checks every length and every value and returns
//! `None` for anything else: bytes in a shared Redis are input like any other.
//! A version 1 record (written before answers knew their token) reads back with no
//! owner, so it is replayed to no one and its send goes to LINE under its key again.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderName, HeaderValue, StatusCode};
use uuid::Uuid;

use crate::domain::{Answer, Outcome, RetryKey, TokenTag};

const VERSION: u8 = 2;
/// Records without an owner; still read.
const VERSION_WITHOUT_OWNER: u8 = 1;

/// The headers LINE's answers carry, stored as one byte each (index + 1).
const KNOWN: [HeaderName; 5] = [
    CONTENT_TYPE,
    HeaderName::from_static("x-line-request-id"),
    HeaderName::from_static("x-line-accepted-request-id"),
    RETRY_AFTER,
    HeaderName::from_static("x-line-retry-proxy-error"),
];

/// Milliseconds since the epoch, the unit of every time the scripts compare.
pub(crate) fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn from_unix_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

pub(crate) fn encode(first_seen: SystemTime, answer: &Answer) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + answer.body.len());
    out.extend_from_slice(unix_millis(first_seen).to_string().as_bytes());
    out.push(b':');
    out.push(VERSION);
    out.extend_from_slice(&answer.status.as_u16().to_be_bytes());
    out.push(answer.outcome.index() as u8);
    out.extend_from_slice(
        &u16::try_from(answer.attempts)
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(
        &answer
            .upstream_status
            .map_or(0, |s| s.as_u16())
            .to_be_bytes(),
    );
    match &answer.owner {
        Some(tag) => {
            out.push(1);
            out.extend_from_slice(&tag.0);
        }
        None => out.push(0),
    }
    match &answer.key {
        RetryKey::Derived(uuid) => {
            out.push(0);
            out.extend_from_slice(uuid.as_bytes());
        }
        RetryKey::Client(value) => {
            out.push(1);
            put_u16_bytes(&mut out, value.as_bytes());
        }
    }
    // Settle keeps a handful of headers; a count past u8 would be a bug, not input.
    let headers = &answer.headers[..answer.headers.len().min(usize::from(u8::MAX))];
    out.push(headers.len() as u8);
    for (name, value) in headers {
        match KNOWN.iter().position(|k| k == name) {
            Some(i) => out.push(i as u8 + 1),
            None => {
                let name = name.as_str().as_bytes();
                let name = &name[..name.len().min(usize::from(u8::MAX))];
                out.push(0);
                out.push(name.len() as u8);
                out.extend_from_slice(name);
            }
        }
        put_value(&mut out, value);
    }
    out.extend_from_slice(&answer.body);
    out
}

const JSON: &str = "application/json";

fn put_value(out: &mut Vec<u8>, value: &HeaderValue) {
    if value == JSON {
        out.push(2);
        return;
    }
    // Only a UUID that reads back to the very same text is packed.
    let uuid = std::str::from_utf8(value.as_bytes())
        .ok()
        .and_then(|text| Uuid::try_parse(text).ok().filter(|u| same_text(u, text)));
    match uuid {
        Some(uuid) => {
            out.push(1);
            out.extend_from_slice(uuid.as_bytes());
        }
        None => {
            out.push(0);
            put_u16_bytes(out, value.as_bytes());
        }
    }
}

fn same_text(uuid: &Uuid, text: &str) -> bool {
    let mut buf = Uuid::encode_buffer();
    uuid.hyphenated().encode_lower(&mut buf) == text
}

fn value(r: &mut Reader<'_>) -> Option<HeaderValue> {
    match r.u8()? {
        0 => {
            let len = usize::from(r.u16()?);
            HeaderValue::from_bytes(r.take(len)?).ok()
        }
        1 => {
            let uuid = Uuid::from_slice(r.take(16)?).ok()?;
            let mut buf = Uuid::encode_buffer();
            HeaderValue::from_str(uuid.hyphenated().encode_lower(&mut buf)).ok()
        }
        2 => Some(HeaderValue::from_static(JSON)),
        _ => None,
    }
}

fn put_u16_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let bytes = &bytes[..bytes.len().min(usize::from(u16::MAX))];
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The record's first sighting and its answer, or `None` if the bytes are not a
/// record this version wrote.
pub(crate) fn decode(record: &[u8]) -> Option<(SystemTime, Answer)> {
    let colon = record.iter().position(|&b| b == b':')?;
    let first_seen = std::str::from_utf8(&record[..colon]).ok()?.parse().ok()?;
    let mut r = Reader(&record[colon + 1..]);
    let version = r.u8()?;
    if version != VERSION && version != VERSION_WITHOUT_OWNER {
        return None;
    }
    let status = StatusCode::from_u16(r.u16()?).ok()?;
    let outcome = *Outcome::ALL.get(usize::from(r.u8()?))?;
    let attempts = u32::from(r.u16()?);
    let upstream_status = match r.u16()? {
        0 => None,
        s => Some(StatusCode::from_u16(s).ok()?),
    };
    let owner = match version {
        VERSION_WITHOUT_OWNER => None,
        _ => match r.u8()? {
            0 => None,
            1 => Some(TokenTag(r.take(16)?.try_into().ok()?)),
            _ => return None,
        },
    };
    let key = match r.u8()? {
        0 => RetryKey::Derived(Uuid::from_slice(r.take(16)?).ok()?),
        1 => {
            let len = usize::from(r.u16()?);
            RetryKey::Client(HeaderValue::from_bytes(r.take(len)?).ok()?)
        }
        _ => return None,
    };
    let count = r.u8()?;
    let mut headers = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let name = match r.u8()? {
            0 => {
                let len = usize::from(r.u8()?);
                HeaderName::from_bytes(r.take(len)?).ok()?
            }
            i => KNOWN.get(usize::from(i) - 1)?.clone(),
        };
        headers.push((name, value(&mut r)?));
    }
    let answer = Answer {
        status,
        headers: headers.into_boxed_slice(),
        body: Bytes::copy_from_slice(r.0),
        key,
        outcome,
        attempts,
        upstream_status,
        owner,
    };
    Some((from_unix_millis(first_seen), answer))
}

/// A cursor whose every read is checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn push_answer() -> Answer {
        Answer {
            status: StatusCode::OK,
            headers: Box::new([
                (CONTENT_TYPE, HeaderValue::from_static("application/json")),
                (
                    HeaderName::from_static("x-line-request-id"),
                    HeaderValue::from_static("0cbd9e6f-2a8f-4e3e-8f1b-3c1f0c5f2a11"),
                ),
                (
                    HeaderName::from_static("x-something-else"),
                    HeaderValue::from_static("kept too"),
                ),
            ]),
            body: Bytes::from_static(
                br#"{"sentMessages":[{"id":"461230966842064897","quoteToken":"IStG5h1Tz7b"}]}"#,
            ),
            key: RetryKey::Derived(Uuid::from_u128(0x1234_5678_9abc_def0_1234_5678_9abc_def0)),
            outcome: Outcome::ConflictResolved,
            attempts: 3,
            upstream_status: Some(StatusCode::CONFLICT),
            owner: Some(TokenTag([7; 16])),
        }
    }

    fn same(a: &Answer, b: &Answer) {
        assert_eq!(a.status, b.status);
        assert_eq!(a.headers, b.headers);
        assert_eq!(a.body, b.body);
        assert_eq!(a.key, b.key);
        assert_eq!(a.outcome, b.outcome);
        assert_eq!(a.attempts, b.attempts);
        assert_eq!(a.upstream_status, b.upstream_status);
        assert_eq!(a.owner, b.owner);
    }

    #[test]
    fn round_trips_with_its_first_sighting() {
        let seen = from_unix_millis(1_700_000_000_123);
        let answer = push_answer();
        let record = encode(seen, &answer);
        assert!(
            record.starts_with(b"1700000000123:"),
            "the script reads this"
        );
        let (back_seen, back) = decode(&record).unwrap();
        assert_eq!(back_seen, seen);
        same(&back, &answer);

        let mut client = push_answer();
        client.key = RetryKey::Client(HeaderValue::from_static("the-bots-own-key"));
        client.upstream_status = None;
        client.headers = Box::new([]);
        client.body = Bytes::new();
        client.owner = None;
        same(&decode(&encode(seen, &client)).unwrap().1, &client);
    }

    /// Written by the version before owners: byte for byte what it wrote for
    /// [`push_answer`] with its headers cut to two.
    #[test]
    fn a_version_1_record_reads_back_with_no_owner() {
        let mut answer = push_answer();
        answer.headers = answer.headers[..2].into();
        let v2 = encode(from_unix_millis(1_700_000_000_123), &answer);
        let colon = v2.iter().position(|&b| b == b':').unwrap();
        // v1: the same bytes with version 1 and no owner field, which follows the
        // version byte and the 7 bytes of status, outcome, attempts and upstream status.
        let mut v1 = v2[..colon + 1].to_vec();
        v1.push(VERSION_WITHOUT_OWNER);
        v1.extend_from_slice(&v2[colon + 2..colon + 9]);
        v1.extend_from_slice(&v2[colon + 9 + 17..]);
        let (_, back) = decode(&v1).expect("a version 1 record is read");
        assert_eq!(back.owner, None);
        assert_eq!(back.key, answer.key);
        assert_eq!(back.body, answer.body);
        assert_eq!(back.headers, answer.headers);
    }

    #[test]
    fn a_push_answer_is_small() {
        let mut answer = push_answer();
        answer.headers = answer.headers[..2].into();
        let overhead = encode(SystemTime::now(), &answer).len() - answer.body.len();
        // 14 for the time, 8 fixed, 17 for the owner, 17 for the key, 21 for both headers.
        assert!(overhead <= 80, "{overhead} bytes beside the body");
    }

    #[test]
    fn only_exact_uuids_are_packed() {
        for text in [
            "0cbd9e6f-2a8f-4e3e-8f1b-3c1f0c5f2a11",
            "0CBD9E6F-2A8F-4E3E-8F1B-3C1F0C5F2A11",
            "0cbd9e6f2a8f4e3e8f1b3c1f0c5f2a11",
            "{0cbd9e6f-2a8f-4e3e-8f1b-3c1f0c5f2a11}",
            "application/json; charset=utf-8",
        ] {
            let mut answer = push_answer();
            answer.headers = Box::new([(
                HeaderName::from_static("x-line-request-id"),
                HeaderValue::from_str(text).unwrap(),
            )]);
            let (_, back) = decode(&encode(SystemTime::now(), &answer)).unwrap();
            assert_eq!(back.headers[0].1, text);
        }
    }

    #[test]
    fn every_truncation_and_bad_version_is_refused() {
        let record = encode(SystemTime::now(), &push_answer());
        let body_at = record.len() - push_answer().body.len();
        for cut in 0..body_at {
            assert!(decode(&record[..cut]).is_none(), "cut at {cut}");
        }
        let colon = record.iter().position(|&b| b == b':').unwrap();
        let mut other = record.clone();
        other[colon + 1] = VERSION + 1;
        assert!(decode(&other).is_none());
        other[colon + 1] = 0;
        assert!(decode(&other).is_none());
        assert!(decode(b"").is_none());
        assert!(decode(b"x:").is_none());
        assert!(decode(b"99999999999999999999999:\x01").is_none());
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes: Vec<u8>, seen in 0u64..1u64 << 45) {
            let _ = decode(&bytes);
            let mut framed = format!("{seen}:").into_bytes();
            framed.push(VERSION);
            framed.extend_from_slice(&bytes);
            let _ = decode(&framed);
        }
    }
}
