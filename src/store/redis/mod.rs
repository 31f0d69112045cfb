//! The shared store: one Redis (or Valkey) for every replica behind a load balancer,
//! and for the process after a restart. Per fingerprint, three keys, each expiring:
//!
//! | key | value | expires |
//! |---|---|---|
//! | `lrp:a:<fp>` | the answer ([`record`]), with its first sighting | when the window has passed since the first sighting |
//! | `lrp:l:<fp>` | the owner's token: a send in flight | with its lease (the owner's deadline plus a margin) |
//! | `lrp:s:<fp>` | the first sighting (ms), for windows under 24 h only | with the window |
//! | `lrp:t:<token tag>` | the channel (bot user ID) of a token | with the token, a day at most |
//! | `lrp:c:<channel id>` | the bot user ID of LINE's numeric channel id | after a day |
//!
//! A claim is one script, one round trip: a kept answer inside the window in force is
//! replayed; else a lease held by another owner means wait; else the lease is taken
//! (`SET NX PX`) and the first sighting read or recorded. Publishing is one script too:
//! keep the answer, release the lease if still ours, and publish the answer on one
//! channel for the whole process pool. Each process listens on one pub/sub connection
//! and hands answers to its waiters; a waiter also looks every [`POLL`], so a lost
//! message costs at most that, and a lease whose owner died lapses by itself.
//!
//! Every call is bounded by `store-timeout`. The first failure marks the store down,
//! and from then on sends skip it at once (still under derived keys, so LINE refuses
//! duplicates) until a probe finds it serving again. The store connects in the
//! background; [`Store::ready`] resolves once the first probe has found it up or down.

mod background;
mod health;
mod scripts;
mod ticket;
mod waiters;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, Script};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{record, ChannelName, Claim, ClaimRequest, Store, StoreError};
use crate::body::BoxFuture;
use crate::domain::{Answer, ChannelId, Fingerprint, StoreStats, LINE_KEY_LIFETIME};
use health::Health;
use ticket::RedisTicket;
use waiters::{Waiter, Waiters};

/// A waiter looks at Redis this often when no message comes: the bound on what a lost
/// pub/sub message costs, and the load of a waiter (one `MGET`).
const POLL: Duration = Duration::from_millis(200);
/// Connecting (TCP, TLS, AUTH) happens off the request path, with its own bound.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The channel every answer is published on: the fingerprint, then the record.
const CHANNEL: &str = "lrp:settled";

/// Where the store is and how long a send may wait on it.
#[derive(Clone)]
pub struct RedisOptions {
    /// `rediss://`: TLS, always verified (against `ca`, or the system roots).
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<String>,
    /// A PEM file of the CA to trust instead of the system roots (TLS only).
    pub ca: Option<PathBuf>,
    /// The longest any call on the request path waits.
    pub timeout: Duration,
}

impl RedisOptions {
    /// Where the store is, as logs and `/readyz` say it: no credential.
    fn location(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{scheme}://{host}:{}/{}", self.port, self.db)
    }
}

impl fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisOptions")
            .field("location", &self.location())
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("ca", &self.ca)
            .field("timeout", &self.timeout)
            .finish()
    }
}

pub struct RedisStore {
    shared: Arc<Shared>,
    /// Ends the probe and pub/sub tasks with the store.
    _tasks: DropGuard,
}

struct Shared {
    /// One multiplexed connection, reconnected in the background when lost.
    conn: ConnectionManager,
    timeout: Duration,
    health: Health,
    waiters: Arc<Waiters>,
    claim: Script,
    publish: Script,
    delete_if_held: Script,
    /// Claims held by sends of this process.
    claims: AtomicU64,
    /// As of the last refresh: keys in the store's database, Redis's used memory and
    /// its maxmemory (0: none).
    entries: AtomicU64,
    bytes: AtomicU64,
    max_bytes: AtomicU64,
    /// Scrubbed from every error text, should a server ever echo it.
    password: Option<String>,
}

impl RedisStore {
    /// Builds the store and starts its probe and pub/sub tasks; connects in the
    /// background, so a Redis that is down at start does not stop the proxy starting.
    pub fn new(options: RedisOptions) -> Result<RedisStore, StoreError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| StoreError::Setup("the Redis store needs a tokio runtime".into()))?;
        let client = client(&options)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(None)
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| StoreError::Setup(format!("redis client: {e}")))?;
        let location = options.location();
        let shared = Arc::new(Shared {
            conn,
            timeout: options.timeout,
            health: Health::new(location.clone()),
            waiters: Arc::default(),
            claim: Script::new(scripts::CLAIM),
            publish: Script::new(scripts::PUBLISH),
            delete_if_held: Script::new(scripts::DELETE_IF_HELD),
            claims: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            max_bytes: AtomicU64::new(0),
            password: options.password.filter(|p| !p.is_empty()),
        });
        let stop = CancellationToken::new();
        runtime.spawn(background::probe(shared.clone(), stop.clone()));
        runtime.spawn(background::listen(shared.clone(), client, stop.clone()));
        tracing::info!(store = %location, timeout = ?options.timeout, "answer store: redis");
        Ok(RedisStore {
            shared,
            _tasks: stop.drop_guard(),
        })
    }
}

/// What [`RedisStore::new`] would refuse, without connecting: the address, the
/// credentials' form, and the CA file.
pub(crate) fn check(options: &RedisOptions) -> Result<(), StoreError> {
    client(options).map(drop)
}

fn client(options: &RedisOptions) -> Result<Client, StoreError> {
    let addr = if options.tls {
        ConnectionAddr::TcpTls {
            host: options.host.clone(),
            port: options.port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(options.host.clone(), options.port)
    };
    let mut redis = RedisConnectionInfo::default()
        .set_db(options.db)
        // CLIENT SETINFO is unknown to servers before 7.2.
        .set_skip_set_lib_name();
    if let Some(user) = &options.username {
        redis = redis.set_username(user);
    }
    if let Some(password) = &options.password {
        redis = redis.set_password(password);
    }
    let info = addr
        .into_connection_info()
        .map_err(|e| StoreError::Setup(format!("redis address: {e}")))?
        .set_redis_settings(redis);
    let built = match &options.ca {
        Some(path) => {
            let bad = |reason: String| {
                StoreError::Setup(format!("store-ca {}: {reason}", path.display()))
            };
            let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
            let first = rustls_pemfile::certs(&mut pem.as_slice()).next();
            match first {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(bad(e.to_string())),
                None => return Err(bad("no PEM certificate in it".into())),
            }
            let certificates = ::redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            };
            Client::build_with_tls(info, certificates)
        }
        None => Client::open(info),
    };
    built.map_err(|e| StoreError::Setup(format!("redis client: {e}")))
}

/// `lrp:<kind>:<fingerprint>`, the fingerprint as its 32 raw bytes.
fn key(kind: u8, fp: &Fingerprint) -> Vec<u8> {
    let mut key = Vec::with_capacity(38);
    key.extend_from_slice(b"lrp:");
    key.push(kind);
    key.push(b':');
    key.extend_from_slice(&fp.0);
    key
}

/// `lrp:t:<tag>` (16 raw bytes) or `lrp:c:<channel id>`.
fn channel_key(name: &ChannelName) -> Vec<u8> {
    let mut key = b"lrp:".to_vec();
    match name {
        ChannelName::Token(tag) => {
            key.extend_from_slice(b"t:");
            key.extend_from_slice(&tag.0);
        }
        ChannelName::Id(id) => {
            key.extend_from_slice(b"c:");
            key.extend_from_slice(id.as_bytes());
        }
    }
    key
}

fn duration_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Shared {
    /// One call to Redis, bounded by the store timeout. Any failure marks the store
    /// down: later sends skip it until the probe finds it serving.
    async fn call<T>(
        &self,
        call: impl Future<Output = ::redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        if !self.health.is_up() {
            return Err(StoreError::Unavailable(self.health.reason()));
        }
        self.bounded(call).await.map_err(|reason| {
            self.health.down(&reason);
            StoreError::Unavailable(reason)
        })
    }

    /// A call bounded by the store timeout, its failure as text without the password.
    async fn bounded<T>(
        &self,
        call: impl Future<Output = ::redis::RedisResult<T>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(self.scrub(err.to_string())),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }

    fn scrub(&self, text: String) -> String {
        match &self.password {
            Some(password) => text.replace(password.as_str(), "***"),
            None => text,
        }
    }

    async fn claim(self: &Arc<Self>, req: ClaimRequest) -> Result<Claim, StoreError> {
        let token = fastrand::u128(..).to_le_bytes();
        let short = req.window < LINE_KEY_LIFETIME;
        let mut conn = self.conn.clone();
        let mut invocation = self.claim.prepare_invoke();
        invocation
            .key(key(b'a', &req.fp))
            .key(key(b'l', &req.fp))
            .key(key(b's', &req.fp))
            .arg(record::unix_millis(req.now))
            .arg(duration_millis(req.window).max(1))
            .arg(duration_millis(req.lease).max(1))
            .arg(&token[..])
            .arg(if short { "1" } else { "0" });
        let (kind, value): (u8, Vec<u8>) = self.call(invocation.invoke_async(&mut conn)).await?;
        match kind {
            1 => match record::decode(&value) {
                Some((_, answer)) => Ok(Claim::Done(Arc::new(answer))),
                None => Err(self.discard(&req.fp, value).await),
            },
            2 => {
                // Registered now, not when the future is first polled, so an answer
                // published meanwhile is not missed. (One published between the script
                // and this line is: the waiter then finds no lease and claims again.)
                let waiter = self.waiters.register(req.fp);
                Ok(Claim::InFlight(Box::pin(self.clone().wait(req.fp, waiter))))
            }
            3 => {
                let first_seen = std::str::from_utf8(&value)
                    .ok()
                    .and_then(|ms| ms.parse().ok())
                    .map_or(req.now, record::from_unix_millis);
                Ok(Claim::Owner {
                    ticket: Box::new(RedisTicket::new(
                        self.clone(),
                        req.fp,
                        token,
                        first_seen,
                        req.window_left(first_seen),
                    )),
                    first_seen,
                })
            }
            _ => Err(StoreError::Unavailable(format!(
                "unexpected claim result {kind}"
            ))),
        }
    }

    /// A record that does not decode is a miss: it is deleted (unless replaced
    /// meanwhile), and the caller sends without the store this once.
    async fn discard(&self, fp: &Fingerprint, record: Vec<u8>) -> StoreError {
        tracing::warn!(
            fingerprint = ?fp,
            bytes = record.len(),
            "answer store: discarding a record this version cannot read"
        );
        let mut conn = self.conn.clone();
        let mut invocation = self.delete_if_held.prepare_invoke();
        invocation.key(key(b'a', fp)).arg(record).arg("").arg("");
        let _ = self.call(invocation.invoke_async::<i64>(&mut conn)).await;
        StoreError::Corrupt
    }

    /// Waits for the answer of a send in flight elsewhere: woken by pub/sub, looking
    /// again every [`POLL`]. `None` when the owner let go or its lease lapsed, or the
    /// store failed: the caller claims again.
    async fn wait(self: Arc<Self>, fp: Fingerprint, mut waiter: Waiter) -> Option<Arc<Answer>> {
        loop {
            let mut conn = self.conn.clone();
            let mut mget = ::redis::cmd("MGET");
            mget.arg(key(b'a', &fp)).arg(key(b'l', &fp));
            let found: Vec<Option<Vec<u8>>> = self.call(mget.query_async(&mut conn)).await.ok()?;
            match found.as_slice() {
                [Some(kept), _] => {
                    return record::decode(kept).map(|(_, answer)| Arc::new(answer));
                }
                [None, Some(_)] => {}
                // Published unkept (its answer may be in the message just delivered) or
                // let go.
                _ => return waiter.delivered(),
            }
            // Up to a fifth early, so waiters that started together spread out.
            let pause = POLL.mul_f64(0.8 + fastrand::f64() * 0.2);
            tokio::select! {
                woken = waiter.woken() => if let Some(answer) = woken {
                    return Some(answer);
                },
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// `DBSIZE` and the server's used memory, for the metrics. Monitoring only: a
    /// failure here keeps the last figures and leaves the state to the sends and the
    /// probe.
    async fn refresh(&self) {
        if !self.health.is_up() {
            return;
        }
        let mut conn = self.conn.clone();
        let mut pipe = ::redis::pipe();
        pipe.cmd("DBSIZE").cmd("INFO").arg("memory");
        if let Ok((keys, info)) = self
            .bounded(pipe.query_async::<(u64, String)>(&mut conn))
            .await
        {
            self.entries.store(keys, Ordering::Relaxed);
            let field = |name: &str| -> Option<u64> {
                info.lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                    .and_then(|n| n.trim().parse().ok())
            };
            if let Some(used) = field("used_memory") {
                self.bytes.store(used, Ordering::Relaxed);
            }
            if let Some(max) = field("maxmemory") {
                self.max_bytes.store(max, Ordering::Relaxed);
            }
        }
    }
}

impl Store for RedisStore {
    fn claim(&self, req: ClaimRequest) -> BoxFuture<'_, Result<Claim, StoreError>> {
        Box::pin(self.shared.claim(req))
    }

    fn channel(&self, name: &ChannelName) -> BoxFuture<'_, Result<Option<ChannelId>, StoreError>> {
        let key = channel_key(name);
        Box::pin(async move {
            let mut conn = self.shared.conn.clone();
            let mut get = ::redis::cmd("GET");
            get.arg(key);
            let found: Option<Vec<u8>> = self.shared.call(get.query_async(&mut conn)).await?;
            // Whatever else is there was not written by this proxy: a miss.
            Ok(found.and_then(|v| ChannelId::parse(std::str::from_utf8(&v).ok()?)))
        })
    }

    fn record_channel(
        &self,
        name: &ChannelName,
        channel: &ChannelId,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let key = channel_key(name);
        let value = channel.as_str().to_owned();
        Box::pin(async move {
            let mut conn = self.shared.conn.clone();
            let mut set = ::redis::cmd("SET");
            set.arg(key)
                .arg(value)
                .arg("PX")
                .arg(duration_millis(ttl).max(1));
            self.shared.call(set.query_async::<()>(&mut conn)).await
        })
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            entries: self.shared.entries.load(Ordering::Relaxed),
            bytes: self.shared.bytes.load(Ordering::Relaxed),
            max_bytes: self.shared.max_bytes.load(Ordering::Relaxed),
            claims: self.shared.claims.load(Ordering::Relaxed),
            up: self.shared.health.is_up(),
        }
    }

    fn refresh(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.shared.refresh())
    }

    fn ready(&self) -> BoxFuture<'_, ()> {
        // The probe gives up within its own bounds; this one only guards against a bug.
        let bound = CONNECT_TIMEOUT + self.shared.timeout + Duration::from_secs(1);
        Box::pin(async move {
            let _ = tokio::time::timeout(bound, self.shared.health.tried()).await;
        })
    }

    fn status_line(&self) -> String {
        self.shared.health.status_line()
    }
}
