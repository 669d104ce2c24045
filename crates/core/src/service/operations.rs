//! Reading, listing and cancelling operations, and their event logs.

use boxwood_store::{OperationFilter, OperationRecord};
use futures::Stream;
use serde_json::Value;
use uuid::Uuid;

use super::{OperationQuery, Page, Service};
use crate::auth::{Caller, Permission};
use crate::error::{CoreError, CoreResult};
use crate::events;
use crate::model::{EventView, OperationResponse, OperationSummary};
use crate::operations::{self, KIND_INSTANCE, Status};
use crate::runner::{MAIN_SPID, StopReason};

impl Service {
    pub(super) async fn visible_operation(&self, caller: &Caller, uuid: Uuid) -> CoreResult<OperationRecord> {
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
        let cap = op.metadata.get("truncate_output_at").and_then(Value::as_u64).unwrap_or(u64::MAX);
        let fold = self.fold_process(op.uuid, i64::from(MAIN_SPID), cap).await?;
        serde_json::to_value(fold.result()).map_err(|e| CoreError::Internal(e.to_string()))
    }

    pub async fn list_operations(
        &self,
        caller: &Caller,
        q: OperationQuery,
        page: Page,
    ) -> CoreResult<Vec<OperationSummary>> {
        caller.require(Permission::List)?;
        let q = OperationQuery { status: q.status.map(|s| s.to_ascii_uppercase()), ..q };
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
        match self.run_control(uuid) {
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
}
