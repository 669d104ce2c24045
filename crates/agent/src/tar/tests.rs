//! The tar writer against a real directory tree, read back with the `tar` crate.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::os::unix::fs::{FileExt as _, PermissionsExt, symlink};
use std::path::Path;

use super::*;

struct Member {
    kind: ::tar::EntryType,
    mode: u32,
    uid: u64,
    link: Option<String>,
    data: Vec<u8>,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn read_back(bytes: &[u8]) -> BTreeMap<String, Member> {
    let mut archive = ::tar::Archive::new(bytes);
    let mut out = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
        let mut xattrs = Vec::new();
        if let Some(pax) = entry.pax_extensions().unwrap() {
            for ext in pax {
                let ext = ext.unwrap();
                if let Some(n) = ext.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    xattrs.push((n.to_owned(), ext.value_bytes().to_vec()));
                }
            }
        }
        let h = entry.header();
        let (kind, mode, uid) = (h.entry_type(), h.mode().unwrap(), h.uid().unwrap());
        let link = entry.link_name_bytes().map(|l| String::from_utf8(l.into_owned()).unwrap());
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        out.insert(name, Member { kind, mode, uid, link, data, xattrs });
    }
    out
}

fn mknod(path: &Path, mode: libc::mode_t, dev: libc::dev_t) -> bool {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid C string for the duration of the call.
    unsafe { libc::mknod(c.as_ptr(), mode, dev) == 0 }
}

#[test]
fn writes_every_kind_parents_first() {
    let tmp = crate::testdir::tempdir("tar");
    let d = tmp.as_path();
    fs::create_dir_all(d.join("a/b")).unwrap();
    fs::write(d.join("a/b/file"), b"hello").unwrap();
    fs::set_permissions(d.join("a/b/file"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::write(d.join("h1"), b"linked").unwrap();
    fs::hard_link(d.join("h1"), d.join("h2")).unwrap();
    symlink("../some/where", d.join("a/link")).unwrap();
    let long_dir = "d".repeat(120);
    let long_name = format!("{long_dir}/{}", "f".repeat(150));
    fs::create_dir(d.join(&long_dir)).unwrap();
    fs::write(d.join(&long_name), b"long").unwrap();
    let long_target = "t".repeat(200);
    symlink(&long_target, d.join("longlink")).unwrap();
    assert!(mknod(&d.join("fifo"), libc::S_IFIFO | 0o640, 0));
    let root = nix::unistd::geteuid().is_root();
    if root {
        assert!(mknod(&d.join("wh"), libc::S_IFCHR, 0));
        assert!(mknod(&d.join("null"), libc::S_IFCHR | 0o666, libc::makedev(1, 3)));
    }
    let _sock = std::os::unix::net::UnixListener::bind(d.join("sock")).unwrap();
    // Excluded: an empty created dir (left out) and one with run content below (kept lazily).
    fs::create_dir(d.join("proc")).unwrap();
    fs::create_dir_all(d.join("etc")).unwrap();
    fs::write(d.join("etc/resolv.conf"), b"").unwrap();
    fs::write(d.join("etc/hosts"), b"127.0.0.1 x\n").unwrap();
    let excluded: HashSet<Vec<u8>> = ["proc", "etc", "etc/resolv.conf"].iter().map(|s| s.as_bytes().to_vec()).collect();

    let mut bytes = Vec::new();
    let stats = write_tree(d, &excluded, None, &mut bytes).unwrap();
    assert_eq!(stats.bytes, bytes.len() as u64);
    assert_eq!(bytes.len() % BLOCK, 0);
    if let Some(dump) = std::env::var_os("BOXWOOD_TAR_DUMP") {
        fs::write(dump, &bytes).unwrap(); // for checking with other readers (GNU tar, bsdtar)
    }
    let m = read_back(&bytes);
    let names: Vec<&str> = m.keys().map(String::as_str).collect();
    let mut want = vec!["a/", "a/b/", "a/b/file", "a/link", "etc/", "etc/hosts", "fifo", "h1", "h2", "longlink"];
    let long_dir_member = format!("{long_dir}/");
    want.push(&long_dir_member);
    want.push(&long_name);
    if root {
        want.push("wh");
    }
    want.sort_unstable();
    assert_eq!(names, want);
    assert_eq!(stats.entries, want.len() as u64);

    let f = &m["a/b/file"];
    assert_eq!((f.kind, f.mode, f.data.as_slice()), (::tar::EntryType::Regular, 0o4755, &b"hello"[..]));
    assert_eq!(f.uid, u64::from(nix::unistd::geteuid().as_raw()));
    assert_eq!(m["a/link"].link.as_deref(), Some("../some/where"));
    assert_eq!(m["longlink"].link.as_deref(), Some(long_target.as_str()));
    assert_eq!(m["h1"].kind, ::tar::EntryType::Regular);
    assert_eq!((m["h2"].kind, m["h2"].link.as_deref()), (::tar::EntryType::Link, Some("h1")));
    assert_eq!((m["fifo"].kind, m["fifo"].mode), (::tar::EntryType::Fifo, 0o640));
    assert_eq!(m[long_name.as_str()].data, b"long");
    assert_eq!(m["etc/"].kind, ::tar::EntryType::Directory);
    if root {
        assert_eq!(m["wh"].kind, ::tar::EntryType::Char);
    }

    // Parents before children, in the stream's own order.
    let mut archive = ::tar::Archive::new(&bytes[..]);
    let order: Vec<String> =
        archive.entries().unwrap().map(|e| String::from_utf8(e.unwrap().path_bytes().into_owned()).unwrap()).collect();
    for (i, name) in order.iter().enumerate() {
        let trimmed = name.trim_end_matches('/');
        if let Some((parent, _)) = trimmed.rsplit_once('/') {
            let pos = order.iter().position(|n| n == &format!("{parent}/")).unwrap_or(usize::MAX);
            assert!(pos < i, "{name} before its parent");
        }
    }
}

#[test]
fn empty_tree_has_no_entries_and_xattrs_are_filtered() {
    let tmp = crate::testdir::tempdir("tar");
    let mut bytes = Vec::new();
    let stats = write_tree(tmp.as_path(), &HashSet::new(), None, &mut bytes).unwrap();
    assert_eq!(stats, TarStats { entries: 0, bytes: 1024 });
    assert!(read_back(&bytes).is_empty());

    // user.* xattrs need a filesystem that supports them (tmpfs ≥ 6.6, ext4, …).
    let f = tmp.as_path().join("x");
    fs::write(&f, b"").unwrap();
    let c = CString::new(f.as_os_str().as_bytes()).unwrap();
    let value = b"v\0binary";
    // SAFETY: valid C strings and a buffer of the stated length.
    let ok = unsafe { libc::setxattr(c.as_ptr(), c"user.k".as_ptr(), value.as_ptr().cast(), value.len(), 0) } == 0;
    if ok {
        let mut bytes = Vec::new();
        write_tree(tmp.as_path(), &HashSet::new(), None, &mut bytes).unwrap();
        assert_eq!(read_back(&bytes)["x"].xattrs, [("user.k".to_owned(), value.to_vec())]);
    } else {
        eprintln!("skipping the xattr round trip: {}", io::Error::last_os_error());
    }
    for (name, keep) in [
        ("user.mime", true),
        ("security.capability", true),
        ("trusted.overlay.opaque", true),
        ("trusted.overlay.origin", false),
        ("trusted.overlay.impure", false),
        ("security.selinux", false),
    ] {
        assert_eq!(keep_xattr(name.as_bytes()), keep, "{name}");
    }
}

#[test]
fn pax_record_lengths_count_themselves() {
    for value_len in [0, 1, 5, 6, 7, 90, 95, 96, 97, 98, 99, 100, 995, 996, 997, 998] {
        let mut out = Vec::new();
        pax_record(&mut out, b"path", &vec![b'a'; value_len]);
        let text = String::from_utf8(out.clone()).unwrap();
        let (len, _) = text.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), out.len(), "{value_len}");
    }
}

#[test]
fn holes_travel_as_holes_and_gnu_tar_restores_them() {
    let tmp = crate::testdir::tempdir("tar");
    let d = tmp.as_path();
    // 1 GiB apparent: a little data at 1 MiB and at the end, holes elsewhere.
    let f = fs::File::create(d.join("sparse")).unwrap();
    f.set_len(1 << 30).unwrap();
    f.write_all_at(b"middle", 1 << 20).unwrap();
    f.write_all_at(b"end", (1 << 30) - 3).unwrap();
    drop(f);
    let empty = fs::File::create(d.join("all-hole")).unwrap();
    empty.set_len(100 << 20).unwrap();
    drop(empty);
    fs::write(d.join("dense"), vec![7u8; 10_000]).unwrap();
    let mut out = Vec::new();
    let stats = write_tree(d, &HashSet::new(), None, &mut out).unwrap();
    assert_eq!(stats.bytes, out.len() as u64);
    assert!(out.len() < 1 << 20, "holes cost nothing in the stream: {} bytes", out.len());

    let members = read_back(&out);
    let stand_in = &members["GNUSparseFile.0/sparse"];
    assert!(stand_in.data.starts_with(b"2\n"), "map, then data: {:?}", &stand_in.data[..32]);

    // GNU tar (a real reader of the format) restores the apparent size and the data, sparse.
    let x = crate::testdir::tempdir("tar");
    let tar_path = x.as_path().join("a.tar");
    fs::write(&tar_path, &out).unwrap();
    let dest = x.as_path().join("out");
    fs::create_dir(&dest).unwrap();
    let st = std::process::Command::new("tar").arg("-xf").arg(&tar_path).arg("-C").arg(&dest).status().unwrap();
    assert!(st.success());
    let meta = fs::metadata(dest.join("sparse")).unwrap();
    assert_eq!(meta.len(), 1 << 30);
    assert!(meta.blocks() * 512 < 1 << 20, "restored sparse: {} blocks", meta.blocks());
    let restored = fs::File::open(dest.join("sparse")).unwrap();
    let mut buf = [0u8; 6];
    restored.read_exact_at(&mut buf, 1 << 20).unwrap();
    assert_eq!(&buf, b"middle");
    restored.read_exact_at(&mut buf[..3], (1 << 30) - 3).unwrap();
    assert_eq!(&buf[..3], b"end");
    restored.read_exact_at(&mut buf, 4096).unwrap();
    assert_eq!(buf, [0u8; 6]);
    assert_eq!(fs::metadata(dest.join("all-hole")).unwrap().len(), 100 << 20);
    assert_eq!(fs::read(dest.join("dense")).unwrap(), vec![7u8; 10_000]);
    assert!(!members.contains_key("dense") || members["dense"].data.len() == 10_000);
}

/// On a filesystem that maps files (the temp dir's, standing in for the scratch disk), a large
/// file becomes an extent map covering exactly its data; a small one, or any file when no
/// disk is named, travels in the stream. (The VM tests read the extents back from a real
/// scratch disk.)
#[test]
fn large_files_on_the_disk_travel_as_extent_maps() {
    let dir = std::env::temp_dir().join(format!("bw-agent-disk-{}", std::process::id()));
    fs::create_dir(&dir).unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(dir.join("big"), &big).unwrap();
    fs::write(dir.join("small"), b"small").unwrap();
    let dev = fs::metadata(&dir).unwrap().dev();
    let mut with_disk = Vec::new();
    write_tree(&dir, &HashSet::new(), Some(dev), &mut with_disk).unwrap();
    let mut without = Vec::new();
    write_tree(&dir, &HashSet::new(), None, &mut without).unwrap();
    let mapped = crate::fiemap::data_extents(&File::open(dir.join("big")).unwrap(), 300_000, 16).unwrap();
    fs::remove_dir_all(&dir).unwrap();

    let plain = read_back(&without);
    assert_eq!(plain["big"].data, big, "without a disk the bytes are in the stream");
    let Some(extents) = mapped else {
        eprintln!("this filesystem does not map files; nothing more to check");
        return;
    };
    let mut archive = ::tar::Archive::new(&with_disk[..]);
    let mut seen = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
        let record = entry.pax_extensions().unwrap().and_then(|pax| {
            pax.map(Result::unwrap).find(|r| r.key() == Ok(DISK_EXTENTS_RECORD)).map(|r| r.value().unwrap().to_owned())
        });
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        seen.insert(name, (record, data));
    }
    let (record, map) = &seen["big"];
    assert_eq!(record.as_deref(), Some("300000"), "the apparent size");
    assert_eq!(map.len() % BLOCK, 0, "the map fills whole blocks");
    let lines: Vec<u64> =
        String::from_utf8_lossy(map).trim_end_matches('\0').lines().map(|l| l.parse().unwrap()).collect();
    let listed: Vec<Extent> = lines[1..].chunks(3).map(|e| (e[0], e[1], e[2])).collect();
    assert_eq!((lines[0] as usize, &listed), (extents.len(), &extents), "the map is the file's extents");
    assert_eq!(listed.iter().map(|e| e.2).sum::<u64>(), 300_000, "covering its data, clamped to its size");
    assert_eq!(seen["small"], (None, b"small".to_vec()), "a small file is in the stream");
}
