//! The guest is not trusted: root inside the VM takes the agent's port from PID 1 and forges
//! frames, floods its console, runs out of memory; one namespace floods the run queue; bad
//! requests that would fail late. Each test first shows the attack reaches the host.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use boxwood_core::auth::Permission;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{Frame, TestServer, stream_bytes, token};

/// Builds `guest/forge.c` (static, so it runs on any image).
fn forge_binary() -> Vec<u8> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/guest/forge.c");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("forge");
    let st = std::process::Command::new("cc").args(["-static", "-O2", "-o"]).arg(&out).arg(&src).status().unwrap();
    assert!(st.success(), "cc -static forge.c");
    std::fs::read(out).unwrap()
}

/// A run of `/forge <args>` as root on busybox.
async fn forge_run(s: &TestServer, forge: &Value, script: &str, extra: Value) -> String {
    let mut body = json!({"command": script, "shell": true, "disposable": true,
                          "files": {"/forge": {"uuid": forge["uuid"], "mode": "0755"}}});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    s.start_run(body).await
}

fn stdout_bytes(frames: &[Frame]) -> Vec<u8> {
    frames.iter().filter(|f| f.event == "stdout").flat_map(|f| stream_bytes(&f.data["data"])).collect()
}

#[tokio::test]
async fn forged_agent_frames_are_capped_or_fail_the_run_quickly() {
    let s = TestServer::start().await;
    let forge = s.upload(forge_binary()).await;

    // 12 MB of forged stdout for the main process (spid 1), which itself prints nothing.
    let cap = 65_536;
    let op = forge_run(&s, &forge, "/forge flood 1 12000000", json!({"truncate_output_at": cap})).await;
    let (op, frames) = s.wait(&op).await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    let logged = stdout_bytes(&frames);
    // The attack is observable: forged frames do reach the host as the process's output…
    assert!(!logged.is_empty() && logged.iter().all(|&b| b == b'F'), "forged output arrived");
    // …but the host keeps only truncate_output_at of it, in the log and in the result.
    assert_eq!(logged.len(), cap, "stored stdout is capped by the host");
    let result = &op["metadata"]["result"];
    assert_eq!(stream_bytes(&result["stdout"]).len(), cap);
    assert_eq!(result["stdout"]["truncated"], true);
    let t = frames.iter().find(|f| f.event == "truncated").expect("truncated event");
    assert_eq!(t.data["data"]["bytes_emitted"], cap);
    assert!(t.data["data"]["bytes_dropped"].as_u64().unwrap() >= 12_000_000 - cap as u64, "{t:?}");

    // A length header far past the frame limit: FAILED at once, with a clear reason.
    let started = Instant::now();
    let op = forge_run(&s, &forge, "/forge big; sleep 300", json!({"timeout": 600})).await;
    s.wait_status(&op, "EXECUTING", Duration::from_secs(120)).await;
    let exec = Instant::now();
    let (op, _) = s.wait(&op).await;
    assert_eq!(op["status"], "FAILED", "{op}");
    let error = op["error"].as_str().unwrap();
    assert!(error.contains("protocol error from the agent: frame of 2147483647 bytes exceeds"), "{error}");
    assert!(exec.elapsed() < Duration::from_secs(20), "failed within seconds ({:?})", exec.elapsed());

    // Half a frame, then silence: FAILED within seconds, not at the 600 s timeout.
    let op = forge_run(&s, &forge, "/forge half; sleep 300", json!({"timeout": 600})).await;
    s.wait_status(&op, "EXECUTING", Duration::from_secs(120)).await;
    let exec = Instant::now();
    let (op, _) = s.wait(&op).await;
    assert_eq!(op["status"], "FAILED", "{op}");
    let error = op["error"].as_str().unwrap();
    assert!(error.contains("a frame stayed incomplete for 5 s"), "{error}");
    assert!(exec.elapsed() < Duration::from_secs(25), "failed within seconds ({:?})", exec.elapsed());

    // The server is healthy afterwards.
    let (op, _) = s.run(json!({"command": "echo fine", "shell": true, "disposable": true})).await;
    assert_eq!(op["metadata"]["result"]["stdout"]["value"], "fine\n");
    eprintln!("forged frames: all three cases in {:?}", started.elapsed());
    s.stop().await;
}

#[tokio::test]
async fn console_flood_stays_bounded_and_oom_says_so() {
    let s = TestServer::start().await;
    let state = s.state.as_ref().unwrap().path().to_owned();
    // ~8 MB through the serial console, then a marker; the run sleeps so its files stay.
    let flood = "i=0; while [ $i -lt 64 ]; do head -c 131072 /bin/busybox | base64 > /dev/console; \
                 i=$((i+1)); done; echo console-flood-done > /dev/console; sleep 30";
    let op = s.start_run(json!({"command": flood, "shell": true, "disposable": true, "timeout": 300})).await;
    let log = state.join("run").join(&op).join("console.log");
    let (mut max, mut done) = (0u64, false);
    let deadline = Instant::now() + Duration::from_secs(280);
    while !done && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let len = std::fs::metadata(&log).map_or(0, |m| m.len());
        max = max.max(len);
        done = std::fs::read_to_string(&log).is_ok_and(|t| t.contains("console-flood-done"));
    }
    // The flood reached the host (the marker after ~8 MB arrived)…
    assert!(done, "the console flood was observed on the host (max console.log {max} bytes)");
    // …and the host's copy never exceeded its bound.
    assert!(max <= 1024 * 1024 + 64 * 1024, "console.log reached {max} bytes");
    eprintln!("console flood: console.log peaked at {max} bytes");
    s.req(Method::DELETE, &format!("/operations/{op}")).send().await.unwrap();
    let (op, _) = s.wait(&op).await;
    assert_eq!(op["status"], "CANCELLED");

    // tail buffers /dev/zero looking for a newline until the guest's OOM killer ends it.
    let (op, frames) = s.run(json!({"command": "tail /dev/zero", "shell": true, "disposable": true})).await;
    assert_eq!(op["status"], "FAILED", "{op}");
    assert!(op["error"].as_str().unwrap().contains("ran out of memory"), "{op}");
    // Observable as before (SIGKILL), now with its cause.
    assert_eq!(op["metadata"]["result"]["state"]["signal"], 9, "{op}");
    let exit = frames.iter().find(|f| f.event == "exit").expect("exit event");
    assert_eq!(exit.data["data"]["oom_killed"], true);
    // A plain SIGKILL is not called an OOM (the control).
    let (op, frames) = s.run(json!({"command": "kill -9 $$", "shell": true, "disposable": true})).await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    assert_eq!(op["metadata"]["result"]["state"]["signal"], 9);
    let exit = frames.iter().find(|f| f.event == "exit").expect("exit event");
    assert_eq!(exit.data["data"]["oom_killed"], false);
    s.stop().await;
}

#[tokio::test]
async fn a_flooding_namespace_cannot_take_every_slot() {
    let s = TestServer::start_with(|c| {
        c.core.max_concurrent_runs = 2;
        c.tokens =
            vec![token("alpha-secret", "alpha", &Permission::ALL), token("beta-secret", "beta", &Permission::ALL)];
    })
    .await;
    let spawn_as = |tok: &'static str, cmd: &'static str| {
        let s = &s;
        async move {
            let body = json!({"command": cmd, "shell": true, "disposable": true, "image": "tag:busybox:latest"});
            let r = s.req_as(tok, Method::POST, "/instances").json(&body).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
            r.json::<Value>().await.unwrap()["uuid"].as_str().unwrap().to_owned()
        }
    };
    let mut flood = Vec::new();
    for _ in 0..4 {
        flood.push(spawn_as("alpha-secret", "sleep 120").await);
    }
    s.wait_status(&flood[0], "EXECUTING", Duration::from_secs(120)).await;
    // The flood is real: alpha's other runs queue (the state a starved namespace would see).
    let (_, q) = s.get_json(&format!("/operations/{}", flood[1])).await;
    assert_eq!(q["status"], "PENDING");
    let started = Instant::now();
    let beta = spawn_as("beta-secret", "echo beta-ran").await;
    let r = s.req_as("beta-secret", Method::GET, &format!("/operations/{beta}/events?follow=1")).send();
    let body = tokio::time::timeout(Duration::from_secs(100), async { r.await.unwrap().text().await.unwrap() })
        .await
        .expect("beta's run finished while alpha's flood was queued");
    assert!(body.contains("beta-ran"), "{body}");
    eprintln!("beta ran in {:?} during alpha's flood", started.elapsed());
    for op in &flood[1..] {
        let (_, q) = s.get_json(&format!("/operations/{op}")).await;
        assert_eq!(q["status"], "PENDING", "alpha stays at its maximum");
    }
    for op in &flood {
        s.req(Method::DELETE, &format!("/operations/{op}")).send().await.unwrap();
    }
    s.stop().await;
}

#[tokio::test]
async fn late_failing_inputs_are_400_before_any_run() {
    let s = TestServer::start().await;
    let file = s.upload(b"x".to_vec()).await;
    let many: serde_json::Map<String, Value> = (0..200_000).map(|i| (format!("V{i}"), json!("1"))).collect();
    let bad = [
        json!({"command": "x".repeat(20 << 20)}),
        json!({"command": "pwd", "cwd": format!("/{}", "c".repeat(5000))}),
        json!({"command": "true", "env": many}),
        json!({"command": "true", "files": {"/proc/sys/kernel/x": {"uuid": file["uuid"]}}}),
        json!({"command": "true", "files": {"/dev/sda": {"uuid": file["uuid"]}}}),
    ];
    for body in bad {
        let mut body = body;
        body["image"] = json!("tag:busybox:latest");
        body["shell"] = json!(true);
        let (status, resp) = s.spawn(body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{resp}");
        assert_eq!(resp["status"], 400);
        assert!(resp["error"].as_str().unwrap().len() < 300, "the error does not echo the input");
    }
    let (_, ops) = s.get_json("/operations").await;
    assert_eq!(ops.as_array().unwrap().len(), 0, "no operation was created");
    // The control: the same shapes within the limits are accepted and run.
    let (op, _) = s
        .run(json!({"command": "pwd", "shell": true, "disposable": true, "cwd": format!("/{}", "c".repeat(200)),
                    "files": {"/etc/x": {"uuid": file["uuid"]}}}))
        .await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    s.stop().await;
}
