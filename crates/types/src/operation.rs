//! Operations (a run or an import), their events, and the error envelope every failing call
//! answers with.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `OperationStatus`: PENDING → ASSIGNED → EXECUTING → SUCCESS, or FAILED / CANCELLED from
/// any state before a terminal one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OperationStatus {
    Pending,
    Assigned,
    Executing,
    Success,
    Failed,
    Cancelled,
}

impl OperationStatus {
    pub const ALL: [Self; 6] =
        [Self::Pending, Self::Assigned, Self::Executing, Self::Success, Self::Failed, Self::Cancelled];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Assigned => "ASSIGNED",
            Self::Executing => "EXECUTING",
            Self::Success => "SUCCESS",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Success | Self::Failed | Self::Cancelled)
    }
}

/// `OperationKind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationKind {
    /// A run (`POST /instances`).
    Instance,
    /// A registry import (`POST /images/import`).
    ImageImport,
}

impl OperationKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Instance => "instance",
            Self::ImageImport => "image_import",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Instance, Self::ImageImport].into_iter().find(|k| k.as_str() == s)
    }
}

/// `OperationSummary` (items of `GET /operations`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationSummary {
    pub uuid: String,
    pub kind: OperationKind,
    pub status: OperationStatus,
    pub error: Option<String>,
    pub created_at: String,
    pub duration: f64,
    pub image_size: Option<i64>,
    pub consumed_cpu: Option<f64>,
    pub consumed_memory: Option<i64>,
    pub image_uuid: Option<String>,
    pub result_image_uuid: Option<String>,
}

/// `OperationResponse` (`GET /operations/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationResponse {
    #[serde(flatten)]
    pub summary: OperationSummary,
    pub metadata: Value,
    pub result: Option<ResultRef>,
}

impl OperationResponse {
    /// Suggested poll interval for an operation that is still active.
    pub fn retry_after_secs(&self) -> Option<u32> {
        (!self.summary.status.is_terminal()).then_some(1)
    }
}

/// `OperationResponse.result`: emitted with both keys at every terminal state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRef {
    pub image: Option<String>,
    pub tag: Option<String>,
}

/// `{"uuid": <operation>}`, the answer to an import request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationCreated {
    pub uuid: String,
}

/// `POST /operations/{id}/subprocesses` response: the new process's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessCreated {
    pub spid: i64,
}

/// The `type` of an operation event (COMPAT §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The VM is up: the normalized request and the VM's facts.
    Init,
    /// The run's network (address, DNS) when it has one.
    Network,
    /// A process started.
    Spawn,
    /// Bytes written to a process's stdin.
    Stdin,
    Stdout,
    Stderr,
    /// A process ended: its state and resources.
    Exit,
    /// A stream went past `truncate_output_at`: what was cut.
    Truncated,
    /// The VM stopped (timeout, cancel, shutdown).
    Shutdown,
    /// The log reached its size limit: later stream events are dropped.
    SizeCap,
    /// The operation is terminal; always the last event.
    Completion,
}

impl EventKind {
    pub const ALL: [Self; 11] = [
        Self::Init,
        Self::Network,
        Self::Spawn,
        Self::Stdin,
        Self::Stdout,
        Self::Stderr,
        Self::Exit,
        Self::Truncated,
        Self::Shutdown,
        Self::SizeCap,
        Self::Completion,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Init => "init",
            Self::Network => "network",
            Self::Spawn => "spawn",
            Self::Stdin => "stdin",
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
            Self::Exit => "exit",
            Self::Truncated => "truncated",
            Self::Shutdown => "shutdown",
            Self::SizeCap => "size_cap",
            Self::Completion => "completion",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// `stdin`, `stdout` or `stderr`: data is a `{value, encoding}` stream chunk.
    pub fn is_stream(self) -> bool {
        matches!(self, Self::Stdin | Self::Stdout | Self::Stderr)
    }
}

/// `OperationEvent` as carried in an SSE frame's `data:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventView {
    pub id: i64,
    pub ts: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spid: Option<i64>,
    #[serde(rename = "type")]
    pub kind: EventKind,
    pub data: Value,
}

/// The body of every error answer: `{"error": <message>, "status": <HTTP status>}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub status: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_contracts_and_parse_back() {
        for s in OperationStatus::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
            assert_eq!(OperationStatus::parse(s.as_str()), Some(s));
        }
        for k in EventKind::ALL {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
            assert_eq!(EventKind::parse(k.as_str()), Some(k));
        }
        for k in [OperationKind::Instance, OperationKind::ImageImport] {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
            assert_eq!(OperationKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(OperationStatus::parse("success"), None);
    }

    #[test]
    fn a_completion_event_round_trips_without_spid() {
        let frame = r#"{"id":7,"ts":"2026-06-08T20:00:00.12Z","type":"completion","data":{"status":"SUCCESS"}}"#;
        let ev: EventView = serde_json::from_str(frame).unwrap();
        assert_eq!((ev.kind, ev.spid), (EventKind::Completion, None));
        assert_eq!(serde_json::to_string(&ev).unwrap(), frame);
    }
}
