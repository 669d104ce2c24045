//! File transfers over the agent channel: [`put_file`] streams a host file into the guest's
//! root as `PutFile` chunks, [`export_upper`] streams the upper directory's tar to a host
//! writer. One transfer runs at a time per VM; an abandoned one (its future dropped) is
//! remembered so its late replies are not mistaken for the next one's, and an abandoned
//! upload is ended with a chunk the agent rejects, so it removes the partial file.

use std::path::Path;
use std::sync::Arc;

use boxwood_protocol::{GuestMessage, HostMessage, PutFile};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedMutexGuard, mpsc, oneshot};

use crate::vm::{REPLY_DEADLINE, Shared};
use crate::{ExportBudget, FileSpec, UpperStats, VmError};

/// Largest `PutFile` payload.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Export chunks buffered between the channel reader and the file writer.
const EXPORT_QUEUE: usize = 4;
/// Longest guest path accepted (the kernel's PATH_MAX).
const MAX_PATH: usize = 4096;

fn crashed(shared: &Shared) -> VmError {
    let detail = shared.state().dead.clone().unwrap_or_else(|| "agent channel closed".into());
    VmError::Crashed { detail }
}

/// Chunk offset the agent never expects: it fails the transfer and removes the file.
const ABORT_OFFSET: u64 = u64::MAX;

/// See [`crate::Vm::put_file`].
pub async fn put_file(shared: Arc<Shared>, file: &FileSpec, source: &Path) -> Result<(), VmError> {
    let path = &file.path;
    if !path.starts_with('/') || path.contains('\0') || path.len() > MAX_PATH {
        return Err(VmError::Invalid(format!("guest path {path:?} must be absolute, without NUL, ≤ {MAX_PATH} bytes")));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(VmError::Invalid(format!("guest path {path:?} contains `..`")));
    }
    let one_at_a_time = shared.transfers.clone().lock_owned().await;
    let mut src =
        tokio::fs::File::open(source).await.map_err(|e| VmError::io(format!("open {}", source.display()), e))?;
    let (tx, rx) = oneshot::channel();
    {
        let mut st = shared.state();
        if let Some(detail) = &st.dead {
            return Err(VmError::Crashed { detail: detail.clone() });
        }
        st.file_waiter = Some((path.clone(), tx));
    }
    let mut guard = FileGuard {
        shared: shared.clone(),
        permit: Some(one_at_a_time),
        path: path.clone(),
        started: false,
        last_sent: false,
    };
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut offset = 0u64;
    let mut read_error = None;
    loop {
        let (n, failed) = match read_full(&mut src, &mut buf).await {
            Ok(n) => (n, false),
            Err(e) => {
                read_error = Some(VmError::io(format!("read {}", source.display()), e));
                (0, true)
            }
        };
        let last = n < CHUNK_BYTES;
        // A read error still ends the transfer, with an offset the agent rejects, so it
        // removes the partial file and answers.
        let chunk = PutFile {
            path: path.clone(),
            mode: file.mode & 0o7777,
            uid: file.uid,
            gid: file.gid,
            offset: if failed { ABORT_OFFSET } else { offset },
            data: buf[..n].to_vec(),
            last,
        };
        // Set before the send: once it is polled, the frame goes out even if we are dropped.
        guard.started = true;
        guard.last_sent = last;
        shared.send(&HostMessage::PutFile(chunk)).await?;
        offset += n as u64;
        if last {
            break;
        }
    }
    let reply = match shared.reply(rx).await {
        Ok(reply) => reply.map_err(|_| crashed(&shared))?,
        Err(waited) => {
            let why = format!("the agent did not confirm {path} within {}", waited.describe(REPLY_DEADLINE));
            shared.abandon(&why);
            return Err(VmError::Crashed { detail: why });
        }
    };
    drop(guard);
    match read_error {
        Some(e) => Err(e),
        None => reply,
    }
}

/// Fills `buf` unless the file ends first; returns the bytes read.
async fn read_full(src: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]).await? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Clears the file waiter when `put_file` ends. If it ends unanswered (its future was
/// dropped), the reply is marked stale, and an upload cut short is ended with an abort chunk
/// (sent while still holding the transfer lock, so it cannot mix with the next upload).
struct FileGuard {
    shared: Arc<Shared>,
    permit: Option<OwnedMutexGuard<()>>,
    path: String,
    /// A chunk went out.
    started: bool,
    /// The chunk that went out last was the final one.
    last_sent: bool,
}

impl Drop for FileGuard {
    fn drop(&mut self) {
        let mut st = self.shared.state();
        if st.file_waiter.take().is_none() || !self.started {
            return; // answered, never started, or the VM is gone
        }
        if self.last_sent {
            st.stale_file_replies += 1;
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        st.stale_file_replies += 1;
        drop(st);
        let (shared, permit) = (self.shared.clone(), self.permit.take());
        let abort = PutFile {
            path: std::mem::take(&mut self.path),
            mode: 0,
            uid: 0,
            gid: 0,
            offset: ABORT_OFFSET,
            data: Vec::new(),
            last: true,
        };
        runtime.spawn(async move {
            let _permit = permit;
            let _ = shared.send(&HostMessage::PutFile(abort)).await;
        });
    }
}

/// See [`crate::Vm::export_upper`].
pub async fn export_upper(
    shared: &Shared,
    out: &mut (dyn AsyncWrite + Send + Unpin),
    budget: &dyn ExportBudget,
) -> Result<UpperStats, VmError> {
    let _one_at_a_time = shared.transfers.lock().await;
    let (tx, mut rx) = mpsc::channel(EXPORT_QUEUE);
    {
        let mut st = shared.state();
        if let Some(detail) = &st.dead {
            return Err(VmError::Crashed { detail: detail.clone() });
        }
        st.upper = Some(tx);
    }
    let _guard = UpperGuard { shared };
    shared.send(&HostMessage::ExportUpper).await?;
    let write_err = |e| VmError::io("write the exported changes", e);
    let mut written = 0u64;
    loop {
        let msg = match shared.reply(rx.recv()).await {
            Ok(msg) => msg,
            Err(waited) => {
                let why =
                    format!("the agent stopped sending the run's changes for {}", waited.describe(REPLY_DEADLINE));
                shared.abandon(&why);
                return Err(VmError::Crashed { detail: why });
            }
        };
        match msg {
            Some(GuestMessage::UpperChunk { data }) => {
                written = written.saturating_add(data.len() as u64);
                if written > shared.export_limit {
                    let error = format!("the run's changes exceed {} bytes", shared.export_limit);
                    shared.abandon(&error);
                    return Err(VmError::ExportFailed { error });
                }
                // Counted before it is written: the host never stores past the budget.
                budget.admit(written).map_err(|reason| VmError::ExportRefused { reason })?;
                out.write_all(&data).await.map_err(write_err)?;
            }
            Some(GuestMessage::UpperDone { entries, bytes }) => {
                if bytes != written {
                    let error = format!("agent reported {bytes} tar bytes, {written} arrived");
                    return Err(VmError::ExportFailed { error });
                }
                // Not fsynced: the tar is unpacked as it comes (or read back at once); what has
                // to survive a crash is the layer made from it, synced when published.
                out.flush().await.map_err(write_err)?;
                return Ok(UpperStats { entries, tar_bytes: written });
            }
            Some(GuestMessage::UpperFailed { error }) => {
                return Err(VmError::ExportFailed { error: crate::guest::text(error) });
            }
            Some(other) => tracing::warn!(kind = other.kind(), "unexpected message in the export stream"),
            None => return Err(crashed(shared)),
        }
    }
}

/// Marks the export stale if it ends before the router delivered its final message (the
/// router takes `upper` when it does). The request itself always goes out whole once its send
/// was polled (see `Shared::send`), so an answer is always owed.
struct UpperGuard<'a> {
    shared: &'a Shared,
}

impl Drop for UpperGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.shared.state();
        if st.upper.take().is_some() && st.dead.is_none() {
            st.stale_exports += 1;
        }
    }
}
