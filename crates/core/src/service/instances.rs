//! Starting instance operations.

use std::sync::Arc;

use super::Service;
use crate::auth::{Caller, Permission};
use crate::clock::now_us;
use crate::error::{CoreError, CoreResult};
use crate::events::EventLog;
use crate::model::{SpawnRequest, SpawnResponse};
use crate::operations::{self, KIND_INSTANCE};
use crate::runner::{InjectedFile, Run, RunControl};
use crate::spec::{ImageRef, validate};

impl Service {
    pub async fn spawn_instance(&self, caller: &Caller, req: SpawnRequest) -> CoreResult<SpawnResponse> {
        let spec = validate(req, &self.inner.config.limits)?;
        caller.require(if spec.disposable { Permission::SpawnDisposable } else { Permission::Spawn })?;
        let image_uuid = match &spec.image {
            ImageRef::Uuid(u) => *u,
            ImageRef::Tag(t) => self.lookup_tag(caller, t).await?,
        };
        let image = self.visible_image(caller, image_uuid).await?;
        // Marked used before the run is recorded: retention re-checks the mark when it removes,
        // so either the image stays or it went first and the run is refused here.
        let now = now_us();
        if !self.inner.store.touch_image(image.uuid, now).await? {
            return Err(CoreError::NotFound(format!("image {}", image.uuid)));
        }
        let mut files = Vec::with_capacity(spec.files.len());
        for f in &spec.files {
            let missing = || CoreError::NotFound(format!("file {} (for {})", f.uuid, f.path));
            let record = match self.inner.store.file_by_uuid(f.uuid).await? {
                Some(r) if r.namespace == caller.namespace => r,
                _ => return Err(missing()),
            };
            if !self.inner.store.touch_file(record.uuid, now).await? {
                return Err(missing());
            }
            files.push(InjectedFile { spec: f.clone(), sha256: record.sha256 });
        }
        let metadata = spec.metadata(image.uuid);
        let echo = serde_json::to_value(&metadata).map_err(|e| CoreError::Internal(e.to_string()))?;
        let op = operations::pending(&caller.namespace, KIND_INSTANCE, Some(image.uuid), echo);
        let cap = self.inner.config.limits.max_event_log_bytes;
        let log = EventLog::fresh(self.inner.store.clone(), self.inner.hub.clone(), op.uuid, cap);
        let response = SpawnResponse { uuid: op.uuid.to_string(), metadata };
        let run = Run {
            namespace_slots: self.namespace_slots(&caller.namespace),
            control: Arc::new(RunControl::default()),
            op,
            spec,
            image,
            files,
            log,
        };
        let (op, control, env) = (run.op.clone(), run.control.clone(), self.inner.env.clone());
        self.start_operation(&op, control, async move { run.execute(&env).await }).await?;
        Ok(response)
    }
}
