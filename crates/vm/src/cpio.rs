//! A minimal writer (and a lookup) for uncompressed "newc" cpio archives, the Linux
//! initramfs format.

/// Regular-file, directory and char-device type bits of `st_mode`.
pub const S_IFREG: u32 = 0o100_000;
pub const S_IFDIR: u32 = 0o040_000;
pub const S_IFCHR: u32 = 0o020_000;

/// The guest's page size, the unit the initrd is placed in.
const PAGE: usize = 4096;

/// Builds an archive in memory. Entries get mtime 0 and uid/gid 0, so output is reproducible.
#[derive(Debug, Default)]
pub struct CpioWriter {
    buf: Vec<u8>,
    next_ino: u32,
}

impl CpioWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory; `path` is relative (no leading `/`).
    pub fn dir(&mut self, path: &str, perm: u32) {
        self.entry(path, S_IFDIR | perm, 2, (0, 0), &[]);
    }

    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        self.entry(path, S_IFREG | perm, 1, (0, 0), data);
    }

    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) {
        self.entry(path, S_IFCHR | perm, 1, (major, minor), &[]);
    }

    /// Appends the trailer, pads the archive to whole 4 KiB pages with zeros (the kernel skips
    /// them) and returns it. The padding matters: QEMU's microvm loads the initrd so that it
    /// ends at the top of guest RAM less the slack of its last page, and the firmware keeps the
    /// ACPI tables (~900 bytes) in that same top page; an archive whose last page left less
    /// slack than the tables need overlapped them and the guest hung in ACPI init (QEMU 10,
    /// every boot, for one agent build out of a few). A whole number of pages leaves that page
    /// to the tables.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.buf.resize(self.buf.len().next_multiple_of(PAGE), 0);
        self.buf
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        self.next_ino += 1;
        let ino = if name == "TRAILER!!!" { 0 } else { self.next_ino };
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            u32::try_from(data.len()).unwrap_or(u32::MAX),
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).unwrap_or(u32::MAX),
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }
}

/// The data of the regular file `path` in a newc archive (the first entry of that name), or
/// `None` if absent or the archive is malformed.
pub fn find_file<'a>(mut archive: &'a [u8], path: &str) -> Option<&'a [u8]> {
    let total = archive.len();
    loop {
        let header = archive.get(..110)?;
        if &header[..6] != b"070701" {
            return None;
        }
        let field = |i: usize| -> Option<usize> {
            let hex = std::str::from_utf8(header.get(6 + i * 8..14 + i * 8)?).ok()?;
            usize::try_from(u32::from_str_radix(hex, 16).ok()?).ok()
        };
        let (mode, size, namesize) = (field(1)?, field(6)?, field(11)?);
        // Offsets are aligned relative to the start of the archive.
        let here = total - archive.len();
        let name = archive.get(110..110 + namesize.checked_sub(1)?)?;
        let data_start = (here + 110 + namesize).next_multiple_of(4) - here;
        let data = archive.get(data_start..data_start + size)?;
        if name == b"TRAILER!!!" {
            return None;
        }
        if name == path.as_bytes() && u32::try_from(mode).ok()? & 0o170_000 == S_IFREG {
            return Some(data);
        }
        let next = (here + data_start + size).next_multiple_of(4) - here;
        archive = archive.get(next..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, rdevmajor, rdevminor, data) parsed back from an archive.
    type Parsed = (String, u32, u32, u32, Vec<u8>);

    fn parse(mut a: &[u8]) -> Vec<Parsed> {
        let total = a.len();
        let mut out = Vec::new();
        loop {
            assert_eq!((total - a.len()) % 4, 0, "entry not 4-aligned");
            assert_eq!(&a[..6], b"070701");
            let field = |i: usize| {
                let s = std::str::from_utf8(&a[6 + i * 8..14 + i * 8]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let (mode, size, namesize) = (field(1), field(6) as usize, field(11) as usize);
            let (rmaj, rmin) = (field(9), field(10));
            let name = std::str::from_utf8(&a[110..110 + namesize - 1]).unwrap().to_owned();
            assert_eq!(a[110 + namesize - 1], 0);
            let data_start = (110 + namesize).next_multiple_of(4);
            let data = a[data_start..data_start + size].to_vec();
            a = &a[(data_start + size).next_multiple_of(4).min(a.len())..];
            if name == "TRAILER!!!" {
                assert!(a.iter().all(|&b| b == 0), "only zeros after the trailer");
                assert_eq!(total % PAGE, 0, "whole pages");
                return out;
            }
            out.push((name, mode, rmaj, rmin, data));
        }
    }

    #[test]
    fn round_trips_entries_with_alignment() {
        let mut w = CpioWriter::new();
        w.dir("lib", 0o755);
        w.file("init", 0o755, b"hello");
        w.file("lib/a", 0o644, b"");
        w.file("lib/odd-name-x", 0o600, &[1, 2, 3, 4, 5, 6, 7]);
        w.char_dev("dev/console", 0o600, 5, 1);
        let got = parse(&w.finish());
        assert_eq!(
            got,
            vec![
                ("lib".into(), S_IFDIR | 0o755, 0, 0, vec![]),
                ("init".into(), S_IFREG | 0o755, 0, 0, b"hello".to_vec()),
                ("lib/a".into(), S_IFREG | 0o644, 0, 0, vec![]),
                ("lib/odd-name-x".into(), S_IFREG | 0o600, 0, 0, vec![1, 2, 3, 4, 5, 6, 7]),
                ("dev/console".into(), S_IFCHR | 0o600, 5, 1, vec![]),
            ]
        );
    }

    #[test]
    fn finds_files() {
        let mut w = CpioWriter::new();
        w.dir("init.d", 0o755);
        w.file("lib/x", 0o644, b"odd");
        w.file("init", 0o755, b"the agent");
        let a = w.finish();
        assert_eq!(find_file(&a, "init"), Some(&b"the agent"[..]));
        assert_eq!(find_file(&a, "lib/x"), Some(&b"odd"[..]));
        assert_eq!(find_file(&a, "init.d"), None, "not a regular file");
        assert_eq!(find_file(&a, "missing"), None);
        assert_eq!(find_file(&a[..200], "init"), None, "truncated");
    }

    #[test]
    fn empty_archive_is_just_the_trailer() {
        let a = CpioWriter::new().finish();
        assert_eq!(a.len() % 4, 0);
        assert!(parse(&a).is_empty());
    }
}
