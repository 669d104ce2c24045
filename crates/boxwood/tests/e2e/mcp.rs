//! `boxwood mcp` driven by rmcp's own client over stdio, against a real server: the tool set
//! is listed with contree-mcp's names, `run` answers as documented, and mistakes (wrong
//! argument types, `files` the wrong way round, an unknown tool, a wrong token, a server that
//! is down) come back as one clear line, not a crash or a hang.

use rmcp::RoleClient;
use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::{RunningService, ServiceExt as _};
use rmcp::transport::TokioChildProcess;
use serde_json::{Value, json};

use crate::harness::TestServer;

async fn connect(url: &str, token: &str) -> RunningService<RoleClient, ()> {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_boxwood"));
    cmd.args(["mcp", "--url", url, "--token", token]).env_remove("BOXWOOD_TOKEN").env_remove("CONTREE_TOKEN");
    ().serve(TokioChildProcess::new(cmd).unwrap()).await.expect("boxwood mcp starts and initializes")
}

async fn call(c: &RunningService<RoleClient, ()>, tool: &'static str, args: Value) -> CallToolResult {
    let args = args.as_object().cloned().unwrap_or_default();
    c.call_tool(CallToolRequestParams::new(tool).with_arguments(args))
        .await
        .expect("a tool answer, not a protocol error")
}

fn text(r: &CallToolResult) -> String {
    serde_json::to_value(&r.content).unwrap().to_string()
}

#[tokio::test]
async fn agents_get_the_tool_set_results_and_clear_mistakes() {
    let s = TestServer::start().await;
    let c = connect(&s.url, &s.token).await;
    let tools: Vec<String> = c.list_all_tools().await.unwrap().into_iter().map(|t| t.name.into_owned()).collect();
    for name in [
        "run",
        "upload",
        "rsync",
        "list_images",
        "get_image",
        "import_image",
        "set_tag",
        "download",
        "list_files",
        "read_file",
        "grep",
        "get_operation",
        "list_operations",
        "wait_operations",
        "cancel_operation",
        "whoami",
        "get_guide",
        "image_lineage",
        "exec",
    ] {
        assert!(tools.iter().any(|t| t == name), "{name} missing from {tools:?}");
    }

    let r = call(&c, "run", json!({"command": "echo $MY_VAR; echo err >&2; pwd; exit 3", "image": "tag:busybox:latest", "env": {"MY_VAR": "hi"}})).await;
    assert_ne!(r.is_error, Some(true), "{}", text(&r));
    let out = r.structured_content.clone().expect("structured output");
    assert_eq!((out["status"].as_str(), out["exit_code"].as_i64()), (Some("SUCCESS"), Some(3)), "{out}");
    // busybox saved no working directory: an agent's run starts in /root (the API's own is /).
    assert_eq!((out["stdout"].as_str(), out["stderr"].as_str()), (Some("hi\n/root\n"), Some("err\n")));
    assert_eq!((out["filesystem_changed"].as_bool(), out["timed_out"].as_bool()), (Some(false), Some(false)));

    let up = call(&c, "upload", json!({"content": "x"})).await.structured_content.unwrap();
    let uuid = up["uuid"].as_str().unwrap();
    for (args, says) in [
        (json!({"command": 5, "image": "tag:busybox:latest"}), "expected a string"),
        (json!({"command": "true", "image": "tag:busybox:latest", "files": {uuid: "/app/x"}}), "wrong way round"),
        (json!({"command": "true", "image": "tag:nope"}), "list_images"),
    ] {
        let r = c.call_tool(CallToolRequestParams::new("run").with_arguments(args.as_object().cloned().unwrap())).await;
        let shown = match r {
            Ok(r) => {
                assert_eq!(r.is_error, Some(true), "{args}: {}", text(&r));
                text(&r)
            }
            Err(e) => e.to_string(), // invalid params are a protocol error with the reason
        };
        assert!(shown.contains(says), "{args}: {shown}");
    }
    assert!(c.call_tool(CallToolRequestParams::new("no_such_tool")).await.is_err(), "an unknown tool is refused");
    c.cancel().await.unwrap();

    // A wrong token, and a server that is down, each say so in one line.
    let c = connect(&s.url, "wrong-token").await;
    let r = call(&c, "whoami", json!({})).await;
    assert!(r.is_error == Some(true) && text(&r).contains("refused the token"), "{}", text(&r));
    c.cancel().await.unwrap();
    let c = connect("http://127.0.0.1:9", &s.token).await;
    let r = call(&c, "list_images", json!({})).await;
    assert!(r.is_error == Some(true) && text(&r).contains("cannot reach the Boxwood server"), "{}", text(&r));
    c.cancel().await.unwrap();
    s.stop().await;
}

/// The server's own `/mcp`: only with a token of the API, each caller's tools see its own
/// namespace, and the tools that would touch the server host's files refuse unless the
/// operator allowed it.
#[tokio::test]
async fn the_servers_mcp_endpoint_is_the_api_behind_the_same_tokens() {
    use boxwood_core::auth::Permission;
    use rmcp::transport::StreamableHttpClientTransport;
    use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
    let s = TestServer::start_with(|c| {
        c.tokens = vec![
            crate::harness::token("alpha-secret", "alpha", &Permission::ALL),
            crate::harness::token("beta-secret", "beta", &Permission::ALL),
        ];
    })
    .await;
    let url = format!("{}/mcp", s.url);
    // Positive control first: the endpoint answers an MCP initialize with a token…
    let over_http = |token: &str| {
        let config = StreamableHttpClientTransportConfig::with_uri(url.clone()).auth_header(token.to_owned());
        ().serve(StreamableHttpClientTransport::from_config(config))
    };
    let alpha = over_http("alpha-secret").await.expect("an MCP session over HTTP");
    // …and nothing without one, or with a wrong one (the API's envelope).
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    for auth in [None, Some("Bearer wrong")] {
        let mut req =
            reqwest::Client::new().post(&url).header("accept", "application/json, text/event-stream").json(&init);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{auth:?}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["status"], 401, "{body}");
    }

    let up = call(&alpha, "upload", json!({"content": "alpha's"})).await.structured_content.unwrap();
    let who = call(&alpha, "whoami", json!({})).await.structured_content.unwrap();
    assert!(who["permissions"].is_object(), "{who}");
    let beta = over_http("beta-secret").await.unwrap();
    let r =
        call(&beta, "run", json!({"command": "cat /x", "image": "tag:busybox:latest", "files": {"/x": up["uuid"]}}))
            .await;
    assert_eq!(r.is_error, Some(true), "beta cannot use alpha's upload: {}", text(&r));
    let r =
        call(&alpha, "run", json!({"command": "cat /x", "image": "tag:busybox:latest", "files": {"/x": up["uuid"]}}))
            .await;
    assert_eq!(r.structured_content.unwrap()["stdout"], "alpha's");

    // The server host's files are not the caller's.
    for (tool, args) in [
        ("upload", json!({"path": "/etc/hostname"})),
        ("download", json!({"image": "tag:busybox:latest", "path": "/etc/passwd", "destination": "/tmp/bw-mcp-x"})),
        ("rsync", json!({"source": "/etc", "destination": "/app"})),
    ] {
        let r = call(&alpha, tool, args).await;
        assert!(
            r.is_error == Some(true) && text(&r).contains("does not read or write files here"),
            "{tool}: {}",
            text(&r)
        );
    }
    assert!(!std::path::Path::new("/tmp/bw-mcp-x").exists());
    alpha.cancel().await.unwrap();
    beta.cancel().await.unwrap();
    s.stop().await;
}

/// What a client heard of a tool's progress.
#[derive(Clone, Default)]
struct Heard(std::sync::Arc<std::sync::Mutex<Vec<rmcp::model::ProgressNotificationParam>>>);

impl rmcp::ClientHandler for Heard {
    async fn on_progress(
        &self,
        params: rmcp::model::ProgressNotificationParam,
        _: rmcp::service::NotificationContext<RoleClient>,
    ) {
        self.0.lock().unwrap().push(params);
    }
}

/// A waiting `run` reports progress each second to a caller that gave a progress token (rmcp's
/// client gives one with every request; a caller without one is not sent any).
#[tokio::test]
async fn a_long_run_reports_progress_to_a_caller_that_asks() {
    let s = TestServer::start().await;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_boxwood"));
    cmd.args(["mcp", "--url", &s.url, "--token", &s.token]);
    let heard = Heard::default();
    let c = heard.clone().serve(TokioChildProcess::new(cmd).unwrap()).await.expect("boxwood mcp starts");
    let quick = json!({"command": "echo quick", "image": "tag:busybox:latest"});
    let r = c.call_tool(CallToolRequestParams::new("run").with_arguments(quick.as_object().cloned().unwrap())).await;
    assert!(text(&r.unwrap()).contains("quick"));
    let before = heard.0.lock().unwrap().len();
    let args = json!({"command": "sleep 3; echo done", "image": "tag:busybox:latest"});
    let r = c.call_tool(CallToolRequestParams::new("run").with_arguments(args.as_object().cloned().unwrap())).await;
    assert!(text(&r.unwrap()).contains("done"));
    let notes = heard.0.lock().unwrap()[before..].to_vec();
    assert!(notes.len() >= 2, "a 3 s run reports each second: {notes:?}");
    let token = &notes[0].progress_token;
    assert!(notes.iter().all(|n| &n.progress_token == token && n.total == Some(30.0)), "{notes:?}");
    assert!(notes.windows(2).all(|w| w[0].progress < w[1].progress), "progress only grows: {notes:?}");
    assert!(notes[0].message.as_deref().is_some_and(|m| m.starts_with("running: ")), "{notes:?}");
    c.cancel().await.unwrap();
}

/// contree-mcp's resources under the same URIs: an image's file and directory without a VM,
/// its lineage, an operation of the right kind, the guide; a wrong URI says what is expected.
#[tokio::test]
async fn the_contree_resources_read_images_operations_and_the_guide() {
    use rmcp::model::{ReadResourceRequestParams, ResourceContents};
    let s = TestServer::start().await;
    let c = connect(&s.url, &s.token).await;
    let templates = c.list_all_resource_templates().await.unwrap();
    let uris: Vec<&str> = templates.iter().map(|t| t.uri_template.as_str()).collect();
    assert!(uris.contains(&"contree://image/{image}/read/{path}") && uris.len() == 6, "{uris:?}");
    let read = |uri: &str| {
        let c = &c;
        let uri = uri.to_owned();
        async move {
            let r = c.read_resource(ReadResourceRequestParams::new(uri.clone())).await;
            r.map(|r| match &r.contents[..] {
                [ResourceContents::TextResourceContents { text, .. }] => text.clone(),
                other => panic!("{uri}: {other:?}"),
            })
        }
    };
    let passwd = read("contree://image/tag:busybox:latest/read/etc/passwd").await.unwrap();
    assert!(passwd.starts_with("root:"), "{passwd}");
    let ls = read("contree://image/tag:busybox:latest/ls/bin").await.unwrap();
    assert!(ls.contains("busybox"), "{ls}");
    let lineage: Value =
        serde_json::from_str(&read("contree://image/tag:busybox:latest/lineage").await.unwrap()).unwrap();
    assert!(lineage.is_object(), "{lineage}");
    assert!(read("contree://guide/state").await.unwrap().contains("disposable"));

    let r = call(&c, "run", json!({"command": "echo r", "image": "tag:busybox:latest"})).await;
    let id = r.structured_content.unwrap()["uuid"].as_str().unwrap().to_owned();
    let op: Value = serde_json::from_str(&read(&format!("contree://operations/instance/{id}")).await.unwrap()).unwrap();
    assert_eq!(op["stdout"], "r\n", "{op}");
    let wrong = read(&format!("contree://operations/import/{id}")).await.unwrap_err().to_string();
    assert!(wrong.contains("not an image_import"), "{wrong}");
    let bad = read("contree://image/tag:busybox:latest/cat/etc/passwd").await.unwrap_err().to_string();
    assert!(bad.contains("read/PATH"), "{bad}");
    let missing = read("contree://image/tag:nope:1/read/x").await.unwrap_err().to_string();
    assert!(missing.contains("list_images"), "{missing}");
}
