//! Token issuance that passes through the proxy: the cheapest way to learn a token's
//! channel is to see LINE issue it.
//!
//! The three issuing endpoints (short-lived, v2.1, stateless) take a form naming the
//! channel: `client_id`, or a JWT `client_assertion` whose `iss` is the channel id.
//! When LINE answers 2xx with an `access_token`, that token belongs to that channel
//! for `expires_in` seconds, on LINE's word. Request and answer reach their ends
//! byte for byte as they were; only the answer's framing is hyper's.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response};
use http_body_util::BodyExt;

use super::forward::forward;
use super::Pipeline;
use crate::body::{full, ProxyBody};
use crate::error::ProxyError;

/// LINE's token forms are a few hundred bytes (a JWT assertion included); the
/// answers a few hundred more.
const MAX_FORM_BYTES: usize = 64 * 1024;
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The endpoints that issue channel access tokens (docs/channels.md).
const ISSUERS: [&str; 3] = [
    "/v2/oauth/accessToken",
    "/oauth2/v2.1/token",
    "/oauth2/v3/token",
];

/// Whether this request asks LINE for a token.
pub(crate) fn is_issuance(method: &Method, path: &str) -> bool {
    method == Method::POST && ISSUERS.contains(&path)
}

/// Forwards a token request and learns the issued token's channel from LINE's answer.
pub(crate) async fn forward_issuance(
    p: &Arc<Pipeline>,
    req: Request<ProxyBody>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    let form =
        match tokio::time::timeout(p.intake.body_timeout, collect(body, MAX_FORM_BYTES)).await {
            Err(_) => return Err(ProxyError::BodyTimeout),
            Ok(Err(Collect::TooLarge)) => {
                return Err(ProxyError::TokenRequestTooLarge {
                    limit: MAX_FORM_BYTES,
                })
            }
            Ok(Err(Collect::Broken)) => return Err(ProxyError::ClientBody),
            Ok(Ok(form)) => form,
        };
    let channel_id = channel_id_of_form(&form);
    let uri = p.upstream.uri(parts.uri.path_and_query());
    let response = forward(p, &mut parts, full(form), uri).await?;
    let Some(channel_id) = channel_id else {
        return Ok(response);
    };
    if !response.status().is_success() {
        return Ok(response);
    }
    // A 2xx is read whole (it is small) to learn the token, then given back as it was.
    let (head, body) = response.into_parts();
    let answer = match collect(body, MAX_ANSWER_BYTES).await {
        Ok(answer) => answer,
        Err(_) => return Err(ProxyError::Forward(crate::domain::AttemptFailure::Reset)),
    };
    if let Some((token, lifetime)) = issued_token(&answer) {
        p.learn_issued(token, channel_id, lifetime);
    }
    Ok(Response::from_parts(head, full(answer)))
}

enum Collect {
    TooLarge,
    Broken,
}

/// A whole small body, at most `limit` bytes.
async fn collect(mut body: ProxyBody, limit: usize) -> Result<Bytes, Collect> {
    let mut out = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| Collect::Broken)?.into_data() else {
            continue;
        };
        if out.len() + data.len() > limit {
            return Err(Collect::TooLarge);
        }
        out.extend_from_slice(&data);
    }
    Ok(out.freeze())
}

/// The channel id a token form names: `client_id`, else the `iss` of its
/// `client_assertion` (LINE requires `iss` and `sub` to be the channel id).
fn channel_id_of_form(form: &[u8]) -> Option<Box<str>> {
    let mut client_id = None;
    let mut assertion = None;
    for (name, value) in url::form_urlencoded::parse(form) {
        match name.as_ref() {
            "client_id" => client_id = Some(value.into_owned()),
            "client_assertion" => assertion = Some(value.into_owned()),
            _ => {}
        }
    }
    let id = match client_id {
        Some(id) => id,
        None => assertion_issuer(&assertion?)?,
    };
    // LINE's channel ids are numbers; anything else is not one.
    (!id.is_empty() && id.len() <= 20 && id.bytes().all(|b| b.is_ascii_digit()))
        .then(|| id.into_boxed_str())
}

/// The `iss` of a JWT (its signature is LINE's to check; a forged one gets no 2xx).
fn assertion_issuer(jwt: &str) -> Option<String> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let iss = claims.get("iss")?.as_str()?;
    match claims.get("sub").and_then(|s| s.as_str()) {
        Some(sub) if sub != iss => None,
        _ => Some(iss.to_owned()),
    }
}

/// LINE's issue answer: the token and how long it lives.
fn issued_token(answer: &[u8]) -> Option<(String, Duration)> {
    let value: serde_json::Value = serde_json::from_slice(answer).ok()?;
    let token = value.get("access_token")?.as_str()?;
    let lifetime = value.get("expires_in")?.as_u64()?;
    (!token.is_empty()).then(|| (token.to_owned(), Duration::from_secs(lifetime)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!(
            "{}.{}.c2ln",
            b64(r#"{"alg":"RS256","typ":"JWT","kid":"k"}"#),
            b64(claims)
        )
    }

    #[test]
    fn the_channel_id_comes_from_client_id_or_the_assertion() {
        assert_eq!(
            channel_id_of_form(
                b"grant_type=client_credentials&client_id=1650000001&client_secret=s"
            )
            .as_deref(),
            Some("1650000001")
        );
        let assertion =
            jwt(r#"{"iss":"1650000002","sub":"1650000002","aud":"https://api.line.me/"}"#);
        let form = format!(
            "grant_type=client_credentials&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={assertion}"
        );
        assert_eq!(
            channel_id_of_form(form.as_bytes()).as_deref(),
            Some("1650000002")
        );
        let other = jwt(r#"{"iss":"1650000002","sub":"1650000003"}"#);
        assert_eq!(
            channel_id_of_form(format!("client_assertion={other}").as_bytes()),
            None
        );
        for bad in [
            &b"client_id=abc"[..],
            b"client_id=",
            b"grant_type=client_credentials",
            b"client_assertion=not.a-jwt.x",
            b"\xff\xfe",
        ] {
            assert_eq!(channel_id_of_form(bad), None, "{bad:?}");
        }
    }

    proptest::proptest! {
        /// Forms, assertions and answers are the bot's and LINE's bytes: never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes: Vec<u8>, text in ".{0,200}") {
            let _ = channel_id_of_form(&bytes);
            let _ = channel_id_of_form(format!("client_assertion={text}").as_bytes());
            let _ = assertion_issuer(&text);
            let _ = issued_token(&bytes);
        }
    }

    #[test]
    fn the_issued_token_and_its_lifetime() {
        assert_eq!(
            issued_token(br#"{"access_token":"tok","expires_in":900,"token_type":"Bearer"}"#),
            Some(("tok".to_owned(), Duration::from_secs(900)))
        );
        for bad in [
            &br#"{"access_token":"","expires_in":900}"#[..],
            br#"{"access_token":"tok"}"#,
            br#"{"expires_in":900}"#,
            br#"{"access_token":"tok","expires_in":-1}"#,
            b"<html>",
        ] {
            assert_eq!(issued_token(bad), None);
        }
    }
}
