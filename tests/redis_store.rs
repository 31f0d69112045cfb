//! The Redis store against a real redis-server: the memory store's semantics (its
//! unit tests, mirrored), plus what only a shared store has: a second replica, a
//! server that is down, slow, or holds garbage, TTLs on every key, and the bytes
//! an answer costs.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use line_retry_proxy::domain::{
    Answer, Fingerprint, Outcome, RetryKey, TokenTag, LINE_KEY_LIFETIME,
};
use line_retry_proxy::store::redis::{RedisOptions, RedisStore};
use line_retry_proxy::store::{Claim, ClaimRequest, Store, StoreError, Ticket};
use support::redis::{available, RedisServer};

const LEASE: Duration = Duration::from_secs(60);
const DAY: Duration = LINE_KEY_LIFETIME;
const TIMEOUT: Duration = Duration::from_millis(50);
/// Bounds every wait for something that should happen at once.
const SOON: Duration = Duration::from_secs(5);
/// The store is tried every 500 ms while down: back within a few of those.
const RECOVERY: Duration = Duration::from_secs(2);
/// What a loaded test machine may add to a timed wait before the test sees it end.
const SCHEDULING: Duration = Duration::from_millis(150);

fn options(server: &RedisServer, db: i64) -> RedisOptions {
    RedisOptions {
        tls: false,
        host: "127.0.0.1".into(),
        port: server.port,
        db,
        username: None,
        password: None,
        ca: None,
        timeout: TIMEOUT,
    }
}

/// A store that has connected (its first probe done), as the proxy serves it.
async fn store(server: &RedisServer, db: i64) -> RedisStore {
    ready(RedisStore::new(options(server, db)).expect("store builds")).await
}

async fn ready(store: RedisStore) -> RedisStore {
    store.ready().await;
    store
}

fn answer(body: impl Into<Bytes>) -> Arc<Answer> {
    Arc::new(Answer {
        status: StatusCode::OK,
        headers: Box::new([(
            HeaderName::from_static("x-line-request-id"),
            HeaderValue::from_static("0cbd9e6f-2a8f-4e3e-8f1b-3c1f0c5f2a11"),
        )]),
        body: body.into(),
        key: RetryKey::Derived(uuid::Uuid::nil()),
        outcome: Outcome::Fresh,
        attempts: 1,
        upstream_status: Some(StatusCode::OK),
        owner: Some(TokenTag([9; 16])),
    })
}

fn request(fp: u8, window: Duration, now: SystemTime) -> ClaimRequest {
    ClaimRequest {
        fp: Fingerprint([fp; 32]),
        lease: LEASE,
        window,
        now,
    }
}

async fn claim(store: &RedisStore, fp: u8) -> Claim {
    store
        .claim(request(fp, DAY, SystemTime::now()))
        .await
        .expect("redis answers")
}

fn owner(claim: Claim) -> (Box<dyn Ticket>, SystemTime) {
    match claim {
        Claim::Owner { ticket, first_seen } => (ticket, first_seen),
        Claim::Done(_) => panic!("expected to own the claim, got a stored answer"),
        Claim::InFlight(_) => panic!("expected to own the claim, got a wait"),
    }
}

fn waiting(claim: Claim) -> line_retry_proxy::body::BoxFuture<'static, Option<Arc<Answer>>> {
    match claim {
        Claim::InFlight(w) => w,
        Claim::Done(_) => panic!("expected to wait, got a stored answer"),
        Claim::Owner { .. } => panic!("expected to wait, got the claim"),
    }
}

macro_rules! redis_or_skip {
    ($name:expr) => {
        if !available($name) {
            return;
        }
    };
}

#[tokio::test]
async fn first_claims_then_others_wait_then_replay() {
    redis_or_skip!("first_claims_then_others_wait_then_replay");
    let server = RedisServer::start().await;
    let store = store(&server, 0).await;
    let (ticket, _) = owner(claim(&store, 1).await);
    let waiting = waiting(claim(&store, 1).await);
    let _other = owner(claim(&store, 2).await);
    assert_eq!(store.stats().claims, 2);
    ticket.publish(answer("first"), true).await.unwrap();
    let woken = tokio::time::timeout(SOON, waiting).await.expect("woken");
    assert_eq!(woken.unwrap().body, "first");
    let Claim::Done(replayed) = claim(&store, 1).await else {
        panic!("must replay")
    };
    assert_eq!(replayed.body, "first");
    assert_eq!(
        replayed.headers,
        answer("").headers,
        "kept headers come back"
    );
}

#[tokio::test]
async fn unstored_answer_reaches_waiters_but_is_not_replayed() {
    redis_or_skip!("unstored_answer_reaches_waiters_but_is_not_replayed");
    let server = RedisServer::start().await;
    let store = store(&server, 0).await;
    let (ticket, _) = owner(claim(&store, 1).await);
    let waiting = waiting(claim(&store, 1).await);
    ticket.publish(answer("502"), false).await.unwrap();
    let woken = tokio::time::timeout(SOON, waiting).await.expect("woken");
    assert_eq!(woken.unwrap().body, "502");
    owner(claim(&store, 1).await);
}

#[tokio::test]
async fn dropped_ticket_releases_waiters() {
    redis_or_skip!("dropped_ticket_releases_waiters");
    let server = RedisServer::start().await;
    let store = store(&server, 0).await;
    let (ticket, _) = owner(claim(&store, 1).await);
    let waiting = waiting(claim(&store, 1).await);
    drop(ticket);
    // Released, not left to its 60 s lease.
    let woken = tokio::time::timeout(SOON, waiting).await.expect("woken");
    assert!(woken.is_none(), "the owner let go without an answer");
    // The waiter gives up only once the lease is gone: the next claim owns it.
    owner(claim(&store, 1).await);
}

#[tokio::test]
async fn a_lapsed_claim_is_taken_over_and_the_old_owner_cannot_release_it() {
    redis_or_skip!("a_lapsed_claim_is_taken_over_and_the_old_owner_cannot_release_it");
    let server = RedisServer::start().await;
    let store = store(&server, 0).await;
    let mut short = request(1, DAY, SystemTime::now());
    short.lease = Duration::from_millis(1);
    let (stale, _) = owner(store.claim(short).await.unwrap());
    // The lease is time itself: nothing to await but the clock.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (fresh, _) = owner(claim(&store, 1).await);
    drop(stale);
    // Let the stale owner's release run, then check it did not take the new claim.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        matches!(claim(&store, 1).await, Claim::InFlight(_)),
        "the new owner's claim survives the old owner's release"
    );
    drop(fresh);
}

#[tokio::test]
async fn answers_expire_when_the_window_has_passed_since_first_sight() {
    redis_or_skip!("answers_expire_when_the_window_has_passed_since_first_sight");
    let server = RedisServer::start().await;
    let store = store(&server, 0).await;
    let window = Duration::from_secs(600);
    let t0 = SystemTime::now();
    let (ticket, _) = owner(store.claim(request(1, window, t0)).await.unwrap());
    ticket.publish(answer("x"), true).await.unwrap();
    let inside = t0 + window - Duration::from_millis(1);
    assert!(matches!(
        store.claim(request(1, window, inside)).await.unwrap(),
        Claim::Done(_)
    ));
    // Redis itself forgets it no later than the window (a TTL on the key)...
    let ttl = pttl(&server, b'a', 1).await;
    assert!(ttl > 0 && ttl <= 600_000, "answer TTL {ttl} ms");
    // ...and the script compares the request's clock: a window later, it is gone.
    owner(store.claim(request(1, window, t0 + window)).await.unwrap());
}

#[tokio::test]
async fn a_shortened_window_applies_to_answers_already_kept() {
    redis_or_skip!("a_shortened_window_applies_to_answers_already_kept");
    let server = RedisServer::start().await;
    let store = store(&server, 0).await;
    let t0 = SystemTime::now();
    let (ticket, _) = owner(store.claim(request(1, DAY, t0)).await.unwrap());
    ticket.publish(answer("old"), true).await.unwrap();
    let later = t0 + Duration::from_secs(17 * 60);
    let ten_minutes = Duration::from_secs(600);
    assert!(matches!(
        store.claim(request(1, DAY, later)).await.unwrap(),
        Claim::Done(_)
    ));
    owner(store.claim(request(1, ten_minutes, later)).await.unwrap());
}

#[tokio::test]
async fn a_short_window_keeps_its_first_sighting_whatever_the_outcome() {
    redis_or_skip!("a_short_window_keeps_its_first_sighting_whatever_the_outcome");
    let server = RedisServer::start().await;
    let store = store(&server, 0).await;
    let window = Duration::from_secs(6);
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_004);
    let (ticket, first) = owner(store.claim(request(1, window, t0)).await.unwrap());
    assert_eq!(first, t0);
    // The send's outcome is unknown: nothing kept.
    ticket.publish(answer("504"), false).await.unwrap();
    let resend = t0 + Duration::from_secs(3);
    let (ticket, first) = owner(store.claim(request(1, window, resend)).await.unwrap());
    assert_eq!(first, t0, "the resend keeps the first sighting");
    ticket.publish(answer("504"), false).await.unwrap();
    // Another replica (another store on the same Redis) sees the same sighting.
    let replica = store_on_same(&server).await;
    let (ticket, first) = owner(replica.claim(request(1, window, resend)).await.unwrap());
    assert_eq!(first, t0, "the sighting is shared");
    ticket.publish(answer("504"), false).await.unwrap();
    let after = t0 + window;
    let (_, first) = owner(store.claim(request(1, window, after)).await.unwrap());
    assert_eq!(first, after, "a window later it is a new send");
    let ttl = pttl(&server, b's', 1).await;
    assert!(ttl > 0 && ttl <= 6_000, "sighting TTL {ttl} ms");
}

async fn store_on_same(server: &RedisServer) -> RedisStore {
    store(server, 0).await
}

/// What a second replica sees: a send in flight on the first is waited for, and its
/// answer arrives by pub/sub at once, not at the next poll.
#[tokio::test]
async fn a_waiter_on_another_replica_gets_the_answer_by_pubsub() {
    redis_or_skip!("a_waiter_on_another_replica_gets_the_answer_by_pubsub");
    let server = RedisServer::start().await;
    let first = store(&server, 0).await;
    let second = store(&server, 0).await;
    // The second replica's listener must be subscribed before the publish that
    // matters: warm up until an unkept answer (which only pub/sub can carry) arrives.
    let deadline = Instant::now() + SOON;
    for warm in 100u8.. {
        assert!(Instant::now() < deadline, "pub/sub never delivered");
        let (ticket, _) = owner(claim(&first, warm).await);
        let wait = waiting(claim(&second, warm).await);
        ticket.publish(answer("warm"), false).await.unwrap();
        if tokio::time::timeout(SOON, wait)
            .await
            .expect("woken")
            .is_some()
        {
            break;
        }
    }

    let (ticket, _) = owner(claim(&first, 1).await);
    let waiting = waiting(claim(&second, 1).await);
    let waited = tokio::spawn(waiting);
    // Let the waiter take its first look and go to sleep on its poll.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let settled_at = Instant::now();
    ticket.publish(answer("shared"), false).await.unwrap();
    let answer = tokio::time::timeout(SOON, waited).await.unwrap().unwrap();
    let latency = settled_at.elapsed();
    // Not kept, so no poll could have found it: it came by pub/sub.
    assert_eq!(answer.expect("the owner's answer").body, "shared");
    assert!(latency < Duration::from_secs(1), "promptly: {latency:?}");
}

#[tokio::test]
async fn every_key_expires_so_redis_is_never_filled_beyond_the_window() {
    redis_or_skip!("every_key_expires_so_redis_is_never_filled_beyond_the_window");
    let server = RedisServer::start().await;
    let store = store(&server, 0).await;
    let window = Duration::from_secs(3600);
    let (ticket, _) = owner(
        store
            .claim(request(1, window, SystemTime::now()))
            .await
            .unwrap(),
    );
    let lease = pttl(&server, b'l', 1).await;
    assert!(lease > 0 && lease <= 60_000, "lease TTL {lease} ms");
    ticket.publish(answer("kept"), true).await.unwrap();
    assert_eq!(
        pttl(&server, b'l', 1).await,
        -2,
        "the lease is gone once settled"
    );
    let kept = pttl(&server, b'a', 1).await;
    assert!(kept > 0 && kept <= 3_600_000, "answer TTL {kept} ms");
    let seen = pttl(&server, b's', 1).await;
    assert!(seen > 0 && seen <= 3_600_000, "sighting TTL {seen} ms");
    // And nothing else was left behind without a TTL.
    let keys = server.command(&[b"KEYS", b"*"]).await;
    let persistent = server.command(&[b"INFO", b"keyspace"]).await;
    let text = String::from_utf8_lossy(&persistent);
    let line = text
        .lines()
        .find(|l| l.starts_with("db0:"))
        .unwrap_or_else(|| panic!("{text}"));
    let count = |field: &str| -> u64 {
        line.split(&[':', ','][..])
            .find_map(|kv| kv.strip_prefix(field))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{field} in {line}"))
    };
    assert_eq!(
        count("keys="),
        count("expires="),
        "every key has a TTL: {line} {:?}",
        String::from_utf8_lossy(&keys)
    );
}

#[tokio::test]
async fn a_corrupt_record_is_a_counted_miss_never_a_panic() {
    redis_or_skip!("a_corrupt_record_is_a_counted_miss_never_a_panic");
    let server = RedisServer::start().await;
    let store = store(&server, 0).await;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    // A record with a readable first sighting and garbage after it.
    let mut garbage = format!("{now}:").into_bytes();
    garbage.extend_from_slice(b"\x01\xff\xff not a record");
    let key = fp_key(b'a', 1);
    server
        .command(&[b"SET", &key, &garbage, b"PX", b"60000"])
        .await;
    let err = store.claim(request(1, DAY, SystemTime::now())).await;
    assert!(
        matches!(err, Err(StoreError::Corrupt)),
        "counted as a store error"
    );
    assert!(store.stats().up, "garbage is not an outage");
    owner(claim(&store, 1).await);
    // Unreadable at the front too: the script itself treats it as a miss.
    server
        .command(&[b"SET", &fp_key(b'a', 2), b"junk", b"PX", b"60000"])
        .await;
    owner(claim(&store, 2).await);
}

/// A Redis that is not there: every call gives up within the timeout, later ones at
/// once; when it comes, the store uses it again by itself.
#[tokio::test]
async fn down_then_back_without_waiting_longer_than_the_timeout() {
    redis_or_skip!("down_then_back_without_waiting_longer_than_the_timeout");
    let mut server = RedisServer::start().await;
    let store = store(&server, 0).await;
    owner(claim(&store, 1).await);
    server.stop().await;

    let started = Instant::now();
    let failed = store.claim(request(2, DAY, SystemTime::now())).await;
    assert!(matches!(failed, Err(StoreError::Unavailable(_))));
    assert!(
        started.elapsed() < TIMEOUT + SCHEDULING,
        "waited {:?} on a dead Redis",
        started.elapsed()
    );
    assert!(!store.stats().up);
    assert!(
        store.status_line().contains("DOWN"),
        "{}",
        store.status_line()
    );
    let started = Instant::now();
    assert!(store
        .claim(request(2, DAY, SystemTime::now()))
        .await
        .is_err());
    assert!(
        started.elapsed() < TIMEOUT,
        "while down, sends skip Redis at once, without even a timeout: {:?}",
        started.elapsed()
    );

    server.restart().await;
    let deadline = Instant::now() + RECOVERY;
    while !store.stats().up {
        assert!(Instant::now() < deadline, "the store never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    owner(claim(&store, 3).await);
    assert!(
        store.status_line().ends_with(" up"),
        "{}",
        store.status_line()
    );
}

/// A Redis that answers too slowly: the call gives up at the timeout.
#[tokio::test]
async fn a_slow_redis_costs_a_send_at_most_the_timeout() {
    redis_or_skip!("a_slow_redis_costs_a_send_at_most_the_timeout");
    let server = RedisServer::start().await;
    let store = store(&server, 0).await;
    owner(claim(&store, 1).await);
    // Every client's commands wait for a second.
    server
        .command(&[b"CLIENT", b"PAUSE", b"1000", b"ALL"])
        .await;
    let started = Instant::now();
    assert!(store
        .claim(request(2, DAY, SystemTime::now()))
        .await
        .is_err());
    let waited = started.elapsed();
    // Paused for a second: anything under that but the timeout is the timeout's doing.
    assert!(
        waited < TIMEOUT + SCHEDULING,
        "waited {waited:?} on a Redis paused for 1 s"
    );
    // The pause ends after 1 s; the store is back a probe or two later.
    let deadline = Instant::now() + Duration::from_secs(1) + RECOVERY;
    while !store.stats().up {
        assert!(Instant::now() < deadline, "the store never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_wrong_password_is_an_outage_that_never_shows_the_password() {
    redis_or_skip!("a_wrong_password_is_an_outage_that_never_shows_the_password");
    let server = RedisServer::start_with(&["--save", "", "--requirepass", "right-horse"]).await;
    let mut wrong = options(&server, 0);
    wrong.password = Some("hunter2-battery".into());
    assert!(!format!("{wrong:?}").contains("hunter2"));
    let store = ready(RedisStore::new(wrong).unwrap()).await;
    assert!(!store.stats().up, "refused at connect");
    let err = store
        .claim(request(1, DAY, SystemTime::now()))
        .await
        .err()
        .expect("refused");
    for text in [err.to_string(), format!("{err:?}"), store.status_line()] {
        assert!(!text.contains("hunter2"), "{text}");
    }
    let mut right = options(&server, 0);
    right.password = Some("right-horse".into());
    owner(claim(&ready(RedisStore::new(right).unwrap()).await, 1).await);
}

/// The bytes one stored push answer costs Redis, as `MEMORY USAGE` weighs it and as
/// `used_memory` grows: printed (the README quotes it) and held under the design's
/// bound of 512 bytes plus the body.
#[tokio::test]
async fn a_stored_push_answer_costs_under_512_bytes_plus_its_body() {
    redis_or_skip!("a_stored_push_answer_costs_under_512_bytes_plus_its_body");
    let server = RedisServer::start().await;
    let store = store(&server, 0).await;
    const N: u32 = 4000;
    let used_memory = |info: Vec<u8>| -> u64 {
        String::from_utf8_lossy(&info)
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("used_memory in INFO")
    };
    let before = used_memory(server.command(&[b"INFO", b"memory"]).await);
    let mut body_bytes = 0;
    for i in 0..N {
        let mut fp = [0u8; 32];
        fp[..4].copy_from_slice(&i.to_le_bytes());
        fp[31] = 0xa5;
        let req = ClaimRequest {
            fp: Fingerprint(fp),
            ..request(0, DAY, SystemTime::now())
        };
        let (ticket, _) = owner(store.claim(req).await.unwrap());
        let body = format!(
            "{{\"sentMessages\":[{{\"id\":\"{:018}\",\"quoteToken\":\"q{:08}IStG5h1Tz7b\"}}]}}",
            461_230_966_842_064_897u64 + u64::from(i),
            i
        );
        body_bytes += body.len();
        let mut a = (*answer(body)).clone();
        a.headers = Box::new([
            (
                HeaderName::from_static("content-type"),
                HeaderValue::from_static("application/json"),
            ),
            (
                HeaderName::from_static("x-line-request-id"),
                HeaderValue::from_static("0cbd9e6f-2a8f-4e3e-8f1b-3c1f0c5f2a11"),
            ),
        ]);
        ticket.publish(Arc::new(a), true).await.unwrap();
    }
    let after = used_memory(server.command(&[b"INFO", b"memory"]).await);
    let body = body_bytes as u64 / u64::from(N);
    let mut usage = 0u64;
    for i in (0..N).step_by(40) {
        let mut fp = [0u8; 32];
        fp[..4].copy_from_slice(&i.to_le_bytes());
        fp[31] = 0xa5;
        let reply = server
            .command(&[b"MEMORY", b"USAGE", &raw_key(b'a', &fp), b"SAMPLES", b"0"])
            .await;
        let text = String::from_utf8_lossy(&reply);
        usage += text
            .trim()
            .strip_prefix(':')
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("MEMORY USAGE: {text}"));
    }
    let per_entry_usage = usage / u64::from(N / 40);
    let per_entry_growth = (after - before) / u64::from(N);
    println!(
        "redis store: {N} push answers, body {body} B: MEMORY USAGE {per_entry_usage} B/entry, \
         used_memory growth {per_entry_growth} B/entry ({} MB per million)",
        per_entry_growth * 1_000_000 / (1 << 20)
    );
    assert!(
        per_entry_usage <= 512 + body,
        "{per_entry_usage} B per answer of {body} B"
    );
    assert!(
        per_entry_growth <= 512 + body,
        "{per_entry_growth} B per answer of {body} B"
    );
}

fn raw_key(kind: u8, fp: &[u8; 32]) -> Vec<u8> {
    let mut key = b"lrp:".to_vec();
    key.push(kind);
    key.push(b':');
    key.extend_from_slice(fp);
    key
}

fn fp_key(kind: u8, fp: u8) -> Vec<u8> {
    raw_key(kind, &[fp; 32])
}

async fn pttl(server: &RedisServer, kind: u8, fp: u8) -> i64 {
    let reply = server.command(&[b"PTTL", &fp_key(kind, fp)]).await;
    let text = String::from_utf8_lossy(&reply);
    text.trim()
        .strip_prefix(':')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("PTTL: {text}"))
}

/// What a scrape shows of a Redis store: its keys, its used memory and its bound.
#[tokio::test]
async fn the_metrics_show_keys_used_memory_and_maxmemory() {
    redis_or_skip!("the_metrics_show_keys_used_memory_and_maxmemory");
    let server = RedisServer::start_with(&["--save", "", "--maxmemory", "64mb"]).await;
    let store = store(&server, 0).await;
    let (ticket, _) = owner(claim(&store, 1).await);
    ticket.publish(answer("kept"), true).await.unwrap();
    store.refresh().await;
    let stats = store.stats();
    assert_eq!(stats.entries, 1, "{stats:?}");
    assert!(stats.bytes > 0, "{stats:?}");
    assert_eq!(stats.max_bytes, 64 << 20, "{stats:?}");
    assert!(stats.up);
}
