//! `vm.extra_ca_certs`: a guest trusts the operator's CA certificates (in its system bundle
//! and the env variables tools read), a persisted image never holds them, and a file that
//! holds anything but certificates stops the server at start.

use std::path::Path;
use std::process::Command;

use boxwood::app::App;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::harness::{TestServer, test_config};

/// A fresh self-signed CA certificate (PEM) made by `openssl`, and its private key.
fn make_ca(dir: &Path) -> (String, String) {
    let (cert, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=Boxwood test CA", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (scripts/install-deps.sh)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (std::fs::read_to_string(cert).unwrap(), std::fs::read_to_string(key).unwrap())
}

const SHOW: &str = "cat /etc/ssl/certs/ca-certificates.crt 2>&1; \
                    echo \"[$SSL_CERT_FILE][$REQUESTS_CA_BUNDLE][$CURL_CA_BUNDLE][$NODE_EXTRA_CA_CERTS]\"";
const BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

fn stdout(op: &serde_json::Value) -> String {
    op["metadata"]["result"]["stdout"]["value"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn guests_trust_the_extra_cas_and_persisted_images_never_hold_them() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = make_ca(dir.path());
    let body = cert.lines().nth(1).unwrap().to_owned();

    // Control: without the setting, the busybox image has no bundle and no variable is set.
    let plain = TestServer::start().await;
    let (op, _) = plain.run(json!({"command": SHOW, "shell": true, "disposable": true})).await;
    let out = stdout(&op);
    assert!(!out.contains(&body) && out.contains("[][][][]"), "{op}");
    plain.stop().await;

    let path = dir.path().join("ca.crt");
    let s = TestServer::start_with(|c| c.vm.extra_ca_certs = vec![path.clone()]).await;
    let (op, _) = s
        .run(json!({"command": format!("{SHOW}; echo mine > /etc/ssl/certs/mine.pem"), "shell": true,
                    "disposable": false}))
        .await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    let out = stdout(&op);
    assert!(out.contains("-----BEGIN CERTIFICATE-----") && out.contains(&body), "the bundle holds the CA: {out}");
    assert!(out.contains(&format!("[{BUNDLE}][{BUNDLE}][{BUNDLE}][{BUNDLE}]")), "{out}");
    let child = op["result_image_uuid"].as_str().unwrap().to_owned();

    // The child image has the run's own file but not the bundle the run was handed.
    let get = |p: &str| s.req(Method::GET, &format!("/inspect/{child}/download?path={p}")).send();
    let r = get("/etc/ssl/certs/mine.pem").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.text().await.unwrap(), "mine\n");
    assert_eq!(get(BUNDLE).await.unwrap().status(), StatusCode::NOT_FOUND, "the CA bundle was persisted");

    // A run on the child still gets it, and a variable the run sets itself is kept.
    let (op, _) = s
        .run(json!({"command": SHOW, "shell": true, "image": child, "disposable": true,
                    "env": {"SSL_CERT_FILE": "/mine.pem"}}))
        .await;
    let out = stdout(&op);
    assert!(out.contains(&body) && out.contains(&format!("[/mine.pem][{BUNDLE}]")), "{op}");
    s.stop().await;
}

#[tokio::test]
async fn a_ca_file_holding_a_private_key_stops_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = make_ca(dir.path());
    let mixed = dir.path().join("mixed.pem");
    std::fs::write(&mixed, format!("{cert}{key}")).unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut cfg = test_config(state.path());
    cfg.vm.extra_ca_certs = vec![mixed];
    let err = App::start(cfg).await.err().expect("the server refuses to start");
    let text = format!("{err:#}");
    assert!(text.contains("PRIVATE KEY") && text.contains("extra_ca_certs"), "{text}");
    assert!(!text.contains(key.lines().nth(1).unwrap()), "the key itself is not quoted: {text}");
}
