//! Namespaces, permissions, tokens from the CLI, and per-run limits (writable layer, network,
//! concurrency per namespace).

use std::time::Duration;

use boxwood_core::auth::Permission;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::harness::{TestServer, token};

#[tokio::test]
async fn namespaces_cannot_see_each_others_objects_and_permissions_are_enforced() {
    let all = Permission::ALL;
    let s = TestServer::start_with(|c| {
        c.tokens = vec![
            token("alpha-secret", "alpha", &all),
            token("beta-secret", "beta", &all),
            token("reader-secret", "alpha", &[Permission::List]),
        ]
    })
    .await;
    let (op, _) = s.run(json!({"command": "echo a > /a", "shell": true, "image": "tag:busybox:latest"})).await;
    let img = op["result_image_uuid"].as_str().unwrap().to_owned();
    let opid = op["uuid"].as_str().unwrap().to_owned();
    let file = s.upload(b"alpha only".to_vec()).await;
    let r = s.req(Method::PATCH, &format!("/images/{img}/tag")).json(&json!({"tag": "mine:1"})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let beta = |m: Method, p: &str| s.req_as("beta-secret", m, p);
    for path in [
        format!("/inspect/{img}/"),
        format!("/operations/{opid}"),
        format!("/operations/{opid}/events"),
        format!("/files/{}", file["sha256"].as_str().unwrap()),
        format!("/images/{img}/lineage"),
    ] {
        let r = beta(Method::GET, &path).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path} from another namespace");
    }
    assert_eq!(beta(Method::GET, "/inspect/?tag=mine:1").send().await.unwrap().status(), StatusCode::NOT_FOUND);
    let images: serde_json::Value = beta(Method::GET, "/images").send().await.unwrap().json().await.unwrap();
    assert!(images["images"].as_array().unwrap().iter().all(|i| i["uuid"] != img.as_str()));
    assert!(
        images["images"].as_array().unwrap().iter().any(|i| i["tag"] == "busybox:latest"),
        "public images are shared"
    );
    let ops: serde_json::Value = beta(Method::GET, "/operations").send().await.unwrap().json().await.unwrap();
    assert_eq!(ops, json!([]));
    let r = beta(Method::POST, "/instances").json(&json!({"command": "true", "image": img})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "cannot run another namespace's image");
    let r = beta(Method::POST, "/instances")
        .json(&json!({"command": "true", "image": "tag:busybox:latest", "files": {"/f": {"uuid": file["uuid"]}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "cannot use another namespace's upload");
    assert_eq!(
        beta(Method::DELETE, &format!("/operations/{opid}")).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );

    let reader = |m: Method, p: &str| s.req_as("reader-secret", m, p);
    assert_eq!(reader(Method::GET, &format!("/operations/{opid}")).send().await.unwrap().status(), StatusCode::OK);
    for (m, p, body) in [
        (
            Method::POST,
            "/instances".to_string(),
            json!({"command": "true", "image": "tag:busybox:latest", "disposable": true}),
        ),
        (Method::PATCH, format!("/images/{img}/tag"), json!({"tag": "x:1"})),
        (Method::DELETE, format!("/operations/{opid}"), json!({})),
    ] {
        let r = reader(m, &p).json(&body).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{p}");
    }
    let r = reader(Method::GET, &format!("/operations/{opid}/events?follow=1")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "following needs a spawn permission");
    assert_eq!(reader(Method::POST, "/files").body("x").send().await.unwrap().status(), StatusCode::FORBIDDEN);
    let who: serde_json::Value = reader(Method::GET, "/whoami").send().await.unwrap().json().await.unwrap();
    assert_eq!(who["permissions"]["spawn"], false);
    assert_eq!(who["permissions"]["list"], true);
    s.stop().await;
}

#[tokio::test]
async fn tokens_created_with_the_cli_work_until_revoked() {
    let s = TestServer::start().await;
    let state = s.state.as_ref().unwrap().path().to_owned();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_boxwood"))
        .args(["token", "create", "--namespace", "team-x", "--permissions", "list,spawn_disposable", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let secret = text.lines().find_map(|l| l.strip_prefix("BOXWOOD_TOKEN=")).unwrap().to_owned();
    let uuid = text.split_whitespace().nth(1).unwrap().to_owned();
    let db = std::fs::read(state.join("boxwood.db")).unwrap();
    assert!(!db.windows(secret.len()).any(|w| w == secret.as_bytes()), "only the hash is stored");
    let who: serde_json::Value = s.req_as(&secret, Method::GET, "/whoami").send().await.unwrap().json().await.unwrap();
    assert_eq!(
        (who["token_uuid"].as_str(), who["permissions"]["spawn_disposable"].as_bool()),
        (Some(uuid.as_str()), Some(true))
    );
    assert_eq!(who["permissions"]["spawn"], false);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_boxwood"))
        .args(["token", "revoke", &uuid, "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(s.req_as(&secret, Method::GET, "/whoami").send().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_boxwood"))
        .args(["token", "create", "--namespace", "x", "--permissions", "fly", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(!bad.status.success(), "unknown permissions are refused");
    s.stop().await;
}

#[tokio::test]
async fn writable_layer_cap_network_switch_and_namespace_queue() {
    // A server on the host that guests may reach because the operator allows its port (the
    // egress filter refuses every other host port: tests/e2e/abuse_network.rs).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let s = TestServer::start_with(|c| {
        c.core.max_concurrent_runs_per_namespace = Some(1);
        c.network.allow = vec![format!("127.0.0.1:{port}").parse().unwrap()];
    })
    .await;
    let (op, _) = s
        .run(json!({"command": "dd if=/dev/zero of=/big bs=1M count=64 2>/dev/null; echo rc=$?; echo still-works > /small; cat /small",
                    "shell": true, "image": "tag:busybox:latest", "disposable": true,
                    "resources_limits": {"max_layer_bytes": 8388608}}))
        .await;
    assert_eq!(op["status"], "SUCCESS");
    let out = op["metadata"]["result"]["stdout"]["value"].as_str().unwrap();
    assert!(out.starts_with("rc=1\n"), "writes past max_layer_bytes fail inside the guest: {out:?}");

    // Outbound network through user-mode networking reaches the allowed server on the host.
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut c, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf).await;
            let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\nhost-says").await;
        }
    });
    let fetch = format!("wget -q -O- http://10.0.2.2:{port}/ ; echo; ls /sys/class/net | tr '\\n' ' '");
    let (op, frames) =
        s.run(json!({"command": fetch, "shell": true, "image": "tag:busybox:latest", "disposable": true})).await;
    assert_eq!(op["metadata"]["result"]["stdout"]["value"], "host-says\neth0 lo ");
    let net = frames.iter().find(|f| f.event == "network").expect("network event");
    assert_eq!(net.data["data"]["configured"]["ip4"], "10.0.2.15/24");
    assert!(net.data["data"]["interfaces"].as_array().unwrap().iter().any(|i| i["name"] == "eth0"));
    let (op, frames) = s
        .run(json!({"command": "ls /sys/class/net | tr '\\n' ' '", "shell": true, "image": "tag:busybox:latest",
                    "disposable": true, "networking": {"enabled": false}}))
        .await;
    assert_eq!(op["metadata"]["result"]["stdout"]["value"], "lo ");
    assert!(frames.iter().all(|f| f.event != "network"));

    // One run at a time per namespace: the second waits as PENDING.
    let first = s.start_run(json!({"command": "sleep 60", "shell": true, "disposable": true})).await;
    let second = s.start_run(json!({"command": "true", "shell": true, "disposable": true})).await;
    s.wait_status(&first, "EXECUTING", Duration::from_secs(120)).await;
    let (_, q) = s.get_json(&format!("/operations/{second}")).await;
    assert_eq!(q["status"], "PENDING");
    s.req(Method::DELETE, &format!("/operations/{first}")).send().await.unwrap();
    let (op, _) = s.wait(&second).await;
    assert_eq!(op["status"], "SUCCESS", "the queued run starts once the slot frees");
    s.stop().await;
}
