//! Importing OCI/Docker images (`POST /images/import`): an `image_import` operation that
//! pulls (or reads an archive), flattens the layers into one rootfs layer and records an image.
//! Re-importing unchanged content is free: the image UUID is derived from the namespace and
//! the image config digest, so the second import finds the first one's image.

use std::sync::Arc;

use boxwood_oci::{ArchiveFile, Credentials, ImageSource, Importer, parse_source};
use boxwood_store::{ImageRecord, OperationRecord, Store};
use serde_json::json;
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::Service;
use crate::auth::{Caller, Permission};
use crate::clock::now_us;
use crate::error::{CoreError, CoreResult, reported};
use crate::events::EventLog;
use crate::model::{ImportRequest, OperationCreated};
use crate::operations::{self, KIND_IMAGE_IMPORT, Status};
use crate::quota::{NewLayer, PublishError, Storage};
use crate::runner::RunControl;
use crate::spec::is_valid_tag;

/// Namespace of the name-based image UUIDs of imports.
const IMPORT_UUID_NAMESPACE: Uuid = Uuid::from_u128(0x6f0b_1e55_b0c5_4d1e_9a0d_ba5e_1a7e_0c1d);

/// What an import needs besides its request.
pub(crate) struct ImportEnv {
    pub(crate) importer: Arc<Importer>,
    pub(crate) slots: Arc<Semaphore>,
}

impl Service {
    pub async fn import_image(&self, caller: &Caller, req: ImportRequest) -> CoreResult<OperationCreated> {
        caller.require(Permission::Import)?;
        let source = parse_source(&req.registry.url).map_err(|e| CoreError::bad(format!("registry.url: {e}")))?;
        self.inner.imports.importer.check(&source).map_err(|e| CoreError::bad(format!("registry.url: {e}")))?;
        let source = self.open_upload(caller, source).await?;
        // Refused before anything is fetched when the namespace's image quota or the host's
        // free-space reserve is already exhausted.
        self.inner.env.storage.check_image_room(&caller.namespace).await??;
        if let Some(tag) = &req.tag
            && !is_valid_tag(tag)
        {
            return Err(CoreError::bad(format!("invalid tag {tag:?}")));
        }
        let limits = &self.inner.config.limits;
        let timeout = match req.timeout {
            None => limits.default_import_timeout_secs.min(limits.max_import_timeout_secs),
            Some(t) if t <= 0 => {
                return Err(CoreError::bad(format!("timeout must be a positive number of seconds, got {t}")));
            }
            Some(t) => (t as u64).min(limits.max_import_timeout_secs),
        };
        let mut registry = json!({"url": req.registry.url});
        // Omitted rather than null when absent (the SDK rejects null); the password never shows.
        if let Some(c) = &req.registry.credentials {
            registry["credentials"] = json!({"username": c.username, "password": "<MASKED>"});
        }
        let metadata = json!({"registry": registry, "tag": req.tag, "timeout": timeout});
        let op = operations::pending(&caller.namespace, KIND_IMAGE_IMPORT, None, metadata);
        let creds = req.registry.credentials.map(|c| Credentials { username: c.username, password: c.password });
        let job = ImportJob {
            log: EventLog::fresh(self.inner.store.clone(), self.inner.hub.clone(), op.uuid, u64::MAX),
            control: Arc::new(RunControl::default()),
            op,
            source,
            creds,
            tag: req.tag,
            timeout: std::time::Duration::from_secs(timeout),
        };
        let uuid = job.op.uuid;
        let control = job.control.clone();
        let store = self.inner.store.clone();
        let storage = self.inner.env.storage.clone();
        let imports = self.inner.imports.clone();
        self.start_operation(&job.op.clone(), control, async move { job.execute(store, storage, imports).await })
            .await?;
        Ok(OperationCreated { uuid: uuid.to_string() })
    }
}

impl Service {
    /// Turns an `…-archive:upload:UUID` source into the archive itself, found through the blob
    /// store and only in the caller's namespace: another namespace's upload is as missing as
    /// one that never existed. Other sources pass through.
    async fn open_upload(&self, caller: &Caller, source: ImageSource) -> CoreResult<ImageSource> {
        let ImageSource::Upload { format, uuid } = source else { return Ok(source) };
        let missing = || CoreError::NotFound(format!("file {uuid} (registry.url)"));
        let record = match self.inner.store.file_by_uuid(uuid).await? {
            Some(r) if r.namespace == caller.namespace => r,
            _ => return Err(missing()),
        };
        // Marked used before its blob is opened, so retention keeps it (or removed it first).
        if !self.inner.store.touch_file(uuid, crate::clock::now_us()).await? {
            return Err(missing());
        }
        let path = self.inner.blobs.path(&record.sha256).map_err(|e| CoreError::Internal(e.to_string()))?;
        let Some(path) = path else {
            tracing::error!(file = %uuid, sha256 = %record.sha256, "an upload's blob is missing");
            return Err(missing());
        };
        let file =
            ArchiveFile::open(&path, format!("upload:{uuid}")).map_err(|e| CoreError::Internal(e.to_string()))?;
        Ok(ImageSource::Opened { format, file })
    }
}

struct ImportJob {
    op: OperationRecord,
    source: ImageSource,
    creds: Option<Credentials>,
    tag: Option<String>,
    timeout: std::time::Duration,
    log: EventLog,
    control: Arc<RunControl>,
}

impl ImportJob {
    async fn execute(mut self, store: Arc<dyn Store>, storage: Arc<Storage>, env: Arc<ImportEnv>) -> CoreResult<()> {
        let permit = tokio::select! {
            p = env.slots.clone().acquire_owned() => p.ok(),
            () = self.control.token.cancelled() => None,
        };
        let Some(_permit) = permit else {
            let (status, error) = self.control.stopped_outcome();
            return self.finish(status, error).await;
        };
        self.op.status = Status::Assigned.as_str().into();
        self.op.started_at_us = Some(now_us());
        store.update_operation(&self.op).await?;
        self.op.status = Status::Executing.as_str().into();
        store.update_operation(&self.op).await?;
        let work = self.import(&store, &storage, &env.importer);
        let outcome = tokio::select! {
            r = tokio::time::timeout(self.timeout, work) => Some(r),
            () = self.control.token.cancelled() => None,
        };
        let (status, error) = match outcome {
            None => self.control.stopped_outcome(),
            Some(Err(_)) => (Status::Failed, Some(format!("import timed out after {}s", self.timeout.as_secs()))),
            Some(Ok(Err(msg))) => (Status::Failed, Some(msg)),
            Some(Ok(Ok((image, size)))) => {
                self.op.result_image_uuid = Some(image);
                self.op.result_tag = self.tag.clone();
                self.op.image_size = Some(size);
                (Status::Success, None)
            }
        };
        self.finish(status, error).await
    }

    /// Resolves, then imports unless this namespace already has the image; tags it. `Err` is
    /// the operation's failure message.
    async fn import(
        &self,
        store: &Arc<dyn Store>,
        storage: &Storage,
        importer: &Arc<Importer>,
    ) -> Result<(Uuid, i64), String> {
        let creds = self.creds.as_ref();
        let started = std::time::Instant::now();
        let oci = |e: boxwood_oci::OciError| reported(&e.client_message(), &e);
        let internal = |e: &dyn std::error::Error| reported("the server could not store the imported image", e);
        let resolved = importer.resolve(&self.source, creds).await.map_err(oci)?;
        let name = format!("{}/{}", self.op.namespace, resolved.config_digest);
        let uuid = Uuid::new_v5(&IMPORT_UUID_NAMESPACE, name.as_bytes());
        let store_err = |e: boxwood_store::StoreError| internal(&e);
        let mut written = 0;
        // An image already imported is marked used first, so a retention pass cannot take it
        // before the tag below names it.
        if !store.touch_image(uuid, now_us()).await.map_err(store_err)? {
            // Checked again now that the import has its slot, before anything is fetched.
            match storage.check_image_room(&self.op.namespace).await {
                Ok(Ok(())) => {}
                Ok(Err(refusal)) => return Err(format!("{refusal}; nothing was imported")),
                Err(e) => return Err(internal(&e)),
            }
            let staging = storage.layers().staging_dir().map_err(|e| internal(&e))?;
            let tree = staging.join("rootfs");
            let result = async {
                std::fs::create_dir(&tree).map_err(|e| internal(&e))?;
                let imported = importer.import(&self.source, creds, &tree).await.map_err(oci)?;
                let unpacked = started.elapsed();
                let (layer, guard) = storage
                    .publish_layer(&self.op.namespace, NewLayer::Tree(tree.clone()))
                    .await
                    .map_err(|e| match e {
                        PublishError::Refused(refusal) => format!("{refusal}; nothing was imported"),
                        PublishError::Failed(e) => internal(&e),
                    })?;
                tracing::debug!(
                    op = %self.op.uuid,
                    fetch_and_unpack_ms = unpacked.as_millis() as u64,
                    publish_ms = (started.elapsed() - unpacked).as_millis() as u64,
                    "import phases"
                );
                Ok::<_, String>((imported, layer, guard))
            }
            .await;
            let _ = tokio::fs::remove_dir_all(&staging).await;
            // The quota guard is held until the image is recorded.
            let (imported, layer, _quota_guard) = result?;
            written = i64::try_from(imported.content_bytes).unwrap_or(i64::MAX);
            let image = ImageRecord {
                uuid,
                namespace: self.op.namespace.clone(),
                parent_uuid: None,
                operation_uuid: Some(self.op.uuid),
                layers: vec![layer.digest],
                env: imported.env,
                workdir: None,
                size_bytes: written,
                created_at_us: now_us(),
            };
            store.insert_image(&image).await.map_err(store_err)?;
        }
        if let Some(tag) = &self.tag {
            store.set_tag(&self.op.namespace, tag, uuid, now_us()).await.map_err(store_err)?;
        }
        Ok((uuid, written))
    }

    async fn finish(mut self, status: Status, error: Option<String>) -> CoreResult<()> {
        operations::conclude(&mut self.op, status, error);
        tracing::info!(op = %self.op.uuid, status = status.as_str(), error = ?self.op.error, "import finished");
        self.log.complete(&self.op).await
    }
}
