//! Offline sources: OCI image layouts (a directory or a tar of one) and docker-archive tars.
//! Archives are never extracted: members are found by one seeking pass over the tar headers
//! and then read in place as (file, offset, length) slices.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::apply::decompressed;
use crate::confine::{Opened, open_member};
use crate::manifest::{self, Document, ImageConfig, MAX_DOCUMENT, sha256_digest, verify_bytes};
use crate::{OciError, Resolved, io_err};

/// A byte range of a file holding one blob.
#[derive(Debug, Clone)]
pub(crate) struct BlobLoc {
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
    /// For a confined local source, the descriptor `path` (`/proc/self/fd/N`) refers to;
    /// held, never read.
    #[allow(dead_code)]
    pub keep: Option<Arc<OwnedFd>>,
}

impl BlobLoc {
    pub fn open(&self) -> Result<io::Take<File>, OciError> {
        let mut f = File::open(&self.path).map_err(io_err(&self.path))?;
        f.seek(SeekFrom::Start(self.offset)).map_err(io_err(&self.path))?;
        Ok(f.take(self.len))
    }
}

/// How a local layer is checked before it is applied.
#[derive(Debug, Clone)]
pub(crate) enum Check {
    /// sha256 of the blob as stored (OCI layouts).
    Blob(String),
    /// sha256 of the decompressed tar, the config's `diff_id` (docker-archive).
    DiffId(String),
}

#[derive(Debug)]
pub(crate) struct LocalLayer {
    pub loc: BlobLoc,
    pub check: Check,
    /// Digest shown in errors.
    pub name: String,
}

#[derive(Debug)]
pub(crate) struct LocalPlan {
    pub resolved: Resolved,
    pub config: ImageConfig,
    pub layers: Vec<LocalLayer>,
}

/// Where the members of a layout or archive live.
enum Store {
    Dir(Opened),
    Tar { file: Opened, members: HashMap<String, Member> },
}

enum Member {
    File { offset: u64, len: u64 },
    Symlink(String),
}

impl Store {
    fn open_tar(opened: Opened) -> Result<Self, OciError> {
        let path = opened.path.as_path();
        let file = File::open(path).map_err(io_err(path))?;
        let mut archive = tar::Archive::new(file);
        let bad =
            |e: io::Error| OciError::LocalSource { path: path.to_owned(), reason: format!("not a valid tar: {e}") };
        let mut members = HashMap::new();
        for entry in archive.entries_with_seek().map_err(bad)? {
            let entry = entry.map_err(bad)?;
            let name = normalise(&String::from_utf8_lossy(&entry.path_bytes()));
            let kind = entry.header().entry_type();
            if kind.is_file() {
                members.insert(name, Member::File { offset: entry.raw_file_position(), len: entry.size() });
            } else if kind.is_symlink()
                && let Some(target) = entry.link_name_bytes()
            {
                members.insert(name, Member::Symlink(String::from_utf8_lossy(&target).into_owned()));
            }
        }
        Ok(Store::Tar { file: opened, members })
    }

    fn path(&self) -> &Path {
        match self {
            Store::Dir(o) | Store::Tar { file: o, .. } => &o.path,
        }
    }

    fn missing(&self, name: &str) -> OciError {
        OciError::LocalSource { path: self.path().to_owned(), reason: format!("{name} is missing") }
    }

    /// Finds a member; `name` is built from validated digests or read from the archive's own
    /// manifest and is only ever looked up, never joined onto a path, for archives.
    fn locate(&self, name: &str) -> Result<BlobLoc, OciError> {
        match self {
            Store::Dir(dir) => {
                let member = open_member(dir, name).ok_or_else(|| self.missing(name))?;
                let len = member.path.metadata().map_err(|_| self.missing(name))?.len();
                Ok(BlobLoc { path: member.path.clone(), offset: 0, len, keep: Some(member.keep()) })
            }
            Store::Tar { file, members } => {
                let mut name = normalise(name);
                for _ in 0..8 {
                    match members.get(&name) {
                        Some(Member::File { offset, len }) => {
                            let (path, keep) = (file.path.clone(), Some(file.keep()));
                            return Ok(BlobLoc { path, offset: *offset, len: *len, keep });
                        }
                        Some(Member::Symlink(target)) => {
                            let base = name.rsplit_once('/').map_or("", |(d, _)| d);
                            name = normalise(&format!("{base}/{target}"));
                        }
                        None => break,
                    }
                }
                Err(self.missing(&name))
            }
        }
    }

    fn read(&self, name: &str) -> Result<Vec<u8>, OciError> {
        let loc = self.locate(name)?;
        if loc.len > MAX_DOCUMENT {
            return Err(OciError::LocalSource {
                path: self.path().to_owned(),
                reason: format!("{name} is larger than {MAX_DOCUMENT} bytes"),
            });
        }
        let mut out = Vec::with_capacity(loc.len as usize);
        loc.open()?.read_to_end(&mut out).map_err(io_err(&loc.path))?;
        Ok(out)
    }

    fn read_blob(&self, digest: &str, what: &str) -> Result<Vec<u8>, OciError> {
        let bytes = self.read(&blob_name(digest))?;
        verify_bytes(what, &bytes, digest)?;
        Ok(bytes)
    }
}

fn blob_name(digest: &str) -> String {
    format!("blobs/{}", digest.replacen(':', "/", 1))
}

/// A member name with `.` components and leading `/` dropped and `..` resolved lexically.
fn normalise(name: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

/// Resolves an OCI layout (`oci:` directory or `oci-archive:` tar).
pub(crate) fn plan_oci(opened: Opened, tag: Option<&str>, archive: bool) -> Result<LocalPlan, OciError> {
    let path = opened.path.clone();
    let path = path.as_path();
    let store = if archive { Store::open_tar(opened)? } else { Store::Dir(opened) };
    let local = |reason: String| OciError::LocalSource { path: path.to_owned(), reason };
    let index = store.read("index.json")?;
    let Document::Index(entries) = manifest::parse_document(&index, Some(manifest::OCI_INDEX))? else {
        return Err(local("index.json is not an image index".into()));
    };
    let ref_name = |d: &manifest::Descriptor| d.annotations.get("org.opencontainers.image.ref.name").cloned();
    let mut desc = match tag {
        Some(t) => entries.iter().find(|d| ref_name(d).as_deref() == Some(t)).ok_or_else(|| {
            let tags: Vec<String> = entries.iter().filter_map(ref_name).collect();
            local(format!(
                "no image tagged {t:?} (tags: {})",
                if tags.is_empty() { "none".into() } else { tags.join(", ") }
            ))
        })?,
        None if entries.len() == 1 => &entries[0],
        None => {
            let tags: Vec<String> = entries.iter().filter_map(ref_name).collect();
            return Err(local(format!(
                "{} images in the layout; name one by tag ({})",
                entries.len(),
                tags.join(", ")
            )));
        }
    }
    .clone();
    for _ in 0..4 {
        desc.check_digest("index.json")?;
        let bytes = store.read_blob(&desc.digest, "manifest")?;
        let media_type = (!desc.media_type.is_empty()).then_some(desc.media_type.as_str());
        match manifest::parse_document(&bytes, media_type)? {
            Document::Index(list) => desc = manifest::pick_amd64(&list)?.clone(),
            Document::Manifest(m) => {
                let config_bytes = store.read_blob(&m.config.digest, "image config")?;
                let config = ImageConfig::parse(&config_bytes)?;
                let mut layers = Vec::new();
                for l in &m.layers {
                    let loc = store.locate(&blob_name(&l.digest))?;
                    if loc.len != l.size {
                        return Err(OciError::DigestMismatch {
                            what: format!("layer {}", l.digest),
                            expected: format!("{} bytes", l.size),
                            actual: format!("{} bytes", loc.len),
                        });
                    }
                    layers.push(LocalLayer { loc, check: Check::Blob(l.digest.clone()), name: l.digest.clone() });
                }
                let resolved = Resolved { manifest_digest: desc.digest.clone(), config_digest: m.config.digest };
                return Ok(LocalPlan { resolved, config, layers });
            }
        }
    }
    Err(local("image indexes nested too deeply".into()))
}

/// Resolves a docker-archive tar (`manifest.json` + config + uncompressed layer tars). It has no
/// registry manifest, so `manifest_digest` is the sha256 of its `manifest.json`.
pub(crate) fn plan_docker_archive(opened: Opened) -> Result<LocalPlan, OciError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Entry {
        config: String,
        layers: Vec<String>,
    }
    let path = opened.path.clone();
    let local = |reason: String| OciError::LocalSource { path: path.clone(), reason };
    let store = Store::open_tar(opened)?;
    let manifest_bytes = store.read("manifest.json")?;
    let mut entries: Vec<Entry> =
        serde_json::from_slice(&manifest_bytes).map_err(|e| local(format!("bad manifest.json: {e}")))?;
    let entry = match entries.len() {
        1 => entries.remove(0),
        n => return Err(local(format!("manifest.json lists {n} images; exactly one is supported"))),
    };
    let config_bytes = store.read(&entry.config)?;
    let config = ImageConfig::parse(&config_bytes)?;
    let diff_ids = config.rootfs.as_ref().map(|r| r.diff_ids.clone()).unwrap_or_default();
    if diff_ids.len() != entry.layers.len() {
        return Err(local(format!("{} layers but {} diff_ids in the config", entry.layers.len(), diff_ids.len())));
    }
    let mut layers = Vec::new();
    for (name, diff_id) in entry.layers.iter().zip(diff_ids) {
        if !crate::source::valid_digest(&diff_id) {
            return Err(local(format!("unsupported diff_id {diff_id:?}")));
        }
        layers.push(LocalLayer { loc: store.locate(name)?, name: diff_id.clone(), check: Check::DiffId(diff_id) });
    }
    let resolved =
        Resolved { manifest_digest: sha256_digest(&manifest_bytes), config_digest: sha256_digest(&config_bytes) };
    Ok(LocalPlan { resolved, config, layers })
}

/// Hashes a local layer (decompressing it for a diff_id) and compares.
pub(crate) fn verify_layer(layer: &LocalLayer) -> Result<(), OciError> {
    let path = &layer.loc.path;
    let (expected, actual) = match &layer.check {
        Check::Blob(digest) => (digest, hash_reader(layer.loc.open()?).map_err(io_err(path))?),
        Check::DiffId(diff_id) => {
            let corrupt = |e: io::Error| OciError::CorruptLayer { digest: diff_id.clone(), reason: e.to_string() };
            let reader = decompressed(io::BufReader::new(layer.loc.open()?)).map_err(corrupt)?;
            (diff_id, hash_reader(reader).map_err(corrupt)?)
        }
    };
    if &actual == expected {
        Ok(())
    } else {
        Err(OciError::DigestMismatch { what: format!("layer {}", layer.name), expected: expected.clone(), actual })
    }
}

fn hash_reader(mut r: impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(format!("sha256:{}", hex::encode(hasher.finalize())));
        }
        hasher.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalise() {
        assert_eq!(normalise("./blobs/sha256/ab"), "blobs/sha256/ab");
        assert_eq!(normalise("a/../b/./c"), "b/c");
        assert_eq!(normalise("../../x"), "x");
    }
}
