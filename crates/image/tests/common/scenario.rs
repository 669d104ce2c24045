//! A hand-built 5-layer stack covering every overlayfs rule merging has to honour: the top
//! three layers (`L0` topmost) are the ones merged, `L3`/`L4` stand below the merge.

use std::path::{Path, PathBuf};

use super::*;

/// Builds the stack under `base`; returns the layer roots, topmost first.
pub fn build(base: &Path) -> Vec<PathBuf> {
    let layers: Vec<PathBuf> = (0..5).map(|i| dir(base, &format!("L{i}"))).collect();
    let [l0, l1, l2, l3, l4] = [&layers[0], &layers[1], &layers[2], &layers[3], &layers[4]];

    // ---- below the merge ----
    file(l4, "a/below", "a/below from L4");
    file(l4, "b", "b from L4: hidden by L1's whiteout");
    file(l4, "c/old4", "hidden: c is opaque in L1");
    file(l4, "d/below", "hidden: d is a dir over a file in the merge");
    file(l4, "e/below", "hidden: e is whited out in L0");
    file(l4, "f/below", "visible through non-opaque f");
    file(l4, "j", "hidden by L0's whiteout");
    file(l4, "k/below", "hidden: k is a dir over a whiteout");
    file(l3, "m/below", "hidden: m is opaque in L1");
    file(l3, "i/below", "visible through non-opaque i");
    file(l3, "h/under", "hidden by the fifo h");
    file(l3, "q/below", "hidden: q is opaque in L0");
    file(l3, "z", "only below");
    file(l3, "r/below", "r is a whiteout over nothing in the merge");
    file(l3, "f/old", "hidden by L1's whiteout f/old");

    // ---- L2 (bottom of the merge) ----
    file(l2, "a/file1", "a/file1 from L2");
    file(l2, "a/sub/x", "a/sub/x from L2");
    file(l2, "b", "b from L2");
    file(l2, "c/y", "c/y from L2: hidden by opaque c in L1");
    file(l2, "d", "d is a file in L2");
    file(l2, "e/z", "e/z from L2");
    file(l2, "f/old", "f/old from L2");
    file(l2, "f/keep", "f/keep from L2");
    link(l2, "g", "/somewhere");
    file(l2, "h/k", "h/k from L2");
    file(l2, "m/old", "m/old from L2");
    file(l2, "hl/one", "hardlinked in L2");
    hardlink(l2, "hl/two", "hl/one");

    // ---- L1 ----
    let f2 = file(l1, "a/file2", "a/file2 from L1");
    set_xattr(&f2, "user.origin", b"L1");
    hardlink(l1, "a/file2-link", "a/file2");
    whiteout(l1, "b");
    opaque_dir(l1, "c");
    file(l1, "c/new", "c/new from L1");
    file(l1, "d/inner", "d/inner from L1");
    whiteout(l1, "f/old");
    fifo(l1, "h");
    whiteout(l1, "k");
    opaque_dir(l1, "m");
    file(l1, "m/new", "m/new from L1");

    // ---- L0 (top) ----
    let top_a = dir(l0, "a");
    let file1 = file(l0, "a/file1", "a/file1 from L0");
    set_owner(&file1, 1000, 1000);
    set_mode(&file1, 0o4755);
    set_xattr(&file1, "user.mime", b"text/plain");
    set_mtime(&file1, 1_234_567);
    whiteout(l0, "e");
    file(l0, "g", "g is a file in L0");
    let i = dir(l0, "i");
    file(l0, "i/top", "i/top from L0");
    whiteout(l0, "j");
    file(l0, "k/n", "k/n from L0");
    file(l0, "m/top", "m/top from L0");
    opaque_dir(l0, "q");
    file(l0, "q/top", "q/top from L0");
    whiteout(l0, "q/w");
    whiteout(l0, "r");
    link(l0, "s", "../escape/ok/only/a/target");

    // directory metadata last (creating children bumps mtimes)
    set_owner(&top_a, 1000, 100);
    set_mode(&top_a, 0o750);
    set_xattr(&top_a, "user.dir", b"top a");
    set_mtime(&top_a, 1_111_111);
    set_mode(&i, 0o1777);
    set_mtime(&i, 2_222_222);
    layers
}
