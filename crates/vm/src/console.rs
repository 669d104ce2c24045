//! The guest console, bounded. QEMU writes the serial console to its stdout, a pipe the host
//! drains into `console.log`; the host rewrites that file with its last [`TAIL_BYTES`] each
//! time it passes [`FILE_MAX_BYTES`], so a guest flooding its console costs the host at most
//! ~1 MiB of disk and 64 KiB of memory, and crash messages quote only the tail. A pipe, not a
//! host path in QEMU's command line, so a jailed QEMU needs no access to the run dir for it.

use std::collections::VecDeque;
use std::path::PathBuf;

use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::process::ChildStdout;

/// Bytes of console output kept when the file is cut back (and quoted in errors).
pub(crate) const TAIL_BYTES: usize = 64 * 1024;
/// Size at which `console.log` is cut back to its tail.
pub(crate) const FILE_MAX_BYTES: u64 = 1024 * 1024;

/// Drains QEMU's console pipe into `path` until QEMU closes it. Never stops reading before
/// that (a full pipe would stall the guest), even if the file cannot be written.
pub(crate) async fn pump(mut pipe: ChildStdout, path: PathBuf) {
    let mut file = match tokio::fs::File::create(&path).await {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(path = %path.display(), "console.log: {e}");
            None
        }
    };
    let mut ring: VecDeque<u8> = VecDeque::with_capacity(TAIL_BYTES);
    let mut size = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let skip = chunk.len().saturating_sub(TAIL_BYTES);
        let excess = (ring.len() + chunk.len() - skip).saturating_sub(TAIL_BYTES);
        ring.drain(..excess);
        ring.extend(&chunk[skip..]);
        let Some(f) = file.as_mut() else { continue };
        size += n as u64;
        let written = if size > FILE_MAX_BYTES {
            size = ring.len() as u64;
            rewrite(f, &ring).await
        } else {
            // tokio's File writes in the background: flush so the file is current for
            // readers and `set_len` never races a pending write.
            match f.write_all(chunk).await {
                Ok(()) => f.flush().await,
                Err(e) => Err(e),
            }
        };
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), "console.log: {e}");
            file = None;
        }
    }
}

async fn rewrite(f: &mut tokio::fs::File, ring: &VecDeque<u8>) -> std::io::Result<()> {
    f.set_len(0).await?;
    f.seek(std::io::SeekFrom::Start(0)).await?;
    let (a, b) = ring.as_slices();
    f.write_all(a).await?;
    f.write_all(b).await?;
    f.flush().await
}

/// The last [`TAIL_BYTES`] of a console (or QEMU) log, lossily decoded; reads no more.
pub(crate) fn read_tail(path: &std::path::Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else { return String::new() };
    let len = f.metadata().map_or(0, |m| m.len());
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES as u64)));
    let mut bytes = Vec::with_capacity(TAIL_BYTES);
    let _ = f.take(TAIL_BYTES as u64).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use std::process::Stdio;

    use super::*;

    #[tokio::test]
    async fn a_flood_leaves_a_bounded_file_holding_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        // 8 MiB of filler, then a marker line: the file stays bounded and ends with the marker.
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", "head -c 8388608 /dev/zero | tr '\\0' x; echo; echo the-last-line"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        pump(child.stdout.take().unwrap(), path.clone()).await;
        child.wait().await.unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len <= FILE_MAX_BYTES, "console.log is {len} bytes");
        let tail = read_tail(&path);
        assert!(tail.len() <= TAIL_BYTES);
        assert!(tail.ends_with("\nthe-last-line\n"), "{:?}", &tail[tail.len().saturating_sub(40)..]);

        // The control: small output is kept whole.
        let mut child = tokio::process::Command::new("echo").arg("hello").stdout(Stdio::piped()).spawn().unwrap();
        pump(child.stdout.take().unwrap(), path.clone()).await;
        child.wait().await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "hello\n");
    }
}
