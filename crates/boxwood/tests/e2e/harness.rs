//! A real Boxwood server per test (temporary state dir, TCG microVMs, random port) and small
//! helpers to talk to it like a client does.

use std::time::{Duration, Instant};

use boxwood::app::App;
use boxwood::config::Config;
use boxwood_vm::Accel;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct TestServer {
    pub url: String,
    pub token: String,
    pub client: reqwest::Client,
    pub state: Option<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// A parsed SSE frame of the event log.
#[derive(Debug, Clone)]
pub struct Frame {
    pub id: i64,
    pub event: String,
    pub data: Value,
}

/// The server's warnings (and `RUST_LOG`'s choice) go to the test's captured output, so a
/// failed test shows what the server saw (a VM's console tail, a store error).
fn log_to_test_output() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// The tests' HTTP client: redirects are read, not followed, and an idle pooled connection
/// is dropped before the server's own idle cut-off (`header_read_timeout_secs`, 30 s), so a
/// request never races the server closing the connection it is sent on.
fn test_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

pub fn test_config(state: &std::path::Path) -> Config {
    let mut cfg = Config { state_dir: state.to_owned(), listen: "127.0.0.1:0".parse().unwrap(), ..Config::default() };
    cfg.vm.accel = Accel::Tcg;
    // As `boxwood serve` would take it; without it the agent is looked for next to the test
    // binary, which a nextest archive unpacks elsewhere (scripts/distro-tests.sh).
    cfg.agent_binary = std::env::var_os("BOXWOOD_AGENT_BIN").map(std::path::PathBuf::from);
    cfg
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), tweak).await
    }

    /// Starts on an existing state dir (e.g. one a stopped server left).
    pub async fn start_in(state: tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> Self {
        log_to_test_output();
        let mut cfg = test_config(state.path());
        tweak(&mut cfg);
        let app = App::start(cfg).await.expect("server starts (build the agent with scripts/build-agent.sh)");
        let addr = app.local_addr().unwrap();
        let token = app.bootstrap_token.clone().unwrap_or_else(|| "alpha-secret".into());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.serve(async move {
            let _ = rx.await;
        }));
        Self {
            url: format!("http://{addr}"),
            token,
            client: test_client(),
            state: Some(state),
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// A client for a server running elsewhere (e.g. the binary in a child process).
    pub fn attach(url: String, token: String) -> Self {
        let client = test_client();
        Self { url, token, client, state: None, stop: None, task: None }
    }

    /// Graceful shutdown, as on SIGTERM; hands back the state dir.
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        self.state.take()
    }

    pub fn req(&self, method: Method, path: &str) -> RequestBuilder {
        self.req_as(&self.token, method, path)
    }

    /// A request with another token.
    pub fn req_as(&self, token: &str, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, format!("{}/v1{path}", self.url)).bearer_auth(token)
    }

    /// Uploads bytes with `POST /files`; returns the `FileResponse`.
    pub async fn upload(&self, bytes: Vec<u8>) -> Value {
        let (status, body) = self.try_upload_as(&self.token, bytes).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }

    /// `POST /files` as `token`: the status and the body, whatever they are.
    pub async fn try_upload_as(&self, token: &str, bytes: Vec<u8>) -> (StatusCode, Value) {
        let r = self
            .req_as(token, Method::POST, "/files")
            .header("Content-Type", "application/octet-stream")
            .body(bytes)
            .send()
            .await
            .unwrap();
        (r.status(), r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get_json(&self, path: &str) -> (StatusCode, Value) {
        let r = self.req(Method::GET, path).send().await.unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn spawn(&self, body: Value) -> (StatusCode, Value) {
        let r = self.req(Method::POST, "/instances").json(&body).send().await.unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Spawns on busybox and returns the operation id.
    pub async fn start_run(&self, mut body: Value) -> String {
        if body.get("image").is_none() {
            body["image"] = json!("tag:busybox:latest");
        }
        let (status, resp) = self.spawn(body).await;
        assert_eq!(status, StatusCode::CREATED, "{resp}");
        resp["uuid"].as_str().unwrap().to_owned()
    }

    /// Reads the event log over SSE.
    pub async fn events(&self, op: &str, query: &str, last_event_id: Option<i64>) -> Vec<Frame> {
        let mut req =
            self.req(Method::GET, &format!("/operations/{op}/events?{query}")).header("Accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-Id", id.to_string());
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let body = resp.text().await.unwrap();
        parse_sse(&body)
    }

    /// Follows the event log to `completion`, then returns the operation.
    pub async fn wait(&self, op: &str) -> (Value, Vec<Frame>) {
        let frames = tokio::time::timeout(Duration::from_secs(240), self.events(op, "follow=1", None))
            .await
            .expect("operation finished in time");
        let last = frames.last().expect("events");
        assert_eq!(last.event, "completion", "the log ends with completion: {frames:#?}");
        let (status, body) = self.get_json(&format!("/operations/{op}")).await;
        assert_eq!(status, StatusCode::OK);
        (body, frames)
    }

    pub async fn run(&self, body: Value) -> (Value, Vec<Frame>) {
        let op = self.start_run(body).await;
        self.wait(&op).await
    }

    /// Polls until the operation reaches `status` (or panics after `within`).
    /// Polls operation `id` as `token` until it ends (any kind: runs and imports).
    pub async fn wait_as(&self, token: &str, id: &str) -> Value {
        for _ in 0..1200 {
            let r = self.req_as(token, Method::GET, &format!("/operations/{id}")).send().await.unwrap();
            let op: Value = r.json().await.unwrap();
            if matches!(op["status"].as_str(), Some("SUCCESS" | "FAILED" | "CANCELLED")) {
                return op;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("operation {id} did not end");
    }

    pub async fn wait_status(&self, op: &str, status: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let (_, body) = self.get_json(&format!("/operations/{op}?inflight=1")).await;
            if body["status"] == status {
                return body;
            }
            assert!(Instant::now() < deadline, "operation never became {status}: {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub fn parse_sse(body: &str) -> Vec<Frame> {
    let mut frames = Vec::new();
    for block in body.split("\n\n") {
        let (mut id, mut event, mut data) = (None, None, String::new());
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("id: ").or_else(|| line.strip_prefix("id:")) {
                id = v.trim().parse().ok();
            } else if let Some(v) = line.strip_prefix("event: ").or_else(|| line.strip_prefix("event:")) {
                event = Some(v.trim().to_owned());
            } else if let Some(v) = line.strip_prefix("data: ").or_else(|| line.strip_prefix("data:")) {
                data.push_str(v);
            }
        }
        if let (Some(id), Some(event)) = (id, event) {
            frames.push(Frame { id, event, data: serde_json::from_str(&data).expect("event JSON") });
        }
    }
    frames
}

/// Decodes a `StreamRepr`.
pub fn stream_bytes(repr: &Value) -> Vec<u8> {
    use base64::Engine as _;
    let v = repr["value"].as_str().unwrap();
    match repr["encoding"].as_str().unwrap() {
        "ascii" => v.as_bytes().to_vec(),
        "base64" => base64::engine::general_purpose::STANDARD.decode(v).unwrap(),
        other => panic!("unknown encoding {other}"),
    }
}

/// Live QEMU processes whose scratch dir (their working dir: QEMU runs in its VM dir, bound
/// in its own mount namespace at the path it had when QEMU started, so a pooled clone keeps
/// its `run/pool-…` name here after the rename) or command line mentions `needle`, with that
/// dir.
pub fn qemu_processes_with(needle: &str) -> Vec<(u32, std::path::PathBuf)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<String> = cmd.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let dir = std::fs::read_link(entry.path().join("cwd")).unwrap_or_default();
        let mentions = dir.to_string_lossy().contains(needle) || args.iter().any(|a| a.contains(needle));
        if !args.first().is_some_and(|a| a.contains("qemu-system")) || !mentions {
            continue;
        }
        found.push((pid, dir));
    }
    found
}

/// QEMU processes of the server on `state` that serve (or served) a run: everything but the
/// template build and the idle clones waiting in the warm pool. A pooled clone's scratch dir
/// is renamed away from `run/pool-…` when a run takes it (the `run/pool-…` path QEMU still
/// reports then no longer exists), so a taken clone counts here until it is gone; a
/// cold-booted VM runs in `run/<operation>` from the start.
pub fn run_vms(state: &std::path::Path) -> Vec<u32> {
    let state = state.to_string_lossy();
    qemu_processes_with(&state)
        .into_iter()
        .filter(|(_, dir)| {
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let idle_pooled = name.starts_with("pool-") && dir.exists();
            !idle_pooled && !name.starts_with("template-")
        })
        .map(|(pid, _)| pid)
        .collect()
}

/// Waits (up to 5 s: teardown may trail the terminal status by a moment) until `check` finds
/// no process; returns what it found last.
pub async fn until_gone(check: impl Fn() -> Vec<u32>) -> Vec<u32> {
    for _ in 0..50 {
        if check().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    check()
}

/// A TCP listener on `ip` that counts the connections it accepts: an internal service an
/// attack aims at, whose count shows whether anything reached it.
pub fn counting_listener(ip: &str) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = std::net::TcpListener::bind((ip, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            if c.is_ok() {
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    (port, hits)
}

/// A configured token `secret` for namespace `ns` with `perms`.
pub fn token(secret: &str, ns: &str, perms: &[boxwood_core::auth::Permission]) -> boxwood_core::auth::TokenConfig {
    boxwood_core::auth::TokenConfig {
        token: Some(secret.into()),
        sha256: None,
        namespace: ns.into(),
        permissions: perms.iter().copied().collect(),
    }
}

/// Bytes allocated on disk under `dir` (each inode once).
pub fn allocated(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(path) = stack.pop() {
        let Ok(m) = path.symlink_metadata() else { continue };
        if seen.insert((m.dev(), m.ino())) {
            total += m.blocks() * 512;
        }
        if m.is_dir() {
            stack.extend(std::fs::read_dir(&path).into_iter().flatten().flatten().map(|e| e.path()));
        }
    }
    total
}

/// Starts the `boxwood` binary (`args` before `serve`, `serve_args` after it) on `state`;
/// returns it with its URL and token once it serves.
pub async fn spawn_server_with(
    state: &std::path::Path,
    args: &[&str],
    serve_args: &[&str],
    stderr: std::process::Stdio,
) -> (tokio::process::Child, String, String) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_boxwood"))
        .args(args)
        .args(["serve", "--listen", "127.0.0.1:0", "--accel", "tcg", "--state-dir"])
        .arg(state)
        .args(serve_args)
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    let (mut url, mut token) = (None, None);
    while let Some(line) = tokio::time::timeout(Duration::from_secs(120), lines.next_line()).await.unwrap().unwrap() {
        if let Some(v) = line.strip_prefix("BOXWOOD_URL=") {
            url = Some(v.to_owned());
        }
        if let Some(v) = line.strip_prefix("BOXWOOD_TOKEN=") {
            token = Some(v.to_owned());
            break;
        }
    }
    (child, url.unwrap(), token.unwrap())
}

/// A `docker save` archive of one image whose only layer is the tar `layer`.
pub fn docker_archive(layer: &[u8]) -> Vec<u8> {
    use sha2::Digest as _;
    let diff_id = format!("sha256:{}", hex::encode(sha2::Sha256::digest(layer)));
    let config = json!({"architecture": "amd64", "os": "linux", "config": {},
                        "rootfs": {"type": "layers", "diff_ids": [diff_id]}})
    .to_string();
    let manifest = json!([{"Config": "config.json", "RepoTags": ["x:1"], "Layers": ["layer.tar"]}]).to_string();
    let mut outer = tar::Builder::new(Vec::new());
    for (name, bytes) in
        [("layer.tar", layer), ("config.json", config.as_bytes()), ("manifest.json", manifest.as_bytes())]
    {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        outer.append_data(&mut h, name, bytes).unwrap();
    }
    outer.into_inner().unwrap()
}
