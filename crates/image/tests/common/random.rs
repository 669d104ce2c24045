//! Random layer trees for the kernel-oracle tests: entries over the names `a`, `b`, `c` up
//! to depth 3 (files, directories, opaque directories, whiteouts, symlinks, FIFOs and
//! hardlinks) with random owners, modes, times and xattrs.

use std::path::Path;

use super::*;

/// xorshift64*: deterministic, dependency-free.
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) % n
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Fills one layer with random entries over the names `a`, `b`, `c` up to depth 3.
pub fn random_layer(rng: &mut Rng, root: &Path, index: usize) {
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
