//! Test harness: a real `docker-registry` child process (optionally with htpasswd auth), an
//! image pusher speaking the registry API, and hand-made layer tars.
#![allow(dead_code)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Panics (never skips) when a tool the tests need is missing, naming its Debian package.
pub fn require(bin: &str, package: &str) -> PathBuf {
    for dir in ["/usr/bin", "/bin", "/usr/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(bin);
        if p.exists() {
            return p;
        }
    }
    panic!("`{bin}` not found: install the Debian package `{package}` (scripts/install-deps.sh does)");
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A `docker-registry serve` child, killed on drop.
pub struct TestRegistry {
    child: Child,
    pub dir: tempfile::TempDir,
    pub host: String,
    pub creds: Option<(String, String)>,
}

impl TestRegistry {
    pub async fn start(auth: Option<(&str, &str)>) -> Self {
        let bin = require("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog: {{ level: warn }}\nstorage: {{ filesystem: {{ rootdirectory: {} }}, delete: {{ enabled: true }} }}\nhttp: {{ addr: 127.0.0.1:{port}, secret: test-secret }}\n",
            dir.path().join("data").display()
        );
        if let Some((user, pass)) = auth {
            let htpasswd = require("htpasswd", "apache2-utils");
            let out = Command::new(htpasswd).args(["-Bbn", user, pass]).output().expect("run htpasswd");
            assert!(out.status.success(), "htpasswd failed: {}", String::from_utf8_lossy(&out.stderr));
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, &out.stdout).expect("write htpasswd");
            config.push_str(&format!("auth: {{ htpasswd: {{ realm: basic-realm, path: {} }} }}\n", file.display()));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("write config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log file");
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let registry = TestRegistry {
            child,
            dir,
            host: format!("127.0.0.1:{port}"),
            creds: auth.map(|(u, p)| (u.to_string(), p.to_string())),
        };
        let url = format!("http://{}/v2/", registry.host);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = reqwest::get(&url).await
                && (r.status() == 200 || r.status() == 401)
            {
                break;
            }
            assert!(Instant::now() < deadline, "docker-registry did not answer on {url}: {}", registry.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        registry
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// The file the registry serves a blob from (for tampering).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.dir.path().join(format!("data/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }

    pub fn pusher(&self) -> Pusher {
        Pusher { http: reqwest::Client::new(), base: format!("http://{}", self.host), creds: self.creds.clone() }
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// Pushes blobs and manifests with monolithic uploads.
pub struct Pusher {
    http: reqwest::Client,
    pub base: String,
    creds: Option<(String, String)>,
}

impl Pusher {
    fn auth(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.creds {
            Some((u, p)) => r.basic_auth(u, Some(p)),
            None => r,
        }
    }

    pub async fn blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = digest_of(bytes);
        let resp = self.auth(self.http.post(format!("{}/v2/{repo}/blobs/uploads/", self.base))).send().await.unwrap();
        assert_eq!(resp.status(), 202, "start upload: {:?}", resp.text().await);
        let location = resp.headers()["location"].to_str().unwrap().to_string();
        let location = if location.starts_with("http") { location } else { format!("{}{location}", self.base) };
        let sep = if location.contains('?') { '&' } else { '?' };
        let resp = self
            .auth(self.http.put(format!("{location}{sep}digest={digest}")))
            .header("content-type", "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "finish upload: {:?}", resp.text().await);
        digest
    }

    pub async fn manifest(&self, repo: &str, reference: &str, media_type: &str, bytes: &[u8]) -> String {
        let resp = self
            .auth(self.http.put(format!("{}/v2/{repo}/manifests/{reference}", self.base)))
            .header("content-type", media_type)
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "put manifest: {:?}", resp.text().await);
        digest_of(bytes)
    }

    /// Pushes an image of `layers` (uncompressed tar, media type to compress to) and returns
    /// (manifest digest, config digest).
    pub async fn image(&self, repo: &str, tag: &str, arch: &str, env: &[&str], layers: &[(Vec<u8>, &str)]) -> Pushed {
        let mut descs = Vec::new();
        let mut diff_ids = Vec::new();
        for (tar, media_type) in layers {
            diff_ids.push(digest_of(tar));
            let blob = compress(tar, media_type);
            let digest = self.blob(repo, &blob).await;
            descs.push(serde_json::json!({"mediaType": media_type, "digest": digest, "size": blob.len()}));
        }
        let config = config_json(arch, env, &diff_ids);
        let config_digest = self.blob(repo, &config).await;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": descs,
        }))
        .unwrap();
        let manifest_digest = self.manifest(repo, tag, OCI_MANIFEST, &manifest).await;
        Pushed { manifest_digest, config_digest, manifest_size: manifest.len() }
    }
}

pub struct Pushed {
    pub manifest_digest: String,
    pub config_digest: String,
    pub manifest_size: usize,
}

pub fn config_json(arch: &str, env: &[&str], diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Env": env, "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

pub fn compress(tar: &[u8], media_type: &str) -> Vec<u8> {
    if media_type.ends_with("gzip") {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(tar).unwrap();
        enc.finish().unwrap()
    } else if media_type.ends_with("zstd") {
        zstd::encode_all(tar, 3).unwrap()
    } else {
        tar.to_vec()
    }
}

/// Builds a layer tar in memory.
pub struct LayerBuilder {
    b: tar::Builder<Vec<u8>>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    pub fn new() -> Self {
        Self { b: tar::Builder::new(Vec::new()) }
    }

    fn header(kind: tar::EntryType, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        h
    }

    pub fn dir(mut self, path: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, 0o755);
        self.b.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    pub fn file(self, path: &str, content: &[u8]) -> Self {
        self.file_mode(path, content, 0o644)
    }

    pub fn file_mode(mut self, path: &str, content: &[u8], mode: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode);
        h.set_size(content.len() as u64);
        self.b.append_data(&mut h, path, content).unwrap();
        self
    }

    pub fn file_owned(mut self, path: &str, content: &[u8], uid: u64, gid: u64) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, 0o640);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_size(content.len() as u64);
        self.b.append_data(&mut h, path, content).unwrap();
        self
    }

    pub fn xattr(mut self, name: &str, value: &[u8]) -> Self {
        let key = format!("SCHILY.xattr.{name}");
        self.b.append_pax_extensions([(key.as_str(), value)]).unwrap();
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Link, 0o644);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn fifo(mut self, path: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Fifo, 0o600);
        self.b.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    pub fn device(mut self, path: &str, kind: tar::EntryType, major: u32, minor: u32) -> Self {
        let mut h = Self::header(kind, 0o666);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.b.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    /// An entry with raw name and link-name bytes, bypassing the tar crate's path checks
    /// (for hostile names such as `../x` and `/x`).
    pub fn raw(mut self, kind: tar::EntryType, name: &[u8], link: &[u8], content: &[u8]) -> Self {
        let mut h = Self::header(kind, 0o644);
        h.set_size(content.len() as u64);
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..name.len()].copy_from_slice(name);
        old.linkname = [0; 100];
        old.linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        self.b.append(&h, content).unwrap();
        self
    }

    pub fn build(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

/// Every path under `root`, relative, sorted.
pub fn list_tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if p.symlink_metadata().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The standard three-layer test image: busybox and files (gzip), whiteouts + an opaque dir
/// (zstd), a directory replacing a symlink (plain tar).
pub fn standard_layers() -> Vec<(Vec<u8>, &'static str)> {
    let busybox = std::fs::read(require("busybox", "busybox-static")).expect("read busybox");
    let l1 = LayerBuilder::new()
        .dir("bin/")
        .file_mode("bin/busybox", &busybox, 0o755)
        .symlink("bin/sh", "busybox")
        .dir("etc/")
        .file("etc/hostname", b"one\n")
        .file("etc/remove-me", b"x")
        .hardlink("etc/hostname-link", "etc/hostname")
        .file_mode("bin/suid", b"#!/bin/sh\n", 0o4755)
        .file_owned("etc/owned", b"o", 1234, 5678)
        .xattr("user.boxwood", b"yes")
        .file("etc/xattr", b"x")
        .dir("opq/")
        .file("opq/old1", b"1")
        .dir("opq/sub/")
        .file("opq/sub/old2", b"2")
        .dir("gone/")
        .file("gone/inner", b"i")
        .symlink("swap", "etc")
        .dir("run/")
        .fifo("run/fifo")
        .device("dev-null", tar::EntryType::Char, 1, 3)
        .build();
    let l2 = LayerBuilder::new()
        .dir("etc/")
        .file("etc/.wh.remove-me", b"")
        .file("etc/hostname", b"two\n")
        .file(".wh.gone", b"")
        .dir("opq/")
        .file("opq/new", b"n")
        .file("opq/.wh..wh..opq", b"")
        .build();
    let l3 = LayerBuilder::new().dir("swap/").file("swap/inside", b"in").build();
    vec![(l1, LAYER_GZIP), (l2, LAYER_ZSTD), (l3, LAYER_TAR)]
}

/// Checks a tree made from [`standard_layers`]: what it holds, as its (inert) records say,
/// and that nothing of it is live on the host (the setuid file is a 0600 file there).
pub fn check_standard_tree(tree: &Path) {
    use boxwood_image::inert::{self, Kind};
    use std::os::unix::fs::MetadataExt;
    let read = |p: &str| std::fs::read(tree.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let stat = |p: &str| inert::stat(&tree.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(
        read("bin/busybox").len(),
        std::fs::metadata(require("busybox", "busybox-static")).unwrap().len() as usize
    );
    assert_eq!(stat("bin/busybox").meta.perm, 0o755);
    assert!(stat("bin/sh").is_symlink());
    assert_eq!(inert::read_link(&tree.join("bin/sh")).unwrap(), b"busybox");
    assert_eq!(read("etc/hostname"), b"two\n");
    assert_eq!(read("etc/hostname-link"), b"one\n", "hardlink keeps the replaced file's content");
    assert!(!tree.join("etc/remove-me").exists(), "whiteout applied");
    assert!(!tree.join("gone").exists(), "directory whiteout applied");
    let mut opq = list_tree(&tree.join("opq"));
    opq.sort();
    assert_eq!(opq, ["new"], "opaque dir keeps only its own layer");
    assert!(stat("swap").is_dir(), "dir replaced the symlink");
    assert_eq!(read("swap/inside"), b"in");
    assert!(!tree.join("etc/inside").exists());
    let suid = stat("bin/suid");
    assert_eq!(suid.meta.perm, 0o4755, "setuid kept (as data)");
    assert_eq!(suid.host.mode(), 0o100600, "and not live on the host");
    let owned = stat("etc/owned");
    assert_eq!((owned.uid(), owned.gid()), (1234, 5678), "owner kept");
    assert_eq!(owned.mtime(), 1_700_000_000, "mtime kept");
    assert_eq!(stat("etc/xattr").meta.xattr("user.boxwood"), Some(&b"yes"[..]), "xattr kept");
    assert_eq!(stat("run/fifo").kind(), Kind::Fifo, "fifo kept");
    assert!(!tree.join("dev-null").exists(), "device node skipped");
    let all = list_tree(tree);
    assert!(all.iter().all(|p| !p.rsplit('/').next().unwrap_or("").starts_with(".wh.")), "whiteout left: {all:?}");
    for p in &all {
        let m = tree.join(p).symlink_metadata().unwrap();
        assert!(m.mode() == 0o040700 || m.mode() == 0o100600, "{p} is live on the host: {:o}", m.mode());
    }
}

/// A TCP listener on `ip` that counts the connections it accepts: the internal service an
/// SSRF attempt aims at, whose count shows whether anything reached it.
pub fn counting_listener(
    ip: std::net::IpAddr,
) -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            if c.is_ok() {
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    (addr, hits)
}
