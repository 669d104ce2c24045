//! The typed Rust client (`boxwood-client`) against a real server and real VMs: every call
//! decodes what the server sends into the shared wire types, event streams follow a run to
//! its end, and refusals come back as the server's own message.

use std::collections::BTreeMap;

use boxwood_client::types::{EventKind, ExecRequest, OperationStatus, SpawnRequest};
use boxwood_client::{Client, ClientError, EventsOptions, ImageQuery, OperationQuery};
use futures::TryStreamExt;
use serde_json::json;

use crate::harness::TestServer;

fn shell(image: &str, command: &str) -> SpawnRequest {
    SpawnRequest {
        image: image.into(),
        process: ExecRequest { command: command.into(), shell: Some(true), ..Default::default() },
        timeout: Some(60),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_typed_client_runs_persists_inspects_and_tags() {
    let s = TestServer::start().await;
    let c = Client::new(&s.url, &s.token).unwrap();
    assert!(c.whoami().await.unwrap().permissions.values().any(|&p| p));
    assert!(c.readiness().await.unwrap().checks.failing().iter().all(|f| *f == "template"));

    let up = c.upload(b"hello from the host\n".to_vec()).await.unwrap();
    assert_eq!(c.file_by_sha256(&up.sha256).await.unwrap().map(|f| f.uuid), Some(up.uuid.clone()));
    assert_eq!(c.file_by_sha256(&"0".repeat(64)).await.unwrap(), None);

    let mut req = shell("tag:busybox:latest", "cat /app/hi.txt; echo $MY_VAR; echo made > /root/new");
    req.process.env = Some(BTreeMap::from([("MY_VAR".to_owned(), Some("value".to_owned()))]));
    req.files = Some(BTreeMap::from([("/app/hi.txt".to_owned(), json!({"uuid": up.uuid}))]));
    req.disposable = Some(false);
    let spawned = c.spawn(&req).await.unwrap();
    assert_eq!(spawned.metadata.env.get("MY_VAR").map(String::as_str), Some("value"));

    let events: Vec<_> =
        c.events(&spawned.uuid, EventsOptions { follow: true, ..Default::default() }).try_collect().await.unwrap();
    let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
    assert_eq!(kinds.first(), Some(&EventKind::Init), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&EventKind::Completion), "{kinds:?}");
    assert!(kinds.contains(&EventKind::Spawn) && kinds.contains(&EventKind::Exit), "{kinds:?}");
    let stdout: Vec<u8> = events
        .iter()
        .filter(|e| e.kind == EventKind::Stdout)
        .flat_map(|e| boxwood_client::types::decode_stream(&e.data))
        .collect();
    assert_eq!(String::from_utf8_lossy(&stdout), "hello from the host\nvalue\n");
    // Resuming after an id gives the rest of the log, without what came before.
    let rest: Vec<_> = c
        .events(&spawned.uuid, EventsOptions { since: Some(events[1].id), ..Default::default() })
        .try_collect()
        .await
        .unwrap();
    assert_eq!(rest.first().map(|e| e.id), events.get(2).map(|e| e.id));

    let op = c.wait(&spawned.uuid).await.unwrap();
    assert_eq!(op.summary.status, OperationStatus::Success);
    let result = op.result.and_then(|r| r.image).expect("a persisted run makes an image");
    let source = c.image_by_tag("busybox:latest").await.unwrap();
    assert_eq!(op.summary.image_uuid.as_deref(), Some(source.uuid.as_str()));
    assert_eq!(c.lineage(&result).await.unwrap().parent.as_deref(), Some(source.uuid.as_str()));

    let listing = c.list_dir(&result, "/root").await.unwrap();
    assert!(listing.to_string().contains("\"new\""), "{listing}");
    let chunks: Vec<_> = c.download(&result, "/root/new").await.unwrap().try_collect().await.unwrap();
    let bytes: Vec<u8> = chunks.concat();
    assert_eq!(bytes, b"made\n");

    assert_eq!(c.set_tag(&result, "client-made").await.unwrap().tag.as_deref(), Some("client-made"));
    let tagged = c.images(&ImageQuery { tag: Some("client-".into()), ..Default::default() }).await.unwrap();
    assert_eq!(tagged.iter().map(|i| i.uuid.as_str()).collect::<Vec<_>>(), [result.as_str()]);
    c.delete_tag(&result, Some("client-made")).await.unwrap();
    assert!(matches!(c.image_by_tag("client-made").await, Err(ClientError::Api { status: 404, .. })));

    let succeeded = OperationQuery { status: Some(OperationStatus::Success), ..Default::default() };
    assert!(c.operations(&succeeded).await.unwrap().iter().any(|o| o.uuid == spawned.uuid));
    s.stop().await;
}

#[tokio::test]
async fn subprocesses_cancel_and_refusals_through_the_typed_client() {
    let s = TestServer::start().await;
    let c = Client::new(&s.url, &s.token).unwrap();
    let mut long = shell("tag:busybox:latest", "sleep 60");
    long.disposable = Some(true);
    let op = c.spawn(&long).await.unwrap().uuid;
    // The VM takes a moment to be ready for a second process (425 until then, retried).
    let mut spid = None;
    for _ in 0..100 {
        let sub = ExecRequest { command: "echo from a subprocess".into(), shell: Some(true), ..Default::default() };
        match c.exec(&op, &sub).await {
            Ok(p) => {
                spid = Some(p.spid);
                break;
            }
            Err(ClientError::Api { status: 409 | 425, .. }) => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await
            }
            Err(e) => panic!("exec: {e}"),
        }
    }
    let spid = spid.expect("the subprocess started");
    assert!(spid >= 2, "{spid}");
    let mut sub = Vec::new();
    let events = c.events(&op, EventsOptions { spid: Some(spid), follow: true, ..Default::default() });
    futures::pin_mut!(events);
    while let Some(ev) = events.try_next().await.unwrap() {
        assert_eq!(ev.spid, Some(spid), "only that process's events");
        let exited = ev.kind == EventKind::Exit;
        sub.push(ev);
        if exited {
            break;
        }
    }
    assert!(sub.iter().any(|e| e.kind == EventKind::Stdout));

    c.cancel(&op).await.unwrap();
    assert_eq!(c.wait(&op).await.unwrap().summary.status, OperationStatus::Cancelled);

    // Refusals: the server's message and status, typed.
    match c.spawn(&shell("tag:no-such-image", "true")).await {
        Err(ClientError::Api { status: 404, message }) => assert!(message.contains("no-such-image"), "{message}"),
        other => panic!("expected 404, got {other:?}"),
    }
    let stranger = Client::new(&s.url, "not-a-token").unwrap();
    assert_eq!(stranger.whoami().await.unwrap_err().status(), Some(401));
    assert_eq!(c.operation("not-a-uuid", false).await.unwrap_err().status(), Some(400));
    s.stop().await;
}

/// Boxwood's directory states: uploads by path, namespaced like the uploads themselves; a
/// state is refused up front when a path or upload is wrong, and a run with it gets the files
/// with their modes.
#[tokio::test]
async fn directory_states_are_checked_namespaced_and_run_with() {
    use boxwood_client::types::{DirectoryStateFile, DirectoryStateRequest};
    use boxwood_core::auth::Permission;
    let s = TestServer::start_with(|c| {
        c.tokens = vec![
            crate::harness::token("alpha-secret", "alpha", &Permission::ALL),
            crate::harness::token("beta-secret", "beta", &Permission::ALL),
        ];
    })
    .await;
    let alpha = Client::new(&s.url, "alpha-secret").unwrap();
    let beta = Client::new(&s.url, "beta-secret").unwrap();
    let script = alpha.upload(b"#!/bin/sh\necho from the state\n".to_vec()).await.unwrap();
    let data = alpha.upload(b"payload\n".to_vec()).await.unwrap();
    let file = |path: &str, uuid: &str, mode| DirectoryStateFile { path: path.into(), uuid: uuid.into(), mode };
    let good = DirectoryStateRequest {
        files: vec![file("/app/run.sh", &script.uuid, Some(0o755)), file("/app/pkg/data.txt", &data.uuid, None)],
    };
    let state = alpha.create_directory_state(&good).await.unwrap();
    assert_eq!(alpha.directory_state(state.id).await.unwrap().files.len(), 2);
    // Another namespace neither sees the state nor may name alpha's uploads.
    assert_eq!(beta.directory_state(state.id).await.unwrap_err().status(), Some(404));
    assert_eq!(beta.create_directory_state(&good).await.unwrap_err().status(), Some(404));
    for (why, bad) in [
        ("relative path", vec![file("app/x", &data.uuid, None)]),
        ("dot-dot", vec![file("/app/../etc/passwd", &data.uuid, None)]),
        ("twice", vec![file("/a", &data.uuid, None), file("/a", &data.uuid, None)]),
        ("mode", vec![file("/a", &data.uuid, Some(0o17777))]),
        ("uuid", vec![file("/a", "not-a-uuid", None)]),
    ] {
        let err = alpha.create_directory_state(&DirectoryStateRequest { files: bad }).await.unwrap_err();
        assert_eq!(err.status(), Some(400), "{why}: {err}");
    }
    assert_eq!(alpha.directory_state(state.id + 1000).await.unwrap_err().status(), Some(404));

    // The MCP server's `run` with this state puts the files in place with their modes.
    let got = alpha.directory_state(state.id).await.unwrap();
    let mut req =
        shell("tag:busybox:latest", "cd /app && ./run.sh && cat pkg/data.txt && stat -c %a run.sh pkg/data.txt");
    req.files = Some(
        got.files
            .iter()
            .map(|f| (f.path.clone(), json!({"uuid": f.uuid, "mode": format!("{:04o}", f.mode.unwrap_or(0o644))})))
            .collect(),
    );
    let op = alpha.wait(&alpha.spawn(&req).await.unwrap().uuid).await.unwrap();
    let result: boxwood_client::types::InstanceResult = serde_json::from_value(op.metadata["result"].clone()).unwrap();
    assert_eq!(String::from_utf8_lossy(&result.stdout.bytes()), "from the state\npayload\n755\n644\n");
    s.stop().await;
}
