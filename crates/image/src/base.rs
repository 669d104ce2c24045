//! The built-in base image: a busybox userland made from Debian's `busybox-static`, so a
//! fresh machine has a runnable image without any registry.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use crate::inert::{self, Kind, Meta};
use crate::{ImageError, ImageResult, io_err};

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
daemon:x:1:1:daemon:/usr/sbin:/bin/false\n\
nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\ndaemon:x:1:\nusers:x:100:\nnogroup:x:65534:\n";

/// Fills `tree` (an existing empty directory) with a busybox root filesystem as an inert
/// tree: `/bin/busybox` plus a symlink for every applet at its canonical place
/// (`busybox --list-full`), `/etc/{passwd,group,hostname}`, and the usual empty directories
/// (`/tmp` is 1777, `/root` 0700). Everything is owned by root; times are the busybox
/// binary's mtime, so the same busybox always gives the same layer.
pub fn build_busybox_tree(busybox: &Path, tree: &Path) -> ImageResult<()> {
    let out = Command::new(busybox).arg("--list-full").output().map_err(io_err(busybox))?;
    if !out.status.success() {
        return Err(ImageError::Io {
            path: busybox.to_owned(),
            source: std::io::Error::other("busybox --list-full failed"),
        });
    }
    let md = busybox.metadata().map_err(io_err(busybox))?;
    let b = Builder { tree, mtime: (md.mtime(), 0) };
    inert::init_root(tree, &b.meta(Kind::Dir, 0o755))?;
    for dir in ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "dev", "proc", "sys", "run", "var/tmp", "home"] {
        b.mkdir(dir, 0o755)?;
    }
    b.mkdir("tmp", 0o1777)?;
    b.mkdir("root", 0o700)?;
    let target = tree.join("bin/busybox");
    let mut file = inert::create_file(&target)?;
    std::io::copy(&mut std::fs::File::open(busybox).map_err(io_err(busybox))?, &mut file).map_err(io_err(&target))?;
    drop(file);
    inert::set(&target, &b.meta(Kind::File, 0o755))?;
    let listing = String::from_utf8_lossy(&out.stdout);
    for applet in listing.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if applet == "bin/busybox" || applet.contains("..") || applet.starts_with('/') {
            continue;
        }
        if let Some(parent) = Path::new(applet).parent() {
            b.mkdir_all(parent)?;
        }
        let link = tree.join(applet);
        if link.symlink_metadata().is_err() {
            inert::create_symlink(&link, b"/bin/busybox", &b.meta(Kind::Symlink, 0o777))?;
        }
    }
    b.write("etc/passwd", PASSWD)?;
    b.write("etc/group", GROUP)?;
    b.write("etc/hostname", "linuxkit\n")?;
    b.write("etc/os-release", "NAME=\"Boxwood busybox\"\nID=busybox\n")
}

struct Builder<'a> {
    tree: &'a Path,
    mtime: (i64, u32),
}

impl Builder<'_> {
    fn meta(&self, kind: Kind, perm: u32) -> Meta {
        Meta::new(kind, perm, 0, 0, self.mtime)
    }

    fn mkdir(&self, rel: &str, perm: u32) -> ImageResult<()> {
        self.mkdir_all(Path::new(rel).parent().unwrap_or(Path::new("")))?;
        let path = self.tree.join(rel);
        if path.is_dir() {
            return inert::set(&path, &self.meta(Kind::Dir, perm));
        }
        inert::create_dir(&path, &self.meta(Kind::Dir, perm))
    }

    /// `rel` and its missing parents, 0755.
    fn mkdir_all(&self, rel: &Path) -> ImageResult<()> {
        let mut path = self.tree.to_owned();
        for component in rel.components() {
            path.push(component);
            if !path.is_dir() {
                inert::create_dir(&path, &self.meta(Kind::Dir, 0o755))?;
            }
        }
        Ok(())
    }

    fn write(&self, rel: &str, body: &str) -> ImageResult<()> {
        let path = self.tree.join(rel);
        let mut file = inert::create_file(&path)?;
        file.write_all(body.as_bytes()).map_err(io_err(&path))?;
        drop(file);
        inert::set(&path, &self.meta(Kind::File, 0o644))
    }
}
