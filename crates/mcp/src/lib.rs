//! Boxwood's MCP server: the tool set agents use (`run`, `upload`, inspection without a VM,
//! tags, operations), with the names and parameters of contree-mcp 0.5.0 so prompts written
//! for it carry over. Every tool is one or a few calls of the typed API client; the server
//! keeps no state of its own. [`serve_stdio`] is `boxwood mcp`.

mod guide;
mod output;
mod params;
mod progress;
mod resources;
mod rsync;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use boxwood_client::types::{
    ExecRequest, ImageView, ImportRequest, Networking, OperationKind, OperationStatus, RegistrySpec, ResourcesLimits,
    SpawnRequest, StdinRequest, encode_stream,
};
use boxwood_client::{Client, ClientError, EventsOptions, ImageQuery, OperationQuery};
use futures::TryStreamExt as _;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, Implementation, RequestMetaObject, ServerCapabilities, ServerConfig};
use rmcp::{Peer, RoleServer, ServerHandler, ServiceExt, tool, tool_handler, tool_router};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use params::*;

/// A tool's answer: structured JSON, or an error the agent reads.
type ToolResult = Result<CallToolResult, String>;

fn ok(value: Value) -> ToolResult {
    Ok(CallToolResult::structured(value))
}

/// The MCP server over one API client (a URL and a token).
#[derive(Clone)]
pub struct BoxwoodMcp {
    client: Client,
    /// Whether tools may read and write files of the machine this server runs on (`upload`
    /// with `path`, `download`, `rsync`): yes beside the agent (stdio); over HTTP that machine
    /// is the Boxwood server, whose files are not the caller's to read or write.
    host_files: bool,
    tool_router: ToolRouter<Self>,
}

/// The most `read_file` and a file resource read into memory.
const MAX_READ_BYTES: usize = 16 << 20;

/// Where `run` starts without a `cwd`, on an image that saved no working directory.
const DEFAULT_RUN_CWD: &str = "/root";

/// What the local-file tools answer where they may not touch this machine's files.
const NO_HOST_FILES: &str = "this MCP server runs on the Boxwood server, not beside you, so it does not read or \
write files here: use `upload` with `content`/`content_base64`, `read_file`, or run `boxwood mcp` on your own machine";

/// The tools over streamable HTTP, for the server's own `/mcp`: each request's tools call the
/// API as that request's caller, through the [`Client`] its authentication put in the
/// request's extensions (a request without one is answered by `fallback`, which should hold
/// no usable token). `allowed_hosts`: the `Host` values accepted (DNS-rebinding guard).
pub fn http_service(
    fallback: Client,
    allowed_hosts: Vec<String>,
    host_files: bool,
) -> rmcp::transport::streamable_http_server::StreamableHttpService<
    BoxwoodMcp,
    rmcp::transport::streamable_http_server::session::local::LocalSessionManager,
> {
    let mut config = rmcp::transport::streamable_http_server::StreamableHttpServerConfig::default();
    config.allowed_hosts = allowed_hosts;
    rmcp::transport::streamable_http_server::StreamableHttpService::new(
        move || Ok(BoxwoodMcp { host_files, ..BoxwoodMcp::new(fallback.clone()) }),
        Default::default(),
        config,
    )
}

/// Serves the tools on stdin/stdout until the client goes away.
pub async fn serve_stdio(client: Client) -> Result<(), String> {
    let service = BoxwoodMcp::new(client).serve(rmcp::transport::stdio()).await.map_err(|e| e.to_string())?;
    service.waiting().await.map(drop).map_err(|e| e.to_string())
}

impl BoxwoodMcp {
    /// Tools beside the agent: they may use this machine's files.
    pub fn new(client: Client) -> Self {
        Self { client, host_files: true, tool_router: Self::tool_router() }
    }

    fn check_host_files(&self) -> Result<(), String> {
        if self.host_files { Ok(()) } else { Err(NO_HOST_FILES.into()) }
    }

    fn fail(&self, e: &ClientError) -> String {
        output::error(e, self.client.url())
    }

    async fn resolve(&self, image: &str) -> Result<ImageView, String> {
        let found = match image.strip_prefix("tag:") {
            Some(tag) => self.client.image_by_tag(tag).await,
            None => self.client.image(image).await,
        };
        found.map_err(|e| match e {
            ClientError::Api { status: 404 | 400, .. } => {
                format!("no image {image:?}: call `list_images` to see the images (a UUID, or `tag:NAME`)")
            }
            e => self.fail(&e),
        })
    }

    /// A file of an image, whole, up to [`MAX_READ_BYTES`].
    async fn fetch(&self, image_uuid: &str, path: &str) -> Result<Vec<u8>, String> {
        let mut stream = self.client.download(image_uuid, path).await.map_err(|e| self.fail(&e))?;
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.try_next().await.map_err(|e| format!("the download broke off: {e}"))? {
            if bytes.len() + chunk.len() > MAX_READ_BYTES {
                return Err(format!("{path} is larger than {} MiB: use `download`", MAX_READ_BYTES >> 20));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }

    /// This server as the request's caller: over HTTP the client its authentication left in
    /// the request (see [`http_service`]); over stdio, as the configured token.
    fn as_caller(&self, extensions: &rmcp::model::Extensions) -> Self {
        match extensions.get::<http::request::Parts>().and_then(|p| p.extensions.get::<Client>()) {
            Some(client) => Self { client: client.clone(), ..self.clone() },
            None => self.clone(),
        }
    }

    /// A resource's text and MIME type.
    async fn resource(&self, r: resources::Resource) -> Result<(String, &'static str), String> {
        use resources::Resource;
        Ok(match r {
            Resource::Read { image, path } => {
                let image = self.resolve(&image).await?;
                let text = match String::from_utf8(self.fetch(&image.uuid, &path).await?) {
                    Ok(text) => text,
                    Err(e) => format!("base64:{}", base64::engine::general_purpose::STANDARD.encode(e.as_bytes())),
                };
                (text, "text/plain")
            }
            Resource::List { image, path } => {
                let image = self.resolve(&image).await?;
                (self.client.list_dir_text(&image.uuid, &path).await.map_err(|e| self.fail(&e))?, "text/plain")
            }
            Resource::Lineage { image } => {
                let image = self.resolve(&image).await?;
                let lineage = self.client.lineage(&image.uuid).await.map_err(|e| self.fail(&e))?;
                (serde_json::to_string_pretty(&lineage).unwrap_or_default(), "application/json")
            }
            Resource::Operation { kind, id } => {
                let op = self.client.operation(&id, false).await.map_err(|e| self.fail(&e))?;
                if op.summary.kind != kind {
                    return Err(format!("operation {id} is an {}, not an {}", op.summary.kind.as_str(), kind.as_str()));
                }
                (serde_json::to_string_pretty(&output::operation(&op)).unwrap_or_default(), "application/json")
            }
            Resource::Guide { section } => {
                let text = guide::section(&section)
                    .ok_or_else(|| format!("no guide section {section:?}: one of {}", guide::SECTIONS.join(", ")))?;
                (text.to_owned(), "text/plain")
            }
        })
    }

    async fn spawn_request(&self, p: &Run) -> Result<SpawnRequest, String> {
        let mut files = BTreeMap::new();
        if let Some(id) = p.directory_state_id {
            let state = self.client.directory_state(id).await.map_err(|e| match e {
                ClientError::Api { status: 404, .. } => {
                    format!("no directory state {id} in this namespace: run `rsync` again to get a new id")
                }
                e => self.fail(&e),
            })?;
            for f in state.files {
                files.insert(f.path, json!({"uuid": f.uuid, "mode": format!("{:04o}", f.mode.unwrap_or(0o644))}));
            }
        }
        for (path, uuid) in p.files.iter().flatten() {
            if !path.starts_with('/') {
                let hint = if uuid.starts_with('/') {
                    " — `files` is written the wrong way round: the key is the path in the VM, the value the upload's UUID"
                } else {
                    ""
                };
                return Err(format!("files: {path:?} is not an absolute path in the VM{hint}"));
            }
            files.insert(path.clone(), json!({"uuid": uuid}));
        }
        let stdin = p.stdin.as_ref().map(|text| {
            let (value, encoding) = encode_stream(text.as_bytes());
            StdinRequest { value, encoding: Some(encoding.into()), close: Some(true) }
        });
        Ok(SpawnRequest {
            image: p.image.clone(),
            process: ExecRequest {
                command: p.command.clone(),
                shell: Some(p.shell),
                env: p.env.clone(),
                cwd: (!p.cwd.is_empty()).then(|| p.cwd.clone()),
                // An agent's shell starts in a home directory, not in `/`.
                default_cwd: Some(DEFAULT_RUN_CWD.into()),
                uid: Some(p.uid),
                gid: Some(p.gid),
                stdin,
                truncate_output_at: Some(p.truncate_output_at),
                args: None,
            },
            timeout: Some(p.timeout),
            disposable: Some(p.disposable),
            preserve_env: Some(p.preserve_env),
            resources_limits: p.max_layer_bytes.map(|b| ResourcesLimits { max_layer_bytes: Some(b) }),
            networking: Some(Networking { enabled: Some(true) }),
            files: (!files.is_empty()).then_some(files),
            ..Default::default()
        })
    }
}

#[tool_router]
impl BoxwoodMcp {
    /// Runs a command in a fresh microVM from an image and returns its exit code, stdout and
    /// stderr. Defaults: shell=true, disposable=true (changes are thrown away), wait=true,
    /// timeout=30 s, truncate_output_at=8000 bytes. With disposable=false the changes become
    /// a new image (`result_image`; `filesystem_changed` says whether anything changed) that
    /// later runs can use; the source image never changes. Example:
    /// {"command": "python --version", "image": "tag:python:3.11"}.
    /// Common mistakes: `files` maps the path in the VM to an upload's UUID (not the other way
    /// round); the network is on; a run that needs more than 30 s needs a larger `timeout`.
    /// While it waits it sends progress notifications each second to a caller that asked.
    #[tool]
    async fn run(&self, Parameters(p): Parameters<Run>, meta: RequestMetaObject, peer: Peer<RoleServer>) -> ToolResult {
        let req = self.spawn_request(&p).await?;
        let spawned = self.client.spawn(&req).await.map_err(|e| self.fail(&e))?;
        if !p.wait {
            return ok(json!({"operation_id": spawned.uuid}));
        }
        let waiting = progress::Progress::of(&meta, peer);
        let op = progress::reporting(waiting, "running", Some(p.timeout as f64), self.client.wait(&spawned.uuid))
            .await
            .map_err(|e| self.fail(&e))?;
        ok(output::operation(&op))
    }

    /// Uploads a file for `run`'s `files` and returns {uuid, sha256, size}. Give exactly one of
    /// `path` (an absolute local path), `content` (text) or `content_base64`. The same bytes
    /// uploaded twice give the same upload.
    #[tool]
    async fn upload(&self, Parameters(p): Parameters<Upload>) -> ToolResult {
        let bytes = match (&p.path, &p.content, &p.content_base64) {
            (Some(path), None, None) => {
                self.check_host_files()?;
                if !path.starts_with('/') {
                    return Err(format!("path {path:?} must be absolute"));
                }
                tokio::fs::read(path).await.map_err(|e| format!("cannot read {path}: {e}"))?
            }
            (None, Some(text), None) => text.clone().into_bytes(),
            (None, None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| format!("content_base64 is not base64: {e}"))?,
            _ => return Err("give exactly one of path, content or content_base64".into()),
        };
        let sha = hex::encode(Sha256::digest(&bytes));
        if let Some(f) = self.client.file_by_sha256(&sha).await.map_err(|e| self.fail(&e))? {
            return ok(json!({"uuid": f.uuid, "sha256": f.sha256, "size": f.size}));
        }
        let f = self.client.upload(bytes).await.map_err(|e| self.fail(&e))?;
        ok(json!({"uuid": f.uuid, "sha256": f.sha256, "size": f.size}))
    }

    /// Syncs a local directory into the VM's future runs: uploads only what changed since the
    /// last sync (nothing for an unchanged tree) and returns {"directory_state_id": N}; then
    /// `run` with directory_state_id=N finds the files at `destination`, modes kept.
    /// Example: {"source": "/home/me/proj", "destination": "/app", "exclude": ["*.log"]}.
    #[tool]
    async fn rsync(&self, Parameters(p): Parameters<Rsync>) -> ToolResult {
        self.check_host_files()?;
        let exclude = p.exclude.unwrap_or_default();
        match rsync::sync(&self.client, &p.source, &p.destination, &exclude).await {
            Ok(synced) => ok(serde_json::to_value(synced).unwrap_or_default()),
            Err(rsync::Failure::Local(why)) => Err(why),
            Err(rsync::Failure::Server(e)) => Err(self.fail(&e)),
        }
    }

    /// Lists images (newest first). Example: {"tagged": true, "tag_prefix": "python"}.
    #[tool]
    async fn list_images(&self, Parameters(p): Parameters<ListImages>) -> ToolResult {
        let q = ImageQuery {
            tagged: p.tagged,
            tag: p.tag_prefix.map(|t| t.trim_end_matches([':', '/', '.']).to_owned()),
            uuid: None,
            limit: Some(p.limit),
            offset: Some(p.offset),
        };
        let images = self.client.images(&q).await.map_err(|e| self.fail(&e))?;
        ok(json!({"images": images}))
    }

    /// One image by UUID or `tag:NAME`: {uuid, tag, created_at, operation_uuid}.
    #[tool]
    async fn get_image(&self, Parameters(p): Parameters<ImageArg>) -> ToolResult {
        ok(serde_json::to_value(self.resolve(&p.image).await?).unwrap_or_default())
    }

    /// Where an image comes from and what was made from it (Boxwood keeps the tree on the
    /// server): its parent chain to the root and its children.
    #[tool]
    async fn image_lineage(&self, Parameters(p): Parameters<ImageArg>) -> ToolResult {
        let image = self.resolve(&p.image).await?;
        let lineage = self.client.lineage(&image.uuid).await.map_err(|e| self.fail(&e))?;
        ok(serde_json::to_value(lineage).unwrap_or_default())
    }

    /// Imports an image from a registry, e.g. {"registry_url":
    /// "docker://docker.io/library/alpine:3.20", "tag": "alpine:3.20"}. Waits by default.
    #[tool]
    async fn import_image(
        &self,
        Parameters(p): Parameters<ImportImage>,
        meta: RequestMetaObject,
        peer: Peer<RoleServer>,
    ) -> ToolResult {
        let req = ImportRequest {
            registry: RegistrySpec { url: p.registry_url, credentials: None },
            tag: p.tag,
            timeout: None,
        };
        let created = self.client.import(&req).await.map_err(|e| self.fail(&e))?;
        if !p.wait {
            return ok(json!({"operation_id": created.uuid}));
        }
        let waiting = progress::Progress::of(&meta, peer);
        let op = progress::reporting(waiting, "importing", None, self.client.wait(&created.uuid))
            .await
            .map_err(|e| self.fail(&e))?;
        ok(output::operation(&op))
    }

    /// Moves a tag to an image ({"image_uuid": …, "tag": "my-app:v1"}); without `tag`,
    /// removes the image's tags. Then `tag:my-app:v1` names it.
    #[tool]
    async fn set_tag(&self, Parameters(p): Parameters<SetTag>) -> ToolResult {
        let image = match &p.tag {
            Some(tag) => self.client.set_tag(&p.image_uuid, tag).await,
            None => match self.client.delete_tag(&p.image_uuid, None).await {
                Ok(()) => self.client.image(&p.image_uuid).await,
                Err(e) => Err(e),
            },
        };
        ok(serde_json::to_value(image.map_err(|e| self.fail(&e))?).unwrap_or_default())
    }

    /// Copies a file out of an image to a local path, without starting a VM.
    #[tool]
    async fn download(&self, Parameters(p): Parameters<Download>) -> ToolResult {
        self.check_host_files()?;
        if !p.destination.starts_with('/') {
            return Err(format!("destination {:?} must be an absolute local path", p.destination));
        }
        let image = self.resolve(&p.image).await?;
        let mut stream = self.client.download(&image.uuid, &p.path).await.map_err(|e| self.fail(&e))?;
        let dest = std::path::Path::new(&p.destination);
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        let mut file =
            tokio::fs::File::create(dest).await.map_err(|e| format!("cannot write {}: {e}", p.destination))?;
        let mut size = 0u64;
        while let Some(chunk) = stream.try_next().await.map_err(|e| format!("the download broke off: {e}"))? {
            size += chunk.len() as u64;
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
                .await
                .map_err(|e| format!("cannot write {}: {e}", p.destination))?;
        }
        // tokio's File hands its last write to a blocking thread: until flushed, the caller
        // may find the file short (seen as an empty download in the /mcp conformance run).
        tokio::io::AsyncWriteExt::flush(&mut file).await.map_err(|e| format!("cannot write {}: {e}", p.destination))?;
        if p.executable {
            use std::os::unix::fs::PermissionsExt as _;
            let perms = std::fs::Permissions::from_mode(0o755);
            tokio::fs::set_permissions(dest, perms).await.map_err(|e| format!("chmod {}: {e}", p.destination))?;
        }
        ok(json!({"path": p.destination, "size": size}))
    }

    /// Lists a directory of an image without starting a VM (default /).
    #[tool]
    async fn list_files(&self, Parameters(p): Parameters<ListFiles>) -> ToolResult {
        let image = self.resolve(&p.image).await?;
        ok(self.client.list_dir(&image.uuid, &p.path).await.map_err(|e| self.fail(&e))?)
    }

    /// Reads a file of an image without starting a VM: its text, or base64 for binary files.
    #[tool]
    async fn read_file(&self, Parameters(p): Parameters<ReadFile>) -> ToolResult {
        let image = self.resolve(&p.image).await?;
        let bytes = self.fetch(&image.uuid, &p.path).await?;
        let (content, encoding) = match String::from_utf8(bytes) {
            Ok(text) => (text, "utf-8"),
            Err(e) => (base64::engine::general_purpose::STANDARD.encode(e.as_bytes()), "base64"),
        };
        ok(json!({"path": p.path, "content": content, "encoding": encoding}))
    }

    /// Searches an image's files with a regular expression, without starting a VM.
    /// Example: {"image": "tag:python:3.11", "pattern": "^root:", "path": "/etc"}.
    #[tool]
    async fn grep(&self, Parameters(p): Parameters<Grep>) -> ToolResult {
        let image = self.resolve(&p.image).await?;
        let mut q = vec![("pattern", p.pattern)];
        q.extend(p.path.map(|v| ("path", v)));
        q.extend(p.glob.map(|v| ("glob", v)));
        q.extend(p.max_count.map(|v| ("max_count", v.to_string())));
        q.extend(p.max_total.map(|v| ("max_total", v.to_string())));
        q.extend(p.case.map(|v| ("case", if v { "1" } else { "0" }.to_owned())));
        ok(self.client.grep(&image.uuid, &q).await.map_err(|e| self.fail(&e))?)
    }

    /// An operation (a run or an import) as `run` returns it.
    #[tool]
    async fn get_operation(&self, Parameters(p): Parameters<OperationArg>) -> ToolResult {
        let op = self.client.operation(&p.operation_id, false).await.map_err(|e| self.fail(&e))?;
        ok(output::operation(&op))
    }

    /// Lists operations, newest first. Example: {"status": "EXECUTING"}.
    #[tool]
    async fn list_operations(&self, Parameters(p): Parameters<ListOperations>) -> ToolResult {
        let status = match p.status.as_deref().map(|s| (s, OperationStatus::parse(&s.to_uppercase()))) {
            Some((s, None)) => {
                return Err(format!("status {s:?}: one of PENDING, ASSIGNED, EXECUTING, SUCCESS, FAILED, CANCELLED"));
            }
            Some((_, found)) => found,
            None => None,
        };
        let kind = match p.kind.as_deref().map(|k| (k, OperationKind::parse(k))) {
            Some((k, None)) => return Err(format!("type {k:?}: `instance` or `image_import`")),
            Some((_, found)) => found,
            None => None,
        };
        let q = OperationQuery { status, kind, limit: Some(p.limit), offset: None };
        let ops = self.client.operations(&q).await.map_err(|e| self.fail(&e))?;
        ok(json!({"operations": ops}))
    }

    /// Waits for operations started with wait=false and returns each one as `run` would.
    /// mode `all` (default) waits for every one; `any` for the first, cancelling the rest.
    #[tool]
    async fn wait_operations(
        &self,
        Parameters(p): Parameters<WaitOperations>,
        meta: RequestMetaObject,
        peer: Peer<RoleServer>,
    ) -> ToolResult {
        let any = match p.mode.as_deref() {
            None | Some("all") => false,
            Some("any") => true,
            Some(m) => return Err(format!("mode {m:?}: `all` or `any`")),
        };
        if p.operation_ids.is_empty() {
            return Err("operation_ids is empty".into());
        }
        let limit = Duration::from_secs_f64(p.timeout.clamp(0.0, 86_400.0));
        let waits = p.operation_ids.iter().map(|id| Box::pin(async move { (id.clone(), self.client.wait(id).await) }));
        let mut results = serde_json::Map::new();
        let waiting = progress::Progress::of(&meta, peer);
        let what = format!("waiting for {} operation(s)", p.operation_ids.len());
        let all = tokio::time::timeout(limit, async {
            if any {
                let ((id, r), _, _) = futures::future::select_all(waits).await;
                results
                    .insert(id, r.map(|op| output::operation(&op)).unwrap_or_else(|e| json!({"error": self.fail(&e)})));
            } else {
                for (id, r) in futures::future::join_all(waits).await {
                    results.insert(
                        id,
                        r.map(|op| output::operation(&op)).unwrap_or_else(|e| json!({"error": self.fail(&e)})),
                    );
                }
            }
        });
        let collected = progress::reporting(waiting, &what, Some(limit.as_secs_f64()), all).await;
        if any {
            for id in p.operation_ids.iter().filter(|id| !results.contains_key(*id)) {
                let _ = self.client.cancel(id).await;
            }
        }
        if collected.is_err() {
            return Err(format!("not finished within timeout={} s; `get_operation` shows where they are", p.timeout));
        }
        ok(json!({"operations": results}))
    }

    /// Cancels an operation that has not finished.
    #[tool]
    async fn cancel_operation(&self, Parameters(p): Parameters<OperationArg>) -> ToolResult {
        let op = self.client.operation(&p.operation_id, false).await.map_err(|e| self.fail(&e))?;
        if !op.summary.status.is_terminal() {
            self.client.cancel(&p.operation_id).await.map_err(|e| self.fail(&e))?;
        }
        let op = self.client.operation(&p.operation_id, false).await.map_err(|e| self.fail(&e))?;
        ok(output::operation(&op))
    }

    /// Runs another command inside a running operation's VM (a `run` with wait=false) and
    /// returns its exit code and output.
    #[tool]
    async fn exec(&self, Parameters(p): Parameters<Exec>) -> ToolResult {
        let req = ExecRequest { command: p.command, shell: Some(p.shell), ..Default::default() };
        let created = self.client.exec(&p.operation_id, &req).await.map_err(|e| self.fail(&e))?;
        let events = self
            .client
            .events(&p.operation_id, EventsOptions { spid: Some(created.spid), follow: true, ..Default::default() });
        let (mut stdout, mut stderr, mut exit) = (Vec::new(), Vec::new(), Value::Null);
        let collect = async {
            futures::pin_mut!(events);
            while let Some(ev) = events.try_next().await? {
                use boxwood_client::types::EventKind::*;
                match ev.kind {
                    Stdout => stdout.extend(boxwood_client::types::decode_stream(&ev.data)),
                    Stderr => stderr.extend(boxwood_client::types::decode_stream(&ev.data)),
                    Exit => {
                        exit = ev.data;
                        break;
                    }
                    _ => {}
                }
            }
            Ok::<_, ClientError>(())
        };
        let limit = Duration::from_secs(u64::try_from(p.timeout.max(1)).unwrap_or(30));
        match tokio::time::timeout(limit, collect).await {
            Ok(r) => r.map_err(|e| self.fail(&e))?,
            Err(_) => return Err(format!("the command did not finish within timeout={} s", p.timeout)),
        }
        let text = |b: &[u8]| (!b.is_empty()).then(|| String::from_utf8_lossy(b).into_owned());
        ok(
            json!({"spid": created.spid, "exit": exit, "exit_code": exit.get("exit_code"), "stdout": text(&stdout), "stderr": text(&stderr)}),
        )
    }

    /// Who the token is: its namespace's permissions and limits.
    #[tool]
    async fn whoami(&self) -> ToolResult {
        let me = self.client.whoami().await.map_err(|e| self.fail(&e))?;
        let mut v = serde_json::to_value(me).unwrap_or_default();
        v["mcp_version"] = json!(env!("CARGO_PKG_VERSION"));
        ok(v)
    }

    /// How to use these tools: quickstart, workflow, state, async, tagging, errors, reference.
    #[tool]
    async fn get_guide(&self, Parameters(p): Parameters<Guide>) -> ToolResult {
        guide::section(&p.section)
            .map(|text| CallToolResult::success(vec![rmcp::model::ContentBlock::text(text)]))
            .ok_or_else(|| format!("no section {:?}; one of {}", p.section, guide::SECTIONS.join(", ")))
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for BoxwoodMcp {
    /// Over HTTP a tool runs as the request's caller: the client its authentication left in
    /// the request (see [`http_service`]); over stdio, as the configured token.
    async fn call_tool(
        &self,
        request: rmcp::model::CallToolRequestParams,
        context: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Result<rmcp::model::CallToolResponse, rmcp::ErrorData> {
        let this = self.as_caller(&context.extensions);
        let tcc = rmcp::handler::server::tool::ToolCallContext::new(&this, request, context);
        this.tool_router.call(tcc).await
    }

    async fn list_resource_templates(
        &self,
        _: Option<rmcp::model::PaginatedRequestParams>,
        _: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Result<rmcp::model::ListResourceTemplatesResult, rmcp::ErrorData> {
        Ok(rmcp::model::ListResourceTemplatesResult::with_all_items(resources::templates()))
    }

    async fn read_resource(
        &self,
        request: rmcp::model::ReadResourceRequestParams,
        context: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Result<rmcp::model::ReadResourceResponse, rmcp::ErrorData> {
        let wanted = resources::parse(&request.uri).map_err(|why| rmcp::ErrorData::invalid_params(why, None))?;
        let (text, mime) = self
            .as_caller(&context.extensions)
            .resource(wanted)
            .await
            .map_err(|why| rmcp::ErrorData::resource_not_found(why, None))?;
        let contents = rmcp::model::ResourceContents::TextResourceContents {
            uri: request.uri,
            mime_type: Some(mime.into()),
            text,
            meta: None,
        };
        Ok(rmcp::model::ReadResourceResult::new(vec![contents]).into())
    }

    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().enable_resources().build())
            .with_server_info(Implementation::new("boxwood", env!("CARGO_PKG_VERSION")))
            .with_instructions(guide::INSTRUCTIONS)
    }
}
