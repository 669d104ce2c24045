//! Decoding what distributions compress: the kernel's payload inside a bzImage (LZ4 on
//! Debian 12, zstd on Debian 13 and Ubuntu) and kernel modules (`.ko.xz` on Debian 13,
//! `.ko.zst` on Ubuntu, `.ko.gz` elsewhere), so the guest boots an uncompressed vmlinux via
//! PVH and loads plain modules whatever its kernel was configured to decompress.

use std::io::Read;

use crate::VmError;

/// Magic of the kernel's LZ4 "legacy" stream (0x184C2102, little-endian).
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
/// Uncompressed size of a legacy LZ4 block.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// Magic of a zstd frame (0xFD2FB528, little-endian).
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Upper bound on anything decoded here; a vmlinux is ~60 MiB, a module a few MiB.
const MAX_DECODED: u64 = 512 << 20;

/// Finds the compressed payload in a bzImage and decodes it to the vmlinux ELF. `None` if
/// no known payload decodes to an ELF (the caller then boots the bzImage itself).
pub(crate) fn extract_vmlinux(image: &[u8]) -> Option<Vec<u8>> {
    candidates(image, &LZ4_LEGACY_MAGIC)
        .find_map(|at| lz4_legacy_decode(&image[at..]).filter(|d| is_elf(d)))
        .or_else(|| candidates(image, &ZSTD_MAGIC).find_map(|at| zstd_frame(&image[at..]).filter(|d| is_elf(d))))
}

/// The plain ELF of a module file, by its name's suffix: `.ko` as is, `.ko.xz`, `.ko.zst`
/// and `.ko.gz` decoded. The result must be an ELF.
pub(crate) fn module(name: &str, data: Vec<u8>) -> Result<Vec<u8>, VmError> {
    let decoded = if name.ends_with(".ko") {
        Ok(data)
    } else if name.ends_with(".ko.xz") {
        let mut out = Vec::new();
        lzma_rs::xz_decompress(&mut &data[..], &mut out).map(|()| out).map_err(|e| e.to_string())
    } else if name.ends_with(".ko.zst") {
        zstd::stream::read::Decoder::new(&data[..]).map_err(|e| e.to_string()).and_then(read_capped)
    } else if name.ends_with(".ko.gz") {
        read_capped(flate2::read::GzDecoder::new(&data[..]))
    } else {
        Err("unknown module compression".to_owned())
    };
    match decoded {
        Ok(elf) if is_elf(&elf) => Ok(elf),
        Ok(_) => Err(VmError::Assets(format!("module {name} is not an ELF object"))),
        Err(why) => Err(VmError::Assets(format!("module {name}: {why}"))),
    }
}

/// The module's file name inside the initramfs: always the plain `.ko`.
pub(crate) fn plain_module_name(name: &str) -> String {
    format!("{}.ko", crate::modules::module_stem(name))
}

fn is_elf(data: &[u8]) -> bool {
    data.starts_with(b"\x7fELF")
}

fn candidates<'a>(hay: &'a [u8], magic: &'a [u8; 4]) -> impl Iterator<Item = usize> + 'a {
    hay.windows(magic.len()).enumerate().filter(move |(_, w)| *w == magic).map(|(i, _)| i)
}

fn read_capped(reader: impl Read) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    reader.take(MAX_DECODED + 1).read_to_end(&mut out).map_err(|e| e.to_string())?;
    if out.len() as u64 > MAX_DECODED {
        return Err(format!("decodes to more than {MAX_DECODED} bytes"));
    }
    Ok(out)
}

/// Decodes one zstd frame; the kernel follows it with its size trailer, which is ignored.
fn zstd_frame(data: &[u8]) -> Option<Vec<u8>> {
    let decoder = zstd::stream::read::Decoder::with_buffer(data).ok()?.single_frame();
    read_capped(decoder).ok().filter(|d| !d.is_empty())
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
        if size == 0 || size > max_block || pos + 4 + size > data.len() || out.len() as u64 > MAX_DECODED {
            break;
        }
        let n = lz4_flex::block::decompress_into(&data[pos + 4..pos + 4 + size], &mut block).ok()?;
        out.extend_from_slice(&block[..n]);
        pos += 4 + size;
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn fake_elf() -> Vec<u8> {
        b"\x7fELF".iter().copied().chain((0..100_000u32).map(|i| (i % 251) as u8)).collect()
    }

    #[test]
    fn extracts_a_legacy_lz4_payload_after_junk() {
        let elf = fake_elf();
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
    fn extracts_a_zstd_payload_after_a_false_magic() {
        let elf = fake_elf();
        let mut image = b"MZ setup".to_vec();
        image.extend_from_slice(&ZSTD_MAGIC); // a stray magic that decodes to nothing
        image.extend_from_slice(b"garbage");
        image.extend_from_slice(&zstd::encode_all(&elf[..], 19).unwrap());
        image.extend_from_slice(&u32::try_from(elf.len()).unwrap().to_le_bytes());
        assert_eq!(extract_vmlinux(&image).as_deref(), Some(&elf[..]));
        // A payload that decodes to something other than an ELF is not a kernel.
        let mut not_elf = b"MZ".to_vec();
        not_elf.extend_from_slice(&zstd::encode_all(&b"plain text"[..], 3).unwrap());
        assert_eq!(extract_vmlinux(&not_elf), None);
    }

    #[test]
    fn decodes_modules_by_suffix() {
        let elf = fake_elf();
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut &elf[..], &mut xz).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&elf).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&elf[..], 3).unwrap();
        for (name, data) in [("a/m.ko", elf.clone()), ("a/m.ko.xz", xz), ("a/m.ko.zst", zst), ("a/m.ko.gz", gz)] {
            assert_eq!(module(name, data).unwrap(), elf, "{name}");
            assert_eq!(plain_module_name(name), "m.ko");
        }
        let err = module("m.ko.xz", b"not xz".to_vec()).unwrap_err().to_string();
        assert!(err.contains("m.ko.xz"), "{err}");
        assert!(module("m.ko", b"text".to_vec()).is_err(), "a .ko that is no ELF");
        assert!(module("m.ko.bz2", elf).is_err());
    }
}
