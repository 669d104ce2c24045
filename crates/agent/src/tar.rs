//! A POSIX PAX tar of the overlay's upper directory: the format the host unpacks.
//!
//! Members are named relative to the upper dir (directories with a trailing `/`), parents
//! before children, siblings in byte order. Kept: directories, regular files, symlinks, hard
//! links (later names of an inode already written), FIFOs and 0/0 character devices (overlay
//! whiteouts); sockets and other device nodes are skipped. Owners are numeric, modes keep all
//! 07777 bits, xattrs travel as `SCHILY.xattr.*` PAX records (see [`keep_xattr`]). Paths the
//! agent created itself are left out; such a directory is still written when something the
//! run put below it is.
//!
//! A regular file with holes (found with `SEEK_DATA`/`SEEK_HOLE`) is written in the GNU/PAX
//! sparse format 1.0: PAX records `GNU.sparse.major=1`, `GNU.sparse.minor=0`,
//! `GNU.sparse.name=<real name>`, `GNU.sparse.realsize=<apparent size>`, a header named
//! `GNUSparseFile.0/<name>`, and member data that starts with the sparse map (decimal lines:
//! the number of data segments, then each segment's offset and length, zero-padded to a
//! block) followed by the segments' bytes. Holes therefore cost nothing in the stream, and
//! GNU tar and bsdtar read the archive too.
//!
//! With a scratch disk ([`write_tree`]'s `disk`), a large file on it is written as a
//! disk-referenced member instead (see `boxwood_protocol::DISK_EXTENTS_RECORD`): its extent
//! map in place of its data, which the host copies from the disk itself. A file the
//! filesystem cannot map plainly is written as above.
#![allow(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsString};
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use boxwood_protocol::DISK_EXTENTS_RECORD;

use crate::fiemap::{Extent, data_extents};

const BLOCK: usize = 512;
/// The copy buffer of [`TarSink::write_file_data`]'s plain form.
const COPY_BUF_BYTES: usize = 256 << 10;
/// Largest value of an 11-digit octal field (size, mtime).
const MAX_OCTAL_11: u64 = 0o777_7777_7777;
/// Largest value of a 7-digit octal field (uid, gid).
const MAX_OCTAL_7: u64 = 0o777_7777;

/// What went into the archive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TarStats {
    /// Members, not counting PAX headers.
    pub entries: u64,
    /// Bytes of tar stream, end-of-archive blocks included.
    pub bytes: u64,
}

/// Whether an xattr travels with the export: `user.*`, `security.capability` and
/// `trusted.overlay.opaque`; every other name (other `trusted.overlay.*` bookkeeping such as
/// `origin`/`impure`, `security.selinux`, ACLs) is dropped.
pub fn keep_xattr(name: &[u8]) -> bool {
    name.starts_with(b"user.") || name == b"security.capability" || name == b"trusted.overlay.opaque"
}

/// Where the archive goes. File data has a call of its own, so a sink can have the kernel
/// move it instead of copying it through the agent (see `export::ChunkSink`).
pub trait TarSink: Write {
    /// Tells the reader the export goes on though no bytes are ready (a long write-back).
    fn keepalive(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Writes exactly `len` bytes: `file`'s from its current offset, then zeros if it ends
    /// first (a file that shrank keeps the archive well-formed; one that grew is cut).
    fn write_file_data(&mut self, file: &mut File, len: u64) -> io::Result<()> {
        let mut buf = vec![0; usize::try_from(len).unwrap_or(usize::MAX).min(COPY_BUF_BYTES)];
        copy_padded(file, len, self, &mut buf)
    }
}

impl TarSink for Vec<u8> {}

impl<T: TarSink + ?Sized> TarSink for &mut T {
    fn write_file_data(&mut self, file: &mut File, len: u64) -> io::Result<()> {
        (**self).write_file_data(file, len)
    }

    fn keepalive(&mut self) -> io::Result<()> {
        (**self).keepalive()
    }
}

/// Copies `len` bytes of `file` to `out` through `buf` (reads as large as `buf`, not
/// `io::copy`'s 8 KiB: each read is a syscall and a copy that cost microseconds under
/// emulation), zeros once the file ends.
pub fn copy_padded(file: &mut File, len: u64, out: &mut (impl Write + ?Sized), buf: &mut [u8]) -> io::Result<()> {
    let mut missing = len;
    while missing > 0 {
        let want = usize::try_from(missing).unwrap_or(usize::MAX).min(buf.len());
        let n = match file.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&buf[..n])?;
        missing -= n as u64;
    }
    if missing > 0 {
        buf.fill(0);
    }
    while missing > 0 {
        let n = usize::try_from(missing).unwrap_or(usize::MAX).min(buf.len());
        out.write_all(&buf[..n])?;
        missing -= n as u64;
    }
    Ok(())
}

/// Writes the tar of `dir` to `out`. `excluded` holds relative paths (no trailing slash).
/// `disk`: the filesystem (`st_dev`) of the scratch disk the host holds, whose large files
/// are disk-referenced.
pub fn write_tree(
    dir: &Path,
    excluded: &HashSet<Vec<u8>>,
    disk: Option<u64>,
    out: impl TarSink,
) -> io::Result<TarStats> {
    let mut w = Walker {
        out: Counting { inner: out, bytes: 0 },
        excluded,
        disk,
        links: HashMap::new(),
        pending: Vec::new(),
        entries: 0,
    };
    w.walk(dir, b"")?;
    w.out.write_all(&[0u8; 2 * BLOCK])?;
    w.out.flush()?;
    Ok(TarStats { entries: w.entries, bytes: w.out.bytes })
}

struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: TarSink> TarSink for Counting<W> {
    fn write_file_data(&mut self, file: &mut File, len: u64) -> io::Result<()> {
        self.inner.write_file_data(file, len)?;
        self.bytes += len;
        Ok(())
    }

    fn keepalive(&mut self) -> io::Result<()> {
        self.inner.keepalive()
    }
}

/// One member's header data.
struct Member {
    name: Vec<u8>,
    kind: u8,
    meta: Metadata,
    /// Bytes of member data in the stream (for a sparse file: map + data segments).
    size: u64,
    link: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Set for a file written in the sparse format.
    sparse: Option<Sparse>,
    /// Set for a disk-referenced file: its apparent size (the member data is the map).
    on_disk: Option<u64>,
}

/// A sparse file's layout: the encoded map block(s) and the data segments.
struct Sparse {
    map: Vec<u8>,
    segments: Vec<(u64, u64)>,
    real_size: u64,
}

/// Most data segments one sparse member (or extents one disk-referenced member) may list; a
/// file more fragmented than this is written whole (holes as zeros), so the host's map stays
/// small.
pub const MAX_SPARSE_SEGMENTS: usize = 4096;
/// Smaller files travel in the stream: a map and the host's copy would cost more than their
/// bytes, and the host inlines small files in the image.
const DISK_REF_MIN_BYTES: u64 = 64 << 10;

/// The data segments of `file` (offset, length), or `None` when it has no hole (or the
/// filesystem cannot tell).
fn data_segments(file: &File, size: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
    use std::os::fd::AsRawFd;
    if size == 0 {
        return Ok(None);
    }
    let fd = file.as_raw_fd();
    let seek = |offset: u64, whence| -> io::Result<Option<u64>> {
        let Ok(off) = libc::off_t::try_from(offset) else { return Ok(None) };
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let r = unsafe { libc::lseek(fd, off, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(None), // no data after `offset`
                _ => Err(e),
            };
        }
        Ok(u64::try_from(r).ok())
    };
    let mut segments = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match seek(pos, libc::SEEK_DATA) {
            Ok(Some(s)) if s < size => s,
            Ok(_) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None), // not supported
            Err(e) => return Err(e),
        };
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        if end <= start {
            break;
        }
        segments.push((start, end - start));
        if segments.len() > MAX_SPARSE_SEGMENTS {
            return Ok(None);
        }
        pos = end;
    }
    let data: u64 = segments.iter().map(|s| s.1).sum();
    if data == size {
        return Ok(None);
    }
    if segments.last().is_none_or(|&(o, l)| o + l < size) {
        segments.push((size, 0)); // a trailing hole, as GNU tar writes it
    }
    Ok(Some(segments))
}

/// The sparse map as it starts the member data, padded to a block.
fn encode_map(segments: &[(u64, u64)]) -> Vec<u8> {
    let mut map = format!("{}\n", segments.len()).into_bytes();
    for (offset, len) in segments {
        map.extend_from_slice(format!("{offset}\n{len}\n").as_bytes());
    }
    pad_map(map)
}

/// A disk-referenced member's data: the extent map, padded to a block.
fn encode_extents(extents: &[Extent]) -> Vec<u8> {
    let mut map = format!("{}\n", extents.len()).into_bytes();
    for (offset, disk, len) in extents {
        map.extend_from_slice(format!("{offset}\n{disk}\n{len}\n").as_bytes());
    }
    pad_map(map)
}

fn pad_map(mut map: Vec<u8>) -> Vec<u8> {
    let rem = map.len() % BLOCK;
    if rem != 0 {
        map.resize(map.len() + BLOCK - rem, 0);
    }
    map
}

struct Walker<'a, W> {
    out: Counting<W>,
    excluded: &'a HashSet<Vec<u8>>,
    /// The scratch disk's filesystem (`st_dev`), whose files may be disk-referenced.
    disk: Option<u64>,
    /// (dev, ino) → first name, for inodes with more than one link.
    links: HashMap<(u64, u64), Vec<u8>>,
    /// Excluded ancestor directories not written yet, outermost first.
    pending: Vec<Member>,
    entries: u64,
}

impl<W: TarSink> Walker<'_, W> {
    fn walk(&mut self, dir: &Path, rel: &[u8]) -> io::Result<()> {
        let mut names: Vec<OsString> =
            fs::read_dir(dir)?.map(|e| e.map(|e| e.file_name())).collect::<io::Result<_>>()?;
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let mut child = rel.to_vec();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(name.as_bytes());
            let meta = fs::symlink_metadata(&path)?;
            let excluded = self.excluded.contains(&child);
            let ft = meta.file_type();
            if ft.is_dir() {
                let mut member = self.member(&path, &child, b'5', meta)?;
                member.name.push(b'/');
                let depth = self.pending.len();
                if excluded {
                    self.pending.push(member);
                } else {
                    self.emit(member, None)?;
                }
                self.walk(&path, &child)?;
                self.pending.truncate(depth);
                continue;
            }
            if excluded {
                continue;
            }
            let whiteout = ft.is_char_device() && meta.rdev() == 0;
            if !(ft.is_file() || ft.is_symlink() || ft.is_fifo() || whiteout) {
                continue; // sockets, real device nodes
            }
            if meta.nlink() > 1 && !whiteout {
                let key = (meta.dev(), meta.ino());
                if let Some(first) = self.links.get(&key) {
                    let mut member = self.member(&path, &child, b'1', meta)?;
                    member.link = first.clone();
                    member.xattrs.clear();
                    self.emit(member, None)?;
                    continue;
                }
                self.links.insert(key, child.clone());
            }
            if ft.is_file() {
                let size = meta.len();
                let on_disk = self.disk == Some(meta.dev()) && size >= DISK_REF_MIN_BYTES;
                let mut member = self.member(&path, &child, b'0', meta)?;
                let file = File::open(&path)?;
                if on_disk
                    && self.write_back(&file, size)?
                    && let Some(extents) = data_extents(&file, size, MAX_SPARSE_SEGMENTS)?
                {
                    let map = encode_extents(&extents);
                    member.size = map.len() as u64;
                    member.on_disk = Some(size);
                    self.emit(member, None)?;
                    self.out.write_all(&map)?;
                    continue;
                }
                match data_segments(&file, size)? {
                    Some(segments) => {
                        let map = encode_map(&segments);
                        member.size = map.len() as u64 + segments.iter().map(|s| s.1).sum::<u64>();
                        member.sparse = Some(Sparse { map, segments, real_size: size });
                    }
                    None => member.size = size,
                }
                self.emit(member, Some(file))?;
            } else if ft.is_symlink() {
                let mut member = self.member(&path, &child, b'2', meta)?;
                member.link = fs::read_link(&path)?.into_os_string().into_vec();
                self.emit(member, None)?;
            } else {
                let kind = if whiteout { b'3' } else { b'6' };
                let member = self.member(&path, &child, kind, meta)?;
                self.emit(member, None)?;
            }
        }
        Ok(())
    }

    /// Writes `file`'s data back to the scratch disk, keeping the export alive meanwhile;
    /// `false` if it could not be (then its bytes go in the stream).
    fn write_back(&mut self, file: &File, size: u64) -> io::Result<bool> {
        let ranges = data_segments(file, size)?.unwrap_or_else(|| vec![(0, size)]);
        let out = &mut self.out;
        // A failed write-back sends the bytes instead; a broken channel ends the export.
        crate::fiemap::write_back(file, &ranges, &mut || out.keepalive())
    }

    fn member(&self, path: &Path, rel: &[u8], kind: u8, meta: Metadata) -> io::Result<Member> {
        Ok(Member {
            name: rel.to_vec(),
            kind,
            meta,
            size: 0,
            link: Vec::new(),
            xattrs: read_xattrs(path)?,
            sparse: None,
            on_disk: None,
        })
    }

    /// Writes `member` (after any excluded ancestors still owed) and its content.
    fn emit(&mut self, member: Member, content: Option<File>) -> io::Result<()> {
        for dir in std::mem::take(&mut self.pending) {
            self.write_member(&dir, None)?;
        }
        self.write_member(&member, content)
    }

    fn write_member(&mut self, m: &Member, content: Option<File>) -> io::Result<()> {
        let mut records = Vec::new();
        let mut header = [0u8; BLOCK];
        if let Some(sparse) = &m.sparse {
            pax_record(&mut records, b"GNU.sparse.major", b"1");
            pax_record(&mut records, b"GNU.sparse.minor", b"0");
            pax_record(&mut records, b"GNU.sparse.name", &m.name);
            pax_record(&mut records, b"GNU.sparse.realsize", sparse.real_size.to_string().as_bytes());
            let mut stand_in = b"GNUSparseFile.0/".to_vec();
            stand_in.extend_from_slice(tail(&m.name, 100 - stand_in.len()));
            put_bytes(&mut header[..100], &stand_in);
        } else if !set_name(&mut header, &m.name) {
            pax_record(&mut records, b"path", &m.name);
            put_bytes(&mut header[..100], tail(&m.name, 100));
        }
        if let Some(real_size) = m.on_disk {
            pax_record(&mut records, DISK_EXTENTS_RECORD.as_bytes(), real_size.to_string().as_bytes());
        }
        put_octal(&mut header[100..108], u64::from(m.meta.mode() & 0o7777));
        for (field, value, key) in [(108..116, m.meta.uid(), &b"uid"[..]), (116..124, m.meta.gid(), &b"gid"[..])] {
            if u64::from(value) <= MAX_OCTAL_7 {
                put_octal(&mut header[field], u64::from(value));
            } else {
                pax_record(&mut records, key, value.to_string().as_bytes());
                put_octal(&mut header[field], 0);
            }
        }
        if m.size <= MAX_OCTAL_11 {
            put_octal(&mut header[124..136], m.size);
        } else {
            pax_record(&mut records, b"size", m.size.to_string().as_bytes());
            put_octal(&mut header[124..136], 0);
        }
        match u64::try_from(m.meta.mtime()) {
            Ok(t) if t <= MAX_OCTAL_11 => put_octal(&mut header[136..148], t),
            _ => {
                pax_record(&mut records, b"mtime", m.meta.mtime().to_string().as_bytes());
                put_octal(&mut header[136..148], 0);
            }
        }
        header[156] = m.kind;
        if m.link.len() > 100 {
            pax_record(&mut records, b"linkpath", &m.link);
            put_bytes(&mut header[157..257], &m.link[..100]);
        } else {
            put_bytes(&mut header[157..257], &m.link);
        }
        header[257..263].copy_from_slice(b"ustar\0");
        header[263..265].copy_from_slice(b"00");
        put_octal(&mut header[329..337], 0);
        put_octal(&mut header[337..345], 0);
        for (name, value) in &m.xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(name);
            pax_record(&mut records, &key, value);
        }
        if !records.is_empty() {
            let mut pax = [0u8; BLOCK];
            let mut pax_name = b"PaxHeaders/".to_vec();
            pax_name.extend_from_slice(tail(&m.name, 89));
            put_bytes(&mut pax[..100], &pax_name);
            put_octal(&mut pax[100..108], 0o644);
            put_octal(&mut pax[108..116], 0);
            put_octal(&mut pax[116..124], 0);
            put_octal(&mut pax[124..136], records.len() as u64);
            pax[136..148].copy_from_slice(&header[136..148]);
            pax[156] = b'x';
            pax[257..263].copy_from_slice(b"ustar\0");
            pax[263..265].copy_from_slice(b"00");
            set_checksum(&mut pax);
            self.out.write_all(&pax)?;
            self.out.write_all(&records)?;
            self.pad(records.len() as u64)?;
        }
        set_checksum(&mut header);
        self.out.write_all(&header)?;
        match (content, &m.sparse) {
            (Some(mut file), Some(sparse)) => {
                self.out.write_all(&sparse.map)?;
                for &(offset, len) in &sparse.segments {
                    io::Seek::seek(&mut file, io::SeekFrom::Start(offset))?;
                    self.out.write_file_data(&mut file, len)?;
                }
                self.pad(m.size)?;
            }
            (Some(mut file), None) => {
                // The hole probe moved the file offset.
                io::Seek::seek(&mut file, io::SeekFrom::Start(0))?;
                self.out.write_file_data(&mut file, m.size)?;
                self.pad(m.size)?;
            }
            (None, _) => {}
        }
        self.entries += 1;
        Ok(())
    }

    fn pad(&mut self, len: u64) -> io::Result<()> {
        let rem = (len % BLOCK as u64) as usize;
        if rem != 0 {
            self.out.write_all(&[0u8; BLOCK][..BLOCK - rem])?;
        }
        Ok(())
    }
}

/// Puts `name` in the ustar name (and prefix) fields; `false` if it does not fit.
fn set_name(header: &mut [u8; BLOCK], name: &[u8]) -> bool {
    if name.len() <= 100 {
        put_bytes(&mut header[..100], name);
        return true;
    }
    // Split at a slash: prefix ≤ 155 bytes, name ≤ 100 and not empty. A directory's trailing
    // slash is not a split point.
    let body = name.strip_suffix(b"/").unwrap_or(name);
    for (i, _) in body.iter().enumerate().filter(|(_, b)| **b == b'/') {
        let (prefix, rest) = (&name[..i], &name[i + 1..]);
        if prefix.len() <= 155 && rest.len() <= 100 && !rest.is_empty() {
            put_bytes(&mut header[345..500], prefix);
            put_bytes(&mut header[..100], rest);
            return true;
        }
    }
    false
}

fn tail(bytes: &[u8], n: usize) -> &[u8] {
    &bytes[bytes.len().saturating_sub(n)..]
}

fn put_bytes(field: &mut [u8], value: &[u8]) {
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
}

/// Zero-padded octal digits filling the field but its last byte, which stays NUL.
fn put_octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    put_bytes(&mut field[..digits], text.as_bytes());
}

fn set_checksum(header: &mut [u8; BLOCK]) {
    header[148..156].fill(b' ');
    let sum: u64 = header.iter().map(|&b| u64::from(b)).sum();
    let text = format!("{sum:06o}\0 ");
    header[148..156].copy_from_slice(text.as_bytes());
}

/// Appends one PAX record, `"<len> <key>=<value>\n"`, where `len` counts the whole record.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let base = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = base + 1;
    while base + len.to_string().len() != len {
        len = base + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// The kept xattrs of `path` (not following a symlink), sorted by name.
fn read_xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let Some(list) = xattr_call(|buf, len| {
        // SAFETY: `c` is a valid C string; `buf` is writable for `len` bytes (or null with 0).
        unsafe { libc::llistxattr(c.as_ptr(), buf.cast(), len) }
    })?
    else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for name in list.split(|&b| b == 0).filter(|n| !n.is_empty() && keep_xattr(n)) {
        let cname = CString::new(name).map_err(io::Error::other)?;
        let value = xattr_call(|buf, len| {
            // SAFETY: as above, plus `cname` is a valid C string.
            unsafe { libc::lgetxattr(c.as_ptr(), cname.as_ptr(), buf.cast(), len) }
        })?;
        if let Some(value) = value {
            out.push((name.to_vec(), value));
        }
    }
    out.sort();
    Ok(out)
}

/// Runs a size-query-then-fetch xattr call; `None` when the filesystem has no xattrs or the
/// attribute vanished.
fn xattr_call(mut call: impl FnMut(*mut u8, usize) -> libc::ssize_t) -> io::Result<Option<Vec<u8>>> {
    loop {
        let size = call(std::ptr::null_mut(), 0);
        if size < 0 {
            return absent_or(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; usize::try_from(size).unwrap_or(0)];
        if buf.is_empty() {
            return Ok(Some(buf));
        }
        let n = call(buf.as_mut_ptr(), buf.len());
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ERANGE) {
                continue; // grew in between
            }
            return absent_or(err);
        }
        buf.truncate(usize::try_from(n).unwrap_or(0));
        return Ok(Some(buf));
    }
}

fn absent_or(err: io::Error) -> io::Result<Option<Vec<u8>>> {
    match err.raw_os_error() {
        Some(libc::ENOTSUP | libc::ENODATA) => Ok(None),
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests;
