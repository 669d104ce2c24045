//! Flattening: applies image layers (gzip, zstd or plain tars) in order into one rootfs tree,
//! with OCI whiteout semantics, without ever writing outside the tree.
//!
//! * `.wh.<name>` deletes `<name>` as left by earlier layers; `.wh..wh..opq` empties its
//!   directory of earlier layers' content. Whiteouts never hide entries of their own layer
//!   (as the OCI spec says), and no whiteout file is ever written.
//! * Names are refused (the import fails with [`OciError::HostileLayer`]) when absolute or
//!   with a `..` component; so are hardlinks whose target is absolute, has `..`, is missing
//!   or is a directory.
//! * Symlinks met in a member's *parent* path are followed the way a chroot would: inside the
//!   tree only (`/` is the tree's root, `..` stops there; at most 40 hops), so a hostile link
//!   such as `etc -> /` or `x -> ../../..` can only ever lead back into the tree. The member's
//!   last component is never followed: whatever is there (file, symlink or directory of an
//!   earlier layer) is replaced, except that a directory member merges into a directory.
//! * Device nodes are skipped; FIFOs are kept. Owners, 07777 modes, mtimes and the xattrs
//!   `user.*` and `security.capability` are kept — as data: the tree is inert (see
//!   `boxwood_image::inert`), so a setuid-root file of an image is a 0600 file of the server
//!   on the host, and a symlink is a file holding its target.
//!
//! The tree must be ours alone while layers are applied (no one else renames inside it), so a
//! component checked to be a real directory stays one.

use std::collections::{HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use tar::EntryType;

use boxwood_image::inert::{self, Kind, Meta};
use boxwood_image::tarname::{member_path, pax_time};

use crate::fsutil::{self, remove_any};
use crate::local::BlobLoc;
use crate::{OciError, io_err};

const OPAQUE: &[u8] = b".wh..wh..opq";
const WHITEOUT: &[u8] = b".wh.";
const MAX_SYMLINK_HOPS: u32 = 40;

/// Wraps a layer stream in the decompressor its first bytes call for (gzip, zstd or none).
pub(crate) fn decompressed<R: BufRead + Send + 'static>(mut r: R) -> io::Result<Box<dyn Read + Send>> {
    let head = r.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(r)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(zstd::stream::read::Decoder::with_buffer(r)?))
    } else {
        Ok(Box::new(r))
    }
}

/// Applies layer files (gzip, zstd or plain tars), bottom first, into `tree`, an existing
/// empty directory, producing a flat rootfs. Returns the bytes of regular-file content in the
/// result. On error `tree` is emptied again.
pub fn apply_layers(layers: &[PathBuf], tree: &Path) -> Result<u64, OciError> {
    let mut locs = Vec::new();
    for path in layers {
        let len = path.metadata().map_err(io_err(path))?.len();
        locs.push((BlobLoc { path: path.clone(), offset: 0, len, keep: None }, path.display().to_string()));
    }
    apply_all(&locs, tree, &AtomicBool::new(false))
}

/// Checks that `tree` is an existing empty directory.
pub(crate) fn check_tree(tree: &Path) -> Result<(), OciError> {
    let meta = tree.symlink_metadata().map_err(io_err(tree))?;
    if !meta.is_dir() || std::fs::read_dir(tree).map_err(io_err(tree))?.next().is_some() {
        return Err(OciError::InvalidTree { path: tree.to_owned(), reason: "not an empty directory".into() });
    }
    Ok(())
}

/// [`apply_layers`] on blob slices, with `(location, name for errors)` pairs; stops with
/// [`OciError::Cancelled`] once `cancel` is set. Whatever the failure, `tree` ends up empty.
pub(crate) fn apply_all(layers: &[(BlobLoc, String)], tree: &Path, cancel: &AtomicBool) -> Result<u64, OciError> {
    check_tree(tree)?;
    let result = inert::init_root(tree, &inert::implied_dir())
        .map_err(OciError::from)
        .and_then(|()| layers.iter().try_for_each(|(loc, name)| apply_one(loc, name, tree, cancel)))
        .and_then(|()| fsutil::content_bytes(tree));
    if result.is_err()
        && let Err(e) = fsutil::clear_dir(tree)
    {
        tracing::warn!(tree = %tree.display(), error = %e, "could not empty the tree after a failed import");
    }
    result
}

fn apply_one(loc: &BlobLoc, digest: &str, tree: &Path, cancel: &AtomicBool) -> Result<(), OciError> {
    let corrupt = |e: io::Error| OciError::CorruptLayer { digest: digest.to_string(), reason: e.to_string() };
    let reader = decompressed(BufReader::with_capacity(1 << 16, loc.open()?)).map_err(corrupt)?;
    let mut archive = tar::Archive::new(reader);
    let mut layer = Layer { root: tree, digest, member: String::new(), this_layer: HashSet::new(), cancel };
    for entry in archive.entries().map_err(corrupt)? {
        if cancel.load(Ordering::Relaxed) {
            return Err(OciError::Cancelled);
        }
        layer.member(entry.map_err(corrupt)?)?;
    }
    Ok(())
}

/// One component still to resolve.
enum Step {
    Up,
    Name(OsString),
}

struct Layer<'a> {
    root: &'a Path,
    digest: &'a str,
    /// The member being applied, for errors.
    member: String,
    /// Real (symlink-free, tree-relative) paths this layer has created, which its own
    /// whiteouts must not remove.
    this_layer: HashSet<PathBuf>,
    cancel: &'a AtomicBool,
}

impl Layer<'_> {
    fn hostile(&self, reason: impl Into<String>) -> OciError {
        OciError::HostileLayer { digest: self.digest.into(), member: self.member.clone(), reason: reason.into() }
    }

    fn member<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), OciError> {
        let kind = entry.header().entry_type();
        self.member = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() || kind.is_gnu_longname() {
            return Ok(());
        }
        let rel = member_path(&entry.path_bytes()).map_err(|r| self.hostile(r))?;
        let Some(file_name) = rel.file_name().map(OsStr::to_owned) else {
            return Ok(()); // the layer's root directory: the tree's own metadata stays the caller's
        };
        let parent = rel.parent().unwrap_or(Path::new("")).to_owned();
        let fname = file_name.as_bytes();
        if fname == OPAQUE {
            return self.opaque(&parent);
        }
        if let Some(victim) = fname.strip_prefix(WHITEOUT) {
            if victim.starts_with(WHITEOUT) {
                tracing::debug!(member = %self.member, "skipping whiteout metadata file");
                return Ok(());
            }
            if victim.is_empty() || victim == b"." || victim == b".." {
                return Err(self.hostile("whiteout of an invalid name"));
            }
            return self.whiteout(&parent, OsStr::from_bytes(victim));
        }
        let meta = read_meta(&mut entry, self.digest).map_err(|r| self.hostile(r))?;
        let record = |kind: Kind| Meta { kind, ..meta.clone() };
        match kind {
            EntryType::Directory => {
                let real =
                    self.resolve_dir(&rel, true, false)?.ok_or_else(|| self.hostile("unresolvable directory"))?;
                inert::set(&self.root.join(&real), &record(Kind::Dir))?;
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let path = self.slot(&parent, &file_name)?;
                let mut file = inert::create_file(&path)?;
                self.copy(&mut entry, &mut file, &path)?;
                drop(file);
                inert::set(&path, &record(Kind::File))?;
            }
            EntryType::Symlink => {
                let target = entry.link_name_bytes().ok_or_else(|| self.hostile("symlink without a target"))?;
                if let Some(why) = inert::symlink_target_refusal(&target) {
                    return Err(self.hostile(why));
                }
                let path = self.slot(&parent, &file_name)?;
                // A symlink carries no xattrs a rootfs needs.
                inert::create_symlink(&path, &target, &Meta { xattrs: Vec::new(), ..record(Kind::Symlink) })?;
            }
            EntryType::Link => {
                let target = entry.link_name_bytes().ok_or_else(|| self.hostile("hardlink without a target"))?;
                let target = member_path(&target).map_err(|r| self.hostile(format!("hardlink target: {r}")))?;
                let original = self.existing(&target)?;
                let path = self.slot_keeping(&parent, &file_name, &original)?;
                if path != original {
                    inert::hard_link(&original, &path)?;
                }
            }
            EntryType::Fifo => {
                let path = self.slot(&parent, &file_name)?;
                inert::create_node(&path, &record(Kind::Fifo))?;
            }
            EntryType::Char | EntryType::Block => {
                tracing::debug!(member = %self.member, "skipping device node: a rootfs does not need them");
            }
            other => {
                tracing::warn!(member = %self.member, kind = ?other, "skipping member of an unsupported type");
            }
        }
        Ok(())
    }

    /// Copies a member's content, telling a corrupt layer (read error) from a local write error.
    fn copy(&self, from: &mut impl Read, to: &mut File, path: &Path) -> Result<(), OciError> {
        let mut buf = vec![0u8; 1 << 16];
        let mut since_check = 0usize;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(OciError::CorruptLayer { digest: self.digest.into(), reason: e.to_string() }),
            };
            to.write_all(&buf[..n]).map_err(io_err(path))?;
            since_check += n;
            if since_check >= 1 << 24 {
                since_check = 0;
                if self.cancel.load(Ordering::Relaxed) {
                    return Err(OciError::Cancelled);
                }
            }
        }
    }

    /// The real path for a new non-directory `parent/name`: parents resolved (missing ones
    /// created), and whatever an earlier member left at that name removed.
    fn slot(&mut self, parent: &Path, name: &OsStr) -> Result<PathBuf, OciError> {
        self.slot_keeping(parent, name, Path::new(""))
    }

    /// [`Self::slot`], except that nothing is removed when the slot is `keep` (a hardlink onto
    /// its own target).
    fn slot_keeping(&mut self, parent: &Path, name: &OsStr, keep: &Path) -> Result<PathBuf, OciError> {
        let real_parent = self.resolve_dir(parent, true, true)?.ok_or_else(|| self.hostile("unresolvable parent"))?;
        let real = real_parent.join(name);
        let path = self.root.join(&real);
        if path != keep {
            remove_any(&path)?;
        }
        self.this_layer.insert(real);
        Ok(path)
    }

    /// An earlier non-directory member for a hardlink (its last component not followed).
    fn existing(&mut self, rel: &Path) -> Result<PathBuf, OciError> {
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            return Err(self.hostile("hardlink to the root"));
        };
        let real_parent = self.resolve_dir(parent, false, true)?;
        let path = real_parent.map(|p| self.root.join(p).join(name));
        match path.as_ref().map(|p| p.symlink_metadata()) {
            Some(Ok(m)) if m.is_dir() => Err(self.hostile("hardlink to a directory")),
            Some(Ok(_)) => Ok(path.unwrap_or_default()),
            _ => Err(self.hostile(format!("hardlink target {} does not exist", rel.display()))),
        }
    }

    /// `.wh.<name>` in `parent`: removes what earlier layers left there.
    fn whiteout(&mut self, parent: &Path, name: &OsStr) -> Result<(), OciError> {
        let Some(real_parent) = self.resolve_dir(parent, false, true)? else { return Ok(()) };
        let real = real_parent.join(name);
        if self.this_layer.contains(&real) {
            tracing::debug!(member = %self.member, "whiteout of an entry of its own layer ignored");
            return Ok(());
        }
        remove_any(&self.root.join(real))
    }

    /// `.wh..wh..opq` in `dir`: `dir` becomes a directory holding only this layer's entries.
    fn opaque(&mut self, dir: &Path) -> Result<(), OciError> {
        let real = self.resolve_dir(dir, true, false)?.ok_or_else(|| self.hostile("unresolvable opaque directory"))?;
        self.prune(&real)
    }

    fn prune(&self, real_dir: &Path) -> Result<(), OciError> {
        let dir = self.root.join(real_dir);
        for child in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let child = child.map_err(io_err(&dir))?;
            let rel = real_dir.join(child.file_name());
            if !self.this_layer.contains(&rel) {
                remove_any(&child.path())?;
            } else if child.path().symlink_metadata().is_ok_and(|m| m.is_dir()) {
                self.prune(&rel)?;
            }
        }
        Ok(())
    }

    /// Resolves `rel` to a real directory inside the tree, following symlinks on the way as
    /// if the tree were `/`. Unless `follow_last`, a non-directory at the last component
    /// (symlink included) is replaced by a new directory: that is how a directory member
    /// replaces an earlier file or symlink. Missing components are created when `create`
    /// (and then recorded as this layer's), else the answer is `None`. Returns the real
    /// tree-relative path.
    fn resolve_dir(&mut self, rel: &Path, create: bool, follow_last: bool) -> Result<Option<PathBuf>, OciError> {
        let mut pending: VecDeque<Step> = rel
            .components()
            .filter_map(|c| if let Component::Normal(n) = c { Some(Step::Name(n.into())) } else { None })
            .collect();
        let mut real = PathBuf::new();
        let mut hops = 0;
        while let Some(step) = pending.pop_front() {
            let name = match step {
                Step::Up => {
                    real.pop();
                    continue;
                }
                Step::Name(n) => n,
            };
            let candidate_rel = real.join(&name);
            let candidate = self.root.join(&candidate_rel);
            let last = pending.is_empty();
            match inert::try_stat(&candidate)? {
                Some(m) if m.is_dir() => {}
                Some(m) if m.is_symlink() && (follow_last || !last) => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(self.hostile("too many levels of symbolic links"));
                    }
                    let target = inert::read_link(&candidate)?;
                    let target = Path::new(OsStr::from_bytes(&target));
                    for c in target.components().rev() {
                        match c {
                            Component::Normal(n) => pending.push_front(Step::Name(n.into())),
                            Component::ParentDir => pending.push_front(Step::Up),
                            Component::CurDir | Component::Prefix(_) => {}
                            Component::RootDir => {}
                        }
                    }
                    if target.is_absolute() {
                        real = PathBuf::new();
                    }
                    continue;
                }
                Some(_) if !create => return Ok(None),
                Some(_) if last && !follow_last => {
                    // A directory member (or opaque marker) replaces a file or symlink.
                    remove_any(&candidate)?;
                    self.mkdir(&candidate, &candidate_rel)?;
                }
                Some(_) => {
                    return Err(self.hostile(format!("parent {} is not a directory", candidate_rel.display())));
                }
                None => {
                    if !create {
                        return Ok(None);
                    }
                    self.mkdir(&candidate, &candidate_rel)?;
                }
            }
            if create {
                self.this_layer.insert(candidate_rel.clone());
            }
            real = candidate_rel;
        }
        Ok(Some(real))
    }

    fn mkdir(&mut self, path: &Path, rel: &Path) -> Result<(), OciError> {
        inert::create_dir(path, &inert::implied_dir())?;
        self.this_layer.insert(rel.to_owned());
        Ok(())
    }
}

fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>, digest: &str) -> Result<Meta, String> {
    let header = entry.header();
    let uid = header.uid().map_err(|e| format!("bad uid: {e}"))?;
    let gid = header.gid().map_err(|e| format!("bad gid: {e}"))?;
    let uid = u32::try_from(uid).map_err(|_| format!("uid {uid} out of range"))?;
    let gid = u32::try_from(gid).map_err(|_| format!("gid {gid} out of range"))?;
    let mode = header.mode().map_err(|e| format!("bad mode: {e}"))? & 0o7777;
    let header_mtime = header.mtime().map_err(|e| format!("bad mtime: {e}"))?;
    let mut mtime = (i64::try_from(header_mtime).map_err(|_| "mtime out of range".to_string())?, 0);
    let mut xattrs = Vec::new();
    if let Some(pax) = entry.pax_extensions().map_err(|e| format!("bad PAX header: {e}"))? {
        for record in pax {
            let record = record.map_err(|e| format!("bad PAX record: {e}"))?;
            let Ok(key) = record.key() else { continue };
            if key == "mtime" {
                if let Some(t) = record.value().ok().and_then(pax_time) {
                    mtime = t;
                }
            } else if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                if (name.starts_with("user.") && !name.starts_with("user.boxwood.")) || name == "security.capability" {
                    xattrs.push((name.to_owned(), record.value_bytes().to_vec()));
                } else {
                    tracing::debug!(layer = digest, xattr = name, "xattr not kept");
                }
            }
        }
    }
    let mut meta = Meta::new(Kind::File, mode, uid, gid, mtime);
    meta.xattrs = xattrs;
    Ok(meta)
}
