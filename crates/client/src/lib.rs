//! A typed async client of Boxwood's Contree v1 API, on the wire types the server itself
//! uses (`boxwood-types`): every endpoint, operation event streams that resume after a broken
//! connection ([`Client::events`]), retries with backoff for idempotent calls only, and
//! errors that carry the server's own `{"error", "status"}` ([`ClientError::Api`]).

mod error;
mod sse;

use std::time::Duration;

pub use boxwood_types as types;
use boxwood_types::{
    DirectoryState, DirectoryStateRequest, EventView, ExecRequest, FileList, FileResponse, FileView, ImageList,
    ImageView, ImportRequest, LineageView, OperationCreated, OperationKind, OperationResponse, OperationStatus,
    OperationSummary, ProcessCreated, Readiness, SpawnRequest, SpawnResponse, StdinRequest, TagRequest, WhoAmI,
};
pub use error::ClientError;
use futures::Stream;
use reqwest::{Method, RequestBuilder, Response, StatusCode, header};
use serde::de::DeserializeOwned;
pub use sse::EventsOptions;

/// Attempts of an idempotent call (the first included).
const ATTEMPTS: u32 = 4;
/// Longest `Retry-After` honoured; a longer one is returned as the error.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);
/// A JSON call's whole answer (streams, downloads and uploads have none: they take as long
/// as their bytes do).
const CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// A Boxwood (or Contree) server and the token to call it with. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    /// The server's root, ending in `/`.
    base: url::Url,
    auth: header::HeaderValue,
}

/// `GET /operations` filters.
#[derive(Debug, Clone, Default)]
pub struct OperationQuery {
    pub status: Option<OperationStatus>,
    pub kind: Option<OperationKind>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

/// `GET /images` filters.
#[derive(Debug, Clone, Default)]
pub struct ImageQuery {
    /// Only tagged images.
    pub tagged: bool,
    /// Tags starting with this.
    pub tag: Option<String>,
    pub uuid: Option<String>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

impl Client {
    /// A client of the server at `url` (its root, e.g. `http://127.0.0.1:8080`; a trailing
    /// `/v1` is accepted too).
    pub fn new(url: &str, token: &str) -> Result<Self, ClientError> {
        let mut base = url::Url::parse(url).map_err(|_| ClientError::BadUrl(url.into()))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(ClientError::BadUrl(url.into()));
        }
        let path = base.path().trim_end_matches('/').trim_end_matches("/v1").to_owned();
        base.set_path(&format!("{path}/"));
        let mut auth = header::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| ClientError::BadToken)?;
        auth.set_sensitive(true);
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // The API's redirects (tag lookups) are read, not followed.
            .redirect(reqwest::redirect::Policy::none())
            // Below the server's idle cut-off (30 s by default): a request is never sent on a
            // connection the server is closing.
            .pool_idle_timeout(Duration::from_secs(15))
            .build()
            .map_err(|e| ClientError::Unreachable { url: url.into(), source: e })?;
        Ok(Self { http, base, auth })
    }

    /// The server's root URL.
    pub fn url(&self) -> &str {
        self.base.as_str()
    }

    /// A short one-way fingerprint (hex) of the server and the token: keys a local cache of
    /// what the token's namespace holds, without a call and without writing the token down.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(self.base.as_str());
        h.update([0]);
        h.update(self.auth.as_bytes());
        hex::encode(&h.finalize()[..8])
    }

    fn unreachable(&self, source: reqwest::Error) -> ClientError {
        ClientError::Unreachable { url: self.base.to_string(), source }
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        // `path` is ours, relative and already escaped; joining it cannot fail.
        let url = self.base.join(path).unwrap_or_else(|_| self.base.clone());
        self.http.request(method, url).header(header::AUTHORIZATION, self.auth.clone())
    }

    /// Sends `build()`'s request, honouring `Retry-After`: an idempotent one again after a
    /// connection failure or a 425/429/502/503/504; any other only after a 425 or 429, which
    /// the server answers before doing anything.
    async fn send(
        &self,
        idempotent: bool,
        build: impl Fn() -> RequestBuilder,
        retry_on: &[StatusCode],
    ) -> Result<Response, ClientError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let last = attempt >= ATTEMPTS;
            match build().send().await {
                Ok(resp) if resp.status().is_success() || resp.status().is_redirection() => return Ok(resp),
                Ok(resp) => {
                    let status = resp.status();
                    let transient = match status.as_u16() {
                        425 | 429 => true,
                        502..=504 => idempotent,
                        _ => idempotent && retry_on.contains(&status),
                    };
                    let wait = retry_after(&resp).unwrap_or_else(|| sse::backoff(attempt));
                    if last || !transient || wait > MAX_RETRY_AFTER {
                        return Err(api_error(resp).await);
                    }
                    tokio::time::sleep(wait).await;
                }
                Err(e) if idempotent && !last && (e.is_connect() || e.is_timeout()) => {
                    tokio::time::sleep(sse::backoff(attempt)).await;
                }
                Err(e) => return Err(self.unreachable(e)),
            }
        }
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str, query: &[(&str, String)]) -> Result<T, ClientError> {
        let resp = self.send(true, || self.request(Method::GET, path).query(query).timeout(CALL_TIMEOUT), &[]).await?;
        json(resp, path).await
    }

    async fn post_json<T: DeserializeOwned>(&self, path: &str, body: &impl serde::Serialize) -> Result<T, ClientError> {
        let resp = self.send(false, || self.request(Method::POST, path).json(body).timeout(CALL_TIMEOUT), &[]).await?;
        json(resp, path).await
    }

    /// `GET /v1/whoami`: the token's namespace, permissions and limits.
    pub async fn whoami(&self) -> Result<WhoAmI, ClientError> {
        self.get_json("v1/whoami", &[]).await
    }

    /// `GET /readyz` (no token needed): a server that is not ready answers 503 with its checks,
    /// which are returned, not an error.
    pub async fn readiness(&self) -> Result<Readiness, ClientError> {
        let resp = self.request(Method::GET, "readyz").timeout(CALL_TIMEOUT).send().await;
        let resp = resp.map_err(|e| self.unreachable(e))?;
        match resp.status() {
            StatusCode::OK | StatusCode::SERVICE_UNAVAILABLE => json(resp, "readyz").await,
            _ => Err(api_error(resp).await),
        }
    }

    /// `POST /v1/instances`: starts a run (never retried: it would start another).
    pub async fn spawn(&self, req: &SpawnRequest) -> Result<SpawnResponse, ClientError> {
        self.post_json("v1/instances", req).await
    }

    /// `GET /v1/operations/{id}` (`inflight`: the result so far of a running instance).
    pub async fn operation(&self, id: &str, inflight: bool) -> Result<OperationResponse, ClientError> {
        let query = if inflight { vec![("inflight", "1".to_owned())] } else { Vec::new() };
        self.get_json(&format!("v1/operations/{}", seg(id)?), &query).await
    }

    /// `GET /v1/operations`, newest first.
    pub async fn operations(&self, q: &OperationQuery) -> Result<Vec<OperationSummary>, ClientError> {
        let mut query = Vec::new();
        if let Some(s) = q.status {
            query.push(("status", s.as_str().to_owned()));
        }
        if let Some(k) = q.kind {
            query.push(("kind", k.as_str().to_owned()));
        }
        page(&mut query, q.limit, q.offset);
        self.get_json("v1/operations", &query).await
    }

    /// `DELETE /v1/operations/{id}`: cancels an active operation. A 409 (it is terminal)
    /// after a retried attempt is success when the operation did end CANCELLED: the first
    /// attempt's answer was lost, not its effect.
    pub async fn cancel(&self, id: &str) -> Result<(), ClientError> {
        let path = format!("v1/operations/{}", seg(id)?);
        match self.send(true, || self.request(Method::DELETE, &path).timeout(CALL_TIMEOUT), &[]).await {
            Ok(_) => Ok(()),
            Err(e @ ClientError::Api { status: 409, .. }) => match self.operation(id, false).await {
                Ok(op) if op.summary.status == OperationStatus::Cancelled => Ok(()),
                _ => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// `GET /v1/operations/{id}/events`: the operation's events in order, each once. A broken
    /// connection (or the server's `sse_error`) is resumed after the last event received;
    /// keepalives are skipped. With `follow` the stream ends after `completion`.
    pub fn events(
        &self,
        id: &str,
        options: EventsOptions,
    ) -> impl Stream<Item = Result<EventView, ClientError>> + Send + 'static {
        sse::follow(self.clone(), id.to_owned(), options)
    }

    pub(crate) async fn open_events(
        &self,
        id: &str,
        options: EventsOptions,
        after: Option<i64>,
    ) -> Result<Response, ClientError> {
        let path = format!("v1/operations/{}/events", seg(id)?);
        let mut query = vec![("follow", if options.follow { "1" } else { "0" }.to_owned())];
        if let Some(spid) = options.spid {
            query.push(("spid", spid.to_string()));
        }
        self.send(
            true,
            || {
                let req = self.request(Method::GET, &path).query(&query).header(header::ACCEPT, "text/event-stream");
                match after {
                    Some(id) => req.header("Last-Event-Id", id.to_string()),
                    None => req,
                }
            },
            // Finished but its log not yet durable: the server says when to come back.
            &[StatusCode::GONE],
        )
        .await
    }

    /// Waits for the operation to end and returns it: a run through its event stream, an
    /// import (it has no events) by polling.
    pub async fn wait(&self, id: &str) -> Result<OperationResponse, ClientError> {
        use futures::TryStreamExt as _;
        let op = self.operation(id, false).await?;
        if op.summary.status.is_terminal() {
            return Ok(op);
        }
        if op.summary.kind == OperationKind::Instance {
            let events = self.events(id, EventsOptions { follow: true, ..Default::default() });
            futures::pin_mut!(events);
            while events.try_next().await?.is_some() {}
            return self.operation(id, false).await;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let op = self.operation(id, false).await?;
            if op.summary.status.is_terminal() {
                return Ok(op);
            }
        }
    }

    /// `POST /v1/operations/{id}/subprocesses`: another command in a running instance.
    pub async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ProcessCreated, ClientError> {
        self.post_json(&format!("v1/operations/{}/subprocesses", seg(id)?), req).await
    }

    /// `POST /v1/operations/{id}/subprocesses/{spid}/stdin`.
    pub async fn write_stdin(&self, id: &str, spid: i64, req: &StdinRequest) -> Result<(), ClientError> {
        let path = format!("v1/operations/{}/subprocesses/{spid}/stdin", seg(id)?);
        self.send(false, || self.request(Method::POST, &path).json(req), &[]).await.map(drop)
    }

    /// `DELETE /v1/operations/{id}/subprocesses/{spid}?signal=…`: signals a process group.
    pub async fn signal(&self, id: &str, spid: i64, signal: &str) -> Result<(), ClientError> {
        let path = format!("v1/operations/{}/subprocesses/{spid}", seg(id)?);
        let query = [("signal", signal.to_owned())];
        self.send(false, || self.request(Method::DELETE, &path).query(&query), &[]).await.map(drop)
    }

    /// `GET /v1/images`.
    pub async fn images(&self, q: &ImageQuery) -> Result<Vec<ImageView>, ClientError> {
        let mut query = Vec::new();
        if q.tagged {
            query.push(("tagged", "1".to_owned()));
        }
        if let Some(tag) = &q.tag {
            query.push(("tag", tag.clone()));
        }
        if let Some(uuid) = &q.uuid {
            query.push(("uuid", uuid.clone()));
        }
        page(&mut query, q.limit, q.offset);
        self.get_json::<ImageList>("v1/images", &query).await.map(|l| l.images)
    }

    /// `GET /v1/inspect/{uuid}/`: one image.
    pub async fn image(&self, uuid: &str) -> Result<ImageView, ClientError> {
        self.get_json(&format!("v1/inspect/{}/", seg(uuid)?), &[]).await
    }

    /// `GET /v1/inspect/?tag=`: the image a tag names (the server answers with a redirect).
    pub async fn image_by_tag(&self, tag: &str) -> Result<ImageView, ClientError> {
        let query = [("tag", tag.to_owned())];
        let resp = self.send(true, || self.request(Method::GET, "v1/inspect/").query(&query), &[]).await?;
        let location = resp.headers().get(header::LOCATION).and_then(|l| l.to_str().ok()).unwrap_or("");
        let uuid = location.trim_end_matches('/').rsplit('/').next().unwrap_or("");
        if uuid.is_empty() {
            return Err(ClientError::Api {
                status: resp.status().as_u16(),
                message: format!("the server answered the lookup of tag {tag} without naming an image"),
            });
        }
        self.image(uuid).await
    }

    /// `POST /v1/images/import`: starts an import; follow it with [`Self::operation`].
    pub async fn import(&self, req: &ImportRequest) -> Result<OperationCreated, ClientError> {
        self.post_json("v1/images/import", req).await
    }

    /// `PATCH /v1/images/{uuid}/tag`: moves `tag` to the image.
    pub async fn set_tag(&self, uuid: &str, tag: &str) -> Result<ImageView, ClientError> {
        let path = format!("v1/images/{}/tag", seg(uuid)?);
        let body = TagRequest { tag: tag.to_owned() };
        let resp = self.send(true, || self.request(Method::PATCH, &path).json(&body), &[]).await?;
        json(resp, &path).await
    }

    /// `DELETE /v1/images/{uuid}/tag` (`tag`: only if it is that one).
    pub async fn delete_tag(&self, uuid: &str, tag: Option<&str>) -> Result<(), ClientError> {
        let path = format!("v1/images/{}/tag", seg(uuid)?);
        let query: Vec<(&str, String)> = tag.map(|t| ("tag", t.to_owned())).into_iter().collect();
        self.send(true, || self.request(Method::DELETE, &path).query(&query), &[]).await.map(drop)
    }

    /// Boxwood's `GET /v1/images/{uuid}/lineage`.
    pub async fn lineage(&self, uuid: &str) -> Result<LineageView, ClientError> {
        self.get_json(&format!("v1/images/{}/lineage", seg(uuid)?), &[]).await
    }

    /// `POST /v1/files`: uploads bytes (sent once: the body is consumed).
    pub async fn upload(&self, body: impl Into<reqwest::Body>) -> Result<FileResponse, ClientError> {
        let req = self.request(Method::POST, "v1/files").header(header::CONTENT_TYPE, "application/octet-stream");
        let resp = req.body(body).send().await;
        let resp = resp.map_err(|e| self.unreachable(e))?;
        if !resp.status().is_success() {
            return Err(api_error(resp).await);
        }
        json(resp, "v1/files").await
    }

    /// `GET /v1/files/{sha256}`: the caller's upload of those bytes, if any.
    pub async fn file_by_sha256(&self, sha256: &str) -> Result<Option<FileView>, ClientError> {
        match self.get_json(&format!("v1/files/{}", seg(sha256)?), &[]).await {
            Ok(f) => Ok(Some(f)),
            Err(ClientError::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Boxwood's `POST /v1/directory-states`: registers uploads by path in the VM; returns the
    /// state with its id (never retried: it would register another).
    pub async fn create_directory_state(&self, req: &DirectoryStateRequest) -> Result<DirectoryState, ClientError> {
        self.post_json("v1/directory-states", req).await
    }

    /// Boxwood's `GET /v1/directory-states/{id}` (409 when the server lost one of its uploads).
    pub async fn directory_state(&self, id: i64) -> Result<DirectoryState, ClientError> {
        self.get_json(&format!("v1/directory-states/{id}"), &[]).await
    }

    /// `GET /v1/files`.
    pub async fn files(&self, limit: Option<i64>, offset: Option<i64>) -> Result<Vec<FileView>, ClientError> {
        let mut query = Vec::new();
        page(&mut query, limit, offset);
        self.get_json::<FileList>("v1/files", &query).await.map(|l| l.files)
    }

    /// `GET /v1/inspect/{uuid}/list?path=`: a directory of an image, without a VM.
    pub async fn list_dir(&self, uuid: &str, path: &str) -> Result<serde_json::Value, ClientError> {
        self.get_json(&format!("v1/inspect/{}/list", seg(uuid)?), &[("path", path.to_owned())]).await
    }

    /// `GET /v1/inspect/{uuid}/list?path=&text=1`: the same directory as `ls -l` prints it.
    pub async fn list_dir_text(&self, uuid: &str, path: &str) -> Result<String, ClientError> {
        let url = format!("v1/inspect/{}/list", seg(uuid)?);
        let query = [("path", path.to_owned()), ("text", "1".to_owned())];
        let resp = self.send(true, || self.request(Method::GET, &url).query(&query).timeout(CALL_TIMEOUT), &[]).await?;
        resp.text().await.map_err(|e| self.unreachable(e))
    }

    /// `GET /v1/inspect/{uuid}/download?path=`: a file of an image, as it streams.
    pub async fn download(
        &self,
        uuid: &str,
        path: &str,
    ) -> Result<impl Stream<Item = reqwest::Result<bytes::Bytes>> + use<>, ClientError> {
        let url = format!("v1/inspect/{}/download", seg(uuid)?);
        let query = [("path", path.to_owned())];
        let resp = self.send(true, || self.request(Method::GET, &url).query(&query), &[]).await?;
        Ok(resp.bytes_stream())
    }

    /// `GET /v1/inspect/{uuid}/grep`: matches in an image's files (`params` as the server
    /// takes them: `pattern`, `path`, `glob`, …).
    pub async fn grep(&self, uuid: &str, params: &[(&str, String)]) -> Result<serde_json::Value, ClientError> {
        self.get_json(&format!("v1/inspect/{}/grep", seg(uuid)?), params).await
    }
}

/// One path segment, escaped (ids come from callers). Empty, `.` and `..` are refused: a URL
/// resolves them (escaped too), which would name another endpoint.
fn seg(s: &str) -> Result<String, ClientError> {
    if matches!(s, "" | "." | "..") {
        return Err(ClientError::BadId(s.to_owned()));
    }
    Ok(url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>().replace('+', "%20"))
}

fn page(query: &mut Vec<(&str, String)>, limit: Option<i64>, offset: Option<i64>) {
    if let Some(l) = limit {
        query.push(("limit", l.to_string()));
    }
    if let Some(o) = offset {
        query.push(("offset", o.to_string()));
    }
}

fn retry_after(resp: &Response) -> Option<Duration> {
    let secs = resp.headers().get(header::RETRY_AFTER)?.to_str().ok()?.trim().parse::<u64>().ok()?;
    Some(Duration::from_secs(secs))
}

/// The server's refusal: its `{"error", "status"}`, or the status's reason when the body is
/// not one (a proxy's page).
async fn api_error(resp: Response) -> ClientError {
    let status = resp.status();
    let body = resp.bytes().await.unwrap_or_default();
    // Only `error` is certain (a string, or on some servers an object or a list).
    let error = serde_json::from_slice::<serde_json::Value>(&body).ok().and_then(|v| match v.get("error")? {
        serde_json::Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    });
    let message = error.unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
    ClientError::Api { status: status.as_u16(), message }
}

async fn json<T: DeserializeOwned>(resp: Response, what: &str) -> Result<T, ClientError> {
    let body = resp.bytes().await.map_err(|e| ClientError::Body { what: what.to_owned(), source: e })?;
    serde_json::from_slice(&body).map_err(|e| ClientError::Decode { what: what.to_owned(), source: e })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalised_and_ids_escaped() {
        for url in ["http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/"] {
            assert_eq!(Client::new(url, "t").unwrap().url(), "http://h:1/", "{url}");
        }
        assert_eq!(Client::new("https://h/boxwood/v1", "t").unwrap().url(), "https://h/boxwood/");
        for bad in ["h:1", "ftp://h", "not a url", "unix:/x"] {
            assert!(matches!(Client::new(bad, "t"), Err(ClientError::BadUrl(_))), "{bad}");
        }
        assert!(matches!(Client::new("http://h", "a\nb"), Err(ClientError::BadToken)));
        assert_eq!(seg("../x y/?").unwrap(), "..%2Fx%20y%2F%3F");
        for bad in ["", ".", ".."] {
            assert!(matches!(seg(bad), Err(ClientError::BadId(_))), "{bad:?}");
        }
    }

    #[test]
    fn the_fingerprint_tells_servers_and_tokens_apart_without_naming_the_token() {
        let f = |url: &str, token: &str| Client::new(url, token).unwrap().fingerprint();
        let a = f("http://h:1", "secret-token");
        assert_eq!(a, f("http://h:1/v1", "secret-token"), "the same server and token");
        assert_ne!(a, f("http://h:1", "secret-token2"));
        assert_ne!(a, f("http://h:2", "secret-token"));
        assert_eq!(a.len(), 16);
        assert!(!a.contains("secret"));
    }
}
