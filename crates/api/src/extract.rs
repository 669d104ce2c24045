//! Request extractors whose rejections use the error envelope: the authenticated caller,
//! JSON bodies, query parameters (including the contract's flag booleans) and path UUIDs.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use boxwood_core::Service;
use boxwood_core::auth::Caller;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::error::ApiError;

/// The caller behind the request's bearer token. The optional `Project` header is accepted
/// with any value and not interpreted (JWT-style clients never send it; the SDK sends junk).
pub struct Auth(pub Caller);

impl FromRequestParts<Service> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, svc: &Service) -> Result<Self, ApiError> {
        let bearer = bearer_token(&parts.headers);
        Ok(Auth(svc.authenticate(bearer).await?))
    }
}

/// The token of an `Authorization: Bearer …` header (the scheme in any case).
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A JSON body, parsed whatever the `Content-Type`; malformed JSON or wrong types are 400.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::new(e.status(), format!("could not read the request body: {e}")))?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

/// Raw query pairs, in order (repeated keys kept).
pub struct QueryPairs(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for QueryPairs {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let q = parts.uri.query().unwrap_or("");
        let pairs = url_pairs(q);
        Ok(QueryPairs(pairs))
    }
}

fn url_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl QueryPairs {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Every value of a repeated parameter, in order.
    pub fn all(&self, key: &str) -> Vec<String> {
        self.0.iter().filter(|(k, _)| k == key).map(|(_, v)| v.clone()).collect()
    }

    /// A contract flag: present without a value, `1` or `true` mean true; absent, `0` or
    /// `false` mean false.
    pub fn flag(&self, key: &str) -> Result<bool, ApiError> {
        match self.get(key) {
            None | Some("0") | Some("false") => Ok(false),
            Some("") | Some("1") | Some("true") => Ok(true),
            Some(v) => Err(ApiError::bad_request(format!("{key} must be 0 or 1, got {v:?}"))),
        }
    }

    /// An optional integer; garbage is a 400, not silently ignored.
    pub fn int(&self, key: &str) -> Result<Option<i64>, ApiError> {
        match self.get(key) {
            None | Some("") => Ok(None),
            Some(v) => {
                v.parse().map(Some).map_err(|_| ApiError::bad_request(format!("{key} must be an integer, got {v:?}")))
            }
        }
    }

    /// An optional non-empty string.
    pub fn text(&self, key: &str) -> Option<String> {
        self.get(key).filter(|v| !v.is_empty()).map(str::to_owned)
    }
}

pub fn parse_uuid(what: &str, s: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(s).map_err(|_| ApiError::bad_request(format!("invalid {what} UUID {s:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_queries_like_clients_send_them() {
        let q = QueryPairs(url_pairs("since=2025-01-01T12%3A00%3A00%2B00%3A00&tagged&tag=a%2Fb&x=1+2&bad=%zz&tail=%4"));
        assert_eq!(q.get("since"), Some("2025-01-01T12:00:00+00:00"));
        assert!(q.flag("tagged").unwrap());
        assert!(!q.flag("missing").unwrap());
        assert_eq!(q.get("tag"), Some("a/b"));
        assert_eq!(q.get("x"), Some("1 2"));
        assert_eq!(q.get("bad"), Some("%zz"));
        assert_eq!(q.get("tail"), Some("%4"));
        assert!(q.int("tag").is_err());
        assert!(QueryPairs(url_pairs("follow=yes")).flag("follow").is_err());
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "bearer abc".parse().unwrap());
        assert_eq!(bearer_token(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&h), None);
    }
}
