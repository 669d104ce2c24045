//! Guest assets: the kernel (an uncompressed `vmlinux` extracted from the installed Debian
//! cloud kernel, booted via PVH) and the initramfs (agent as `/init` plus kernel modules).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::VmError;
use crate::cpio::CpioWriter;
use crate::modules::{ModulesDep, NEEDED_MODULES};

/// Where the agent finds the module load order inside the initramfs.
const ORDER_FILE: &str = "boxwood.order";
/// Magic of the kernel's LZ4 "legacy" stream (0x184C2102, little-endian).
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
/// Uncompressed size of a legacy LZ4 block.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// A bootable kernel + initramfs pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestAssets {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub kernel_release: String,
}

/// Builds (or reuses, if up to date) the guest kernel and initramfs in `out_dir`.
///
/// - kernel: the uncompressed vmlinux from `/boot/vmlinuz-<release>` (LZ4 payload), falling
///   back to the bzImage itself if extraction fails. The newest installed `*-cloud-amd64`
///   release is used unless `kernel_release` is given.
/// - initramfs: uncompressed newc cpio with `/init` = the agent, the needed `.ko` files (with
///   dependencies from `modules.dep`) in `/lib/modules/` and their load order in
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
        None => newest_cloud_release(boot_dir)?,
    };
    fs::create_dir_all(out_dir).map_err(|e| VmError::io(format!("create {}", out_dir.display()), e))?;
    let kernel = prepare_kernel(&boot_dir.join(format!("vmlinuz-{release}")), out_dir, &release)?;
    let initramfs = prepare_initramfs(agent_binary, &modules_root.join(&release), out_dir)?;
    Ok(GuestAssets { kernel, initramfs, kernel_release: release })
}

fn newest_cloud_release(boot_dir: &Path) -> Result<String, VmError> {
    let entries = fs::read_dir(boot_dir).map_err(|e| VmError::io(format!("read {}", boot_dir.display()), e))?;
    let releases = entries.flatten().filter_map(|e| {
        let name = e.file_name().into_string().ok()?;
        let release = name.strip_prefix("vmlinuz-")?;
        release.ends_with("-cloud-amd64").then(|| release.to_owned())
    });
    releases
        .max_by_key(|r| version_key(r))
        .ok_or_else(|| VmError::Assets(format!("no vmlinuz-*-cloud-amd64 in {}", boot_dir.display())))
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
    match extract_vmlinux(&image) {
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

/// Finds the LZ4-compressed payload in a bzImage and decompresses it to the vmlinux ELF.
pub(crate) fn extract_vmlinux(image: &[u8]) -> Option<Vec<u8>> {
    let mut from = 0;
    while let Some(pos) = find(&image[from..], &LZ4_LEGACY_MAGIC) {
        let start = from + pos;
        if let Some(elf) = lz4_legacy_decode(&image[start..]).filter(|d| d.starts_with(b"\x7fELF")) {
            return Some(elf);
        }
        from = start + 1;
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Decodes an LZ4 legacy stream (magic, then blocks of `u32 size` + data) until the data
/// ends or a size is implausible (the kernel appends the uncompressed size after the last
/// block, which is how the stream normally ends).
fn lz4_legacy_decode(data: &[u8]) -> Option<Vec<u8>> {
    let max_block = LZ4_LEGACY_BLOCK + LZ4_LEGACY_BLOCK / 255 + 16;
    let mut pos = 4;
    let mut out = Vec::new();
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    while let Some(size) = data.get(pos..pos + 4) {
        let size = u32::from_le_bytes(size.try_into().ok()?) as usize;
        if size == u32::from_le_bytes(LZ4_LEGACY_MAGIC) as usize {
            pos += 4; // concatenated stream
            continue;
        }
        if size == 0 || size > max_block || pos + 4 + size > data.len() {
            break;
        }
        let n = lz4_flex::block::decompress_into(&data[pos + 4..pos + 4 + size], &mut block).ok()?;
        out.extend_from_slice(&block[..n]);
        pos += 4 + size;
    }
    (!out.is_empty()).then_some(out)
}

fn prepare_initramfs(agent: &Path, modules_dir: &Path, out_dir: &Path) -> Result<PathBuf, VmError> {
    let agent_bytes = read(agent)?;
    let dep_path = modules_dir.join("modules.dep");
    let dep = ModulesDep::parse(
        &fs::read_to_string(&dep_path).map_err(|e| VmError::io(format!("read {}", dep_path.display()), e))?,
    );
    let order = dep.resolve(NEEDED_MODULES)?;

    let mut cpio = CpioWriter::new();
    for dir in ["dev", "proc", "sys", "run", "tmp", "lib", "lib/modules"] {
        cpio.dir(dir, 0o755);
    }
    cpio.char_dev("dev/console", 0o600, 5, 1);
    cpio.file("init", 0o755, &agent_bytes);
    let mut order_file = String::new();
    for rel in &order {
        if !rel.ends_with(".ko") {
            return Err(VmError::Assets(format!("compressed module {rel} is not supported")));
        }
        let base = rel.rsplit('/').next().unwrap_or(rel);
        cpio.file(&format!("lib/modules/{base}"), 0o644, &read(&modules_dir.join(rel))?);
        order_file.push_str(base);
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
    fn extracts_a_legacy_lz4_payload_after_junk() {
        let elf: Vec<u8> = b"\x7fELF".iter().copied().chain((0..100_000u32).map(|i| (i % 251) as u8)).collect();
        let block = lz4_flex::block::compress(&elf);
        let mut image = b"MZ setup code \x02\x21 junk".to_vec();
        image.extend_from_slice(&LZ4_LEGACY_MAGIC);
        image.extend_from_slice(&u32::try_from(block.len()).unwrap().to_le_bytes());
        image.extend_from_slice(&block);
        image.extend_from_slice(&u32::try_from(elf.len()).unwrap().to_le_bytes()); // size trailer
        image.extend_from_slice(b"trailing bzImage bytes");
        assert_eq!(extract_vmlinux(&image).as_deref(), Some(&elf[..]));
        assert_eq!(extract_vmlinux(b"no payload here"), None);
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
        let dep: String = deps
            .iter()
            .map(|(m, d)| {
                fs::write(mdir_path(&mdir, m), m.as_bytes()).unwrap();
                format!("{m}.ko: {d}\n")
            })
            .collect();
        fs::write(mdir.join("modules.dep"), dep).unwrap();
        let agent = tmp.path().join("agent");
        fs::write(&agent, b"agent v1").unwrap();

        let a = prepare_from(&agent, &out, None, &boot, &mods).unwrap();
        assert_eq!(a.kernel_release, rel);
        assert_eq!(a.kernel, boot.join(format!("vmlinuz-{rel}")), "falls back to the bzImage");
        let cpio = fs::read(&a.initramfs).unwrap();
        let text = String::from_utf8_lossy(&cpio);
        assert!(text.contains("agent v1") && text.contains("lib/modules/boxwood.order"));
        assert!(text.contains("virtio_ring.ko\nvirtio.ko\nvirtio_mmio.ko\n"));

        let again = prepare_from(&agent, &out, Some(rel), &boot, &mods).unwrap();
        assert_eq!(again, a, "unchanged inputs reuse the same files");
        fs::write(&agent, b"agent v2").unwrap();
        let changed = prepare_from(&agent, &out, None, &boot, &mods).unwrap();
        assert_ne!(changed.initramfs, a.initramfs, "a new agent gives a new initramfs name");
    }

    fn mdir_path(dir: &Path, m: &str) -> PathBuf {
        fs::create_dir_all(dir).unwrap();
        dir.join(format!("{m}.ko"))
    }
}
