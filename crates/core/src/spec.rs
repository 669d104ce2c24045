//! Validation of a spawn request into what a run needs, and the Contree execution rules:
//! shell wrapping, environment merging, working-directory defaults (COMPAT.md §3.1).

use std::collections::BTreeMap;

use base64::Engine as _;
use boxwood_store::ImageRecord;
use serde::Deserialize;
use uuid::Uuid;

use crate::error::{CoreError, CoreResult};
use crate::model::{ExecRequest, InstanceMetadata, LimitsEcho, NetworkingEcho, SpawnRequest, StdinEcho, StdinRequest};

/// `PATH` set when the environment has none (the contract's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
pub const DEFAULT_HOSTNAME: &str = "linuxkit";
pub const MAX_TRUNCATE_OUTPUT_AT: u64 = 10 * 1024 * 1024;
/// Longest single argument or `NAME=value` string `execve` takes (Linux `MAX_ARG_STRLEN`,
/// 32 pages, NUL included).
pub const MAX_ARG_STRLEN: usize = 32 * 4096 - 1;
/// Longest path (Linux `PATH_MAX`, NUL included) and path component (`NAME_MAX`).
pub const MAX_PATH_BYTES: usize = 4095;
pub const MAX_NAME_BYTES: usize = 255;
/// Most entries in a request's `files`.
pub const MAX_FILES: usize = 1024;
/// Guest directories the agent mounts kernel filesystems on: uploads there cannot land.
const UNWRITABLE_ROOTS: [&str; 3] = ["/proc", "/sys", "/dev"];

/// Server-side bounds and defaults of a run.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunLimits {
    /// Used when a request has no `timeout`.
    pub default_timeout_secs: u64,
    /// Larger requested timeouts are clamped to this.
    pub max_timeout_secs: u64,
    pub default_truncate_output_at: u64,
    /// Writable-layer cap when the request gives none, and the largest one accepted.
    pub max_layer_bytes: u64,
    /// Import timeout when the request gives none.
    pub default_import_timeout_secs: u64,
    /// Larger requested import timeouts are clamped to this.
    pub max_import_timeout_secs: u64,
    /// Bytes of stdin/stdout/stderr an operation's event log keeps; later chunks are dropped
    /// after one `size_cap` event.
    pub max_event_log_bytes: u64,
    /// Bytes of a request's command, args and env together, each string counted with its
    /// NUL and a pointer as `execve` counts them (Linux allows 2 MiB with an 8 MiB stack; the
    /// image's env and the shell wrapper need the rest).
    pub max_argv_env_bytes: u64,
    /// Most environment variables a request may set.
    pub max_env_vars: usize,
    /// Largest initial stdin of a request (it is also echoed in the operation's metadata).
    pub max_stdin_bytes: u64,
}

impl Default for RunLimits {
    fn default() -> Self {
        Self {
            default_timeout_secs: 60,
            max_timeout_secs: 3600,
            default_truncate_output_at: 1024 * 1024,
            max_layer_bytes: 12 * 1024 * 1024 * 1024,
            default_import_timeout_secs: 300,
            max_import_timeout_secs: 3600,
            max_event_log_bytes: 100 * 1024 * 1024,
            max_argv_env_bytes: 1024 * 1024,
            max_env_vars: 10_000,
            max_stdin_bytes: 16 * 1024 * 1024,
        }
    }
}

/// How the request names its image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    Uuid(Uuid),
    Tag(String),
}

/// The contract's tag syntax: `^[A-Za-z0-9][A-Za-z0-9_-]*(?:[:/.][A-Za-z0-9_-]+)*$`.
pub fn is_valid_tag(tag: &str) -> bool {
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'-';
    let b = tag.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() {
        return false;
    }
    let mut prev_sep = false;
    for &c in &b[1..] {
        if matches!(c, b':' | b'/' | b'.') {
            if prev_sep {
                return false;
            }
            prev_sep = true;
        } else if word(c) {
            prev_sep = false;
        } else {
            return false;
        }
    }
    !prev_sep
}

/// Parses `ImageSource`: a UUID or `tag:<tag>`.
pub fn parse_image_ref(s: &str) -> CoreResult<ImageRef> {
    if let Some(tag) = s.strip_prefix("tag:") {
        if !is_valid_tag(tag) {
            return Err(CoreError::bad(format!("invalid image tag {:?}", truncate_name(tag))));
        }
        return Ok(ImageRef::Tag(tag.to_owned()));
    }
    Uuid::parse_str(s)
        .map(ImageRef::Uuid)
        .map_err(|_| CoreError::bad(format!("image must be a UUID or \"tag:<tag>\", got {:?}", truncate_name(s))))
}

/// A validated spawn request.
#[derive(Debug, Clone)]
pub struct ValidSpawn {
    pub image: ImageRef,
    /// The main process.
    pub process: ProcessSpec,
    pub hostname: String,
    pub timeout_secs: u64,
    pub disposable: bool,
    pub preserve_env: bool,
    pub preserve_cwd: bool,
    pub max_layer_bytes: u64,
    pub networking: bool,
    /// Uploaded files to place before the command, sorted by path.
    pub files: Vec<FileInjection>,
    files_echo: BTreeMap<String, serde_json::Value>,
}

/// A validated process: the fields a spawn request (main process) and an exec request
/// (subprocess) share. `Debug` redacts env values and stdin.
#[derive(Clone)]
pub struct ProcessSpec {
    pub command: String,
    pub args: Vec<String>,
    pub shell: bool,
    /// The request's env; `None` values unset a variable inherited from the image.
    pub env: BTreeMap<String, Option<String>>,
    pub cwd: String,
    /// Where an empty `cwd` goes on an image without a saved workdir (`/` if empty).
    pub default_cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub stdin: Vec<u8>,
    pub stdin_echo: StdinEcho,
    pub truncate_output_at: u64,
}

/// One entry of the request's `files`: an upload to place at `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInjection {
    /// Absolute and normalized (no `.`, `..` or empty components).
    pub path: String,
    pub uuid: Uuid,
    /// Permission bits only (`& 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Parses a file mode as clients send it: `"0644"`, `"644"`, `"0o644"`, `"0o100755"` (type
/// bits are dropped) or an integer.
pub fn parse_mode(v: &serde_json::Value) -> CoreResult<u32> {
    let bad = || CoreError::bad(format!("invalid file mode {v}: expected an octal string like \"0644\" or an integer"));
    let mode = match v {
        serde_json::Value::Null => return Ok(0o644),
        serde_json::Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(bad)?,
        serde_json::Value::String(s) => {
            let digits = s.strip_prefix("0o").or_else(|| s.strip_prefix("0O")).unwrap_or(s);
            if digits.is_empty() {
                return Err(bad());
            }
            u32::from_str_radix(digits, 8).map_err(|_| bad())?
        }
        _ => return Err(bad()),
    };
    Ok(mode & 0o7777)
}

/// An absolute path inside the image, normalized; `..` is refused rather than resolved.
fn normalize_file_path(path: &str) -> CoreResult<String> {
    let bad = |why: &str| CoreError::bad(format!("invalid file path {path:?}: {why}"));
    if !path.starts_with('/') {
        return Err(bad("must be absolute"));
    }
    if path.contains('\0') {
        return Err(bad("contains NUL"));
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(CoreError::bad(format!("file path is {} bytes, the limit is {MAX_PATH_BYTES}", path.len())));
    }
    let mut parts = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(bad("must not contain `..`")),
            c if c.len() > MAX_NAME_BYTES => return Err(bad("a component is longer than 255 bytes")),
            c => parts.push(c),
        }
    }
    if parts.is_empty() || path.ends_with('/') {
        return Err(bad("must name a file"));
    }
    let normal = format!("/{}", parts.join("/"));
    if let Some(root) = UNWRITABLE_ROOTS.iter().find(|r| normal == **r || normal.starts_with(&format!("{r}/"))) {
        return Err(bad(&format!("{root} holds kernel filesystems in the VM; files cannot be placed there")));
    }
    Ok(normal)
}

fn parse_files(files: BTreeMap<String, serde_json::Value>) -> CoreResult<Vec<FileInjection>> {
    if files.len() > MAX_FILES {
        return Err(CoreError::bad(format!("files has {} entries, the limit is {MAX_FILES}", files.len())));
    }
    let mut out = Vec::with_capacity(files.len());
    for (raw_path, spec) in files {
        let path = normalize_file_path(&raw_path)?;
        let obj = spec.as_object().ok_or_else(|| CoreError::bad(format!("files[{raw_path:?}] must be an object")))?;
        let uuid = obj
            .get("uuid")
            .and_then(serde_json::Value::as_str)
            .and_then(|u| Uuid::parse_str(u).ok())
            .ok_or_else(|| CoreError::bad(format!("files[{raw_path:?}].uuid must be a file UUID")))?;
        let id = |key: &str| -> CoreResult<u32> {
            match obj.get(key) {
                None | Some(serde_json::Value::Null) => Ok(0),
                Some(v) => v
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| CoreError::bad(format!("files[{raw_path:?}].{key} must be a non-negative integer"))),
            }
        };
        let mode = parse_mode(obj.get("mode").unwrap_or(&serde_json::Value::Null))?;
        out.push(FileInjection { path, uuid, mode, uid: id("uid")?, gid: id("gid")? });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    if out.windows(2).any(|w| w[0].path == w[1].path) {
        return Err(CoreError::bad("files name the same path twice"));
    }
    Ok(out)
}

/// The process a run starts, after the image's defaults were applied.
#[derive(Clone, PartialEq, Eq)]
pub struct ProcessPlan {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
}

impl std::fmt::Debug for ProcessPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessPlan")
            .field("argv", &self.argv)
            .field("env", &crate::redact::PairNames(&self.env))
            .field("cwd", &self.cwd)
            .finish()
    }
}

impl std::fmt::Debug for ProcessSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessSpec")
            .field("command", &self.command)
            .field("args", &self.args)
            .field("shell", &self.shell)
            .field("env", &crate::redact::EnvNames(&self.env))
            .field("cwd", &self.cwd)
            .field("default_cwd", &self.default_cwd)
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("stdin_bytes", &self.stdin.len())
            .field("truncate_output_at", &self.truncate_output_at)
            .finish_non_exhaustive()
    }
}

fn id_field(name: &str, v: Option<i64>) -> CoreResult<u32> {
    let v = v.unwrap_or(0);
    u32::try_from(v).map_err(|_| CoreError::bad(format!("{name} must be an integer between 0 and 4294967295, got {v}")))
}

fn is_valid_cwd(cwd: &str) -> bool {
    cwd.is_empty() || (cwd.starts_with('/') && !cwd.contains('\0'))
}

/// A working directory field (`name`): empty, or an absolute path within the path limits.
fn checked_cwd(name: &str, value: Option<String>) -> CoreResult<String> {
    let cwd = value.unwrap_or_default();
    if cwd.len() > MAX_PATH_BYTES {
        return Err(CoreError::bad(format!("{name} is {} bytes, the limit is {MAX_PATH_BYTES}", cwd.len())));
    }
    if !is_valid_cwd(&cwd) {
        return Err(CoreError::bad(format!("{name} must be an absolute path or empty, got {:?}", truncate_name(&cwd))));
    }
    if cwd.split('/').any(|c| c.len() > MAX_NAME_BYTES) {
        return Err(CoreError::bad(format!("{name} has a component longer than {MAX_NAME_BYTES} bytes")));
    }
    Ok(cwd)
}

/// Refuses an argv/env the guest's `execve` would refuse (`E2BIG`), or larger than the
/// server's limits, before the run starts.
fn check_exec_size(
    command: &str,
    args: &[String],
    env: &BTreeMap<String, Option<String>>,
    limits: &RunLimits,
) -> CoreResult<()> {
    if env.len() > limits.max_env_vars {
        return Err(CoreError::bad(format!("env has {} variables, the limit is {}", env.len(), limits.max_env_vars)));
    }
    let long = |what: &str, len: usize| {
        CoreError::bad(format!("{what} is {len} bytes, the limit for one argument or variable is {MAX_ARG_STRLEN}"))
    };
    if command.len() > MAX_ARG_STRLEN {
        return Err(long("command", command.len()));
    }
    if let Some(a) = args.iter().find(|a| a.len() > MAX_ARG_STRLEN) {
        return Err(long("an argument", a.len()));
    }
    // `NAME=value` (a null value only unsets, so counts its name).
    let env_len = |k: &String, v: &Option<String>| k.len() + v.as_ref().map_or(0, |v| 1 + v.len());
    if let Some((k, v)) = env.iter().find(|(k, v)| env_len(k, v) > MAX_ARG_STRLEN) {
        return Err(long(&format!("variable {:?}", truncate_name(k)), env_len(k, v)));
    }
    let ptr = std::mem::size_of::<usize>() as u64;
    let total: u64 = std::iter::once(command.len())
        .chain(args.iter().map(String::len))
        .chain(env.iter().map(|(k, v)| env_len(k, v)))
        .map(|l| l as u64 + 1 + ptr)
        .sum();
    if total > limits.max_argv_env_bytes {
        return Err(CoreError::bad(format!(
            "command, args and env take {total} bytes, the limit is {}",
            limits.max_argv_env_bytes
        )));
    }
    Ok(())
}

/// A variable name short enough to quote in an error.
fn truncate_name(k: &str) -> &str {
    let mut end = k.len().min(64);
    while !k.is_char_boundary(end) {
        end -= 1;
    }
    &k[..end]
}

fn is_valid_hostname(h: &str) -> bool {
    !h.is_empty() && h.len() <= 64 && h.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_'))
}

/// Decodes a `ClosableStreamRepr`: `ascii` values may carry any Unicode text (the SDK labels
/// every str ascii) and are sent as UTF-8; `close` defaults to true.
pub fn decode_stdin(s: Option<StdinRequest>) -> CoreResult<(Vec<u8>, StdinEcho)> {
    let Some(s) = s else {
        return Ok((Vec::new(), StdinEcho { value: String::new(), encoding: "ascii".into(), close: true }));
    };
    let encoding = s.encoding.unwrap_or_else(|| "ascii".into());
    let bytes = match encoding.as_str() {
        "ascii" => s.value.clone().into_bytes(),
        "base64" => base64::engine::general_purpose::STANDARD
            .decode(s.value.as_bytes())
            .map_err(|_| CoreError::bad("stdin.value is not valid base64"))?,
        other => return Err(CoreError::bad(format!("stdin.encoding must be ascii or base64, got {other:?}"))),
    };
    Ok((bytes, StdinEcho { value: s.value, encoding, close: s.close.unwrap_or(true) }))
}

/// Checks the process fields of a spawn or exec request and fills in defaults.
pub fn validate_process(req: ExecRequest, limits: &RunLimits) -> CoreResult<ProcessSpec> {
    let shell = req.shell.unwrap_or(false);
    if !shell && req.command.is_empty() {
        return Err(CoreError::bad("command must not be empty when shell is false"));
    }
    if req.command.contains('\0') {
        return Err(CoreError::bad("command must not contain NUL bytes"));
    }
    let cwd = checked_cwd("cwd", req.cwd)?;
    let default_cwd = checked_cwd("default_cwd", req.default_cwd)?;
    let truncate_output_at = match req.truncate_output_at {
        None => limits.default_truncate_output_at,
        Some(t) if t < 0 || t as u64 > MAX_TRUNCATE_OUTPUT_AT => {
            return Err(CoreError::bad(format!(
                "truncate_output_at must be between 0 and {MAX_TRUNCATE_OUTPUT_AT}, got {t}"
            )));
        }
        Some(t) => t as u64,
    };
    let (stdin, stdin_echo) = decode_stdin(req.stdin)?;
    if stdin.len() as u64 > limits.max_stdin_bytes {
        return Err(CoreError::bad(format!("stdin is {} bytes, the limit is {}", stdin.len(), limits.max_stdin_bytes)));
    }
    let env = req.env.unwrap_or_default();
    for key in env.keys() {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(CoreError::bad(format!("invalid environment variable name {:?}", truncate_name(key))));
        }
    }
    if env.values().flatten().any(|v| v.contains('\0')) {
        return Err(CoreError::bad("environment values must not contain NUL bytes"));
    }
    let args = req.args.unwrap_or_default();
    if args.iter().any(|a| a.contains('\0')) {
        return Err(CoreError::bad("args must not contain NUL bytes"));
    }
    check_exec_size(&req.command, &args, &env, limits)?;
    Ok(ProcessSpec {
        command: req.command,
        args,
        shell,
        env,
        cwd,
        default_cwd,
        uid: id_field("uid", req.uid)?,
        gid: id_field("gid", req.gid)?,
        stdin,
        stdin_echo,
        truncate_output_at,
    })
}

/// Checks every field of a spawn request and fills in defaults.
pub fn validate(req: SpawnRequest, limits: &RunLimits) -> CoreResult<ValidSpawn> {
    let image = parse_image_ref(&req.image)?;
    let hostname = req.hostname.unwrap_or_else(|| DEFAULT_HOSTNAME.into());
    if !is_valid_hostname(&hostname) {
        return Err(CoreError::bad(format!("invalid hostname {:?}: 1-64 of [A-Za-z0-9._-]", truncate_name(&hostname))));
    }
    let timeout_secs = match req.timeout {
        None => limits.default_timeout_secs,
        Some(t) if t <= 0 => {
            return Err(CoreError::bad(format!("timeout must be a positive number of seconds, got {t}")));
        }
        Some(t) => (t as u64).min(limits.max_timeout_secs),
    };
    let max_layer_bytes = match req.resources_limits.as_ref().and_then(|l| l.max_layer_bytes) {
        None => limits.max_layer_bytes,
        Some(b) if b < 1 => {
            return Err(CoreError::bad(format!("resources_limits.max_layer_bytes must be at least 1, got {b}")));
        }
        Some(b) => (b as u64).min(limits.max_layer_bytes),
    };
    let files_echo = req.files.unwrap_or_default();
    let files = parse_files(files_echo.clone())?;
    let process = validate_process(req.process, limits)?;
    Ok(ValidSpawn {
        image,
        process,
        hostname,
        timeout_secs,
        disposable: req.disposable.unwrap_or(false),
        preserve_env: req.preserve_env.unwrap_or(false),
        preserve_cwd: req.preserve_cwd.unwrap_or(false),
        max_layer_bytes,
        networking: req.networking.and_then(|n| n.enabled).unwrap_or(true),
        files,
        files_echo,
    })
}

impl ValidSpawn {
    /// The `metadata` echo, with the image resolved.
    pub fn metadata(&self, image: Uuid) -> InstanceMetadata {
        let p = &self.process;
        InstanceMetadata {
            command: p.command.clone(),
            image: image.to_string(),
            args: p.args.clone(),
            shell: p.shell,
            env: p.env.iter().filter_map(|(k, v)| Some((k.clone(), v.clone()?))).collect(),
            cwd: p.cwd.clone(),
            uid: p.uid,
            gid: p.gid,
            hostname: self.hostname.clone(),
            stdin: p.stdin_echo.clone(),
            timeout: self.timeout_secs,
            truncate_output_at: p.truncate_output_at,
            disposable: self.disposable,
            preserve_env: self.preserve_env,
            preserve_cwd: self.preserve_cwd,
            resources_limits: LimitsEcho { max_layer_bytes: self.max_layer_bytes },
            networking: NetworkingEcho { enabled: self.networking },
            files: self.files_echo.clone(),
            result: None,
        }
    }
}

impl ProcessSpec {
    /// Applies the image's env and workdir. With `shell`, the image env is inherited and the
    /// request wins (a null value removes a variable); without, only the request env counts.
    /// `PATH` defaults to [`DEFAULT_PATH`]. With `shell`, `args` become the script's `$0…`
    /// (the contract forbids them there, but contree-cli `-I` sends some).
    pub fn plan(&self, image: &ImageRecord) -> ProcessPlan {
        let mut env: BTreeMap<String, String> = if self.shell { image.env.clone() } else { BTreeMap::new() };
        for (k, v) in &self.env {
            match v {
                Some(v) => env.insert(k.clone(), v.clone()),
                None => env.remove(k),
            };
        }
        env.entry("PATH".into()).or_insert_with(|| DEFAULT_PATH.into());
        let argv = if self.shell {
            let sh = env.get("SHELL").filter(|s| !s.is_empty()).cloned().unwrap_or_else(|| "/bin/sh".into());
            [sh, "-c".into(), self.command.clone()].into_iter().chain(self.args.iter().cloned()).collect()
        } else {
            std::iter::once(self.command.clone()).chain(self.args.iter().cloned()).collect()
        };
        let cwd = if self.cwd.is_empty() {
            let fallback = if self.default_cwd.is_empty() { "/" } else { &self.default_cwd };
            image.workdir.clone().filter(|w| !w.is_empty()).unwrap_or_else(|| fallback.into())
        } else {
            self.cwd.clone()
        };
        ProcessPlan { argv, env: env.into_iter().collect(), cwd }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: serde_json::Value) -> SpawnRequest {
        serde_json::from_value(json).unwrap()
    }

    fn image() -> ImageRecord {
        ImageRecord {
            uuid: Uuid::nil(),
            namespace: "public".into(),
            parent_uuid: None,
            operation_uuid: None,
            layers: vec![],
            env: BTreeMap::from([("PATH".into(), "/bin".into()), ("LANG".into(), "C".into())]),
            workdir: Some("/srv".into()),
            size_bytes: 0,
            created_at_us: 0,
        }
    }

    #[test]
    fn tag_syntax() {
        for ok in ["busybox", "busybox:latest", "a/b.c:1-2_x", "0"] {
            assert!(is_valid_tag(ok), "{ok}");
        }
        for bad in ["", ":x", "a::b", "a:", "-a", "a b", "a/", "a!b"] {
            assert!(!is_valid_tag(bad), "{bad}");
        }
        assert_eq!(parse_image_ref("tag:busybox:latest").unwrap(), ImageRef::Tag("busybox:latest".into()));
        assert!(parse_image_ref("busybox").is_err());
        assert!(parse_image_ref("tag:bad tag").is_err());
    }

    #[test]
    fn defaults_are_filled_and_bounds_enforced() {
        let l = RunLimits::default();
        let v = validate(req(serde_json::json!({"command": "true", "image": "tag:busybox"})), &l).unwrap();
        assert_eq!(
            (v.timeout_secs, v.process.truncate_output_at, v.hostname.as_str(), v.disposable),
            (60, 1 << 20, "linuxkit", false)
        );
        let big =
            validate(req(serde_json::json!({"command": "true", "image": "tag:b", "timeout": 999999})), &l).unwrap();
        assert_eq!(big.timeout_secs, 3600, "timeouts are clamped");
        for bad in [
            serde_json::json!({"command": "x", "image": "tag:b", "timeout": -1}),
            serde_json::json!({"command": "x", "image": "tag:b", "cwd": "rel/dir"}),
            serde_json::json!({"command": "x", "image": "tag:b", "uid": -1}),
            serde_json::json!({"command": "x", "image": "tag:b", "truncate_output_at": 10485761}),
            serde_json::json!({"command": "x", "image": "tag:b", "stdin": {"value": "!!", "encoding": "base64"}}),
            serde_json::json!({"command": "x", "image": "tag:b", "hostname": "bad host"}),
            serde_json::json!({"command": "", "image": "tag:b"}),
        ] {
            assert!(matches!(validate(req(bad.clone()), &l), Err(CoreError::BadRequest(_))), "{bad}");
        }
    }

    #[test]
    fn shell_inherits_image_env_and_request_wins() {
        let l = RunLimits::default();
        let v = validate(
            req(serde_json::json!({"command": "echo $A", "image": "tag:b", "shell": true,
                "env": {"A": "1", "LANG": null, "SHELL": "/bin/ash"}, "args": ["zero", "one"]})),
            &l,
        )
        .unwrap();
        let p = v.process.plan(&image());
        assert_eq!(p.argv, vec!["/bin/ash", "-c", "echo $A", "zero", "one"], "args become $0, $1 (contree-cli -I)");
        assert_eq!(
            p.env,
            vec![("A".into(), "1".into()), ("PATH".into(), "/bin".into()), ("SHELL".into(), "/bin/ash".into())]
        );
        assert_eq!(p.cwd, "/srv", "empty cwd takes the image workdir");
        assert_eq!(v.metadata(Uuid::nil()).env.len(), 2, "null values are not echoed");
    }

    #[test]
    fn an_empty_cwd_takes_the_image_workdir_then_default_cwd_then_the_root() {
        let l = RunLimits::default();
        let plan = |body: serde_json::Value, workdir: Option<&str>| {
            let image = ImageRecord { workdir: workdir.map(str::to_owned), ..image() };
            validate(req(body), &l).unwrap().process.plan(&image).cwd
        };
        let asked = serde_json::json!({"command": "pwd", "image": "tag:b", "default_cwd": "/root"});
        assert_eq!(plan(asked.clone(), Some("/srv")), "/srv", "the image's own workdir first");
        assert_eq!(plan(asked.clone(), None), "/root");
        assert_eq!(plan(asked, Some("")), "/root");
        assert_eq!(plan(serde_json::json!({"command": "pwd", "image": "tag:b"}), None), "/", "Contree's default");
        let both = serde_json::json!({"command": "pwd", "image": "tag:b", "cwd": "/w", "default_cwd": "/root"});
        assert_eq!(plan(both, Some("/srv")), "/w", "an explicit cwd wins");
        for bad in ["root", "/a\u{0}b"] {
            let body = serde_json::json!({"command": "x", "image": "tag:b", "default_cwd": bad});
            let err = validate(req(body), &l).unwrap_err().to_string();
            assert!(err.contains("default_cwd"), "{err}");
        }
    }

    #[test]
    fn file_modes_and_paths() {
        use serde_json::json;
        for (v, want) in [
            (json!("0644"), 0o644),
            (json!("0o644"), 0o644),
            (json!("0o100755"), 0o755),
            (json!("4755"), 0o4755),
            (json!(420), 0o644),
            (json!(null), 0o644),
        ] {
            assert_eq!(parse_mode(&v).unwrap(), want, "{v}");
        }
        for v in [json!("0o"), json!("9"), json!(-1), json!([1]), json!("rw-r--r--")] {
            assert!(parse_mode(&v).is_err(), "{v}");
        }
        assert_eq!(normalize_file_path("//opt/./in//a.txt").unwrap(), "/opt/in/a.txt");
        for p in ["rel", "/", "/a/../b", "/dir/", "/a\0b"] {
            assert!(normalize_file_path(p).is_err(), "{p}");
        }
        let u = Uuid::new_v4().to_string();
        let v = validate(
            req(json!({"command": "true", "image": "tag:b",
                "files": {"/b": {"uuid": u, "mode": "0o100755", "uid": 5}, "/a": {"uuid": u}}})),
            &RunLimits::default(),
        )
        .unwrap();
        assert_eq!(
            v.files.iter().map(|f| (f.path.as_str(), f.mode, f.uid)).collect::<Vec<_>>(),
            vec![("/a", 0o644, 0), ("/b", 0o755, 5)]
        );
        assert_eq!(v.metadata(Uuid::nil()).files.len(), 2, "files are echoed");
        for bad in [
            json!({"/a": {"mode": "0644"}}),
            json!({"/a": "uuid"}),
            json!({"/a": {"uuid": u, "uid": -1}}),
            json!({"/a": {"uuid": u}, "//a": {"uuid": u}}),
        ] {
            let r = validate(req(json!({"command": "true", "image": "tag:b", "files": bad})), &RunLimits::default());
            assert!(matches!(r, Err(CoreError::BadRequest(_))), "{bad}");
        }
    }

    fn bad_request(r: serde_json::Value) -> String {
        match validate(req(r), &RunLimits::default()) {
            Err(CoreError::BadRequest(msg)) => msg,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn debug_output_carries_no_env_values_or_secrets() {
        let r = req(serde_json::json!({"command": "env", "image": "tag:b", "env": {"API": "hunter2-value"},
                                       "stdin": {"value": "stdin-secret"}}));
        // The control: the value is really in the request.
        assert_eq!(r.process.env.as_ref().unwrap()["API"].as_deref(), Some("hunter2-value"));
        let spec = validate(r.clone(), &RunLimits::default()).unwrap();
        let plan = spec.process.plan(&image());
        for text in [format!("{r:?}"), format!("{spec:?}"), format!("{plan:?}")] {
            assert!(text.contains("API"), "{text}");
            assert!(!text.contains("hunter2") && !text.contains("stdin-secret"), "{text}");
        }
        let token = crate::auth::TokenConfig {
            token: Some("tok-secret".into()),
            sha256: None,
            namespace: "n".into(),
            permissions: Default::default(),
        };
        assert!(!format!("{token:?}").contains("tok-secret"));
        let creds = crate::model::RegistryCredentials { username: "u".into(), password: "pw-secret".into() };
        assert!(!format!("{creds:?}").contains("pw-secret"));
    }

    #[test]
    fn sizes_execve_would_refuse_are_400s_up_front() {
        let base = |extra: serde_json::Value| {
            let mut r = serde_json::json!({"command": "true", "image": "tag:busybox"});
            r.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            r
        };
        // The controls: generous but real-world requests pass.
        let fine = [
            base(serde_json::json!({"command": "x".repeat(100_000)})),
            base(serde_json::json!({"cwd": format!("/{}", "d/".repeat(2000))})),
            base(
                serde_json::json!({"env": (0..2000).map(|i| (format!("V{i}"), "v".repeat(100))).collect::<BTreeMap<_, _>>()}),
            ),
            base(serde_json::json!({"args": vec!["a".repeat(1000); 500]})),
            base(serde_json::json!({"stdin": {"value": "s".repeat(1 << 20)}})),
            base(serde_json::json!({"files": {"/etc/x": {"uuid": Uuid::nil()}, "/devices/y": {"uuid": Uuid::nil()}}})),
        ];
        for r in fine {
            validate(req(r), &RunLimits::default()).unwrap();
        }
        let msg = bad_request(base(serde_json::json!({"command": "x".repeat(20 << 20)})));
        assert!(msg.starts_with("command is 20971520 bytes"), "{msg}");
        assert!(msg.len() < 200, "the error does not quote the input");
        let msg = bad_request(base(serde_json::json!({"cwd": format!("/{}", "c".repeat(5000))})));
        assert!(msg.contains("cwd is 5001 bytes"), "{msg}");
        let msg = bad_request(base(serde_json::json!({"cwd": format!("/{}", "c".repeat(300))})));
        assert!(msg.contains("component"), "{msg}");
        let many: BTreeMap<String, String> = (0..200_000).map(|i| (format!("V{i}"), "1".into())).collect();
        let msg = bad_request(base(serde_json::json!({"env": many})));
        assert!(msg.contains("env has 200000 variables"), "{msg}");
        let big: BTreeMap<String, String> = (0..100).map(|i| (format!("V{i}"), "v".repeat(100_000))).collect();
        let msg = bad_request(base(serde_json::json!({"env": big})));
        assert!(msg.contains("command, args and env take"), "{msg}");
        let msg = bad_request(base(serde_json::json!({"env": {"HUGE": "v".repeat(200_000)}})));
        assert!(msg.contains("variable \"HUGE\""), "{msg}");
        let msg = bad_request(base(serde_json::json!({"args": ["a".repeat(200_000)]})));
        assert!(msg.contains("an argument is 200000 bytes"), "{msg}");
        let msg = bad_request(base(serde_json::json!({"stdin": {"value": "s".repeat(17 << 20)}})));
        assert!(msg.contains("stdin is"), "{msg}");
        let msg = bad_request(base(serde_json::json!({"hostname": "h".repeat(5000)})));
        assert!(msg.len() < 200, "{msg}");
        for target in ["/proc/sys/kernel/hostname", "/sys/x", "/dev/null", "/dev", "//proc/./self"] {
            let msg = bad_request(base(serde_json::json!({"files": {target: {"uuid": Uuid::nil()}}})));
            assert!(msg.contains("kernel filesystems"), "{target}: {msg}");
        }
        let long = format!("/{}", "p/".repeat(2100));
        let msg = bad_request(base(serde_json::json!({"files": {long: {"uuid": Uuid::nil()}}})));
        assert!(msg.contains("the limit is 4095"), "{msg}");
        let files: BTreeMap<String, serde_json::Value> =
            (0..=MAX_FILES).map(|i| (format!("/f{i}"), serde_json::json!({"uuid": Uuid::nil()}))).collect();
        let msg = bad_request(base(serde_json::json!({"files": files})));
        assert!(msg.contains("entries"), "{msg}");
    }

    #[test]
    fn exec_form_uses_only_request_env_and_args() {
        let v = validate(
            req(serde_json::json!({"command": "echo", "image": "tag:b", "args": ["a", "b"], "cwd": "/w",
                "stdin": {"value": "aGk=", "encoding": "base64"}})),
            &RunLimits::default(),
        )
        .unwrap();
        let p = v.process.plan(&image());
        assert_eq!(p.argv, vec!["echo", "a", "b"]);
        assert_eq!(p.env, vec![("PATH".into(), DEFAULT_PATH.into())]);
        assert_eq!(p.cwd, "/w");
        assert_eq!(v.process.stdin, b"hi");
    }
}
