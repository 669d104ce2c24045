//! Guest assets: the kernel (an uncompressed `vmlinux` extracted from the installed
//! distribution kernel, booted via PVH) and the initramfs (agent as `/init` plus kernel modules).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::VmError;
use crate::cpio::CpioWriter;
use crate::decompress;
use crate::modules::{ModulesDep, NEEDED_MODULES};

/// Where the agent finds the module load order inside the initramfs.
const ORDER_FILE: &str = "boxwood.order";

/// A bootable kernel + initramfs pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestAssets {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub kernel_release: String,
}

/// Builds (or reuses, if up to date) the guest kernel and initramfs in `out_dir`.
///
/// - kernel: the uncompressed vmlinux from `/boot/vmlinuz-<release>` (LZ4 or zstd payload),
///   falling back to the bzImage itself if extraction fails. The release is
///   `default_release` unless `kernel_release` is given.
/// - initramfs: uncompressed newc cpio with `/init` = the agent, the needed modules (with
///   dependencies from `modules.dep`, built-in ones skipped, compressed ones decoded) as
///   plain `.ko` files in `/lib/modules/` and their load order in
///   `/lib/modules/boxwood.order`.
///
/// Writes are atomic and the file names carry a content hash.
pub fn prepare_guest_assets(
    agent_binary: &Path,
    out_dir: &Path,
    kernel_release: Option<&str>,
) -> Result<GuestAssets, VmError> {
    let image = fs::read(agent_binary).map_err(|e| VmError::io(format!("read {}", agent_binary.display()), e))?;
    if !is_static_elf(&image) {
        // The initramfs has no dynamic loader: such a /init panics the guest kernel.
        return Err(VmError::Assets(format!(
            "{} is not a statically linked x86-64 ELF; build the agent with scripts/build-agent.sh",
            agent_binary.display()
        )));
    }
    prepare_from(agent_binary, out_dir, kernel_release, Path::new("/boot"), Path::new("/lib/modules"))
}

/// Whether `elf` is a 64-bit little-endian x86-64 ELF with no program interpreter
/// (`PT_INTERP`), i.e. it runs without a dynamic loader.
pub fn is_static_elf(elf: &[u8]) -> bool {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| elf.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |o: usize| elf.get(o..o + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    // ELFCLASS64, ELFDATA2LSB, EM_X86_64
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) || u16_at(18) != Some(62) {
        return false;
    }
    let (Some(phoff), Some(entsize), Some(count)) = (u64_at(32), u16_at(54), u16_at(56)) else { return false };
    (0..usize::from(count)).all(|i| {
        let at = usize::try_from(phoff).unwrap_or(usize::MAX).saturating_add(i * usize::from(entsize));
        u32_at(at).is_some_and(|kind| kind != 3)
    })
}

pub(crate) fn prepare_from(
    agent_binary: &Path,
    out_dir: &Path,
    kernel_release: Option<&str>,
    boot_dir: &Path,
    modules_root: &Path,
) -> Result<GuestAssets, VmError> {
    let release = match kernel_release {
        Some(r) => r.to_owned(),
        None => default_release(boot_dir)?,
    };
    fs::create_dir_all(out_dir).map_err(|e| VmError::io(format!("create {}", out_dir.display()), e))?;
    let kernel = prepare_kernel(&boot_dir.join(format!("vmlinuz-{release}")), out_dir, &release)?;
    let initramfs = prepare_initramfs(agent_binary, &modules_root.join(&release), out_dir)?;
    Ok(GuestAssets { kernel, initramfs, kernel_release: release })
}

/// The release to boot: the newest Debian cloud kernel, else the newest Ubuntu `-kvm` kernel
/// (both lean, virtio-first builds), else the newest installed kernel of any flavour.
fn default_release(boot_dir: &Path) -> Result<String, VmError> {
    let entries = fs::read_dir(boot_dir).map_err(|e| VmError::io(format!("read {}", boot_dir.display()), e))?;
    let releases = entries.flatten().filter_map(|e| {
        let name = e.file_name().into_string().ok()?;
        let release = name.strip_prefix("vmlinuz-")?;
        (!release.is_empty() && !release.ends_with(".old")).then(|| release.to_owned())
    });
    let flavour = |r: &str| u8::from(r.ends_with("-cloud-amd64")) * 2 + u8::from(r.ends_with("-kvm"));
    releases
        .max_by_key(|r| (flavour(r), version_key(r)))
        .ok_or_else(|| VmError::Assets(format!("no vmlinuz-* kernel in {}", boot_dir.display())))
}

/// Numeric components of a release string, for ordering ("6.12.0-1" > "6.1.0-56").
pub(crate) fn version_key(release: &str) -> Vec<u64> {
    release.split(|c: char| !c.is_ascii_digit()).filter_map(|s| s.parse().ok()).collect()
}

fn short_hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(u64::try_from(p.len()).unwrap_or(u64::MAX).to_le_bytes());
        h.update(p);
    }
    hex::encode(&h.finalize()[..8])
}

fn read(path: &Path) -> Result<Vec<u8>, VmError> {
    fs::read(path).map_err(|e| VmError::io(format!("read {}", path.display()), e))
}

fn prepare_kernel(vmlinuz: &Path, out_dir: &Path, release: &str) -> Result<PathBuf, VmError> {
    let image = read(vmlinuz)?;
    let out = out_dir.join(format!("vmlinux-{release}-{}", short_hash(&[&image])));
    if out.is_file() {
        return Ok(out);
    }
    match decompress::extract_vmlinux(&image) {
        Some(elf) => {
            write_atomic(&out, &elf)?;
            Ok(out)
        }
        None => {
            tracing::warn!(kernel = %vmlinuz.display(), "could not extract vmlinux; booting the bzImage");
            Ok(vmlinuz.to_path_buf())
        }
    }
}

fn prepare_initramfs(agent: &Path, modules_dir: &Path, out_dir: &Path) -> Result<PathBuf, VmError> {
    let agent_bytes = read(agent)?;
    let dep_path = modules_dir.join("modules.dep");
    let mut dep = ModulesDep::parse(
        &fs::read_to_string(&dep_path).map_err(|e| VmError::io(format!("read {}", dep_path.display()), e))?,
    );
    // Drivers built into the kernel (virtio_console on Debian 13, most of virtio on Ubuntu)
    // need no file; kernels without the list simply have none.
    if let Ok(builtin) = fs::read_to_string(modules_dir.join("modules.builtin")) {
        dep.add_builtin(&builtin);
    }
    let order = dep.resolve(NEEDED_MODULES)?;

    let mut cpio = CpioWriter::new();
    for dir in ["dev", "proc", "sys", "run", "tmp", "lib", "lib/modules"] {
        cpio.dir(dir, 0o755);
    }
    cpio.char_dev("dev/console", 0o600, 5, 1);
    cpio.file("init", 0o755, &agent_bytes);
    let mut order_file = String::new();
    for rel in &order {
        let base = decompress::plain_module_name(rel);
        cpio.file(&format!("lib/modules/{base}"), 0o644, &decompress::module(rel, read(&modules_dir.join(rel))?)?);
        order_file.push_str(&base);
        order_file.push('\n');
    }
    cpio.file(&format!("lib/modules/{ORDER_FILE}"), 0o644, order_file.as_bytes());
    let archive = cpio.finish();

    let out = out_dir.join(format!("initramfs-{}.cpio", short_hash(&[&archive])));
    if !out.is_file() {
        write_atomic(&out, &archive)?;
    }
    Ok(out)
}

/// Writes `data` to a temp file next to `path`, fsyncs it and renames it into place.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), VmError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}.{:x}", std::process::id(), rand::random::<u32>()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| VmError::io(format!("write {}", path.display()), e))
}

#[cfg(test)]
mod elf_tests {
    use super::is_static_elf;

    #[test]
    fn tells_static_from_dynamic_executables() {
        // /bin/busybox of busybox-static is static; /bin/sh (dash) needs ld.so.
        assert!(is_static_elf(&std::fs::read("/bin/busybox").unwrap()));
        assert!(!is_static_elf(&std::fs::read("/bin/sh").unwrap()));
        assert!(!is_static_elf(b"#!/bin/sh\n"));
        assert!(!is_static_elf(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]), "truncated header");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_ordering() {
        let mut v = vec!["6.1.0-56-cloud-amd64", "6.12.0-1-cloud-amd64", "6.1.0-9-cloud-amd64"];
        v.sort_by_key(|r| version_key(r));
        assert_eq!(v, ["6.1.0-9-cloud-amd64", "6.1.0-56-cloud-amd64", "6.12.0-1-cloud-amd64"]);
    }

    #[test]
    fn picks_the_cloud_kernel_then_kvm_then_any() {
        let tmp = tempfile::tempdir().unwrap();
        let boot = tmp.path();
        assert!(default_release(boot).is_err());
        for name in ["vmlinuz-6.8.0-50-generic", "vmlinuz-6.8.0-49-generic", "vmlinuz-6.8.0-50-generic.old"] {
            fs::write(boot.join(name), b"k").unwrap();
        }
        assert_eq!(default_release(boot).unwrap(), "6.8.0-50-generic");
        fs::write(boot.join("vmlinuz-6.8.0-40-kvm"), b"k").unwrap();
        assert_eq!(default_release(boot).unwrap(), "6.8.0-40-kvm");
        fs::write(boot.join("vmlinuz-6.1.0-9-cloud-amd64"), b"k").unwrap();
        assert_eq!(default_release(boot).unwrap(), "6.1.0-9-cloud-amd64");
    }

    #[test]
    fn fake_tree_builds_assets_and_reuses_them() {
        let tmp = tempfile::tempdir().unwrap();
        let (boot, mods, out) = (tmp.path().join("boot"), tmp.path().join("mods"), tmp.path().join("out"));
        let rel = "9.9.9-1-cloud-amd64";
        fs::create_dir_all(&boot).unwrap();
        fs::write(boot.join(format!("vmlinuz-{rel}")), b"not a real kernel").unwrap();
        fs::write(boot.join("vmlinuz-1.0.0-1-cloud-amd64"), b"older").unwrap();
        let mdir = mods.join(rel);
        let deps = [
            ("virtio_ring", ""),
            ("virtio", "virtio_ring.ko"),
            ("virtio_mmio", "virtio.ko virtio_ring.ko"),
            ("virtio_console", "virtio.ko virtio_ring.ko"),
            ("virtio_blk", "virtio.ko virtio_ring.ko"),
            ("erofs", ""),
            ("overlay", ""),
            ("failover", ""),
            ("net_failover", "failover.ko"),
            ("virtio_net", "net_failover.ko failover.ko virtio.ko virtio_ring.ko"),
        ];
        // overlay ships xz-compressed and virtio_console is built in, as on Debian 13.
        let dep: String = deps
            .iter()
            .filter(|(m, _)| *m != "virtio_console")
            .map(|(m, d)| {
                let elf = [b"\x7fELF".as_slice(), m.as_bytes()].concat();
                if *m == "overlay" {
                    let mut xz = Vec::new();
                    lzma_rs::xz_compress(&mut &elf[..], &mut xz).unwrap();
                    fs::write(mdir_path(&mdir, "overlay.ko.xz"), xz).unwrap();
                    return "overlay.ko.xz:\n".to_owned();
                }
                fs::write(mdir_path(&mdir, &format!("{m}.ko")), elf).unwrap();
                format!("{m}.ko: {d}\n")
            })
            .collect();
        fs::write(mdir.join("modules.dep"), dep).unwrap();
        fs::write(mdir.join("modules.builtin"), "kernel/drivers/char/virtio_console.ko\n").unwrap();
        let agent = tmp.path().join("agent");
        fs::write(&agent, b"agent v1").unwrap();

        let a = prepare_from(&agent, &out, None, &boot, &mods).unwrap();
        assert_eq!(a.kernel_release, rel);
        assert_eq!(a.kernel, boot.join(format!("vmlinuz-{rel}")), "falls back to the bzImage");
        let cpio = fs::read(&a.initramfs).unwrap();
        let text = String::from_utf8_lossy(&cpio);
        assert!(text.contains("agent v1") && text.contains("lib/modules/boxwood.order"));
        assert!(text.contains("virtio_ring.ko\nvirtio.ko\nvirtio_mmio.ko\nvirtio_blk.ko\n"), "{text}");
        assert!(text.contains("\x7fELFoverlay") && text.contains("lib/modules/overlay.ko\0"), "decompressed");

        let again = prepare_from(&agent, &out, Some(rel), &boot, &mods).unwrap();
        assert_eq!(again, a, "unchanged inputs reuse the same files");
        fs::write(&agent, b"agent v2").unwrap();
        let changed = prepare_from(&agent, &out, None, &boot, &mods).unwrap();
        assert_ne!(changed.initramfs, a.initramfs, "a new agent gives a new initramfs name");
    }

    fn mdir_path(dir: &Path, file: &str) -> PathBuf {
        fs::create_dir_all(dir).unwrap();
        dir.join(file)
    }
}
