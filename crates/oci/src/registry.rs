//! A small Docker Registry HTTP API v2 / OCI distribution client: manifests and blobs over
//! reqwest, anonymous / Basic / Bearer-token auth, and mirrors tried before the registry itself.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use reqwest::header::{ACCEPT, CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::{Response, StatusCode, Url};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use crate::manifest::{MANIFEST_ACCEPT, MAX_DOCUMENT};
use crate::netguard::{Blocked, NetGuard};
use crate::source::DOCKER_HUB;
use crate::{Credentials, OciError, RegistryConfig, io_err};

/// One base URL to send `/v2/…` requests to.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    /// `scheme://host[:port][/prefix]`, no trailing slash.
    pub base: String,
    pub mirror: bool,
}

/// What a 401 asked for.
enum Challenge {
    Basic,
    Bearer { realm: String, service: Option<String>, scope: Option<String> },
    Unknown(String),
}

/// How a request to one endpoint authenticates, learnt from its first 401.
#[derive(Clone)]
enum Auth {
    Basic,
    Bearer(String),
}

pub(crate) struct RegistryClient {
    http: reqwest::Client,
    guard: NetGuard,
    config: RegistryConfig,
    /// (endpoint base, repository, sha256 of the credentials) → how to authenticate. Keyed by the
    /// credentials too, so a token obtained with one caller's credentials never serves another's.
    auth: Mutex<HashMap<(String, String, String), Auth>>,
}

impl RegistryClient {
    pub fn new(config: RegistryConfig) -> Self {
        let guard = NetGuard::new(trusted_hosts(&config));
        let redirects = guard.clone();
        let http = reqwest::Client::builder()
            .user_agent(concat!("boxwood-oci/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(guard.clone()))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    attempt.error("too many redirects")
                } else if let Err(blocked) = redirects.check_url(attempt.url()) {
                    attempt.error(blocked)
                } else {
                    attempt.follow()
                }
            }))
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(120))
            .build()
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "falling back to a default HTTP client");
                reqwest::Client::new()
            });
        Self { http, guard, config, auth: Mutex::new(HashMap::new()) }
    }

    /// A GET to `url`, refused up front when its host is an internal IP literal.
    fn get_request(&self, url: &Url) -> Result<reqwest::RequestBuilder, OciError> {
        self.guard.check_url(url).map_err(|b| OciError::Blocked { host: b.host })?;
        Ok(self.http.get(url.clone()))
    }

    /// The mirrors configured for `host`, in order, then the registry itself.
    pub fn endpoints(&self, host: &str) -> Vec<Endpoint> {
        // Docker Hub mirrors may be listed under any of its names.
        let aliases: &[&str] =
            if host == DOCKER_HUB { &[DOCKER_HUB, "index.docker.io", "registry-1.docker.io"] } else { &[host] };
        let mut out: Vec<Endpoint> = aliases
            .iter()
            .filter_map(|h| self.config.mirrors.get(*h))
            .flatten()
            .map(|m| {
                let m = m.trim_end_matches('/');
                // A mirror given without a scheme gets the one its host would get.
                let base = if m.contains("://") {
                    m.to_string()
                } else {
                    let mirror_host = m.split('/').next().unwrap_or(m);
                    format!("{}://{m}", if self.is_insecure(mirror_host) { "http" } else { "https" })
                };
                Endpoint { base, mirror: true }
            })
            .collect();
        let api_host = if host == DOCKER_HUB { "registry-1.docker.io" } else { host };
        let scheme = if self.is_insecure(host) { "http" } else { "https" };
        out.push(Endpoint { base: format!("{scheme}://{api_host}"), mirror: false });
        out
    }

    /// Plain http for hosts listed as insecure and, as Docker does, for loopback registries.
    fn is_insecure(&self, host: &str) -> bool {
        if self.config.insecure.iter().any(|h| h.eq_ignore_ascii_case(host)) {
            return true;
        }
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(v6),
            None => host.rsplit_once(':').map_or(host, |(n, _)| n),
        };
        name == "localhost" || name == "::1" || name.starts_with("127.")
    }

    /// GETs a manifest; returns its bytes and content type.
    pub async fn get_manifest(
        &self,
        ep: &Endpoint,
        repo: &str,
        reference: &str,
        creds: Option<&Credentials>,
    ) -> Result<(Vec<u8>, Option<String>), OciError> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", ep.base);
        let sep = if reference.starts_with("sha256:") { '@' } else { ':' };
        let what = format!("manifest {repo}{sep}{reference}");
        let resp = self.get(ep, repo, &url, Some(MANIFEST_ACCEPT), creds, &what).await?;
        let content_type = resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = read_limited(resp, &url, MAX_DOCUMENT).await?;
        Ok((body, content_type))
    }

    /// GETs a small blob (a config) into memory.
    pub async fn get_blob_bytes(
        &self,
        ep: &Endpoint,
        repo: &str,
        digest: &str,
        creds: Option<&Credentials>,
    ) -> Result<Vec<u8>, OciError> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", ep.base);
        let resp = self.get(ep, repo, &url, None, creds, &format!("blob {digest} of {repo}")).await?;
        read_limited(resp, &url, MAX_DOCUMENT).await
    }

    /// Streams a blob to `dest`, checking its size and sha256 on the way; `dest` is removed on error.
    pub async fn download_blob(
        &self,
        ep: &Endpoint,
        repo: &str,
        digest: &str,
        size: u64,
        creds: Option<&Credentials>,
        dest: &Path,
    ) -> Result<(), OciError> {
        let result = self.download_inner(ep, repo, digest, size, creds, dest).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(dest).await;
        }
        result
    }

    async fn download_inner(
        &self,
        ep: &Endpoint,
        repo: &str,
        digest: &str,
        size: u64,
        creds: Option<&Credentials>,
        dest: &Path,
    ) -> Result<(), OciError> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", ep.base);
        let resp = self.get(ep, repo, &url, None, creds, &format!("blob {digest} of {repo}")).await?;
        let mut file = tokio::fs::File::create(dest).await.map_err(io_err(dest))?;
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| OciError::Transfer { url: url.clone(), reason: error_chain(&e) })?;
            written += chunk.len() as u64;
            if size > 0 && written > size {
                return Err(OciError::DigestMismatch {
                    what: format!("layer {digest}"),
                    expected: format!("{size} bytes"),
                    actual: format!("more than {size} bytes"),
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io_err(dest))?;
        }
        file.flush().await.map_err(io_err(dest))?;
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest {
            return Err(OciError::DigestMismatch { what: format!("layer {digest}"), expected: digest.into(), actual });
        }
        if size > 0 && written != size {
            return Err(OciError::DigestMismatch {
                what: format!("layer {digest}"),
                expected: format!("{size} bytes"),
                actual: format!("{written} bytes"),
            });
        }
        Ok(())
    }

    /// A GET that authenticates as the registry asks and maps failures to typed errors.
    async fn get(
        &self,
        ep: &Endpoint,
        repo: &str,
        url: &str,
        accept: Option<&str>,
        creds: Option<&Credentials>,
        what: &str,
    ) -> Result<Response, OciError> {
        let who = creds.map_or(String::new(), |c| {
            hex::encode(Sha256::digest(format!("{}\0{}", c.username, c.password).as_bytes()))
        });
        let key = (ep.base.clone(), repo.to_string(), who);
        let cached = self.auth.lock().ok().and_then(|m| m.get(&key).cloned());
        let mut resp = self.send(url, accept, cached.as_ref(), creds).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            let challenge = parse_challenge(resp.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()));
            let auth = match challenge {
                Challenge::Basic => match creds {
                    Some(_) => Auth::Basic,
                    None => return Err(unauthorized(ep, false, error_detail(resp).await)),
                },
                Challenge::Bearer { realm, service, scope } => {
                    let scope = scope.unwrap_or_else(|| format!("repository:{repo}:pull"));
                    Auth::Bearer(self.fetch_token(ep, &realm, service.as_deref(), &scope, creds).await?)
                }
                Challenge::Unknown(header) => {
                    return Err(unauthorized(ep, creds.is_some(), format!("unsupported challenge {header:?}")));
                }
            };
            resp = self.send(url, accept, Some(&auth), creds).await?;
            if resp.status() == StatusCode::UNAUTHORIZED {
                return Err(unauthorized(ep, creds.is_some(), error_detail(resp).await));
            }
            if let Ok(mut m) = self.auth.lock() {
                m.insert(key, auth);
            }
        }
        match resp.status() {
            s if s.is_success() => Ok(resp),
            StatusCode::FORBIDDEN => Err(OciError::Denied {
                registry: ep.base.clone(),
                repository: repo.to_string(),
                detail: error_detail(resp).await,
            }),
            StatusCode::NOT_FOUND => Err(OciError::NotFound {
                registry: ep.base.clone(),
                what: what.into(),
                detail: error_detail(resp).await,
            }),
            s => Err(OciError::Registry { url: url.to_string(), status: s.as_u16(), detail: error_detail(resp).await }),
        }
    }

    async fn send(
        &self,
        url: &str,
        accept: Option<&str>,
        auth: Option<&Auth>,
        creds: Option<&Credentials>,
    ) -> Result<Response, OciError> {
        let parsed =
            Url::parse(url).map_err(|_| OciError::Transfer { url: url.to_owned(), reason: "invalid URL".into() })?;
        let mut req = self.get_request(&parsed)?;
        if let Some(a) = accept {
            req = req.header(ACCEPT, a);
        }
        req = match (auth, creds) {
            (Some(Auth::Bearer(token)), _) => req.bearer_auth(token),
            (Some(Auth::Basic), Some(c)) => req.basic_auth(&c.username, Some(&c.password)),
            _ => req,
        };
        req.send().await.map_err(|e| transport_error(url, &e))
    }

    /// The standard token exchange: GET realm?service=…&scope=…, with Basic credentials if any.
    async fn fetch_token(
        &self,
        ep: &Endpoint,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        creds: Option<&Credentials>,
    ) -> Result<String, OciError> {
        let mut url = Url::parse(realm)
            .map_err(|e| unauthorized(ep, creds.is_some(), format!("invalid token realm {realm:?}: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let mut req = self.get_request(&url)?;
        if let Some(c) = creds {
            req = req.basic_auth(&c.username, Some(&c.password));
        }
        let resp = req.send().await.map_err(|e| transport_error(url.as_str(), &e))?;
        match resp.status() {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                let detail = format!("token server {realm}: {}", error_detail(resp).await);
                return Err(unauthorized(ep, creds.is_some(), detail));
            }
            s => {
                return Err(OciError::Registry {
                    url: url.to_string(),
                    status: s.as_u16(),
                    detail: error_detail(resp).await,
                });
            }
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let body = read_limited(resp, url.as_str(), 1 << 20).await?;
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| unauthorized(ep, creds.is_some(), format!("bad token response: {e}")))?;
        parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthorized(ep, creds.is_some(), "token response without a token".into()))
    }
}

/// Registries redirect blob downloads to storage hosts; more hops than this is a loop.
const MAX_REDIRECTS: usize = 10;

/// Mirror hosts and the operator's `allow_hosts`: reachable whatever they resolve to.
fn trusted_hosts(config: &RegistryConfig) -> Vec<String> {
    let mirrors = config.mirrors.values().flatten().filter_map(|m| {
        let with_scheme = if m.contains("://") { m.clone() } else { format!("https://{m}") };
        Url::parse(&with_scheme).ok()?.host_str().map(str::to_owned)
    });
    mirrors.chain(config.allow_hosts.iter().cloned()).collect()
}

fn unauthorized(ep: &Endpoint, credentials_given: bool, detail: String) -> OciError {
    OciError::Unauthorized { registry: ep.base.clone(), credentials_given, detail }
}

fn transport_error(url: &str, e: &reqwest::Error) -> OciError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(b) = s.downcast_ref::<Blocked>() {
            return OciError::Blocked { host: b.host.clone() };
        }
        source = s.source();
    }
    if e.is_connect() || e.is_timeout() {
        OciError::Connect { url: url.to_string(), reason: error_chain(e) }
    } else {
        OciError::Transfer { url: url.to_string(), reason: error_chain(e) }
    }
}

/// The error and its sources, e.g. "error sending request: … : Connection refused (os error 111)".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The registry's `{"errors":[{"code","message"}]}` as text, or the body's start.
async fn error_detail(resp: Response) -> String {
    let status = resp.status();
    let body = resp.bytes().await.unwrap_or_default();
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorItem>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorItem {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    if let Ok(e) = serde_json::from_slice::<Errors>(&body)
        && !e.errors.is_empty()
    {
        return e.errors.iter().map(|i| format!("{}: {}", i.code, i.message)).collect::<Vec<_>>().join("; ");
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]).trim().to_string();
    if text.is_empty() { status.to_string() } else { text }
}

async fn read_limited(resp: Response, url: &str, limit: u64) -> Result<Vec<u8>, OciError> {
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| OciError::Transfer { url: url.to_string(), reason: error_chain(&e) })?;
        if (out.len() + chunk.len()) as u64 > limit {
            return Err(OciError::Transfer {
                url: url.to_string(),
                reason: format!("document larger than {limit} bytes"),
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Parses `Basic realm=…` / `Bearer realm="…",service="…",scope="…"`.
fn parse_challenge(header: Option<&str>) -> Challenge {
    let Some(header) = header else { return Challenge::Unknown("(no WWW-Authenticate header)".into()) };
    let (scheme, params) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Challenge::Basic;
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Challenge::Unknown(header.to_string());
    }
    let mut map = HashMap::new();
    let mut rest = params.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else { break };
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.split_once('"') {
                Some((v, a)) => (v.to_string(), a),
                None => (quoted.to_string(), ""),
            }
        } else {
            match after.split_once(',') {
                Some((v, a)) => (v.trim().to_string(), a),
                None => (after.trim().to_string(), ""),
            }
        };
        map.insert(key, value);
        rest = after.trim_start_matches([',', ' ']);
    }
    match map.remove("realm") {
        Some(realm) => Challenge::Bearer { realm, service: map.remove("service"), scope: map.remove("scope") },
        None => Challenge::Unknown(header.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let h = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#;
        match parse_challenge(Some(h)) {
            Challenge::Bearer { realm, service, scope } => {
                assert_eq!(realm, "https://auth.docker.io/token");
                assert_eq!(service.as_deref(), Some("registry.docker.io"));
                assert_eq!(scope.as_deref(), Some("repository:library/busybox:pull"));
            }
            _ => panic!("not bearer"),
        }
        assert!(matches!(parse_challenge(Some(r#"Basic realm="basic-realm""#)), Challenge::Basic));
        assert!(matches!(parse_challenge(None), Challenge::Unknown(_)));
    }

    #[test]
    fn endpoints_and_schemes() {
        let mut config = RegistryConfig::default();
        config.mirrors.insert("docker.io".into(), vec!["http://127.0.0.1:5000/".into()]);
        config.mirrors.insert("quay.io".into(), vec!["127.0.0.1:5001".into(), "mirror.lan/quay".into()]);
        config.insecure.push("reg.lan:5000".into());
        let c = RegistryClient::new(config);
        let eps: Vec<_> = c.endpoints("docker.io").into_iter().map(|e| e.base).collect();
        assert_eq!(eps, ["http://127.0.0.1:5000", "https://registry-1.docker.io"]);
        let eps: Vec<_> = c.endpoints("quay.io").into_iter().map(|e| e.base).collect();
        assert_eq!(eps, ["http://127.0.0.1:5001", "https://mirror.lan/quay", "https://quay.io"]);
        assert_eq!(c.endpoints("reg.lan:5000")[0].base, "http://reg.lan:5000");
        assert_eq!(c.endpoints("127.0.0.1:9")[0].base, "http://127.0.0.1:9");
        assert_eq!(c.endpoints("[::1]:9")[0].base, "http://[::1]:9");
        assert_eq!(c.endpoints("ghcr.io")[0].base, "https://ghcr.io");
    }
}
