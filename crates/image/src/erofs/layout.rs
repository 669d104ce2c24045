//! Where everything goes: a nid for every inode (root first, right after the superblock, or
//! at the start of the metadata area when placed file data comes first), a layout per inode,
//! and data blocks after the metadata area.

use std::path::Path;

use super::format::{BLOCK, DIRENT_SIZE, INODE_SIZE, Layout, NID_ALIGN, SUPER_OFFSET, SUPER_SIZE, xattr_area_size};
use super::{Content, NodeId, NodeKind, Placed, Tree};
use crate::fsutil::open_nofollow;
use crate::sparse::data_extents;
use crate::{ImageError, ImageResult, io_err};

/// Chunks of a chunk-based file: at most this many (a 64 MiB block map).
pub(crate) const MAX_CHUNKS: u64 = 1 << 24;
/// The largest chunk: 4 KiB << 20 = 4 GiB.
const MAX_CHUNK_BITS: u8 = 20;

/// The plan for one inode.
#[derive(Debug, Default)]
pub(crate) struct NodePlan {
    pub(crate) reachable: bool,
    pub(crate) nid: u64,
    pub(crate) parent: NodeId,
    pub(crate) nlink: u32,
    pub(crate) layout: Option<Layout>,
    pub(crate) size: u64,
    pub(crate) xattr_size: u64,
    /// First data block (flat layouts).
    pub(crate) blkaddr: u32,
    pub(crate) blocks: u64,
    pub(crate) chunks: Option<Chunks>,
    /// Its data is already in the image (a [`super::Placed`] file).
    pub(crate) placed: bool,
    /// A directory's sorted entries (`.` and `..` included), split into blocks.
    pub(crate) dir: Vec<DirBlock>,
}

/// A chunk-based file's chunks.
#[derive(Debug)]
pub(crate) struct Chunks {
    /// Chunk size = 4 KiB << `bits`.
    pub(crate) bits: u8,
    /// Per chunk: its first block, or `None` for a hole.
    pub(crate) addrs: Vec<Option<u32>>,
}

impl Chunks {
    pub(crate) fn size(&self) -> u64 {
        BLOCK << self.bits
    }
}

/// One directory block's entries, sorted by name.
#[derive(Debug, Default)]
pub(crate) struct DirBlock {
    pub(crate) entries: Vec<(Vec<u8>, NodeId)>,
    pub(crate) used: u64,
}

/// The layout of a whole image.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) nodes: Vec<NodePlan>,
    /// Reachable nodes, breadth first from the root.
    pub(crate) order: Vec<NodeId>,
    /// The metadata area's first block (`meta_blkaddr`); nids count from there.
    pub(crate) meta_block: u64,
    /// The metadata area's size in bytes.
    pub(crate) meta_end: u64,
    pub(crate) blocks: u64,
    pub(crate) chunked: bool,
}

/// Lays out `tree` with its metadata from block `meta_block` on: 0 for a fresh image (the
/// superblock is then part of the metadata area), else the first block after the data a
/// [`super::Builder`] placed.
pub(crate) fn plan(tree: &Tree, out: &Path, meta_block: u64) -> ImageResult<Plan> {
    let invalid = |reason: String| ImageError::InvalidTree { path: out.to_owned(), reason };
    if !matches!(tree.nodes.first().map(|n| &n.kind), Some(NodeKind::Dir(_))) {
        return Err(invalid("the root is not a directory".into()));
    }
    let mut nodes: Vec<NodePlan> = tree.nodes.iter().map(|_| NodePlan::default()).collect();
    let mut order = vec![0];
    nodes[0].reachable = true;
    let mut next = 0;
    while next < order.len() {
        let id = order[next];
        next += 1;
        let NodeKind::Dir(children) = &tree.nodes[id].kind else { continue };
        for (name, child) in children {
            if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
                return Err(invalid(format!("bad entry name {:?}", String::from_utf8_lossy(name))));
            }
            let child = *child;
            if child >= tree.nodes.len() {
                return Err(invalid("entry points at no node".into()));
            }
            let is_dir = matches!(tree.nodes[child].kind, NodeKind::Dir(_));
            if is_dir {
                nodes[id].nlink += 1;
            }
            if nodes[child].reachable {
                if is_dir {
                    return Err(invalid("a directory is linked twice".into()));
                }
                nodes[child].nlink += 1;
                continue;
            }
            nodes[child].reachable = true;
            nodes[child].parent = id;
            nodes[child].nlink += if is_dir { 2 } else { 1 };
            order.push(child);
        }
    }
    nodes[0].nlink += 2;

    let mut chunked = false;
    for &id in &order {
        let node = &tree.nodes[id];
        let p = &mut nodes[id];
        p.xattr_size = xattr_area_size(&node.meta.xattrs);
        if node.meta.xattrs.iter().any(|(n, v)| super::format::xattr_index(n).is_none() || v.len() > 0xffff) {
            return Err(invalid("an xattr erofs cannot store (unknown prefix or value too large)".into()));
        }
        let mut holed = None;
        p.size = match &node.kind {
            NodeKind::Regular(Content::Bytes(b)) => b.len() as u64,
            NodeKind::Regular(Content::File(path)) => {
                let file = open_nofollow(path)?;
                let size = file.metadata().map_err(io_err(path))?.len();
                holed = with_holes(size, data_extents(&file, size).map_err(io_err(path))?);
                size
            }
            NodeKind::Regular(Content::Layer(image, inode)) => {
                holed = with_holes(inode.len(), image.data_extents(inode)?);
                inode.len()
            }
            NodeKind::Regular(Content::Placed(placed)) => {
                p.placed = true;
                match placed {
                    Placed::Flat { size, blkaddr } => {
                        p.blkaddr = *blkaddr;
                        *size
                    }
                    Placed::Chunked { size, bits, addrs } => {
                        p.chunks = Some(Chunks { bits: *bits, addrs: addrs.clone() });
                        *size
                    }
                }
            }
            NodeKind::Dir(children) => {
                let mut entries: Vec<(Vec<u8>, NodeId)> = children.clone();
                entries.push((b".".to_vec(), id));
                entries.push((b"..".to_vec(), if id == 0 { 0 } else { p.parent }));
                entries.sort();
                if entries.windows(2).any(|w| w[0].0 == w[1].0) {
                    return Err(invalid("duplicate entry name".into()));
                }
                p.dir = pack_dir(entries);
                let last = p.dir.last().map_or(0, |b| b.used);
                (p.dir.len() as u64 - 1) * BLOCK + last
            }
            NodeKind::Symlink(target) => target.len() as u64,
            _ => 0,
        };
        if let Some(extents) = holed {
            // A host file is at most 16 TiB, which 4 GiB chunks always fit.
            let chunks = chunks_for(p.size, &extents, MAX_CHUNKS);
            p.chunks = Some(chunks.ok_or_else(|| invalid("a file too large for a chunk index".into()))?);
        }
        p.layout = Some(if p.chunks.is_some() {
            chunked = true;
            Layout::ChunkBased
        } else if p.placed {
            p.blocks = p.size.div_ceil(BLOCK);
            Layout::FlatPlain
        } else if p.size > 0 && INODE_SIZE + p.xattr_size + p.size <= BLOCK {
            Layout::FlatInline
        } else {
            p.blocks = p.size.div_ceil(BLOCK);
            Layout::FlatPlain
        });
    }

    // the metadata area: inodes from just past the superblock (or from the area's start),
    // 32-byte aligned; an inline tail never crosses a block boundary
    let mut pos = if meta_block == 0 { (SUPER_OFFSET + SUPER_SIZE) as u64 } else { 0 };
    for &id in &order {
        let p = &mut nodes[id];
        pos = pos.next_multiple_of(NID_ALIGN);
        let head = INODE_SIZE + p.xattr_size;
        let extra = match (&p.layout, &p.chunks) {
            (Some(Layout::FlatInline), _) => {
                let tail_at = pos + head;
                if tail_at % BLOCK + p.size > BLOCK {
                    pos = pos.next_multiple_of(BLOCK);
                }
                p.size
            }
            (Some(Layout::ChunkBased), Some(c)) => 4 * c.addrs.len() as u64,
            _ => 0,
        };
        p.nid = pos / NID_ALIGN;
        pos += head + extra;
    }
    if nodes[0].nid > u64::from(u16::MAX) {
        return Err(invalid("root nid out of range".into()));
    }
    let meta_end = pos;

    let mut block = meta_block + meta_end.div_ceil(BLOCK);
    for &id in &order {
        let p = &mut nodes[id];
        if p.placed {
            continue;
        }
        if let Some(c) = &mut p.chunks {
            let size = c.size();
            for (i, addr) in c.addrs.iter_mut().enumerate() {
                if addr.is_some() {
                    let len = (p.size - i as u64 * size).min(size);
                    *addr = Some(block_addr(block, out)?);
                    block += len.div_ceil(BLOCK);
                }
            }
        } else if p.blocks > 0 {
            p.blkaddr = block_addr(block, out)?;
            block += p.blocks;
        }
    }
    block_addr(block, out)?;
    Ok(Plan { nodes, order, meta_block, meta_end, blocks: block, chunked })
}

/// A file's data extents if it has holes (so it is stored chunk-based), else `None`.
fn with_holes(size: u64, extents: Vec<(u64, u64)>) -> Option<Vec<(u64, u64)>> {
    (size > 0 && extents != [(0, size)]).then_some(extents)
}

pub(crate) fn block_addr(block: u64, out: &Path) -> ImageResult<u32> {
    u32::try_from(block)
        .ok()
        .filter(|&b| b != u32::MAX)
        .ok_or_else(|| ImageError::InvalidTree { path: out.to_owned(), reason: "image too large".into() })
}

/// Greedily fills 4 KiB blocks with sorted entries (12-byte dirents first, then names).
fn pack_dir(entries: Vec<(Vec<u8>, NodeId)>) -> Vec<DirBlock> {
    let mut blocks = vec![DirBlock::default()];
    for (name, id) in entries {
        let need = DIRENT_SIZE + name.len() as u64;
        let cur = blocks.last_mut().expect("one block");
        if cur.used + need > BLOCK {
            blocks.push(DirBlock::default());
        }
        let cur = blocks.last_mut().expect("one block");
        cur.used += need;
        cur.entries.push((name, id));
    }
    blocks
}

/// Picks the chunk size that costs the least: the block map (4 bytes a chunk) plus the
/// chunks that hold any data (stored in full), among those needing at most `max_chunks`
/// chunks (`None` if even the largest needs more). A 1 TiB file with a few KiB of data costs
/// ~4 MiB; a file with large data runs gets large chunks.
pub(crate) fn chunks_for(size: u64, extents: &[(u64, u64)], max_chunks: u64) -> Option<Chunks> {
    let allocated = |chunk: u64| {
        let (mut count, mut last) = (0u64, None);
        for &(start, end) in extents {
            let first = (start / chunk).max(last.map_or(0, |l: u64| l + 1));
            let end = end.div_ceil(chunk);
            if first < end {
                count += end - first;
                last = Some(end - 1);
            }
        }
        count
    };
    let bits = (0..=MAX_CHUNK_BITS)
        .filter(|&b| size.div_ceil(BLOCK << b) <= max_chunks.min(MAX_CHUNKS))
        .min_by_key(|&b| 4 * size.div_ceil(BLOCK << b) + allocated(BLOCK << b) * (BLOCK << b))?;
    let chunk = BLOCK << bits;
    let mut addrs = vec![None; size.div_ceil(chunk) as usize];
    for &(start, end) in extents {
        for c in start / chunk..end.div_ceil(chunk) {
            addrs[c as usize] = Some(0);
        }
    }
    Some(Chunks { bits, addrs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_indexes_stay_within_what_is_allowed() {
        let tib16 = 16u64 << 40;
        let one = [(1 << 40, (1 << 40) + 4096)];
        let free = chunks_for(tib16, &one, MAX_CHUNKS).unwrap();
        assert!(free.addrs.len() as u64 > 1 << 20, "the cheapest index is large: {}", free.addrs.len());
        let tight = chunks_for(tib16, &one, 10_000).unwrap();
        assert!(tight.addrs.len() <= 10_000 && tight.bits > free.bits, "larger chunks within the allowance");
        assert_eq!(tight.addrs.iter().flatten().count(), 1, "one chunk holds the data");
        assert!(chunks_for(tib16, &one, 4095).is_none(), "even 4 GiB chunks need 4096 entries");
    }
}
