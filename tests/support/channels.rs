//! LINE's channels and channel access tokens as the mock models them: which channel a
//! bearer token belongs to, which bot that channel is, and LINE's token endpoints
//! (issuance and verification). LINE keeps retry keys per channel, so the mock keys
//! them by the channel this resolves a token to, never by the token's text.
//!
//! A bearer token the mock never issued is its own channel (an automatic one, made the
//! first time the token is seen), so tests that just send `Bearer anything` keep their
//! meaning: different texts are different channels, the same text the same channel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use http::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The `client_assertion_type` of LINE's JWT-assertion token endpoints.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The `scope` LINE's verify endpoints answer for a Messaging API channel's token.
pub const SCOPE: &str = "profile chat_message.write";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// Issued in the LINE Developers Console. It does not expire; the mock gives it ten
    /// years, which is what `POST /v2/oauth/verify` counts down for it.
    LongLived,
    /// `POST /v2/oauth/accessToken` (channel id and secret): 30 days.
    ShortLived,
    /// `POST /oauth2/v2.1/token` (a JWT assertion): 30 days.
    V21,
    /// `POST /oauth2/v3/token`: 15 minutes, and no verify endpoint knows it.
    Stateless,
}

impl TokenKind {
    /// `expires_in` at issue.
    pub fn lifetime(self) -> Duration {
        match self {
            TokenKind::LongLived => Duration::from_secs(10 * 365 * 24 * 3600),
            TokenKind::ShortLived | TokenKind::V21 => Duration::from_secs(2_592_000),
            TokenKind::Stateless => Duration::from_secs(900),
        }
    }
}

/// A LINE channel: its numeric id (`client_id`), its secret, and the bot it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Channel {
    pub id: String,
    pub secret: String,
    /// `U` and 32 lowercase hex digits, as `GET /v2/bot/info` answers it.
    pub bot_user_id: String,
}

struct Token {
    /// `None`: a token the mock never issued, its own automatic channel.
    kind: Option<TokenKind>,
    channel: String,
    /// `None`: never expires (automatic channels).
    expires_at: Option<Instant>,
    revoked: bool,
}

impl Token {
    fn good_at(&self, now: Instant) -> bool {
        !self.revoked && self.expires_at.is_none_or(|at| now < at)
    }
}

/// One mock's channels and the tokens it knows.
#[derive(Default)]
pub(super) struct Registry {
    channels: HashMap<String, Channel>,
    tokens: HashMap<String, Token>,
}

/// Process-wide, so channel ids stay unique across several mocks in one test binary.
fn next_channel_number() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// `len` bytes that look random, unique for each `(label, n)` in this process.
fn opaque(label: &str, n: u64, len: usize) -> Vec<u8> {
    static SEED: OnceLock<u64> = OnceLock::new();
    let seed = *SEED.get_or_init(|| fastrand::u64(..));
    let mut out = Vec::with_capacity(len + 32);
    let mut block = 0u64;
    while out.len() < len {
        let mut hash = Sha256::new();
        hash.update(seed.to_be_bytes());
        hash.update(label.as_bytes());
        hash.update(n.to_be_bytes());
        hash.update(block.to_be_bytes());
        out.extend_from_slice(&hash.finalize());
        block += 1;
    }
    out.truncate(len);
    out
}

fn fresh(label: &str, len: usize) -> Vec<u8> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    opaque(label, NEXT.fetch_add(1, Ordering::Relaxed), len)
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The bot of a channel made for a token the mock never issued: `U` and the first 32
/// hex digits of the SHA-256 of the token's text (without `Bearer `).
pub fn automatic_bot_user_id(token: &str) -> String {
    format!("U{}", &sha256_hex(token)[..32])
}

/// A new token of `kind`: long opaque ASCII, unique in the process. Long-lived and
/// short-lived ones are base64 of 128 bytes (172 characters, ending in `=`), as LINE's
/// look; v2.1 and stateless ones are JWT-shaped, with an opaque payload.
fn new_token(kind: TokenKind) -> String {
    match kind {
        TokenKind::LongLived | TokenKind::ShortLived => STANDARD.encode(fresh("token", 128)),
        TokenKind::V21 | TokenKind::Stateless => format!(
            "eyJhbGciOiJIUzI1NiJ9.{}.{}",
            URL_SAFE_NO_PAD.encode(fresh("jwt payload", 96)),
            URL_SAFE_NO_PAD.encode(fresh("jwt signature", 32)),
        ),
    }
}

/// A JWT assertion for the v2.1 and v3 token endpoints (`header.payload.signature`,
/// base64url): `iss` = `sub` = the channel id. Unsigned: the mock checks no signature.
pub fn client_assertion(ch: &Channel) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 30 * 60;
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": "mock-key"});
    let payload = json!({
        "iss": ch.id,
        "sub": ch.id,
        "aud": "https://api.line.me/",
        "exp": exp,
        "token_exp": 2_592_000,
    });
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(payload.to_string()),
        URL_SAFE_NO_PAD.encode("unsigned"),
    )
}

impl Registry {
    fn add(&mut self, id: String, bot_user_id: String) -> Channel {
        let ch = Channel {
            secret: fresh("secret", 16)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            id: id.clone(),
            bot_user_id,
        };
        self.channels.insert(id, ch.clone());
        ch
    }

    /// A new channel with a numeric id of LINE's shape (`1650000001`, …) and a bot.
    pub(super) fn new_channel(&mut self) -> Channel {
        let id = (1_650_000_000 + next_channel_number()).to_string();
        let bot = format!("U{}", &sha256_hex(&format!("bot of channel {id}"))[..32]);
        self.add(id, bot)
    }

    /// A channel made elsewhere (another mock) becomes one of this mock's too.
    pub(super) fn adopt(&mut self, ch: &Channel) {
        self.channels
            .entry(ch.id.clone())
            .or_insert_with(|| ch.clone());
    }

    pub(super) fn issue(&mut self, channel: &str, kind: TokenKind, now: Instant) -> String {
        assert!(self.channels.contains_key(channel), "channel {channel}");
        let token = new_token(kind);
        let issued = Token {
            kind: Some(kind),
            channel: channel.to_owned(),
            expires_at: Some(now + kind.lifetime()),
            revoked: false,
        };
        self.tokens.insert(token.clone(), issued);
        token
    }

    /// The token's entry; a token never seen gets its automatic channel now.
    fn entry(&mut self, token: &str) -> &mut Token {
        if !self.tokens.contains_key(token) {
            let id = (1_650_000_000 + next_channel_number()).to_string();
            let ch = self.add(id, automatic_bot_user_id(token));
            let auto = Token {
                kind: None,
                channel: ch.id,
                expires_at: None,
                revoked: false,
            };
            self.tokens.insert(token.to_owned(), auto);
        }
        self.tokens.get_mut(token).expect("just inserted")
    }

    /// The channel a token belongs to, whatever its state.
    pub(super) fn channel_of(&mut self, token: &str) -> Channel {
        let id = self.entry(token).channel.clone();
        self.channels[&id].clone()
    }

    /// The channel a bearer token is good for now; `None` (a 401) once it is revoked or
    /// expired.
    pub(super) fn authenticate(&mut self, token: &str, now: Instant) -> Option<Channel> {
        let entry = self.entry(token);
        let id = entry.good_at(now).then(|| entry.channel.clone())?;
        Some(self.channels[&id].clone())
    }

    pub(super) fn revoke(&mut self, token: &str) {
        self.entry(token).revoked = true;
    }

    /// As if `by` had passed for an issued token: its expiry comes that much closer.
    pub(super) fn age(&mut self, token: &str, by: Duration) {
        let at = self
            .tokens
            .get_mut(token)
            .and_then(|t| t.expires_at.as_mut())
            .unwrap_or_else(|| panic!("{token:?} is no token this mock issued"));
        *at = at.checked_sub(by).unwrap_or_else(Instant::now);
    }

    /// A verify endpoint's view: the channel id and the whole seconds left, for a good
    /// token of one of `kinds`.
    fn verify(&self, token: &str, kinds: &[TokenKind], now: Instant) -> Option<(String, u64)> {
        let t = self.tokens.get(token)?;
        if !kinds.contains(&t.kind?) || !t.good_at(now) {
            return None;
        }
        let left = t.expires_at?.saturating_duration_since(now);
        Some((t.channel.clone(), left.as_secs()))
    }

    fn secret_matches(&self, id: &str, secret: &str) -> bool {
        self.channels.get(id).is_some_and(|ch| ch.secret == secret)
    }

    /// The channel of a JWT assertion whose `iss` and `sub` name the same known channel.
    fn asserted_channel(&self, assertion: &str) -> Option<String> {
        let parts: Vec<&str> = assertion.split('.').collect();
        let [_, payload, _] = parts[..] else {
            return None;
        };
        let payload = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
        let payload: Value = serde_json::from_slice(&payload).ok()?;
        let (iss, sub) = (payload["iss"].as_str()?, payload["sub"].as_str()?);
        (iss == sub && self.channels.contains_key(iss)).then(|| iss.to_owned())
    }
}

/// `GET /v2/bot/info` for a channel.
pub(super) fn bot_info(ch: &Channel) -> Value {
    json!({
        "userId": ch.bot_user_id,
        "basicId": format!("@{}", &ch.bot_user_id[1..9]),
        "displayName": format!("Mock bot {}", ch.id),
        "chatMode": "bot",
        "markAsReadMode": "auto",
    })
}

/// Is this one of LINE's token endpoints (they take no bearer token)?
pub(super) fn is_token_endpoint(method: &Method, path: &str) -> bool {
    matches!(
        (method, path),
        (&Method::POST, "/v2/oauth/accessToken")
            | (&Method::POST, "/oauth2/v2.1/token")
            | (&Method::POST, "/oauth2/v3/token")
            | (&Method::POST, "/v2/oauth/verify")
            | (&Method::GET, "/oauth2/v2.1/verify")
    )
}

/// The first value of each field of a form-encoded body or query.
pub(super) fn form(bytes: &[u8]) -> HashMap<String, String> {
    let mut fields = HashMap::new();
    for (name, value) in url::form_urlencoded::parse(bytes) {
        fields
            .entry(name.into_owned())
            .or_insert_with(|| value.into_owned());
    }
    fields
}

fn oauth_error(error: &str, description: &str) -> (StatusCode, Value) {
    let body = json!({"error": error, "error_description": description});
    (StatusCode::BAD_REQUEST, body)
}

fn issued(token: String, kind: TokenKind) -> Value {
    json!({
        "access_token": token,
        "expires_in": kind.lifetime().as_secs(),
        "token_type": "Bearer",
    })
}

/// LINE's answer at a token endpoint (see [`is_token_endpoint`]): status and JSON body.
pub(super) fn token_endpoint(
    reg: &mut Registry,
    method: &Method,
    path: &str,
    query: &str,
    body: &[u8],
    now: Instant,
) -> (StatusCode, Value) {
    let fields = form(if *method == Method::GET {
        query.as_bytes()
    } else {
        body
    });
    let field = |name: &str| fields.get(name).map(String::as_str);
    let expired = || oauth_error("invalid_request", "access token expired");
    let verified = |(channel, left): (String, u64)| {
        let body = json!({"client_id": channel, "expires_in": left, "scope": SCOPE});
        (StatusCode::OK, body)
    };
    if path.ends_with("/verify") {
        let kinds: &[TokenKind] = if path == "/v2/oauth/verify" {
            &[TokenKind::ShortLived, TokenKind::LongLived]
        } else {
            &[TokenKind::V21]
        };
        return field("access_token")
            .and_then(|token| reg.verify(token, kinds, now))
            .map_or_else(expired, verified);
    }
    if field("grant_type") != Some("client_credentials") {
        return oauth_error(
            "unsupported_grant_type",
            "grant_type must be client_credentials",
        );
    }
    let by_secret = match (field("client_id"), field("client_secret")) {
        (Some(id), Some(secret)) => Some(reg.secret_matches(id, secret).then(|| id.to_owned())),
        _ => None,
    };
    let by_assertion = match (field("client_assertion_type"), field("client_assertion")) {
        (Some(JWT_BEARER), Some(jwt)) => Some(reg.asserted_channel(jwt)),
        _ => None,
    };
    let (kind, channel) = match path {
        "/v2/oauth/accessToken" => (TokenKind::ShortLived, by_secret),
        "/oauth2/v2.1/token" => (TokenKind::V21, by_assertion),
        _ => (TokenKind::Stateless, by_secret.or(by_assertion)),
    };
    let Some(channel) = channel else {
        return oauth_error("invalid_request", "the client credentials are missing");
    };
    let Some(channel) = channel else {
        return oauth_error("invalid_client", "invalid client credentials");
    };
    let mut answer = issued(reg.issue(&channel, kind, now), kind);
    if kind == TokenKind::V21 {
        answer["key_id"] = Value::from(URL_SAFE_NO_PAD.encode(fresh("key id", 16)));
    }
    (StatusCode::OK, answer)
}
