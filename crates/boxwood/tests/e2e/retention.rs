//! The retention policy on a real server: `boxwood gc [--dry-run]` and `boxwood usage` (the
//! real CLI over the admin socket), what a pass removes and what it never does (tagged
//! images, images with children, what a live run uses), lineage of removed images, and a
//! server killed with SIGKILL during passes losing nothing an image still names.

use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use boxwood_core::RetentionConfig;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{TestServer, docker_archive, spawn_server_with};

/// Everything is old enough at once; no background passes (the test asks for each).
fn eager() -> RetentionConfig {
    RetentionConfig {
        images_after_days: Some(0.0),
        uploads_after_days: Some(0.0),
        operations_after_days: Some(0.0),
        directory_states_after_days: Some(0.0),
        interval_secs: 0,
    }
}

/// Runs the real `boxwood` CLI against the server on `state`; returns its stdout as JSON.
async fn cli(state: &Path, args: &[&str]) -> Value {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_boxwood"))
        .args(args)
        .args(["--json", "--state-dir"])
        .arg(state)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "boxwood {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn removed_uuids(report: &Value) -> HashSet<String> {
    report["images"].as_array().unwrap().iter().map(|i| i["uuid"].as_str().unwrap().to_owned()).collect()
}

async fn persist(s: &TestServer, image: &str, command: &str) -> (String, String) {
    let (op, _) = s.run(json!({"command": command, "shell": true, "image": image})).await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    (op["uuid"].as_str().unwrap().to_owned(), op["result_image_uuid"].as_str().unwrap().to_owned())
}

/// The layer files on disk, as digests.
fn layer_files(state: &Path) -> HashSet<String> {
    std::fs::read_dir(state.join("images/layers"))
        .unwrap()
        .map(|e| format!("sha256:{}", e.unwrap().file_name().to_string_lossy().trim_end_matches(".erofs")))
        .collect()
}

#[tokio::test]
async fn a_pass_removes_what_the_policy_allows_and_never_what_is_tagged_has_children_or_is_in_use() {
    let s = TestServer::start_with(|c| c.core.retention = eager()).await;
    let state = s.state.as_ref().unwrap().path().to_owned();
    let (leaf_op, leaf) = persist(&s, "tag:busybox:latest", "echo leaf > /f").await;
    let (_, tagged) = persist(&s, "tag:busybox:latest", "echo tagged > /f").await;
    let r =
        s.req(Method::PATCH, &format!("/images/{tagged}/tag")).json(&json!({"tag": "keep:1"})).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let (_, parent) = persist(&s, "tag:busybox:latest", "echo parent > /f").await;
    let (_, child) = persist(&s, &parent, "echo child > /g").await;
    let (_, busy) = persist(&s, "tag:busybox:latest", "echo busy > /f").await;
    let upload = s.upload(b"nobody needs this\n".to_vec()).await;
    let sha = upload["sha256"].as_str().unwrap().to_owned();
    let files = json!({"files": [{"path": "/app/x", "uuid": upload["uuid"]}]});
    let r = s.req(Method::POST, "/directory-states").json(&files).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let state_id = r.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    let live = s.start_run(json!({"command": "sleep 20", "shell": true, "image": busy, "disposable": true})).await;
    s.wait_status(&live, "EXECUTING", Duration::from_secs(120)).await;
    let before = layer_files(&state);

    // The dry run lists the leaves that qualify now and removes nothing.
    let dry = cli(&state, &["gc", "--dry-run"]).await;
    assert_eq!(dry["dry_run"], true);
    assert_eq!(removed_uuids(&dry), HashSet::from([leaf.clone(), child.clone()]), "{dry:#}");
    assert_eq!((dry["uploads"].as_u64(), dry["directory_states"].as_u64()), (Some(1), Some(1)), "{dry:#}");
    assert!(listed(&s, &leaf).await, "a dry run removes no image");
    assert_eq!(layer_files(&state), before, "a dry run removes no file");

    let report = cli(&state, &["gc"]).await;
    // The child goes, which makes its parent a leaf that goes in the same pass; the tagged
    // image, the live run's image and the seeded base stay.
    assert_eq!(removed_uuids(&report), HashSet::from([leaf.clone(), child.clone(), parent.clone()]), "{report:#}");
    assert!(report["layer_files"].as_u64().unwrap() >= 3, "{report:#}");
    assert_eq!(report["uploads"], 1);
    assert_eq!(report["directory_states"], 1, "the state nobody fetched since goes: {report:#}");
    assert_eq!(report["operations"], 5, "the five finished runs go: {report:#}");
    assert!(layer_files(&state).len() < before.len());
    let db = boxwood_store::SqliteStore::open(&state.join("boxwood.db")).await.unwrap();
    let named = boxwood_store::Store::referenced_layers(&db).await.unwrap();
    assert_eq!(layer_files(&state), named, "every layer file left is one an image names");

    // Removed things answer 404, saying why; lineage keeps naming them.
    let r = s.spawn(json!({"command": "true", "shell": true, "image": leaf, "disposable": true})).await;
    assert_eq!(r.0, StatusCode::NOT_FOUND, "{}", r.1);
    assert!(r.1["error"].as_str().unwrap().contains("removed by the retention policy"), "{}", r.1);
    let (_, lineage) = s.get_json(&format!("/images/{parent}/lineage")).await;
    assert_eq!(lineage["status"], 404, "{lineage}");
    let (status, _) = s.get_json(&format!("/files/{sha}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = s.get_json(&format!("/directory-states/{state_id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = s.get_json(&format!("/operations/{leaf_op}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The live run goes on, on its image, and the kept images still run.
    let (op, _) = s.wait(&live).await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    for image in [&tagged, &busy] {
        let (op, _) = s.run(json!({"command": "cat /f", "shell": true, "image": image, "disposable": true})).await;
        assert_eq!(op["status"], "SUCCESS", "{op}");
    }
    let (_, lineage) = s.get_json(&format!("/images/{busy}/lineage")).await;
    let base_uuid = lineage["parent"].as_str().unwrap().to_owned();
    let (_, base_lineage) = s.get_json(&format!("/images/{base_uuid}/lineage")).await;
    let removed: HashSet<&str> =
        base_lineage["removed_children"].as_array().unwrap().iter().map(|r| r["uuid"].as_str().unwrap()).collect();
    assert_eq!(removed, HashSet::from([leaf.as_str(), parent.as_str()]), "{base_lineage:#}");

    // Usage per namespace, from the CLI and in the metrics.
    let usage = cli(&state, &["usage"]).await;
    let mine = usage.as_array().unwrap().iter().find(|u| u["namespace"] == "default").expect("default namespace");
    assert_eq!(mine["images"], 2, "{usage:#}");
    assert!(mine["image_bytes"].as_u64().unwrap() > 0 && mine["event_bytes"].as_u64().unwrap() > 0, "{usage:#}");
    let metrics = s.client.get(format!("{}/metrics", s.url)).bearer_auth(&s.token).send().await.unwrap();
    let text = metrics.text().await.unwrap();
    let series = |name: &str| text.lines().find(|l| l.starts_with(name)).map(str::to_owned);
    assert_eq!(
        series("boxwood_gc_removed_total{kind=\"images\"}").as_deref(),
        Some("boxwood_gc_removed_total{kind=\"images\"} 3")
    );
    let objects = series("boxwood_namespace_objects{namespace=\"default\",kind=\"images\"}");
    assert_eq!(objects.as_deref(), Some("boxwood_namespace_objects{namespace=\"default\",kind=\"images\"} 2"));
    s.stop().await;
}

/// A docker-archive of one layer holding `name` (so each import is a distinct image).
fn archive(name: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let body = format!("{name}\n");
    let mut h = tar::Header::new_ustar();
    h.set_size(body.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    b.append_data(&mut h, name, body.as_bytes()).unwrap();
    docker_archive(&b.into_inner().unwrap())
}

async fn import(s: &TestServer, name: &str) -> String {
    let file = s.upload(archive(name)).await;
    let body = json!({"registry": {"url": format!("docker-archive:upload:{}", file["uuid"].as_str().unwrap())}});
    let r = s.req(Method::POST, "/images/import").json(&body).send().await.unwrap();
    let id = r.json::<Value>().await.unwrap()["uuid"].as_str().unwrap().to_owned();
    let op = s.wait_as(&s.token, &id).await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    op["result"]["image"].as_str().unwrap().to_owned()
}

/// Whether `GET /images?uuid=` lists the image.
async fn listed(s: &TestServer, uuid: &str) -> bool {
    let (_, body) = s.get_json(&format!("/images?uuid={uuid}")).await;
    !body["images"].as_array().unwrap().is_empty()
}

/// The layers the state dir's images name (read beside a running server or after it died).
async fn named_layers(state: &Path) -> HashSet<String> {
    let db = boxwood_store::SqliteStore::open(&state.join("boxwood.db")).await.unwrap();
    let named = boxwood_store::Store::referenced_layers(&db).await.unwrap();
    db.close().await;
    named
}

#[tokio::test]
async fn sigkill_during_passes_loses_nothing_an_image_names() {
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path();
    let conf_dir = tempfile::tempdir().unwrap();
    let config = conf_dir.path().join("boxwood.toml");
    let policy = "images_after_days = 0\nuploads_after_days = 0\noperations_after_days = 0\ninterval_secs = 0\n";
    std::fs::write(&config, format!("[core.retention]\n{policy}")).unwrap();
    let serve_args = ["--config", config.to_str().unwrap()];
    let start = || spawn_server_with(state, &[], &serve_args, Stdio::null());

    let (mut child, url, token) = start().await;
    let mut s = TestServer::attach(url, token);
    let (_, kept) = persist(&s, "tag:busybox:latest", "echo kept > /k").await;
    let r = s.req(Method::PATCH, &format!("/images/{kept}/tag")).json(&json!({"tag": "kept:1"})).send().await.unwrap();
    assert!(r.status().is_success());
    let mut doomed = Vec::new();
    for i in 0..12 {
        doomed.push(import(&s, &format!("doomed-{i}")).await);
    }
    // SIGKILL at a different moment of a pass each round. Nothing an image names may be
    // missing then; files of removed images may be (the next start sweeps them).
    let mut left_after = Vec::new();
    for delay_ms in [0u64, 5, 20, 60] {
        let mut gc = tokio::process::Command::new(env!("CARGO_BIN_EXE_boxwood"))
            .args(["gc", "--state-dir"])
            .arg(state)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        child.kill().await.unwrap();
        let _ = child.wait().await;
        let _ = gc.wait().await;
        let named = named_layers(state).await;
        let files = layer_files(state);
        let missing: Vec<_> = named.difference(&files).collect();
        assert!(missing.is_empty(), "a killed pass lost layers images name: {missing:?}");

        let (c, url, token) = start().await;
        (child, s) = (c, TestServer::attach(url, token));
        assert!(listed(&s, &kept).await, "the tagged image survives");
        assert_eq!(layer_files(state), named_layers(state).await, "the restart swept what the pass left");
        let mut left = 0;
        for u in &doomed {
            left += usize::from(listed(&s, u).await);
        }
        left_after.push(left);
    }
    eprintln!("doomed images left after each killed pass: {left_after:?}");
    assert!(left_after[0] > 0, "the first kill came before its pass ended: {left_after:?}");
    assert!(left_after.windows(2).all(|w| w[0] >= w[1]), "nothing removed comes back: {left_after:?}");

    // A pass left to finish removes the rest; the tagged image still runs.
    let report = cli(state, &["gc"]).await;
    for u in &doomed {
        assert!(!listed(&s, u).await, "{u} is removed by a full pass: {report:#}");
    }
    assert_eq!(layer_files(state), named_layers(state).await);
    let (op, _) = s.run(json!({"command": "cat /k", "shell": true, "image": kept, "disposable": true})).await;
    assert_eq!(op["metadata"]["result"]["stdout"]["value"], "kept\n", "{op}");
    child.kill().await.unwrap();
    let _ = child.wait().await;
}
