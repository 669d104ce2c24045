//! The Contree v1 wire types (COMPAT.md §1–§4) and Boxwood's extensions, shared by the server
//! and its clients so neither has a second copy: requests serialize without their unset
//! fields and deserialize with the contract's defaults; responses round-trip exactly. Field
//! names and presence are part of the contract, so optional-looking response fields are often
//! always emitted.

mod file;
mod health;
mod image;
mod instance;
mod operation;
pub mod redact;
mod stream;

pub use file::{DirectoryState, DirectoryStateFile, DirectoryStateRequest, FileList, FileResponse, FileView};
pub use health::{Check, Readiness, ReadinessChecks, TemplateCheck, WhoAmI};
pub use image::{
    ImageList, ImageView, ImportRequest, LineageView, RegistryCredentials, RegistrySpec, RemovedImageView, TagRequest,
};
pub use instance::{
    ExecRequest, InstanceMetadata, InstanceResult, LimitsEcho, Networking, NetworkingEcho, ResourcesLimits,
    ResultResources, ResultState, SpawnRequest, SpawnResponse, StdinEcho, StdinRequest, StreamRepr,
};
pub use operation::{
    ErrorBody, EventKind, EventView, OperationCreated, OperationKind, OperationResponse, OperationStatus,
    OperationSummary, ProcessCreated, ResultRef,
};
pub use stream::{decode_stream, encode_stream};

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What the server writes, a client reads back as the same value: flattened fields and
    /// always-emitted nulls included.
    #[test]
    fn responses_round_trip() {
        let op = json!({
            "uuid": "01a2", "kind": "instance", "status": "SUCCESS", "error": null,
            "created_at": "2026-06-08T20:00:00.12Z", "duration": 1.5, "image_size": 0,
            "consumed_cpu": null, "consumed_memory": null, "image_uuid": "i", "result_image_uuid": "r",
            "metadata": {"command": "true"}, "result": {"image": "r", "tag": null}
        });
        let parsed: OperationResponse = serde_json::from_value(op.clone()).unwrap();
        assert_eq!(parsed.summary.status, OperationStatus::Success);
        assert_eq!(parsed.retry_after_secs(), None);
        assert_eq!(serde_json::to_value(&parsed).unwrap(), op);

        let spawn = SpawnRequest {
            image: "tag:python:3.11".into(),
            process: ExecRequest { command: "python --version".into(), shell: Some(true), ..Default::default() },
            disposable: Some(false),
            ..Default::default()
        };
        let sent = serde_json::to_value(&spawn).unwrap();
        assert_eq!(
            sent,
            json!({"image": "tag:python:3.11", "command": "python --version", "shell": true, "disposable": false})
        );
        let back: SpawnRequest = serde_json::from_value(sent).unwrap();
        assert_eq!((back.process.command.as_str(), back.timeout), ("python --version", None));
    }

    #[test]
    fn debug_hides_env_values_and_stdin() {
        let req = ExecRequest {
            command: "env".into(),
            env: Some([("TOKEN".to_owned(), Some("s3cret".to_owned()))].into()),
            stdin: Some(StdinRequest { value: "password".into(), ..Default::default() }),
            ..Default::default()
        };
        let shown = format!("{req:?}");
        assert!(shown.contains("TOKEN") && !shown.contains("s3cret") && !shown.contains("password"), "{shown}");
    }
}
