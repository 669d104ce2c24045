//! Starting a process in the sandbox root and supervising it: stdin feeding, output
//! forwarding within the limit, the timeout, and the final `Exited` report.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use boxwood_protocol::{Exit, GuestMessage, OUTPUT_CHUNK_BYTES, OutputStream, Spawn, StreamTotals};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, pipe2};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot, watch};

use crate::channel::Outbox;
use crate::jobs::Jobs;
use crate::reaper::{ExitInfo, Reaper};
use crate::setup::ROOT;

/// How long output is still drained after the main process has been reaped.
const DRAIN_GRACE: Duration = Duration::from_millis(100);

/// Failing step in the child, encoded into the errno std carries back from `pre_exec`.
const STEP: i32 = 100_000;
const STEP_NAMES: [&str; 9] =
    ["exec", "setsid", "chroot", "mkdir cwd", "chdir", "setgroups", "setgid", "setuid", "join the jobs cgroup"];

/// A chunk for a process's stdin.
struct StdinChunk {
    data: Vec<u8>,
    close: bool,
}

struct Entry {
    pgid: i32,
    finished: bool,
    stdin: Option<mpsc::UnboundedSender<StdinChunk>>,
}

/// Processes that have been spawned and not yet reported `Exited`, and the cgroup new ones join.
#[derive(Clone)]
pub struct Table {
    inner: Arc<Mutex<HashMap<u32, Entry>>>,
    jobs: Arc<Jobs>,
}

impl Table {
    pub fn new(jobs: Jobs) -> Self {
        Self { inner: Arc::default(), jobs: Arc::new(jobs) }
    }

    fn with<R>(&self, f: impl FnOnce(&mut HashMap<u32, Entry>) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Whether `id` is spawned and has not been reported `Exited` yet.
    pub fn contains(&self, id: u32) -> bool {
        self.with(|procs| procs.contains_key(&id))
    }

    /// Queues stdin bytes for `id`.
    pub fn stdin(&self, id: u32, data: Vec<u8>, close: bool) -> Result<(), String> {
        self.with(|procs| {
            let entry = procs.get_mut(&id).filter(|e| !e.finished).ok_or("no such process")?;
            let tx = entry.stdin.as_ref().ok_or("stdin is closed")?;
            tx.send(StdinChunk { data, close }).map_err(|_| "stdin is closed")?;
            if close {
                entry.stdin = None;
            }
            Ok(())
        })
    }

    /// Signals `id`'s whole process group.
    pub fn signal(&self, id: u32, signal: i32) -> Result<(), String> {
        let pgid = self.with(|procs| procs.get(&id).filter(|e| !e.finished).map(|e| e.pgid));
        let pgid = pgid.ok_or("no such process")?;
        let sig = Signal::try_from(signal).map_err(|e| format!("signal {signal}: {e}"))?;
        kill(Pid::from_raw(-pgid), sig).map_err(|e| format!("kill: {e}"))
    }

    /// SIGKILLs every process group still known.
    pub fn kill_all(&self) {
        for pgid in self.with(|procs| procs.values().map(|e| e.pgid).collect::<Vec<_>>()) {
            let _ = kill(Pid::from_raw(-pgid), Signal::SIGKILL);
        }
    }
}

/// Starts `spec`; on success `Spawned` is queued before any of its output.
/// Must run on the runtime thread with no `.await` between fork and `Reaper::watch`.
pub async fn spawn(spec: Spawn, table: &Table, reaper: &Reaper, out: &Outbox) {
    let id = spec.id;
    if table.with(|procs| procs.contains_key(&id)) {
        let error = format!("process id {id} is already in use");
        let _ = out.send(GuestMessage::SpawnFailed { id, error }).await;
        return;
    }
    let started = Instant::now();
    let oom_kills = oom_kill_count();
    let (child, exit_rx) = match fork_exec(&spec, table.jobs.procs_fd(), reaper) {
        Ok(v) => v,
        Err(error) => {
            let _ = out.send(GuestMessage::SpawnFailed { id, error }).await;
            return;
        }
    };
    let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
    let _ = stdin_tx.send(StdinChunk { data: spec.stdin, close: spec.close_stdin });
    let stdin = (!spec.close_stdin).then_some(stdin_tx);
    table.with(|procs| procs.insert(id, Entry { pgid: child.pid, finished: false, stdin }));
    // Queued before the output tasks exist, so `Spawned` precedes every `Output`.
    let pid = child.pid.cast_unsigned();
    let _ = out.send(GuestMessage::Spawned { id, pid }).await;
    tokio::spawn(feed_stdin(child.stdin, stdin_rx));
    let job = Job {
        id,
        pid: child.pid,
        started,
        oom_kills,
        timeout: spec.timeout_ms.map(Duration::from_millis),
        limit: spec.output_limit_bytes,
    };
    tokio::spawn(supervise(job, child.stdout, child.stderr, exit_rx, table.clone(), out.clone()));
}

/// The kernel's count of OOM kills so far (`oom_kill` in `/proc/vmstat`).
fn oom_kill_count() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/vmstat").ok()?;
    text.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|n| n.trim().parse().ok())
}

struct Child {
    pid: i32,
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

struct Job {
    id: u32,
    pid: i32,
    started: Instant,
    /// The kernel's `oom_kill` count when the process started.
    oom_kills: Option<u64>,
    timeout: Option<Duration>,
    limit: u64,
}

fn fork_exec(
    spec: &Spawn,
    jobs: Option<RawFd>,
    reaper: &Reaper,
) -> Result<(Child, oneshot::Receiver<ExitInfo>), String> {
    let program = spec.argv.first().ok_or("empty argv")?;
    if !spec.cwd.starts_with('/') {
        return Err(format!("cwd {:?} is not absolute", spec.cwd));
    }
    let cstr = |s: &str| CString::new(s).map_err(|_| format!("NUL byte in {s:?}"));
    // Everything the child needs is allocated here: after fork only raw syscalls run.
    let root = cstr(ROOT)?;
    let cwd = cstr(&spec.cwd)?;
    let mut prefixes = Vec::new();
    for (i, _) in spec.cwd.match_indices('/').skip(1) {
        prefixes.push(cstr(&spec.cwd[..i])?);
    }
    prefixes.push(cwd.clone());
    let (uid, gid) = (spec.uid, spec.gid);

    let pipe = || pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"));
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let mut cmd = Command::new(program);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::from(in_r))
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w));
    // SAFETY: the closure runs in the forked child and only makes async-signal-safe syscalls
    // on memory allocated before the fork; it allocates nothing itself.
    unsafe {
        cmd.pre_exec(move || child_setup(jobs, &root, &prefixes, &cwd, uid, gid));
    }
    // std waits here until the child has exec'd: a child blocked before that blocks the agent.
    let watch = crate::stuck::Watch::start();
    let spawned = cmd.spawn();
    drop(watch);
    drop(cmd); // closes the child's ends of the pipes
    match spawned {
        Ok(child) => {
            let pid = i32::try_from(child.id()).map_err(|_| "pid out of range")?;
            let exit_rx = reaper.watch(pid);
            // Dropping std's `Child` does not wait for it; the reaper owns that.
            drop(child);
            Ok((Child { pid, stdin: in_w, stdout: out_r, stderr: err_r }, exit_rx))
        }
        Err(err) => Err(describe_spawn_error(program, &err)),
    }
}

fn describe_spawn_error(program: &str, err: &io::Error) -> String {
    let Some(raw) = err.raw_os_error() else {
        return format!("exec: {program}: {err}");
    };
    let (step, errno) = (raw / STEP, raw % STEP);
    let desc = Errno::from_raw(errno).desc();
    match step {
        0 => format!("exec: {program}: {desc}"),
        s => {
            let name = usize::try_from(s).ok().and_then(|s| STEP_NAMES.get(s)).unwrap_or(&"setup");
            format!("{name}: {desc}")
        }
    }
}

/// Runs in the child between fork and exec. Errors carry their step (see [`STEP`]).
fn child_setup(
    jobs: Option<RawFd>,
    root: &CString,
    prefixes: &[CString],
    cwd: &CString,
    uid: u32,
    gid: u32,
) -> io::Result<()> {
    let fail = |step: i32| {
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL);
        Err(io::Error::from_raw_os_error(step * STEP + errno))
    };
    // SAFETY (all calls below): plain syscalls with NUL-terminated strings that outlive them.
    unsafe {
        // First, so that everything the command forks is counted against the jobs' limits.
        if let Some(fd) = jobs
            && libc::write(fd, c"0".as_ptr().cast(), 1) != 1
        {
            return fail(8);
        }
        if libc::setsid() < 0 {
            return fail(1);
        }
        if libc::chroot(root.as_ptr()) != 0 {
            return fail(2);
        }
        for dir in prefixes {
            if libc::mkdir(dir.as_ptr(), 0o755) != 0 && *libc::__errno_location() != libc::EEXIST {
                return fail(3);
            }
        }
        if libc::chdir(cwd.as_ptr()) != 0 {
            return fail(4);
        }
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return fail(5);
        }
        if libc::setgid(gid) != 0 {
            return fail(6);
        }
        if libc::setuid(uid) != 0 {
            return fail(7);
        }
    }
    Ok(())
}

async fn feed_stdin(fd: OwnedFd, mut rx: mpsc::UnboundedReceiver<StdinChunk>) {
    let mut pipe = pipe::Sender::from_owned_fd(fd).ok();
    while let Some(chunk) = rx.recv().await {
        if let Some(p) = pipe.as_mut()
            && p.write_all(&chunk.data).await.is_err()
        {
            pipe = None; // the reader is gone (EPIPE); later chunks are discarded
        }
        if chunk.close {
            break;
        }
    }
}

async fn supervise(
    job: Job,
    stdout: OwnedFd,
    stderr: OwnedFd,
    mut exit_rx: oneshot::Receiver<ExitInfo>,
    table: Table,
    out: Outbox,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let forward =
        |fd, stream| tokio::spawn(forward_output(job.id, fd, stream, job.limit, stop_rx.clone(), out.clone()));
    let stdout_task = forward(stdout, OutputStream::Stdout);
    let stderr_task = forward(stderr, OutputStream::Stderr);

    let mut timed_out = false;
    let waited = match job.timeout {
        Some(limit) => match tokio::time::timeout(limit, &mut exit_rx).await {
            Ok(result) => result,
            Err(_) => {
                timed_out = true;
                let _ = kill(Pid::from_raw(-job.pid), Signal::SIGKILL);
                exit_rx.await
            }
        },
        None => exit_rx.await,
    };
    table.with(|procs| {
        if let Some(entry) = procs.get_mut(&job.id) {
            entry.finished = true;
            entry.stdin = None;
        }
    });
    // A background child may keep the pipes open forever: drain briefly, then stop.
    let drained = tokio::time::sleep(DRAIN_GRACE);
    tokio::pin!(drained);
    let both = async { (stdout_task.await, stderr_task.await) };
    tokio::pin!(both);
    let (so, se) = tokio::select! {
        r = &mut both => r,
        () = &mut drained => {
            let _ = stop_tx.send(true);
            both.await
        }
    };
    let info = waited.unwrap_or(ExitInfo {
        code: -1,
        signal: -1,
        core_dump: false,
        rusage: Default::default(),
        reaped_at: Instant::now(),
    });
    let exit = Exit {
        id: job.id,
        pid: job.pid.cast_unsigned(),
        code: info.code,
        signal: info.signal,
        core_dump: info.core_dump,
        timed_out,
        oom_killed: info.signal == libc::SIGKILL
            && !timed_out
            && matches!((job.oom_kills, oom_kill_count()), (Some(before), Some(now)) if now > before),
        duration_us: u64::try_from(info.reaped_at.duration_since(job.started).as_micros()).unwrap_or(u64::MAX),
        rusage: info.rusage,
        stdout: so.unwrap_or_default(),
        stderr: se.unwrap_or_default(),
    };
    let _ = out.send(GuestMessage::Exited(exit)).await;
    table.with(|procs| procs.remove(&job.id));
}

async fn forward_output(
    id: u32,
    fd: OwnedFd,
    stream: OutputStream,
    limit: u64,
    mut stop: watch::Receiver<bool>,
    out: Outbox,
) -> StreamTotals {
    let mut totals = StreamTotals::default();
    let Ok(mut pipe) = pipe::Receiver::from_owned_fd(fd) else {
        return totals;
    };
    let mut buf = vec![0u8; OUTPUT_CHUNK_BYTES];
    loop {
        let n = tokio::select! {
            biased;
            _ = stop.changed() => break,
            r = pipe.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
        };
        let room = usize::try_from(limit.saturating_sub(totals.emitted)).unwrap_or(usize::MAX);
        let emit = n.min(room);
        if emit > 0 {
            let data = buf[..emit].to_vec();
            let _ = out.send(GuestMessage::Output { id, stream, data }).await;
        }
        totals.emitted += emit as u64;
        totals.dropped += (n - emit) as u64;
    }
    totals
}
