//! Templates for fast start: a VM booted once with a fixed device layout (agent port, a NIC
//! with its link down, [`crate::qemu::SLOTS`] disk slots holding an empty qcow2) and snapshotted right
//! after its agent said `Hello`, with guest RAM in a file (`x-ignore-shared`), so clones map
//! that file copy-on-write and load only the device state (tens of KiB).
//!
//! On disk, `<templates>/<key>/`: `ram` (guest RAM), `state` (the migration stream),
//! `slot.qcow2`, `warm.erofs` (the warm-up image behind empty slots), `hello.json`, `lock`. The key hashes everything that shapes the snapshot;
//! a template is built in `.build-…` and renamed into place, and templates with other keys are
//! removed once no process holds their `lock` (each user keeps a shared `flock` on it).

use std::fs::{self, File};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use boxwood_image::erofs::{Content, Node, NodeKind, NodeMeta, Tree, write_image};
use boxwood_protocol::Hello;
use nix::fcntl::{Flock, FlockArg};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::VmError;
use crate::jail::{Inherited, give_dir};
use crate::qemu::{Devices, VmPaths};
use crate::qmp::{Qmp, is_migration_status};
use crate::runtime::{Base, BootChannel, DirGuard, Shape};
use crate::scratch::PLACEHOLDER_BYTES;

/// Bump whenever the fixed layout, the snapshot procedure or what a clone expects of the
/// template changes: the key changes with it and old templates are rebuilt.
const LAYOUT_VERSION: u32 = 4;
/// Virtual size of every slot. The guest reads a disk's capacity once, when it probes the
/// template's empty slot, so the slot keeps this size whatever is attached later (a qcow2
/// overlay reads zeros past the end of its backing file); larger layers cold-boot.
pub const SLOT_BYTES: u64 = 1 << 40;
/// Time the template idles after its warm-up so that deferred work is done before the
/// snapshot.
const SETTLE: Duration = Duration::from_millis(300);
/// Path of the warm-up program inside `warm.erofs`: a copy of the agent binary, which, not
/// being PID 1, prints one line to stderr and exits (so the warm-up covers output too).
pub const WARM_BINARY: &str = "/warm";

/// A ready template. Holds a shared lock on its dir so no other process removes it.
#[derive(Debug)]
pub(crate) struct Template {
    pub key: String,
    pub ram: PathBuf,
    pub state: PathBuf,
    pub slot_image: PathBuf,
    pub warm_image: PathBuf,
    pub hello: Hello,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Guest RAM for clones: a copy of `ram` in a memfd sealed against every change, so a
    /// clone's QEMU can open it read-write (QEMU 7.2 insists, even for a private mapping)
    /// without being able to alter what later clones start from.
    pub ram_copy: OwnedFd,
    _lock: Flock<File>,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let context = context.into();
    move |e| VmError::io(context, e)
}

/// The template key: sha256 over the layout version, the kernel and initramfs (agent
/// included) contents, the QEMU binary and its `--version`, memory, vCPUs, accelerator and
/// kernel command line.
pub(crate) fn template_key(base: &Base, qemu_version: &str) -> Result<String, VmError> {
    let mut h = Sha256::new();
    let mut field = |name: &str, value: &[u8]| {
        h.update(name.as_bytes());
        h.update((value.len() as u64).to_le_bytes());
        h.update(value);
    };
    field("layout", &LAYOUT_VERSION.to_le_bytes());
    for (name, path) in [("kernel", &base.assets.kernel), ("initramfs", &base.assets.initramfs)] {
        let mut file_hash = Sha256::new();
        let mut f = File::open(path).map_err(io(format!("open {}", path.display())))?;
        std::io::copy(&mut f, &mut file_hash).map_err(io(format!("read {}", path.display())))?;
        field(name, &file_hash.finalize());
    }
    field("qemu", base.config.qemu_binary.as_os_str().as_encoded_bytes());
    field("qemu-version", qemu_version.as_bytes());
    field("memory", &base.config.memory_mib.to_le_bytes());
    field("vcpus", &base.config.vcpus.to_le_bytes());
    field("accel", base.accel.as_str().as_bytes());
    field("cmdline", base.cmdline.as_bytes());
    Ok(hex::encode(&h.finalize()[..16]))
}

/// Where a runtime keeps its templates: next to the guest kernel and initramfs they are
/// made from.
pub(crate) fn templates_root(base: &Base) -> PathBuf {
    base.assets.initramfs.parent().unwrap_or(Path::new(".")).join("templates")
}

/// Loads the template for this runtime's key, building it first if needed.
pub(crate) async fn prepare(base: &Base) -> Result<Template, VmError> {
    let version = qemu_version(&base.config.qemu_binary).await?;
    let key = {
        let base = base.clone();
        blocking("hashing", move || template_key(&base, &version)).await?
    };
    let root = templates_root(base);
    fs::create_dir_all(&root).map_err(io(format!("create {}", root.display())))?;
    let dir = root.join(&key);
    let template = match load_blocking(&dir, &key, base, None).await {
        Ok(t) => t,
        Err(_) => {
            let started = std::time::Instant::now();
            let lock = build(base, &root, &key).await?;
            let t = load_blocking(&dir, &key, base, lock).await?;
            tracing::info!(key, ms = started.elapsed().as_millis(), "built a VM template");
            t
        }
    };
    let keep = key.clone();
    blocking("template cleanup", move || {
        remove_stale(&root, &keep);
        Ok(())
    })
    .await?;
    Ok(template)
}

/// Runs `f` off the async threads: the template's files are large and fsynced, and under a
/// busy disk one `fsync` takes seconds, which on a runtime thread would stall every VM's
/// agent channel (a reply waited for then times out although it arrived).
async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T, VmError> + Send + 'static,
) -> Result<T, VmError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| VmError::Template(format!("{what} task failed: {e}")))?
}

async fn qemu_version(binary: &Path) -> Result<String, VmError> {
    let out = tokio::process::Command::new(binary)
        .arg("--version")
        .output()
        .await
        .map_err(io(format!("run {} --version", binary.display())))?;
    if !out.status.success() {
        return Err(VmError::Template(format!("{} --version failed: {}", binary.display(), out.status)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn load_blocking(dir: &Path, key: &str, base: &Base, lock: Option<Flock<File>>) -> Result<Template, VmError> {
    let (dir, key, base) = (dir.to_owned(), key.to_owned(), base.clone());
    blocking("loading", move || load(&dir, &key, &base, lock)).await
}

/// A sealed memfd (named `name`) holding `path`'s bytes; all-zero runs stay holes (guest RAM
/// is mostly untouched), so it costs what the guest used. A jailed QEMU may reopen it through
/// `/proc/self/fd` (a memfd's own mode lets it) but never change it.
pub(crate) fn sealed_copy(path: &Path, name: &str) -> Result<OwnedFd, VmError> {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let src = File::open(path).map_err(io(format!("open {}", path.display())))?;
    let len = src.metadata().map_err(io(format!("stat {}", path.display())))?.len();
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
        .map_err(|e| VmError::io("memfd_create", e.into()))?;
    let dst = File::from(fd);
    dst.set_len(len).map_err(io(format!("size the copy of {}", path.display())))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = src.read_at(&mut buf, off).map_err(io(format!("read {}", path.display())))?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_all_at(&buf[..n], off).map_err(io(format!("copy {}", path.display())))?;
        }
        off += n as u64;
    }
    let seals = SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
    // The write seal is refused (EBUSY) while a page still has a transient extra reference
    // (just-written pages wait in another CPU's LRU batch): that passes, so try again.
    let mut tries = 0;
    loop {
        match fcntl(dst.as_fd(), FcntlArg::F_ADD_SEALS(seals)) {
            Ok(_) => return Ok(dst.into()),
            Err(nix::errno::Errno::EBUSY) if tries < 20 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => return Err(VmError::io(format!("seal the copy of {}", path.display()), e.into())),
        }
    }
}

/// `lock`: the builder's exclusive lock on the dir's `lock`, downgraded here, so no other
/// process can take the fresh template for a stale one in between.
fn load(dir: &Path, key: &str, base: &Base, lock: Option<Flock<File>>) -> Result<Template, VmError> {
    let lock_err = |e: nix::errno::Errno| VmError::Template(format!("lock {}: {e}", dir.display()));
    let lock = match lock {
        Some(lock) => {
            lock.relock(FlockArg::LockShared).map_err(lock_err)?;
            lock
        }
        None => {
            let file = File::open(dir.join("lock")).map_err(io(format!("open {}/lock", dir.display())))?;
            Flock::lock(file, FlockArg::LockSharedNonblock).map_err(|(_, e)| lock_err(e))?
        }
    };
    let hello_path = dir.join("hello.json");
    let text = fs::read_to_string(&hello_path).map_err(io(format!("read {}", hello_path.display())))?;
    let hello: Hello = serde_json::from_str(&text).map_err(|e| VmError::Template(format!("bad hello.json: {e}")))?;
    let ram = dir.join("ram");
    if !ram.is_file() {
        return Err(VmError::Template(format!("{} is missing", ram.display())));
    }
    let ram_copy = sealed_copy(&ram, "boxwood-template-ram")?;
    let t = Template {
        ram_copy,
        key: key.to_owned(),
        ram,
        state: dir.join("state"),
        slot_image: dir.join("slot.qcow2"),
        warm_image: dir.join("warm.erofs"),
        hello,
        memory_mib: base.config.memory_mib,
        vcpus: base.config.vcpus,
        _lock: lock,
    };
    for f in [&t.ram, &t.state, &t.slot_image, &t.warm_image] {
        if !f.is_file() {
            return Err(VmError::Template(format!("{} is missing", f.display())));
        }
    }
    Ok(t)
}

/// Boots the template VM in `.build-<key>-…`, snapshots it and renames the dir to `<key>`.
/// Returns the exclusive lock on the published dir, or `None` if another process published
/// the same key first.
async fn build(base: &Base, root: &Path, key: &str) -> Result<Option<Flock<File>>, VmError> {
    let tag = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
    let build_dir = root.join(format!(".build-{key}-{tag}"));
    fs::create_dir(&build_dir).map_err(io(format!("create {}", build_dir.display())))?;
    // Held exclusively while building, so a concurrent `remove_stale` leaves the dir alone.
    let lock = File::create(build_dir.join("lock")).map_err(io("create lock"))?;
    let lock = Flock::lock(lock, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| VmError::Template(format!("lock {}: {e}", build_dir.display())))?;
    let snapshot = crate::runtime::boot_with_retries("template", || {
        // A refused attempt leaves its RAM file behind; the next creates it anew.
        let _ = fs::remove_file(build_dir.join("ram"));
        snapshot(base, &build_dir, &tag)
    })
    .await;
    let dest = root.join(key);
    let published = blocking("template publish", move || {
        let result = snapshot.and_then(|()| publish(&build_dir, &dest));
        // Still there: ours was not renamed into place (another process won), or it failed.
        if result.is_err() || build_dir.exists() {
            let _ = fs::remove_dir_all(&build_dir);
        }
        result
    })
    .await?;
    Ok(published.then_some(lock))
}

/// Boot → `Hello` → `Warmup` → settle → link down → migrate (RAM stays in the shared file)
/// → quit.
async fn snapshot(base: &Base, build_dir: &Path, tag: &str) -> Result<(), VmError> {
    let slot_image = build_dir.join("slot.qcow2");
    let warm_image = build_dir.join("warm.erofs");
    let (initramfs, slot, warm) = (base.assets.initramfs.clone(), slot_image.clone(), warm_image.clone());
    blocking("template images", move || {
        write_file(&slot, &empty_qcow2(SLOT_BYTES))?;
        make_warm_image(&initramfs, &warm)
    })
    .await?;
    let ram = build_dir.join("ram");
    // Sockets and logs live in the run dir: the templates dir may be too deep for a
    // 107-byte socket path. `reap_stale` removes it after a crash.
    let paths = VmPaths::new(base.run_dir.join(format!("template-{tag}")))?;
    fs::create_dir(&paths.dir).map_err(io(format!("create {}", paths.dir.display())))?;
    let _scratch = DirGuard { dir: paths.dir.clone(), armed: true };
    let lease = base.lease_uid()?;
    let mut inherited = Inherited::default();
    // QEMU reopens the RAM file through /proc/self/fd read-write: its uid owns it while it
    // builds; afterwards it is root's again (clones get a sealed copy).
    let ram_file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&ram)
        .map_err(io(format!("create {}", ram.display())))?;
    if let Some(lease) = &lease {
        give_dir(&paths.dir, lease.uid())?;
        std::os::unix::fs::fchown(&ram_file, Some(lease.uid()), Some(lease.uid()))
            .map_err(io(format!("chown {}", ram.display())))?;
    }
    let devices = Devices::Fixed {
        ram: inherited.add(ram_file),
        shared_ram: true,
        slot_image: inherited.open(&slot_image)?,
        warm_image: inherited.open(&warm_image)?,
        scratch: inherited.add(crate::scratch::unlinked_file(&paths.dir, PLACEHOLDER_BYTES)?),
        incoming: false,
    };
    let shape = Shape { accel: base.accel, memory_mib: base.config.memory_mib, vcpus: base.config.vcpus };
    let argv = base.argv(shape, &mut inherited, devices)?;
    let state = File::create(build_dir.join("state")).map_err(io("create the template state"))?;
    let qemu = base.spawn_qemu(argv, &paths, true, inherited, lease, shape)?;
    let deadline = Instant::now() + Duration::from_secs(base.config.boot_timeout_secs);
    let result = async {
        let mut chan = BootChannel::connect(&paths, &qemu, deadline).await?;
        let hello = chan.hello(&qemu, deadline).await?;
        // What a warm-up leaves in guest memory (the empty network namespace, caches) is then
        // in every clone for free.
        if let Some(error) = chan.warm_up(&qemu, deadline, None).await? {
            return Err(VmError::Template(format!("the template's warm-up failed: {error}")));
        }
        tokio::time::sleep(SETTLE).await;
        let mut qmp = Qmp::connect(&paths.qmp_sock, deadline, || qemu.exited().is_none()).await?;
        let caps = json!({"capabilities": [
            {"capability": "x-ignore-shared", "state": true},
            {"capability": "events", "state": true},
        ]});
        // QEMU's sandbox forbids `exec:`: the state goes to a file the server opened.
        qmp.execute_with_fd("getfd", json!({"fdname": "state"}), state.as_fd()).await?;
        qmp.execute_batch(&[
            ("set_link", Some(json!({"name": "net0", "up": false}))),
            ("migrate-set-capabilities", Some(caps)),
            ("migrate", Some(json!({"uri": "fd:state"}))),
        ])
        .await?;
        let ev = qmp.wait_event(|e| is_migration_status(e, &["completed", "failed", "cancelled"])).await?;
        if !is_migration_status(&ev, &["completed"]) {
            return Err(VmError::Template(format!("snapshot failed: {ev}")));
        }
        let _ = qmp.execute("quit", None).await;
        serde_json::to_vec(&hello).map_err(|e| VmError::Template(format!("hello.json: {e}")))
    }
    .await;
    // A boot that failed is told with QEMU's status and the console, as a run's would be.
    let result = match result {
        Err(e @ (VmError::Boot { .. } | VmError::DiedBeforeHello { .. })) => {
            Err(crate::runtime::fail_boot(e, &paths, &qemu).await)
        }
        other => other,
    };
    if result.is_err() {
        qemu.kill();
    }
    if qemu.wait(Duration::from_secs(10)).await.is_none() {
        qemu.kill();
        return Err(VmError::Template("the template QEMU did not exit".into()));
    }
    let hello_json = result?;
    let (jailed, build_dir) = (base.jail.is_some(), build_dir.to_owned());
    blocking("template sync", move || {
        if jailed {
            std::os::unix::fs::chown(&ram, Some(0), Some(0)).map_err(io(format!("chown {}", ram.display())))?;
        }
        fs::set_permissions(&ram, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(io(format!("chmod {}", ram.display())))?;
        // The RAM file was written through the page cache by QEMU: make it durable before the
        // dir is published, so a crash never leaves a template whose RAM is half on disk.
        for f in [&ram, &build_dir.join("state")] {
            File::open(f).and_then(|f| f.sync_all()).map_err(io(format!("sync {}", f.display())))?;
        }
        write_file(&build_dir.join("hello.json"), &hello_json)
    })
    .await
}

/// Renames the build dir to `dest`; `false` if another process published the same key first
/// (theirs is as good as ours).
fn publish(build_dir: &Path, dest: &Path) -> Result<bool, VmError> {
    File::open(build_dir).and_then(|d| d.sync_all()).map_err(io("sync the template dir"))?;
    let published = match fs::rename(build_dir, dest) {
        Ok(()) => true,
        Err(_) if dest.join("hello.json").is_file() => false,
        Err(e) => return Err(VmError::io(format!("rename to {}", dest.display()), e)),
    };
    if let Some(parent) = dest.parent() {
        File::open(parent).and_then(|d| d.sync_all()).map_err(io("sync the templates dir"))?;
    }
    Ok(published)
}

/// Removes every template dir (and abandoned build dir) but `keep` that no process holds.
fn remove_stale(root: &Path, keep: &str) {
    let Ok(entries) = fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == keep || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = entry.path();
        let free = match File::open(dir.join("lock")) {
            Ok(f) => Flock::lock(f, FlockArg::LockExclusiveNonblock).is_ok(),
            Err(_) => true,
        };
        if free {
            match fs::remove_dir_all(&dir) {
                Ok(()) => tracing::info!(dir = %dir.display(), "removed a stale VM template"),
                Err(e) => tracing::warn!(dir = %dir.display(), "cannot remove a stale VM template: {e}"),
            }
        }
    }
}

/// `warm.erofs`: an erofs image holding [`WARM_BINARY`], the agent taken from the initramfs.
fn make_warm_image(initramfs: &Path, dest: &Path) -> Result<(), VmError> {
    let archive = fs::read(initramfs).map_err(io(format!("read {}", initramfs.display())))?;
    let agent = crate::cpio::find_file(&archive, "init")
        .ok_or_else(|| VmError::Template(format!("no /init in {}", initramfs.display())))?;
    let dir_meta = NodeMeta { perm: 0o755, ..NodeMeta::default() };
    let mut tree = Tree::new(dir_meta.clone());
    let name = WARM_BINARY.trim_start_matches('/').as_bytes();
    tree.add(0, name, Node { kind: NodeKind::Regular(Content::Bytes(agent.to_vec())), meta: dir_meta });
    let _ = fs::remove_file(dest);
    write_image(&tree, dest).map_err(|e| VmError::Template(format!("write {}: {e}", dest.display())))
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), VmError> {
    let mut f = File::create(path).map_err(io(format!("create {}", path.display())))?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(io(format!("write {}", path.display())))
}

/// An empty qcow2 (version 3, 64 KiB clusters) of `size` virtual bytes, no backing file:
/// header, refcount table, one refcount block, then the all-zero L1 table.
pub(crate) fn empty_qcow2(size: u64) -> Vec<u8> {
    const CLUSTER: u64 = 1 << 16;
    // One L2 table maps CLUSTER/8 clusters.
    let l2_span = CLUSTER * (CLUSTER / 8);
    let l1_entries = size.div_ceil(l2_span);
    let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER).max(1);
    let clusters = 3 + l1_clusters;
    let mut img = vec![0u8; usize::try_from(clusters * CLUSTER).unwrap_or(usize::MAX)];
    let mut put = |at: usize, bytes: &[u8]| img[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, b"QFI\xfb");
    put(4, &3u32.to_be_bytes()); // version
    put(20, &16u32.to_be_bytes()); // cluster_bits
    put(24, &size.to_be_bytes());
    put(36, &u32::try_from(l1_entries).unwrap_or(u32::MAX).to_be_bytes());
    put(40, &(3 * CLUSTER).to_be_bytes()); // l1_table_offset
    put(48, &CLUSTER.to_be_bytes()); // refcount_table_offset
    put(56, &1u32.to_be_bytes()); // refcount_table_clusters
    put(96, &4u32.to_be_bytes()); // refcount_order: 16-bit refcounts
    put(100, &104u32.to_be_bytes()); // header_length; the end-of-extensions marker follows
    put(CLUSTER as usize, &(2 * CLUSTER).to_be_bytes()); // refcount table → block
    for c in 0..clusters {
        put((2 * CLUSTER + 2 * c) as usize, &1u16.to_be_bytes());
    }
    img
}

/// A template value for unit tests (its files need not exist).
#[cfg(test)]
pub(crate) fn test_template(dir: &Path, memory_mib: u32, vcpus: u32) -> Template {
    let lock = Flock::lock(File::create(dir.join("lock")).unwrap(), FlockArg::LockSharedNonblock).unwrap();
    let hello = Hello {
        version: boxwood_protocol::PROTOCOL_VERSION,
        kernel_release: "k".into(),
        machine: "x86_64".into(),
        boot_id: String::new(),
        clock_events: "lapic".into(),
    };
    Template {
        ram_copy: File::create(dir.join("ram-copy")).unwrap().into(),
        key: "test".into(),
        ram: dir.join("ram"),
        state: dir.join("state"),
        slot_image: dir.join("slot.qcow2"),
        warm_image: dir.join("warm.erofs"),
        hello,
        memory_mib,
        vcpus,
        _lock: lock,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_qcow2_passes_qemu_img_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.qcow2");
        std::fs::write(&path, empty_qcow2(SLOT_BYTES)).unwrap();
        let Ok(out) = std::process::Command::new("qemu-img").args(["info", "--output=json"]).arg(&path).output() else {
            eprintln!("qemu-img not installed: skipped");
            return;
        };
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!((info["format"].as_str(), info["virtual-size"].as_u64()), (Some("qcow2"), Some(SLOT_BYTES)));
        let check = std::process::Command::new("qemu-img").arg("check").arg(&path).output().unwrap();
        assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
    }

    #[test]
    fn stale_templates_go_unless_someone_holds_them() {
        let root = tempfile::tempdir().unwrap();
        let dir = |name: &str| {
            let d = root.path().join(name);
            std::fs::create_dir(&d).unwrap();
            File::create(d.join("lock")).unwrap();
            d
        };
        let (keep, held, building, free) = (dir("keep"), dir("held"), dir(".build-x"), dir("free"));
        std::fs::create_dir(root.path().join("no-lock-file")).unwrap();
        let _held = Flock::lock(File::open(held.join("lock")).unwrap(), FlockArg::LockSharedNonblock).unwrap();
        let _building =
            Flock::lock(File::open(building.join("lock")).unwrap(), FlockArg::LockExclusiveNonblock).unwrap();
        remove_stale(root.path(), "keep");
        assert!(keep.is_dir() && held.is_dir() && building.is_dir());
        assert!(!free.exists() && !root.path().join("no-lock-file").exists());
    }
}
