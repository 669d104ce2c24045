//! End-to-end tests of files in and changes out: `put_file`, `export_upper`, a full upper
//! layer, and a VM without network. One VM (TCG) runs every check in sequence.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use boxwood_protocol::RootfsSpec;
use boxwood_vm::{FileSpec, ProcessEvent, Vm, VmError, VmRuntime, VmSpec};
use common::*;
use sha2::{Digest, Sha256};

/// Upper layer size of the test VM: room for the checks, small enough to fill quickly.
const UPPER_BYTES: u64 = 12 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_in_changes_out_enospc_and_no_network() {
    let dir = run_dir();
    let rt = runtime(dir.path(), Vec::new()).await;
    let spec = VmSpec {
        rootfs: RootfsSpec {
            lower_serials: vec![ROOTFS_SERIAL.into()],
            upper_size_bytes: UPPER_BYTES,
            upper_disk: None,
        },
        ..vm_spec("xfer")
    };
    let vm = rt.start(spec).await.expect("boot");
    eprintln!("BOOT xfer (network=false) {:?}", vm.boot_duration());
    let host = tempfile::tempdir().unwrap();
    let vm = vm.as_ref();

    unchanged_run_exports_nothing(vm, host.path()).await;
    no_network_but_loopback(vm).await;
    put_file_checks(vm, host.path()).await;
    export_checks(vm, host.path()).await;
    full_upper_is_enospc(vm, host.path()).await;
    sparse_export_and_budget(vm, host.path()).await;

    let console = std::fs::read_to_string(vm.dir().join("console.log")).unwrap();
    let problems: Vec<&str> = console.lines().filter(|l| l.contains("boxwood-agent:")).collect();
    assert!(problems.is_empty(), "the agent logged problems:\n{console}");
}

async fn sh(vm: &dyn Vm, id: u32, script: &str) -> Outcome {
    run(vm, spawn_req(id, &["sh", "-c", script])).await
}

async fn no_network_but_loopback(vm: &dyn Vm) {
    assert_eq!(vm.setup_report().network, None);
    let r = sh(vm, 1, "ls /sys/class/net").await;
    assert_eq!(r.out(), "lo\n", "only loopback without network");
    // A local server on 127.0.0.1 works (its files on /dev/shm, outside the upper layer).
    let script = "mkdir -p /dev/shm/www && echo local-ok > /dev/shm/www/index.html && \
                  httpd -p 127.0.0.1:8080 -h /dev/shm/www && wget -q -O- http://127.0.0.1:8080/index.html";
    let r = sh(vm, 2, script).await;
    assert_eq!((r.out().as_str(), r.exit.code), ("local-ok\n", 0), "{}", String::from_utf8_lossy(&r.stderr));
}

async fn unchanged_run_exports_nothing(vm: &dyn Vm, host: &Path) {
    // Reads only.
    let r = sh(vm, 3, "cat /data/keep.txt >/dev/null; ls / >/dev/null").await;
    assert_eq!(r.exit.code, 0);
    let dest = host.join("empty.tar");
    let started = Instant::now();
    let stats = export_to(vm, &dest, &u64::MAX).await.expect("export");
    eprintln!("EXPORT empty: {:?} {stats:?}", started.elapsed());
    assert_eq!(stats.entries, 0, "members: {:?}", read_tar(&dest).keys().collect::<Vec<_>>());
    assert_eq!(stats.tar_bytes, std::fs::metadata(&dest).unwrap().len());
}

fn spec(path: &str, mode: u32, uid: u32, gid: u32) -> FileSpec {
    FileSpec { path: path.into(), mode, uid, gid }
}

async fn put_file_checks(vm: &dyn Vm, host: &Path) {
    // Binary content over several chunks (3 MiB + a bit), deep missing parents, 0600.
    let big = big_bytes();
    let src = host.join("big.bin");
    std::fs::write(&src, &big).unwrap();
    let started = Instant::now();
    vm.put_file(&spec("/up/deep/er/big.bin", 0o600, 1000, 1001), &src).await.expect("put big");
    eprintln!("PUT 3 MiB: {:?}", started.elapsed());
    // Exactly one chunk's worth (an empty last chunk follows), a setuid file, an empty file,
    // a replaced lower file.
    let exact = host.join("exact.bin");
    std::fs::write(&exact, vec![7u8; 1 << 20]).unwrap();
    vm.put_file(&spec("/up/exact.bin", 0o644, 0, 0), &exact).await.expect("put exact");
    let suid = host.join("suid");
    std::fs::write(&suid, b"#!/bin/sh\necho suid\n").unwrap();
    vm.put_file(&spec("/up/suid", 0o4755, 1000, 1000), &suid).await.expect("put suid");
    let empty = host.join("empty");
    std::fs::write(&empty, b"").unwrap();
    vm.put_file(&spec("/up/empty", 0o640, 0, 0), &empty).await.expect("put empty");
    let greet = host.join("greet");
    std::fs::write(&greet, b"#!/bin/sh\necho replaced \"$@\"\n").unwrap();
    vm.put_file(&spec("/opt/tools/greet", 0o755, 0, 0), &greet).await.expect("replace greet");

    let hash = hex::encode(Sha256::digest(&big));
    let script = "sha256sum /up/deep/er/big.bin; \
                  stat -c '%a %u %g %s' /up/deep/er/big.bin /up/exact.bin /up/suid /up/empty; \
                  stat -c '%a %u %g' /up /up/deep /up/deep/er; /opt/tools/greet x";
    let out = sh(vm, 10, script).await.out();
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with(&hash), "content differs: {out}");
    let size = big.len();
    assert_eq!(
        &lines[1..],
        [
            format!("600 1000 1001 {size}").as_str(),
            "644 0 0 1048576",
            "4755 1000 1000 20",
            "640 0 0 0",
            "755 0 0",
            "755 0 0",
            "755 0 0",
            "replaced x"
        ],
        "{out}"
    );

    // Symlinked parents pointing out of the root: contained (or refused), never outside.
    let small = host.join("small");
    std::fs::write(&small, b"contained\n").unwrap();
    for (path, seen_at) in [("/evil/escape1", "/escape1"), ("/evil-rel/escape2", "/escape2")] {
        vm.put_file(&spec(path, 0o644, 0, 0), &small).await.unwrap_or_else(|e| panic!("{path}: {e}"));
        let r = sh(vm, 11, &format!("cat {seen_at}")).await;
        assert_eq!(r.out(), "contained\n", "{path} must land inside the root at {seen_at}");
    }
    match vm.put_file(&spec("/evil-magic/escape3", 0o644, 0, 0), &small).await {
        Err(VmError::FileFailed { path, error }) => {
            assert_eq!(path, "/evil-magic/escape3");
            eprintln!("magic link refused: {error}");
        }
        other => panic!("a magic-link parent must be refused, got {other:?}"),
    }
    // Host-side validation and guest-side failures.
    for bad in ["relative/x", "/a/../b"] {
        assert!(matches!(vm.put_file(&spec(bad, 0o644, 0, 0), &small).await, Err(VmError::Invalid(_))), "{bad}");
    }
    match vm.put_file(&spec("/data", 0o644, 0, 0), &small).await {
        Err(VmError::FileFailed { error, .. }) => assert!(error.contains("directory"), "{error}"),
        other => panic!("a directory in the way must fail, got {other:?}"),
    }
    match vm.put_file(&spec("/data/keep.txt/sub", 0o644, 0, 0), &small).await {
        Err(VmError::FileFailed { error, .. }) => assert!(error.contains("Not a directory"), "{error}"),
        other => panic!("a file as parent must fail, got {other:?}"),
    }
    assert!(matches!(vm.put_file(&spec("/x", 0o644, 0, 0), &host.join("missing")).await, Err(VmError::Io { .. })));
    // An upload abandoned midway (its future dropped) leaves no partial file behind.
    let six = host.join("six.bin");
    std::fs::write(&six, vec![6u8; 6 << 20]).unwrap();
    let cut = tokio::time::timeout(Duration::from_millis(40), vm.put_file(&spec("/up/cut", 0o644, 0, 0), &six)).await;
    assert!(cut.is_err(), "6 MiB should take longer than 40 ms under TCG");
    // The channel is still in step after the failures and the abandoned upload.
    vm.put_file(&spec("/up/after", 0o644, 0, 0), &small).await.expect("put after failures");
    let r = sh(vm, 12, "test -e /up/cut && echo partial-file-left; cat /up/after").await;
    assert_eq!(r.out(), "contained\n");
}

/// One run making every kind of change, then the export, parsed with the `tar` crate.
async fn export_checks(vm: &dyn Vm, host: &Path) {
    let script = r#"set -e
        echo new > /data/new.txt
        echo more >> /data/mod.txt
        rm /data/del.txt
        rm -rf /data/dir1 && mkdir /data/dir1 && echo fresh > /data/dir1/c
        mv /data/ren.txt /data/renamed.txt
        mv /data/rendir /data/movedir
        chmod 4711 /data/chm.txt
        ln -s ../target/verbatim /data/link
        echo linked > /data/h1 && ln /data/h1 /data/h2
        mkfifo -m 640 /data/fifo
        mkdir -p /newdir/sub && echo deep > /newdir/sub/f
        sleep 1000 &
        echo started"#;
    let r = sh(vm, 20, script).await;
    assert_eq!((r.out().as_str(), r.exit.code), ("started\n", 0), "{}", String::from_utf8_lossy(&r.stderr));
    // A process still running at export time.
    let running = vm.spawn(spawn_req(21, &["sleep", "1000"])).await.unwrap();

    let dest = host.join("changes.tar");
    let started = Instant::now();
    let stats = export_to(vm, &dest, &u64::MAX).await.expect("export");
    eprintln!("EXPORT changes: {:?} {stats:?}", started.elapsed());
    let r = collect(running.events).await;
    assert_eq!(r.exit.signal, 9, "a running process is killed by the export");
    let r = sh(vm, 22, "pidof sleep; echo rc=$?").await;
    assert_eq!(r.out(), "rc=1\n", "no process survives an export");

    let m = read_tar(&dest);
    assert_eq!(stats.entries, m.len() as u64);
    assert_eq!(stats.tar_bytes, std::fs::metadata(&dest).unwrap().len());
    use tar::EntryType::*;
    let reg = |name: &str, mode: u32, data: &str| {
        let e = &m[name];
        assert_eq!((e.kind, e.mode, String::from_utf8_lossy(&e.data).as_ref()), (Regular, mode, data), "{name}");
    };
    reg("data/new.txt", 0o644, "new\n");
    reg("data/mod.txt", 0o644, "original\nmore\n");
    reg("data/dir1/c", 0o644, "fresh\n");
    reg("data/renamed.txt", 0o644, "rename me\n");
    reg("data/movedir/x", 0o644, "x\n");
    reg("data/chm.txt", 0o4711, "chmod me\n");
    reg("data/h1", 0o644, "linked\n");
    reg("newdir/sub/f", 0o644, "deep\n");
    for whiteout in ["data/del.txt", "data/ren.txt", "data/rendir"] {
        assert_eq!(m[whiteout].kind, Char, "{whiteout} is a whiteout");
        assert_eq!((m[whiteout].dev_major, m[whiteout].dev_minor), (0, 0));
    }
    assert_eq!(m["data/dir1/"].kind, Directory);
    assert_eq!(m["data/dir1/"].xattrs, [("trusted.overlay.opaque".to_owned(), b"y".to_vec())]);
    assert_eq!((m["data/link"].kind, m["data/link"].link.as_deref()), (Symlink, Some("../target/verbatim")));
    assert_eq!((m["data/h2"].kind, m["data/h2"].link.as_deref()), (Link, Some("data/h1")));
    assert_eq!((m["data/fifo"].kind, m["data/fifo"].mode), (Fifo, 0o640));
    // put_file results are part of the run's changes.
    assert_eq!((m["up/suid"].mode, m["up/suid"].uid, m["up/suid"].gid), (0o4755, 1000, 1000));
    // A large file on the scratch disk travels as extents of it, which hold its bytes.
    let big = &m["up/deep/er/big.bin"];
    assert_eq!(big.disk_size, Some((3 << 20) + 12_345), "big.bin is disk-referenced");
    let disk = vm.scratch_disk().unwrap().expect("the VM has a scratch disk");
    assert!(from_disk(big, &disk) == big_bytes(), "the extents hold big.bin's bytes");
    assert!(m["data/new.txt"].disk_size.is_none(), "a small file is in the stream");
    assert_eq!((m["up/deep/"].kind, m["up/deep/"].mode), (Directory, 0o755));
    for name in m.keys() {
        assert!(!name.starts_with('/') && !name.starts_with("./"), "{name}");
        for (key, _) in &m[name].xattrs {
            assert!(key == "trusted.overlay.opaque" || !key.starts_with("trusted."), "{name}: {key}");
        }
    }
    // Copied-up parents are directories, written before their children.
    for dir in ["data/", "up/", "newdir/", "newdir/sub/", "data/movedir/", "opt/", "opt/tools/"] {
        assert_eq!(m[dir].kind, Directory, "{dir}");
    }
    let order = tar_order(&dest);
    for (i, name) in order.iter().enumerate() {
        if let Some((parent, _)) = name.trim_end_matches('/').rsplit_once('/') {
            let p = order.iter().position(|n| *n == format!("{parent}/"));
            assert!(p.is_some_and(|p| p < i), "{name} needs its parent first");
        }
    }
    // Exactly these, nothing the agent made at Setup (no proc/, sys/, dev/ in this image).
    let mut expected: Vec<&str> = vec![
        "data/",
        "data/chm.txt",
        "data/del.txt",
        "data/dir1/",
        "data/dir1/c",
        "data/fifo",
        "data/h1",
        "data/h2",
        "data/link",
        "data/mod.txt",
        "data/movedir/",
        "data/movedir/x",
        "data/new.txt",
        "data/ren.txt",
        "data/renamed.txt",
        "data/rendir",
        "escape1",
        "escape2",
        "newdir/",
        "newdir/sub/",
        "newdir/sub/f",
        "opt/",
        "opt/tools/",
        "opt/tools/greet",
        "up/",
        "up/after",
        "up/deep/",
        "up/deep/er/",
        "up/deep/er/big.bin",
        "up/empty",
        "up/exact.bin",
        "up/suid",
    ];
    expected.sort_unstable();
    assert_eq!(m.keys().map(String::as_str).collect::<Vec<_>>(), expected);
}

async fn full_upper_is_enospc(vm: &dyn Vm, host: &Path) {
    let r = sh(vm, 30, "dd if=/dev/zero of=/fill bs=1M count=32; echo rc=$?; df -k /").await;
    let err = String::from_utf8_lossy(&r.stderr);
    eprintln!("ENOSPC run: {}{err}", r.out());
    assert!(r.out().starts_with("rc=1"), "{}", r.out());
    assert!(err.contains("No space left on device"), "{err}");
    // A file that does not fit fails too, and its partial content is removed again.
    let src = host.join("too-big");
    std::fs::write(&src, vec![1u8; 2 << 20]).unwrap();
    match vm.put_file(&spec("/too-big", 0o644, 0, 0), &src).await {
        Err(VmError::FileFailed { error, .. }) => assert!(error.contains("No space left"), "{error}"),
        other => panic!("expected ENOSPC, got {other:?}"),
    }
    // The agent keeps working, and space comes back.
    let r = sh(vm, 31, "test ! -e /too-big && rm /fill && echo ok > /after && cat /after").await;
    assert_eq!((r.out().as_str(), r.exit.code), ("ok\n", 0), "{}", String::from_utf8_lossy(&r.stderr));
    let stats = export_to(vm, &host.join("after.tar"), &u64::MAX).await.expect("export after ENOSPC");
    assert!(stats.entries > 0);
    let mut p = vm.spawn(spawn_req(32, &["true"])).await.unwrap();
    assert!(matches!(p.events.recv().await, Some(ProcessEvent::Exited(_))));
}

/// The 3 MiB + 12 345 bytes `put_file_checks` puts in `/up/deep/er/big.bin`.
fn big_bytes() -> Vec<u8> {
    (0..(3u32 << 20) + 12_345).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

/// A disk-referenced member's bytes, read from `disk` at the extents of its map.
fn from_disk(member: &Member, disk: &std::fs::File) -> Vec<u8> {
    let text = String::from_utf8_lossy(&member.data);
    let n: Vec<u64> = text.trim_end_matches('\0').lines().map(|l| l.parse().unwrap()).collect();
    let mut out = vec![0u8; member.disk_size.unwrap() as usize];
    for e in n[1..].chunks(3) {
        let (at, from, len) = (e[0] as usize, e[1], e[2] as usize);
        std::os::unix::fs::FileExt::read_exact_at(disk, &mut out[at..at + len], from).unwrap();
    }
    assert_eq!(n.len(), 1 + 3 * n[0] as usize, "{text}");
    out
}

/// Holes cost nothing in the export; the host stops an export past its budget.
async fn sparse_export_and_budget(vm: &dyn Vm, host: &Path) {
    let r = sh(vm, 40, "truncate -s 1G /sparse && echo tail >> /sparse && stat -c %s /sparse").await;
    assert_eq!(r.out(), "1073741829\n", "{}", String::from_utf8_lossy(&r.stderr));
    let dest = host.join("sparse.tar");
    let stats = export_to(vm, &dest, &u64::MAX).await.expect("sparse export");
    assert!(
        stats.tar_bytes < 16 << 20,
        "a 1 GiB sparse file (and the earlier changes) cost {} tar bytes",
        stats.tar_bytes
    );
    let image = host.join("sparse.erofs");
    let disk = vm.scratch_disk().unwrap().map(|file| boxwood_image::ScratchDisk { file, admit: Box::new(|_| Ok(())) });
    let unpacked =
        boxwood_image::unpack_layer_from(std::fs::File::open(&dest).unwrap(), &image, Default::default(), disk)
            .unwrap();
    assert!(unpacked.apparent_bytes > 1 << 30, "{unpacked:?}");
    let stored = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&image).unwrap()) * 512;
    assert!(stored < unpacked.content_bytes + (1 << 20), "sparse on the host too: {stored} bytes for {unpacked:?}");
    let view = boxwood_image::ImageView::open(&[image]).unwrap();
    assert_eq!(view.stat("/sparse").unwrap().size, 1_073_741_829);
    // Small files travel in the stream (large ones as extents of the disk, which the stream
    // budget does not see): 64 of 30 000 bytes.
    let r = sh(
        vm,
        41,
        "rm /sparse && mkdir /dense && for i in $(seq 64); do head -c 30000 /dev/urandom > /dense/$i; done && echo ok",
    )
    .await;
    assert_eq!(r.out(), "ok\n", "{}", String::from_utf8_lossy(&r.stderr));
    // Positive control: the same changes export within a large enough budget.
    let fits = export_to(vm, &host.join("fits.tar"), &(64u64 << 20)).await.expect("within budget");
    assert!(fits.tar_bytes > 64 * 30_000);
    let cut = host.join("cut.tar");
    match export_to(vm, &cut, &(1u64 << 20)).await {
        Err(VmError::ExportRefused { reason }) => assert!(reason.contains("exceed"), "{reason}"),
        other => panic!("expected a refused export, got {other:?}"),
    }
    let stored = std::fs::metadata(&cut).map_or(0, |m| m.len());
    assert!(stored <= 1 << 20, "the host stored {stored} bytes, past the budget");
    let mut p = vm.spawn(spawn_req(42, &["true"])).await.unwrap();
    assert!(matches!(p.events.recv().await, Some(ProcessEvent::Exited(_))), "the VM still works");
}

struct Member {
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    link: Option<String>,
    dev_major: u32,
    dev_minor: u32,
    data: Vec<u8>,
    xattrs: Vec<(String, Vec<u8>)>,
    /// A disk-referenced member's apparent size (its data is then the extent map).
    disk_size: Option<u64>,
}

fn read_tar(path: &Path) -> BTreeMap<String, Member> {
    let mut archive = tar::Archive::new(std::fs::File::open(path).unwrap());
    let mut out = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
        let (mut xattrs, mut disk_size) = (Vec::new(), None);
        if let Some(pax) = entry.pax_extensions().unwrap() {
            for ext in pax {
                let ext = ext.unwrap();
                if let Some(n) = ext.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    xattrs.push((n.to_owned(), ext.value_bytes().to_vec()));
                }
                if ext.key().unwrap() == boxwood_protocol::DISK_EXTENTS_RECORD {
                    disk_size = Some(ext.value().unwrap().parse().unwrap());
                }
            }
        }
        let h = entry.header();
        let mut member = Member {
            kind: h.entry_type(),
            mode: h.mode().unwrap(),
            uid: h.uid().unwrap(),
            gid: h.gid().unwrap(),
            link: entry.link_name_bytes().map(|l| String::from_utf8(l.into_owned()).unwrap()),
            dev_major: h.device_major().unwrap().unwrap_or(0),
            dev_minor: h.device_minor().unwrap().unwrap_or(0),
            data: Vec::new(),
            xattrs,
            disk_size,
        };
        entry.read_to_end(&mut member.data).unwrap();
        assert!(out.insert(name.clone(), member).is_none(), "{name} appears twice");
    }
    out
}

fn tar_order(path: &Path) -> Vec<String> {
    let mut archive = tar::Archive::new(std::fs::File::open(path).unwrap());
    archive.entries().unwrap().map(|e| String::from_utf8(e.unwrap().path_bytes().into_owned()).unwrap()).collect()
}
