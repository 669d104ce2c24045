//! [`FileItem`], the stat record of the inspect API, and [`format_listing`], the `ls -l`
//! style text of a directory listing (`GET …/list?text=1`).

use std::fmt::Write as _;

use serde::Serialize;

use super::{Entry, ImageView};
use crate::inert::Kind;

/// One entry of a listing or a stat, as the contree `FileItem` (all 15 keys always sent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileItem {
    pub size: u64,
    /// The name relative to the listed directory.
    pub path: String,
    /// User name from the image's `/etc/passwd`, else the uid in decimal.
    pub owner: String,
    /// Group name from the image's `/etc/group`, else the gid in decimal.
    pub group: String,
    pub uid: u32,
    pub gid: u32,
    /// Full `st_mode`, file type bits included (`0o100644` = 33188).
    pub mode: u32,
    /// Modification time, unix seconds.
    pub mtime: i64,
    pub nlink: u64,
    pub is_dir: bool,
    pub is_regular: bool,
    pub is_symlink: bool,
    pub is_socket: bool,
    pub is_fifo: bool,
    /// The link target for a symlink, else empty.
    pub symlink_to: String,
}

/// The JSON body of `GET …/list`: the requested directory and its children.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DirectoryList {
    /// The directory as requested.
    pub path: String,
    pub files: Vec<FileItem>,
}

impl ImageView {
    /// The [`FileItem`] of `entry` (itself, not a symlink's target), named `name`.
    pub(super) fn file_item(&self, name: String, entry: &Entry) -> FileItem {
        let meta = &entry.meta;
        let kind = meta.kind();
        let symlink_to = if kind == Kind::Symlink {
            self.layers[entry.layer]
                .read_link(&entry.meta)
                .map(|t| String::from_utf8_lossy(&t).into_owned())
                .unwrap_or_default()
        } else {
            String::new()
        };
        FileItem {
            size: meta.len(),
            path: name,
            owner: self.user_name(meta.uid()).map_or_else(|| meta.uid().to_string(), str::to_owned),
            group: self.group_name(meta.gid()).map_or_else(|| meta.gid().to_string(), str::to_owned),
            uid: meta.uid(),
            gid: meta.gid(),
            mode: meta.mode(),
            mtime: meta.mtime(),
            nlink: meta.nlink(),
            is_dir: kind == Kind::Dir,
            is_regular: kind == Kind::File,
            is_symlink: kind == Kind::Symlink,
            is_socket: kind == Kind::Socket,
            is_fifo: kind == Kind::Fifo,
            symlink_to,
        }
    }
}

/// The `ls -l` style text of a listing, as contree-cli prints it:
///
/// ```text
/// total 19.42 KB
/// drwxr-xr-x 1 0 0   858.00 May 30 12:13 bin
/// lrwxrwxrwx 1 0 0    12.00 May 30 12:13 sh -> /bin/busybox
/// ```
///
/// The total is the sum of the sizes; sizes are human-readable (bytes with two decimals,
/// then `KB`/`MB`/`GB`/`TB`, 1024-based); times are UTC. `_dir` is the listed directory
/// (names are already relative to it).
pub fn format_listing(_dir: &str, items: &[FileItem]) -> String {
    let total: u64 = items.iter().map(|i| i.size).sum();
    let mut out = format!("total {}\n", human_size(total));
    for item in items {
        let _ = write!(
            out,
            "{} {} {} {} {:>8} {} {}",
            mode_string(item.mode),
            item.nlink,
            item.uid,
            item.gid,
            human_size(item.size),
            format_mtime(item.mtime),
            escape_name(&item.path)
        );
        if item.is_symlink {
            let _ = write!(out, " -> {}", escape_name(&item.symlink_to));
        }
        out.push('\n');
    }
    out
}

/// A name as one line of text, like `ls -b`: backslash, control characters (C0, DEL, C1)
/// and the Unicode line/paragraph separators are written as C escapes, so a file named
/// `"a\n-rwsr-xr-x …"` cannot forge a line of the listing.
pub(super) fn escape_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\{:03o}", c as u32);
            }
            c if ('\u{80}'..='\u{9f}').contains(&c) || c == '\u{2028}' || c == '\u{2029}' => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// `858.00`, `19.42 KB`, `1.50 MB`: two decimals, 1024-based, no unit for bytes.
pub(super) fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{value:.2}") } else { format!("{value:.2} {}", UNITS[unit]) }
}

/// `May 30 12:13` (UTC); out-of-range times print as the epoch.
fn format_mtime(mtime: i64) -> String {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let t = time::OffsetDateTime::from_unix_timestamp(mtime).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let month = MONTHS[usize::from(u8::from(t.month())) - 1];
    format!("{month} {:02} {:02}:{:02}", t.day(), t.hour(), t.minute())
}

/// `drwxr-xr-x`, `-rwsr-xr-x`, `drwxrwxrwt`, `lrwxrwxrwx`, as `stat.filemode`.
pub(super) fn mode_string(mode: u32) -> String {
    let kind = match mode & 0o170000 {
        0o040000 => 'd',
        0o120000 => 'l',
        0o010000 => 'p',
        0o140000 => 's',
        0o020000 => 'c',
        0o060000 => 'b',
        0o100000 => '-',
        _ => '?',
    };
    let mut s = String::with_capacity(10);
    s.push(kind);
    let special = |bit: u32, exec: bool, set: char, unset: char| match (mode & bit != 0, exec) {
        (true, true) => set,
        (true, false) => unset,
        (false, true) => 'x',
        (false, false) => '-',
    };
    for (shift, bit, set, unset) in [(6, 0o4000, 's', 'S'), (3, 0o2000, 's', 'S'), (0, 0o1000, 't', 'T')] {
        let perms = (mode >> shift) & 7;
        s.push(if perms & 4 != 0 { 'r' } else { '-' });
        s.push(if perms & 2 != 0 { 'w' } else { '-' });
        s.push(special(bit, perms & 1 != 0, set, unset));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes_and_modes() {
        assert_eq!(human_size(858), "858.00");
        assert_eq!(human_size(0), "0.00");
        assert_eq!(human_size(19_886), "19.42 KB");
        assert_eq!(human_size(3 << 20), "3.00 MB");
        assert_eq!(human_size(5 << 30), "5.00 GB");
        assert_eq!(mode_string(0o040755), "drwxr-xr-x");
        assert_eq!(mode_string(0o100644), "-rw-r--r--");
        assert_eq!(mode_string(0o120777), "lrwxrwxrwx");
        assert_eq!(mode_string(0o041777), "drwxrwxrwt");
        assert_eq!(mode_string(0o104755), "-rwsr-xr-x");
        assert_eq!(mode_string(0o102644), "-rw-r-Sr--");
        assert_eq!(mode_string(0o010600), "prw-------");
        assert_eq!(format_mtime(1_748_607_180), "May 30 12:13");
    }

    #[test]
    fn names_cannot_forge_lines() {
        let forged = "a\n-rwsr-xr-x 1 0 0 1.00 May 30 12:13 evil";
        let mut item = FileItem {
            size: 1,
            path: forged.into(),
            owner: "0".into(),
            group: "0".into(),
            uid: 0,
            gid: 0,
            mode: 0o120777,
            mtime: 0,
            nlink: 1,
            is_dir: false,
            is_regular: false,
            is_symlink: true,
            is_socket: false,
            is_fifo: false,
            symlink_to: "t\r\u{1b}[2J\u{85}x".into(),
        };
        let text = format_listing("/", std::slice::from_ref(&item));
        // One header line and exactly one entry line, the name visible but escaped.
        assert_eq!(text.lines().count(), 2, "{text:?}");
        assert!(text.contains("a\\n-rwsr-xr-x"), "{text}");
        assert!(text.ends_with(" -> t\\r\\033[2J\\u{85}x\n"), "{text}");
        // The control: an ordinary name prints as it is.
        item.path = "ordinary name-1.txt".into();
        item.symlink_to = "/bin/busybox".into();
        assert!(format_listing("/", &[item]).ends_with("ordinary name-1.txt -> /bin/busybox\n"));
        assert_eq!(escape_name("back\\slash"), "back\\\\slash");
    }
}
