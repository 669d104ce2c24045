//! Operation lifecycle: failures (spawn, guest crash), event-log replay and filters, inflight
//! output, cancel, queueing, and recovery after the server itself dies.

use std::process::Stdio;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{TestServer, qemu_processes_with, run_vms, spawn_server_with, until_gone};

#[tokio::test]
async fn spawn_failure_and_guest_crash_end_failed_with_completion() {
    let s = TestServer::start().await;
    let (op, frames) = s.run(json!({"command": "/no/such/binary", "disposable": true})).await;
    assert_eq!(op["status"], "FAILED", "{op}");
    assert!(op["error"].as_str().unwrap().contains("spawn failed"), "{op}");
    assert_eq!(op["result"], json!({"image": null, "tag": null}));
    assert_eq!(frames.last().unwrap().data["data"]["status"], "FAILED");

    let id = s
        .start_run(json!({"command": "echo c > /proc/sysrq-trigger; sleep 60", "shell": true, "disposable": true}))
        .await;
    let (op, frames) = s.wait(&id).await;
    assert_eq!(op["status"], "FAILED", "{op}");
    let error = op["error"].as_str().unwrap();
    assert!(error.contains("crash") && error.contains("Kernel panic"), "the error explains the crash: {error}");
    assert_eq!(frames.last().unwrap().data["data"]["error"], error);
    let state = s.state.as_ref().unwrap().path().to_owned();
    assert_eq!(until_gone(|| run_vms(&state)).await, Vec::<u32>::new(), "no QEMU outlives a crashed guest");
    s.stop().await;
}

#[tokio::test]
async fn event_log_replays_resumes_and_filters() {
    let s = TestServer::start().await;
    let id = s.start_run(json!({"command": "echo one; echo two >&2", "shell": true, "disposable": true})).await;
    let (_, all) = s.wait(&id).await;
    let replay = s.events(&id, "", None).await;
    assert_eq!(
        replay.iter().map(|f| f.id).collect::<Vec<_>>(),
        all.iter().map(|f| f.id).collect::<Vec<_>>(),
        "follow=0 replays the whole log"
    );
    let mid = all[2].id;
    let since = s.events(&id, &format!("since={mid}"), None).await;
    assert!(since.iter().all(|f| f.id > mid) && since.len() == all.len() - 3);
    let header = s.events(&id, "since=0", Some(mid)).await;
    assert_eq!(header.len(), since.len(), "Last-Event-Id wins over since");
    let main = s.events(&id, "spid=1", None).await;
    assert!(main.iter().all(|f| f.data["spid"] == 1) && main.iter().any(|f| f.event == "exit"));
    let followed = s.events(&id, "follow=1", None).await;
    assert_eq!(followed.last().unwrap().event, "completion", "follow on a finished operation closes after completion");
    s.stop().await;
}

#[tokio::test]
async fn inflight_output_cancel_and_queueing() {
    let s = TestServer::start_with(|c| c.core.max_concurrent_runs = 1).await;
    let running = s
        .start_run(json!({"command": "echo first; sleep 120", "shell": true, "disposable": true, "timeout": 300}))
        .await;
    let queued = s.start_run(json!({"command": "echo never", "shell": true, "disposable": true})).await;
    let op = s.wait_status(&running, "EXECUTING", Duration::from_secs(120)).await;
    let mut op = op;
    for _ in 0..100 {
        if op["metadata"]["result"]["stdout"]["value"] == "first\n" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        op = s.get_json(&format!("/operations/{running}?inflight=1")).await.1;
    }
    assert_eq!(op["metadata"]["result"]["stdout"]["value"], "first\n", "inflight output: {op}");
    assert_eq!(op["metadata"]["result"]["state"]["exit_code"], -1);
    let (_, q) = s.get_json(&format!("/operations/{queued}")).await;
    assert_eq!(q["status"], "PENDING", "runs beyond the limit wait");
    assert_eq!(q["duration"], 0.0);
    let (_, listed) = s.get_json("/operations?status=PENDING").await;
    assert_eq!(listed.as_array().unwrap().len(), 1);

    // A follower attached while the operation is still queued sees it through to the end.
    let follower = {
        let (client, url, token, id) = (s.client.clone(), s.url.clone(), s.token.clone(), queued.clone());
        tokio::spawn(async move {
            let r = client
                .get(format!("{url}/v1/operations/{id}/events?follow=1"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            crate::harness::parse_sse(&r.text().await.unwrap())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in [&queued, &running] {
        let r = s.req(Method::DELETE, &format!("/operations/{id}")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    let followed = tokio::time::timeout(Duration::from_secs(60), follower).await.unwrap().unwrap();
    assert_eq!(followed.last().map(|f| f.data["data"]["status"].clone()), Some(json!("CANCELLED")));
    for id in [&queued, &running] {
        let (op, frames) = s.wait(id).await;
        assert_eq!(op["status"], "CANCELLED", "{op}");
        assert_eq!(frames.last().unwrap().data["data"]["status"], "CANCELLED");
    }
    let r = s.req(Method::DELETE, &format!("/operations/{running}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT, "cancelling a finished operation");
    let state = s.state.as_ref().unwrap().path().to_owned();
    assert_eq!(until_gone(|| run_vms(&state)).await, Vec::<u32>::new(), "the runs' VMs are gone");
    s.stop().await;
}

#[tokio::test]
async fn cancel_during_boot_leaves_nothing_behind() {
    let s = TestServer::start().await;
    let id = s.start_run(json!({"command": "echo never", "shell": true, "disposable": true})).await;
    s.wait_status(&id, "ASSIGNED", Duration::from_secs(30)).await;
    let r = s.req(Method::DELETE, &format!("/operations/{id}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let (op, frames) = s.wait(&id).await;
    assert_eq!(op["status"], "CANCELLED", "{op}");
    assert!(frames.iter().all(|f| f.event != "stdout"), "the command never ran");
    let state = s.state.as_ref().unwrap().path().to_owned();
    assert_eq!(until_gone(|| run_vms(&state)).await, Vec::<u32>::new());
    let run_dir = s.state.as_ref().unwrap().path().join("run").join(&id);
    assert!(!run_dir.exists(), "the VM scratch dir of a cancelled boot is removed");
    s.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_fails_active_runs_and_stops_their_vms() {
    let s = TestServer::start().await;
    let id = s.start_run(json!({"command": "sleep 120", "shell": true, "disposable": true, "timeout": 300})).await;
    s.wait_status(&id, "EXECUTING", Duration::from_secs(120)).await;
    assert_eq!(run_vms(s.state.as_ref().unwrap().path()).len(), 1, "the run's VM is found while it runs");
    let state = s.stop().await.unwrap();
    let path = state.path().to_string_lossy().into_owned();
    let left = until_gone(|| qemu_processes_with(&path).into_iter().map(|(pid, _)| pid).collect()).await;
    assert_eq!(left, Vec::<u32>::new(), "shutdown leaves no QEMU behind, pooled clones included");
    let s = TestServer::start_in(state, |_| {}).await;
    let (op, frames) = s.wait(&id).await;
    assert_eq!(op["status"], "FAILED");
    assert!(op["error"].as_str().unwrap().contains("shut down"), "{op}");
    assert_eq!(frames.iter().filter(|f| f.event == "completion").count(), 1, "exactly one completion");
    s.stop().await;
}

/// Kills the server process with SIGKILL mid-run: its QEMU dies with it, and the next start
/// fails the interrupted operation (with a completion event) and cleans up.
#[tokio::test]
async fn restart_after_a_crash_fails_interrupted_operations() {
    let state = tempfile::tempdir().unwrap();
    let (mut child, url, token) = spawn_server(state.path()).await;
    let s = TestServer::attach(url, token);
    let id = s.start_run(json!({"command": "sleep 120", "shell": true, "disposable": true, "timeout": 300})).await;
    s.wait_status(&id, "EXECUTING", Duration::from_secs(120)).await;
    child.kill().await.unwrap();
    let _ = child.wait().await;
    let path = state.path().to_string_lossy().into_owned();
    let left = until_gone(|| qemu_processes_with(&path).into_iter().map(|(pid, _)| pid).collect()).await;
    assert_eq!(left, Vec::<u32>::new(), "no QEMU (pooled clones included) outlives a killed server");

    let (mut child, url, token) = spawn_server(state.path()).await;
    let s = TestServer::attach(url, token);
    let (op, frames) = s.wait(&id).await;
    assert_eq!(op["status"], "FAILED");
    assert!(op["error"].as_str().unwrap().contains("restarted"), "{op}");
    assert_eq!(frames.first().unwrap().event, "init", "the log from before the crash is kept");
    assert!(!state.path().join("run").join(&id).exists(), "the VM scratch dir was removed");
    let (op2, _) = s.run(json!({"command": "echo alive", "shell": true, "disposable": true})).await;
    assert_eq!(op2["metadata"]["result"]["stdout"]["value"], "alive\n");
    child.kill().await.unwrap();
    let _ = child.wait().await;
    let _: Value = op2;
}

/// `boxwood serve --log-format json`: every stderr line is a JSON object, and the lines a run
/// logs carry its operation id.
#[tokio::test]
async fn json_logs_carry_the_operation_id() {
    let (state, logs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let log = logs.path().join("server.log");
    let (mut child, url, token) =
        spawn_server_with(state.path(), &["--log-format", "json"], &[], std::fs::File::create(&log).unwrap().into())
            .await;
    let s = TestServer::attach(url, token);
    let (op, _) = s.run(json!({"command": "echo hi", "shell": true, "disposable": true})).await;
    let id = op["uuid"].as_str().unwrap().to_owned();
    child.kill().await.unwrap();
    let _ = child.wait().await;
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.iter().all(|l| l["level"].is_string() && l["fields"].is_object()), "{text}");
    let of_run: Vec<&Value> = lines.iter().filter(|l| l["span"]["op"] == id.as_str()).collect();
    assert!(
        of_run.iter().any(|l| l["fields"]["message"] == "operation finished"),
        "the run's own lines name it ({} of {}):\n{text}",
        of_run.len(),
        lines.len()
    );
}

async fn spawn_server(state: &std::path::Path) -> (tokio::process::Child, String, String) {
    spawn_server_with(state, &[], &[], Stdio::null()).await
}
