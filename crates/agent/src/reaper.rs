//! The one place that collects exit statuses. As PID 1 the agent inherits every orphan, so a
//! single SIGCHLD-driven loop calls `wait4(-1, WNOHANG)` and hands each status to whoever
//! registered that pid; unknown pids (reparented orphans) are simply discarded.
//!
//! Invariant: a pid is registered right after `fork` returns, on the runtime thread, with no
//! `.await` in between, and the reaper also runs on that single thread. So no exit can be
//! collected before its waiter exists, and std's own `waitpid` on a failed exec cannot race us.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use boxwood_protocol::Rusage;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

/// What `wait4` reported for one child.
#[derive(Debug, Clone, Copy)]
pub struct ExitInfo {
    pub code: i32,
    pub signal: i32,
    pub core_dump: bool,
    pub rusage: Rusage,
    pub reaped_at: Instant,
}

/// Pids someone is waiting for.
#[derive(Clone, Default)]
pub struct Reaper {
    waiters: Arc<Mutex<HashMap<i32, oneshot::Sender<ExitInfo>>>>,
}

impl Reaper {
    /// Installs the SIGCHLD handler and starts the reaping task.
    pub fn start() -> io::Result<Self> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Self::default();
        let task = reaper.clone();
        tokio::spawn(async move {
            loop {
                task.reap_now();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    /// Registers interest in `pid`'s exit. Call before the next `.await` after forking it.
    pub fn watch(&self, pid: i32) -> oneshot::Receiver<ExitInfo> {
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner).insert(pid, tx);
        rx
    }

    /// Collects every exit status available right now.
    pub fn reap_now(&self) {
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: both out-pointers refer to live, writable locals of the right types.
            let pid = unsafe { libc::wait4(-1, &mut status, libc::WNOHANG, &mut usage) };
            if pid < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if pid <= 0 {
                return; // 0: children remain but none exited; -1: ECHILD.
            }
            let waiter = self.waiters.lock().unwrap_or_else(PoisonError::into_inner).remove(&pid);
            if let Some(waiter) = waiter {
                let _ = waiter.send(exit_info(status, &usage));
            }
        }
    }
}

fn exit_info(status: libc::c_int, ru: &libc::rusage) -> ExitInfo {
    let (code, signal, core_dump) = if libc::WIFSIGNALED(status) {
        (-1, libc::WTERMSIG(status), libc::WCOREDUMP(status))
    } else {
        (libc::WEXITSTATUS(status), -1, false)
    };
    let n = |v: libc::c_long| u64::try_from(v).unwrap_or(0);
    let us = |tv: libc::timeval| n(tv.tv_sec) * 1_000_000 + n(tv.tv_usec);
    ExitInfo {
        code,
        signal,
        core_dump,
        rusage: Rusage {
            user_time_us: us(ru.ru_utime),
            sys_time_us: us(ru.ru_stime),
            max_rss_kb: n(ru.ru_maxrss),
            shared_memory: n(ru.ru_ixrss),
            unshared_memory: n(ru.ru_idrss),
            swaps: n(ru.ru_nswap),
            minor_faults: n(ru.ru_minflt),
            major_faults: n(ru.ru_majflt),
            voluntary_ctx_switches: n(ru.ru_nvcsw),
            involuntary_ctx_switches: n(ru.ru_nivcsw),
            block_input_ops: n(ru.ru_inblock),
            block_output_ops: n(ru.ru_oublock),
            ipc_msgs_sent: n(ru.ru_msgsnd),
            ipc_msgs_received: n(ru.ru_msgrcv),
            signals_received: n(ru.ru_nsignals),
        },
        reaped_at: Instant::now(),
    }
}
