//! The `run` tool's documented examples, as written, on a real Python image: Debian bookworm's
//! Python 3.11 built by `scripts/python-image.sh`, pushed to a loopback registry as
//! `library/python:3.11` and imported as `docker://docker.io/library/python:3.11` through the
//! docker.io mirror, as a user's import goes. `pip install` reaches the real package index
//! through the guest's network, trusting the host's extra CAs (`vm.extra_ca_certs`) where the
//! network intercepts TLS.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::harness::TestServer;
use crate::import::{Registry, import};

fn stdout(op: &Value) -> String {
    op["metadata"]["result"]["stdout"]["value"].as_str().unwrap_or_default().to_owned()
}

/// The image's OCI layout, built once per checkout (the script caches and locks).
fn python_layout() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join("target/test-images/python");
    let out = Command::new(root.join("scripts/python-image.sh")).arg(&dir).output().unwrap();
    assert!(out.status.success(), "python-image.sh: {}", String::from_utf8_lossy(&out.stderr));
    dir.join("oci")
}

/// The CA certificates this host trusts beyond Debian's (a TLS-intercepting egress's).
fn host_extra_cas() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/usr/local/share/ca-certificates") else { return Vec::new() };
    let mut cas: Vec<PathBuf> =
        entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "crt")).collect();
    cas.sort();
    cas
}

/// A server with the Python image imported as `python:3.11` (and the host's extra CAs).
async fn python_server() -> (TestServer, Registry) {
    let layout = python_layout();
    let reg = Registry::start().await;
    let dest = format!("docker://{}/library/python:3.11", reg.host);
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:3.11", layout.display()))
        .arg(&dest)
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo copy: {}", String::from_utf8_lossy(&out.stderr));
    let mirror = format!("http://{}", reg.host);
    let cas = host_extra_cas();
    let s = TestServer::start_with(|c| {
        c.registry.mirrors.insert("docker.io".into(), vec![mirror.clone()]);
        c.vm.extra_ca_certs = cas.clone();
    })
    .await;
    let op =
        import(&s, json!({"registry": {"url": "docker://docker.io/library/python:3.11"}, "tag": "python:3.11"})).await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    (s, reg)
}

#[tokio::test]
async fn the_documented_run_examples_work_on_python() {
    let (s, _reg) = python_server().await;
    let image = "tag:python:3.11";

    let (op, _) =
        s.run(json!({"command": "python --version", "shell": true, "image": image, "disposable": true})).await;
    assert!(stdout(&op).starts_with("Python 3.11."), "{op}");

    let (op, _) = s
        .run(json!({"command": "echo $MY_VAR", "shell": true, "image": image, "env": {"MY_VAR": "hello"},
                    "disposable": true}))
        .await;
    assert_eq!(stdout(&op), "hello\n", "{op}");

    let main = s.upload(b"import sys\nprint('main ran on', sys.version_info[:2])\n".to_vec()).await;
    let (op, _) = s
        .run(json!({"command": "python /app/main.py", "shell": true, "image": image, "disposable": true,
                    "files": {"/app/main.py": {"uuid": main["uuid"], "mode": "0644"}}}))
        .await;
    assert_eq!(stdout(&op), "main ran on (3, 11)\n", "{op}");

    let (op, _) = s
        .run(json!({"command": "pip install --no-cache-dir --progress-bar off flask", "shell": true, "image": image,
                    "disposable": false, "timeout": 600}))
        .await;
    let result = &op["metadata"]["result"];
    assert_eq!((op["status"].as_str(), result["state"]["exit_code"].as_i64()), (Some("SUCCESS"), Some(0)), "{op}");
    let child = op["result_image_uuid"].as_str().unwrap().to_owned();

    let check = "python -c 'import flask; print(\"flask\", flask.__name__)'";
    let (op, _) = s.run(json!({"command": check, "shell": true, "image": child, "disposable": true})).await;
    assert_eq!(stdout(&op), "flask flask\n", "the result image has flask: {op}");
    let (op, _) = s.run(json!({"command": check, "shell": true, "image": image, "disposable": true})).await;
    let stderr = op["metadata"]["result"]["stderr"]["value"].as_str().unwrap_or_default();
    assert!(stderr.contains("No module named 'flask'"), "the source image is unchanged: {op}");
    s.stop().await;
}

/// A package set of over 200 MB from Debian's mirror, installed in a persisted run through the
/// scratch disk, then used from the child image.
#[tokio::test]
async fn apt_get_installs_a_large_package_set_that_the_next_run_uses() {
    let (s, _reg) = python_server().await;
    let install = "apt-get update -qq && apt-get install -y -qq --no-install-recommends build-essential >/dev/null \
                   && du -sm /usr | cut -f1";
    let (op, _) = s
        .run(json!({"command": install, "shell": true, "image": "tag:python:3.11", "disposable": false,
                    "timeout": 1500}))
        .await;
    let result = &op["metadata"]["result"];
    assert_eq!((op["status"].as_str(), result["state"]["exit_code"].as_i64()), (Some("SUCCESS"), Some(0)), "{op}");
    eprintln!("apt-get install build-essential: {} s, /usr {} MiB", op["duration"], stdout(&op).trim());
    let child = op["result_image_uuid"].as_str().unwrap().to_owned();
    let size = op["image_size"].as_u64().unwrap_or_default();
    assert!(size > 200 << 20, "the persisted diff is over 200 MB: {size}");

    let hello = s.upload(b"#include <stdio.h>\nint main(void) { puts(\"compiled\"); return 0; }\n".to_vec()).await;
    let (op, _) = s
        .run(json!({"command": "gcc -O2 -o /tmp/hello /src/hello.c && /tmp/hello", "shell": true, "image": child,
                    "disposable": true, "files": {"/src/hello.c": {"uuid": hello["uuid"], "mode": "0644"}}}))
        .await;
    assert_eq!(stdout(&op), "compiled\n", "{op}");
    s.stop().await;
}
