//! Disk-referenced export members (`boxwood_protocol::DISK_EXTENTS_RECORD`): their bytes are
//! copied from the run's scratch disk into the image, holes stay holes, and a map that points
//! anywhere but into the disk (or at a disk the run did not have) is refused before anything
//! is copied. Round trips are asserted on the image as the kernel mounts it.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use boxwood_image::{ImageError, ScratchDisk, UnpackLimits, UnpackStats, unpack_layer_from};
use boxwood_protocol::DISK_EXTENTS_RECORD;
use common::*;

const DISK_BYTES: u64 = 64 << 20;

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_mul(31).wrapping_add(seed) % 251) as u8).collect()
}

/// A sparse 64 MiB "scratch disk" holding `(offset, bytes)`.
fn disk(dir: &Path, parts: &[(u64, &[u8])]) -> std::fs::File {
    let path = dir.join("scratch.img");
    let f = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path).unwrap();
    f.set_len(DISK_BYTES).unwrap();
    for (at, bytes) in parts {
        f.write_all_at(bytes, *at).unwrap();
    }
    f
}

/// A disk-referenced member `name` of apparent `size`, whose data is the map `lines`.
fn on_disk(tb: &mut TarBuilder, name: &str, size: u64, lines: &str) {
    let mut map = lines.as_bytes().to_vec();
    map.resize(lines.len().next_multiple_of(512), 0);
    tb.pax(&[(DISK_EXTENTS_RECORD, size.to_string().as_bytes())]);
    tb.file(name, &map, Hdr::default(), &[]);
}

/// Unpacks `tb` from `disk`; returns the stats and every total the budget was asked about.
fn unpack(
    dir: &Path,
    tb: TarBuilder,
    disk: Option<std::fs::File>,
    limits: UnpackLimits,
    refuse_past: u64,
) -> (Result<UnpackStats, ImageError>, Vec<u64>) {
    let tar = tb.write(dir, "layer");
    let asked = Arc::new(Mutex::new(Vec::new()));
    let seen = asked.clone();
    let disk = disk.map(|file| ScratchDisk {
        file,
        admit: Box::new(move |total| {
            seen.lock().unwrap().push(total);
            if total > refuse_past { Err("the host's disk is nearly full".into()) } else { Ok(()) }
        }),
    });
    let image = dir.join("layer.erofs");
    let _ = std::fs::remove_file(&image);
    let result = unpack_layer_from(std::fs::File::open(&tar).unwrap(), &image, limits, disk);
    let asked = asked.lock().unwrap().clone();
    (result, asked)
}

#[test]
fn disk_referenced_files_are_copied_from_the_disk() {
    let base = tempfile::tempdir().unwrap();
    let (a, b, c) = (pattern(1, 300 << 10), pattern(2, 200 << 10), pattern(3, 128 << 10));
    let disk = disk(base.path(), &[(1 << 20, &a), (8 << 20, &b), (20 << 20, &c)]);
    let mut tb = TarBuilder::new();
    // Two extents far apart on the disk, one after the other in the file.
    on_disk(
        &mut tb,
        "flat",
        500 << 10,
        &format!("2\n0\n{}\n{}\n{}\n{}\n{}\n", 1 << 20, 300 << 10, 300 << 10, 8 << 20, 200 << 10),
    );
    // 1 GiB with 128 KiB of data in the middle.
    on_disk(&mut tb, "holey", 1 << 30, &format!("1\n{}\n{}\n{}\n", 512 << 20, 20 << 20, 128 << 10));
    // An end that is not a block's.
    on_disk(&mut tb, "tail", 100_001, &format!("1\n0\n{}\n100001\n", 1 << 20));
    // No data at all.
    on_disk(&mut tb, "empty", 1 << 20, "0\n");
    tb.file("streamed", b"in the tar", Hdr::default(), &[]);
    let (stats, asked) = unpack(base.path(), tb, Some(disk), UnpackLimits::default(), u64::MAX);
    let stats = stats.unwrap();
    let data = (500 << 10) + (128 << 10) + 100_001;
    assert_eq!(stats.content_bytes, data + 10);
    assert_eq!(stats.apparent_bytes, (500 << 10) + (1 << 30) + 100_001 + (1 << 20) + 10);
    // Running totals, in the whole blocks each file's data touches.
    let tail = 100_001u64.next_multiple_of(4096);
    assert_eq!(asked, [500 << 10, 628 << 10, (628 << 10) + tail, (628 << 10) + tail]);
    let image = base.path().join("layer.erofs");
    assert!(std::fs::metadata(&image).unwrap().blocks() * 512 < 4 << 20, "holes cost nothing");

    let mnt = tempfile::tempdir().unwrap();
    let root = mnt.path().join("live");
    let _mount = KernelMount::new(&image, &root);
    assert_eq!(std::fs::read(root.join("flat")).unwrap(), [a.clone(), b].concat());
    let holey = std::fs::File::open(root.join("holey")).unwrap();
    assert_eq!(holey.metadata().unwrap().len(), 1 << 30);
    let mut got = vec![0u8; 128 << 10];
    holey.read_exact_at(&mut got, 512 << 20).unwrap();
    assert_eq!(got, c);
    holey.read_exact_at(&mut got, 1 << 20).unwrap();
    assert!(got.iter().all(|&x| x == 0), "a hole reads as zeros");
    assert_eq!(std::fs::read(root.join("tail")).unwrap(), a[..100_001]);
    assert_eq!(std::fs::read(root.join("empty")).unwrap(), vec![0u8; 1 << 20]);
    assert_eq!(std::fs::read(root.join("streamed")).unwrap(), b"in the tar");
}

#[test]
fn maps_pointing_outside_the_disk_or_the_file_are_refused() {
    let base = tempfile::tempdir().unwrap();
    let secret = b"what the host holds past the disk";
    let one = |size: u64, lines: &str| {
        let mut tb = TarBuilder::new();
        on_disk(&mut tb, "f", size, lines);
        tb
    };
    // Positive control: an extent at the disk's very end is read.
    let d = disk(base.path(), &[(DISK_BYTES - 4096, &[7u8; 4096])]);
    let (ok, _) = unpack(
        base.path(),
        one(4096, &format!("1\n0\n{}\n4096\n", DISK_BYTES - 4096)),
        Some(d),
        UnpackLimits::default(),
        u64::MAX,
    );
    assert_eq!(ok.unwrap().content_bytes, 4096);
    for (name, size, lines) in [
        ("past the disk", 8192, format!("1\n0\n{}\n8192\n", DISK_BYTES - 4096)),
        ("overflowing", 8192, format!("1\n0\n{}\n8192\n", u64::MAX - 100)),
        ("past the size", 4096, "1\n0\n0\n8192\n".to_owned()),
        ("overlapping", 8192, "2\n0\n0\n4096\n100\n0\n4096\n".to_owned()),
        ("out of order", 8192, "2\n4096\n0\n4096\n0\n0\n4096\n".to_owned()),
        ("empty extent", 8192, "1\n0\n0\n0\n".to_owned()),
        ("short map", 8192, "2\n0\n0\n4096\n".to_owned()),
        ("huge count", 8192, "99999999999\n".to_owned()),
        ("not a number", 8192, "1\n0\n-1\n4096\n".to_owned()),
    ] {
        std::fs::remove_file(base.path().join("scratch.img")).unwrap();
        let d = disk(base.path(), &[(0, secret)]);
        let (r, asked) = unpack(base.path(), one(size, &lines), Some(d), UnpackLimits::default(), u64::MAX);
        assert!(matches!(r, Err(ImageError::BadLayer { .. })), "{name}: {r:?}");
        assert!(asked.is_empty(), "{name}: refused before anything is charged or copied");
    }
    // A map that does not fill its member (data smuggled after it).
    let mut tb = TarBuilder::new();
    let mut body = b"1\n0\n0\n4096\n".to_vec();
    body.resize(1024, b'x');
    tb.pax(&[(DISK_EXTENTS_RECORD, b"4096")]);
    tb.file("f", &body, Hdr::default(), &[]);
    let d = disk(&dir(base.path(), "long"), &[]);
    let (r, _) = unpack(base.path(), tb, Some(d), UnpackLimits::default(), u64::MAX);
    assert!(matches!(r, Err(ImageError::BadLayer { .. })), "long member: {r:?}");
    // Without a scratch disk there is nothing to read from.
    let (r, _) = unpack(base.path(), one(4096, "1\n0\n0\n4096\n"), None, UnpackLimits::default(), u64::MAX);
    assert!(matches!(r, Err(ImageError::BadLayer { .. })), "no disk: {r:?}");
}

#[test]
fn copies_from_the_disk_count_against_the_limit_and_the_budget() {
    let base = tempfile::tempdir().unwrap();
    let two = || {
        let mut tb = TarBuilder::new();
        on_disk(&mut tb, "a", 1 << 20, &format!("1\n0\n0\n{}\n", 1 << 20));
        on_disk(&mut tb, "b", 1 << 20, &format!("1\n0\n{}\n{}\n", 1 << 20, 1 << 20));
        tb
    };
    let fresh = |name: &str| disk(&dir(base.path(), name), &[(0, &[5u8; 2 << 20])]);
    // Positive control: both fit.
    let (ok, asked) = unpack(base.path(), two(), Some(fresh("ok")), UnpackLimits::default(), u64::MAX);
    assert_eq!(ok.unwrap().content_bytes, 2 << 20);
    assert_eq!(asked, [1 << 20, 2 << 20]);
    // The layer limit counts the disk's bytes, checked before they are copied.
    let limits = UnpackLimits { max_data_bytes: (1 << 20) + 5 };
    let (r, asked) = unpack(base.path(), two(), Some(fresh("limit")), limits, u64::MAX);
    assert!(matches!(r, Err(ImageError::LayerTooLarge { .. })), "{r:?}");
    assert_eq!(asked, [1 << 20], "b was never charged");
    // The caller's budget stops it too, and says why.
    let (r, _) = unpack(base.path(), two(), Some(fresh("budget")), UnpackLimits::default(), 1 << 20);
    match r {
        Err(ImageError::Refused { reason }) => assert_eq!(reason, "the host's disk is nearly full"),
        other => panic!("expected Refused, got {other:?}"),
    }
    let partial = std::fs::read(base.path().join("layer.erofs")).unwrap();
    assert_eq!(partial.iter().filter(|&&x| x == 5).count(), 1 << 20, "only a was copied");
}

#[test]
fn claimed_sizes_and_scattered_bytes_are_charged_as_they_cost() {
    let base = tempfile::tempdir().unwrap();
    let fresh = |name: &str| disk(&dir(base.path(), name), &[]);
    // A 16 TiB file is what ext4 holds at most; one byte past it is refused before anything
    // is sized from it (a chunk index for 2^64 bytes would not fit in memory).
    let huge = |size: u64| {
        let mut tb = TarBuilder::new();
        on_disk(&mut tb, "f", size, "1\n0\n0\n4096\n");
        tb
    };
    let (ok, _) = unpack(base.path(), huge(16 << 40), Some(fresh("16t")), UnpackLimits::default(), u64::MAX);
    assert_eq!(ok.unwrap().apparent_bytes, 16 << 40, "positive control: the largest file");
    for size in [(16 << 40) + 1, u64::MAX] {
        let (r, asked) =
            unpack(base.path(), huge(size), Some(fresh(&format!("s{size}"))), UnpackLimits::default(), u64::MAX);
        assert!(matches!(r, Err(ImageError::BadLayer { .. })), "{size}: {r:?}");
        assert!(asked.is_empty());
    }
    // A byte every 4 KiB costs the host a block each: charged so.
    let scattered = |n: u64| {
        let mut lines = format!("{n}\n");
        for i in 0..n {
            lines.push_str(&format!("{}\n{}\n1\n", i * 4096, i * 4096));
        }
        let mut tb = TarBuilder::new();
        on_disk(&mut tb, "f", n * 4096, &lines);
        tb
    };
    let limits = UnpackLimits { max_data_bytes: 1 << 20 };
    let (ok, asked) = unpack(base.path(), scattered(200), Some(fresh("200")), limits, u64::MAX);
    assert_eq!(ok.unwrap().content_bytes, 200, "positive control: 200 blocks fit in 1 MiB");
    assert_eq!(asked, [200 * 4096], "charged in blocks");
    let (r, asked) = unpack(base.path(), scattered(300), Some(fresh("300")), limits, u64::MAX);
    assert!(matches!(r, Err(ImageError::LayerTooLarge { .. })), "{r:?}");
    assert!(asked.is_empty(), "refused before it is charged or copied");
}
