//! The main process (spid 1): start it, stream its output into the event log, and fold its
//! events into the operation's `InstanceResult`; its end ends the run.

use std::time::{Duration, Instant};

use boxwood_vm::ProcessEvent;

use super::Run;
use super::live::{Live, StartError};
use crate::error::{CoreResult, error_chain};
use crate::model::{EventKind, InstanceResult};
use crate::process::{ResultFold, stream_data};

/// The spid of a run's main process.
pub(crate) const MAIN_SPID: u32 = 1;

/// Extra time past the command's own timeout before the host gives up on a VM.
const HOST_GRACE: Duration = Duration::from_secs(30);

/// How the main process ended, as far as the host could tell.
pub(super) enum Outcome {
    Exited(Box<InstanceResult>),
    /// Killed by the guest kernel's OOM killer.
    OutOfMemory(Box<InstanceResult>),
    /// Cancelled or stopped by a server shutdown.
    Stopped,
    SpawnFailed(String),
    /// The host-side deadline passed without an exit from the guest.
    Timeout(String),
    Crashed(String),
}

impl Run {
    pub(super) async fn run_main(&mut self, live: &Live) -> CoreResult<Outcome> {
        let deadline = Instant::now() + Duration::from_secs(self.spec.timeout_secs) + HOST_GRACE;
        let host_timeout =
            || Outcome::Timeout(format!("instance did not finish within {}s of its timeout", HOST_GRACE.as_secs()));
        let started = tokio::select! {
            r = live.start(MAIN_SPID, &self.spec.process) => r,
            () = self.control.token.cancelled() => return Ok(Outcome::Stopped),
            () = tokio::time::sleep_until(deadline.into()) => return Ok(host_timeout()),
        };
        let mut process = match started {
            Ok(p) => p,
            Err(StartError::Spawn(error)) => {
                let msg = format!("spawn failed: {error}");
                self.log.append(Some(0), EventKind::Stderr, stream_data(format!("{msg}\n").as_bytes())).await?;
                return Ok(Outcome::SpawnFailed(msg));
            }
            Err(StartError::Vm(e)) => return Ok(Outcome::Crashed(format!("microVM failed: {}", error_chain(&e)))),
            Err(StartError::Core(e)) => return Err(e),
        };
        let mut fold = ResultFold::new(self.spec.process.truncate_output_at);
        fold.started(process.pid);
        loop {
            let event = tokio::select! {
                ev = process.events.recv() => ev,
                () = self.control.token.cancelled() => return Ok(Outcome::Stopped),
                () = tokio::time::sleep_until(deadline.into()) => return Ok(host_timeout()),
            };
            match event {
                Some(ev @ ProcessEvent::Output { .. }) => live.on_event(MAIN_SPID, ev, Some(&mut fold)).await?,
                Some(ProcessEvent::Exited(exit)) => {
                    let oom = exit.oom_killed;
                    live.on_event(MAIN_SPID, ProcessEvent::Exited(exit), Some(&mut fold)).await?;
                    let result = Box::new(fold.result());
                    return Ok(if oom { Outcome::OutOfMemory(result) } else { Outcome::Exited(result) });
                }
                Some(ProcessEvent::Lost(e)) => {
                    live.mark_exited(MAIN_SPID);
                    return Ok(Outcome::Crashed(format!("microVM crashed: {}", error_chain(&e))));
                }
                None => return Ok(Outcome::Crashed("microVM channel closed unexpectedly".into())),
            }
        }
    }
}
