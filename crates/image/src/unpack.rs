//! [`unpack_layer_from`]: turns a layer tar from the guest agent into an inert tree (see
//! [`crate::inert`]) holding a layer in overlayfs "upper" format, refusing any member that
//! would write outside the tree.
//!
//! The accepted format is POSIX PAX (ustar and GNU headers read too): relative member names
//! (a leading `./` is tolerated), directories, regular files, symlinks, hardlinks to an
//! earlier member, FIFOs and char devices 0/0 (overlayfs whiteouts); numeric uid/gid, the
//! 07777 mode bits, mtime, and xattrs as `SCHILY.xattr.<name>` PAX records. Files in the
//! PAX sparse format 1.0 (`GNU.sparse.major=1`, `minor=0`, `name`, `realsize`; the member
//! data is a decimal sparse map padded to a block, then the data segments) are written with
//! holes: the unpacker seeks over them, so the tree costs the data, not the apparent size.
//! A malformed map (segments out of order, overlapping, past `realsize`, or not adding up
//! to the member's size) is refused. [`UnpackLimits`] bounds the data the files hold.
//!
//! Hostile or unsupported input is handled by one rule:
//! * **refused** (an [`ImageError::BadLayer`] naming the member; the caller deletes the tree)
//!   — anything about *where* a member goes: an absolute name, a `..` component, a member
//!   whose parent is a symlink or a non-directory, a member that would replace a directory
//!   with a non-directory, a hardlink whose target is absolute, has `..`, goes through a
//!   symlink, is a directory or is not an earlier member; an unreadable header field.
//! * **skipped with a `tracing` warning** — members and xattrs the format has no room for:
//!   device nodes other than char 0/0 (so every block device), other/unknown member types,
//!   xattrs outside `user.`/`security.`/`trusted.`, overlayfs-private `trusted.overlay.*`
//!   xattrs other than `trusted.overlay.opaque=y`.
//!
//! The tree holds no host symlink (a symlink member becomes a file holding its target), and
//! each parent component is still checked to be a real directory (the tree is ours alone
//! while unpacking, so the check cannot go stale); files are created with `O_EXCL`. Owners,
//! modes, times and xattrs go into each entry's record, never onto the host file.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use tar::EntryType;

use crate::fsutil::{self, OPAQUE_XATTR, OVERLAY_XATTR_PREFIX};
use crate::inert::{self, Kind, Meta};
use crate::tarname::{member_path, pax_time};
use crate::{ImageError, ImageResult, io_err};

/// What [`unpack_layer`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Members materialised in the tree (skipped members not counted).
    pub entries: u64,
    /// Bytes written to regular files (a hardlink adds none; holes add none).
    pub content_bytes: u64,
    /// Apparent sizes of the regular files, holes included.
    pub apparent_bytes: u64,
}

/// Bounds on what one unpack may produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Largest sum of the data the regular files hold. Holes are free: the tree, the erofs
    /// image and merges all keep them, so a 1 TiB sparse file costs its data.
    pub max_data_bytes: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        Self { max_data_bytes: u64::MAX }
    }
}

/// Most segments a sparse map may list (the agent writes at most 4096).
const MAX_SPARSE_SEGMENTS: u64 = 1 << 16;

/// Unpacks the layer tar read from `reader` (the export as it arrives) into `tree`, which
/// must be an existing empty directory, within `limits` (past them it stops with
/// [`ImageError::LayerTooLarge`]). Streams: memory use does not grow with file sizes. Reads up
/// to the end of the archive, not necessarily to the end of `reader`. On error `tree` may
/// hold a partial unpack (the caller deletes it) but nothing outside it was touched.
pub fn unpack_layer_from(reader: impl Read, tree: &Path, limits: UnpackLimits) -> ImageResult<UnpackStats> {
    // Names the source in errors.
    let tar = Path::new("(the exported changes)");
    let root_meta = tree.symlink_metadata().map_err(io_err(tree))?;
    if !root_meta.is_dir() || std::fs::read_dir(tree).map_err(io_err(tree))?.next().is_some() {
        return Err(ImageError::InvalidTree { path: tree.to_owned(), reason: "not an empty directory".into() });
    }
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 16, reader));
    // The root's record, until the layer's own root member (if any) replaces it.
    inert::init_root(tree, &inert::implied_dir())?;
    let mut unpacker = Unpacker { tree, stats: UnpackStats::default(), limits };
    for entry in archive.entries().map_err(io_err(tar))? {
        let entry = entry.map_err(io_err(tar))?;
        unpacker.member(entry, tar)?;
    }
    Ok(unpacker.stats)
}

struct Unpacker<'a> {
    tree: &'a Path,
    stats: UnpackStats,
    limits: UnpackLimits,
}

impl Unpacker<'_> {
    fn member<R: io::Read>(&mut self, mut entry: tar::Entry<'_, R>, tar: &Path) -> ImageResult<()> {
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let bad = |reason: String| ImageError::BadLayer { member: name.clone(), reason };
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            tracing::debug!(member = %name, "ignoring PAX global header");
            return Ok(());
        }
        let sparse = sparse_info(&mut entry).map_err(bad)?;
        let rel = match &sparse {
            Some(s) => member_path(&s.name).map_err(bad)?,
            None => member_path(&entry.path_bytes()).map_err(bad)?,
        };
        let meta = read_meta(&mut entry).map_err(bad)?;
        let is_root = rel.as_os_str().is_empty();
        if is_root && !kind.is_dir() {
            return Err(bad("only a directory may name the root of the layer".into()));
        }
        let record = |kind: Kind| Meta { kind, ..meta.clone() };
        match kind {
            EntryType::Directory => {
                let path = if is_root { self.tree.to_owned() } else { self.slot(&rel, true).map_err(bad)? };
                if path.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                    inert::set(&path, &record(Kind::Dir))?;
                } else {
                    inert::create_dir(&path, &record(Kind::Dir))?;
                }
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let stored = entry.size();
                // Checked before anything is written: a member's data on the archive (for a
                // sparse one, its map and data segments) bounds what it writes.
                if self.stats.content_bytes.saturating_add(stored) > self.limits.max_data_bytes {
                    return Err(ImageError::LayerTooLarge { limit: self.limits.max_data_bytes });
                }
                let apparent = sparse.as_ref().map_or(stored, |s| s.real_size);
                self.stats.apparent_bytes = self.stats.apparent_bytes.saturating_add(apparent);
                let path = self.slot(&rel, false).map_err(bad)?;
                let mut file = inert::create_file(&path)?;
                self.stats.content_bytes += match &sparse {
                    Some(s) => write_sparse(&mut entry, &mut file, s.real_size).map_err(|e| match e {
                        SparseError::Io(e) => io_err(&path)(e),
                        SparseError::Bad(reason) => bad(reason),
                    })?,
                    None => io::copy(&mut entry, &mut file).map_err(io_err(tar))?,
                };
                drop(file);
                inert::set(&path, &record(Kind::File))?;
            }
            EntryType::Symlink => {
                let target = entry.link_name_bytes().ok_or_else(|| bad("symlink without a target".into()))?;
                if let Some(why) = inert::symlink_target_refusal(&target) {
                    return Err(bad(why.into()));
                }
                let path = self.slot(&rel, false).map_err(bad)?;
                inert::create_symlink(&path, &target, &record(Kind::Symlink))?;
            }
            EntryType::Link => {
                let target = entry.link_name_bytes().ok_or_else(|| bad("hardlink without a target".into()))?;
                let target = member_path(&target).map_err(|r| bad(format!("hardlink target: {r}")))?;
                if target == rel {
                    return Err(bad("hardlink to itself".into()));
                }
                let original = self.existing(&target).map_err(|r| bad(format!("hardlink target: {r}")))?;
                let path = self.slot(&rel, false).map_err(bad)?;
                fsutil::hard_link(&original, &path)?;
            }
            EntryType::Fifo => {
                let path = self.slot(&rel, false).map_err(bad)?;
                inert::create_node(&path, &record(Kind::Fifo))?;
            }
            EntryType::Char if device_numbers(&entry).map_err(bad)? == (0, 0) => {
                let path = self.slot(&rel, false).map_err(bad)?;
                inert::create_node(&path, &record(Kind::Char(0)))?;
            }
            EntryType::Char | EntryType::Block => {
                tracing::warn!(member = %name, "skipping device node: a layer holds only 0/0 whiteouts");
                return Ok(());
            }
            other => {
                tracing::warn!(member = %name, kind = ?other, "skipping member of a type layers do not hold");
                return Ok(());
            }
        }
        self.stats.entries += 1;
        Ok(())
    }

    /// Readies `tree/rel` for a new entry: parents are real directories (missing ones are
    /// created), and a non-directory already there is removed (a later duplicate member
    /// wins, as in tar). An existing directory stays when a directory is wanted.
    fn slot(&self, rel: &Path, want_dir: bool) -> Result<PathBuf, String> {
        let path = self.walk_parents(rel, true)?;
        match path.symlink_metadata() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(path),
            Err(e) => Err(format!("cannot inspect {}: {e}", shown(self.tree, &path))),
            Ok(m) if m.is_dir() && want_dir => Ok(path),
            Ok(m) if m.is_dir() => Err("would replace a directory with a non-directory".into()),
            Ok(_) => {
                std::fs::remove_file(&path).map_err(|e| format!("cannot replace {}: {e}", shown(self.tree, &path)))?;
                Ok(path)
            }
        }
    }

    /// An earlier non-directory member reached without following any symlink.
    fn existing(&self, rel: &Path) -> Result<PathBuf, String> {
        let path = self.walk_parents(rel, false)?;
        match path.symlink_metadata() {
            Ok(m) if m.is_dir() => Err("is a directory".into()),
            Ok(_) => Ok(path),
            Err(_) => Err(format!("{} is not an earlier member", rel.display())),
        }
    }

    /// `tree/rel` after checking that every parent component is a real directory.
    fn walk_parents(&self, rel: &Path, create: bool) -> Result<PathBuf, String> {
        let mut path = self.tree.to_owned();
        let mut components = rel.components().peekable();
        while let Some(component) = components.next() {
            path.push(component);
            if components.peek().is_none() {
                break;
            }
            match path.symlink_metadata() {
                Ok(m) if m.is_dir() => {}
                Ok(_) if inert::try_stat(&path).ok().flatten().is_some_and(|s| s.is_symlink()) => {
                    return Err(format!("parent {} is a symlink", shown(self.tree, &path)));
                }
                Ok(_) => return Err(format!("parent {} is not a directory", shown(self.tree, &path))),
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    inert::create_dir(&path, &inert::implied_dir())
                        .map_err(|_| format!("cannot create {}", shown(self.tree, &path)))?;
                }
                Err(_) => return Err(format!("parent {} does not exist", shown(self.tree, &path))),
            }
        }
        Ok(path)
    }
}

fn shown(tree: &Path, path: &Path) -> String {
    path.strip_prefix(tree).unwrap_or(path).display().to_string()
}

/// The PAX sparse 1.0 records of a member.
struct SparseInfo {
    name: Vec<u8>,
    real_size: u64,
}

fn sparse_info<R: io::Read>(entry: &mut tar::Entry<'_, R>) -> Result<Option<SparseInfo>, String> {
    let Some(pax) = entry.pax_extensions().map_err(|e| format!("bad PAX header: {e}"))? else {
        return Ok(None);
    };
    let (mut major, mut minor, mut name, mut real_size) = (None, None, None, None);
    for record in pax {
        let record = record.map_err(|e| format!("bad PAX record: {e}"))?;
        match record.key() {
            Ok("GNU.sparse.major") => major = Some(record.value_bytes().to_vec()),
            Ok("GNU.sparse.minor") => minor = Some(record.value_bytes().to_vec()),
            Ok("GNU.sparse.name") => name = Some(record.value_bytes().to_vec()),
            Ok("GNU.sparse.realsize") => {
                let v = record.value().map_err(|_| "non-UTF-8 GNU.sparse.realsize".to_string())?;
                real_size = Some(v.parse::<u64>().map_err(|_| format!("bad GNU.sparse.realsize {v:?}"))?);
            }
            _ => {}
        }
    }
    match (major.as_deref(), minor.as_deref(), name, real_size) {
        (None, None, None, None) => Ok(None),
        (Some(b"1"), Some(b"0"), Some(name), Some(real_size)) => Ok(Some(SparseInfo { name, real_size })),
        _ => Err("unsupported or incomplete GNU sparse records (only format 1.0 is read)".into()),
    }
}

enum SparseError {
    Io(io::Error),
    Bad(String),
}

/// Reads one decimal line of the sparse map, counting the bytes consumed.
fn map_number(src: &mut impl Read, used: &mut u64) -> Result<u64, SparseError> {
    let mut digits = Vec::new();
    loop {
        let mut b = [0u8; 1];
        src.read_exact(&mut b).map_err(|_| SparseError::Bad("truncated sparse map".into()))?;
        *used += 1;
        match b[0] {
            b'\n' => break,
            d @ b'0'..=b'9' if digits.len() < 20 => digits.push(d),
            _ => return Err(SparseError::Bad("malformed sparse map".into())),
        }
    }
    std::str::from_utf8(&digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| SparseError::Bad("malformed sparse map number".into()))
}

/// Writes a sparse 1.0 member's data into `file`, seeking over the holes; returns the data
/// bytes written.
fn write_sparse(entry: &mut impl Read, file: &mut File, real_size: u64) -> Result<u64, SparseError> {
    let mut used = 0u64;
    let count = map_number(entry, &mut used)?;
    if count > MAX_SPARSE_SEGMENTS {
        return Err(SparseError::Bad(format!("sparse map lists {count} segments (at most {MAX_SPARSE_SEGMENTS})")));
    }
    let mut segments = Vec::new();
    let mut end = 0u64;
    for _ in 0..count {
        let offset = map_number(entry, &mut used)?;
        let len = map_number(entry, &mut used)?;
        let seg_end = offset.checked_add(len).filter(|&e| e <= real_size);
        match seg_end {
            Some(e) if offset >= end => end = e,
            _ => return Err(SparseError::Bad("sparse map segments overlap, are out of order or pass the size".into())),
        }
        segments.push((offset, len));
    }
    let pad = (512 - used % 512) % 512;
    io::copy(&mut entry.take(pad), &mut io::sink()).map_err(SparseError::Io)?;
    let mut written = 0u64;
    for (offset, len) in segments {
        file.seek(SeekFrom::Start(offset)).map_err(SparseError::Io)?;
        let n = io::copy(&mut entry.take(len), file).map_err(SparseError::Io)?;
        if n != len {
            return Err(SparseError::Bad("sparse member shorter than its map".into()));
        }
        written += n;
    }
    let mut rest = [0u8; 1];
    if entry.read(&mut rest).map_err(SparseError::Io)? != 0 {
        return Err(SparseError::Bad("sparse member longer than its map".into()));
    }
    file.set_len(real_size).map_err(SparseError::Io)?;
    file.flush().map_err(SparseError::Io)?;
    Ok(written)
}

fn device_numbers<R: io::Read>(entry: &tar::Entry<'_, R>) -> Result<(u32, u32), String> {
    let header = entry.header();
    let major = header.device_major().map_err(|e| format!("bad device major: {e}"))?.unwrap_or(0);
    let minor = header.device_minor().map_err(|e| format!("bad device minor: {e}"))?.unwrap_or(0);
    Ok((major, minor))
}

fn read_meta<R: io::Read>(entry: &mut tar::Entry<'_, R>) -> Result<Meta, String> {
    let header = entry.header();
    // PAX uid/gid records are already folded into the header by the tar crate.
    let uid = header.uid().map_err(|e| format!("bad uid: {e}"))?;
    let gid = header.gid().map_err(|e| format!("bad gid: {e}"))?;
    let uid = u32::try_from(uid).map_err(|_| format!("uid {uid} out of range"))?;
    let gid = u32::try_from(gid).map_err(|_| format!("gid {gid} out of range"))?;
    let mode = header.mode().map_err(|e| format!("bad mode: {e}"))? & 0o7777;
    let header_mtime = header.mtime().map_err(|e| format!("bad mtime: {e}"))?;
    let mut mtime = (i64::try_from(header_mtime).map_err(|_| "mtime out of range".to_string())?, 0);
    let mut xattrs = Vec::new();
    let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
    if let Some(pax) = entry.pax_extensions().map_err(|e| format!("bad PAX header: {e}"))? {
        for record in pax {
            let record = record.map_err(|e| format!("bad PAX record: {e}"))?;
            let Ok(key) = record.key() else { continue };
            if key == "mtime" {
                let value = record.value().map_err(|_| "non-UTF-8 PAX mtime".to_string())?;
                mtime = pax_time(value).ok_or_else(|| format!("bad PAX mtime {value:?}"))?;
            } else if let Some(xattr) = key.strip_prefix("SCHILY.xattr.") {
                let value = record.value_bytes();
                match xattr_refusal(xattr, value) {
                    None => xattrs.push((xattr.to_owned(), value.to_vec())),
                    Some(why) => tracing::warn!(member = %name, xattr, "skipping xattr: {why}"),
                }
            }
        }
    }
    let mut meta = Meta::new(Kind::File, mode, uid, gid, mtime);
    meta.xattrs = xattrs;
    Ok(meta)
}

/// Why an xattr from the archive is not written, if it is not.
fn xattr_refusal(name: &str, value: &[u8]) -> Option<&'static str> {
    if name == OPAQUE_XATTR {
        return (value != b"y").then_some("opaque marker other than \"y\"");
    }
    if name.starts_with(OVERLAY_XATTR_PREFIX) {
        return Some("overlayfs-private xattr");
    }
    if name.starts_with("user.boxwood.") {
        return Some("reserved for the server's own records");
    }
    if ["user.", "security.", "trusted."].iter().any(|ns| name.starts_with(ns)) {
        return None;
    }
    Some("namespace not kept in layers")
}
