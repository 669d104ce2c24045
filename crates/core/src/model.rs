//! The Contree v1 wire shapes the core accepts and produces (COMPAT.md §1–§4). Transports
//! (HTTP, MCP) serialize these as they are; field names and presence are part of the
//! contract, so optional-looking fields are often always emitted.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `POST /instances` body. Unknown fields are ignored, as the contract requires.
#[derive(Debug, Clone, Deserialize)]
pub struct SpawnRequest {
    pub image: String,
    /// The main process: the fields an `ExecSpec` has too.
    #[serde(flatten)]
    pub process: ExecRequest,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub timeout: Option<i64>,
    #[serde(default)]
    pub disposable: Option<bool>,
    #[serde(default)]
    pub preserve_env: Option<bool>,
    #[serde(default)]
    pub preserve_cwd: Option<bool>,
    #[serde(default)]
    pub resources_limits: Option<ResourcesLimits>,
    #[serde(default)]
    pub networking: Option<Networking>,
    #[serde(default)]
    pub files: Option<BTreeMap<String, Value>>,
}

/// `ExecSpec`: the body of `POST /operations/{id}/subprocesses`. VM-level fields of a spawn
/// request (`image`, `timeout`, `files`, …) are ignored like any unknown field. `Debug`
/// redacts env values.
#[derive(Clone, Default, Deserialize)]
pub struct ExecRequest {
    pub command: String,
    #[serde(default)]
    pub args: Option<Vec<String>>,
    #[serde(default)]
    pub shell: Option<bool>,
    #[serde(default)]
    pub env: Option<BTreeMap<String, Option<String>>>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub uid: Option<i64>,
    #[serde(default)]
    pub gid: Option<i64>,
    #[serde(default)]
    pub stdin: Option<StdinRequest>,
    #[serde(default)]
    pub truncate_output_at: Option<i64>,
}

/// `ClosableStreamRepr` (a `StreamRepr` without `close` is accepted too).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StdinRequest {
    #[serde(default)]
    pub value: String,
    #[serde(default)]
    pub encoding: Option<String>,
    #[serde(default)]
    pub close: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResourcesLimits {
    #[serde(default)]
    pub max_layer_bytes: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Networking {
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// The normalized request echoed as `metadata` (and in the spawn response), with every
/// default filled in and `image` resolved to a UUID.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceMetadata {
    pub command: String,
    pub image: String,
    pub args: Vec<String>,
    pub shell: bool,
    pub env: BTreeMap<String, String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub hostname: String,
    pub stdin: StdinEcho,
    pub timeout: u64,
    pub truncate_output_at: u64,
    pub disposable: bool,
    pub preserve_env: bool,
    pub preserve_cwd: bool,
    pub resources_limits: LimitsEcho,
    pub networking: NetworkingEcho,
    pub files: BTreeMap<String, Value>,
    pub result: Option<InstanceResult>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StdinEcho {
    pub value: String,
    pub encoding: String,
    pub close: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LimitsEcho {
    pub max_layer_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkingEcho {
    pub enabled: bool,
}

/// `StreamRepr`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamRepr {
    pub value: String,
    pub encoding: String,
    pub truncated: bool,
}

/// `InstanceResult`: always emitted whole (the SDK requires every key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceResult {
    pub resources: ResultResources,
    pub state: ResultState,
    pub stdout: StreamRepr,
    pub stderr: StreamRepr,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResultResources {
    pub block_input: u64,
    pub block_output: u64,
    pub cost: f64,
    pub elapsed_time: f64,
    pub involuntary_switches: u64,
    pub max_rss: u64,
    pub monotonic_time: f64,
    pub page_faults: u64,
    pub page_faults_io: u64,
    pub shared_memory: u64,
    pub signals: u64,
    pub swaps: u64,
    pub system_cpu_time: f64,
    pub unshared_memory: u64,
    pub user_cpu_time: f64,
    pub voluntary_switches: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultState {
    pub continued: bool,
    pub core_dump: bool,
    pub exit_code: i32,
    pub pid: u32,
    pub signal: i32,
    pub stopped: bool,
    pub timed_out: bool,
}

/// `POST /instances` response: the normalized request plus the operation UUID.
#[derive(Debug, Clone, Serialize)]
pub struct SpawnResponse {
    pub uuid: String,
    #[serde(flatten)]
    pub metadata: InstanceMetadata,
}

/// `OperationSummary` (items of `GET /operations`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OperationSummary {
    pub uuid: String,
    pub kind: String,
    pub status: String,
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
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OperationResponse {
    #[serde(flatten)]
    pub summary: OperationSummary,
    pub metadata: Value,
    pub result: Option<ResultRef>,
}

impl OperationResponse {
    /// Suggested poll interval for an operation that is still active.
    pub fn retry_after_secs(&self) -> Option<u32> {
        let terminal = matches!(self.summary.status.as_str(), "SUCCESS" | "FAILED" | "CANCELLED");
        (!terminal).then_some(1)
    }
}

/// `OperationResponse.result`: emitted with both keys at every terminal state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResultRef {
    pub image: Option<String>,
    pub tag: Option<String>,
}

/// `Image`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageView {
    pub uuid: String,
    pub tag: Option<String>,
    pub created_at: String,
    pub operation_uuid: Option<String>,
}

/// `POST /images/import` body.
#[derive(Debug, Clone, Deserialize)]
pub struct ImportRequest {
    pub registry: RegistrySpec,
    #[serde(default)]
    pub tag: Option<String>,
    #[serde(default)]
    pub timeout: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RegistrySpec {
    pub url: String,
    #[serde(default)]
    pub credentials: Option<RegistryCredentials>,
}

#[derive(Clone, Deserialize)]
pub struct RegistryCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredentials")
            .field("username", &self.username)
            .field("password", &crate::redact::HIDDEN)
            .finish()
    }
}

impl std::fmt::Debug for ExecRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecRequest")
            .field("command", &self.command)
            .field("args", &self.args)
            .field("shell", &self.shell)
            .field("env", &self.env.as_ref().map(crate::redact::EnvNames))
            .field("cwd", &self.cwd)
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("stdin", &self.stdin.as_ref().map(|_| crate::redact::HIDDEN))
            .field("truncate_output_at", &self.truncate_output_at)
            .finish()
    }
}

/// `{"uuid": <operation>}`, the answer to an import request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OperationCreated {
    pub uuid: String,
}

/// `FileResponse` (`POST /files`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileResponse {
    pub uuid: String,
    pub sha256: String,
    pub size: i64,
}

/// `File`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileView {
    pub uuid: String,
    pub sha256: String,
    pub size: i64,
    pub created_at: String,
    pub updated_at: String,
}

/// Boxwood extension `GET /images/{uuid}/lineage`: where an image comes from and what was
/// made from it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LineageView {
    pub image: ImageView,
    pub parent: Option<String>,
    /// Parent first, up to the root.
    pub ancestors: Vec<ImageView>,
    /// Direct children, oldest first.
    pub children: Vec<ImageView>,
    /// Direct children the retention policy removed, oldest first.
    pub removed_children: Vec<RemovedImageView>,
}

/// An image the retention policy removed, as lineage names it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RemovedImageView {
    pub uuid: String,
    pub created_at: String,
    pub removed_at: String,
    pub reason: String,
}

/// `GET /readyz`: whether this server can take work now, check by check (no numbers, no
/// paths: the probe needs no token).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub checks: ReadinessChecks,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReadinessChecks {
    /// A write to the metadata store commits.
    pub store: Check,
    /// Free space on the state dir's filesystem is above the reserve (and not zero).
    pub disk: Check,
    /// Fast start: `building` is not ready yet; `cold_boot` (no template could be made) and
    /// `off` still serve, more slowly.
    pub template: TemplateCheck,
    /// New runs are accepted (not shutting down).
    pub runs: Check,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    Ok,
    Failing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateCheck {
    Building,
    Ready,
    ColdBoot,
    Off,
}

impl ReadinessChecks {
    /// The names of the checks that fail.
    pub fn failing(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        for (name, ok) in [
            ("store", self.store == Check::Ok),
            ("disk", self.disk == Check::Ok),
            ("template", self.template != TemplateCheck::Building),
            ("runs", self.runs == Check::Ok),
        ] {
            if !ok {
                v.push(name);
            }
        }
        v
    }
}

/// `WhoAmIResponse`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WhoAmI {
    pub token_uuid: String,
    pub token_expiration: Option<i64>,
    pub permissions: BTreeMap<String, bool>,
    pub limits: BTreeMap<String, i64>,
    pub operations_stat: BTreeMap<String, i64>,
}

/// `OperationEvent` as carried in an SSE frame's `data:`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventView {
    pub id: i64,
    pub ts: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spid: Option<i64>,
    #[serde(rename = "type")]
    pub kind: String,
    pub data: Value,
}

/// The Contree rule shared by server and clients: `ascii` iff every byte is printable
/// ASCII (32..=126) or `\t`, `\n`, `\r`; otherwise base64.
pub fn encode_stream(bytes: &[u8]) -> (String, &'static str) {
    use base64::Engine as _;
    if bytes.iter().all(|&b| (32..=126).contains(&b) || matches!(b, b'\t' | b'\n' | b'\r')) {
        (String::from_utf8_lossy(bytes).into_owned(), "ascii")
    } else {
        (base64::engine::general_purpose::STANDARD.encode(bytes), "base64")
    }
}

/// The bytes of an event's `{value, encoding}` (the inverse of [`encode_stream`]).
pub fn decode_stream(data: &Value) -> Vec<u8> {
    use base64::Engine as _;
    let value = data.get("value").and_then(Value::as_str).unwrap_or("");
    match data.get("encoding").and_then(Value::as_str) {
        Some("base64") => base64::engine::general_purpose::STANDARD.decode(value).unwrap_or_default(),
        _ => value.as_bytes().to_vec(),
    }
}

impl StreamRepr {
    pub fn of(bytes: &[u8], truncated: bool) -> Self {
        let (value, encoding) = encode_stream(bytes);
        Self { value, encoding: encoding.into(), truncated }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_encoding_rule() {
        assert_eq!(encode_stream(b"hi\tthere\r\n"), ("hi\tthere\r\n".into(), "ascii"));
        assert_eq!(encode_stream("é".as_bytes()), ("w6k=".into(), "base64"));
        assert_eq!(encode_stream(b"\x00"), ("AA==".into(), "base64"));
        assert_eq!(encode_stream(b""), ("".into(), "ascii"));
        let bytes = [0u8, 200, 10];
        let (value, encoding) = encode_stream(&bytes);
        assert_eq!(decode_stream(&serde_json::json!({"value": value, "encoding": encoding})), bytes);
    }
}
