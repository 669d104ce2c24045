//! Runs: `POST /instances` (a VM running one command), `POST /operations/{id}/subprocesses`
//! (another command in it) and the instance's result.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::redact::{EnvNames, HIDDEN};
use crate::stream::encode_stream;

/// `POST /instances` body. Unknown fields are ignored, as the contract requires; unset fields
/// are not sent, so the server's defaults apply.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SpawnRequest {
    pub image: String,
    /// The main process: the fields an `ExecSpec` has too.
    #[serde(flatten)]
    pub process: ExecRequest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disposable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preserve_env: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preserve_cwd: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources_limits: Option<ResourcesLimits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networking: Option<Networking>,
    /// Path in the VM → `{"uuid": <file>, "mode": …, "uid": …, "gid": …}` (checked by the
    /// server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<BTreeMap<String, Value>>,
}

/// `ExecSpec`: the body of `POST /operations/{id}/subprocesses`. VM-level fields of a spawn
/// request (`image`, `timeout`, `files`, …) are ignored like any unknown field. `Debug`
/// redacts env values and stdin.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct ExecRequest {
    pub command: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<bool>,
    /// A null or empty value removes the variable (with `preserve_env`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, Option<String>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Boxwood extension: the directory used when `cwd` is empty and the image has no saved
    /// working directory (otherwise `/`); created if missing, like `cwd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<StdinRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate_output_at: Option<i64>,
}

impl std::fmt::Debug for ExecRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecRequest")
            .field("command", &self.command)
            .field("args", &self.args)
            .field("shell", &self.shell)
            .field("env", &self.env.as_ref().map(EnvNames))
            .field("cwd", &self.cwd)
            .field("default_cwd", &self.default_cwd)
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("stdin", &self.stdin.as_ref().map(|_| HIDDEN))
            .field("truncate_output_at", &self.truncate_output_at)
            .finish()
    }
}

/// `ClosableStreamRepr` (a `StreamRepr` without `close` is accepted too).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StdinRequest {
    #[serde(default)]
    pub value: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close: Option<bool>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResourcesLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_layer_bytes: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Networking {
    #[serde(default, skip_serializing_if = "Option::is_none")]
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

impl StreamRepr {
    pub fn of(bytes: &[u8], truncated: bool) -> Self {
        let (value, encoding) = encode_stream(bytes);
        Self { value, encoding: encoding.into(), truncated }
    }

    /// The bytes it carries.
    pub fn bytes(&self) -> Vec<u8> {
        crate::decode_stream(&serde_json::json!({"value": self.value, "encoding": self.encoding}))
    }
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpawnResponse {
    pub uuid: String,
    #[serde(flatten)]
    pub metadata: InstanceMetadata,
}
