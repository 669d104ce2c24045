//! `ExportUpper`: stop everything, sync, and stream the upper directory's tar to the host as
//! `UpperChunk`s followed by `UpperDone` (or `UpperFailed`). The tar is produced on a plain
//! thread that writes frames straight to the port, so at most one chunk is in memory and the
//! host's pace throttles the walk.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use boxwood_protocol::GuestMessage;
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;

use crate::channel::PortWriter;
use crate::reaper::Reaper;
use crate::splice::Splicer;
use crate::tar::{self, TarSink};

/// Largest `UpperChunk` payload.
pub const CHUNK_BYTES: usize = 1 << 20;
/// How long processes may take to disappear before the export goes ahead anyway.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// `PF_KTHREAD` in `/proc/PID/stat`'s flags field.
const PF_KTHREAD: u64 = 0x0020_0000;

/// What an export needs from Setup.
pub struct Upper {
    pub dir: PathBuf,
    /// Relative paths the agent itself created in the upper layer.
    pub excluded: HashSet<Vec<u8>>,
    /// `st_dev` of the scratch disk's filesystem, when the upper is on it.
    pub disk: Option<u64>,
}

/// Runs one export; everything it has to say goes to the port.
pub async fn run(upper: Option<&Upper>, reaper: &Reaper, port: &PortWriter) {
    let Some(upper) = upper else {
        send(port, GuestMessage::UpperFailed { error: "the VM is not set up".into() });
        return;
    };
    if let Err(left) = wait_for_user_processes(reaper).await {
        crate::log(&format!("export: {left} process(es) survived SIGKILL for {KILL_WAIT:?}; exporting anyway"));
    }
    // Written inline: every process is gone, so nothing else needs the agent meanwhile, and a
    // thread start costs milliseconds under emulation. The export reads through the upper's
    // filesystem (tmpfs or the scratch disk's ext4); a disk-referenced file is written back
    // to the disk before it is mapped, so the host reads what the run wrote.
    let splicer = Splicer::new().map_err(|e| crate::log(&format!("export: no pipe for splicing ({e}); copying"))).ok();
    let mut sink = ChunkSink { port, buf: Vec::with_capacity(CHUNK_BYTES), splicer, copy: Vec::new() };
    let result = tar::write_tree(&upper.dir, &upper.excluded, upper.disk, &mut sink)
        .and_then(|stats| sink.flush().map(|()| stats));
    let reply = match result {
        Ok(stats) => GuestMessage::UpperDone { entries: stats.entries, bytes: stats.bytes },
        Err(e) => GuestMessage::UpperFailed { error: e.to_string() },
    };
    // Every chunk has been written (or failed), so this comes after them.
    send(port, reply);
}

fn send(port: &PortWriter, msg: GuestMessage) {
    if let Err(e) = port.send_blocking(&msg) {
        crate::log(&format!("export: channel write failed: {e}"));
    }
}

/// SIGKILLs every process but PID 1 until none exists. Every user process descends from
/// PID 1 (orphans are reparented to it), so once they are all killed and reaped PID 1 has no
/// children left, which `waitid(P_ALL, WNOWAIT)` reports as ECHILD — far cheaper under
/// emulation than scanning `/proc`. Repeated, so a process forked meanwhile dies too.
async fn wait_for_user_processes(reaper: &Reaper) -> Result<(), usize> {
    let deadline = Instant::now() + KILL_WAIT;
    let peek = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    loop {
        reaper.reap_now();
        if waitid(Id::All, peek) == Err(Errno::ECHILD) {
            return Ok(());
        }
        // -1: every process but PID 1 itself (kernel threads ignore it).
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        reaper.reap_now();
        if waitid(Id::All, peek) == Err(Errno::ECHILD) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(user_processes());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Processes other than PID 1 and kernel threads (for the log line when some survive).
fn user_processes() -> usize {
    let Ok(entries) = fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|&pid| pid != 1)
        .filter(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Fields after the parenthesised name: state ppid pgrp session tty tpgid flags …
            let flags = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(6)?.parse::<u64>().ok());
            flags.is_some_and(|f| f & PF_KTHREAD == 0)
        })
        .count()
}

/// Sends the tar stream as chunks of at most [`CHUNK_BYTES`]: a large file's data is spliced
/// from the file to the port (never copied by the agent), small writes (headers, small
/// files) are collected first.
struct ChunkSink<'a> {
    port: &'a PortWriter,
    buf: Vec<u8>,
    splicer: Option<Splicer>,
    /// The read buffer of data not spliced.
    copy: Vec<u8>,
}

/// Writes at least this long skip the collecting buffer.
const DIRECT_BYTES: usize = 64 << 10;

impl ChunkSink<'_> {
    fn send_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.port.send_upper_chunk(&self.buf)?;
        self.buf.clear();
        Ok(())
    }
}

impl Write for ChunkSink<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.len() >= DIRECT_BYTES {
            // Order is kept: what was collected goes first.
            self.send_buf()?;
            let n = data.len().min(CHUNK_BYTES);
            self.port.send_upper_chunk(&data[..n])?;
            return Ok(n);
        }
        let n = data.len().min(CHUNK_BYTES - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK_BYTES {
            self.send_buf()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buf()
    }
}

impl TarSink for ChunkSink<'_> {
    /// An empty chunk: a frame the host counts as news, holding nothing.
    fn keepalive(&mut self) -> io::Result<()> {
        self.port.send_upper_chunk(&[])
    }

    fn write_file_data(&mut self, file: &mut File, len: u64) -> io::Result<()> {
        match self.splicer.take() {
            Some(mut splicer) if len >= DIRECT_BYTES as u64 => {
                let sent = self.splice_file(file, len, &mut splicer);
                self.splicer = Some(splicer);
                sent
            }
            splicer => {
                self.splicer = splicer;
                // Small data joins the collected chunk: one read, no frame of its own.
                let mut copy = std::mem::take(&mut self.copy);
                copy.resize(DIRECT_BYTES, 0);
                let result = tar::copy_padded(file, len, self, &mut copy);
                self.copy = copy;
                result
            }
        }
    }
}

impl ChunkSink<'_> {
    fn splice_file(&mut self, file: &mut File, len: u64, splicer: &mut Splicer) -> io::Result<()> {
        self.send_buf()?;
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK_BYTES as u64) as usize;
            self.port.send_upper_chunk_from(file, n, splicer)?;
            left -= n as u64;
        }
        Ok(())
    }
}
