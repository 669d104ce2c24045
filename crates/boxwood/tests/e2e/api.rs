//! The HTTP surface without running commands: auth, the error envelope on every kind of bad
//! request, images, inspect redirects, listings.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::TestServer;

fn assert_envelope(status: StatusCode, body: &Value, want: StatusCode) {
    assert_eq!(status, want, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "error message in {body}");
    assert_eq!(body["status"], want.as_u16(), "{body}");
}

#[tokio::test]
async fn auth_is_required_and_project_header_is_ignored() {
    let s = TestServer::start().await;
    let r = s.client.get(format!("{}/v1/whoami", s.url)).send().await.unwrap();
    let status = r.status();
    assert_envelope(status, &r.json().await.unwrap(), StatusCode::UNAUTHORIZED);
    let r = s.client.get(format!("{}/v1/images", s.url)).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = s.req(Method::GET, "/whoami").header("Project", "NEBIUS_PROJECT_ID").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let who: Value = r.json().await.unwrap();
    for key in ["token_uuid", "token_expiration", "permissions", "limits", "operations_stat"] {
        assert!(who.get(key).is_some(), "whoami has {key}: {who}");
    }
    assert_eq!(who["permissions"]["spawn_disposable"], true);
    assert_eq!(who["limits"]["instance_max_timeout"], 3600);
    s.stop().await;
}

#[tokio::test]
async fn malformed_requests_get_4xx_envelopes() {
    let s = TestServer::start().await;
    let raw = s.req(Method::POST, "/instances").body("{not json").send().await.unwrap();
    let status = raw.status();
    assert_envelope(status, &raw.json().await.unwrap(), StatusCode::BAD_REQUEST);
    let unknown = uuid::Uuid::new_v4().to_string();
    let cases = [
        (json!({"command": 5, "image": "tag:busybox:latest"}), StatusCode::BAD_REQUEST),
        (json!({"command": "true"}), StatusCode::BAD_REQUEST),
        (json!({"command": "true", "image": "tag:busybox:latest", "shell": "yes"}), StatusCode::BAD_REQUEST),
        (json!({"command": "true", "image": unknown}), StatusCode::NOT_FOUND),
        (json!({"command": "true", "image": "tag:no-such:tag"}), StatusCode::NOT_FOUND),
        (json!({"command": "true", "image": "tag:bad tag!"}), StatusCode::BAD_REQUEST),
        (json!({"command": "true", "image": "busybox"}), StatusCode::BAD_REQUEST),
        (json!({"command": "true", "image": "tag:busybox:latest", "timeout": -5}), StatusCode::BAD_REQUEST),
        (json!({"command": "true", "image": "tag:busybox:latest", "cwd": "relative/dir"}), StatusCode::BAD_REQUEST),
        (json!({"command": "true", "image": "tag:busybox:latest", "uid": -1}), StatusCode::BAD_REQUEST),
        (
            json!({"command": "true", "image": "tag:busybox:latest", "truncate_output_at": 20971520}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"command": "cat", "image": "tag:busybox:latest", "stdin": {"value": "%%%", "encoding": "base64"}}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"command": "true", "image": "tag:busybox:latest", "files": {"/a": {"uuid": unknown}}}),
            StatusCode::NOT_FOUND,
        ),
        (
            json!({"command": "true", "image": "tag:busybox:latest", "files": {"relative": {"uuid": unknown}}}),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (body, want) in cases {
        let (status, resp) = s.spawn(body.clone()).await;
        assert_envelope(status, &resp, want);
    }
    let (status, ops) = s.get_json("/operations").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ops, json!([]), "no rejected request created an operation");

    for path in [
        "/operations?limit=0",
        "/operations?limit=1001",
        "/operations?offset=-1",
        "/operations?since=soon",
        "/operations?status=DONE",
        "/images?limit=abc",
        "/images?tag=bad%20tag",
        "/operations/not-a-uuid",
        "/operations/00000000-0000-0000-0000-000000000000/events?since=x",
    ] {
        let (status, body) = s.get_json(path).await;
        assert_envelope(status, &body, StatusCode::BAD_REQUEST);
    }
    let missing = format!("/operations/{}", uuid::Uuid::new_v4());
    let (status, body) = s.get_json(&missing).await;
    assert_envelope(status, &body, StatusCode::NOT_FOUND);
    let (status, body) = s.get_json("/no/such/route").await;
    assert_envelope(status, &body, StatusCode::NOT_FOUND);
    let r = s.req(Method::PUT, "/whoami").send().await.unwrap();
    let status = r.status();
    assert_envelope(status, &r.json().await.unwrap(), StatusCode::METHOD_NOT_ALLOWED);
    s.stop().await;
}

#[tokio::test]
async fn base_image_is_listed_and_resolvable() {
    let s = TestServer::start().await;
    let (status, body) = s.get_json("/images?tagged=1").await;
    assert_eq!(status, StatusCode::OK);
    let images = body["images"].as_array().unwrap();
    let bb = images.iter().find(|i| i["tag"] == "busybox:latest").expect("busybox:latest listed");
    let uuid = bb["uuid"].as_str().unwrap();
    assert!(bb["created_at"].as_str().unwrap().ends_with("+00:00"));
    assert_eq!(bb["operation_uuid"], Value::Null, "public images have no operation for other namespaces");
    let (_, prefixed) = s.get_json("/images?tag=busy").await;
    assert_eq!(prefixed["images"].as_array().unwrap().len(), 1);
    let (_, none) = s.get_json("/images?tag=alpine").await;
    assert_eq!(none["images"], json!([]));
    let (_, recent) = s.get_json("/images?since=1h&until=0s").await;
    assert_eq!(recent["images"].as_array().unwrap().len(), 1);

    let r = s.req(Method::GET, "/inspect/?tag=busybox:latest").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(r.headers()["location"], format!("{uuid}/").as_str());
    let r = s.req(Method::GET, "/inspect/?tag=nope:1").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = s.req(Method::GET, "/inspect/").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = s.req(Method::GET, "/inspect").send().await.unwrap();
    assert_eq!(
        (r.status(), r.headers()["location"].to_str().unwrap()),
        (StatusCode::TEMPORARY_REDIRECT, "/v1/inspect/")
    );
    let r = s.req(Method::GET, &format!("/inspect/{uuid}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(r.headers()["location"], format!("/v1/inspect/{uuid}/").as_str());
    let (status, image) = s.get_json(&format!("/inspect/{uuid}/")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((image["uuid"].as_str(), image["tag"].as_str()), (Some(uuid), Some("busybox:latest")));
    let (status, _) = s.get_json(&format!("/inspect/{}/", uuid::Uuid::new_v4())).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let r = s.req(Method::GET, "/images").header("Accept-Encoding", "gzip").send().await.unwrap();
    assert_eq!(r.headers()["content-encoding"], "gzip", "responses are compressed when the client accepts it");
    s.stop().await;
}
