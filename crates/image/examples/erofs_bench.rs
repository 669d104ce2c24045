//! Layer commit cost: the Rust erofs writer vs `mkfs.erofs` (erofs-utils) on the busybox base
//! tree and a ~165 MiB tree; prints times, the ratio and image sizes. Then what the unpacked
//! tree buys against its space: a full read of the layer (every entry's metadata, every
//! file's bytes) from the inert tree vs in place from the erofs image, page cache warm.
//! Run: `cargo run --release -p boxwood-image --example erofs_bench`.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn best_of(n: usize, mut f: impl FnMut()) -> Duration {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap()
}

fn bench(name: &str, tree: &Path, work: &Path) {
    let ours = work.join("ours.erofs");
    let theirs = work.join("mkfs.erofs");
    let t_ours = best_of(5, || {
        let _ = std::fs::remove_file(&ours);
        let t = boxwood_image::erofs::tree_from_dir(tree).unwrap();
        boxwood_image::erofs::write_image(&t, &ours).unwrap();
    });
    let t_mkfs = best_of(5, || {
        let _ = std::fs::remove_file(&theirs);
        let ok = Command::new("mkfs.erofs").args(["--quiet", "--preserve-mtime"]).arg(&theirs).arg(tree).status();
        assert!(ok.unwrap().success());
        std::fs::File::open(&theirs).unwrap().sync_all().unwrap();
    });
    let size = |p: &Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.len(), m.blocks() * 512)
    };
    println!(
        "{name}: writer {:.1} ms, mkfs.erofs {:.1} ms, ratio mkfs/writer {:.2}; image bytes (apparent/allocated) writer {:?}, mkfs {:?}",
        t_ours.as_secs_f64() * 1e3,
        t_mkfs.as_secs_f64() * 1e3,
        t_mkfs.as_secs_f64() / t_ours.as_secs_f64(),
        size(&ours),
        size(&theirs)
    );
    assert_eq!(walk_tree(tree), walk_erofs(&ours), "both reads see the same entries and bytes");
    let t_tree = best_of(5, || {
        std::hint::black_box(walk_tree(tree));
    });
    let t_erofs = best_of(5, || {
        std::hint::black_box(walk_erofs(&ours));
    });
    println!(
        "{name}: full read from the tree {:.1} ms, from the erofs image {:.1} ms, ratio erofs/tree {:.2}; allocated bytes tree {}, erofs {}",
        t_tree.as_secs_f64() * 1e3,
        t_erofs.as_secs_f64() * 1e3,
        t_erofs.as_secs_f64() / t_tree.as_secs_f64(),
        du_bytes(tree),
        size(&ours).1
    );
}

fn du_bytes(tree: &Path) -> u64 {
    let out = Command::new("du").args(["-s", "-B1"]).arg(tree).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().parse().unwrap()
}

/// Entries and bytes seen reading every entry of an inert tree.
fn walk_tree(dir: &Path) -> (u64, u64) {
    use boxwood_image::inert;
    let (mut entries, mut bytes) = (0, 0);
    let mut buf = vec![0u8; 1 << 16];
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            let stat = inert::stat(&path).unwrap();
            entries += 1;
            if stat.is_dir() {
                stack.push(path);
            } else if stat.is_file() {
                let mut f = inert::open(&path).unwrap();
                loop {
                    let n = std::io::Read::read(&mut f, &mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    bytes += n as u64;
                }
            }
        }
    }
    (entries, bytes)
}

/// The same walk over the erofs image, read in place.
fn walk_erofs(image: &Path) -> (u64, u64) {
    let image = boxwood_image::erofs::ErofsImage::open(image).unwrap();
    let (mut entries, mut bytes) = (0, 0);
    let mut buf = vec![0u8; 1 << 16];
    let mut stack = vec![image.root().unwrap()];
    while let Some(dir) = stack.pop() {
        for e in image.read_dir(&dir).unwrap().iter() {
            let inode = image.inode(e.nid).unwrap();
            entries += 1;
            if inode.is_dir() {
                stack.push(inode);
            } else if inode.is_file() {
                let mut at = 0;
                loop {
                    let n = image.read_at(&inode, at, &mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    at += n as u64;
                }
                bytes += at;
            }
        }
    }
    (entries, bytes)
}

fn main() {
    let work = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into())).unwrap();
    let busybox = work.path().join("busybox");
    std::fs::create_dir(&busybox).unwrap();
    boxwood_image::build_busybox_tree(Path::new("/bin/busybox"), &busybox).unwrap();
    bench("busybox base", &busybox, work.path());

    // ~165 MiB: 2000 files of 1–100 KiB and 8 files of 8 MiB, in 40 directories
    let big = work.path().join("big");
    let mut seed = 0x9e37_79b9_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..2008 {
        let dir = big.join(format!("d{}", i % 40));
        std::fs::create_dir_all(&dir).unwrap();
        let len = if i >= 2000 { 8 << 20 } else { 1024 + (next() % (100 << 10)) as usize };
        let body: Vec<u8> = (0..len.div_ceil(8)).flat_map(|_| next().to_le_bytes()).take(len).collect();
        std::fs::write(dir.join(format!("f{i}")), body).unwrap();
    }
    // layer trees are inert (the writer reads each entry's record); mkfs.erofs reads the same dir
    boxwood_image::inert::make_inert(&big).unwrap();
    bench("~165 MiB tree", &big, work.path());
}
