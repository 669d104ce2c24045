//! Tar export of a file or directory of an image (`GET …/archive`), streamed as POSIX PAX.
//!
//! * A directory becomes the archive root named by its basename (`/etc` → `etc/`,
//!   `etc/hosts`, …); the image root gives names relative to it (`bin/`, `bin/sh`, …, no
//!   member for the root itself). A regular file gives one member named by its basename.
//!   The requested path itself is followed if it is a symlink; nothing below it is.
//! * Members come in pre-order, children sorted by name. Mode bits, uid/gid (and user and
//!   group names when the image's `/etc/passwd` / `/etc/group` know them), mtime, symlinks,
//!   FIFOs and device nodes are kept; the second and later names of one inode of one layer
//!   are hardlink members. Sockets are skipped; xattrs are not exported.
//! * Headers are ustar; whatever does not fit (long names or link targets, big sizes, ids,
//!   negative times, long user names) goes in a PAX extended header (`x`) before the member.
//!
//! The archive is written straight to the output, one header and one file at a time, so
//! memory does not grow with the tree. On error the output is left unfinished (no end
//! blocks), so a reader sees a truncated archive rather than a short valid one.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use tar::{EntryType, Header};

use super::{Entry, ImageView, requested_name};
use crate::inert::Kind;
use crate::{ImageError, ImageResult};

const BLOCK: usize = 512;
/// Largest value of an 11-digit octal ustar field (size, mtime).
const MAX_OCTAL_11: u64 = 0o77777777777;
/// Largest value of a 7-digit octal ustar field (uid, gid, device numbers).
const MAX_OCTAL_7: u64 = 0o7777777;

pub(super) fn write_archive(view: &ImageView, path: &str, out: &mut dyn Write) -> ImageResult<()> {
    let entry = view.resolve(path, true)?;
    if !entry.is_dir() && !entry.is_file() {
        return Err(ImageError::NotRegular { path: path.to_owned() });
    }
    let requested = requested_name(path);
    let name: Vec<u8> = match requested.as_str() {
        "." | ".." => match entry.rel.file_name() {
            Some(name) => name.as_bytes().to_vec(),
            None => Vec::new(),
        },
        "/" => Vec::new(),
        name => name.as_bytes().to_vec(),
    };
    let mut archiver = Archiver { view, out, links: HashMap::new() };
    let mut pending = vec![(entry, name)];
    while let Some((entry, name)) = pending.pop() {
        if entry.is_dir() {
            if !name.is_empty() {
                let mut dir_name = name.clone();
                dir_name.push(b'/');
                archiver.member(&dir_name, &entry, EntryType::Directory, None)?;
            }
            let children = view.children(&entry)?;
            for child in children.into_iter().rev() {
                let Some(child_name) = child.rel.file_name() else { continue };
                let mut member = name.clone();
                if !member.is_empty() {
                    member.push(b'/');
                }
                member.extend_from_slice(child_name.as_bytes());
                pending.push((child, member));
            }
        } else {
            archiver.leaf(&name, &entry)?;
        }
    }
    archiver.write(&[0; 2 * BLOCK])?;
    archiver.out.flush().map_err(out_err)
}

struct Archiver<'a> {
    view: &'a ImageView,
    out: &'a mut dyn Write,
    /// (layer, inode) of multiply-linked non-directories already archived → member name.
    links: HashMap<(usize, u64), Vec<u8>>,
}

impl Archiver<'_> {
    /// A non-directory member: a file, a hardlink to an earlier one, a symlink, a FIFO or a
    /// device node (sockets are skipped).
    fn leaf(&mut self, name: &[u8], entry: &Entry) -> ImageResult<()> {
        let meta = &entry.meta;
        if meta.kind() == Kind::Socket {
            tracing::debug!(path = %entry.path(), "not archiving a socket");
            return Ok(());
        }
        let key = (entry.layer, meta.nid);
        if meta.nlink() > 1 {
            if let Some(first) = self.links.get(&key) {
                let first = first.clone();
                return self.member(name, entry, EntryType::Link, Some(&first));
            }
            self.links.insert(key, name.to_vec());
        }
        match meta.kind() {
            Kind::File => {
                let file = self.view.file_of(entry);
                self.member(name, entry, EntryType::Regular, None)?;
                self.copy_content(file, meta.len(), &entry.path())
            }
            Kind::Symlink => {
                let target = self.view.layers[entry.layer].read_link(&entry.meta)?;
                self.member(name, entry, EntryType::Symlink, Some(&target))
            }
            Kind::Fifo => self.member(name, entry, EntryType::Fifo, None),
            Kind::Char(_) => self.member(name, entry, EntryType::Char, None),
            Kind::Block(_) => self.member(name, entry, EntryType::Block, None),
            Kind::Dir | Kind::Socket => Ok(()),
        }
    }

    /// Writes the header of a member (preceded by a PAX header when needed).
    fn member(&mut self, name: &[u8], entry: &Entry, kind: EntryType, link: Option<&[u8]>) -> ImageResult<()> {
        let meta = &entry.meta;
        let mut pax: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut header = Header::new_ustar();
        header.set_entry_type(kind);
        if !set_ustar_name(&mut header, name) {
            pax.push(("path", name.to_vec()));
            set_ustar_name(&mut header, truncate(name, 100));
        }
        if let Some(link) = link {
            if link.len() > 100 {
                pax.push(("linkpath", link.to_vec()));
            }
            header.as_old_mut().linkname[..link.len().min(100)].copy_from_slice(truncate(link, 100));
        }
        let size = if kind == EntryType::Regular { meta.len() } else { 0 };
        if size > MAX_OCTAL_11 {
            pax.push(("size", size.to_string().into_bytes()));
        }
        header.set_size(size);
        header.set_mode(meta.mode() & 0o7777);
        for (key, id, set) in [
            ("uid", meta.uid(), Header::set_uid as fn(&mut Header, u64)),
            ("gid", meta.gid(), Header::set_gid as fn(&mut Header, u64)),
        ] {
            if u64::from(id) > MAX_OCTAL_7 {
                pax.push((key, id.to_string().into_bytes()));
                set(&mut header, 0);
            } else {
                set(&mut header, u64::from(id));
            }
        }
        let mtime = meta.mtime();
        match u64::try_from(mtime) {
            Ok(secs) if secs <= MAX_OCTAL_11 => header.set_mtime(secs),
            _ => {
                pax.push(("mtime", mtime.to_string().into_bytes()));
                header.set_mtime(0);
            }
        }
        for (key, value, field) in
            [("uname", self.view.user_name(meta.uid()), 0), ("gname", self.view.group_name(meta.gid()), 1)]
        {
            let Some(value) = value else { continue };
            let bytes = value.as_bytes();
            if bytes.len() > 32 {
                pax.push((key, bytes.to_vec()));
            } else if let Some(ustar) = header.as_ustar_mut() {
                let dst = if field == 0 { &mut ustar.uname } else { &mut ustar.gname };
                dst[..bytes.len()].copy_from_slice(bytes);
            }
        }
        if matches!(kind, EntryType::Char | EntryType::Block) {
            let (major, minor) = (rustix::fs::major(meta.rdev()), rustix::fs::minor(meta.rdev()));
            if u64::from(major) > MAX_OCTAL_7 || u64::from(minor) > MAX_OCTAL_7 {
                tracing::warn!(path = %entry.path(), "device number too large for tar; archiving as 0/0");
            } else {
                header.set_device_major(major).map_err(out_err)?;
                header.set_device_minor(minor).map_err(out_err)?;
            }
        }
        header.set_cksum();
        if !pax.is_empty() {
            self.pax_header(name, mtime, &pax)?;
        }
        self.write(header.as_bytes())
    }

    /// A PAX extended header (`x`) carrying `records` for the member that follows.
    fn pax_header(&mut self, name: &[u8], mtime: i64, records: &[(&str, Vec<u8>)]) -> ImageResult<()> {
        let mut body = Vec::new();
        for (key, value) in records {
            let base = key.len() + value.len() + 3; // ' ', '=', '\n'
            let mut len = base + 1;
            while len != base + len.to_string().len() {
                len = base + len.to_string().len();
            }
            body.extend_from_slice(format!("{len} {key}=").as_bytes());
            body.extend_from_slice(value);
            body.push(b'\n');
        }
        let base = name.rsplit(|&b| b == b'/').find(|c| !c.is_empty()).unwrap_or(b"entry");
        let mut pax_name = b"PaxHeaders/".to_vec();
        pax_name.extend_from_slice(truncate(base, 100 - pax_name.len()));
        let mut header = Header::new_ustar();
        header.set_entry_type(EntryType::XHeader);
        set_ustar_name(&mut header, &pax_name);
        header.set_size(body.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(u64::try_from(mtime).unwrap_or(0).min(MAX_OCTAL_11));
        header.set_cksum();
        self.write(header.as_bytes())?;
        self.write(&body)?;
        self.pad(body.len() as u64)
    }

    /// The content of a regular file: exactly `size` bytes, then padding to a block.
    fn copy_content(&mut self, file: crate::erofs::ErofsReader, size: u64, image_path: &str) -> ImageResult<()> {
        let mut reader = file.take(size);
        let mut buf = vec![0u8; 1 << 16];
        let mut copied = 0u64;
        loop {
            let n = reader.read(&mut buf).map_err(crate::io_err(Path::new(image_path)))?;
            if n == 0 {
                break;
            }
            self.write(&buf[..n])?;
            copied += n as u64;
        }
        if copied != size {
            return Err(ImageError::Io {
                path: image_path.into(),
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "layer file shrank while archiving"),
            });
        }
        self.pad(size)
    }

    fn pad(&mut self, len: u64) -> ImageResult<()> {
        let rest = (len % BLOCK as u64) as usize;
        if rest == 0 { Ok(()) } else { self.write(&[0; BLOCK][..BLOCK - rest]) }
    }

    fn write(&mut self, bytes: &[u8]) -> ImageResult<()> {
        self.out.write_all(bytes).map_err(out_err)
    }
}

fn out_err(source: io::Error) -> ImageError {
    ImageError::Io { path: "<archive output>".into(), source }
}

fn truncate(bytes: &[u8], max: usize) -> &[u8] {
    &bytes[..bytes.len().min(max)]
}

/// Stores `name` in the ustar `name` field, or split at a `/` into `prefix` (≤ 155 bytes)
/// and `name` (≤ 100 bytes). False when it does not fit.
fn set_ustar_name(header: &mut Header, name: &[u8]) -> bool {
    let Some(ustar) = header.as_ustar_mut() else { return false };
    if name.len() <= 100 {
        ustar.name[..name.len()].copy_from_slice(name);
        return true;
    }
    // the split keeps a trailing '/' (directories) in the name part
    let search_end = name.len().saturating_sub(1);
    let split = name[..search_end]
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b == b'/' && i <= 155 && name.len() - i - 1 <= 100 && i > 0)
        .map(|(i, _)| i)
        .next();
    let Some(i) = split else { return false };
    ustar.prefix[..i].copy_from_slice(&name[..i]);
    ustar.name[..name.len() - i - 1].copy_from_slice(&name[i + 1..]);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_split_or_need_pax() {
        let mut header = Header::new_ustar();
        let name = format!("{}/{}", "d".repeat(120), "f".repeat(90));
        assert!(set_ustar_name(&mut header, name.as_bytes()));
        assert_eq!(header.path_bytes().as_ref(), name.as_bytes());
        let mut header = Header::new_ustar();
        assert!(!set_ustar_name(&mut header, "x".repeat(300).as_bytes()));
    }
}
