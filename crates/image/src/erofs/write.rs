//! Writes a planned image: the metadata area (superblock, inodes, inline xattrs, inline data,
//! chunk maps) in one piece, then every data block; padding and null chunks stay holes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::format::{
    BLOCK, DIRENT_SIZE, FileType, INCOMPAT_CHUNKED_FILE, INODE_SIZE, Inode, Layout, NID_ALIGN, NULL_ADDR, SUPER_OFFSET,
    Super, encode_dirent, encode_rdev, encode_xattrs, put32, xattr_icount,
};
use super::layout::{NodePlan, Plan, plan};
use super::{Content, NodeKind, Tree};
use crate::fsutil::open_nofollow;
use crate::sparse::copy_range;
use crate::{ImageError, ImageResult, io_err};

/// Writes `tree` as an erofs image to the new file `out` (fsynced). The image is a function
/// of the tree alone (its UUID is derived from the metadata), so equal trees give equal
/// images.
pub fn write_image(tree: &Tree, out: &Path) -> ImageResult<()> {
    let plan = plan(tree, out, 0)?;
    let file = crate::fsutil::create_file(out)?;
    write_planned(tree, &plan, &file, out)?;
    file.sync_all().map_err(io_err(out))
}

/// Writes `tree`'s metadata and remaining data into `file` (the image `out`), whose first
/// `placed_blocks` blocks hold the data a [`super::Builder`] placed; not synced.
pub(crate) fn write_after(tree: &Tree, file: &File, out: &Path, placed_blocks: u64) -> ImageResult<()> {
    let plan = plan(tree, out, placed_blocks)?;
    write_planned(tree, &plan, file, out)
}

fn write_planned(tree: &Tree, plan: &Plan, file: &File, out: &Path) -> ImageResult<()> {
    let mut meta = vec![0u8; plan.meta_end as usize];
    for &id in &plan.order {
        encode_node(tree, plan, id, &mut meta)?;
    }
    let mut sb = Super {
        root_nid: plan.nodes[0].nid as u16,
        inos: plan.order.len() as u64,
        blocks: plan.blocks as u32,
        meta_blkaddr: plan.meta_block as u32,
        feature_incompat: if plan.chunked { INCOMPAT_CHUNKED_FILE } else { 0 },
        uuid: [0; 16],
    };
    sb.uuid.copy_from_slice(&Sha256::digest(&meta)[..16]);
    let sb = sb.encode();
    if plan.meta_block == 0 {
        meta[SUPER_OFFSET..SUPER_OFFSET + sb.len()].copy_from_slice(&sb);
    } else {
        file.write_all_at(&sb, SUPER_OFFSET as u64).map_err(io_err(out))?;
    }
    file.write_all_at(&meta, plan.meta_block * BLOCK).map_err(io_err(out))?;
    for &id in &plan.order {
        write_data(tree, &plan.nodes[id], plan, id, file).map_err(|e| match e {
            WriteError::Io(e) => io_err(out)(e),
            WriteError::Image(e) => e,
        })?;
    }
    file.set_len(plan.blocks * BLOCK).map_err(io_err(out))
}

fn encode_node(tree: &Tree, plan: &Plan, id: usize, meta: &mut [u8]) -> ImageResult<()> {
    let node = &tree.nodes[id];
    let p = &plan.nodes[id];
    let layout = p.layout.unwrap_or(Layout::FlatPlain);
    let (ft, u) = match &node.kind {
        NodeKind::Regular(_) => (FileType::Regular, 0),
        NodeKind::Dir(_) => (FileType::Dir, 0),
        NodeKind::Symlink(_) => (FileType::Symlink, 0),
        NodeKind::Char(rdev) => (FileType::Char, encode_rdev(*rdev)),
        NodeKind::Block(rdev) => (FileType::Block, encode_rdev(*rdev)),
        NodeKind::Fifo => (FileType::Fifo, 0),
        NodeKind::Socket => (FileType::Socket, 0),
    };
    let u = match (&p.chunks, layout) {
        (Some(c), Layout::ChunkBased) => u32::from(c.bits),
        (_, Layout::FlatPlain) if p.blocks > 0 => p.blkaddr,
        _ => u,
    };
    let at = (p.nid * NID_ALIGN) as usize;
    let inode = Inode {
        layout,
        xattr_icount: xattr_icount(p.xattr_size),
        mode: (ft.ifmt() | (node.meta.perm & 0o7777)) as u16,
        size: p.size,
        u,
        ino: id as u32 + 1,
        uid: node.meta.uid,
        gid: node.meta.gid,
        mtime: node.meta.mtime,
        mtime_nsec: node.meta.mtime_nsec,
        nlink: p.nlink,
    };
    inode.encode(&mut meta[at..at + INODE_SIZE as usize]);
    let xat = at + INODE_SIZE as usize;
    encode_xattrs(&mut meta[xat..xat + p.xattr_size as usize], &node.meta.xattrs);
    let tail = xat + p.xattr_size as usize;
    match layout {
        Layout::FlatInline => {
            let dst = &mut meta[tail..tail + p.size as usize];
            match &node.kind {
                NodeKind::Regular(Content::Bytes(b)) | NodeKind::Symlink(b) => dst.copy_from_slice(b),
                NodeKind::Regular(Content::File(path)) => {
                    open_nofollow(path)?.read_exact_at(dst, 0).map_err(io_err(path))?;
                }
                NodeKind::Regular(Content::Layer(image, inode)) => {
                    dst.copy_from_slice(&image.read_all(inode, BLOCK)?);
                }
                // placed data is never inline (the plan keeps it where it is)
                NodeKind::Regular(Content::Placed(_)) => {}
                NodeKind::Dir(_) => encode_dir_block(dst, &p.dir[0].entries, plan, tree),
                _ => {}
            }
        }
        Layout::ChunkBased => {
            if let Some(c) = &p.chunks {
                for (i, addr) in c.addrs.iter().enumerate() {
                    put32(meta, tail + 4 * i, addr.unwrap_or(NULL_ADDR));
                }
            }
        }
        Layout::FlatPlain => {}
    }
    Ok(())
}

fn encode_dir_block(dst: &mut [u8], entries: &[(Vec<u8>, usize)], plan: &Plan, tree: &Tree) {
    let mut nameoff = DIRENT_SIZE as usize * entries.len();
    for (i, (name, child)) in entries.iter().enumerate() {
        let ft = match tree.nodes[*child].kind {
            NodeKind::Regular(_) => FileType::Regular,
            NodeKind::Dir(_) => FileType::Dir,
            NodeKind::Symlink(_) => FileType::Symlink,
            NodeKind::Char(_) => FileType::Char,
            NodeKind::Block(_) => FileType::Block,
            NodeKind::Fifo => FileType::Fifo,
            NodeKind::Socket => FileType::Socket,
        };
        let at = i * DIRENT_SIZE as usize;
        encode_dirent(&mut dst[at..at + DIRENT_SIZE as usize], plan.nodes[*child].nid, nameoff as u16, ft);
        dst[nameoff..nameoff + name.len()].copy_from_slice(name);
        nameoff += name.len();
    }
}

enum WriteError {
    Io(io::Error),
    Image(ImageError),
}

impl From<io::Error> for WriteError {
    fn from(e: io::Error) -> Self {
        WriteError::Io(e)
    }
}

fn write_data(tree: &Tree, p: &NodePlan, plan: &Plan, id: usize, out: &File) -> Result<(), WriteError> {
    match (&tree.nodes[id].kind, p.layout) {
        (_, Some(Layout::FlatInline)) => Ok(()),
        (NodeKind::Dir(_), _) => {
            for (i, block) in p.dir.iter().enumerate() {
                let mut buf = vec![0u8; block.used as usize];
                encode_dir_block(&mut buf, &block.entries, plan, tree);
                out.write_all_at(&buf, (u64::from(p.blkaddr) + i as u64) * BLOCK)?;
            }
            Ok(())
        }
        (NodeKind::Regular(Content::Bytes(b)) | NodeKind::Symlink(b), _) if p.blocks > 0 => {
            Ok(out.write_all_at(b, u64::from(p.blkaddr) * BLOCK)?)
        }
        (NodeKind::Regular(Content::File(path)), _) => {
            let src = open_nofollow(path).map_err(WriteError::Image)?;
            stored_ranges(p, |from, to, len| Ok(copy_range(&src, from, out, to, len)?))
        }
        (NodeKind::Regular(Content::Layer(image, inode)), _) => {
            stored_ranges(p, |from, to, len| image.copy_to(inode, from, out, to, len).map_err(WriteError::Image))
        }
        (NodeKind::Regular(Content::Placed(_)), _) => Ok(()),
        _ => Ok(()),
    }
}

/// Calls `copy(from, to, len)` for each range of a file's data the plan stores: its chunks
/// that hold data, or its whole data when flat.
fn stored_ranges(
    p: &NodePlan,
    mut copy: impl FnMut(u64, u64, u64) -> Result<(), WriteError>,
) -> Result<(), WriteError> {
    if let Some(c) = &p.chunks {
        for (i, addr) in c.addrs.iter().enumerate() {
            if let Some(addr) = addr {
                let start = i as u64 * c.size();
                copy(start, u64::from(*addr) * BLOCK, (p.size - start).min(c.size()))?;
            }
        }
    } else if p.blocks > 0 {
        copy(0, u64::from(p.blkaddr) * BLOCK, p.size)?;
    }
    Ok(())
}
