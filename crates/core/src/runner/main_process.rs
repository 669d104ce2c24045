//! The main process (spid 1): spawn, stream output into the event log, and fold its exit
//! into the `InstanceResult`.

use std::time::{Duration, Instant};

use boxwood_protocol::{Exit, OutputStream, Spawn};
use boxwood_vm::{ProcessEvent, Vm, VmError};
use serde_json::{Value, json};

use super::Run;
use crate::error::{CoreResult, error_chain};
use crate::model::{InstanceResult, ResultResources, ResultState, StreamRepr, encode_stream};

/// The spid of a run's main process.
pub(crate) const MAIN_SPID: u32 = 1;

/// Extra time past the command's own timeout before the host gives up on a VM.
const HOST_GRACE: Duration = Duration::from_secs(30);

/// How the main process ended, as far as the host could tell.
pub(super) enum Outcome {
    Exited(Box<(Exit, InstanceResult)>),
    /// Cancelled or stopped by a server shutdown.
    Stopped,
    SpawnFailed(String),
    /// The host-side deadline passed without an exit from the guest.
    Timeout(String),
    Crashed(String),
}

impl Run {
    pub(super) async fn run_main(&mut self, vm: &dyn Vm) -> CoreResult<Outcome> {
        let plan = self.spec.process(&self.image);
        let spawn = Spawn {
            id: MAIN_SPID,
            argv: plan.argv.clone(),
            env: plan.env.clone(),
            cwd: plan.cwd.clone(),
            uid: self.spec.uid,
            gid: self.spec.gid,
            stdin: self.spec.stdin.clone(),
            // Until stdin can be streamed in (subprocess stdin endpoint), a pipe left open would
            // only make a reading command hang until its timeout.
            close_stdin: true,
            timeout_ms: Some(self.spec.timeout_secs * 1000),
            output_limit_bytes: self.spec.truncate_output_at,
        };
        let deadline = Instant::now() + Duration::from_secs(self.spec.timeout_secs) + HOST_GRACE;
        let host_timeout =
            || Outcome::Timeout(format!("instance did not finish within {}s of its timeout", HOST_GRACE.as_secs()));
        let spawned = tokio::select! {
            r = vm.spawn(spawn) => r,
            () = self.control.token.cancelled() => return Ok(Outcome::Stopped),
            () = tokio::time::sleep_until(deadline.into()) => return Ok(host_timeout()),
        };
        let mut process = match spawned {
            Ok(p) => p,
            Err(VmError::SpawnFailed { error }) => {
                let msg = format!("spawn failed: {error}");
                let (value, encoding) = encode_stream(format!("{msg}\n").as_bytes());
                self.log
                    .append(Some(0), "stderr", json!({"value": value, "encoding": encoding, "truncated": false}))
                    .await?;
                return Ok(Outcome::SpawnFailed(msg));
            }
            Err(e) => return Ok(Outcome::Crashed(format!("microVM failed: {}", error_chain(&e)))),
        };
        let masked: serde_json::Map<String, Value> =
            plan.env.iter().map(|(k, v)| (k.clone(), Value::String(mask_env(k, v)))).collect();
        let spawn_data = json!({
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
        });
        self.log.append(Some(i64::from(MAIN_SPID)), "spawn", spawn_data).await?;

        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        loop {
            let event = tokio::select! {
                ev = process.events.recv() => ev,
                () = self.control.token.cancelled() => return Ok(Outcome::Stopped),
                () = tokio::time::sleep_until(deadline.into()) => return Ok(host_timeout()),
            };
            match event {
                Some(ProcessEvent::Output { stream, data }) => {
                    let (name, buf) = match stream {
                        OutputStream::Stdout => ("stdout", &mut stdout),
                        OutputStream::Stderr => ("stderr", &mut stderr),
                    };
                    buf.extend_from_slice(&data);
                    let (value, encoding) = encode_stream(&data);
                    let data = json!({"value": value, "encoding": encoding, "truncated": false});
                    self.log.append(Some(i64::from(MAIN_SPID)), name, data).await?;
                }
                Some(ProcessEvent::Exited(exit)) => {
                    self.log_exit(&exit).await?;
                    let result = instance_result(&exit, &stdout, &stderr);
                    return Ok(Outcome::Exited(Box::new((exit, result))));
                }
                Some(ProcessEvent::Lost(e)) => {
                    return Ok(Outcome::Crashed(format!("microVM crashed: {}", error_chain(&e))));
                }
                None => return Ok(Outcome::Crashed("microVM channel closed unexpectedly".into())),
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
}

/// Hides values of variables whose names look like secrets (spawn events are readable by
/// anyone with `list`).
fn mask_env(key: &str, value: &str) -> String {
    let k = key.to_ascii_uppercase();
    let secret =
        ["TOKEN", "SECRET", "PASSWORD", "API_KEY", "CREDENTIALS", "AUTHORIZATION"].iter().any(|s| k.ends_with(s));
    if secret { "<MASKED>".into() } else { value.into() }
}

fn instance_result(exit: &Exit, stdout: &[u8], stderr: &[u8]) -> InstanceResult {
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
        stdout: StreamRepr::of(stdout, exit.stdout.dropped > 0),
        stderr: StreamRepr::of(stderr, exit.stderr.dropped > 0),
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
