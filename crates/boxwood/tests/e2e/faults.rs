//! Faults: the state dir's filesystem fills up while runs, a persisted run and uploads are in
//! flight (a size-limited tmpfs, the free-space reserve off so the server really meets
//! ENOSPC). Every answer is a clear error or a real result: uploads 507 without host paths,
//! a 201 only for an operation that is stored, no operation seen in two states, reads keep
//! working; once space returns everything works again without a restart, and the server
//! still stops promptly.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::TestServer;

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        Self(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes `path` until the filesystem refuses; returns the bytes it took.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    let mut n = 0u64;
    while f.write_all(&chunk).is_ok() {
        n += chunk.len() as u64;
    }
    while f.write_all(&[0x5a]).is_ok() {
        n += 1;
    }
    n
}

fn free_bytes(path: &Path) -> u64 {
    let st = rustix::fs::statvfs(path).unwrap();
    st.f_bavail * st.f_frsize
}

/// Every status of every operation polled so far, to check none is seen going back.
#[derive(Default)]
struct Seen(HashMap<String, Vec<String>>);

impl Seen {
    async fn poll(&mut self, s: &TestServer, id: &str) -> Value {
        let (status, op) = s.get_json(&format!("/operations/{id}")).await;
        assert_eq!(status, StatusCode::OK, "a created operation reads back: {op}");
        let now = op["status"].as_str().unwrap().to_owned();
        let history = self.0.entry(id.to_owned()).or_default();
        if let Some(last) = history.last() {
            assert!(rank(last) <= rank(&now), "operation {id} went from {last} to {now}: {op}");
            if rank(last) == 3 {
                assert_eq!(last, &now, "operation {id} ended twice: {op}");
            }
        }
        history.push(now);
        op
    }

    async fn until_done(&mut self, s: &TestServer, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let op = self.poll(s, id).await;
            if rank(op["status"].as_str().unwrap()) == 3 {
                return op;
            }
            assert!(Instant::now() < deadline, "operation {id} never ended: {op}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn rank(status: &str) -> u8 {
    match status {
        "PENDING" | "ASSIGNED" => 1,
        "EXECUTING" => 2,
        "SUCCESS" | "FAILED" | "CANCELLED" => 3,
        other => panic!("unknown status {other}"),
    }
}

/// The client's view never names the host: no state path, no SQLite or OS text.
fn assert_clear(what: &str, text: &str, state: &Path) {
    let state = state.to_string_lossy();
    for leak in [state.as_ref(), "/tmp/", "sqlite", "os error", "database is locked"] {
        assert!(!text.to_lowercase().contains(&leak.to_lowercase()), "{what} leaks {leak:?}: {text}");
    }
}

/// A probe as an orchestrator sends it: no token.
async fn probe(s: &TestServer, path: &str) -> (StatusCode, Value) {
    let r = reqwest::get(format!("{}{path}", s.url)).await.unwrap();
    (r.status(), r.json().await.unwrap_or(Value::Null))
}

async fn upload(s: &TestServer, bytes: Vec<u8>) -> (StatusCode, Value) {
    s.try_upload_as(&s.token, bytes).await
}

fn persist_cmd(mib: u32, after_secs: u32) -> Value {
    json!({"command": format!("sleep {after_secs}; dd if=/dev/urandom of=/data bs=1M count={mib} 2>/dev/null; echo wrote"),
           "shell": true, "image": "tag:busybox:latest", "disposable": false})
}

#[tokio::test]
async fn a_full_disk_gives_clear_errors_and_recovers_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = Tmpfs::mount(dir.path(), "768m");
    let state = dir.path().to_owned();
    let s = TestServer::start_in(dir, |c| c.core.min_free_bytes = Some(0)).await;

    // Positive control: on this filesystem a persisted run and an upload work.
    let (op, _) = s.run(persist_cmd(1, 0)).await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    let (status, body) = upload(&s, vec![7u8; 4096]).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // Ready (once the template is made): the probe needs no token.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (status, body) = probe(&s, "/readyz").await;
        if status == StatusCode::OK {
            assert_eq!(body["ready"], true, "{body}");
            assert_eq!(body["checks"]["disk"], "ok", "{body}");
            break;
        }
        assert_eq!(body["checks"]["template"], "building", "only the template may be pending: {body}");
        assert!(Instant::now() < deadline, "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // In flight when the disk fills: a persisted run writing after it is full, a plain run.
    let mut seen = Seen::default();
    let persisted = s.start_run(persist_cmd(8, 6)).await;
    let plain = s.start_run(json!({"command": "sleep 6; echo still-here", "shell": true})).await;
    // An upload under way: its first MiB now, the rest once the disk is full.
    let (chunks, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let body =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (Ok::<_, std::io::Error>(c), rx)) });
    let streaming = s
        .req(Method::POST, "/files")
        .header("Content-Type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(body))
        .send();
    let streaming = tokio::spawn(streaming);
    chunks.send(vec![1u8; 1 << 20]).await.unwrap();
    seen.until_running(&s, &persisted).await;

    let filler = state.join("filler");
    let took = fill(&filler);
    assert!(free_bytes(&state) < 1 << 20, "the disk is full ({took} bytes filled)");
    for _ in 0..8 {
        if chunks.send(vec![2u8; 1 << 20]).await.is_err() {
            break;
        }
    }
    drop(chunks);
    // 507 said plainly (or, if the server answered before the body ended, the connection
    // closed under the rest).
    if let Ok(r) = streaming.await.unwrap() {
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "the upload in flight: {body}");
        assert_clear("the upload in flight", &body.to_string(), &state);
    }

    // Uploads: 507, said plainly; nothing of them stays.
    let (status, body) = upload(&s, vec![9u8; 2 << 20]).await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{body}");
    assert_eq!(body["status"], 507, "{body}");
    assert!(body["error"].as_str().unwrap().contains("disk is full"), "{body}");
    assert_clear("the upload error", &body.to_string(), &state);

    // New runs: a 201 only for a stored operation (it reads back and ends), else a clear
    // 503/507. Enough of them that a connection a failed write left inside a transaction
    // would be met again (before the store closed such connections, this saw an operation
    // go from FAILED back to ASSIGNED: two connections, two snapshots).
    let mut created = Vec::new();
    for i in 0..40 {
        let (status, body) = s
            .spawn(json!({"command": format!("echo new-{i}"), "shell": true,
                                            "image": "tag:busybox:latest"}))
            .await;
        match status {
            StatusCode::CREATED => created.push(body["uuid"].as_str().unwrap().to_owned()),
            StatusCode::INSUFFICIENT_STORAGE | StatusCode::SERVICE_UNAVAILABLE => {
                assert_clear("a refused run", &body.to_string(), &state);
            }
            other => panic!("a run on a full disk got {other}: {body}"),
        }
    }
    // Not ready while full, and it says why (and when to look again); alive all the same.
    let r = reqwest::get(format!("{}/readyz", s.url)).await.unwrap();
    assert_eq!(r.headers().get("retry-after").map(|v| v.as_bytes()), Some(&b"1"[..]));
    let (status, body) = probe(&s, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!((body["status"].clone(), body["checks"]["disk"].clone()), (json!(503), json!("failing")), "{body}");
    assert!(body["error"].as_str().unwrap().contains("disk"), "{body}");
    assert_clear("readiness", &body.to_string(), &state);
    assert_eq!(probe(&s, "/healthz").await.0, StatusCode::OK);
    // Reads keep answering while the disk is full.
    let (status, images) = s.get_json("/images").await;
    assert_eq!(status, StatusCode::OK, "{images}");

    // While the disk stays full, an operation whose end cannot be written yet keeps the
    // status it has; none is seen going back or ending twice.
    let ops = [persisted.clone(), plain.clone()].into_iter().chain(created.iter().cloned()).collect::<Vec<_>>();
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        for id in &ops {
            seen.poll(&s, id).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Space returns: every operation ends, with a clear reason, and everything works again,
    // with no restart.
    std::fs::remove_file(&filler).unwrap();
    for id in &ops {
        let op = seen.until_done(&s, id).await;
        if op["status"] == "FAILED" {
            assert_clear("a failed run", &op["error"].to_string(), &state);
        }
    }
    let op = seen.poll(&s, &persisted).await;
    assert_eq!(op["status"], "FAILED", "the persisted run could not keep its output or changes: {op}");
    assert!(op["error"].as_str().unwrap().contains("the server's disk"), "the cause is named: {op}");

    let (op, _) = s.run(persist_cmd(1, 0)).await;
    assert_eq!(op["status"], "SUCCESS", "a persisted run after recovery: {op}");
    let image = op["result_image_uuid"].as_str().unwrap();
    let (status, listed) = s.get_json(&format!("/inspect/{image}/list?path=/")).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    assert!(listed.to_string().contains("data"), "{listed}");
    let (status, body) = upload(&s, vec![9u8; 2 << 20]).await;
    assert_eq!(status, StatusCode::CREATED, "an upload after recovery: {body}");
    let (status, body) = probe(&s, "/readyz").await;
    assert_eq!(status, StatusCode::OK, "ready again: {body}");
    // And nothing changed its mind meanwhile.
    for id in &ops {
        seen.poll(&s, id).await;
    }

    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(60), s.stop()).await.expect("the server stops after a full disk");
    eprintln!("stopped in {:?}", t.elapsed());
    drop(mnt);
}

impl Seen {
    /// Polls until the operation runs its command.
    async fn until_running(&mut self, s: &TestServer, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.poll(s, id).await["status"] != "EXECUTING" {
            assert!(Instant::now() < deadline, "operation {id} never started");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
