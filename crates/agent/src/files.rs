//! `PutFile`: files the host injects into the sandbox root before a run. Chunks of one file
//! arrive in order; the file is created on the first, written at each chunk's offset, and
//! given its owner and mode on the last, which alone is answered. All path work goes through
//! [`crate::inroot`], so a symlinked parent can never lead outside the root.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use boxwood_protocol::{GuestMessage, PutFile};

use crate::inroot::{self, RootPath};

/// A file being received.
struct Pending {
    /// Directory holding the file and its name there, to remove it if the transfer fails.
    parent: Option<(OwnedFd, String)>,
    file: Option<File>,
    next_offset: u64,
    /// The first failure; later chunks are ignored and the last one reports it.
    error: Option<String>,
}

impl Pending {
    fn failed(error: String) -> Self {
        Self { parent: None, file: None, next_offset: 0, error: Some(error) }
    }
}

/// Transfers in progress, by path.
#[derive(Default)]
pub struct Files {
    pending: HashMap<String, Pending>,
}

impl Files {
    /// Handles one chunk; returns the reply once the file's last chunk has been handled.
    pub fn chunk(&mut self, put: PutFile) -> Option<GuestMessage> {
        let PutFile { path, mode, uid, gid, offset, data, last } = put;
        if offset == 0 {
            // A new transfer; an unfinished earlier one of the same path is abandoned.
            let entry = start(&path).unwrap_or_else(Pending::failed);
            self.pending.insert(path.clone(), entry);
        }
        let entry = self
            .pending
            .entry(path.clone())
            .or_insert_with(|| Pending::failed(format!("chunk at offset {offset} of a transfer that never started")));
        if entry.error.is_none() {
            entry.error = write_chunk(entry, offset, &data).err();
        }
        if !last {
            return None;
        }
        let entry = self.pending.remove(&path)?;
        let result = match (&entry.error, &entry.file) {
            (Some(error), _) => Err(error.clone()),
            (None, Some(file)) => finish(file, mode, uid, gid),
            (None, None) => Err("internal error: no open file".into()),
        };
        Some(match result {
            Ok(()) => GuestMessage::FilePut { path },
            Err(error) => {
                discard(entry);
                GuestMessage::FileFailed { path, error }
            }
        })
    }
}

/// Creates (or replaces) the file, with missing parents, and opens it for writing.
fn start(path: &str) -> Result<Pending, String> {
    let rp = RootPath::parse(path)?;
    let root = inroot::open_root().map_err(|e| format!("open root: {e}"))?;
    let parent = inroot::make_parents(root.as_fd(), &rp, &mut Vec::new()).map_err(|e| format!("parents: {e}"))?;
    let name = rp.name().to_owned();
    // Replacing means a new inode: other hard links to the old file keep their content, and
    // a symlink in the way is removed rather than followed.
    match inroot::lstat_at(parent.as_fd(), &name).map_err(|e| format!("stat: {e}"))? {
        Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => return Err("a directory is in the way".into()),
        Some(_) => inroot::unlink_at(parent.as_fd(), &name).map_err(|e| format!("remove the old file: {e}"))?,
        None => {}
    }
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
    let fd = inroot::open_at(parent.as_fd(), &name, flags, 0o600).map_err(|e| format!("create: {e}"))?;
    Ok(Pending { parent: Some((parent, name)), file: Some(File::from(fd)), next_offset: 0, error: None })
}

fn write_chunk(entry: &mut Pending, offset: u64, data: &[u8]) -> Result<(), String> {
    if offset != entry.next_offset {
        return Err(format!("chunk at offset {offset}, expected {}", entry.next_offset));
    }
    let file = entry.file.as_ref().ok_or("internal error: no open file")?;
    file.write_all_at(data, offset).map_err(|e| format!("write at {offset}: {e}"))?;
    entry.next_offset += data.len() as u64;
    Ok(())
}

/// Owner first: `chown` clears set-id bits, so `chmod` must come after it.
fn finish(file: &File, mode: u32, uid: u32, gid: u32) -> Result<(), String> {
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is an open descriptor owned by `file`, which outlives the call.
    if unsafe { libc::fchown(fd, uid, gid) } != 0 {
        return Err(format!("chown: {}", io::Error::last_os_error()));
    }
    // SAFETY: as above.
    if unsafe { libc::fchmod(fd, mode & 0o7777) } != 0 {
        return Err(format!("chmod: {}", io::Error::last_os_error()));
    }
    Ok(())
}

/// Removes a file whose transfer failed, freeing its space.
fn discard(entry: Pending) {
    drop(entry.file);
    if let Some((parent, name)) = entry.parent {
        let _ = inroot::unlink_at(parent.as_fd(), &name);
    }
}
