//! [`Service`]: the one interface every transport (HTTP, MCP, tests) drives. It owns
//! authorization, resolution of images, the run queue and the operation lifecycle.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use boxwood_image::LayerStore;
use boxwood_store::{ImageFilter, ImageRecord, OperationFilter, OperationRecord, Store};
use boxwood_vm::VmRuntime;
use futures::Stream;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::auth::{Authenticator, Caller, Permission, TokenConfig};
use crate::clock::now_us;
use crate::error::{CoreError, CoreResult};
use crate::events::{self, EventHub, EventLog};
use crate::model::{
    EventView, ImageView, InstanceResult, OperationResponse, OperationSummary, ResultResources, ResultState,
    SpawnRequest, SpawnResponse, StreamRepr, WhoAmI,
};
use crate::operations::{self, KIND_INSTANCE, Status};
use crate::runner::{MAIN_SPID, Run, RunControl, RunEnv, StopReason};
use crate::spec::{ImageRef, RunLimits, is_valid_tag, validate};

/// Settings of the core service.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoreConfig {
    /// Instance runs executing at once; more wait as PENDING.
    pub max_concurrent_runs: usize,
    pub limits: RunLimits,
}

impl Default for CoreConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self { max_concurrent_runs: 2 * cores, limits: RunLimits::default() }
    }
}

/// Paging of a listing request.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub limit: i64,
    pub offset: i64,
}

impl Page {
    /// Checks the contract's bounds: `limit` 1..=1000 (default 100), `offset` ≥ 0.
    pub fn new(limit: Option<i64>, offset: Option<i64>) -> CoreResult<Self> {
        let limit = limit.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(CoreError::bad("limit must be between 1 and 1000"));
        }
        let offset = offset.unwrap_or(0);
        if offset < 0 {
            return Err(CoreError::bad("offset must be non-negative"));
        }
        Ok(Self { limit, offset })
    }
}

/// `GET /images` filters.
#[derive(Debug, Clone, Default)]
pub struct ImageQuery {
    pub tagged: bool,
    pub tag_prefix: Option<String>,
    pub uuid: Option<Uuid>,
    pub since_us: Option<i64>,
    pub until_us: Option<i64>,
}

/// `GET /operations` filters.
#[derive(Debug, Clone, Default)]
pub struct OperationQuery {
    pub status: Option<String>,
    pub kind: Option<String>,
    pub since_us: Option<i64>,
    pub until_us: Option<i64>,
}

struct Inner {
    store: Arc<dyn Store>,
    auth: Authenticator,
    config: CoreConfig,
    hub: Arc<EventHub>,
    env: Arc<RunEnv>,
    runs: Mutex<HashMap<Uuid, Arc<RunControl>>>,
    tasks: tokio::sync::Mutex<JoinSet<()>>,
}

/// The core service; cheap to clone.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl Service {
    /// Builds the service and reconciles state left by a previous process: operations that
    /// were active when it died are failed (their `completion` written).
    pub async fn start(
        config: CoreConfig,
        tokens: &[TokenConfig],
        store: Arc<dyn Store>,
        layers: Arc<dyn LayerStore>,
        runtime: Arc<dyn VmRuntime>,
    ) -> CoreResult<Self> {
        let auth = Authenticator::new(tokens)?;
        let hub = Arc::new(EventHub::default());
        let slots = Arc::new(Semaphore::new(config.max_concurrent_runs.max(1)));
        let env = Arc::new(RunEnv { store: store.clone(), layers, runtime, slots });
        let svc = Service {
            inner: Arc::new(Inner {
                store,
                auth,
                config,
                hub,
                env,
                runs: Mutex::new(HashMap::new()),
                tasks: tokio::sync::Mutex::new(JoinSet::new()),
            }),
        };
        svc.fail_orphans().await?;
        Ok(svc)
    }

    async fn fail_orphans(&self) -> CoreResult<()> {
        let inner = &self.inner;
        for mut op in inner.store.unfinished_operations().await? {
            tracing::warn!(op = %op.uuid, status = %op.status, "failing operation interrupted by a server restart");
            let log = EventLog::open(inner.store.clone(), inner.hub.clone(), op.uuid).await?;
            let now = now_us();
            op.status = Status::Failed.as_str().into();
            op.error = Some("the server restarted while the operation was active".into());
            op.finished_at_us = Some(now);
            op.result_image_uuid = None;
            let duration_ms = op.started_at_us.map_or(0, |s| (now - s).max(0) / 1000);
            let completion = serde_json::json!({"status": "FAILED", "duration_ms": duration_ms,
                "result_image_uuid": null, "error": op.error, "image_size_bytes": 0});
            log.complete(&op, completion).await?;
        }
        Ok(())
    }

    pub fn authenticate(&self, bearer: Option<&str>) -> CoreResult<Caller> {
        self.inner.auth.authenticate(bearer)
    }

    pub fn whoami(&self, caller: &Caller) -> WhoAmI {
        let l = &self.inner.config.limits;
        WhoAmI {
            token_uuid: caller.token_uuid.to_string(),
            token_expiration: None,
            permissions: Permission::ALL
                .iter()
                .map(|p| (p.as_str().to_owned(), caller.permissions.contains(p)))
                .collect(),
            limits: BTreeMap::from([
                ("instance_max_timeout".to_owned(), l.max_timeout_secs as i64),
                ("instance_max_concurrency".to_owned(), self.inner.config.max_concurrent_runs as i64),
                ("instance_max_layer_bytes".to_owned(), l.max_layer_bytes as i64),
            ]),
            operations_stat: BTreeMap::new(),
        }
    }

    // ------------------------------------------------------------------ images

    /// An image the caller can see (its own namespace or the public one).
    async fn visible_image(&self, caller: &Caller, uuid: Uuid) -> CoreResult<ImageRecord> {
        match self.inner.store.get_image(uuid).await? {
            Some(img) if caller.visible_namespaces().contains(&img.namespace) => Ok(img),
            _ => Err(CoreError::NotFound(format!("image {uuid}"))),
        }
    }

    /// Resolves a tag: the caller's namespace first, then the public one.
    pub async fn resolve_tag(&self, caller: &Caller, tag: &str) -> CoreResult<Uuid> {
        caller.require(Permission::List)?;
        if !is_valid_tag(tag) {
            return Err(CoreError::bad(format!("invalid tag {tag:?}")));
        }
        for ns in caller.visible_namespaces() {
            if let Some(uuid) = self.inner.store.resolve_tag(&ns, tag).await? {
                return Ok(uuid);
            }
        }
        Err(CoreError::NotFound(format!("image with tag {tag:?}")))
    }

    async fn image_view(&self, caller: &Caller, img: &ImageRecord, tag: Option<String>) -> ImageView {
        ImageView {
            uuid: img.uuid.to_string(),
            tag,
            created_at: crate::clock::format_ts(img.created_at_us),
            // Null for images of another namespace, as the contract says.
            operation_uuid: img.operation_uuid.filter(|_| img.namespace == caller.namespace).map(|u| u.to_string()),
        }
    }

    pub async fn get_image(&self, caller: &Caller, uuid: Uuid) -> CoreResult<ImageView> {
        caller.require(Permission::List)?;
        let img = self.visible_image(caller, uuid).await?;
        let tags = self.inner.store.tags_of(uuid, &caller.visible_namespaces()).await?;
        let tag = tags.iter().find(|t| t.namespace == caller.namespace).or(tags.first()).map(|t| t.tag.clone());
        Ok(self.image_view(caller, &img, tag).await)
    }

    pub async fn list_images(&self, caller: &Caller, q: ImageQuery, page: Page) -> CoreResult<Vec<ImageView>> {
        caller.require(Permission::List)?;
        if let Some(prefix) = &q.tag_prefix
            && !is_valid_tag(prefix)
        {
            return Err(CoreError::bad(format!("invalid tag prefix {prefix:?}")));
        }
        let filter = ImageFilter {
            namespaces: caller.visible_namespaces(),
            tagged: q.tagged,
            tag_prefix: q.tag_prefix,
            uuid: q.uuid,
            since_us: q.since_us,
            until_us: q.until_us,
            limit: page.limit,
            offset: page.offset,
        };
        let rows = self.inner.store.list_images(&filter).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(self.image_view(caller, &r.image, r.tag).await);
        }
        Ok(out)
    }

    /// Registers an image built by the server itself (the seeded base image) in `namespace`
    /// under `tag`, unless the tag already names an image.
    pub async fn ensure_tagged_image(&self, namespace: &str, tag: &str, image: ImageRecord) -> CoreResult<Uuid> {
        if let Some(existing) = self.inner.store.resolve_tag(namespace, tag).await? {
            return Ok(existing);
        }
        self.inner.store.insert_image(&image).await?;
        self.inner.store.set_tag(namespace, tag, image.uuid, now_us()).await?;
        Ok(image.uuid)
    }

    /// Whether `tag` already names an image in `namespace`.
    pub async fn has_tag(&self, namespace: &str, tag: &str) -> CoreResult<bool> {
        Ok(self.inner.store.resolve_tag(namespace, tag).await?.is_some())
    }

    // ------------------------------------------------------------------ instances

    pub async fn spawn_instance(&self, caller: &Caller, req: SpawnRequest) -> CoreResult<SpawnResponse> {
        let spec = validate(req, &self.inner.config.limits)?;
        caller.require(if spec.disposable { Permission::SpawnDisposable } else { Permission::Spawn })?;
        let image_uuid = match &spec.image {
            ImageRef::Uuid(u) => *u,
            ImageRef::Tag(t) => {
                let mut found = None;
                for ns in caller.visible_namespaces() {
                    if let Some(u) = self.inner.store.resolve_tag(&ns, t).await? {
                        found = Some(u);
                        break;
                    }
                }
                found.ok_or_else(|| CoreError::NotFound(format!("image with tag {t:?}")))?
            }
        };
        let image = self.visible_image(caller, image_uuid).await?;
        let metadata = spec.metadata(image.uuid);
        let op = OperationRecord {
            uuid: Uuid::now_v7(),
            namespace: caller.namespace.clone(),
            kind: KIND_INSTANCE.into(),
            status: Status::Pending.as_str().into(),
            error: None,
            created_at_us: now_us(),
            started_at_us: None,
            finished_at_us: None,
            image_uuid: Some(image.uuid),
            result_image_uuid: None,
            result_tag: None,
            image_size: None,
            consumed_cpu: None,
            consumed_memory: None,
            metadata: serde_json::to_value(&metadata).map_err(|e| CoreError::Internal(e.to_string()))?,
            result: None,
        };
        self.inner.store.insert_operation(&op).await?;
        let log = EventLog::open(self.inner.store.clone(), self.inner.hub.clone(), op.uuid).await?;
        let control = Arc::new(RunControl::default());
        self.inner.runs.lock().unwrap_or_else(|e| e.into_inner()).insert(op.uuid, control.clone());
        let response = SpawnResponse { uuid: op.uuid.to_string(), metadata };
        let run = Run { op, spec, image, log, control };
        let inner = self.inner.clone();
        self.inner.tasks.lock().await.spawn(async move {
            let uuid = run.op.uuid;
            if let Err(e) = run.execute(&inner.env).await {
                tracing::error!(op = %uuid, error = %e, "run aborted by a store failure");
            }
            inner.runs.lock().unwrap_or_else(|e| e.into_inner()).remove(&uuid);
        });
        Ok(response)
    }

    // ------------------------------------------------------------------ operations

    async fn visible_operation(&self, caller: &Caller, uuid: Uuid) -> CoreResult<OperationRecord> {
        match self.inner.store.get_operation(uuid).await? {
            Some(op) if op.namespace == caller.namespace => Ok(op),
            _ => Err(CoreError::NotFound(format!("operation {uuid}"))),
        }
    }

    pub async fn get_operation(&self, caller: &Caller, uuid: Uuid, inflight: bool) -> CoreResult<OperationResponse> {
        caller.require(Permission::List)?;
        let op = self.visible_operation(caller, uuid).await?;
        let partial = if inflight && op.kind == KIND_INSTANCE && op.result.is_none() && op.status == "EXECUTING" {
            Some(self.inflight_result(&op).await?)
        } else {
            None
        };
        Ok(operations::response(&op, partial))
    }

    /// Partial output of a running main process, folded from its event log.
    async fn inflight_result(&self, op: &OperationRecord) -> CoreResult<Value> {
        let cap = op.metadata.get("truncate_output_at").and_then(Value::as_u64).unwrap_or(u64::MAX) as usize;
        let (mut out, mut err, mut pid) = (Vec::new(), Vec::new(), 0);
        let mut after = None;
        loop {
            let page = self.inner.store.events(op.uuid, after, Some(i64::from(MAIN_SPID)), 1000).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            for ev in &page {
                let buf = match ev.kind.as_str() {
                    "stdout" => &mut out,
                    "stderr" => &mut err,
                    "spawn" => {
                        pid = ev.data.get("pid").and_then(Value::as_u64).unwrap_or(0) as u32;
                        continue;
                    }
                    _ => continue,
                };
                buf.extend(decode_stream(&ev.data));
                buf.truncate(cap);
            }
        }
        let result = InstanceResult {
            resources: ResultResources::default(),
            state: ResultState {
                continued: false,
                core_dump: false,
                exit_code: -1,
                pid,
                signal: -1,
                stopped: false,
                timed_out: false,
            },
            stdout: StreamRepr::of(&out, false),
            stderr: StreamRepr::of(&err, false),
        };
        serde_json::to_value(result).map_err(|e| CoreError::Internal(e.to_string()))
    }

    pub async fn list_operations(
        &self,
        caller: &Caller,
        q: OperationQuery,
        page: Page,
    ) -> CoreResult<Vec<OperationSummary>> {
        caller.require(Permission::List)?;
        if let Some(s) = &q.status
            && Status::parse(s).is_none()
        {
            return Err(CoreError::bad(format!("unknown status {s:?}")));
        }
        if let Some(k) = &q.kind
            && k != operations::KIND_INSTANCE
            && k != operations::KIND_IMAGE_IMPORT
        {
            return Err(CoreError::bad(format!("unknown kind {k:?}")));
        }
        let filter = OperationFilter {
            namespace: caller.namespace.clone(),
            status: q.status,
            kind: q.kind,
            since_us: q.since_us,
            until_us: q.until_us,
            limit: page.limit,
            offset: page.offset,
        };
        Ok(self.inner.store.list_operations(&filter).await?.iter().map(operations::summary).collect())
    }

    /// Cancels an active operation; 409 when it already ended.
    pub async fn cancel_operation(&self, caller: &Caller, uuid: Uuid) -> CoreResult<()> {
        caller.require(Permission::Cancel)?;
        let op = self.visible_operation(caller, uuid).await?;
        if Status::parse(&op.status).is_none_or(Status::is_terminal) {
            return Err(CoreError::Conflict(format!("operation {uuid} is already {}", op.status)));
        }
        let control = self.inner.runs.lock().unwrap_or_else(|e| e.into_inner()).get(&uuid).cloned();
        match control {
            Some(c) => {
                c.stop(StopReason::Cancelled);
                Ok(())
            }
            None => Err(CoreError::Conflict(format!("operation {uuid} is finishing"))),
        }
    }

    /// The event log as a stream (see [`events::follow`]).
    pub async fn events(
        &self,
        caller: &Caller,
        uuid: Uuid,
        since: Option<i64>,
        spid: Option<i64>,
        follow: bool,
    ) -> CoreResult<impl Stream<Item = CoreResult<EventView>> + Send + use<>> {
        caller.require(Permission::List)?;
        if follow && !caller.permissions.contains(&Permission::Spawn) {
            caller.require(Permission::SpawnDisposable)?;
        }
        self.visible_operation(caller, uuid).await?;
        Ok(events::follow(self.inner.store.clone(), self.inner.hub.clone(), uuid, since, spid, follow))
    }

    /// Stops every active run (each ends FAILED with its completion written) and waits for
    /// their VMs to be gone.
    pub async fn shutdown(&self) {
        let controls: Vec<_> = self.inner.runs.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        for c in controls {
            c.stop(StopReason::Shutdown);
        }
        let mut tasks = self.inner.tasks.lock().await;
        while tasks.join_next().await.is_some() {}
    }
}

fn decode_stream(data: &Value) -> Vec<u8> {
    use base64::Engine as _;
    let value = data.get("value").and_then(Value::as_str).unwrap_or("");
    match data.get("encoding").and_then(Value::as_str) {
        Some("base64") => base64::engine::general_purpose::STANDARD.decode(value).unwrap_or_default(),
        _ => value.as_bytes().to_vec(),
    }
}
