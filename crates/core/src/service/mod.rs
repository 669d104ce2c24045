//! [`Service`]: the one interface every transport (HTTP, MCP, tests) drives. It owns
//! authorization, resolution of images, the run queue and the operation lifecycle. The
//! methods are grouped by resource in the submodules.

mod directory_states;
mod files;
mod health;
mod images;
mod imports;
mod inspect;
mod instances;
mod operations;
mod processes;
mod retention;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use boxwood_blob::BlobStore;
use boxwood_image::LayerStore;
use boxwood_store::{OperationRecord, Store};
use boxwood_vm::VmRuntime;
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::auth::{Authenticator, Caller, Permission, TokenConfig, caller_from_record, sha256_hex};
use crate::error::{CoreError, CoreResult, ErrorKind, error_chain};
use crate::events::{EventHub, fail_operation};
use crate::model::WhoAmI;
use crate::quota::{QuotaConfig, Storage, StorageRules};
use crate::runner::{RunControl, RunEnv, StopReason};
use crate::spec::RunLimits;

pub use retention::{GcImage, GcReport, NamespaceUsage, RetentionConfig};

/// Settings of the core service.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoreConfig {
    /// Instance runs executing at once on this server; more wait as PENDING.
    pub max_concurrent_runs: usize,
    /// Instance runs executing at once per namespace; by default all but one of
    /// `max_concurrent_runs` (1 when that is 1), so one namespace cannot starve the others.
    pub max_concurrent_runs_per_namespace: Option<usize>,
    /// Largest accepted upload, in bytes.
    pub max_upload_bytes: u64,
    /// Image imports running at once; more wait as PENDING.
    pub max_concurrent_imports: usize,
    /// Free space (bytes) the state dir's filesystem keeps: below it persist, import and
    /// upload are refused. Default: 5 % of the filesystem, at most 2 GiB; 0 turns it off.
    pub min_free_bytes: Option<u64>,
    /// Per-namespace storage quotas.
    pub quota: QuotaConfig,
    /// What is removed after how long (`service::retention`).
    pub retention: RetentionConfig,
    pub limits: RunLimits,
}

impl Default for CoreConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            max_concurrent_runs: 2 * cores,
            max_concurrent_runs_per_namespace: None,
            max_upload_bytes: 16 << 30,
            max_concurrent_imports: 2,
            min_free_bytes: None,
            quota: QuotaConfig::default(),
            retention: RetentionConfig::default(),
            limits: RunLimits::default(),
        }
    }
}

impl CoreConfig {
    fn per_namespace(&self) -> usize {
        let total = self.max_concurrent_runs.max(1);
        self.max_concurrent_runs_per_namespace
            .unwrap_or_else(|| crate::runner::slots::default_per_namespace(total))
            .max(1)
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
    blobs: Arc<dyn BlobStore>,
    auth: Authenticator,
    config: CoreConfig,
    hub: Arc<EventHub>,
    env: Arc<RunEnv>,
    /// Run slots per namespace, created on first use.
    namespace_slots: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Active runs; `None` once shutdown began (no run may start after the stop sweep).
    runs: Mutex<Option<HashMap<Uuid, Arc<RunControl>>>>,
    tasks: TaskTracker,
    imports: Arc<imports::ImportEnv>,
    /// One retention pass at a time.
    collecting: tokio::sync::Mutex<()>,
    /// Uploads record their rows under the read side; retention removes blobs under the
    /// write side.
    uploads_gate: tokio::sync::RwLock<()>,
    /// Cancelled when shutdown begins (background loops end).
    stopping: CancellationToken,
    /// The last per-namespace usage the metrics sampled, and when.
    usage_cache: tokio::sync::Mutex<Option<(std::time::Instant, Vec<NamespaceUsage>)>>,
    /// The last store write probe of a readiness check and when it ran (see `readiness`).
    store_probe: tokio::sync::Mutex<Option<(std::time::Instant, crate::model::Check)>>,
}

/// The parts the service is built from.
pub struct Backends {
    pub store: Arc<dyn Store>,
    pub blobs: Arc<dyn BlobStore>,
    pub layers: Arc<dyn LayerStore>,
    pub runtime: Arc<dyn VmRuntime>,
    pub importer: Arc<boxwood_oci::Importer>,
}

/// The core service; cheap to clone.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl Service {
    /// Builds the service and reconciles state left by a previous process: operations that
    /// were active when it died are failed (their `completion` written).
    pub async fn start(config: CoreConfig, tokens: &[TokenConfig], backends: Backends) -> CoreResult<Self> {
        let auth = Authenticator::new(tokens)?;
        let hub = Arc::new(EventHub::default());
        let slots = Arc::new(Semaphore::new(config.max_concurrent_runs.max(1)));
        let Backends { store, blobs, layers, runtime, importer } = backends;
        let rules = StorageRules::resolve(&config.quota, config.min_free_bytes, layers.space()?.total_bytes);
        tracing::info!(
            image_quota_bytes = rules.image_bytes,
            upload_quota_bytes = rules.upload_bytes,
            min_free_bytes = rules.min_free_bytes,
            "storage bounds"
        );
        let storage = Arc::new(Storage::new(rules, store.clone(), layers.clone(), blobs.clone()));
        let imports = Arc::new(imports::ImportEnv {
            importer,
            slots: Arc::new(Semaphore::new(config.max_concurrent_imports.max(1))),
        });
        let env = Arc::new(RunEnv::new(store.clone(), blobs.clone(), layers, runtime, slots, storage));
        let svc = Service {
            inner: Arc::new(Inner {
                store,
                blobs,
                auth,
                config,
                hub,
                env,
                namespace_slots: Mutex::new(HashMap::new()),
                runs: Mutex::new(Some(HashMap::new())),
                tasks: TaskTracker::new(),
                imports,
                collecting: tokio::sync::Mutex::new(()),
                uploads_gate: tokio::sync::RwLock::new(()),
                stopping: CancellationToken::new(),
                usage_cache: tokio::sync::Mutex::new(None),
                store_probe: tokio::sync::Mutex::new(None),
            }),
        };
        svc.fail_orphans().await?;
        // No run holds a layer yet: whatever no image names (replaced by a compaction, or
        // published by a persist the last process did not get to record) goes now.
        // A file that cannot be removed must not keep the server from starting: the next
        // sweep tries again.
        if let Err(e) = svc.inner.env.reclaim_layers().await {
            tracing::warn!(error = %crate::error::error_chain(&e), "the start-up layer sweep failed");
        }
        svc.start_collector();
        Ok(svc)
    }

    async fn fail_orphans(&self) -> CoreResult<()> {
        let inner = &self.inner;
        for op in inner.store.unfinished_operations().await? {
            tracing::warn!(op = %op.uuid, status = %op.status, "failing operation interrupted by a server restart");
            let error = "the server restarted while the operation was active";
            fail_operation(inner.store.clone(), inner.hub.clone(), op.uuid, error).await?;
        }
        Ok(())
    }

    /// Records a new operation and starts its task, unless the server is shutting down (then
    /// nothing is written and the caller gets 503). `work` must end the operation itself; if it
    /// fails on the store instead, the operation is failed here once the store recovers.
    async fn start_operation(
        &self,
        op: &OperationRecord,
        control: Arc<RunControl>,
        work: impl Future<Output = CoreResult<()>> + Send + 'static,
    ) -> CoreResult<()> {
        let shutting_down = || CoreError::Unavailable("the server is shutting down".into());
        if self.inner.runs.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
            return Err(shutting_down());
        }
        self.inner.store.insert_operation(op).await?;
        let uuid = op.uuid;
        let registered = match self.inner.runs.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            Some(runs) => runs.insert(uuid, control).is_none(),
            None => false,
        };
        if !registered {
            // Shutdown began in between: the operation must not stay PENDING.
            let _ =
                fail_operation(self.inner.store.clone(), self.inner.hub.clone(), uuid, "the server is shutting down")
                    .await;
            return Err(shutting_down());
        }
        let inner = self.inner.clone();
        // Every line a run or import logs carries its operation id (the span's fields).
        let span = tracing::info_span!("operation", op = %uuid, kind = %op.kind);
        self.inner.tasks.spawn(tracing::Instrument::instrument(async move {
            if let Err(e) = work.await {
                tracing::error!(op = %uuid, error = %error_chain(&e), "operation hit a store failure; failing it");
                let reason = match e.kind() {
                    ErrorKind::InsufficientStorage => "the server's disk filled up during the operation",
                    _ => "internal error: metadata store failure",
                };
                // The operation must still end: retry writing its failure until the store
                // recovers, or until shutdown (the next start then fails it), which this must
                // not hold up for long.
                let mut delay = std::time::Duration::from_millis(200);
                while let Err(e) = fail_operation(inner.store.clone(), inner.hub.clone(), uuid, reason).await {
                    tracing::error!(op = %uuid, error = %error_chain(&e), "cannot record the operation's failure yet");
                    if inner.runs.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
                        break;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(2));
                }
            }
            if let Some(runs) = inner.runs.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                runs.remove(&uuid);
            }
        }, span));
        Ok(())
    }

    /// The stop handle of an active run.
    fn run_control(&self, uuid: Uuid) -> Option<Arc<RunControl>> {
        self.inner.runs.lock().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(|r| r.get(&uuid).cloned())
    }

    /// The caller behind a bearer token: configured tokens first, then those created with
    /// `boxwood token create` (checked on every request, so a revocation is immediate).
    pub async fn authenticate(&self, bearer: Option<&str>) -> CoreResult<Caller> {
        match self.inner.auth.authenticate(bearer) {
            Err(CoreError::Unauthorized) => {}
            other => return other,
        }
        let secret = bearer.filter(|s| !s.is_empty()).ok_or(CoreError::Unauthorized)?;
        let record = self.inner.store.active_token(&sha256_hex(secret)).await?.ok_or(CoreError::Unauthorized)?;
        Ok(caller_from_record(&record))
    }

    pub fn whoami(&self, caller: &Caller) -> WhoAmI {
        let c = &self.inner.config;
        WhoAmI {
            token_uuid: caller.token_uuid.to_string(),
            token_expiration: None,
            permissions: Permission::ALL
                .iter()
                .map(|p| (p.as_str().to_owned(), caller.permissions.contains(p)))
                .collect(),
            limits: BTreeMap::from([
                ("instance_max_timeout".to_owned(), c.limits.max_timeout_secs as i64),
                ("instance_max_concurrency".to_owned(), c.per_namespace() as i64),
                ("instance_max_layer_bytes".to_owned(), c.limits.max_layer_bytes as i64),
                ("images_import_max_concurrency".to_owned(), c.max_concurrent_imports as i64),
                ("images_import_max_timeout".to_owned(), c.limits.max_import_timeout_secs as i64),
            ]),
            operations_stat: BTreeMap::new(),
        }
    }

    /// Refuses new runs, stops every active one (each ends FAILED with its completion
    /// written) and waits for their VMs to be gone and background work to finish.
    pub async fn shutdown(&self) {
        let controls: Vec<_> = self
            .inner
            .runs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .map(|runs| runs.into_values().collect())
            .unwrap_or_default();
        for c in controls {
            c.stop(StopReason::Shutdown);
        }
        self.inner.stopping.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        self.inner.env.wait_for_background().await;
    }

    fn namespace_slots(&self, namespace: &str) -> Arc<Semaphore> {
        let mut map = self.inner.namespace_slots.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(namespace.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.inner.config.per_namespace())))
            .clone()
    }
}
