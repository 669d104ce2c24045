//! Uploads (`/files`) and injecting them into runs.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::TestServer;

#[tokio::test]
async fn uploads_are_content_addressed_and_injected_into_runs() {
    let s = TestServer::start().await;
    let a = s.upload(b"print-me-from-upload\n".to_vec()).await;
    let b = s.upload(b"print-me-from-upload\n".to_vec()).await;
    assert_eq!(a["uuid"], b["uuid"], "the same content gives the same uuid");
    assert_eq!(a["size"], 21);
    let sha = a["sha256"].as_str().unwrap();
    // A chunked body (no Content-Length) streams too.
    let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>(vec![0u8, 1, 2]), Ok(vec![255u8; 70_000])]);
    let r = s.req(Method::POST, "/files").body(reqwest::Body::wrap_stream(stream)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let bin: Value = r.json().await.unwrap();
    assert_eq!(bin["size"], 70_003);

    let (status, file) = s.get_json(&format!("/files/{sha}")).await;
    assert_eq!(status, StatusCode::OK);
    for key in ["uuid", "sha256", "size", "created_at", "updated_at"] {
        assert!(file.get(key).is_some(), "File.{key}");
    }
    let head = s.req(Method::HEAD, &format!("/files/{sha}")).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    let head = s.req(Method::HEAD, &format!("/files/{}", "0".repeat(64))).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::NOT_FOUND);
    let (status, _) = s.get_json("/files/not-a-sha").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, listed) = s.get_json("/files?since=15m&limit=1000").await;
    assert_eq!(listed["files"].as_array().unwrap().len(), 2);

    let (op, _) = s
        .run(json!({"command": "cat /opt/in/a.txt /deep/er/b.txt; stat -c '%a %u %g' /opt/in/a.txt /deep/er/b.txt /bin/tool; \
                                od -An -tu1 -N3 /bin/tool; stat -c '%a %u' /deep/er",
                    "shell": true, "image": "tag:busybox:latest",
                    "files": {"/opt/in/a.txt": {"uuid": a["uuid"], "mode": "0644"},
                              "/deep/er/b.txt": {"uuid": a["uuid"], "mode": "0o600", "uid": 1000, "gid": 100},
                              "/bin/tool": {"uuid": bin["uuid"], "mode": "0o100755"}}}))
        .await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    assert_eq!(
        op["metadata"]["result"]["stdout"]["value"],
        "print-me-from-upload\nprint-me-from-upload\n644 0 0\n600 1000 100\n755 0 0\n   0   1   2\n755 0\n"
    );
    assert_eq!(op["metadata"]["files"]["/bin/tool"]["mode"], "0o100755", "files are echoed as sent");
    // Injected files are part of the persisted result.
    let child = op["result_image_uuid"].as_str().unwrap();
    let (op, _) =
        s.run(json!({"command": "cat /opt/in/a.txt", "shell": true, "image": child, "disposable": true})).await;
    assert_eq!(op["metadata"]["result"]["stdout"]["value"], "print-me-from-upload\n", "{op}");

    let unknown = uuid::Uuid::new_v4();
    let (status, body) =
        s.spawn(json!({"command": "true", "image": "tag:busybox:latest", "files": {"/x": {"uuid": unknown}}})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _) = s
        .spawn(json!({"command": "true", "image": "tag:busybox:latest", "files": {"/x/../y": {"uuid": a["uuid"]}}}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    s.stop().await;
}

fn peak_rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap()
}

/// Uploads stream to disk: 256 MiB in 1 MiB chunks moves the (in-process) server's peak RSS
/// by far less than the upload's size.
#[tokio::test]
async fn large_uploads_stream_without_buffering() {
    let s = TestServer::start().await;
    let before = peak_rss_kb();
    let chunks = (0..256u32).map(|i| Ok::<_, std::io::Error>(vec![(i % 251) as u8; 1 << 20]));
    let r = s
        .req(Method::POST, "/files")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["size"], 256u64 << 20);
    let grown_mb = (peak_rss_kb().saturating_sub(before)) / 1024;
    assert!(grown_mb < 64, "peak RSS grew by {grown_mb} MiB for a 256 MiB upload");
    s.stop().await;
}
