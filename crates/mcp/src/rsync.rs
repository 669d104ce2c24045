//! `rsync`: a local tree made a directory state on the server. Files are fingerprinted (size,
//! mtime, inode, mode) in a local cache, so an unchanged tree is neither hashed nor uploaded
//! again; a changed file is hashed, looked up on the server by its SHA-256 and uploaded only
//! if the server lacks it, several at once. The state lives on the server, so its id works
//! from any client of the namespace.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use boxwood_client::types::{DirectoryStateFile, DirectoryStateRequest};
use boxwood_client::{Client, ClientError};
use futures::{StreamExt as _, TryStreamExt as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Uploads in flight at once.
const PARALLEL_UPLOADS: usize = 8;

/// What the cache knows of a local file: its fingerprint when it was last synced, and the
/// upload holding those bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Known {
    size: u64,
    mtime_ns: i128,
    ino: u64,
    mode: u32,
    sha256: String,
    uuid: String,
}

/// A local file to sync.
#[derive(Clone)]
struct Local {
    abs: PathBuf,
    /// Path in the VM.
    target: String,
    size: u64,
    mtime_ns: i128,
    ino: u64,
    mode: u32,
}

impl Local {
    fn matches(&self, k: &Known) -> bool {
        (k.size, k.mtime_ns, k.ino, k.mode) == (self.size, self.mtime_ns, self.ino, self.mode)
    }
}

/// Why a sync stopped: something here, or the server's answer.
pub enum Failure {
    Local(String),
    Server(ClientError),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Self::Server(e)
    }
}

/// The outcome of one sync.
#[derive(Debug, Serialize)]
pub struct Synced {
    pub directory_state_id: i64,
    pub files: usize,
    /// Files whose bytes were sent.
    pub uploaded: usize,
}

/// `exclude` globs (`*`, `?`) as contree-mcp reads them: matched case-insensitively against
/// the start of the path relative to the source.
fn excluded(rel: &str, patterns: &[String]) -> bool {
    fn prefix(p: &[u8], s: &[u8]) -> bool {
        match p.split_first() {
            None => true,
            Some((b'*', rest)) => (0..=s.len()).any(|i| prefix(rest, &s[i..])),
            Some((b'?', rest)) => !s.is_empty() && prefix(rest, &s[1..]),
            Some((c, rest)) => s.first().is_some_and(|b| b.eq_ignore_ascii_case(c)) && prefix(rest, &s[1..]),
        }
    }
    patterns.iter().any(|p| prefix(p.as_bytes(), rel.as_bytes()))
}

/// Regular files under `root` (symlinks to files followed, symlinked directories not: no
/// loops), in path order.
fn walk(root: &Path, destination: &str, exclude: &[String]) -> Result<Vec<Local>, String> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
            let abs = entry.path();
            let rel = abs.strip_prefix(root).unwrap_or(&abs).to_string_lossy().into_owned();
            if excluded(&rel, exclude) {
                continue;
            }
            let kind = entry.file_type().map_err(|e| format!("cannot stat {}: {e}", abs.display()))?;
            if kind.is_dir() {
                dirs.push(abs);
                continue;
            }
            // A symlink counts as what it points to, if that is a regular file.
            let Ok(meta) = std::fs::metadata(&abs) else { continue };
            if !meta.is_file() {
                continue;
            }
            out.push(Local {
                target: format!("{}/{rel}", destination.trim_end_matches('/')),
                abs,
                size: meta.len(),
                mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
                ino: meta.ino(),
                mode: meta.mode() & 0o7777,
            });
        }
    }
    out.sort_by(|a, b| a.target.cmp(&b.target));
    Ok(out)
}

/// The fingerprint cache of one server and token (uploads belong to the token's namespace),
/// as a JSON file under the user's cache dir.
fn cache_path(client: &Client) -> Option<PathBuf> {
    let base = std::env::var_os("BOXWOOD_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("boxwood")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/boxwood")))?;
    Some(base.join(format!("rsync-{}.json", client.fingerprint())))
}

fn load(path: Option<&Path>) -> BTreeMap<PathBuf, Known> {
    path.and_then(|p| std::fs::read(p).ok()).and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

fn store(path: Option<&Path>, cache: &BTreeMap<PathBuf, Known>) {
    let Some(path) = path else { return };
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new("/")))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(cache).unwrap_or_default())?;
        std::fs::rename(tmp, path)
    };
    // A cache that cannot be written costs the next sync a hash of each file, nothing more.
    let _ = write();
}

/// Syncs `source` to `destination` in the VM and registers the directory state.
pub async fn sync(client: &Client, source: &str, destination: &str, exclude: &[String]) -> Result<Synced, Failure> {
    let root = Path::new(source);
    if !root.is_absolute() {
        return Err(Failure::Local(format!("source {source:?} must be an absolute local path")));
    }
    if !root.is_dir() {
        return Err(Failure::Local(format!("source {source:?} is not a directory here")));
    }
    if !destination.starts_with('/') {
        return Err(Failure::Local(format!("destination {destination:?} must be an absolute path in the VM")));
    }
    let files = {
        let (root, destination, exclude) = (root.to_path_buf(), destination.to_owned(), exclude.to_vec());
        tokio::task::spawn_blocking(move || walk(&root, &destination, &exclude))
            .await
            .map_err(|e| Failure::Local(format!("walking {source} failed: {e}")))?
            .map_err(Failure::Local)?
    };
    let path = cache_path(client);
    let mut cache = load(path.as_deref());
    let first = register(client, &files, &mut cache, false).await;
    let synced = match first {
        // The server lost an upload the cache still names: check every file with the server.
        Err(Failure::Server(ClientError::Api { status: 404, .. })) => register(client, &files, &mut cache, true).await,
        other => other,
    };
    store(path.as_deref(), &cache);
    synced
}

async fn register(
    client: &Client,
    files: &[Local],
    cache: &mut BTreeMap<PathBuf, Known>,
    verify: bool,
) -> Result<Synced, Failure> {
    // Owned, so the uploads' futures borrow nothing from this one.
    let todo: Vec<Local> =
        files.iter().filter(|f| verify || !cache.get(&f.abs).is_some_and(|k| f.matches(k))).cloned().collect();
    let uploads = todo.into_iter().map(|f| ensure(client.clone(), f));
    let results: Vec<(PathBuf, Known, bool)> =
        futures::stream::iter(uploads).buffer_unordered(PARALLEL_UPLOADS).try_collect().await?;
    let uploaded = results.iter().filter(|r| r.2).count();
    for (abs, known, _) in results {
        cache.insert(abs, known);
    }
    let entries = files
        .iter()
        .filter_map(|f| {
            let known = cache.get(&f.abs)?;
            Some(DirectoryStateFile { path: f.target.clone(), uuid: known.uuid.clone(), mode: Some(f.mode) })
        })
        .collect();
    let state = client.create_directory_state(&DirectoryStateRequest { files: entries }).await?;
    Ok(Synced { directory_state_id: state.id, files: files.len(), uploaded })
}

/// Hashes `f`, finds or uploads its bytes; returns its cache entry and whether it was sent.
async fn ensure(client: Client, f: Local) -> Result<(PathBuf, Known, bool), Failure> {
    let bytes =
        tokio::fs::read(&f.abs).await.map_err(|e| Failure::Local(format!("cannot read {}: {e}", f.abs.display())))?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let (uuid, sent) = match client.file_by_sha256(&sha256).await? {
        Some(existing) => (existing.uuid, false),
        None => (client.upload(bytes).await?.uuid, true),
    };
    let known = Known { size: f.size, mtime_ns: f.mtime_ns, ino: f.ino, mode: f.mode, sha256, uuid };
    Ok((f.abs, known, sent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excludes_match_the_start_of_the_relative_path_case_insensitively() {
        let ex = |p: &str| vec![p.to_owned()];
        assert!(excluded("skip.log", &ex("*.log")));
        assert!(excluded("logs/a.LOG", &ex("*.log")));
        assert!(excluded("node_modules/x/y.js", &ex("node_modules")));
        assert!(!excluded("src/main.rs", &ex("*.log")));
        assert!(excluded("a1", &ex("a?")));
        assert!(!excluded("a", &ex("a?")));
    }

    #[test]
    fn the_walk_keeps_regular_files_follows_file_links_and_applies_excludes() {
        let dir = std::env::temp_dir().join(format!("bw-rsync-walk-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("pkg/empty")).unwrap();
        std::fs::write(dir.join("main.sh"), "x").unwrap();
        std::fs::write(dir.join("pkg/data.txt"), "y").unwrap();
        std::fs::write(dir.join("skip.log"), "z").unwrap();
        std::os::unix::fs::symlink(dir.join("pkg/data.txt"), dir.join("link.txt")).unwrap();
        std::os::unix::fs::symlink(&dir, dir.join("pkg/loop")).unwrap();
        let files = walk(&dir, "/app/", &["*.log".to_owned()]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let targets: Vec<&str> = files.iter().map(|f| f.target.as_str()).collect();
        assert_eq!(targets, ["/app/link.txt", "/app/main.sh", "/app/pkg/data.txt"]);
    }
}
