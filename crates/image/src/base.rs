//! The built-in base image: a busybox userland made from Debian's `busybox-static`, so a
//! fresh machine has a runnable image without any registry.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;

use crate::{ImageError, ImageResult, io_err};

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
daemon:x:1:1:daemon:/usr/sbin:/bin/false\n\
nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\ndaemon:x:1:\nusers:x:100:\nnogroup:x:65534:\n";

/// Fills `tree` with a busybox root filesystem: `/bin/busybox` plus a symlink for every
/// applet at its canonical place (`busybox --list-full`), `/etc/{passwd,group,hostname}`,
/// and the usual empty directories (`/tmp` is 1777, `/root` 0700).
pub fn build_busybox_tree(busybox: &Path, tree: &Path) -> ImageResult<()> {
    let out = Command::new(busybox).arg("--list-full").output().map_err(io_err(busybox))?;
    if !out.status.success() {
        return Err(ImageError::Io {
            path: busybox.to_owned(),
            source: std::io::Error::other("busybox --list-full failed"),
        });
    }
    for dir in ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "dev", "proc", "sys", "run", "var/tmp", "home"] {
        mkdir(&tree.join(dir), 0o755)?;
    }
    mkdir(&tree.join("tmp"), 0o1777)?;
    mkdir(&tree.join("root"), 0o700)?;
    let target = tree.join("bin/busybox");
    std::fs::copy(busybox, &target).map_err(io_err(&target))?;
    set_mode(&target, 0o755)?;
    let listing = String::from_utf8_lossy(&out.stdout);
    for applet in listing.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if applet == "bin/busybox" || applet.contains("..") {
            continue;
        }
        let link = tree.join(applet);
        if let Some(parent) = link.parent() {
            mkdir(parent, 0o755)?;
        }
        if link.symlink_metadata().is_err() {
            symlink("/bin/busybox", &link).map_err(io_err(&link))?;
        }
    }
    write(&tree.join("etc/passwd"), PASSWD, 0o644)?;
    write(&tree.join("etc/group"), GROUP, 0o644)?;
    write(&tree.join("etc/hostname"), "linuxkit\n", 0o644)?;
    write(&tree.join("etc/os-release"), "NAME=\"Boxwood busybox\"\nID=busybox\n", 0o644)?;
    Ok(())
}

fn mkdir(path: &Path, mode: u32) -> ImageResult<()> {
    std::fs::create_dir_all(path).map_err(io_err(path))?;
    set_mode(path, mode)
}

fn write(path: &Path, body: &str, mode: u32) -> ImageResult<()> {
    std::fs::write(path, body).map_err(io_err(path))?;
    set_mode(path, mode)
}

fn set_mode(path: &Path, mode: u32) -> ImageResult<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err(path))
}
