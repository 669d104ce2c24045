//! `Setup`: the guest clock, entropy, hostname and the sandbox root filesystem (erofs lower
//! layers found by virtio serial + an upper on the run's scratch disk or a tmpfs, joined by
//! overlayfs), then the network. Remembers what it created inside the root so exports can
//! leave it out.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use boxwood_protocol::{RootfsSpec, Setup, SetupReport, UpperDisk};
use nix::mount::{MntFlags, MsFlags, mount};
use nix::sys::time::TimeSpec;
use nix::time::{ClockId, clock_settime};

use crate::export::Upper;
use crate::net;

/// Where processes are chrooted.
pub const ROOT: &str = "/run/boxwood/root";
const LOWER: &str = "/run/boxwood/lower";
const RW: &str = "/run/boxwood/rw";
/// The extra CA certificates' layer (see [`crate::ca`]).
const CA: &str = "/run/boxwood/ca";

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` = `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// `BLKFLSBUF` = `_IO(0x12, 97)`.
const BLKFLSBUF: libc::c_ulong = 0x1261;

/// What Setup leaves behind for later requests.
pub struct Sandbox {
    pub upper: Upper,
    /// The bundle holding the host's extra CA certificates, named in every process's env.
    pub ca_bundle: Option<String>,
}

/// Applies `setup`; the error text goes back to the host as `SetupFailed`. `no_net_ns`: the
/// empty network namespace a warmed-up clone keeps for runs without networking (see
/// [`crate::warmup`]); the agent's thread joins it before the root's `/sys` is mounted, so the
/// run's processes see only `lo` although the VM has a NIC.
/// `prepared`: see [`build_root`].
pub fn apply(
    setup: &Setup,
    no_net_ns: Option<&OwnedFd>,
    prepared: Option<UpperDisk>,
) -> Result<(Sandbox, SetupReport), String> {
    let secs = setup.wall_clock_unix_ns / 1_000_000_000;
    let nanos = setup.wall_clock_unix_ns % 1_000_000_000;
    let ts = TimeSpec::new(
        i64::try_from(secs).map_err(|_| "clock out of range")?,
        i64::try_from(nanos).map_err(|_| "clock out of range")?,
    );
    clock_settime(ClockId::CLOCK_REALTIME, ts).map_err(|e| format!("set clock: {e}"))?;
    add_entropy(&setup.entropy)?;
    nix::unistd::sethostname(&setup.hostname).map_err(|e| format!("sethostname: {e}"))?;
    if setup.network.is_none()
        && let Some(ns) = no_net_ns
    {
        // Processes are forked from this (the runtime) thread, so they inherit it.
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns: {e}"))?;
    }
    let Root { mut created, ca_bundle } = build_root(&setup.rootfs, setup.extra_ca_pem.as_deref(), prepared)?;
    net::loopback_up()?;
    let network = match &setup.network {
        Some(cfg) => Some(net::configure(cfg, &mut created, true).map_err(|e| format!("network: {e}"))?),
        None => None,
    };
    // The scratch disk's filesystem, whose files the export may reference by extent: only a
    // disk the host made and holds (never the tmpfs).
    let disk = match &setup.rootfs.upper_disk {
        Some(_) => Some(fs::metadata(RW).map_err(|e| format!("stat {RW}: {e}"))?.dev()),
        None => None,
    };
    let upper = Upper {
        dir: Path::new(RW).join("upper"),
        excluded: created.into_iter().map(String::into_bytes).collect(),
        disk,
    };
    // Read only now, after the re-seed: the kernel makes the id on first read.
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default().trim().to_owned();
    Ok((Sandbox { upper, ca_bundle }, SetupReport { network, boot_id }))
}

/// Mixes `bytes` into the kernel pool, credits them and re-seeds the CRNG from the pool, so
/// VMs never share RNG state. The re-seed matters for clones of one snapshot: their CRNG is
/// already initialised (identically), and crediting alone does not re-key it until the next
/// periodic re-seed.
fn add_entropy(bytes: &[u8]) -> Result<(), String> {
    if bytes.is_empty() {
        return Ok(());
    }
    let bits = i32::try_from(bytes.len() * 8).map_err(|_| "too much entropy")?;
    let size = i32::try_from(bytes.len()).map_err(|_| "too much entropy")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, built in u32s
    // so it is suitably aligned.
    let mut info = vec![0u32; 2 + bytes.len().div_ceil(4)];
    info[0] = bits.cast_unsigned();
    info[1] = size.cast_unsigned();
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(word);
    }
    let urandom = File::options().write(true).open("/dev/urandom").map_err(|e| format!("open /dev/urandom: {e}"))?;
    // SAFETY: `info` is a live, aligned rand_pool_info whose buffer holds `buf_size` bytes; the
    // kernel only reads from it for the duration of the call.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if rc != 0 {
        return Err(format!("RNDADDENTROPY: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: an argument-less ioctl on an open fd.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) };
    if rc != 0 {
        return Err(format!("RNDRESEEDCRNG: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Drops the guest's cached blocks of `dev`. A clone's disk was probed (partition scan) while
/// it still held the template's empty placeholder; the run's layer is attached behind the same
/// device later, and those stale pages would otherwise hide its first blocks (the superblock).
fn flush_buffers(dev: &Path) -> Result<(), String> {
    let f = File::open(dev).map_err(|e| format!("open {}: {e}", dev.display()))?;
    // SAFETY: an argument-less ioctl on an open block device fd.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKFLSBUF, 0) };
    if rc != 0 {
        return Err(format!("BLKFLSBUF {}: {}", dev.display(), std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Mount points inside the root, in mount order.
const INNER: [(&str, &str, &str, MsFlags); 5] = [
    ("proc", "proc", "", MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC)),
    ("sys", "sysfs", "", MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC)),
    ("dev", "devtmpfs", "mode=0755", MsFlags::MS_NOSUID),
    ("dev/pts", "devpts", "newinstance,ptmxmode=0666,mode=0620", MsFlags::MS_NOSUID),
    ("dev/shm", "tmpfs", "mode=1777", MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV)),
];

/// Unmounts what [`build_root`] (and `net::configure`) mounted for `lowers` layers (the
/// warm-up's root), so `Setup` can build the run's root in the same place. Targets that are
/// not mount points are skipped. `keep_rw`: [`RW`] stays mounted (a scratch disk prepared
/// for a run).
pub fn teardown_root(lowers: usize, keep_rw: bool) -> Result<(), String> {
    let mut targets: Vec<PathBuf> = INNER.iter().rev().map(|(dir, ..)| Path::new(ROOT).join(dir)).collect();
    // The network's bind mount, if any.
    targets.push(Path::new(ROOT).join("etc/resolv.conf"));
    targets.push(PathBuf::from(ROOT));
    targets.push(PathBuf::from(CA));
    if !keep_rw {
        targets.push(PathBuf::from(RW));
    }
    targets.extend((0..lowers).map(|n| PathBuf::from(LOWER).join(n.to_string())));
    for target in targets {
        match nix::mount::umount2(&target, MntFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(format!("umount {}: {e}", target.display())),
        }
    }
    Ok(())
}

/// What [`build_root`] made.
pub struct Root {
    /// Paths (relative) it had to create inside the root.
    pub created: Vec<String>,
    /// See [`Sandbox::ca_bundle`].
    pub ca_bundle: Option<String>,
}

/// Mounts the root, with a layer holding `extra_ca` (PEM) above the image's if given.
/// `prepared`: the scratch disk a `Warmup` mounted on [`RW`], which `spec` must name.
pub fn build_root(spec: &RootfsSpec, extra_ca: Option<&str>, prepared: Option<UpperDisk>) -> Result<Root, String> {
    let disks = find_disks(&spec.lower_serials, Duration::from_secs(3))?;
    let mut lowers = Vec::new();
    for (n, dev) in disks.iter().enumerate() {
        let target = PathBuf::from(LOWER).join(n.to_string());
        mkdirs(&target)?;
        flush_buffers(dev)?;
        do_mount(dev, &target, "erofs", MsFlags::MS_RDONLY, "")?;
        lowers.push(target.display().to_string());
    }
    mkdirs(Path::new(RW))?;
    match (&spec.upper_disk, prepared) {
        (Some(serial), Some(p)) if *serial == p.serial && spec.upper_size_bytes == p.bytes => {}
        // The host releases a prepared disk before it asks for another.
        (_, Some(_)) => return Err("the scratch disk mounted at warm-up is not the one asked for".into()),
        (Some(serial), None) => mount_upper_disk(serial, spec.upper_size_bytes)?,
        (None, None) => {
            let size = format!("size={},mode=0755", spec.upper_size_bytes.min(half_of_ram()));
            do_mount(Path::new("tmpfs"), Path::new(RW), "tmpfs", MsFlags::empty(), &size)?;
        }
    }
    let (upper, work) = (Path::new(RW).join("upper"), Path::new(RW).join("work"));
    mkdirs(&upper)?;
    mkdirs(&work)?;
    mkdirs(Path::new(ROOT))?;
    mount_root(&lowers, &upper, &work)?;
    let mut ca_bundle = None;
    if let Some(pem) = extra_ca {
        // The bundles are read through the image's own merged view, then the root is mounted
        // again with the layer on top. Nothing of the run has run yet.
        mkdirs(Path::new(CA))?;
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        do_mount(Path::new("tmpfs"), Path::new(CA), "tmpfs", flags, "mode=0755,size=64m")?;
        ca_bundle = crate::ca::build_layer(Path::new(ROOT), Path::new(CA), pem)?;
        if ca_bundle.is_some() {
            nix::mount::umount2(ROOT, MntFlags::empty()).map_err(|e| format!("umount {ROOT}: {e}"))?;
            do_mount(Path::new("tmpfs"), Path::new(CA), "", flags | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY, "")?;
            lowers.insert(0, CA.to_owned());
            mount_root(&lowers, &upper, &work)?;
        }
    }
    let mut created = Vec::new();
    for (dir, fstype, opts, flags) in INNER {
        let target = Path::new(ROOT).join(dir);
        match fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => {}
            // Mounting over a symlink would follow it outside the root.
            Ok(_) => return Err(format!("the image's /{dir} is not a directory")),
            Err(_) => {
                fs::create_dir(&target).map_err(|e| format!("mkdir {}: {e}", target.display()))?;
                created.push(dir.to_owned());
            }
        }
        do_mount(Path::new(fstype), &target, fstype, flags, opts)?;
    }
    Ok(Root { created, ca_bundle })
}

/// Half the guest's RAM (the kernel's own default for a tmpfs): a writable layer in RAM that
/// may take all of it leaves the kernel nothing to reclaim, and filling it ends in "System is
/// deadlocked on memory" (seen on 6.12), not in ENOSPC.
fn half_of_ram() -> u64 {
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    // Unknown: what the tmpfs itself would default to is unknown too; keep the request.
    kib.map_or(u64::MAX, |k| k * 1024 / 2)
}

fn mount_root(lowers: &[String], upper: &Path, work: &Path) -> Result<(), String> {
    if lowers.is_empty() {
        return do_mount(upper, Path::new(ROOT), "", MsFlags::MS_BIND, "");
    }
    // No redirects, index or metacopy: the upper layer then holds only plain files, whiteouts
    // and opaque dirs, which is what the export format carries. (Renaming a lower dir gives
    // EXDEV; tools fall back to copy + delete.)
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},redirect_dir=off,index=off,metacopy=off",
        lowers.join(":"),
        upper.display(),
        work.display()
    );
    do_mount(Path::new("overlay"), Path::new(ROOT), "overlay", MsFlags::empty(), &opts)
}

/// Mounts the run's scratch disk (an empty ext4 filesystem the host made) on [`RW`]. A clone's
/// disk grows from the template's placeholder to `bytes` at its warm-up or its assignment;
/// the kernel learns the new capacity asynchronously, so it is waited for.
pub fn mount_upper_disk(serial: &str, bytes: u64) -> Result<(), String> {
    let dev = find_disks(&[serial.to_owned()], Duration::from_secs(3))?.remove(0);
    let sectors = Path::new("/sys/block").join(dev.file_name().unwrap_or_default()).join("size");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let have = fs::read_to_string(&sectors).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
        if have.saturating_mul(512) >= bytes {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!("the scratch disk {} holds {} bytes, not {bytes}", dev.display(), have * 512));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    flush_buffers(&dev)?;
    // `noinit_itable`: the host formatted it with lazy inode tables, which need no zeroing
    // (and zeroing would cost the host disk space for nothing); `discard`: deleted files give
    // their blocks back to the host.
    do_mount(&dev, Path::new(RW), "ext4", MsFlags::MS_NOATIME, "noinit_itable,discard")
}

/// Removes the upper and work dirs of a root taken down with [`RW`] kept, so the next root on
/// it starts empty.
pub fn clear_upper() -> Result<(), String> {
    for dir in ["upper", "work"] {
        let path = Path::new(RW).join(dir);
        match fs::remove_dir_all(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("remove {}: {e}", path.display())),
        }
    }
    Ok(())
}

/// Unmounts the scratch disk a warm-up mounted (see [`mount_upper_disk`]).
pub fn release_upper() -> Result<(), String> {
    nix::mount::umount2(RW, MntFlags::empty()).map_err(|e| format!("umount {RW}: {e}"))
}

/// Maps each serial to its `/dev/vdX`, waiting briefly for disks still being probed.
fn find_disks(serials: &[String], timeout: Duration) -> Result<Vec<PathBuf>, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let found = scan_disks();
        let missing: Vec<&String> = serials.iter().filter(|s| !found.contains_key(*s)).collect();
        if missing.is_empty() {
            return Ok(serials.iter().filter_map(|s| found.get(s).cloned()).collect());
        }
        if Instant::now() >= deadline {
            return Err(format!("no disk with serial {missing:?} (found {:?})", found.keys()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn scan_disks() -> HashMap<String, PathBuf> {
    let mut found = HashMap::new();
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("vd") {
            continue;
        }
        if let Ok(serial) = fs::read_to_string(entry.path().join("serial")) {
            found.insert(serial.trim().to_owned(), Path::new("/dev").join(&name));
        }
    }
    found
}

fn mkdirs(path: &Path) -> Result<(), String> {
    fs::create_dir_all(path).map_err(|e| format!("mkdir {}: {e}", path.display()))
}

fn do_mount(src: &Path, target: &Path, fstype: &str, flags: MsFlags, opts: &str) -> Result<(), String> {
    let fstype = (!fstype.is_empty()).then_some(fstype);
    let data = (!opts.is_empty()).then_some(opts);
    mount(Some(src), target, fstype, flags, data)
        .map_err(|e| format!("mount {} on {} ({}): {e}", src.display(), target.display(), opts))
}
