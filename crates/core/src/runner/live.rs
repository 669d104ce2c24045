//! A running instance as other requests see it while its VM is up: starting subprocesses,
//! writing to a process's stdin and signalling it. The run registers its [`Live`] once the VM
//! has booted and closes it when the main process is done, before the VM goes away.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use boxwood_protocol::{OutputStream, Spawn};
use boxwood_store::ImageRecord;
use boxwood_vm::{Process, ProcessEvent, Vm, VmError};
use serde_json::json;
use tokio_util::task::TaskTracker;

use crate::error::{CoreError, CoreResult, error_chain};
use crate::events::EventLog;
use crate::model::EventKind;
use crate::process::{ResultFold, exit_data, spawn_data, stream_data};
use crate::spec::ProcessSpec;

/// The first spid handed to a subprocess (0 is the agent, 1 the main process).
const FIRST_SUBPROCESS_SPID: u32 = 2;
/// How long subprocesses killed at the end of a run get to report their exit.
const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// What the host knows of one process's stdin.
#[derive(Debug)]
struct ProcState {
    stdin_open: bool,
    exited: bool,
    /// Per-stream cap of the logged stdin, and what was logged and dropped of it.
    cap: u64,
    stdin_logged: u64,
    stdin_dropped: u64,
    /// Output (stdout, stderr) logged and dropped past `cap`: the host enforces
    /// `truncate_output_at` on what it stores, whatever the guest sends.
    out_logged: [u64; 2],
    out_dropped: [u64; 2],
}

impl ProcState {
    /// How much of an output chunk of `len` bytes on stream `i` fits under the cap.
    fn admit(&mut self, i: usize, len: usize) -> usize {
        let room = self.cap.saturating_sub(self.out_logged[i]);
        let keep = (len as u64).min(room);
        self.out_logged[i] += keep;
        self.out_dropped[i] = self.out_dropped[i].saturating_add(len as u64 - keep);
        usize::try_from(keep).unwrap_or(len)
    }
}

/// Why a process could not be started.
pub(crate) enum StartError {
    /// The guest could not start it (bad command, cwd, user…): the caller's mistake.
    Spawn(String),
    /// The VM is gone.
    Vm(VmError),
    Core(CoreError),
}

impl From<CoreError> for StartError {
    fn from(e: CoreError) -> Self {
        StartError::Core(e)
    }
}

/// A running instance's processes.
pub(crate) struct Live {
    vm: Arc<dyn Vm>,
    log: EventLog,
    image: ImageRecord,
    timeout_secs: u64,
    next_spid: AtomicU32,
    procs: Mutex<HashMap<u32, ProcState>>,
    pumps: TaskTracker,
    closed: AtomicBool,
}

impl Live {
    pub(crate) fn qemu_pid(&self) -> u32 {
        self.vm.qemu_pid()
    }

    pub(crate) fn new(vm: Arc<dyn Vm>, log: EventLog, image: ImageRecord, timeout_secs: u64) -> Self {
        Self {
            vm,
            log,
            image,
            timeout_secs,
            next_spid: AtomicU32::new(FIRST_SUBPROCESS_SPID),
            procs: Mutex::new(HashMap::new()),
            pumps: TaskTracker::new(),
            closed: AtomicBool::new(false),
        }
    }

    fn procs(&self) -> MutexGuard<'_, HashMap<u32, ProcState>> {
        self.procs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `spid` was handed out (its `spawn` event may still be on its way).
    pub(crate) fn allocated(&self, spid: u32) -> bool {
        spid >= 1 && spid < self.next_spid.load(Ordering::SeqCst)
    }

    /// Starts `spec` as process `spid`: sends Spawn, then logs `spawn` and the initial stdin.
    /// The process is registered before its `spawn` event is visible, so a client reacting
    /// to that event can already write to its stdin.
    pub(crate) async fn start(&self, spid: u32, spec: &ProcessSpec) -> Result<Process, StartError> {
        let plan = spec.plan(&self.image);
        let spawn = Spawn {
            id: spid,
            argv: plan.argv.clone(),
            env: plan.env.clone(),
            cwd: plan.cwd.clone(),
            uid: spec.uid,
            gid: spec.gid,
            stdin: spec.stdin.clone(),
            close_stdin: spec.stdin_echo.close,
            timeout_ms: Some(self.timeout_secs * 1000),
            output_limit_bytes: spec.truncate_output_at,
        };
        let process = match self.vm.spawn(spawn).await {
            Ok(p) => p,
            Err(VmError::SpawnFailed { error }) => return Err(StartError::Spawn(error)),
            Err(e) => return Err(StartError::Vm(e)),
        };
        self.procs().insert(
            spid,
            ProcState {
                stdin_open: !spec.stdin_echo.close,
                exited: false,
                cap: spec.truncate_output_at,
                stdin_logged: 0,
                stdin_dropped: 0,
                out_logged: [0; 2],
                out_dropped: [0; 2],
            },
        );
        let spid_field = Some(i64::from(spid));
        self.log.append(spid_field, EventKind::Spawn, spawn_data(process.pid, &plan, spec, self.timeout_secs)).await?;
        self.log_stdin(spid, &spec.stdin, spec.stdin_echo.close).await?;
        Ok(process)
    }

    /// Starts a subprocess and pumps its events into the log until it exits.
    pub(crate) async fn exec(self: &Arc<Self>, spec: ProcessSpec) -> CoreResult<u32> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(CoreError::Conflict("the instance is finishing".into()));
        }
        let spid = self.next_spid.fetch_add(1, Ordering::SeqCst);
        let mut process = match self.start(spid, &spec).await {
            Ok(p) => p,
            Err(StartError::Spawn(e)) => return Err(CoreError::bad(format!("cannot start the process: {e}"))),
            Err(StartError::Vm(e)) => {
                return Err(CoreError::Gone(format!("the instance's VM is gone: {}", error_chain(&e))));
            }
            Err(StartError::Core(e)) => return Err(e),
        };
        let live = self.clone();
        self.pumps.spawn(async move {
            while let Some(event) = process.events.recv().await {
                let done = matches!(event, ProcessEvent::Exited(_) | ProcessEvent::Lost(_));
                if let Err(e) = live.on_event(spid, event, None).await {
                    tracing::warn!(spid, error = %error_chain(&e), "subprocess event not logged");
                }
                if done {
                    break;
                }
            }
            live.mark_exited(spid);
        });
        Ok(spid)
    }

    /// Logs one event of process `spid`, folding it into `fold` (the main process's result) too.
    pub(crate) async fn on_event(
        &self,
        spid: u32,
        event: ProcessEvent,
        mut fold: Option<&mut ResultFold>,
    ) -> CoreResult<()> {
        let spid_field = Some(i64::from(spid));
        match event {
            ProcessEvent::Output { stream, data } => {
                let (kind, i) = match stream {
                    OutputStream::Stdout => (EventKind::Stdout, 0),
                    OutputStream::Stderr => (EventKind::Stderr, 1),
                };
                let keep = self.procs().get_mut(&spid).map_or(0, |p| p.admit(i, data.len()));
                if keep == 0 {
                    return Ok(());
                }
                let data = &data[..keep];
                if let Some(f) = fold {
                    f.push_output(stream == OutputStream::Stdout, data);
                }
                self.log.append(spid_field, kind, stream_data(data)).await
            }
            ProcessEvent::Exited(mut exit) => {
                if let Some(p) = self.procs().get(&spid) {
                    for (i, t) in [&mut exit.stdout, &mut exit.stderr].into_iter().enumerate() {
                        t.emitted = p.out_logged[i];
                        t.dropped = t.dropped.saturating_add(p.out_dropped[i]);
                    }
                }
                self.mark_exited(spid);
                let data = exit_data(&exit);
                if let Some(f) = fold.as_deref_mut() {
                    f.feed(EventKind::Exit, &data);
                }
                self.log.append(spid_field, EventKind::Exit, data).await?;
                for (name, t) in [("stdout", exit.stdout), ("stderr", exit.stderr)] {
                    if t.dropped > 0 {
                        let data = json!({"stream": name, "bytes_emitted": t.emitted, "bytes_dropped": t.dropped});
                        if let Some(f) = fold.as_deref_mut() {
                            f.feed(EventKind::Truncated, &data);
                        }
                        self.log.append(spid_field, EventKind::Truncated, data).await?;
                    }
                }
                Ok(())
            }
            ProcessEvent::Lost(_) => {
                self.mark_exited(spid);
                Ok(())
            }
        }
    }

    pub(crate) fn mark_exited(&self, spid: u32) {
        if let Some(p) = self.procs().get_mut(&spid) {
            p.exited = true;
            p.stdin_open = false;
        }
    }

    /// Writes to (and maybe closes) the stdin of a live process.
    pub(crate) async fn write_stdin(&self, spid: u32, data: Vec<u8>, close: bool) -> CoreResult<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(CoreError::Gone("the instance has finished".into()));
        }
        {
            let mut procs = self.procs();
            let p = procs.get_mut(&spid).ok_or_else(|| CoreError::NotFound(format!("process {spid}")))?;
            if p.exited {
                return Err(CoreError::Conflict(format!("process {spid} has exited")));
            }
            if !p.stdin_open {
                return Err(CoreError::Conflict(format!("stdin of process {spid} is closed")));
            }
            if close {
                p.stdin_open = false;
            }
        }
        // Logged first, so the event precedes any output the input causes.
        self.log_stdin(spid, &data, close).await?;
        match self.vm.write_stdin(spid, data, close).await {
            Ok(()) => Ok(()),
            // It exited between our check and the write.
            Err(VmError::Rejected(e)) => Err(CoreError::Conflict(e)),
            Err(e) => Err(CoreError::Gone(format!("the instance's VM is gone: {}", error_chain(&e)))),
        }
    }

    /// Logs stdin as `stdin` events, capped per stream; at close, `truncated` if the
    /// cap was crossed.
    async fn log_stdin(&self, spid: u32, data: &[u8], close: bool) -> CoreResult<()> {
        let (keep, truncated) = {
            let mut procs = self.procs();
            let Some(p) = procs.get_mut(&spid) else { return Ok(()) };
            let room = p.cap.saturating_sub(p.stdin_logged);
            let keep = (data.len() as u64).min(room) as usize;
            p.stdin_logged += keep as u64;
            p.stdin_dropped += (data.len() - keep) as u64;
            let truncated = (close && p.stdin_dropped > 0).then_some((p.stdin_logged, p.stdin_dropped));
            (keep, truncated)
        };
        let spid_field = Some(i64::from(spid));
        if keep > 0 {
            self.log.append(spid_field, EventKind::Stdin, stream_data(&data[..keep])).await?;
        }
        if let Some((emitted, dropped)) = truncated {
            let data = json!({"stream": "stdin", "bytes_emitted": emitted, "bytes_dropped": dropped});
            self.log.append(spid_field, EventKind::Truncated, data).await?;
        }
        Ok(())
    }

    /// Signals the process group of a live process.
    pub(crate) async fn signal(&self, spid: u32, signal: i32) -> CoreResult<()> {
        let running = self.procs().get(&spid).is_some_and(|p| !p.exited);
        if !running || self.closed.load(Ordering::SeqCst) {
            return Err(CoreError::NotFound(format!("live process {spid}")));
        }
        match self.vm.signal(spid, signal).await {
            Ok(()) => Ok(()),
            Err(VmError::Rejected(_)) => Err(CoreError::NotFound(format!("live process {spid}"))),
            Err(e) => Err(CoreError::Gone(format!("the instance's VM is gone: {}", error_chain(&e)))),
        }
    }

    /// Ends the instance's live phase: no new subprocess, stdin or signal is accepted, running
    /// subprocesses are killed and get a moment to log their exit.
    pub(crate) async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let running: Vec<u32> =
            self.procs().iter().filter(|(spid, p)| **spid != 1 && !p.exited).map(|(spid, _)| *spid).collect();
        for spid in running {
            let _ = self.vm.signal(spid, 9).await;
        }
        self.pumps.close();
        if tokio::time::timeout(CLOSE_GRACE, self.pumps.wait()).await.is_err() {
            tracing::warn!("subprocesses did not report their exit in time");
        }
    }
}
