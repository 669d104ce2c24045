//! Live instances (COMPAT.md §1, §4): subprocesses beside the main process, streamed stdin,
//! signals, their status codes, the per-spid event filter, the log size cap, and SSE gzipped
//! frame by frame.

use std::io::Read as _;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{TestServer, parse_sse, stream_bytes};

/// Polls `GET …/subprocesses/{spid}` until `done` holds for the result (425, "starting",
/// is retried as clients do).
async fn poll_process(s: &TestServer, op: &str, spid: u64, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = s.req(Method::GET, &format!("/operations/{op}/subprocesses/{spid}")).send().await.unwrap();
        let status = r.status();
        if status == StatusCode::TOO_EARLY {
            assert_eq!(r.headers()["retry-after"], "1");
        }
        let body: Value = r.json().await.unwrap();
        assert!(matches!(status, StatusCode::OK | StatusCode::TOO_EARLY), "{status}: {body}");
        if status == StatusCode::OK && done(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "process {spid} never got there: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn exited(r: &Value) -> bool {
    r["state"]["exit_code"] != -1 || r["state"]["signal"] != -1
}

async fn exec(s: &TestServer, op: &str, body: Value) -> u64 {
    let r = s.req(Method::POST, &format!("/operations/{op}/subprocesses")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let spid = r.json::<Value>().await.unwrap()["spid"].as_u64().unwrap();
    assert_eq!(location, format!("/v1/operations/{op}/subprocesses/{spid}"));
    spid
}

async fn stdin(s: &TestServer, op: &str, spid: u64, body: Value) -> (StatusCode, Value) {
    let r = s.req(Method::POST, &format!("/operations/{op}/subprocesses/{spid}/stdin")).json(&body).send().await;
    let r = r.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn signal(s: &TestServer, op: &str, spid: u64, query: &str) -> StatusCode {
    let path = format!("/operations/{op}/subprocesses/{spid}{query}");
    s.req(Method::DELETE, &path).send().await.unwrap().status()
}

#[tokio::test]
async fn subprocesses_run_beside_the_main_process() {
    let s = TestServer::start().await;
    let op = s.start_run(json!({"command": "sleep 90", "shell": true, "disposable": true, "timeout": 120})).await;
    s.wait_status(&op, "EXECUTING", Duration::from_secs(120)).await;

    // The contree-client integration flow: echo, cat fed through the stdin endpoint, TERM.
    let echo = exec(&s, &op, json!({"command": "echo M", "shell": true})).await;
    assert!(echo >= 2, "subprocess spids start at 2");
    let r = poll_process(&s, &op, echo, exited).await;
    assert_eq!((r["state"]["exit_code"].as_i64(), r["stdout"]["value"].as_str()), (Some(0), Some("M\n")), "{r}");
    assert_eq!(r["resources"].as_object().unwrap().len(), 16, "the full InstanceResult: {r}");

    let cat = exec(&s, &op, json!({"command": "cat", "stdin": {"value": "", "close": false}})).await;
    assert!(cat > echo, "spids are never reused");
    let running = poll_process(&s, &op, cat, |_| true).await;
    assert_eq!((running["state"]["exit_code"].as_i64(), running["state"]["signal"].as_i64()), (Some(-1), Some(-1)));
    assert_eq!(stdin(&s, &op, cat, json!({"value": "M-stdin\n", "close": false})).await.0, StatusCode::NO_CONTENT);
    assert_eq!(
        stdin(&s, &op, cat, json!({"value": "w6k=", "encoding": "base64"})).await.0,
        StatusCode::NO_CONTENT,
        "close defaults to true"
    );
    let r = poll_process(&s, &op, cat, exited).await;
    assert_eq!(stream_bytes(&r["stdout"]), "M-stdin\né".as_bytes(), "non-ASCII output is base64: {r}");
    let (status, err) = stdin(&s, &op, cat, json!({"value": "late"})).await;
    assert_eq!((status, err["status"].as_i64()), (StatusCode::CONFLICT, Some(409)), "stdin is closed: {err}");
    let (status, _) = stdin(&s, &op, echo, json!({"value": "x"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "spawned with stdin closed");

    let sleeper = exec(&s, &op, json!({"command": "sleep 60", "shell": true})).await;
    assert_eq!(signal(&s, &op, sleeper, "?signal=NOPE").await, StatusCode::BAD_REQUEST);
    assert_eq!(signal(&s, &op, sleeper, "?signal=TERM").await, StatusCode::NO_CONTENT);
    let r = poll_process(&s, &op, sleeper, exited).await;
    assert_eq!((r["state"]["signal"].as_i64(), r["state"]["exit_code"].as_i64()), (Some(15), Some(-1)), "{r}");
    assert_eq!(signal(&s, &op, sleeper, "").await, StatusCode::NOT_FOUND, "no live process");

    let (status, _) = s.get_json(&format!("/operations/{op}/subprocesses/99")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = s.get_json(&format!("/operations/{op}/subprocesses/x")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let r = s.req(Method::POST, &format!("/operations/{op}/subprocesses")).json(&json!({"shell": true})).send();
    assert_eq!(r.await.unwrap().status(), StatusCode::BAD_REQUEST, "command is required");
    let failed = s.req(Method::POST, &format!("/operations/{op}/subprocesses")).json(&json!({"command": "/nope"}));
    let failed = failed.send().await.unwrap();
    assert!(failed.status().is_client_error(), "a command that cannot start: {}", failed.status());

    // The spid filter is applied server-side.
    let frames = s.events(&op, &format!("spid={cat}"), None).await;
    let kinds: Vec<&str> = frames.iter().map(|f| f.event.as_str()).collect();
    assert_eq!((kinds[0], kinds[1], kinds[kinds.len() - 1]), ("spawn", "stdin", "exit"), "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "stdin").count(), 2, "{kinds:?}");
    let out: Vec<u8> =
        frames.iter().filter(|f| f.event == "stdout").flat_map(|f| stream_bytes(&f.data["data"])).collect();
    assert_eq!(out, "M-stdin\né".as_bytes());
    assert!(frames.iter().all(|f| f.data["spid"] == json!(cat)));
    assert_eq!(frames[1].data["data"]["value"], "M-stdin\n");

    assert_eq!(
        s.req(Method::DELETE, &format!("/operations/{op}")).send().await.unwrap().status(),
        StatusCode::ACCEPTED
    );
    let (done, frames) = s.wait(&op).await;
    assert_eq!(done["status"], "CANCELLED");
    assert_eq!(frames.last().unwrap().event, "completion");
    let r = s.req(Method::POST, &format!("/operations/{op}/subprocesses")).json(&json!({"command": "true"})).send();
    assert_eq!(r.await.unwrap().status(), StatusCode::CONFLICT, "no subprocess in a finished instance");
    let (status, _) = stdin(&s, &op, 1, json!({"value": "x"})).await;
    assert_eq!(status, StatusCode::GONE, "the instance has finished");

    // The same log, gzipped frame by frame when the client accepts it.
    let r = s
        .req(Method::GET, &format!("/operations/{op}/events"))
        .header("Accept-Encoding", "gzip")
        .header("Accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-encoding"], "gzip");
    let mut text = String::new();
    flate2::read::GzDecoder::new(&r.bytes().await.unwrap()[..]).read_to_string(&mut text).unwrap();
    let gz = parse_sse(&text);
    assert_eq!(gz.iter().map(|f| f.id).collect::<Vec<_>>(), frames.iter().map(|f| f.id).collect::<Vec<_>>());
    s.stop().await;
}

#[tokio::test]
async fn main_process_stdin_streams_until_closed_and_sigint_reaches_it() {
    let s = TestServer::start().await;
    let op = s
        .start_run(json!({"command": "cat", "stdin": {"value": "first\n", "close": false}, "disposable": true,
                          "timeout": 120}))
        .await;
    s.wait_status(&op, "EXECUTING", Duration::from_secs(120)).await;
    // The first event of spid 1 is what contree-cli waits for before forwarding stdin.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, op_now) = s.get_json(&format!("/operations/{op}?inflight=1")).await;
        if op_now["metadata"]["result"]["stdout"]["value"] == "first\n" {
            assert_eq!(op_now["metadata"]["result"]["state"]["exit_code"], -1, "still running: {op_now}");
            break;
        }
        assert!(Instant::now() < deadline, "initial stdin never echoed: {op_now}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stdin(&s, &op, 1, json!({"value": "second\n", "close": false})).await.0, StatusCode::NO_CONTENT);
    assert_eq!(stdin(&s, &op, 1, json!({"value": "", "close": true})).await.0, StatusCode::NO_CONTENT);
    let (done, frames) = s.wait(&op).await;
    assert_eq!(done["status"], "SUCCESS");
    assert_eq!(done["metadata"]["result"]["stdout"]["value"], "first\nsecond\n", "{done}");
    let stdin_events: Vec<&Value> = frames.iter().filter(|f| f.event == "stdin").map(|f| &f.data["data"]).collect();
    assert_eq!(stdin_events.iter().map(|d| d["value"].as_str().unwrap()).collect::<String>(), "first\nsecond\n");
    let (status, err) = stdin(&s, &op, 1, json!({"value": "late"})).await;
    assert_eq!((status, err["status"].as_i64()), (StatusCode::GONE, Some(410)), "{err}");

    // Ctrl-C in contree-cli: SIGINT to spid 1 ends the operation through the command's trap.
    let op = s
        .start_run(json!({"command": "trap 'echo got-int; exit 7' INT; echo ready; while :; do sleep 1; done",
                          "shell": true, "disposable": true, "timeout": 120}))
        .await;
    s.wait_status(&op, "EXECUTING", Duration::from_secs(120)).await;
    poll_process(&s, &op, 1, |r| r["stdout"]["value"] == "ready\n").await;
    assert_eq!(signal(&s, &op, 1, "?signal=INT").await, StatusCode::NO_CONTENT);
    let (done, frames) = s.wait(&op).await;
    let r = &done["metadata"]["result"];
    assert_eq!((r["state"]["exit_code"].as_i64(), r["stdout"]["value"].as_str()), (Some(7), Some("ready\ngot-int\n")));
    let shutdown = frames.iter().find(|f| f.event == "shutdown").expect("shutdown event");
    assert_eq!(shutdown.data["data"]["reason"], "job_complete");
    s.stop().await;
}

#[tokio::test]
async fn the_event_log_size_cap_drops_stream_events_but_not_the_result() {
    let s = TestServer::start_with(|c| c.core.limits.max_event_log_bytes = 4096).await;
    let (op, frames) = s
        .run(json!({"command": "i=0; while [ $i -lt 40 ]; do head -c 200 /dev/zero | tr '\\0' x; echo; sleep 0.02; \
                                i=$((i+1)); done",
                    "shell": true, "disposable": true}))
        .await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    let caps: Vec<_> = frames.iter().filter(|f| f.event == "size_cap").collect();
    assert_eq!(caps.len(), 1, "one size_cap event: {frames:#?}");
    assert_eq!(caps[0].data["data"]["limit_bytes"], 4096);
    assert_eq!(caps[0].data["spid"], 0);
    let logged: usize =
        frames.iter().filter(|f| f.event == "stdout").map(|f| f.data["data"]["value"].as_str().unwrap().len()).sum();
    assert!(logged <= 4096, "stream events stop at the cap ({logged} bytes logged)");
    let after_cap = frames.iter().skip_while(|f| f.event != "size_cap").skip(1);
    let kinds: Vec<&str> = after_cap.map(|f| f.event.as_str()).collect();
    assert!(kinds.contains(&"exit") && !kinds.contains(&"stdout"), "service events continue: {kinds:?}");
    assert_eq!(op["metadata"]["result"]["stdout"]["value"].as_str().unwrap().len(), 40 * 201, "the result is whole");
    s.stop().await;
}
