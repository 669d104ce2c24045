//! Archives the server opened itself (a client's upload) import without any local directory
//! being allowed, while the same file named by path stays refused; device nodes, FIFOs and
//! symlinked layout members are refused at once; refusals never quote the file.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use boxwood_oci::{ArchiveFile, ArchiveFormat, ImageSource, Importer, OciError, RegistryConfig, parse_source};
use common::*;

fn skopeo_copy(skopeo: &Path, host: &str, from: &str, dest: &str) {
    let out = Command::new(skopeo)
        .args(["copy", "--quiet", "--src-tls-verify=false", &format!("docker://{host}/{from}"), dest])
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo: {}", String::from_utf8_lossy(&out.stderr));
}

fn allowing(dir: &Path) -> RegistryConfig {
    RegistryConfig { local_dirs: vec![dir.to_owned()], ..RegistryConfig::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_archives_import_but_their_paths_do_not() {
    let skopeo = require("skopeo", "skopeo");
    let reg = TestRegistry::start(None).await;
    let gzip_only: Vec<_> = standard_layers()
        .into_iter()
        .map(|(tar, media_type)| (tar, if media_type == LAYER_ZSTD { LAYER_GZIP } else { media_type }))
        .collect();
    reg.pusher().image("app/gz", "v1", "amd64", &["K=v"], &gzip_only).await;
    let tmp = tempfile::tempdir().unwrap();
    let blobs = tmp.path().join("blobs");
    std::fs::create_dir(&blobs).unwrap();
    let (oci, docker) = (blobs.join("oci.tar"), blobs.join("docker.tar"));
    skopeo_copy(&skopeo, &reg.host, "app/gz:v1", &format!("oci-archive:{}", oci.display()));
    skopeo_copy(&skopeo, &reg.host, "app/gz:v1", &format!("docker-archive:{}:app/gz:v1", docker.display()));

    let imp = Importer::new(RegistryConfig::default(), tmp.path().join("work"));
    for (n, (format, path)) in [(ArchiveFormat::Oci, &oci), (ArchiveFormat::Docker, &docker)].into_iter().enumerate() {
        // The path form is refused: no local directory is allowed.
        let by_path = match format {
            ArchiveFormat::Oci => ImageSource::OciArchive(path.clone()),
            ArchiveFormat::Docker => ImageSource::DockerArchive(path.clone()),
        };
        assert!(matches!(imp.check(&by_path), Err(OciError::LocalDisabled)));
        assert!(matches!(imp.resolve(&by_path, None).await, Err(OciError::LocalDisabled)));
        // The parsed upload form names nothing the importer can open by itself.
        let id = uuid::Uuid::new_v4();
        let upload = parse_source(&format!("{}:upload:{id}", if n == 0 { "oci-archive" } else { "docker-archive" }));
        let upload = upload.unwrap();
        assert_eq!(upload, ImageSource::Upload { format, uuid: id });
        assert!(imp.check(&upload).is_ok());
        assert!(imp.resolve(&upload, None).await.is_err());

        let file = ArchiveFile::open(path, format!("upload:{id}")).unwrap();
        let src = ImageSource::Opened { format, file };
        assert_eq!(src.to_string(), upload.to_string(), "shown as the client wrote it, never as a path");
        let tree = tmp.path().join(format!("tree{n}"));
        std::fs::create_dir(&tree).unwrap();
        let imported = imp.import(&src, None, &tree).await.unwrap_or_else(|e| panic!("{src}: {e}"));
        assert_eq!(imported.env["K"], "v");
        check_standard_tree(&tree);
    }

    // A symlink, a FIFO or a device in the blob directory is never opened as an upload.
    std::os::unix::fs::symlink(&docker, blobs.join("link")).unwrap();
    nix::unistd::mkfifo(&blobs.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    for name in ["link", "fifo", "missing"] {
        let r = ArchiveFile::open(&blobs.join(name), "upload:x");
        assert!(matches!(r, Err(OciError::LocalRefused)), "{name}: {r:?}");
    }
    assert!(ArchiveFile::open(Path::new("/dev/zero"), "upload:x").is_err());
}

/// A FIFO or device node inside an allowed directory: opening a FIFO for reading blocks until
/// a writer comes (shown first), so it must be refused before it is ever opened that way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifos_and_devices_are_refused_at_once() {
    let t = tempfile::tempdir().unwrap();
    let fifo = t.path().join("fifo.tar");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let dev = t.path().join("zero.tar");
    nix::sys::stat::mknod(
        &dev,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::S_IRWXU,
        nix::sys::stat::makedev(1, 5),
    )
    .unwrap();

    // Positive controls: a plain open of the FIFO blocks (the thread is still stuck after
    // 300 ms), and the device node reads endless zeros.
    let (tx, rx) = std::sync::mpsc::channel();
    let f = fifo.clone();
    std::thread::spawn(move || {
        let _ = std::fs::File::open(&f);
        let _ = tx.send(());
    });
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "opening a FIFO blocks");
    let _writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap(); // frees that thread
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let mut zeros = [1u8; 4];
    std::io::Read::read_exact(&mut std::fs::File::open(&dev).unwrap(), &mut zeros).unwrap();
    assert_eq!(zeros, [0; 4]);
    drop(_writer);

    let imp = Importer::new(allowing(t.path()), t.path().join("work"));
    for src in [
        ImageSource::DockerArchive(fifo.clone()),
        ImageSource::OciArchive(fifo.clone()),
        ImageSource::OciDir(fifo.clone(), None),
        ImageSource::DockerArchive(dev.clone()),
        ImageSource::OciArchive(dev.clone()),
        ImageSource::DockerArchive("/dev/zero".into()),
    ] {
        let started = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(5), imp.resolve(&src, None)).await;
        let err = r.expect("refused, not blocked").unwrap_err();
        assert!(matches!(err, OciError::LocalRefused), "{src}: {err}");
        assert!(started.elapsed() < Duration::from_secs(1), "{src}: refused at once");
    }
}

/// Inside an allowed `oci:` layout, a member that is a symlink (to a file outside) is not
/// followed: the layout reads where its members are real files, and fails where one is a link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layout_members_do_not_follow_symlinks() {
    let skopeo = require("skopeo", "skopeo");
    let reg = TestRegistry::start(None).await;
    let layer = LayerBuilder::new().file("a", b"a").build();
    reg.pusher().image("t", "v1", "amd64", &[], &[(layer, LAYER_TAR)]).await;
    let tmp = tempfile::tempdir().unwrap();
    let allowed = tmp.path().join("allowed");
    std::fs::create_dir(&allowed).unwrap();
    let layout = allowed.join("layout");
    skopeo_copy(&skopeo, &reg.host, "t:v1", &format!("oci:{}:v1", layout.display()));
    let imp = Importer::new(allowing(&allowed), tmp.path().join("work"));
    let src = ImageSource::OciDir(layout.clone(), Some("v1".into()));
    imp.resolve(&src, None).await.expect("positive control: the real layout resolves");

    let outside = tmp.path().join("index.json");
    std::fs::rename(layout.join("index.json"), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, layout.join("index.json")).unwrap();
    let err = imp.resolve(&src, None).await.unwrap_err();
    assert!(matches!(err, OciError::LocalSource { .. }), "{err}");
    let shown = err.client_message();
    assert!(!shown.contains(&tmp.path().display().to_string()) && !shown.contains("/proc/"), "{shown}");
}
