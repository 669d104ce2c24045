//! The tools' parameters: the names and defaults of contree-mcp 0.5.0 (COMPAT §7.2), so
//! prompts written for it carry over. Doc comments are what the agent reads.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;

fn yes() -> bool {
    true
}
fn thirty() -> i64 {
    30
}
fn eight_thousand() -> i64 {
    8000
}
fn hundred() -> i64 {
    100
}
fn five_minutes() -> f64 {
    300.0
}
fn root_dir() -> String {
    "/".into()
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct Run {
    /// The command. With `shell` (the default) a /bin/sh command line: pipes, `&&`, `$VAR`.
    pub command: String,
    /// The image: its UUID, or `tag:NAME` (e.g. `tag:python:3.11`). `list_images` shows them.
    pub image: String,
    /// Run through /bin/sh -c (default true); false runs `command` as a program.
    #[serde(default = "yes")]
    pub shell: bool,
    /// Extra environment variables, e.g. {"MY_VAR": "value"}.
    #[serde(default)]
    pub env: Option<BTreeMap<String, Option<String>>>,
    /// Save the environment into the result image (with disposable=false).
    #[serde(default)]
    pub preserve_env: bool,
    /// Working directory, created if missing; empty: the image's own, else /root.
    #[serde(default)]
    pub cwd: String,
    #[serde(default)]
    pub uid: i64,
    #[serde(default)]
    pub gid: i64,
    /// Seconds before the command is killed (default 30); a killed run says `timed_out`.
    #[serde(default = "thirty")]
    pub timeout: i64,
    /// true (default): changes are thrown away. false: they become a new image, returned
    /// as `result_image` (the source image is never changed).
    #[serde(default = "yes")]
    pub disposable: bool,
    /// Text fed to the command's stdin (then closed).
    #[serde(default)]
    pub stdin: Option<String>,
    /// Files to put in the VM first: the key is the path in the VM, the value the UUID an
    /// `upload` returned, e.g. {"/app/main.py": "0199…"}. One UUID may go to several paths.
    #[serde(default)]
    pub files: Option<BTreeMap<String, String>>,
    /// A directory state from `rsync`: its files are put in the VM (with their modes) first.
    #[serde(default)]
    pub directory_state_id: Option<i64>,
    /// true (default): wait and return the result. false: return {"operation_id"} at once;
    /// then `wait_operations` or `get_operation`.
    #[serde(default = "yes")]
    pub wait: bool,
    /// Bytes of stdout and of stderr kept (default 8000).
    #[serde(default = "eight_thousand")]
    pub truncate_output_at: i64,
    /// Largest writable layer, in bytes (the server's default otherwise).
    #[serde(default)]
    pub max_layer_bytes: Option<i64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ListImages {
    #[serde(default = "hundred")]
    pub limit: i64,
    #[serde(default)]
    pub offset: i64,
    /// Only images with a tag.
    #[serde(default)]
    pub tagged: bool,
    /// Only tags starting with this, e.g. "python".
    #[serde(default)]
    pub tag_prefix: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ImageArg {
    /// The image: its UUID, or `tag:NAME`.
    pub image: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ImportImage {
    /// What to import, e.g. `docker://docker.io/library/python:3.11`.
    pub registry_url: String,
    /// A tag to give the image, e.g. "python:3.11".
    #[serde(default)]
    pub tag: Option<String>,
    /// Wait for the import (default true); false returns {"operation_id"}.
    #[serde(default = "yes")]
    pub wait: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SetTag {
    pub image_uuid: String,
    /// The tag to move to this image; none removes the image's tags.
    #[serde(default)]
    pub tag: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct Upload {
    /// An absolute path of a local file to upload.
    #[serde(default)]
    pub path: Option<String>,
    /// Text to upload.
    #[serde(default)]
    pub content: Option<String>,
    /// Bytes to upload, base64.
    #[serde(default)]
    pub content_base64: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct Download {
    pub image: String,
    /// The file in the image, e.g. /etc/os-release.
    pub path: String,
    /// An absolute local path to write it to (parents are created).
    pub destination: String,
    /// Make the local file executable.
    #[serde(default)]
    pub executable: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct OperationArg {
    pub operation_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ListOperations {
    #[serde(default = "hundred")]
    pub limit: i64,
    /// PENDING, ASSIGNED, EXECUTING, SUCCESS, FAILED or CANCELLED.
    #[serde(default)]
    pub status: Option<String>,
    /// `instance` (runs) or `image_import`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct WaitOperations {
    pub operation_ids: Vec<String>,
    /// Seconds to wait in all (default 300).
    #[serde(default = "five_minutes")]
    pub timeout: f64,
    /// `all` (default): wait for every one. `any`: the first to finish; the others are cancelled.
    #[serde(default)]
    pub mode: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ListFiles {
    pub image: String,
    #[serde(default = "root_dir")]
    pub path: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ReadFile {
    pub image: String,
    pub path: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct Grep {
    pub image: String,
    /// A regular expression.
    pub pattern: String,
    /// Where to search (default /).
    #[serde(default)]
    pub path: Option<String>,
    /// Only files matching this glob, e.g. "*.py".
    #[serde(default)]
    pub glob: Option<String>,
    #[serde(default)]
    pub max_count: Option<i64>,
    #[serde(default)]
    pub max_total: Option<i64>,
    /// Case-sensitive (default true).
    #[serde(default)]
    pub case: Option<bool>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct Guide {
    /// quickstart, workflow, state, async, tagging, errors or reference.
    pub section: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct Exec {
    /// A running operation (a `run` with wait=false).
    pub operation_id: String,
    pub command: String,
    #[serde(default = "yes")]
    pub shell: bool,
    #[serde(default = "thirty")]
    pub timeout: i64,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct Rsync {
    /// An absolute local directory, e.g. /home/me/project.
    pub source: String,
    /// Where it goes in the VM, e.g. /app.
    pub destination: String,
    /// Globs of paths (relative to `source`) to leave out, e.g. ["*.log", ".git", "node_modules"].
    #[serde(default)]
    pub exclude: Option<Vec<String>>,
}
