//! A running QEMU VM: the QEMU monitor task, the agent channel, routing of guest messages to
//! processes, crash reporting and teardown.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use boxwood_protocol::{
    Exit, FrameDecoder, GuestMessage, Hello, HostMessage, OutputStream, SetupReport, Spawn, encode_frame,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot, watch};

use crate::patience::{self, HostStalls, Waited};
use crate::qemu::VmPaths;
use crate::{ExportBudget, FileSpec, Process, ProcessEvent, UpperStats, Vm, VmError, guest, transfer};

/// Largest stdin payload put in one frame (well under `MAX_FRAME_BYTES`).
const STDIN_FRAME: usize = 1 << 20;
/// Lines of console.log quoted in boot and crash errors.
const CONSOLE_TAIL_LINES: usize = 20;
/// How long the rest of a frame may take once its first bytes arrived. The largest frame the
/// agent sends is ~1 MiB, which crosses virtio-serial in milliseconds; a guest that sends a
/// header and stops would otherwise hold the run until its timeout.
pub(crate) const FRAME_DEADLINE: Duration = Duration::from_secs(5);
/// How long the agent may take to answer a request the host waits on (`Spawn`, the last
/// `PutFile` chunk, each chunk of an export) or to take a frame the host writes, counted in
/// the time the guest could run (`patience`).
pub(crate) const REPLY_DEADLINE: Duration = Duration::from_secs(20);
/// Messages nobody asked for (unknown process ids, replies to nothing) tolerated per VM
/// before the channel counts as hostile; only the first few are logged.
const MAX_UNEXPECTED: u32 = 1000;
const LOGGED_UNEXPECTED: u32 = 5;

/// A QEMU process owned by a monitor task that reaps it.
pub(crate) struct QemuChild {
    pub pid: u32,
    /// Send (or drop) to SIGKILL QEMU.
    kill: Mutex<Option<oneshot::Sender<()>>>,
    /// QEMU's exit status once it has been reaped.
    pub exit: watch::Receiver<Option<String>>,
}

/// How long a reaped QEMU's console may take to reach `console.log`: its exit is reported
/// after that, so an error quoting the console has the guest's last words (a panic's).
const CONSOLE_DRAIN: Duration = Duration::from_secs(2);

impl QemuChild {
    /// `jail`: QEMU's cgroup and uid, released once QEMU has been reaped. `console`: the task
    /// draining QEMU's console, awaited (at most [`CONSOLE_DRAIN`]) before the exit is told.
    pub fn start(
        mut child: tokio::process::Child,
        jail: Option<crate::jail::VmJail>,
        console: Option<tokio::task::JoinHandle<()>>,
    ) -> Result<Self, VmError> {
        let pid = child.id().ok_or_else(|| VmError::Invalid("QEMU exited at once".into()))?;
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                _ = kill_rx => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let text = match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            if let Some(console) = console {
                let _ = tokio::time::timeout(CONSOLE_DRAIN, console).await;
            }
            drop(jail);
            let _ = exit_tx.send(Some(text));
        });
        Ok(Self { pid, kill: Mutex::new(Some(kill_tx)), exit: exit_rx })
    }

    pub fn kill(&self) {
        if let Some(tx) = self.kill.lock().unwrap_or_else(PoisonError::into_inner).take() {
            let _ = tx.send(());
        }
    }

    pub fn exited(&self) -> Option<String> {
        self.exit.borrow().clone()
    }

    /// Waits up to `limit` for QEMU to be reaped; returns its status if it was.
    pub async fn wait(&self, limit: Duration) -> Option<String> {
        wait_exit(&self.exit, limit).await
    }
}

async fn wait_exit(exit: &watch::Receiver<Option<String>>, limit: Duration) -> Option<String> {
    let mut exit = exit.clone();
    let waited = tokio::time::timeout(limit, async {
        let _ = exit.wait_for(Option::is_some).await;
    })
    .await;
    drop(waited);
    exit.borrow().clone()
}

/// The diagnosis attached to boot and crash errors: what happened, QEMU's status and the
/// tail of the guest console (QEMU's own stderr is logged, not returned).
pub(crate) fn describe(paths: &VmPaths, status: Option<&str>, what: &str) -> String {
    let status = status.map_or_else(|| "QEMU still running".to_owned(), |s| format!("QEMU {s}"));
    let console = read_tail(&paths.console_log);
    let mut text = format!("{what}; {status}\n");
    // A panic's first lines scroll out of the tail behind its backtrace: quote them too.
    let key: Vec<&str> = console.lines().filter(|l| KEY_MARKERS.iter().any(|m| l.contains(m))).collect();
    if !key.is_empty() {
        text.push_str("--- console.log (key lines) ---\n");
        text.push_str(&last_lines(&key, 10));
    }
    text.push_str("--- console.log (last lines) ---\n");
    let lines: Vec<&str> = console.lines().collect();
    text.push_str(&last_lines(&lines, CONSOLE_TAIL_LINES));
    // QEMU's own messages name host paths: they go to the server log, not into the error a
    // client reads.
    let qemu = read_tail(&paths.qemu_log);
    if !qemu.trim().is_empty() {
        let tail = last_lines(&qemu.lines().collect::<Vec<_>>(), 5);
        tracing::warn!(dir = %paths.dir.display(), "{what}; QEMU stderr:\n{tail}");
    }
    text
}

/// Console lines worth quoting even when they are not among the last ones.
const KEY_MARKERS: &[&str] = &["Kernel panic", "BUG:", "Oops", "sysrq:", "boxwood-agent:", "general protection"];

use crate::console::read_tail;

fn last_lines(lines: &[&str], n: usize) -> String {
    let mut out = lines[lines.len().saturating_sub(n)..].join("\n");
    out.push('\n');
    out
}

struct Slot {
    /// Until Spawned/SpawnFailed arrives.
    reply: Option<oneshot::Sender<Result<u32, VmError>>>,
    events: mpsc::UnboundedSender<ProcessEvent>,
    stdin_open: bool,
    /// The process's `output_limit_bytes`, enforced here: the agent's own cap is not trusted.
    limit: u64,
    /// Per stream (stdout, stderr): bytes passed on, and bytes dropped past `limit`.
    passed: [u64; 2],
    dropped: [u64; 2],
}

impl Slot {
    /// The part of an output chunk within the stream's limit; counts the rest as dropped.
    fn admit(&mut self, stream: OutputStream, mut data: Vec<u8>) -> Option<Vec<u8>> {
        let i = usize::from(stream == OutputStream::Stderr);
        let room = self.limit.saturating_sub(self.passed[i]);
        let len = data.len() as u64;
        if len > room {
            self.dropped[i] = self.dropped[i].saturating_add(len - room);
            data.truncate(usize::try_from(room).unwrap_or(usize::MAX));
        }
        self.passed[i] += data.len() as u64;
        (!data.is_empty()).then_some(data)
    }

    /// The exit with the host's own byte counts: what was passed on, and what was dropped
    /// here plus what the agent says it dropped.
    fn count(&self, mut exit: Exit) -> Exit {
        for (i, totals) in [&mut exit.stdout, &mut exit.stderr].into_iter().enumerate() {
            totals.dropped = totals.dropped.saturating_add(self.dropped[i]);
            totals.emitted = self.passed[i];
        }
        exit
    }
}

#[derive(Default)]
pub(crate) struct State {
    /// Set once the channel is gone; the crash detail.
    pub dead: Option<String>,
    shutting_down: bool,
    procs: HashMap<u32, Slot>,
    /// The `put_file` waiting for `FilePut`/`FileFailed` of this path.
    pub file_waiter: Option<(String, oneshot::Sender<Result<(), VmError>>)>,
    /// File replies still owed to abandoned `put_file`s; dropped when they arrive.
    pub stale_file_replies: u32,
    /// The `export_upper` receiving `UpperChunk`/`UpperDone`/`UpperFailed`. The router takes
    /// it when it delivers the final message.
    pub upper: Option<mpsc::Sender<GuestMessage>>,
    /// Exports abandoned before their final message; their messages are dropped.
    pub stale_exports: u32,
    /// Messages that answered nothing (see [`MAX_UNEXPECTED`]).
    unexpected: u32,
}

impl State {
    /// Notes a message nobody asked for; past [`MAX_UNEXPECTED`] the channel is hostile.
    fn unexpected(&mut self, what: &str) -> Result<(), String> {
        self.unexpected += 1;
        if self.unexpected <= LOGGED_UNEXPECTED {
            tracing::warn!(what, "unexpected message from the agent");
        }
        if self.unexpected > MAX_UNEXPECTED {
            return Err(format!("the agent sent more than {MAX_UNEXPECTED} unexpected messages"));
        }
        Ok(())
    }
}

/// What the VM handle and the router task share.
pub(crate) struct Shared {
    pub paths: VmPaths,
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    state: Mutex<State>,
    exit: watch::Receiver<Option<String>>,
    /// Serialises `put_file` and `export_upper`: one transfer in flight at a time.
    pub transfers: Arc<tokio::sync::Mutex<()>>,
    /// Most tar bytes an export may deliver (counted here, whatever the agent claims).
    pub export_limit: u64,
    /// Whose run delay tells a loaded host from a silent guest.
    qemu_pid: u32,
    /// Messages decoded from the guest (a busy channel is not a silent guest).
    received: AtomicU64,
}

impl Shared {
    pub fn new(
        paths: VmPaths,
        writer: OwnedWriteHalf,
        exit: watch::Receiver<Option<String>>,
        export_limit: u64,
        qemu_pid: u32,
    ) -> Self {
        Self {
            paths,
            writer: Arc::new(tokio::sync::Mutex::new(writer)),
            state: Mutex::default(),
            exit,
            transfers: Arc::new(tokio::sync::Mutex::new(())),
            export_limit,
            qemu_pid,
            received: AtomicU64::new(0),
        }
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits up to `REPLY_DEADLINE` of the guest's time for the agent (`patience`).
    pub async fn reply<T>(&self, fut: impl Future<Output = T>) -> Result<T, Waited> {
        patience::within(REPLY_DEADLINE, &mut HostStalls::new(self.qemu_pid, &self.received), fut).await
    }

    pub fn check_alive(&self) -> Result<(), VmError> {
        match &self.state().dead {
            Some(detail) => Err(VmError::Crashed { detail: detail.clone() }),
            None => Ok(()),
        }
    }

    /// Writes one frame. The write runs in its own task, so a caller that is dropped midway
    /// (a `select!`, a timeout) never leaves half a frame on the channel: once this is first
    /// polled, the whole frame goes out.
    pub async fn send(&self, msg: &HostMessage) -> Result<(), VmError> {
        self.check_alive()?;
        let frame = encode_frame(msg)?;
        let writer = self.writer.clone();
        let write = tokio::spawn(async move { writer.lock().await.write_all(&frame).await });
        // A guest that stops reading its port fills the socket: give up rather than wait
        // forever (the write task ends when QEMU goes).
        match self.reply(write).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(VmError::Crashed { detail: format!("agent channel write failed: {e}") }),
            Ok(Err(e)) => Err(VmError::Crashed { detail: format!("agent channel write task failed: {e}") }),
            Err(waited) => {
                let why = format!("the agent did not read its channel for {}", waited.describe(REPLY_DEADLINE));
                self.abandon(&why);
                Err(VmError::Crashed { detail: why })
            }
        }
    }

    /// Routes one message; `Err` when the guest misbehaves badly enough to end the channel.
    fn dispatch(&self, msg: GuestMessage) -> Result<(), String> {
        let mut st = self.state();
        let kind = msg.kind();
        match msg {
            GuestMessage::Spawned { id, pid } => match st.procs.get_mut(&id).and_then(|s| s.reply.take()) {
                Some(reply) => {
                    let _ = reply.send(Ok(pid));
                }
                None => st.unexpected(kind)?,
            },
            GuestMessage::SpawnFailed { id, error } => match st.procs.get(&id).map(|s| s.reply.is_some()) {
                Some(true) => {
                    let reply = st.procs.remove(&id).and_then(|s| s.reply);
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(VmError::SpawnFailed { error: guest::text(error) }));
                    }
                }
                _ => st.unexpected(kind)?,
            },
            GuestMessage::Output { id, stream, data } => match st.procs.get_mut(&id) {
                Some(slot) if slot.reply.is_none() => {
                    if let Some(data) = slot.admit(stream, data) {
                        let _ = slot.events.send(ProcessEvent::Output { stream, data });
                    }
                }
                _ => st.unexpected(kind)?,
            },
            GuestMessage::Exited(exit) => match st.procs.get(&exit.id).map(|s| s.reply.is_none()) {
                Some(true) => {
                    if let Some(slot) = st.procs.remove(&exit.id) {
                        let _ = slot.events.send(ProcessEvent::Exited(slot.count(exit)));
                    }
                }
                _ => st.unexpected(kind)?,
            },
            GuestMessage::Rejected { id, .. } => {
                tracing::debug!(id, "agent rejected a request");
                st.unexpected(kind)?;
            }
            GuestMessage::FilePut { path } => Self::file_reply(&mut st, path, Ok(()))?,
            GuestMessage::FileFailed { path, error } => {
                let err = VmError::FileFailed { path: guest::text(path.clone()), error: guest::text(error) };
                Self::file_reply(&mut st, path, Err(err))?;
            }
            _ => st.unexpected(kind)?,
        }
        Ok(())
    }

    fn file_reply(st: &mut State, path: String, result: Result<(), VmError>) -> Result<(), String> {
        // The agent answers in order, so replies owed to abandoned transfers come first.
        if st.stale_file_replies > 0 {
            st.stale_file_replies -= 1;
            return Ok(());
        }
        match st.file_waiter.take() {
            Some((want, tx)) if want == path => {
                let _ = tx.send(result);
                Ok(())
            }
            waiter => {
                st.file_waiter = waiter;
                st.unexpected("file result")
            }
        }
    }

    /// Hands an `Upper*` message to the waiting export, waiting for room: the export's disk
    /// writes pace the channel, so the tar is never held in memory.
    async fn deliver_upper(&self, msg: GuestMessage) {
        let last = !matches!(msg, GuestMessage::UpperChunk { .. });
        let tx = {
            let mut st = self.state();
            if st.stale_exports > 0 {
                if last {
                    st.stale_exports -= 1;
                }
                return;
            }
            if last { st.upper.take() } else { st.upper.clone() }
        };
        match tx {
            Some(tx) => {
                let _ = tx.send(msg).await;
            }
            None => {
                // A bounded count, so a flood cannot keep the router busy forever.
                let _ = self.state().unexpected("export data");
            }
        }
    }

    /// Ends the channel for everyone waiting on it (a guest that stopped answering, or sent
    /// something the host will not accept).
    pub(crate) fn abandon(&self, why: &str) {
        let status = self.exit.borrow().clone();
        let detail = describe(&self.paths, status.as_deref(), why);
        // The console says what the guest was doing (a stall, a hung task, a panic); quoted
        // with escapes, since the guest writes it and must not forge log lines.
        tracing::warn!(dir = %self.paths.dir.display(), "agent channel abandoned: {detail:?}");
        self.fail_all(detail);
    }

    fn fail_all(&self, detail: String) {
        let mut st = self.state();
        let detail = st.dead.get_or_insert(detail).clone();
        if let Some((_, tx)) = st.file_waiter.take() {
            let _ = tx.send(Err(VmError::Crashed { detail: detail.clone() }));
        }
        // Dropping the sender ends the export's stream; it then reports `dead`.
        st.upper = None;
        for (_, slot) in st.procs.drain() {
            let err = VmError::Crashed { detail: detail.clone() };
            match slot.reply {
                Some(reply) => {
                    let _ = reply.send(Err(err));
                }
                None => {
                    let _ = slot.events.send(ProcessEvent::Lost(err));
                }
            }
        }
    }
}

/// Reads guest messages until the channel ends, then fails every live process. A frame
/// must complete within [`FRAME_DEADLINE`] of its first bytes.
pub(crate) async fn route(shared: Arc<Shared>, mut reader: OwnedReadHalf, mut decoder: FrameDecoder) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut partial_since: Option<tokio::time::Instant> = None;
    let reason = 'read: loop {
        loop {
            let next = decoder.next_message::<GuestMessage>();
            if let Ok(Some(_)) = next {
                shared.received.fetch_add(1, Ordering::Relaxed);
            }
            match next {
                Ok(Some(
                    msg @ (GuestMessage::UpperChunk { .. }
                    | GuestMessage::UpperDone { .. }
                    | GuestMessage::UpperFailed { .. }),
                )) => shared.deliver_upper(msg).await,
                Ok(Some(msg)) => {
                    if let Err(why) = shared.dispatch(msg) {
                        break 'read why;
                    }
                }
                Ok(None) => break,
                Err(e) => break 'read format!("protocol error from the agent: {e}"),
            }
            partial_since = None;
        }
        if decoder.pending() == 0 {
            partial_since = None;
        }
        let read = match decoder.pending() {
            0 => Ok(reader.read(&mut buf).await),
            _ => {
                let since = *partial_since.get_or_insert_with(tokio::time::Instant::now);
                tokio::time::timeout_at(since + FRAME_DEADLINE, reader.read(&mut buf)).await
            }
        };
        match read {
            Ok(Ok(0)) => break "agent channel closed".to_owned(),
            Ok(Ok(n)) => decoder.push(&buf[..n]),
            Ok(Err(e)) => break format!("agent channel read failed: {e}"),
            Err(_) => {
                break format!(
                    "protocol error from the agent: a frame stayed incomplete for {} s ({} bytes of it arrived)",
                    FRAME_DEADLINE.as_secs(),
                    decoder.pending()
                );
            }
        }
    };
    let status = wait_exit(&shared.exit, Duration::from_secs(3)).await;
    let detail = if shared.state().shutting_down {
        "the VM was shut down".to_owned()
    } else {
        describe(&shared.paths, status.as_deref(), &reason)
    };
    tracing::debug!(dir = %shared.paths.dir.display(), "agent channel ended: {reason}");
    shared.fail_all(detail);
}

/// [`Vm`] backed by a QEMU process.
pub(crate) struct QemuVm {
    pub name: String,
    pub hello: Hello,
    pub setup_report: SetupReport,
    pub boot_duration: Duration,
    pub qemu: QemuChild,
    pub shared: Arc<Shared>,
    /// `shutdown` SIGKILLs QEMU at once instead of asking the agent to power off: a clone's
    /// disks are read-only and its upper layer a tmpfs, so there is nothing to flush, and a
    /// guest power-off under TCG costs tens of milliseconds.
    pub fast_teardown: bool,
    /// The run's scratch disk, when its writable layer is on one (QEMU has its own fd).
    pub scratch: Option<std::fs::File>,
    /// `shutdown` ran; `Drop` has nothing left to do.
    pub finished: AtomicBool,
}

#[async_trait]
impl Vm for QemuVm {
    fn hello(&self) -> &Hello {
        &self.hello
    }

    fn setup_report(&self) -> &SetupReport {
        &self.setup_report
    }

    fn boot_duration(&self) -> Duration {
        self.boot_duration
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn qemu_pid(&self) -> u32 {
        self.qemu.pid
    }

    fn dir(&self) -> &Path {
        &self.shared.paths.dir
    }

    async fn spawn(&self, mut spawn: Spawn) -> Result<Process, VmError> {
        let id = spawn.id;
        // Large stdin follows the Spawn in `Stdin` frames.
        let mut rest = None;
        if spawn.stdin.len() > STDIN_FRAME {
            rest = Some((spawn.stdin.split_off(STDIN_FRAME), spawn.close_stdin));
            spawn.close_stdin = false;
        }
        let (reply_tx, reply_rx) = oneshot::channel();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        {
            let mut st = self.shared.state();
            if let Some(detail) = &st.dead {
                return Err(VmError::Crashed { detail: detail.clone() });
            }
            if st.procs.contains_key(&id) {
                return Err(VmError::Invalid(format!("process id {id} is already in use")));
            }
            let slot = Slot {
                reply: Some(reply_tx),
                events: events_tx,
                stdin_open: !spawn.close_stdin,
                limit: spawn.output_limit_bytes,
                passed: [0; 2],
                dropped: [0; 2],
            };
            st.procs.insert(id, slot);
        }
        if let Err(e) = self.shared.send(&HostMessage::Spawn(spawn)).await {
            self.shared.state().procs.remove(&id);
            return Err(e);
        }
        let pid = match self.shared.reply(reply_rx).await {
            Ok(reply) => reply.map_err(|_| VmError::Crashed { detail: "agent channel closed".into() })??,
            Err(waited) => {
                let why = format!("the agent did not answer Spawn within {}", waited.describe(REPLY_DEADLINE));
                self.shared.abandon(&why);
                return Err(VmError::Crashed { detail: why });
            }
        };
        if let Some((data, close)) = rest {
            // The process may already be gone; its events say what happened.
            let _ = self.write_stdin(id, data, close).await;
        }
        Ok(Process { pid, events: events_rx })
    }

    async fn write_stdin(&self, id: u32, data: Vec<u8>, close: bool) -> Result<(), VmError> {
        let chunks: Vec<&[u8]> = if data.is_empty() { vec![&[]] } else { data.chunks(STDIN_FRAME).collect() };
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let close = close && i == last;
            {
                let mut st = self.shared.state();
                let slot = st.procs.get_mut(&id).ok_or_else(|| VmError::Rejected(format!("no process {id}")))?;
                if !slot.stdin_open {
                    return Err(VmError::Rejected(format!("stdin of process {id} is closed")));
                }
                if close {
                    slot.stdin_open = false;
                }
            }
            self.shared.send(&HostMessage::Stdin { id, data: chunk.to_vec(), close }).await?;
        }
        Ok(())
    }

    async fn signal(&self, id: u32, signal: i32) -> Result<(), VmError> {
        if !self.shared.state().procs.contains_key(&id) {
            return Err(VmError::Rejected(format!("no process {id}")));
        }
        self.shared.send(&HostMessage::Signal { id, signal }).await
    }

    async fn put_file(&self, file: &FileSpec, source: &Path) -> Result<(), VmError> {
        transfer::put_file(self.shared.clone(), file, source).await
    }

    fn scratch_disk(&self) -> Result<Option<std::fs::File>, VmError> {
        let Some(disk) = &self.scratch else { return Ok(None) };
        disk.try_clone().map(Some).map_err(|e| VmError::io("dup the scratch disk", e))
    }

    async fn export_upper(
        &self,
        out: &mut (dyn AsyncWrite + Send + Unpin),
        budget: &dyn ExportBudget,
    ) -> Result<UpperStats, VmError> {
        transfer::export_upper(&self.shared, out, budget).await
    }

    async fn shutdown(&self) -> Result<(), VmError> {
        if self.finished.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.shared.state().shutting_down = true;
        if self.fast_teardown {
            self.qemu.kill();
        } else if self.qemu.exited().is_none() {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.shared.send(&HostMessage::Shutdown)).await;
        }
        let mut status = self.qemu.wait(Duration::from_secs(5)).await;
        if status.is_none() {
            tracing::warn!(vm = self.name, "agent did not power off; killing QEMU");
            self.qemu.kill();
            status = self.qemu.wait(Duration::from_secs(10)).await;
        }
        let dir = &self.shared.paths.dir;
        let removed = std::fs::remove_dir_all(dir);
        if status.is_none() {
            return Err(VmError::Crashed { detail: format!("QEMU pid {} could not be reaped", self.qemu.pid) });
        }
        tracing::info!(vm = self.name, status, "VM shut down");
        removed.map_err(|e| VmError::io(format!("remove {}", dir.display()), e))
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if *self.finished.get_mut() {
            return;
        }
        self.shared.state().shutting_down = true;
        if self.qemu.exited().is_none() {
            // Not reaped yet, so the pid is still ours. The monitor task reaps it.
            if let Ok(pid) = i32::try_from(self.qemu.pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        self.qemu.kill();
        let _ = std::fs::remove_dir_all(&self.shared.paths.dir);
    }
}

#[cfg(test)]
#[path = "vm_tests.rs"]
mod tests;
