//! Executes one instance operation: queue → boot a microVM → run the main process → stream
//! its output into the event log → record the result → tear the VM down. Every path ends
//! with a terminal status and a `completion` event, and never leaves QEMU running.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use boxwood_image::{ImageError, LayerStore};
use boxwood_protocol::{Exit, OutputStream, RootfsSpec, Spawn};
use boxwood_store::{ImageRecord, OperationRecord, Store};
use boxwood_vm::{DiskSpec, ProcessEvent, Vm, VmError, VmRuntime, VmSpec};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::clock::{format_ts, now_us};
use crate::error::CoreResult;
use crate::events::EventLog;
use crate::model::{InstanceResult, ResultResources, ResultState, StreamRepr, encode_stream};
use crate::operations::Status;
use crate::spec::ValidSpawn;

/// The spid of a run's main process.
pub const MAIN_SPID: u32 = 1;

/// Extra time past the command's own timeout before the host gives up on a VM.
const HOST_GRACE: Duration = Duration::from_secs(30);

/// Why a run was asked to stop early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum StopReason {
    None = 0,
    Cancelled = 1,
    Shutdown = 2,
}

/// Handle the service keeps for a run it may have to stop.
#[derive(Debug, Default)]
pub(crate) struct RunControl {
    pub(crate) token: CancellationToken,
    reason: AtomicU8,
}

impl RunControl {
    pub(crate) fn stop(&self, reason: StopReason) {
        let _ = self.reason.compare_exchange(0, reason as u8, Ordering::SeqCst, Ordering::SeqCst);
        self.token.cancel();
    }

    fn reason(&self) -> StopReason {
        match self.reason.load(Ordering::SeqCst) {
            1 => StopReason::Cancelled,
            2 => StopReason::Shutdown,
            _ => StopReason::None,
        }
    }
}

/// Shared parts every run uses.
pub(crate) struct RunEnv {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) layers: Arc<dyn LayerStore>,
    pub(crate) runtime: Arc<dyn VmRuntime>,
    pub(crate) slots: Arc<Semaphore>,
}

pub(crate) struct Run {
    pub(crate) op: OperationRecord,
    pub(crate) spec: ValidSpawn,
    pub(crate) image: ImageRecord,
    pub(crate) log: EventLog,
    pub(crate) control: Arc<RunControl>,
}

/// How the main process ended, as far as the host could tell.
enum Outcome {
    Exited(Exit),
    Stopped,
    Failed(String),
}

struct Captured {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Run {
    /// Drives the run to a terminal state. Errors of the store itself are the only ones
    /// returned; everything else becomes the operation's FAILED status.
    pub(crate) async fn execute(mut self, env: &RunEnv) -> CoreResult<()> {
        let permit = tokio::select! {
            p = env.slots.clone().acquire_owned() => p.ok(),
            () = self.control.token.cancelled() => None,
        };
        let Some(_permit) = permit else {
            return self.finish_stopped().await;
        };
        self.transition(Status::Assigned, env).await?;
        self.op.started_at_us = Some(now_us());
        env.store.update_operation(&self.op).await?;

        let disks = match self.disks(env.layers.as_ref()) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(op = %self.op.uuid, error = %e, "image layers unavailable");
                return self.finish(Status::Failed, Some("Container image not found".into()), None).await;
            }
        };
        let vm_spec = VmSpec {
            name: self.op.uuid.to_string(),
            rootfs: RootfsSpec {
                lower_serials: disks.iter().map(|d| d.serial.clone()).collect(),
                upper_size_bytes: self.spec.max_layer_bytes,
            },
            disks,
            hostname: self.spec.hostname.clone(),
            memory_mib: None,
            vcpus: None,
        };
        let started = tokio::select! {
            vm = env.runtime.start(vm_spec) => Some(vm),
            () = self.control.token.cancelled() => None,
        };
        let vm = match started {
            None => return self.finish_stopped().await,
            Some(Err(e)) => {
                let msg = format!("microVM failed to start: {}", chain(&e));
                tracing::warn!(op = %self.op.uuid, error = %msg, "boot failed");
                return self.finish(Status::Failed, Some(msg), None).await;
            }
            Some(Ok(vm)) => vm,
        };
        let outcome = self.run_main(vm.as_ref(), env).await;
        let reason = match &outcome {
            Ok((Outcome::Exited(e), _)) if e.timed_out => "timeout",
            Ok((Outcome::Exited(_), _)) => "job_complete",
            Ok((Outcome::Stopped, _)) => "signal",
            Ok((Outcome::Failed(_), _)) | Err(_) => "spawn_failed",
        };
        let shutdown_data = json!({"stopped_at": format_ts(now_us()), "reason": reason});
        let appended = self.log.append(Some(0), "shutdown", shutdown_data).await;
        if let Err(e) = vm.shutdown().await {
            tracing::warn!(op = %self.op.uuid, error = %chain(&e), "VM shutdown was not clean");
        }
        appended?;
        match outcome? {
            (Outcome::Exited(exit), captured) => {
                let result = instance_result(&exit, &captured);
                self.op.consumed_cpu = Some(result.resources.user_cpu_time + result.resources.system_cpu_time);
                self.op.consumed_memory = Some(exit.rusage.max_rss_kb as i64);
                if !self.spec.disposable {
                    // Saving the run's changes as a new layer arrives with the image tree;
                    // until then a persisted run yields its source image.
                    self.op.result_image_uuid = Some(self.image.uuid);
                    self.op.image_size = Some(0);
                }
                self.finish(Status::Success, None, Some(result)).await
            }
            (Outcome::Stopped, _) => self.finish_stopped().await,
            (Outcome::Failed(msg), _) => self.finish(Status::Failed, Some(msg), None).await,
        }
    }

    fn disks(&self, layers: &dyn LayerStore) -> Result<Vec<DiskSpec>, ImageError> {
        self.image
            .layers
            .iter()
            .enumerate()
            .map(|(i, digest)| Ok(DiskSpec { path: layers.layer_disk(digest)?, serial: format!("layer{i}") }))
            .collect()
    }

    async fn run_main(&mut self, vm: &dyn Vm, env: &RunEnv) -> CoreResult<(Outcome, Captured)> {
        let hello = vm.hello().clone();
        self.log
            .append(
                Some(0),
                "init",
                json!({
                    "started_at": format_ts(self.op.started_at_us.unwrap_or_else(now_us)),
                    "runtime_path": "/run/boxwood",
                    "verbose": false,
                    "init_pid": 1,
                    "hostname": self.spec.hostname,
                    "kernel": hello.kernel_release,
                    "machine": hello.machine,
                    "boot_id": hello.boot_id,
                }),
            )
            .await?;
        self.transition(Status::Executing, env).await?;

        let plan = self.spec.process(&self.image);
        let spawn = Spawn {
            id: MAIN_SPID,
            argv: plan.argv.clone(),
            env: plan.env.clone(),
            cwd: plan.cwd.clone(),
            uid: self.spec.uid,
            gid: self.spec.gid,
            stdin: self.spec.stdin.clone(),
            close_stdin: self.spec.stdin_echo.close,
            timeout_ms: Some(self.spec.timeout_secs * 1000),
            output_limit_bytes: self.spec.truncate_output_at,
        };
        let mut captured = Captured { stdout: Vec::new(), stderr: Vec::new() };
        let mut process = match vm.spawn(spawn).await {
            Ok(p) => p,
            Err(VmError::SpawnFailed { error }) => {
                let msg = format!("spawn failed: {error}");
                let (value, encoding) = encode_stream(format!("{msg}\n").as_bytes());
                self.log
                    .append(Some(0), "stderr", json!({"value": value, "encoding": encoding, "truncated": false}))
                    .await?;
                return Ok((Outcome::Failed(msg), captured));
            }
            Err(e) => return Ok((Outcome::Failed(format!("microVM failed: {}", chain(&e))), captured)),
        };
        let masked: serde_json::Map<String, Value> =
            plan.env.iter().map(|(k, v)| (k.clone(), Value::String(mask_env(k, v)))).collect();
        self.log
            .append(
                Some(i64::from(MAIN_SPID)),
                "spawn",
                json!({
                    "pid": process.pid,
                    "command": plan.argv[0],
                    "args": plan.argv[1..],
                    "shell": self.spec.shell,
                    "cwd": plan.cwd,
                    "uid": self.spec.uid,
                    "gid": self.spec.gid,
                    "timeout": self.spec.timeout_secs,
                    "truncate_at": self.spec.truncate_output_at,
                    "env": masked,
                }),
            )
            .await?;

        let deadline = Instant::now() + Duration::from_secs(self.spec.timeout_secs) + HOST_GRACE;
        loop {
            let event = tokio::select! {
                ev = process.events.recv() => ev,
                () = self.control.token.cancelled() => return Ok((Outcome::Stopped, captured)),
                () = tokio::time::sleep_until(deadline.into()) => {
                    let msg = format!("instance did not finish within {}s of its timeout", HOST_GRACE.as_secs());
                    return Ok((Outcome::Failed(msg), captured));
                }
            };
            match event {
                Some(ProcessEvent::Output { stream, data }) => {
                    let (name, buf) = match stream {
                        OutputStream::Stdout => ("stdout", &mut captured.stdout),
                        OutputStream::Stderr => ("stderr", &mut captured.stderr),
                    };
                    buf.extend_from_slice(&data);
                    let (value, encoding) = encode_stream(&data);
                    self.log
                        .append(
                            Some(i64::from(MAIN_SPID)),
                            name,
                            json!({"value": value, "encoding": encoding, "truncated": false}),
                        )
                        .await?;
                }
                Some(ProcessEvent::Exited(exit)) => {
                    self.log_exit(&exit).await?;
                    return Ok((Outcome::Exited(exit), captured));
                }
                Some(ProcessEvent::Lost(e)) => {
                    return Ok((Outcome::Failed(format!("microVM crashed: {}", chain(&e))), captured));
                }
                None => return Ok((Outcome::Failed("microVM channel closed unexpectedly".into()), captured)),
            }
        }
    }

    async fn log_exit(&mut self, exit: &Exit) -> CoreResult<()> {
        let spid = Some(i64::from(exit.id));
        let r = &exit.rusage;
        self.log
            .append(
                spid,
                "exit",
                json!({
                    "pid": exit.pid,
                    "code": exit.code,
                    "signal": exit.signal,
                    "timed_out": exit.timed_out,
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
                }),
            )
            .await?;
        for (name, t) in [("stdout", exit.stdout), ("stderr", exit.stderr)] {
            if t.dropped > 0 {
                let data = json!({"stream": name, "bytes_emitted": t.emitted, "bytes_dropped": t.dropped});
                self.log.append(spid, "truncated", data).await?;
            }
        }
        Ok(())
    }

    async fn transition(&mut self, next: Status, env: &RunEnv) -> CoreResult<()> {
        let current = Status::parse(&self.op.status);
        debug_assert!(current.is_some_and(|c| c.can_become(next)), "{:?} -> {next:?}", self.op.status);
        self.op.status = next.as_str().into();
        env.store.update_operation(&self.op).await?;
        Ok(())
    }

    async fn finish_stopped(self) -> CoreResult<()> {
        let status = Status::from_stop(self.control.reason());
        let error =
            (status == Status::Failed).then(|| "the server shut down while the operation was active".to_owned());
        self.finish(status, error, None).await
    }

    async fn finish(mut self, status: Status, error: Option<String>, result: Option<InstanceResult>) -> CoreResult<()> {
        let now = now_us();
        self.op.status = status.as_str().into();
        self.op.error = error.clone().or_else(|| match status {
            Status::Cancelled => Some("operation cancelled".into()),
            _ => None,
        });
        self.op.finished_at_us = Some(now);
        if status != Status::Success {
            self.op.result_image_uuid = None;
            self.op.image_size = None;
        }
        self.op.result = result.map(|r| serde_json::to_value(r).unwrap_or(Value::Null));
        let duration_ms = self.op.started_at_us.map_or(0, |s| (now - s).max(0) / 1000);
        let completion = json!({
            "status": status.as_str(),
            "duration_ms": duration_ms,
            "result_image_uuid": self.op.result_image_uuid.map(|u| u.to_string()),
            "error": self.op.error,
            "image_size_bytes": self.op.image_size.unwrap_or(0),
        });
        tracing::info!(op = %self.op.uuid, status = status.as_str(), duration_ms, error = ?self.op.error, "operation finished");
        self.log.complete(&self.op, completion).await
    }
}

impl Status {
    fn from_stop(reason: StopReason) -> Status {
        match reason {
            StopReason::Cancelled => Status::Cancelled,
            StopReason::Shutdown | StopReason::None => Status::Failed,
        }
    }
}

/// The error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

/// Hides values of variables whose names look like secrets (spawn events are readable by
/// anyone with `list`).
fn mask_env(key: &str, value: &str) -> String {
    let k = key.to_ascii_uppercase();
    let secret =
        ["TOKEN", "SECRET", "PASSWORD", "API_KEY", "CREDENTIALS", "AUTHORIZATION"].iter().any(|s| k.ends_with(s));
    if secret { "<MASKED>".into() } else { value.into() }
}

fn instance_result(exit: &Exit, captured: &Captured) -> InstanceResult {
    let r = &exit.rusage;
    let secs = exit.duration_us as f64 / 1e6;
    InstanceResult {
        resources: ResultResources {
            block_input: r.block_input_ops,
            block_output: r.block_output_ops,
            cost: 0.0,
            elapsed_time: secs,
            involuntary_switches: r.involuntary_ctx_switches,
            max_rss: r.max_rss_kb,
            monotonic_time: secs,
            page_faults: r.minor_faults,
            page_faults_io: r.major_faults,
            shared_memory: r.shared_memory,
            signals: r.signals_received,
            swaps: r.swaps,
            system_cpu_time: r.sys_time_us as f64 / 1e6,
            unshared_memory: r.unshared_memory,
            user_cpu_time: r.user_time_us as f64 / 1e6,
            voluntary_switches: r.voluntary_ctx_switches,
        },
        state: ResultState {
            continued: false,
            core_dump: exit.core_dump,
            exit_code: exit.code,
            pid: exit.pid,
            signal: exit.signal,
            stopped: false,
            timed_out: exit.timed_out,
        },
        stdout: StreamRepr::of(&captured.stdout, exit.stdout.dropped > 0),
        stderr: StreamRepr::of(&captured.stderr, exit.stderr.dropped > 0),
    }
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
}
