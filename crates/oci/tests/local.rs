//! Offline sources made by real tools: skopeo's oci-archive / oci layout / docker-archive, and
//! an OCI layout built by umoci (whose repack writes its own whiteouts).

mod common;

use std::path::Path;
use std::process::Command;

use boxwood_oci::{ImageSource, Importer, OciError, RegistryConfig, parse_source};
use common::*;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn import(imp: &Importer, s: &str, tree: &Path) -> Result<boxwood_oci::Imported, OciError> {
    std::fs::create_dir_all(tree).unwrap();
    imp.import(&parse_source(s).unwrap(), None, tree).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_archives_and_layouts() {
    let skopeo = require("skopeo", "skopeo");
    let reg = TestRegistry::start(None).await;
    let pushed = reg.pusher().image("app/base", "v1", "amd64", &["PATH=/bin", "K=v"], &standard_layers()).await;
    let other = LayerBuilder::new().file("other", b"o").build();
    reg.pusher().image("app/other", "v2", "amd64", &[], &[(other, LAYER_GZIP)]).await;
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // Docker images cannot hold zstd layers, so the docker-archive comes from a gzip-only twin.
    let gzip_only: Vec<_> = standard_layers()
        .into_iter()
        .map(|(tar, media_type)| (tar, if media_type == LAYER_ZSTD { LAYER_GZIP } else { media_type }))
        .collect();
    reg.pusher().image("app/gz", "v1", "amd64", &["PATH=/bin", "K=v"], &gzip_only).await;
    let copy = |from: &str, dest: &str| {
        let mut c = Command::new(&skopeo);
        c.args(["copy", "--quiet", "--src-tls-verify=false", &format!("docker://{}/{from}", reg.host), dest]);
        c
    };
    run(&mut copy("app/base:v1", &format!("oci-archive:{}/img.tar", t.display())));
    run(&mut copy("app/base:v1", &format!("oci:{}/layout:v1", t.display())));
    run(&mut copy("app/gz:v1", &format!("docker-archive:{}/docker.tar:app/gz:v1", t.display())));
    // A second image in the same layout, so the tag matters.
    run(Command::new(&skopeo).args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{}/app/other:v2", reg.host),
        &format!("oci:{}/layout:v2", t.display()),
    ]));

    let imp = Importer::new(local_config(t), t.join("work"));
    for (n, s) in [
        format!("oci-archive:{}/img.tar", t.display()),
        format!("oci:{}/layout:v1", t.display()),
        format!("docker-archive:{}/docker.tar", t.display()),
    ]
    .iter()
    .enumerate()
    {
        let tree = t.join(format!("tree{n}"));
        let imported = import(&imp, s, &tree).await.unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(imported.env["K"], "v", "{s}");
        assert_eq!(imported.env["PATH"], "/bin", "{s}");
        check_standard_tree(&tree);
        let resolved = imp.resolve(&parse_source(s).unwrap(), None).await.unwrap();
        assert_eq!(resolved, imported.resolved, "{s}");
        if !s.starts_with("docker-archive") {
            assert_eq!(resolved.config_digest, pushed.config_digest, "{s}");
        }
    }

    let v2 = import(&imp, &format!("oci:{}/layout:v2", t.display()), &t.join("v2")).await.unwrap();
    assert!(v2.env.is_empty());
    assert_eq!(std::fs::read(t.join("v2/other")).unwrap(), b"o");

    let err = imp.resolve(&parse_source(&format!("oci:{}/layout", t.display())).unwrap(), None).await.unwrap_err();
    assert!(matches!(err, OciError::LocalSource { .. }) && err.to_string().contains("name one by tag"), "{err}");
    let err = imp.resolve(&parse_source(&format!("oci:{}/layout:v9", t.display())).unwrap(), None).await.unwrap_err();
    assert!(err.to_string().contains("no image tagged \"v9\""), "{err}");
    let err = imp.resolve(&ImageSource::OciArchive(t.join("missing.tar")), None).await.unwrap_err();
    assert!(matches!(err, OciError::LocalRefused), "{err}");
}

/// Host files outside the configured directories are never read, whatever the transport,
/// and a FIFO inside them is refused at once instead of blocking a thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_files_are_out_of_reach() {
    let t = tempfile::tempdir().unwrap();
    let allowed = t.path().join("allowed");
    std::fs::create_dir(&allowed).unwrap();
    let secret = t.path().join("secret.tar");
    std::fs::write(&secret, b"TOP-SECRET host file, not a tar at all").unwrap();
    std::os::unix::fs::symlink(&secret, allowed.join("link.tar")).unwrap();
    nix::unistd::mkfifo(&allowed.join("fifo.tar"), nix::sys::stat::Mode::S_IRWXU).unwrap();

    // Positive control: where the file is allowed, the importer reads it — and its parser
    // says so (the file is not an archive).
    let open = Importer::new(local_config(t.path()), t.path().join("work"));
    let err = open.resolve(&ImageSource::DockerArchive(secret.clone()), None).await.unwrap_err();
    assert!(matches!(err, OciError::LocalSource { .. }), "the allowed file was read: {err}");

    let disabled = Importer::new(RegistryConfig::default(), t.path().join("work"));
    let confined = Importer::new(local_config(&allowed), t.path().join("work"));
    for imp in [&disabled, &confined] {
        for src in [
            ImageSource::DockerArchive(secret.clone()),
            ImageSource::OciArchive(secret.clone()),
            ImageSource::OciDir(t.path().to_owned(), None),
            ImageSource::DockerArchive("/etc/shadow".into()),
            ImageSource::DockerArchive(allowed.join("link.tar")),
            ImageSource::DockerArchive(allowed.join("../secret.tar")),
        ] {
            let err = imp.resolve(&src, None).await.unwrap_err();
            assert!(matches!(err, OciError::LocalRefused | OciError::LocalDisabled), "{src}: {err}");
            assert!(!err.to_string().contains("SECRET") && !err.to_string().contains("/tmp"), "{err}");
        }
    }
    let started = std::time::Instant::now();
    let err = confined.resolve(&ImageSource::DockerArchive(allowed.join("fifo.tar")), None).await.unwrap_err();
    assert!(matches!(err, OciError::LocalRefused), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(2), "a FIFO is refused without opening it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_layout_blob_is_refused() {
    let skopeo = require("skopeo", "skopeo");
    let reg = TestRegistry::start(None).await;
    let layer = LayerBuilder::new().file("a", &[b'a'; 1000]).build();
    let pushed = reg.pusher().image("t", "v1", "amd64", &[], &[(layer.clone(), LAYER_TAR)]).await;
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    run(Command::new(&skopeo).args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{}/t:v1", reg.host),
        &format!("oci:{}:v1", layout.display()),
    ]));
    let _ = pushed;
    let blob_path = |d: &serde_json::Value| layout.join(format!("blobs/{}", d.as_str().unwrap().replace(':', "/")));
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob_path(&index["manifests"][0]["digest"])).unwrap()).unwrap();
    let blob = blob_path(&manifest["layers"][0]["digest"]);
    let mut bytes = std::fs::read(&blob).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let imp = Importer::new(local_config(tmp.path()), tmp.path().join("work"));
    let tree = tmp.path().join("tree");
    let err = import(&imp, &format!("oci:{}:v1", layout.display()), &tree).await.unwrap_err();
    assert!(matches!(err, OciError::DigestMismatch { .. }), "{err}");
    assert!(std::fs::read_dir(&tree).unwrap().next().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn umoci_built_image_with_deletions() {
    let umoci = require("umoci", "umoci");
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let layout = t.join("layout");
    let bundle = t.join("bundle");
    let image = format!("{}:v1", layout.display());
    run(Command::new(&umoci).arg("init").arg("--layout").arg(&layout));
    run(Command::new(&umoci).args(["new", "--image", &image]));
    run(Command::new(&umoci).args(["unpack", "--image", &image]).arg(&bundle));
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(rootfs.join("etc/conf.d")).unwrap();
    std::fs::write(rootfs.join("etc/keep"), "keep").unwrap();
    std::fs::write(rootfs.join("etc/drop"), "drop").unwrap();
    std::fs::write(rootfs.join("etc/conf.d/a"), "a").unwrap();
    std::fs::copy(require("busybox", "busybox-static"), rootfs.join("busybox")).unwrap();
    run(Command::new(&umoci).args(["repack", "--image", &image]).arg(&bundle));
    std::fs::remove_file(rootfs.join("etc/drop")).unwrap();
    std::fs::remove_dir_all(rootfs.join("etc/conf.d")).unwrap();
    std::fs::write(rootfs.join("etc/added"), "added").unwrap();
    run(Command::new(&umoci).args(["repack", "--image", &image]).arg(&bundle));
    run(Command::new(&umoci).args(["config", "--image", &image, "--config.env", "FROM_UMOCI=1"]));

    let imp = Importer::new(local_config(t), t.join("work"));
    let tree = t.join("tree");
    let imported = import(&imp, &format!("oci:{image}"), &tree).await.unwrap();
    assert_eq!(imported.env["FROM_UMOCI"], "1");
    assert_eq!(std::fs::read(tree.join("etc/keep")).unwrap(), b"keep");
    assert_eq!(std::fs::read(tree.join("etc/added")).unwrap(), b"added");
    assert!(!tree.join("etc/drop").exists());
    assert!(!tree.join("etc/conf.d").exists());
    assert!(tree.join("busybox").exists());
    assert!(list_tree(&tree).iter().all(|p| !p.contains(".wh.")), "{:?}", list_tree(&tree));
}

/// Local sources are read only from configured directories: here the test's own.
fn local_config(dir: &std::path::Path) -> RegistryConfig {
    RegistryConfig { local_dirs: vec![dir.to_owned()], ..RegistryConfig::default() }
}
