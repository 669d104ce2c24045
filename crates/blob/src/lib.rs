//! Content-addressed blobs (uploaded files), named by the SHA-256 of their bytes.
//!
//! ```text
//! <root>/sha256/<first two hex>/<hex>   a blob, immutable once published
//! <root>/tmp/                           uploads in progress; emptied at start
//! ```
//! An upload streams to a temporary file while it is hashed, is fsynced, and is then renamed
//! to its name; a blob therefore either exists whole or not at all, and storing the same
//! content twice keeps one copy.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("i/o error on {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("reading the upload failed")]
    Source(#[source] std::io::Error),
    #[error("upload exceeds the {limit}-byte limit")]
    TooLarge { limit: u64 },
    #[error("invalid sha256 {0:?}")]
    BadDigest(String),
}

pub type BlobResult<T> = Result<T, BlobError>;

/// A stored blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    /// Lowercase hex SHA-256.
    pub sha256: String,
    pub size: u64,
}

#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Streams `source` into the store (at most `limit` bytes) and returns what it holds.
    async fn put(&self, source: &mut (dyn AsyncRead + Send + Unpin), limit: u64) -> BlobResult<BlobInfo>;
    /// The blob's file, if the store has it.
    fn path(&self, sha256: &str) -> BlobResult<Option<PathBuf>>;
    /// Free and total space of the filesystem the blobs live on.
    fn space(&self) -> BlobResult<DiskSpace>;
    /// Disk the stored blobs take (allocated bytes).
    fn stored_bytes_total(&self) -> BlobResult<u64>;
    /// Deletes a blob; returns the bytes it took on disk (0 if it was not there).
    fn remove(&self, sha256: &str) -> BlobResult<u64>;
}

/// Space on the filesystem holding the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSpace {
    /// Bytes an unprivileged writer could still allocate (`f_bavail`).
    pub free_bytes: u64,
    /// Size of the filesystem (`f_blocks`).
    pub total_bytes: u64,
}

/// Blobs in a local directory.
#[derive(Debug, Clone)]
pub struct FsBlobStore {
    root: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
    move |source| BlobError::Io { path: path.to_owned(), source }
}

/// Checks a 64-hex-digit SHA-256 and returns it lowercased.
pub fn normalize_sha256(s: &str) -> BlobResult<String> {
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(BlobError::BadDigest(s.into()))
    }
}

impl FsBlobStore {
    pub fn open(root: &Path) -> BlobResult<Self> {
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        for dir in [root.join("sha256"), tmp] {
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        Ok(Self { root: root.to_owned() })
    }

    fn blob_path(&self, hex: &str) -> PathBuf {
        self.root.join("sha256").join(&hex[..2]).join(hex)
    }
}

#[async_trait]
impl BlobStore for FsBlobStore {
    async fn put(&self, source: &mut (dyn AsyncRead + Send + Unpin), limit: u64) -> BlobResult<BlobInfo> {
        let tmp = self.root.join("tmp").join(uuid::Uuid::new_v4().to_string());
        let result = async {
            let mut file = tokio::fs::File::create(&tmp).await.map_err(io(&tmp))?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = source.read(&mut buf).await.map_err(BlobError::Source)?;
                if n == 0 {
                    break;
                }
                size += n as u64;
                if size > limit {
                    return Err(BlobError::TooLarge { limit });
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n]).await.map_err(io(&tmp))?;
            }
            file.sync_all().await.map_err(io(&tmp))?;
            let hex = hex::encode(hasher.finalize());
            let dst = self.blob_path(&hex);
            if tokio::fs::try_exists(&dst).await.map_err(io(&dst))? {
                tokio::fs::remove_file(&tmp).await.map_err(io(&tmp))?;
            } else {
                let dir = dst.parent().map(Path::to_path_buf).unwrap_or_default();
                tokio::fs::create_dir_all(&dir).await.map_err(io(&dir))?;
                tokio::fs::rename(&tmp, &dst).await.map_err(io(&dst))?;
                tokio::fs::File::open(&dir).await.map_err(io(&dir))?.sync_all().await.map_err(io(&dir))?;
            }
            Ok(BlobInfo { sha256: hex, size })
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    fn path(&self, sha256: &str) -> BlobResult<Option<PathBuf>> {
        let p = self.blob_path(&normalize_sha256(sha256)?);
        Ok(p.is_file().then_some(p))
    }

    fn remove(&self, sha256: &str) -> BlobResult<u64> {
        use std::os::unix::fs::MetadataExt as _;
        let p = self.blob_path(&normalize_sha256(sha256)?);
        let bytes = match std::fs::metadata(&p) {
            Ok(m) => m.blocks() * 512,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io(&p)(e)),
        };
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io(&p)(e)),
        }
    }

    fn stored_bytes_total(&self) -> BlobResult<u64> {
        use std::os::unix::fs::MetadataExt as _;
        let mut total = 0;
        let mut stack = vec![self.root.join("sha256")];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let Ok(m) = entry.metadata() else { continue };
                if m.is_dir() {
                    stack.push(entry.path());
                } else {
                    total += m.blocks() * 512;
                }
            }
        }
        Ok(total)
    }

    fn space(&self) -> BlobResult<DiskSpace> {
        let st = rustix::fs::statvfs(&self.root)
            .map_err(|e| std::io::Error::from_raw_os_error(e.raw_os_error()))
            .map_err(io(&self.root))?;
        Ok(DiskSpace {
            free_bytes: st.f_bavail.saturating_mul(st.f_frsize),
            total_bytes: st.f_blocks.saturating_mul(st.f_frsize),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stores_by_content_once_and_enforces_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let a = store.put(&mut &b"hello\n"[..], 100).await.unwrap();
        assert_eq!(a.sha256, "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03");
        assert_eq!(a.size, 6);
        let b = store.put(&mut &b"hello\n"[..], 100).await.unwrap();
        assert_eq!(a, b);
        let path = store.path(&a.sha256.to_uppercase()).unwrap().unwrap();
        assert_eq!(std::fs::read(path).unwrap(), b"hello\n");
        assert!(matches!(store.put(&mut &[0u8; 101][..], 100).await, Err(BlobError::TooLarge { .. })));
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "a refused upload leaves nothing");
        assert!(store.path(&"0".repeat(64)).unwrap().is_none());
        assert!(store.path("xyz").is_err());
        let empty = store.put(&mut &b""[..], 100).await.unwrap();
        assert_eq!(empty.size, 0);
        let space = store.space().unwrap();
        assert!(space.total_bytes > 0 && space.free_bytes <= space.total_bytes, "{space:?}");
        assert!(store.remove(&a.sha256).unwrap() > 0);
        assert!(store.path(&a.sha256).unwrap().is_none());
        assert_eq!(store.remove(&a.sha256).unwrap(), 0, "removing twice is not an error");
    }
}
