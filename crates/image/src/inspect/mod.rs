//! [`ImageView`]: a read model of an image (a stack of erofs layer images in overlayfs
//! "upper" format, read in place) for the inspect endpoints, with no VM and no mount: path
//! resolution that keeps symlinks inside the image ([`resolve`]), stat and directory listings
//! ([`list`]), file content, tar export ([`archive`]) and ripgrep-style search ([`grep`]).
//!
//! Everything here is synchronous, blocking file I/O: async callers run it in
//! `spawn_blocking`. Layers are immutable once published, so no locking is needed.

mod archive;
mod grep;
mod list;
mod resolve;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

pub use grep::{GrepCase, GrepLineKind, GrepMatch, GrepRequest, GrepResult, GrepSubmatch};
pub use list::{DirectoryList, FileItem, format_listing};
pub use resolve::Entry;

use crate::erofs::{ErofsImage, ErofsReader};
use crate::{ImageError, ImageResult};

/// `/etc/passwd` and `/etc/group` larger than this are not read for owner names.
const MAX_ACCOUNTS_FILE: u64 = 4 << 20;

/// A read-only view of an image: the merge of its layers, topmost first.
#[derive(Debug)]
pub struct ImageView {
    layers: Vec<Arc<ErofsImage>>,
    accounts: OnceLock<Accounts>,
}

/// User and group names from the image's own `/etc/passwd` and `/etc/group`.
#[derive(Debug, Default)]
struct Accounts {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl ImageView {
    /// A view of the image made of the erofs layer images at `disks` (topmost first).
    pub fn open(disks: &[PathBuf]) -> ImageResult<Self> {
        let layers = disks.iter().map(|d| ErofsImage::open(d).map(Arc::new)).collect::<ImageResult<_>>()?;
        Ok(Self { layers, accounts: OnceLock::new() })
    }

    /// A view of inert layer trees (topmost first), each first written as an erofs image
    /// into `images_dir`: how tests and tools look at trees the way the store serves them.
    pub fn of_trees(trees: &[PathBuf], images_dir: &std::path::Path) -> ImageResult<Self> {
        let mut disks = Vec::with_capacity(trees.len());
        for (i, tree) in trees.iter().enumerate() {
            let disk = images_dir.join(format!("layer-{i}.erofs"));
            let _ = std::fs::remove_file(&disk);
            crate::erofs::write_image(&crate::erofs::tree_from_dir(tree)?, &disk)?;
            disks.push(disk);
        }
        Self::open(&disks)
    }

    /// Resolves an absolute image path (a relative one is taken from the root). Symlinks,
    /// absolute or relative, are followed inside the image: `..` stops at the root and an
    /// absolute target starts again at the image root, so nothing outside the image is ever
    /// reached. With `follow_last` false the final component is not followed (`lstat`); a
    /// trailing `/` always follows it and requires a directory.
    ///
    /// Errors: [`ImageError::NotFound`] (missing, dangling, or a parent that is not a
    /// directory), [`ImageError::SymlinkLoop`] (more than 40 links),
    /// [`ImageError::NotDirectory`] (trailing `/` on a non-directory),
    /// [`ImageError::BadRequest`] (a NUL byte).
    pub fn resolve(&self, path: &str, follow_last: bool) -> ImageResult<Entry> {
        self.resolve_path(path, follow_last)
    }

    /// What `path` is, following symlinks (`stat`); `FileItem::path` is the last component
    /// of `path` as given (`/` for the root).
    pub fn stat(&self, path: &str) -> ImageResult<FileItem> {
        let entry = self.resolve(path, true)?;
        Ok(self.file_item(requested_name(path), &entry))
    }

    /// Like [`ImageView::stat`] but a final symlink is described itself (`lstat`).
    pub fn lstat(&self, path: &str) -> ImageResult<FileItem> {
        let entry = self.resolve(path, false)?;
        Ok(self.file_item(requested_name(path), &entry))
    }

    /// The visible children of directory `dir` (following symlinks to it), sorted by name,
    /// each described by itself (a symlink child is not followed). A non-directory is
    /// [`ImageError::NotDirectory`].
    pub fn list(&self, dir: &str) -> ImageResult<Vec<FileItem>> {
        let entry = self.resolve(dir, true)?;
        if !entry.is_dir() {
            return Err(ImageError::NotDirectory { path: dir.to_owned() });
        }
        Ok(self.children(&entry)?.iter().map(|child| self.file_item(child.name(), child)).collect())
    }

    /// Opens the regular file at `path` (following symlinks) for reading, with its size.
    /// Dangling links are [`ImageError::NotFound`]; anything but a regular file is
    /// [`ImageError::NotRegular`].
    pub fn open_file(&self, path: &str) -> ImageResult<(ErofsReader, u64)> {
        let entry = self.resolve(path, true)?;
        if !entry.is_file() {
            return Err(ImageError::NotRegular { path: path.to_owned() });
        }
        let size = entry.meta.len();
        Ok((self.file_of(&entry), size))
    }

    /// A reader of a regular file's entry.
    pub(super) fn file_of(&self, entry: &Entry) -> ErofsReader {
        self.layers[entry.layer].reader(entry.meta.clone())
    }

    /// The user name of `uid` in the image's `/etc/passwd`, if any.
    pub fn user_name(&self, uid: u32) -> Option<&str> {
        self.accounts().users.get(&uid).map(String::as_str)
    }

    /// The group name of `gid` in the image's `/etc/group`, if any.
    pub fn group_name(&self, gid: u32) -> Option<&str> {
        self.accounts().groups.get(&gid).map(String::as_str)
    }

    fn accounts(&self) -> &Accounts {
        self.accounts
            .get_or_init(|| Accounts { users: self.read_ids("/etc/passwd", 2), groups: self.read_ids("/etc/group", 2) })
    }

    /// `id → name` from a colon-separated account file of the image whose id is in field
    /// `id_field`; the first line for an id wins. Missing or unreadable → empty.
    fn read_ids(&self, path: &str, id_field: usize) -> HashMap<u32, String> {
        let mut text = Vec::new();
        let read = self.open_file(path).and_then(|(file, _)| {
            file.take(MAX_ACCOUNTS_FILE)
                .read_to_end(&mut text)
                .map_err(|source| ImageError::Io { path: path.into(), source })
        });
        let mut ids = HashMap::new();
        if read.is_err() {
            return ids;
        }
        for line in String::from_utf8_lossy(&text).lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if let (Some(name), Some(id)) = (fields.first(), fields.get(id_field))
                && !name.is_empty()
                && let Ok(id) = id.trim().parse::<u32>()
            {
                ids.entry(id).or_insert_with(|| (*name).to_owned());
            }
        }
        ids
    }

    /// Streams `path` as a POSIX PAX tar to `out` (see [`archive`]).
    pub fn write_archive(&self, path: &str, out: &mut dyn Write) -> ImageResult<()> {
        archive::write_archive(self, path, out)
    }

    /// Checks that `path` can be archived (a directory or a regular file, following
    /// symlinks), without writing anything: the `HEAD …/archive` answer.
    pub fn check_archive(&self, path: &str) -> ImageResult<()> {
        let entry = self.resolve(path, true)?;
        if entry.is_dir() || entry.is_file() { Ok(()) } else { Err(ImageError::NotRegular { path: path.to_owned() }) }
    }

    /// Searches the image (see [`grep`]).
    pub fn grep(&self, req: &GrepRequest) -> ImageResult<GrepResult> {
        grep::grep(self, req)
    }
}

/// The last component of a requested path, `/` for the root.
fn requested_name(path: &str) -> String {
    path.split('/').rfind(|c| !c.is_empty()).unwrap_or("/").to_owned()
}
