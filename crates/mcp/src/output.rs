//! What the tools answer: an operation as contree-mcp's `OperationOutput` (so agent habits
//! carry over) plus Boxwood's plainer fields, and errors an agent can act on.

use boxwood_client::ClientError;
use boxwood_client::types::{OperationKind, OperationResponse, OperationStatus, StreamRepr};
use serde_json::{Value, json};

/// An operation for an agent: the summary, the run's result (exit code, decoded output),
/// `result_image` and `filesystem_changed`.
pub fn operation(op: &OperationResponse) -> Value {
    let s = &op.summary;
    let result = op.metadata.get("result").filter(|r| !r.is_null());
    let state = result.and_then(|r| r.get("state")).cloned();
    let text = |name: &str| -> Value {
        let repr = result.and_then(|r| serde_json::from_value::<StreamRepr>(r.get(name)?.clone()).ok());
        match repr {
            Some(r) if !r.value.is_empty() => Value::String(String::from_utf8_lossy(&r.bytes()).into_owned()),
            _ => Value::Null,
        }
    };
    let exit_code = state.as_ref().and_then(|st| st.get("exit_code")).cloned().unwrap_or(Value::Null);
    let timed_out = state.as_ref().and_then(|st| st.get("timed_out")).and_then(Value::as_bool).unwrap_or(false);
    let result_image = op.result.as_ref().and_then(|r| r.image.clone());
    let changed = s.kind == OperationKind::Instance
        && result_image.is_some()
        && result_image.as_deref() != s.image_uuid.as_deref();
    let mut out = json!({
        "uuid": s.uuid,
        "operation_id": s.uuid,
        "status": s.status,
        "kind": s.kind,
        "error": s.error,
        "created_at": s.created_at,
        "result": op.result,
        "duration": s.duration,
        "image_size": s.image_size,
        "consumed_cpu": s.consumed_cpu,
        "consumed_memory": s.consumed_memory,
        "image_uuid": s.image_uuid,
        "result_image_uuid": s.result_image_uuid,
        "result_image": result_image,
        "filesystem_changed": changed,
        "exit_code": exit_code,
        "timed_out": timed_out,
        "state": state,
        "stdout": text("stdout"),
        "stderr": text("stderr"),
    });
    if timed_out {
        out["hint"] = json!("the command was killed at its timeout; raise `timeout` (seconds) if it needs longer");
    } else if s.status == OperationStatus::Failed {
        out["hint"] = json!("the operation failed before the command finished; `error` says why");
    }
    out
}

/// A client error as an agent should read it: what happened and what to do.
pub fn error(e: &ClientError, url: &str) -> String {
    match e {
        ClientError::Unreachable { .. } => {
            format!("cannot reach the Boxwood server at {url}: is it running, and is --url / BOXWOOD_URL right?")
        }
        ClientError::Api { status: 401, .. } => {
            "the server refused the token (HTTP 401): check --token / BOXWOOD_TOKEN".to_owned()
        }
        // An unknown image (a run's or a lookup's): the agent's next step is to list them.
        ClientError::Api { status: 404, message } if message.contains("image") => {
            format!("{message} (HTTP 404). Call `list_images` to see the images you can use.")
        }
        other => other.to_string(),
    }
}
