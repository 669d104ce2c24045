//! The kernel as oracle: a stack of layers mounted with overlayfs must show exactly what the
//! stack with some of its layers replaced by their `merge_layers` result shows, entry by
//! entry (type, content, mode, owner, mtime, xattrs, symlink target). Needs root and
//! overlayfs, both verified on the dev machine and in CI: a failed mount fails the test.

mod common;

use std::path::{Path, PathBuf};

use boxwood_image::merge_layers;
use common::*;

/// Mounts `layers` (topmost first) and snapshots the view.
fn mounted_view(layers: &[&Path], mountpoint: &Path) -> std::collections::BTreeMap<PathBuf, Node> {
    let mount = OverlayMount::new(layers, mountpoint);
    snapshot(&mount.path)
}

/// Replaces `layers[from..to]` by their merge and checks the view is unchanged; when the
/// merge covers the whole stack, the merged tree itself is compared (no whiteouts kept).
fn check_split(base: &Path, layers: &[PathBuf], from: usize, to: usize, tag: &str) {
    let all: Vec<&Path> = layers.iter().map(PathBuf::as_path).collect();
    let expected = mounted_view(&all, &base.join(format!("mnt-all-{tag}")));
    let out = base.join(format!("merged-{tag}-{from}-{to}"));
    let whole = from == 0 && to == layers.len();
    merge_layers(&all[from..to], &out, !whole).unwrap();
    let actual = if whole {
        snapshot(&out)
    } else {
        let mut stack: Vec<&Path> = all[..from].to_vec();
        stack.push(&out);
        stack.extend_from_slice(&all[to..]);
        mounted_view(&stack, &base.join(format!("mnt-{tag}-{from}-{to}")))
    };
    assert_same_view(&expected, &actual, &format!("{tag}: layers {from}..{to} merged"));
}

#[test]
fn hand_built_stack_matches_overlayfs() {
    let base = tempfile::tempdir().unwrap();
    let layers = scenario::build(base.path());
    for (from, to) in [(0, 3), (1, 4), (0, 2), (2, 5), (0, 5), (3, 5)] {
        check_split(base.path(), &layers, from, to, "hand");
    }
}

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) % n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Fills one layer with random entries over the names `a`, `b`, `c` up to depth 3.
fn random_layer(rng: &mut Rng, root: &Path, index: usize) {
    let mut files: Vec<String> = Vec::new();
    random_dir(rng, root, "", 0, index, &mut files);
}

fn random_meta(rng: &mut Rng, path: &Path, modes: &[u32], xattrs: bool) {
    let (uid, gid) = rng.pick(&[(0, 0), (1000, 1000), (1000, 0)]);
    set_owner(path, uid, gid);
    set_mode(path, rng.pick(modes));
    if xattrs && rng.below(4) == 0 {
        set_xattr(path, "user.tag", format!("x{}", rng.below(1000)).as_bytes());
    }
}

fn random_dir(rng: &mut Rng, root: &Path, rel: &str, depth: u32, index: usize, files: &mut Vec<String>) {
    for name in ["a", "b", "c"] {
        let rel = if rel.is_empty() { name.to_owned() } else { format!("{rel}/{name}") };
        let roll = rng.below(100);
        match roll {
            0..40 => {}
            40..55 => {
                let path = file(root, &rel, &format!("L{index}:{rel}:{}", rng.below(10)));
                random_meta(rng, &path, &[0o644, 0o600, 0o4755, 0o2711, 0o755], true);
                set_mtime(&path, 1_000_000 + rng.below(1000) as i64);
                files.push(rel);
            }
            55..78 if depth < 3 => {
                let path = if roll < 72 { dir(root, &rel) } else { opaque_dir(root, &rel) };
                random_dir(rng, root, &rel, depth + 1, index, files);
                random_meta(rng, &path, &[0o755, 0o700, 0o1777, 0o2775], true);
                set_mtime(&path, 2_000_000 + rng.below(1000) as i64);
            }
            55..88 => drop(whiteout(root, &rel)),
            88..93 => drop(link(root, &rel, &format!("/target-{index}-{}", rng.below(3)))),
            93..96 => {
                let path = fifo(root, &rel);
                random_meta(rng, &path, &[0o644, 0o600], false);
            }
            _ if !files.is_empty() => {
                let existing = files[rng.below(files.len() as u64) as usize].clone();
                hardlink(root, &rel, &existing);
            }
            _ => drop(file(root, &rel, "plain")),
        }
    }
}

#[test]
fn random_stacks_match_overlayfs() {
    const LAYERS: usize = 5;
    for seed in 1..=25u64 {
        let base = tempfile::tempdir().unwrap();
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let layers: Vec<PathBuf> = (0..LAYERS)
            .map(|i| {
                let root = dir(base.path(), &format!("L{i}"));
                random_layer(&mut rng, &root, i);
                root
            })
            .collect();
        let tag = format!("seed{seed}");
        for (from, to) in [(0, 3), (1, 4), (2, 5), (0, 2), (0, LAYERS)] {
            check_split(base.path(), &layers, from, to, &tag);
        }
    }
}
