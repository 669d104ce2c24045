//! Hand-crafted hostile and tricky layers applied with `apply_layers`: nothing may ever be
//! written outside the tree (checked against a sentinel directory beside it), and the
//! flattening rules hold within and across layers.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use boxwood_image::inert;
use boxwood_oci::{OciError, apply_layers};
use common::{LayerBuilder, list_tree};
use tar::EntryType;

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    tree: PathBuf,
    sentinel: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_owned();
        let tree = root.join("tree");
        let sentinel = root.join("sentinel");
        std::fs::create_dir(&tree).unwrap();
        std::fs::create_dir(&sentinel).unwrap();
        std::fs::write(sentinel.join("file"), "untouched").unwrap();
        Fixture { _tmp: tmp, root, tree, sentinel }
    }

    fn apply(&self, layers: Vec<Vec<u8>>) -> Result<u64, OciError> {
        let mut paths = Vec::new();
        for (i, layer) in layers.into_iter().enumerate() {
            let p = self.root.join(format!("layer{i}.tar"));
            std::fs::write(&p, layer).unwrap();
            paths.push(p);
        }
        apply_layers(&paths, &self.tree)
    }

    /// The sentinel and everything else beside the tree is as it was.
    fn check_outside(&self) {
        assert_eq!(list_tree(&self.sentinel), ["file"], "sentinel dir changed");
        assert_eq!(std::fs::read(self.sentinel.join("file")).unwrap(), b"untouched");
        assert_eq!(std::fs::metadata(self.sentinel.join("file")).unwrap().nlink(), 1, "sentinel hard-linked");
        let mut beside: Vec<_> =
            std::fs::read_dir(&self.root).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        beside.retain(|n| !n.starts_with("layer"));
        beside.sort();
        assert_eq!(beside, ["sentinel", "tree"], "something was created beside the tree");
    }

    fn tree_is_empty(&self) -> bool {
        std::fs::read_dir(&self.tree).unwrap().next().is_none()
    }
}

fn refused(result: Result<u64, OciError>) -> String {
    match result {
        Err(e @ OciError::HostileLayer { .. }) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn climbing_names_are_refused() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("dotdot file", LayerBuilder::new().raw(EntryType::Regular, b"../sentinel/evil", b"", b"x").build()),
        ("nested dotdot", LayerBuilder::new().raw(EntryType::Regular, b"a/../../sentinel/evil", b"", b"x").build()),
        ("absolute file", LayerBuilder::new().raw(EntryType::Regular, b"/tmp/boxwood-oci-evil", b"", b"x").build()),
        ("dotdot dir", LayerBuilder::new().raw(EntryType::Directory, b"../sentinel/d/", b"", b"").build()),
        ("hardlink outside", LayerBuilder::new().raw(EntryType::Link, b"hl", b"../sentinel/file", b"").build()),
        ("hardlink absolute", LayerBuilder::new().raw(EntryType::Link, b"hl", b"/etc/passwd", b"").build()),
        ("whiteout outside", LayerBuilder::new().raw(EntryType::Regular, b"../.wh.sentinel", b"", b"").build()),
        ("whiteout of dotdot", LayerBuilder::new().raw(EntryType::Regular, b"a/.wh...", b"", b"").build()),
    ];
    for (name, layer) in cases {
        let f = Fixture::new();
        let msg = refused(f.apply(vec![LayerBuilder::new().file("ok", b"ok").build(), layer]));
        assert!(f.tree_is_empty(), "{name}: tree not emptied after refusal");
        f.check_outside();
        eprintln!("{name}: {msg}");
    }
    assert!(!Path::new("/tmp/boxwood-oci-evil").exists());
}

#[test]
fn symlinked_parents_stay_inside_the_tree() {
    let f = Fixture::new();
    let sentinel = f.sentinel.display().to_string();
    let l1 = LayerBuilder::new()
        .symlink("up", "../sentinel")
        .symlink("deep", "../../../../../../../..")
        .symlink("abs", &sentinel)
        .symlink("root", "/")
        .build();
    let l2 = LayerBuilder::new()
        .file("up/evil", b"1")
        .file("deep/sentinel/evil", b"2")
        .file("abs/evil", b"3")
        .file("root/sentinel/file", b"4")
        .dir("up/newdir/")
        .build();
    let l3 = LayerBuilder::new().file("up/.wh.file", b"").file("root/.wh.sentinel2", b"").build();
    f.apply(vec![l1, l2.clone()]).unwrap();
    f.check_outside();
    // Every write landed inside the tree, where the links point when the tree is `/`.
    assert_eq!(std::fs::read(f.tree.join("sentinel/evil")).unwrap(), b"2");
    assert_eq!(std::fs::read(f.tree.join("sentinel/file")).unwrap(), b"4");
    assert!(f.tree.join("sentinel/newdir").is_dir());
    let abs_inside = f.tree.join(sentinel.trim_start_matches('/'));
    assert_eq!(std::fs::read(abs_inside.join("evil")).unwrap(), b"3");

    let g = Fixture::new();
    let l1 = LayerBuilder::new().symlink("up", "../sentinel").symlink("root", "/").build();
    let l2 = LayerBuilder::new().file("root/sentinel/file", b"inside").file("sentinel2", b"").build();
    g.apply(vec![l1, l2, l3]).unwrap();
    g.check_outside();
    // The whiteouts resolved inside the tree too.
    assert_eq!(list_tree(&g.tree), ["root", "sentinel", "up"]);
}

#[test]
fn hardlinks_through_symlinks_and_last_component_symlinks() {
    // Hardlink through a symlinked parent resolves inside the tree, where there is no such file.
    let f = Fixture::new();
    let l1 = LayerBuilder::new().symlink("up", "../sentinel").build();
    let l2 = LayerBuilder::new().hardlink("x", "up/file").build();
    let msg = refused(f.apply(vec![l1, l2]));
    assert!(msg.contains("does not exist"), "{msg}");
    f.check_outside();

    // A symlink named as the last component is replaced, never written through.
    let f = Fixture::new();
    let target = f.sentinel.join("file").display().to_string();
    let l1 =
        LayerBuilder::new().symlink("victim", &target).symlink("dirlink", &f.sentinel.display().to_string()).build();
    let l2 = LayerBuilder::new().file("victim", b"replaced").dir("dirlink/").file("dirlink/inner", b"i").build();
    f.apply(vec![l1, l2]).unwrap();
    f.check_outside();
    assert!(inert::stat(&f.tree.join("victim")).unwrap().is_file());
    assert!(inert::stat(&f.tree.join("dirlink")).unwrap().is_dir());

    // A hardlink to a symlink links the symlink itself.
    let f = Fixture::new();
    let l = LayerBuilder::new().symlink("s", &f.sentinel.join("file").display().to_string()).hardlink("h", "s").build();
    f.apply(vec![l]).unwrap();
    assert!(inert::stat(&f.tree.join("h")).unwrap().is_symlink());
    f.check_outside();
}

#[test]
fn a_dir_replaced_by_a_symlink_cannot_redirect_later_members() {
    let f = Fixture::new();
    let l1 = LayerBuilder::new().dir("d/").file("d/f", b"f").build();
    let l2 = LayerBuilder::new().symlink("d", "../sentinel").file("d/g", b"g").build();
    f.apply(vec![l1, l2]).unwrap();
    f.check_outside();
    assert!(inert::stat(&f.tree.join("d")).unwrap().is_symlink());
    assert_eq!(std::fs::read(f.tree.join("sentinel/g")).unwrap(), b"g");
}

#[test]
fn symlink_loops_are_refused() {
    let f = Fixture::new();
    let l = LayerBuilder::new().symlink("a", "b").symlink("b", "a").file("a/x", b"").build();
    let msg = refused(f.apply(vec![l]));
    assert!(msg.contains("symbolic links"), "{msg}");
    f.check_outside();
}

#[test]
fn devices_skipped_fifos_kept() {
    let f = Fixture::new();
    let l = LayerBuilder::new()
        .device("null", EntryType::Char, 1, 3)
        .device("sda", EntryType::Block, 8, 0)
        .device("wh", EntryType::Char, 0, 0)
        .fifo("pipe")
        .build();
    f.apply(vec![l]).unwrap();
    assert_eq!(list_tree(&f.tree), ["pipe"]);
}

#[test]
fn whiteout_rules_within_and_across_layers() {
    let f = Fixture::new();
    let l1 = LayerBuilder::new()
        .dir("a/")
        .file("a/lower", b"l")
        .dir("a/sub/")
        .file("a/sub/deep", b"d")
        .file("b", b"b")
        .dir("c/")
        .file("c/x", b"x")
        .build();
    // Entries before the opaque marker and a whiteout for an entry of the same layer survive.
    let l2 = LayerBuilder::new()
        .file("a/sub/new", b"n")
        .file("a/.wh..wh..opq", b"")
        .file("same", b"s")
        .file(".wh.same", b"")
        .file(".wh.b", b"")
        .file("c", b"file replaces dir")
        .file(".wh.never-existed", b"")
        .build();
    let l3 = LayerBuilder::new().file(".wh..wh..opq", b"").file("only", b"o").build();
    f.apply(vec![l1.clone(), l2.clone()]).unwrap();
    assert_eq!(list_tree(&f.tree), ["a", "a/sub", "a/sub/new", "c", "same"]);
    assert_eq!(std::fs::read(f.tree.join("c")).unwrap(), b"file replaces dir");

    let g = Fixture::new();
    g.apply(vec![l1, l2, l3]).unwrap();
    assert_eq!(list_tree(&g.tree), ["only"], "opaque root");
}

#[test]
fn corrupt_and_invalid_inputs() {
    let f = Fixture::new();
    let p = f.root.join("layer-bad.gz");
    std::fs::write(&p, [0x1f, 0x8b, 8, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]).unwrap();
    let err = apply_layers(std::slice::from_ref(&p), &f.tree).unwrap_err();
    assert!(matches!(err, OciError::CorruptLayer { .. }), "{err}");
    // A truncated tar.
    let mut tar = LayerBuilder::new().file("big", &[7u8; 5000]).build();
    tar.truncate(2048);
    std::fs::write(&p, tar).unwrap();
    let err = apply_layers(std::slice::from_ref(&p), &f.tree).unwrap_err();
    assert!(matches!(err, OciError::CorruptLayer { .. }), "{err}");
    assert!(f.tree_is_empty());
    // The tree must be an empty directory.
    std::fs::write(f.tree.join("x"), "").unwrap();
    let err = apply_layers(&[], &f.tree).unwrap_err();
    assert!(matches!(err, OciError::InvalidTree { .. }), "{err}");
}
