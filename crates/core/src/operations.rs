//! The operation state machine and the views of an operation record.
//!
//! ```text
//! PENDING ──> ASSIGNED ──> EXECUTING ──> SUCCESS
//!    │            │            ├───────> FAILED
//!    └────────────┴────────────┴───────> CANCELLED / FAILED
//! ```

use boxwood_store::OperationRecord;
use serde_json::Value;
use uuid::Uuid;

use crate::clock::{format_ts, now_us};
use crate::model::{OperationKind, OperationResponse, OperationSummary, ResultRef};

pub use boxwood_types::OperationStatus as Status;

/// The lifecycle's rule (see the module docs).
pub trait Lifecycle {
    /// Whether the lifecycle allows moving from `self` to `next`.
    fn can_become(self, next: Status) -> bool;
}

impl Lifecycle for Status {
    fn can_become(self, next: Status) -> bool {
        use Status::*;
        match (self, next) {
            (Pending, Assigned) | (Assigned, Executing) | (Executing, Success) => true,
            (Pending | Assigned | Executing, Failed | Cancelled) => true,
            (Pending, _) | (Assigned, _) | (Executing, _) => false,
            (Success | Failed | Cancelled, _) => false,
        }
    }
}

pub const KIND_INSTANCE: &str = OperationKind::Instance.as_str();
pub const KIND_IMAGE_IMPORT: &str = OperationKind::ImageImport.as_str();

/// A new PENDING operation of `kind` in `namespace`.
pub(crate) fn pending(namespace: &str, kind: &str, image_uuid: Option<Uuid>, metadata: Value) -> OperationRecord {
    OperationRecord {
        uuid: Uuid::now_v7(),
        namespace: namespace.to_owned(),
        kind: kind.into(),
        status: Status::Pending.as_str().into(),
        error: None,
        created_at_us: now_us(),
        started_at_us: None,
        finished_at_us: None,
        image_uuid,
        result_image_uuid: None,
        result_tag: None,
        image_size: None,
        consumed_cpu: None,
        consumed_memory: None,
        metadata,
        result: None,
    }
}

/// Puts `op` in its terminal `status`: only a SUCCESS keeps a result image, tag and size.
pub(crate) fn conclude(op: &mut OperationRecord, status: Status, error: Option<String>) {
    debug_assert!(status.is_terminal(), "{status:?}");
    op.status = status.as_str().into();
    op.error = error;
    op.finished_at_us = Some(now_us());
    if status != Status::Success {
        op.result_image_uuid = None;
        op.result_tag = None;
        op.image_size = None;
    }
}

/// Seconds the operation has run: 0 before it started, growing while it runs.
fn duration_secs(op: &OperationRecord) -> f64 {
    match (op.started_at_us, op.finished_at_us) {
        (Some(s), Some(f)) => (f - s).max(0) as f64 / 1e6,
        (Some(s), None) => (now_us() - s).max(0) as f64 / 1e6,
        _ => 0.0,
    }
}

pub fn summary(op: &OperationRecord) -> OperationSummary {
    if Status::parse(&op.status).is_none() || OperationKind::parse(&op.kind).is_none() {
        tracing::warn!(op = %op.uuid, status = %op.status, kind = %op.kind, "an operation row the core did not write");
    }
    OperationSummary {
        uuid: op.uuid.to_string(),
        // Rows are the core's own; one it did not write reads as a failed run.
        kind: OperationKind::parse(&op.kind).unwrap_or(OperationKind::Instance),
        status: Status::parse(&op.status).unwrap_or(Status::Failed),
        error: op.error.clone(),
        created_at: format_ts(op.created_at_us),
        duration: duration_secs(op),
        image_size: op.image_size,
        consumed_cpu: op.consumed_cpu,
        consumed_memory: op.consumed_memory,
        image_uuid: op.image_uuid.map(|u| u.to_string()),
        result_image_uuid: op.result_image_uuid.map(|u| u.to_string()),
    }
}

/// The full response; `metadata.result` is the final result, or `inflight` while running.
pub fn response(op: &OperationRecord, inflight: Option<Value>) -> OperationResponse {
    let mut metadata = op.metadata.clone();
    if let Value::Object(m) = &mut metadata
        && op.kind == KIND_INSTANCE
    {
        m.insert("result".into(), op.result.clone().or(inflight).unwrap_or(Value::Null));
    }
    // Both keys at every terminal state; `result_image_uuid` is only ever set on a SUCCESS
    // that persisted (or re-used) an image.
    let terminal = Status::parse(&op.status).is_some_and(Status::is_terminal);
    let result =
        terminal.then(|| ResultRef { image: op.result_image_uuid.map(|u| u.to_string()), tag: op.result_tag.clone() });
    OperationResponse { summary: summary(op), metadata, result }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_transitions() {
        use Status::*;
        assert!(Pending.can_become(Assigned));
        assert!(Executing.can_become(Success));
        assert!(Pending.can_become(Cancelled));
        assert!(!Pending.can_become(Success));
        assert!(!Success.can_become(Failed));
        assert!(!Cancelled.can_become(Cancelled));
        for s in [Pending, Assigned, Executing, Success, Failed, Cancelled] {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
    }
}
