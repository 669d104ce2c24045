//! [`unpack_layer_from`]: turns a layer tar from the guest agent into an erofs image holding
//! a layer in overlayfs "upper" format, written as the tar arrives (see
//! [`crate::erofs::Builder`]): file data goes straight into the image, the tree is built in
//! memory, so nothing of the guest's is ever a host file or directory.
//!
//! The accepted format is POSIX PAX (ustar and GNU headers read too): relative member names
//! (a leading `./` is tolerated), directories, regular files, symlinks, hardlinks to an
//! earlier member, FIFOs and char devices 0/0 (overlayfs whiteouts); numeric uid/gid, the
//! 07777 mode bits, mtime, and xattrs as `SCHILY.xattr.<name>` PAX records. Files in the
//! PAX sparse format 1.0 (`GNU.sparse.major=1`, `minor=0`, `name`, `realsize`; the member
//! data is a decimal sparse map padded to a block, then the data segments) keep their holes:
//! the image stores only the chunks that hold data. A malformed map (segments out of order,
//! overlapping, past `realsize`, or not adding up to the member's size) is refused.
//! [`UnpackLimits`] bounds the data the files hold.
//!
//! A member carrying `boxwood_protocol::DISK_EXTENTS_RECORD` is disk-referenced: its data is
//! an extent map (count, then offset in the file, offset on the disk and length per extent)
//! and the file's bytes are copied from the run's [`ScratchDisk`]. The map is checked like a
//! sparse map, and every extent must lie within the disk; without a disk such a member is
//! refused. The guest chooses the offsets, so it can only name bytes of its own disk.
//!
//! Hostile or unsupported input is handled by one rule:
//! * **refused** (an [`ImageError::BadLayer`] naming the member; the caller deletes the image)
//!   — anything about *where* a member goes: an absolute name, a `..` component, a member
//!   whose parent is a symlink or a non-directory, a member that would replace a directory
//!   with a non-directory, a hardlink whose target is absolute, has `..`, goes through a
//!   symlink, is a directory or is not an earlier member; an unreadable header field.
//! * **skipped with a `tracing` warning** — members and xattrs the format has no room for:
//!   device nodes other than char 0/0 (so every block device), other/unknown member types,
//!   xattrs outside `user.`/`security.`/`trusted.`, overlayfs-private `trusted.overlay.*`
//!   xattrs other than `trusted.overlay.opaque=y`.
//!
//! A later member of the same name replaces an earlier non-directory (as in tar); missing
//! parents are created as plain 0755 root-owned directories.

use std::collections::BTreeMap;
use std::io::{self, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use boxwood_protocol::DISK_EXTENTS_RECORD;
use tar::EntryType;

use crate::erofs::BLOCK;
use crate::erofs::{Builder, Node, NodeId, NodeKind, NodeMeta, Tree};
use crate::fsutil::{OPAQUE_XATTR, OVERLAY_XATTR_PREFIX};
use crate::inert::{self, Kind, Meta};
use crate::tarname::{member_path, pax_time};
use crate::{ImageError, ImageResult};

/// What [`unpack_layer_from`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Members in the layer (skipped members not counted).
    pub entries: u64,
    /// Bytes of regular files' data (a hardlink adds none; holes add none).
    pub content_bytes: u64,
    /// Apparent sizes of the regular files, holes included.
    pub apparent_bytes: u64,
}

/// Bounds on what one unpack may produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Largest sum of the data the regular files hold. Holes are free: the erofs image and
    /// merges keep them, so a 1 TiB sparse file costs its data.
    pub max_data_bytes: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        Self { max_data_bytes: u64::MAX }
    }
}

/// Most segments a sparse map (or extents an extent map) may list (the agent writes at most
/// 4096).
const MAX_SPARSE_SEGMENTS: u64 = 1 << 16;

/// The largest file a layer holds: ext4's with 4 KiB blocks (the scratch disk's filesystem),
/// and more than the largest scratch disk.
const MAX_FILE_BYTES: u64 = 16 << 40;

/// The run's scratch disk, which disk-referenced members are copied from (see the module
/// docs).
pub struct ScratchDisk {
    pub file: std::fs::File,
    /// Called with the total bytes to be copied from the disk so far, before they are;
    /// `Err(reason)` ends the unpack with [`ImageError::Refused`].
    pub admit: Box<dyn FnMut(u64) -> Result<(), String> + Send>,
}

/// A disk and what it holds, as the unpack uses it.
struct Disk {
    disk: ScratchDisk,
    len: u64,
    copied: u64,
}

/// Unpacks the layer tar read from `reader` (the export as it arrives) into the new erofs
/// image `image`, within `limits` (past them it stops with [`ImageError::LayerTooLarge`]);
/// disk-referenced members are copied from `disk`. Streams: memory holds the tree's metadata
/// and small files, not file data. Reads up to the end of the archive, not necessarily to the
/// end of `reader`. The image is complete but not synced; on error it may be partial (the
/// caller deletes it).
pub fn unpack_layer_from(
    reader: impl Read,
    image: &Path,
    limits: UnpackLimits,
    disk: Option<ScratchDisk>,
) -> ImageResult<UnpackStats> {
    // Names the source in errors.
    let tar = Path::new("(the exported changes)");
    let disk = match disk {
        Some(disk) => {
            let len = disk.file.metadata().map_err(crate::io_err(Path::new(DISK_NAME)))?.len();
            Some(Disk { disk, len, copied: 0 })
        }
        None => None,
    };
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 16, reader));
    let mut unpacker = Unpacker {
        builder: Builder::create(image)?,
        // The root's metadata, until the layer's own root member (if any) replaces it.
        tree: MemTree::new(node_meta(&inert::implied_dir())),
        stats: UnpackStats::default(),
        limits,
        disk,
        charged: 0,
    };
    for entry in archive.entries().map_err(crate::io_err(tar))? {
        let entry = entry.map_err(crate::io_err(tar))?;
        unpacker.member(entry, tar)?;
    }
    let Unpacker { builder, tree, stats, .. } = unpacker;
    builder.finish(&tree.into_tree())?;
    Ok(stats)
}

/// The layer's tree while it is unpacked: every directory's entries by name.
struct MemTree {
    nodes: Vec<Node>,
    /// Per node: its entries, for a directory.
    names: Vec<Option<BTreeMap<Vec<u8>, NodeId>>>,
}

impl MemTree {
    fn new(root: NodeMeta) -> Self {
        Self { nodes: vec![Node { kind: NodeKind::Dir(Vec::new()), meta: root }], names: vec![Some(BTreeMap::new())] }
    }

    fn get(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        self.names[dir].as_ref()?.get(name).copied()
    }

    fn is_dir(&self, id: NodeId) -> bool {
        self.names[id].is_some()
    }

    /// Binds `name` in `dir` to a new node.
    fn add(&mut self, dir: NodeId, name: Vec<u8>, node: Node) -> NodeId {
        let id = self.nodes.len();
        let names = matches!(node.kind, NodeKind::Dir(_)).then(BTreeMap::new);
        self.nodes.push(node);
        self.names.push(names);
        self.bind(dir, name, id);
        id
    }

    fn bind(&mut self, dir: NodeId, name: Vec<u8>, id: NodeId) {
        if let Some(names) = self.names[dir].as_mut() {
            names.insert(name, id);
        }
    }

    fn unbind(&mut self, dir: NodeId, name: &[u8]) {
        if let Some(names) = self.names[dir].as_mut() {
            names.remove(name);
        }
    }

    /// The tree to write: nodes no name reaches any more (replaced ones) are left out by the
    /// writer.
    fn into_tree(self) -> Tree {
        let mut nodes = self.nodes;
        for (node, names) in nodes.iter_mut().zip(self.names) {
            if let Some(names) = names {
                node.kind = NodeKind::Dir(names.into_iter().collect());
            }
        }
        Tree { nodes }
    }
}

/// Names the scratch disk in errors.
const DISK_NAME: &str = "(the run's scratch disk)";

struct Unpacker {
    builder: Builder,
    tree: MemTree,
    stats: UnpackStats,
    limits: UnpackLimits,
    disk: Option<Disk>,
    /// What the files cost the host so far, checked against `limits`: a plain file's bytes,
    /// a sparse or disk-referenced file's data in the whole blocks it touches (a byte every
    /// 4 KiB would otherwise cost 4096 times what it is charged).
    charged: u64,
}

/// Bytes of the whole blocks `ranges` (start, end) touch.
fn block_cost(ranges: impl Iterator<Item = (u64, u64)>) -> u64 {
    ranges.map(|(start, end)| (end.div_ceil(BLOCK) - start / BLOCK) * BLOCK).fold(0, u64::saturating_add)
}

/// Gives a refusal from the image writer, which does not know names, the member's.
fn named(e: ImageError, member: &str) -> ImageError {
    match e {
        ImageError::BadLayer { member: m, reason } if m.is_empty() => {
            ImageError::BadLayer { member: member.to_owned(), reason }
        }
        other => other,
    }
}

impl Unpacker {
    /// Charges `bytes` of the layer's limit, or refuses them.
    fn charge(&mut self, bytes: u64) -> ImageResult<()> {
        if self.charged.saturating_add(bytes) > self.limits.max_data_bytes {
            return Err(ImageError::LayerTooLarge { limit: self.limits.max_data_bytes });
        }
        self.charged += bytes;
        Ok(())
    }

    fn member<R: io::Read>(&mut self, mut entry: tar::Entry<'_, R>, tar: &Path) -> ImageResult<()> {
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let bad = |reason: String| ImageError::BadLayer { member: name.clone(), reason };
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            tracing::debug!(member = %name, "ignoring PAX global header");
            return Ok(());
        }
        let Records { sparse, on_disk } = records(&mut entry).map_err(bad)?;
        let rel = match &sparse {
            Some(s) => member_path(&s.name).map_err(bad)?,
            None => member_path(&entry.path_bytes()).map_err(bad)?,
        };
        let meta = node_meta(&read_meta(&mut entry).map_err(bad)?);
        let is_root = rel.as_os_str().is_empty();
        if is_root && !kind.is_dir() {
            return Err(bad("only a directory may name the root of the layer".into()));
        }
        let node = |kind: NodeKind| Node { kind, meta: meta.clone() };
        match kind {
            EntryType::Directory if is_root => self.tree.nodes[0].meta = meta,
            EntryType::Directory => match self.slot(&rel, true).map_err(bad)? {
                (_, _, Some(dir)) => self.tree.nodes[dir].meta = meta,
                (parent, name, None) => {
                    self.tree.add(parent, name, node(NodeKind::Dir(Vec::new())));
                }
            },
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let stored = entry.size();
                // Checked before anything is written: a member's data on the archive (for a
                // sparse one, its map and data segments) bounds what it writes; a
                // disk-referenced one is charged what it copies.
                if on_disk.is_none() {
                    self.charge(stored)?;
                }
                let apparent = sparse.as_ref().map(|s| s.real_size).or(on_disk).unwrap_or(stored);
                self.stats.apparent_bytes = self.stats.apparent_bytes.saturating_add(apparent);
                let (parent, leaf, _) = self.slot(&rel, false).map_err(bad)?;
                let (content, data) = match (&sparse, on_disk) {
                    (Some(_), Some(_)) => return Err(bad("both sparse and disk-referenced".into())),
                    (None, Some(size)) => {
                        let Some(disk) = self.disk.as_mut() else {
                            return Err(bad("refers to a scratch disk the run did not have".into()));
                        };
                        let extents =
                            read_extent_map(&mut entry, stored, size, disk.len).map_err(|e| e.into_image(tar, &bad))?;
                        let data = extents.iter().map(|e| e.2).sum::<u64>();
                        let cost = block_cost(extents.iter().map(|&(o, _, l)| (o, o + l)));
                        let over = self.charged.saturating_add(cost) > self.limits.max_data_bytes;
                        if over {
                            return Err(ImageError::LayerTooLarge { limit: self.limits.max_data_bytes });
                        }
                        self.charged += cost;
                        disk.copied += cost;
                        (disk.disk.admit)(disk.copied).map_err(|reason| ImageError::Refused { reason })?;
                        let file = &disk.disk.file;
                        let t0 = std::time::Instant::now();
                        let placed = self
                            .builder
                            .place_from_disk(file, size, &extents, Path::new(DISK_NAME))
                            .map_err(|e| named(e, &name))?;
                        tracing::debug!(
                            extents = extents.len(),
                            data,
                            ms = t0.elapsed().as_secs_f64() * 1e3,
                            "copied from the scratch disk"
                        );
                        (placed, data)
                    }
                    (Some(s), None) => {
                        let segments =
                            read_sparse_map(&mut entry, stored, s.real_size).map_err(|e| e.into_image(tar, &bad))?;
                        let data = segments.iter().map(|s| s.1).sum::<u64>();
                        // The stream paid for the data; its blocks may cost more.
                        let cost = block_cost(segments.iter().map(|&(o, l)| (o, o + l)));
                        self.charge(cost.saturating_sub(data))?;
                        let placed = self.builder.place_sparse(&mut entry, s.real_size, &segments, tar);
                        (placed.map_err(|e| named(e, &name))?, data)
                    }
                    (None, None) => (self.builder.place(&mut entry, stored, tar)?, stored),
                };
                self.stats.content_bytes += data;
                self.tree.add(parent, leaf, node(NodeKind::Regular(content)));
            }
            EntryType::Symlink => {
                let target = entry.link_name_bytes().ok_or_else(|| bad("symlink without a target".into()))?;
                if let Some(why) = inert::symlink_target_refusal(&target) {
                    return Err(bad(why.into()));
                }
                let (parent, name, _) = self.slot(&rel, false).map_err(bad)?;
                self.tree.add(parent, name, node(NodeKind::Symlink(target.into_owned())));
            }
            EntryType::Link => {
                let target = entry.link_name_bytes().ok_or_else(|| bad("hardlink without a target".into()))?;
                let target = member_path(&target).map_err(|r| bad(format!("hardlink target: {r}")))?;
                if target == rel {
                    return Err(bad("hardlink to itself".into()));
                }
                let original = self.existing(&target).map_err(|r| bad(format!("hardlink target: {r}")))?;
                let (parent, name, _) = self.slot(&rel, false).map_err(bad)?;
                self.tree.bind(parent, name, original);
            }
            EntryType::Fifo => {
                let (parent, name, _) = self.slot(&rel, false).map_err(bad)?;
                self.tree.add(parent, name, node(NodeKind::Fifo));
            }
            EntryType::Char if device_numbers(&entry).map_err(bad)? == (0, 0) => {
                let (parent, name, _) = self.slot(&rel, false).map_err(bad)?;
                self.tree.add(parent, name, node(NodeKind::Char(0)));
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

    /// Readies `rel` for a new entry: its parent directory (missing ones are created) and
    /// its name, and the directory already there when a directory is wanted. A non-directory
    /// already there is unbound (a later duplicate member wins, as in tar).
    fn slot(&mut self, rel: &Path, want_dir: bool) -> Result<(NodeId, Vec<u8>, Option<NodeId>), String> {
        let (parent, name) = self.walk_parents(rel, true)?;
        match self.tree.get(parent, &name) {
            None => Ok((parent, name, None)),
            Some(id) if self.tree.is_dir(id) && want_dir => Ok((parent, name, Some(id))),
            Some(_) if want_dir => {
                self.tree.unbind(parent, &name);
                Ok((parent, name, None))
            }
            Some(id) if self.tree.is_dir(id) => Err("would replace a directory with a non-directory".into()),
            Some(_) => {
                self.tree.unbind(parent, &name);
                Ok((parent, name, None))
            }
        }
    }

    /// An earlier non-directory member reached without following any symlink.
    fn existing(&mut self, rel: &Path) -> Result<NodeId, String> {
        let (parent, name) = self.walk_parents(rel, false)?;
        match self.tree.get(parent, &name) {
            Some(id) if self.tree.is_dir(id) => Err("is a directory".into()),
            Some(id) => Ok(id),
            None => Err(format!("{} is not an earlier member", rel.display())),
        }
    }

    /// The directory holding `rel` and `rel`'s last name, after checking that every parent
    /// component is a real directory.
    fn walk_parents(&mut self, rel: &Path, create: bool) -> Result<(NodeId, Vec<u8>), String> {
        let names: Vec<&[u8]> = rel
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.as_bytes()),
                _ => None,
            })
            .collect();
        let Some((last, parents)) = names.split_last() else {
            return Err("names the layer's root".into());
        };
        let mut dir = 0;
        for (i, name) in parents.iter().enumerate() {
            let shown = || String::from_utf8_lossy(&names[..=i].join(&b'/')).into_owned();
            dir = match self.tree.get(dir, name) {
                Some(id) if self.tree.is_dir(id) => id,
                Some(id) if matches!(self.tree.nodes[id].kind, NodeKind::Symlink(_)) => {
                    return Err(format!("parent {} is a symlink", shown()));
                }
                Some(_) => return Err(format!("parent {} is not a directory", shown())),
                None if create => {
                    self.tree.add(dir, name.to_vec(), Node { kind: NodeKind::Dir(Vec::new()), meta: implied_dir() })
                }
                None => return Err(format!("parent {} does not exist", shown())),
            };
        }
        Ok((dir, last.to_vec()))
    }
}

fn implied_dir() -> NodeMeta {
    node_meta(&inert::implied_dir())
}

fn node_meta(meta: &Meta) -> NodeMeta {
    crate::erofs::source::node_meta(meta)
}

/// The PAX sparse 1.0 records of a member.
struct SparseInfo {
    name: Vec<u8>,
    real_size: u64,
}

/// What a member's PAX records say about its data.
struct Records {
    sparse: Option<SparseInfo>,
    /// A disk-referenced member's apparent size.
    on_disk: Option<u64>,
}

fn records<R: io::Read>(entry: &mut tar::Entry<'_, R>) -> Result<Records, String> {
    let Some(pax) = entry.pax_extensions().map_err(|e| format!("bad PAX header: {e}"))? else {
        return Ok(Records { sparse: None, on_disk: None });
    };
    let (mut major, mut minor, mut name, mut real_size, mut on_disk) = (None, None, None, None, None);
    // A size is a guest's claim: past what any filesystem here holds it is refused, before
    // anything (a chunk index) is sized from it.
    let number = |record: &tar::PaxExtension<'_>, key: &str| -> Result<u64, String> {
        let v = record.value().map_err(|_| format!("non-UTF-8 {key}"))?;
        let n = v.parse::<u64>().map_err(|_| format!("bad {key} {v:?}"))?;
        if n > MAX_FILE_BYTES {
            return Err(format!("{key} {n} is past the largest file a layer holds ({MAX_FILE_BYTES} bytes)"));
        }
        Ok(n)
    };
    for record in pax {
        let record = record.map_err(|e| format!("bad PAX record: {e}"))?;
        match record.key() {
            Ok("GNU.sparse.major") => major = Some(record.value_bytes().to_vec()),
            Ok("GNU.sparse.minor") => minor = Some(record.value_bytes().to_vec()),
            Ok("GNU.sparse.name") => name = Some(record.value_bytes().to_vec()),
            Ok("GNU.sparse.realsize") => real_size = Some(number(&record, "GNU.sparse.realsize")?),
            Ok(DISK_EXTENTS_RECORD) => on_disk = Some(number(&record, DISK_EXTENTS_RECORD)?),
            _ => {}
        }
    }
    let sparse = match (major.as_deref(), minor.as_deref(), name, real_size) {
        (None, None, None, None) => None,
        (Some(b"1"), Some(b"0"), Some(name), Some(real_size)) => Some(SparseInfo { name, real_size }),
        _ => return Err("unsupported or incomplete GNU sparse records (only format 1.0 is read)".into()),
    };
    Ok(Records { sparse, on_disk })
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

/// Reads a sparse 1.0 member's map (and its padding) from the start of `entry`, whose
/// stored size is `stored`: the data segments (offset, length), checked to be in order,
/// apart, within `real_size`, and to add up with the map to the member.
fn read_sparse_map(entry: &mut impl Read, stored: u64, real_size: u64) -> Result<Vec<(u64, u64)>, SparseError> {
    let mut used = 0u64;
    let count = map_number(entry, &mut used)?;
    if count > MAX_SPARSE_SEGMENTS {
        return Err(SparseError::Bad(format!("sparse map lists {count} segments (at most {MAX_SPARSE_SEGMENTS})")));
    }
    let mut segments = Vec::new();
    let (mut end, mut data) = (0u64, 0u64);
    for _ in 0..count {
        let offset = map_number(entry, &mut used)?;
        let len = map_number(entry, &mut used)?;
        let seg_end = offset.checked_add(len).filter(|&e| e <= real_size);
        match seg_end {
            Some(e) if offset >= end => end = e,
            _ => return Err(SparseError::Bad("sparse map segments overlap, are out of order or pass the size".into())),
        }
        data += len;
        segments.push((offset, len));
    }
    let pad = (512 - used % 512) % 512;
    match (used + pad + data).cmp(&stored) {
        std::cmp::Ordering::Greater => return Err(SparseError::Bad("sparse member shorter than its map".into())),
        std::cmp::Ordering::Less => return Err(SparseError::Bad("sparse member longer than its map".into())),
        std::cmp::Ordering::Equal => {}
    }
    io::copy(&mut entry.take(pad), &mut io::sink()).map_err(SparseError::Io)?;
    Ok(segments)
}

/// Reads a disk-referenced member's extent map (and its padding), the whole of `entry`
/// (`stored` bytes): the extents (offset in the file, offset on the disk, length), checked
/// to be in order, apart, not empty, within `size` and within the disk's `disk_len`.
fn read_extent_map(
    entry: &mut impl Read,
    stored: u64,
    size: u64,
    disk_len: u64,
) -> Result<Vec<(u64, u64, u64)>, SparseError> {
    let mut used = 0u64;
    let count = map_number(entry, &mut used)?;
    if count > MAX_SPARSE_SEGMENTS {
        return Err(SparseError::Bad(format!("extent map lists {count} extents (at most {MAX_SPARSE_SEGMENTS})")));
    }
    let mut extents = Vec::new();
    let mut end = 0u64;
    for _ in 0..count {
        let offset = map_number(entry, &mut used)?;
        let on_disk = map_number(entry, &mut used)?;
        let len = map_number(entry, &mut used)?;
        let in_file = offset.checked_add(len).filter(|&e| e <= size && offset >= end && len > 0);
        let in_disk = on_disk.checked_add(len).is_some_and(|e| e <= disk_len);
        match in_file {
            Some(e) if in_disk => end = e,
            Some(_) => return Err(SparseError::Bad("an extent lies outside the scratch disk".into())),
            None => return Err(SparseError::Bad("extents overlap, are out of order, empty or pass the size".into())),
        }
        extents.push((offset, on_disk, len));
    }
    if used.next_multiple_of(512) != stored {
        return Err(SparseError::Bad("extent map does not fill its member".into()));
    }
    io::copy(&mut entry.take(stored - used), &mut io::sink()).map_err(SparseError::Io)?;
    Ok(extents)
}

impl SparseError {
    fn into_image(self, tar: &Path, bad: &impl Fn(String) -> ImageError) -> ImageError {
        match self {
            SparseError::Io(e) => crate::io_err(tar)(e),
            SparseError::Bad(reason) => bad(reason),
        }
    }
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
