//! Execution semantics in real microVMs (COMPAT.md §3): output and exit codes, the event log,
//! shell and exec forms, env, cwd, uid/gid, hostname, stdin, timeout, truncation, encodings.

use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::harness::{Frame, TestServer, stream_bytes};

fn result(op: &Value) -> &Value {
    &op["metadata"]["result"]
}

fn kinds(frames: &[Frame]) -> Vec<&str> {
    frames.iter().map(|f| f.event.as_str()).collect()
}

#[tokio::test]
async fn shell_run_reports_output_exit_code_and_a_complete_event_log() {
    let s = TestServer::start().await;
    let (op, frames) = s
        .run(json!({"command": "echo hello; echo oops >&2; exit 7", "shell": true, "disposable": true, "timeout": 60}))
        .await;
    assert_eq!(op["status"], "SUCCESS", "a non-zero exit is still a successful operation: {op}");
    assert_eq!(op["kind"], "instance");
    assert!(op["duration"].as_f64().unwrap() > 0.0);
    assert_eq!(op["result"], json!({"image": null, "tag": null}), "disposable runs make no image");
    assert_eq!(op["result_image_uuid"], Value::Null);
    let r = result(&op);
    assert_eq!(r["state"]["exit_code"], 7);
    assert_eq!(r["state"]["signal"], -1);
    assert_eq!(r["state"]["timed_out"], false);
    assert_eq!(r["stdout"], json!({"value": "hello\n", "encoding": "ascii", "truncated": false}));
    assert_eq!(r["stderr"]["value"], "oops\n");
    for key in [
        "block_input",
        "block_output",
        "cost",
        "elapsed_time",
        "involuntary_switches",
        "max_rss",
        "monotonic_time",
        "page_faults",
        "page_faults_io",
        "shared_memory",
        "signals",
        "swaps",
        "system_cpu_time",
        "unshared_memory",
        "user_cpu_time",
        "voluntary_switches",
    ] {
        assert!(r["resources"].get(key).is_some(), "resources.{key}");
    }
    assert!(r["resources"]["max_rss"].as_u64().unwrap() > 0);
    assert!(op["consumed_memory"].as_i64().unwrap() > 0);
    for key in [
        "args",
        "command",
        "cwd",
        "disposable",
        "env",
        "files",
        "hostname",
        "image",
        "shell",
        "stdin",
        "timeout",
        "truncate_output_at",
    ] {
        assert!(op["metadata"].get(key).is_some_and(|v| !v.is_null()), "metadata.{key} in {}", op["metadata"]);
    }

    let k = kinds(&frames);
    assert_eq!(k.first(), Some(&"init"));
    assert_eq!(&k[k.len() - 3..], ["exit", "shutdown", "completion"]);
    assert!(k.contains(&"spawn") && k.contains(&"stdout") && k.contains(&"stderr"));
    assert!(frames.windows(2).all(|w| w[0].id < w[1].id), "ids strictly increase");
    for f in &frames {
        assert_eq!(f.data["type"], f.event.as_str(), "event: matches data.type");
        assert_eq!(f.data["id"], f.id);
        assert!(f.data["ts"].as_str().is_some());
    }
    let init = &frames[0].data;
    assert_eq!(init["spid"], 0);
    assert_eq!(init["data"]["machine"], "x86_64");
    assert!(init["data"]["kernel"].as_str().unwrap().contains("cloud-amd64"));
    let spawn = frames.iter().find(|f| f.event == "spawn").unwrap();
    assert_eq!(spawn.data["spid"], 1);
    assert_eq!(spawn.data["data"]["command"], "/bin/sh");
    assert_eq!(spawn.data["data"]["args"], json!(["-c", "echo hello; echo oops >&2; exit 7"]));
    let exit = frames.iter().find(|f| f.event == "exit").unwrap();
    assert_eq!(exit.data["data"]["code"], 7);
    assert!(exit.data["data"]["resources"]["max_rss_kb"].as_u64().unwrap() > 0);
    let shutdown = frames.iter().find(|f| f.event == "shutdown").unwrap();
    assert_eq!(shutdown.data["data"]["reason"], "job_complete");
    let completion = frames.last().unwrap();
    assert!(completion.data.get("spid").is_none(), "completion has no spid");
    assert_eq!(completion.data["data"]["status"], "SUCCESS");
    assert_eq!(completion.data["data"]["error"], Value::Null);
    s.stop().await;
}

#[tokio::test]
async fn exec_form_env_cwd_identity_hostname_and_stdin() {
    let s = TestServer::start().await;
    // shell=false: PATH lookup inside the image, args passed, only the request env.
    let (op, _) = s.run(json!({"command": "echo", "args": ["a", "b c"], "disposable": true})).await;
    assert_eq!(result(&op)["stdout"]["value"], "a b c\n");
    let (op, _) = s.run(json!({"command": "env", "env": {"ONLY": "me"}, "disposable": true})).await;
    let mut lines: Vec<_> = result(&op)["stdout"]["value"].as_str().unwrap().lines().map(str::to_owned).collect();
    lines.sort();
    assert_eq!(lines, vec!["ONLY=me", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]);

    let (op, _) = s
        .run(json!({"command": "echo \"$GREETING\"; pwd; id -u; id -g; hostname; echo \"${NULLED-unset}\"",
                    "shell": true, "disposable": true, "cwd": "/tmp/work/dir", "uid": 1000, "gid": 1000,
                    "hostname": "box-1", "env": {"GREETING": "hi there", "NULLED": null}}))
        .await;
    assert_eq!(result(&op)["stdout"]["value"], "hi there\n/tmp/work/dir\n1000\n1000\nbox-1\nunset\n");

    let (op, _) = s
        .run(json!({"command": "cat", "shell": true, "disposable": true,
                               "stdin": {"value": "line one\nline two\n", "encoding": "ascii"}}))
        .await;
    assert_eq!(result(&op)["stdout"]["value"], "line one\nline two\n");

    // Binary stdin in, binary stdout out: base64 both ways, every byte value intact.
    let bytes: Vec<u8> = (0..=255u8).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let (op, _) =
        s.run(json!({"command": "cat", "disposable": true, "stdin": {"value": b64, "encoding": "base64"}})).await;
    let out = &result(&op)["stdout"];
    assert_eq!(out["encoding"], "base64");
    assert_eq!(stream_bytes(out), bytes);
    s.stop().await;
}

#[tokio::test]
async fn timeout_kills_and_truncation_caps_output() {
    let s = TestServer::start().await;
    let t0 = Instant::now();
    let (op, frames) =
        s.run(json!({"command": "echo started; sleep 30", "shell": true, "disposable": true, "timeout": 2})).await;
    assert!(t0.elapsed() < Duration::from_secs(25), "returned soon after the timeout ({:?})", t0.elapsed());
    assert_eq!(op["status"], "SUCCESS");
    let r = result(&op);
    assert_eq!(r["state"]["timed_out"], true);
    assert_eq!(r["state"]["exit_code"], -1);
    assert_eq!(r["state"]["signal"], 9);
    assert_eq!(r["stdout"]["value"], "started\n", "output before the kill is kept");
    let shutdown = frames.iter().find(|f| f.event == "shutdown").unwrap();
    assert_eq!(shutdown.data["data"]["reason"], "timeout");

    let (op, frames) = s
        .run(json!({"command": "i=0; while [ $i -lt 500 ]; do echo 0123456789; i=$((i+1)); done", "shell": true,
                    "disposable": true, "truncate_output_at": 100}))
        .await;
    let out = &result(&op)["stdout"];
    assert_eq!(out["value"].as_str().unwrap().len(), 100);
    assert!(out["value"].as_str().unwrap().starts_with("0123456789\n"));
    assert_eq!(out["truncated"], true);
    let t = frames.iter().find(|f| f.event == "truncated").expect("truncated event");
    assert_eq!(t.data["data"], json!({"stream": "stdout", "bytes_emitted": 100, "bytes_dropped": 5400}));
    let logged: usize =
        frames.iter().filter(|f| f.event == "stdout").map(|f| f.data["data"]["value"].as_str().unwrap().len()).sum();
    assert_eq!(logged, 100, "the event log is capped too");
    s.stop().await;
}
