//! Attacks on the host through image imports, by a token that may only import: reading host
//! files through every local transport, reaching the host's and internal services through
//! registry URLs, and learning host details from errors. Each first shows that the target
//! would be reached or read where the server allows it.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use boxwood_core::auth::{Permission, TokenConfig};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{TestServer, counting_listener, token};

const IMPORTER: &str = "importer-secret";

/// A token of namespace `beta` that may only import (and read its operations).
fn importer_token() -> TokenConfig {
    token(IMPORTER, "beta", &[Permission::Import, Permission::List])
}

/// Posts an import as the import-only token; `Ok(op)` once it ended, `Err(400 body)`.
async fn import(s: &TestServer, url: &str) -> Result<Value, Value> {
    let r = s.req_as(IMPORTER, Method::POST, "/images/import").json(&json!({"registry": {"url": url}})).send().await;
    let r = r.unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    if status == StatusCode::BAD_REQUEST {
        return Err(body);
    }
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["uuid"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let op: Value =
            s.req_as(IMPORTER, Method::GET, &format!("/operations/{id}")).send().await.unwrap().json().await.unwrap();
        if matches!(op["status"].as_str(), Some("SUCCESS" | "FAILED" | "CANCELLED")) {
            return Ok(op);
        }
        assert!(Instant::now() < deadline, "import did not end: {op}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn imports_cannot_read_host_files_reach_internal_services_or_leak_details() {
    let allowed = tempfile::tempdir().unwrap();
    let planted = allowed.path().join("planted.tar");
    std::fs::write(&planted, "PLANTED-SECRET, not an archive").unwrap();
    let (open_port, open_hits) = counting_listener("127.0.0.2");
    let (closed_port, closed_hits) = counting_listener("127.0.0.1");
    let dir = allowed.path().to_owned();
    let s = TestServer::start_with(move |c| {
        c.registry.local_dirs = vec![dir];
        c.registry.allow_hosts = vec!["127.0.0.2".into()];
        c.tokens = vec![token("alpha-secret", "alpha", &Permission::ALL), importer_token()];
    })
    .await;
    let state = s.state.as_ref().unwrap().path().to_owned();

    // Positive controls: an allowed local file is opened and parsed, an allowed internal
    // registry is contacted.
    let op = import(&s, &format!("docker-archive:{}", planted.display())).await.unwrap();
    assert_eq!(op["status"], "FAILED");
    assert!(op["error"].as_str().unwrap().contains("not a usable image archive"), "the file was read: {op}");
    let op = import(&s, &format!("docker://127.0.0.2:{open_port}/library/x:1")).await.unwrap();
    assert_eq!(op["status"], "FAILED");
    assert!(open_hits.load(Ordering::SeqCst) >= 1, "an allowed internal registry is contacted");

    // Another namespace's upload, as a host path into blobs/.
    let blob = s.upload(b"alpha's private upload".to_vec()).await;
    let sha = blob["sha256"].as_str().unwrap_or_default().to_owned();
    let mut local = vec![
        "docker-archive:/etc/shadow".to_owned(),
        "oci-archive:/etc/shadow".to_owned(),
        "oci:/etc".to_owned(),
        "docker-archive:/dev/zero".to_owned(),
        format!("docker-archive:{}/../etc/shadow", allowed.path().display()),
        format!("oci-archive:{}/boxwood.db", state.display()),
    ];
    if sha.len() == 64 {
        local.push(format!("oci-archive:{}/blobs/sha256/{}/{sha}", state.display(), &sha[..2]));
    }
    for url in &local {
        let op = import(&s, url).await.unwrap_or_else(|e| e);
        let text = op["error"].as_str().unwrap_or_default().to_owned();
        assert!(text.contains("no usable image archive or layout"), "{url}: {op}");
        for leak in ["root:", "SQLite", "private upload", &state.display().to_string()] {
            assert!(!text.contains(leak), "{url} leaked {leak:?}: {op}");
        }
    }

    let api_port = s.url.rsplit(':').next().unwrap().to_owned();
    for url in [
        format!("docker://127.0.0.1:{closed_port}/library/x:1"),
        format!("docker://127.0.0.1:{api_port}/library/x:1"),
        format!("docker://localhost:{closed_port}/library/x:1"),
        "docker://169.254.169.254/latest:1".to_owned(),
        "docker://10.20.30.40:5000/x/y:z".to_owned(),
    ] {
        let op = import(&s, &url).await.unwrap();
        assert_eq!(op["status"], "FAILED", "{url}");
        assert!(op["error"].as_str().unwrap().contains("internal address"), "{url}: {op}");
        assert!(op["error"].as_str().unwrap().contains("error id"), "details stay in the server log: {op}");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(closed_hits.load(Ordering::SeqCst), 0, "no connection reached the host's loopback service");
    s.stop().await;
}

fn tar_of(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, bytes) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, *bytes).unwrap();
    }
    b.into_inner().unwrap()
}

/// A minimal `docker save` archive of one layer holding `/hello`.
fn docker_archive() -> Vec<u8> {
    use sha2::Digest;
    let layer = tar_of(&[("hello", b"from an upload\n")]);
    let diff_id = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&layer)));
    let config = json!({"architecture": "amd64", "os": "linux", "config": {"Env": ["FROM_UPLOAD=1"]},
                        "rootfs": {"type": "layers", "diff_ids": [diff_id]}})
    .to_string();
    let manifest = json!([{"Config": "config.json", "RepoTags": ["x:1"], "Layers": ["layer.tar"]}]).to_string();
    tar_of(&[("layer.tar", &layer), ("config.json", config.as_bytes()), ("manifest.json", manifest.as_bytes())])
}

/// Imports from uploads by UUID: a namespace imports its own upload (the positive control),
/// while another namespace's upload is exactly as missing as one that never existed; an upload
/// that is no archive fails without its bytes in the error.
#[tokio::test]
async fn imports_from_uploads_stay_in_the_callers_namespace() {
    let s = TestServer::start_with(|c| {
        c.tokens = vec![token("alpha-secret", "alpha", &Permission::ALL), importer_token()];
    })
    .await;
    let archive = s.upload(docker_archive()).await;
    let archive_uuid = archive["uuid"].as_str().unwrap().to_owned();
    let junk = s.upload(b"UPLOADED-SECRET, not an archive".to_vec()).await;
    let junk_uuid = junk["uuid"].as_str().unwrap().to_owned();

    let as_alpha = |url: String| {
        let s = &s;
        async move {
            let r =
                s.req(Method::POST, "/images/import").json(&json!({"registry": {"url": url}})).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
            let id = r.json::<Value>().await.unwrap()["uuid"].as_str().unwrap().to_owned();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let (_, op) = s.get_json(&format!("/operations/{id}")).await;
                if matches!(op["status"].as_str(), Some("SUCCESS" | "FAILED" | "CANCELLED")) {
                    return op;
                }
                assert!(Instant::now() < deadline, "import did not end: {op}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // Positive control: the owner imports its upload, and the image holds the archive's file.
    let op = as_alpha(format!("docker-archive:upload:{archive_uuid}")).await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    let image = op["result"]["image"].as_str().unwrap().to_owned();
    let (status, hello) = s.get_json(&format!("/inspect/{image}/list?path=/")).await;
    assert_eq!(status, StatusCode::OK, "{hello}");
    assert!(hello.to_string().contains("hello"), "{hello}");

    let junk_op = as_alpha(format!("docker-archive:upload:{junk_uuid}")).await;
    assert_eq!(junk_op["status"], "FAILED");
    let text = junk_op["error"].as_str().unwrap();
    assert!(text.contains("not a usable image archive") && text.contains("error id"), "{junk_op}");
    assert!(!text.contains("SECRET") && !text.contains("/proc/") && !text.contains("blobs"), "{junk_op}");

    // Another namespace: alpha's upload and a UUID nobody uploaded answer alike.
    let refuse = |url: String| {
        let s = &s;
        async move {
            let r = s.req_as(IMPORTER, Method::POST, "/images/import").json(&json!({"registry": {"url": url}}));
            let r = r.send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let nobody = uuid::Uuid::new_v4().to_string();
    for transport in ["docker-archive", "oci-archive"] {
        let (st_theirs, theirs) = refuse(format!("{transport}:upload:{archive_uuid}")).await;
        let (st_none, none) = refuse(format!("{transport}:upload:{nobody}")).await;
        assert_eq!(st_theirs, StatusCode::NOT_FOUND, "{theirs}");
        assert_eq!(st_none, StatusCode::NOT_FOUND, "{none}");
        assert_eq!(theirs.to_string().replace(&archive_uuid, "U"), none.to_string().replace(&nobody, "U"));
    }
    let (st, bad) = refuse("docker-archive:upload:../../blobs/sha256".into()).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{bad}");
    let ops: Value = s.req_as(IMPORTER, Method::GET, "/operations").send().await.unwrap().json().await.unwrap();
    assert_eq!(ops, json!([]), "no refused import became an operation");
    s.stop().await;
}

/// Inside an allowed directory: a real archive imports (the positive control), while a FIFO,
/// a symlink to a host file and a missing name all fail at once with one and the same message
/// (no existence oracle, no thread left blocked on the FIFO).
#[tokio::test]
async fn allowed_dirs_refuse_fifos_and_symlinks_like_missing_files() {
    let allowed = tempfile::tempdir().unwrap();
    let dir = allowed.path().to_owned();
    std::fs::write(dir.join("good.tar"), docker_archive()).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(dir.join("fifo.tar")).status().unwrap().success());
    std::os::unix::fs::symlink("/etc/shadow", dir.join("shadow.tar")).unwrap();
    let d = dir.clone();
    let s = TestServer::start_with(move |c| {
        c.registry.local_dirs = vec![d];
        c.tokens = vec![importer_token()];
    })
    .await;
    let op = import(&s, &format!("docker-archive:{}/good.tar", dir.display())).await.unwrap();
    assert_eq!(op["status"], "SUCCESS", "positive control: an allowed archive imports: {op}");

    let without_id = |op: &Value| {
        let e = op["error"].as_str().unwrap_or_default();
        e.split(" (error id").next().unwrap_or_default().to_owned()
    };
    let mut seen = Vec::new();
    for name in ["fifo.tar", "shadow.tar", "missing.tar"] {
        let started = Instant::now();
        let op = import(&s, &format!("docker-archive:{}/{name}", dir.display())).await.unwrap();
        assert_eq!(op["status"], "FAILED", "{name}: {op}");
        assert!(started.elapsed() < Duration::from_secs(10), "{name}: refused at once");
        assert!(!op.to_string().contains("root:"), "{name}: {op}");
        seen.push(without_id(&op));
    }
    assert!(seen.iter().all(|m| m == &seen[0] && !m.is_empty()), "one answer for all: {seen:?}");
    s.stop().await;
}
