//! Abuse: a namespace fills the host's disk through persisted runs and uploads. Its image and
//! upload quotas stop it (what fits is kept: the positive control), another namespace is
//! unaffected, and below the free-space reserve persist and upload are refused for everyone.

use boxwood_core::auth::Permission;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{TestServer, token};

const BETA: &str = "beta-secret";

async fn upload_as(s: &TestServer, secret: &str, bytes: Vec<u8>) -> (StatusCode, Value) {
    s.try_upload_as(secret, bytes).await
}

/// A persisted run as `secret` writing `mib` MiB of incompressible data.
async fn persist_mib(s: &TestServer, secret: &str, mib: u32) -> Value {
    let body = json!({"command": format!("dd if=/dev/urandom of=/blob-$$ bs=1M count={mib} 2>/dev/null"), "shell": true,
                      "image": "tag:busybox:latest"});
    let r = s.req_as(secret, Method::POST, "/instances").json(&body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let id = r.json::<Value>().await.unwrap()["uuid"].as_str().unwrap().to_owned();
    s.wait_as(secret, &id).await
}

#[tokio::test]
async fn quotas_stop_one_namespace_and_the_reserve_stops_everyone() {
    let s = TestServer::start_with(|c| {
        c.tokens = vec![token("alpha-secret", "alpha", &Permission::ALL), token(BETA, "beta", &Permission::ALL)];
        c.core.quota.image_bytes = Some(5 << 20);
        c.core.quota.upload_bytes = Some(1 << 20);
    })
    .await;
    let alpha = s.token.clone();

    // Images: 3 MiB of changes (one erofs layer of ~3 MiB) fit; the next 3 MiB do not.
    let op = persist_mib(&s, &alpha, 3).await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    let op = persist_mib(&s, &alpha, 3).await;
    assert_eq!(op["status"], "FAILED", "{op}");
    let error = op["error"].as_str().unwrap();
    assert!(error.contains("image storage quota is exhausted"), "{error}");
    assert!(!error.contains("/tmp") && !error.contains("images/"), "no host paths: {error}");
    let staging = s.state.as_ref().unwrap().path().join("images/tmp");
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0, "nothing of the refused layer stays");
    // Disposable runs are not storage and still run; another namespace persists.
    let (op, _) = s.run(json!({"command": "echo ok", "shell": true, "disposable": true})).await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    let op = persist_mib(&s, BETA, 3).await;
    assert_eq!(op["status"], "SUCCESS", "beta has its own quota: {op}");

    // Uploads: 600 KiB fit, another 600 KiB do not (413, nothing stored); beta's fit.
    let (st, _) = upload_as(&s, &alpha, vec![1u8; 600 << 10]).await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, body) = upload_as(&s, &alpha, vec![2u8; 600 << 10]).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["status"], 413);
    assert!(body["error"].as_str().unwrap().contains("upload storage quota"), "{body}");
    let (_, files) = s.get_json("/files").await;
    assert_eq!(files["files"].as_array().map(Vec::len), Some(1), "the refused upload was not kept: {files}");
    let (st, _) = upload_as(&s, BETA, vec![2u8; 600 << 10]).await;
    assert_eq!(st, StatusCode::CREATED);
    s.stop().await;

    // The reserve: set above the filesystem's free space, every namespace is refused.
    let s = TestServer::start_with(|c| c.core.min_free_bytes = Some(u64::MAX / 2)).await;
    let (st, body) = upload_as(&s, &s.token.clone(), b"small".to_vec()).await;
    assert_eq!(st, StatusCode::INSUFFICIENT_STORAGE, "{body}");
    assert_eq!(body["status"], 507);
    let op = persist_mib(&s, &s.token.clone(), 1).await;
    assert_eq!(op["status"], "FAILED", "{op}");
    assert!(op["error"].as_str().unwrap().contains("low on disk space"), "{op}");
    let (op, _) = s.run(json!({"command": "echo still", "shell": true, "disposable": true})).await;
    assert_eq!(op["status"], "SUCCESS", "disposable runs need no storage: {op}");
    s.stop().await;
}
