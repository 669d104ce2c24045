//! Process events and results: the payloads of `spawn`/`stdout`/`exit` events and the fold
//! of a process's events into its `InstanceResult`, shared by the main process, subprocesses
//! and the in-flight views.

use boxwood_protocol::Exit;
use serde_json::{Value, json};

use crate::error::{CoreError, CoreResult};
use crate::model::{EventKind, InstanceResult, ResultResources, ResultState, StreamRepr, decode_stream, encode_stream};
use crate::spec::{ProcessPlan, ProcessSpec};

/// Hides values of variables whose names look like secrets (spawn events are readable by
/// anyone with `list`).
pub(crate) fn mask_env(key: &str, value: &str) -> String {
    let k = key.to_ascii_uppercase();
    let secret =
        ["TOKEN", "SECRET", "PASSWORD", "API_KEY", "CREDENTIALS", "AUTHORIZATION"].iter().any(|s| k.ends_with(s));
    if secret { "<MASKED>".into() } else { value.into() }
}

/// The `spawn` event of a started process.
pub(crate) fn spawn_data(pid: u32, plan: &ProcessPlan, spec: &ProcessSpec, timeout_secs: u64) -> Value {
    let masked: serde_json::Map<String, Value> =
        plan.env.iter().map(|(k, v)| (k.clone(), Value::String(mask_env(k, v)))).collect();
    json!({
        "pid": pid,
        "command": plan.argv[0],
        "args": plan.argv[1..],
        "shell": spec.shell,
        "cwd": plan.cwd,
        "uid": spec.uid,
        "gid": spec.gid,
        "timeout": timeout_secs,
        "truncate_at": spec.truncate_output_at,
        "env": masked,
    })
}

/// A `stdin`/`stdout`/`stderr` event's payload.
pub(crate) fn stream_data(bytes: &[u8]) -> Value {
    let (value, encoding) = encode_stream(bytes);
    json!({"value": value, "encoding": encoding, "truncated": false})
}

/// The `exit` event of a process.
pub(crate) fn exit_data(exit: &Exit) -> Value {
    let r = &exit.rusage;
    json!({
        "pid": exit.pid,
        "code": exit.code,
        "signal": exit.signal,
        "timed_out": exit.timed_out,
        "oom_killed": exit.oom_killed,
        "duration_ms": exit.duration_us / 1000,
        "core_dump": exit.core_dump,
        "resources": {
            "user_time_us": r.user_time_us, "sys_time_us": r.sys_time_us, "max_rss_kb": r.max_rss_kb,
            "shared_memory": r.shared_memory, "unshared_memory": r.unshared_memory, "swaps": r.swaps,
            "minor_faults": r.minor_faults, "major_faults": r.major_faults,
            "voluntary_ctx_switches": r.voluntary_ctx_switches,
            "involuntary_ctx_switches": r.involuntary_ctx_switches,
            "block_input_ops": r.block_input_ops, "block_output_ops": r.block_output_ops,
            "ipc_msgs_sent": r.ipc_msgs_sent, "ipc_msgs_received": r.ipc_msgs_received,
            "signals_received": r.signals_received,
        },
    })
}

/// Folds one process's events into its `InstanceResult`: output capped at the process's
/// `truncate_output_at`, state −1/−1 until its `exit` arrives.
#[derive(Debug, Default)]
pub(crate) struct ResultFold {
    cap: usize,
    spawned: bool,
    pid: u32,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    stdout_cut: bool,
    stderr_cut: bool,
    exit: Option<Value>,
}

impl ResultFold {
    pub(crate) fn new(cap: u64) -> Self {
        Self { cap: usize::try_from(cap).unwrap_or(usize::MAX), ..Self::default() }
    }

    /// Whether a `spawn` event was seen.
    pub(crate) fn spawned(&self) -> bool {
        self.spawned
    }

    pub(crate) fn feed(&mut self, kind: EventKind, data: &Value) {
        let int = |v: &Value, k: &str| v.get(k).and_then(Value::as_i64).unwrap_or(0);
        match kind {
            EventKind::Spawn => {
                self.spawned = true;
                self.pid = u32::try_from(int(data, "pid")).unwrap_or(0);
                if let Some(cap) = data.get("truncate_at").and_then(Value::as_u64) {
                    self.cap = usize::try_from(cap).unwrap_or(usize::MAX);
                }
            }
            EventKind::Stdout | EventKind::Stderr => self.push_output(kind == EventKind::Stdout, &decode_stream(data)),
            EventKind::Truncated => match data.get("stream").and_then(Value::as_str) {
                Some("stdout") => self.stdout_cut = true,
                Some("stderr") => self.stderr_cut = true,
                _ => {}
            },
            EventKind::Exit => self.exit = Some(data.clone()),
            _ => {}
        }
    }

    /// Records the pid of a process started without a stored `spawn` event to fold.
    pub(crate) fn started(&mut self, pid: u32) {
        self.spawned = true;
        self.pid = pid;
    }

    /// Adds output bytes of stdout (`true`) or stderr.
    pub(crate) fn push_output(&mut self, stdout: bool, bytes: &[u8]) {
        let (buf, cut) =
            if stdout { (&mut self.stdout, &mut self.stdout_cut) } else { (&mut self.stderr, &mut self.stderr_cut) };
        let room = self.cap.saturating_sub(buf.len());
        buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
        if bytes.len() > room {
            *cut = true;
        }
    }

    pub(crate) fn result(&self) -> InstanceResult {
        let (resources, state) = match &self.exit {
            Some(exit) => exit_result(exit, self.pid),
            None => (
                ResultResources::default(),
                ResultState {
                    continued: false,
                    core_dump: false,
                    exit_code: -1,
                    pid: self.pid,
                    signal: -1,
                    stopped: false,
                    timed_out: false,
                },
            ),
        };
        InstanceResult {
            resources,
            state,
            stdout: StreamRepr::of(&self.stdout, self.stdout_cut),
            stderr: StreamRepr::of(&self.stderr, self.stderr_cut),
        }
    }
}

/// Resources and state of an `exit` event's payload.
fn exit_result(exit: &Value, pid: u32) -> (ResultResources, ResultState) {
    let r = exit.get("resources").cloned().unwrap_or(Value::Null);
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let secs = n(exit, "duration_ms") as f64 / 1e3;
    let resources = ResultResources {
        block_input: n(&r, "block_input_ops"),
        block_output: n(&r, "block_output_ops"),
        cost: 0.0,
        elapsed_time: secs,
        involuntary_switches: n(&r, "involuntary_ctx_switches"),
        max_rss: n(&r, "max_rss_kb"),
        monotonic_time: secs,
        page_faults: n(&r, "minor_faults"),
        page_faults_io: n(&r, "major_faults"),
        shared_memory: n(&r, "shared_memory"),
        signals: n(&r, "signals_received"),
        swaps: n(&r, "swaps"),
        system_cpu_time: n(&r, "sys_time_us") as f64 / 1e6,
        unshared_memory: n(&r, "unshared_memory"),
        user_cpu_time: n(&r, "user_time_us") as f64 / 1e6,
        voluntary_switches: n(&r, "voluntary_ctx_switches"),
    };
    let i = |k: &str| exit.get(k).and_then(Value::as_i64).and_then(|v| i32::try_from(v).ok()).unwrap_or(-1);
    let b = |k: &str| exit.get(k).and_then(Value::as_bool).unwrap_or(false);
    let state = ResultState {
        continued: false,
        core_dump: b("core_dump"),
        exit_code: i("code"),
        pid: exit.get("pid").and_then(Value::as_u64).and_then(|p| u32::try_from(p).ok()).unwrap_or(pid),
        signal: i("signal"),
        stopped: false,
        timed_out: b("timed_out"),
    };
    (resources, state)
}

/// Signal names (without `SIG`) and numbers on Linux x86-64.
const SIGNALS: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("IOT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("POLL", 29),
    ("PWR", 30),
    ("SYS", 31),
];

/// Parses `?signal=`: a number (1..=64) or a name with or without `SIG`, any case; absent
/// or empty means SIGKILL.
pub fn parse_signal(value: Option<&str>) -> CoreResult<i32> {
    let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else { return Ok(9) };
    if let Ok(n) = v.parse::<i32>() {
        return if (1..=64).contains(&n) { Ok(n) } else { Err(CoreError::bad(format!("signal {n} is out of range"))) };
    }
    let upper = v.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNALS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .ok_or_else(|| CoreError::bad(format!("unknown signal {v:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_secret_looking_variables_only() {
        assert_eq!(mask_env("GITHUB_TOKEN", "x"), "<MASKED>");
        assert_eq!(mask_env("db_password", "x"), "<MASKED>");
        assert_eq!(mask_env("OPENAI_API_KEY", "x"), "<MASKED>");
        assert_eq!(mask_env("PATH", "/bin"), "/bin");
        assert_eq!(mask_env("TOKENIZER", "x"), "x");
    }

    #[test]
    fn signals_by_number_and_name() {
        assert_eq!(parse_signal(None).unwrap(), 9);
        assert_eq!(parse_signal(Some("")).unwrap(), 9);
        assert_eq!(parse_signal(Some("15")).unwrap(), 15);
        assert_eq!(parse_signal(Some("TERM")).unwrap(), 15);
        assert_eq!(parse_signal(Some("sigint")).unwrap(), 2);
        assert_eq!(parse_signal(Some("SIGKILL")).unwrap(), 9);
        for bad in ["0", "65", "-1", "NOPE", "SIG"] {
            assert!(matches!(parse_signal(Some(bad)), Err(CoreError::BadRequest(_))), "{bad}");
        }
    }

    #[test]
    fn fold_reports_running_then_exit() {
        let mut f = ResultFold::new(4);
        f.feed(EventKind::Spawn, &json!({"pid": 7, "truncate_at": 4}));
        f.feed(EventKind::Stdout, &stream_data(b"hello"));
        f.feed(EventKind::Stderr, &stream_data(&[0xff, 0x00]));
        let running = f.result();
        assert_eq!((running.state.exit_code, running.state.signal, running.state.pid), (-1, -1, 7));
        assert_eq!((running.stdout.value.as_str(), running.stdout.truncated), ("hell", true));
        assert_eq!(running.stderr.encoding, "base64");
        f.feed(
            EventKind::Exit,
            &json!({"pid": 7, "code": -1, "signal": 15, "timed_out": false, "duration_ms": 1500,
                               "resources": {"user_time_us": 2_000_000, "max_rss_kb": 900}}),
        );
        let done = f.result();
        assert_eq!((done.state.exit_code, done.state.signal), (-1, 15));
        assert_eq!(
            (done.resources.user_cpu_time, done.resources.max_rss, done.resources.elapsed_time),
            (2.0, 900, 1.5)
        );
    }
}
