//! Processes of a running instance: starting subprocesses, their results folded from the
//! event log, stdin and signals (COMPAT.md §1, §4).

use std::sync::Arc;

use boxwood_store::OperationRecord;
use serde_json::Value;
use uuid::Uuid;

use super::Service;
use crate::auth::{Caller, Permission};
use crate::error::{CoreError, CoreResult};
use crate::model::{EventKind, ExecRequest, InstanceResult, StdinRequest};
use crate::operations::{KIND_INSTANCE, Status};
use crate::process::{ResultFold, parse_signal};
use crate::runner::{Live, MAIN_SPID};
use crate::spec::{decode_stdin, validate_process};

/// Events read per page when folding a process's result.
const FOLD_PAGE: i64 = 1000;

impl Service {
    /// The instance operation `uuid`, checked for the permission its runs need: SPAWN, or
    /// SPAWN_DISPOSABLE for a disposable instance.
    async fn instance_for_control(&self, caller: &Caller, uuid: Uuid) -> CoreResult<OperationRecord> {
        let op = self.visible_operation(caller, uuid).await?;
        let disposable = op.metadata.get("disposable").and_then(Value::as_bool).unwrap_or(false);
        caller.require(if disposable { Permission::SpawnDisposable } else { Permission::Spawn })?;
        if op.kind != KIND_INSTANCE {
            return Err(CoreError::Conflict(format!("operation {uuid} is not an instance")));
        }
        Ok(op)
    }

    /// The live phase of an active instance; `finished` is the error for a terminal one.
    fn live_or(&self, op: &OperationRecord, finished: impl FnOnce(String) -> CoreError) -> CoreResult<Arc<Live>> {
        let status = Status::parse(&op.status).unwrap_or(Status::Failed);
        if status.is_terminal() {
            return Err(finished(format!("operation {} is already {}", op.uuid, op.status)));
        }
        if status == Status::Pending {
            return Err(CoreError::Conflict(format!("operation {} is still PENDING", op.uuid)));
        }
        self.inner.env.live(op.uuid).ok_or_else(|| match status {
            Status::Assigned => CoreError::TooEarly(format!("operation {}'s VM is starting", op.uuid)),
            _ => finished(format!("operation {} is finishing", op.uuid)),
        })
    }

    /// `POST /operations/{id}/subprocesses`: starts `req` in the running VM; returns its spid.
    pub async fn create_subprocess(&self, caller: &Caller, uuid: Uuid, req: ExecRequest) -> CoreResult<u32> {
        let op = self.instance_for_control(caller, uuid).await?;
        let spec = validate_process(req, &self.inner.config.limits)?;
        let live = self.live_or(&op, CoreError::Conflict)?;
        live.exec(spec).await
    }

    /// `GET /operations/{id}/subprocesses/{spid}`: the process's `InstanceResult` folded from
    /// its events; exit code and signal are −1 while it runs.
    pub async fn get_subprocess(&self, caller: &Caller, uuid: Uuid, spid: i64) -> CoreResult<InstanceResult> {
        caller.require(Permission::List)?;
        let op = self.visible_operation(caller, uuid).await?;
        if spid < 1 {
            return Err(CoreError::bad(format!("spid must be >= 1, got {spid}")));
        }
        if op.kind != KIND_INSTANCE || op.status == Status::Cancelled.as_str() {
            return Err(CoreError::NotFound(format!("process {spid} of operation {uuid}")));
        }
        let cap = op.metadata.get("truncate_output_at").and_then(Value::as_u64).unwrap_or(u64::MAX);
        let fold = self.fold_process(uuid, spid, cap).await?;
        if fold.spawned() {
            return Ok(fold.result());
        }
        let starting = match self.inner.env.live(uuid) {
            Some(live) => u32::try_from(spid).is_ok_and(|s| live.allocated(s)),
            None => op.status == Status::Assigned.as_str() && spid == i64::from(MAIN_SPID),
        };
        if starting {
            return Err(CoreError::TooEarly(format!("process {spid} is starting")));
        }
        Err(CoreError::NotFound(format!("process {spid} of operation {uuid}")))
    }

    /// `DELETE /operations/{id}/subprocesses/{spid}?signal=`: signals the process group
    /// (default SIGKILL). Killing spid 1 ends the operation.
    pub async fn signal_subprocess(
        &self,
        caller: &Caller,
        uuid: Uuid,
        spid: i64,
        signal: Option<&str>,
    ) -> CoreResult<()> {
        let op = self.instance_for_control(caller, uuid).await?;
        let signal = parse_signal(signal)?;
        let spid = process_id(spid)?;
        let live = self.live_or(&op, CoreError::Conflict)?;
        live.signal(spid, signal).await
    }

    /// `POST /operations/{id}/subprocesses/{spid}/stdin`: writes and/or closes stdin.
    pub async fn write_subprocess_stdin(
        &self,
        caller: &Caller,
        uuid: Uuid,
        spid: i64,
        req: StdinRequest,
    ) -> CoreResult<()> {
        let op = self.instance_for_control(caller, uuid).await?;
        let (bytes, echo) = decode_stdin(Some(req))?;
        let spid = process_id(spid)?;
        let live = self.live_or(&op, CoreError::Gone)?;
        live.write_stdin(spid, bytes, echo.close).await
    }

    /// Folds the stored events of one process.
    pub(super) async fn fold_process(&self, op: Uuid, spid: i64, cap: u64) -> CoreResult<ResultFold> {
        let mut fold = ResultFold::new(cap);
        let mut after = None;
        loop {
            let page = self.inner.store.events(op, after, Some(spid), FOLD_PAGE).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            for ev in &page {
                if let Some(kind) = EventKind::parse(&ev.kind) {
                    fold.feed(kind, &ev.data);
                }
            }
            if (page.len() as i64) < FOLD_PAGE {
                break;
            }
        }
        Ok(fold)
    }
}

fn process_id(spid: i64) -> CoreResult<u32> {
    u32::try_from(spid).ok().filter(|s| *s >= 1).ok_or_else(|| CoreError::bad(format!("spid must be >= 1, got {spid}")))
}
