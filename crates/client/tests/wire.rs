//! The client's own logic against a scripted HTTP server on loopback (the end-to-end tests
//! drive it against a real Boxwood): event streams resume after the last event when the
//! connection breaks or the server reports `sse_error`, idempotent calls are retried and
//! others never, and refusals carry the server's message.

use std::sync::{Arc, Mutex};

use boxwood_client::types::{EventKind, SpawnRequest};
use boxwood_client::{Client, ClientError, EventsOptions};
use futures::TryStreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves one scripted answer per connection, in order; returns the requests it read.
async fn server(answers: Vec<String>) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        for answer in answers {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            log.lock().unwrap().push(String::from_utf8_lossy(&req).to_lowercase());
            conn.write_all(answer.as_bytes()).await.unwrap();
            // Dropped: the connection closes, cutting a stream off.
        }
    });
    (url, seen)
}

fn sse(frames: &[(i64, &str)]) -> String {
    let mut body =
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n: keepalive\n\n".to_owned();
    for (id, kind) in frames {
        let data = format!(r#"{{"id":{id},"ts":"2026-06-08T20:00:00Z","spid":0,"type":"{kind}","data":{{}}}}"#);
        body.push_str(&format!("id: {id}\nevent: {kind}\ndata: {data}\n\n"));
    }
    body
}

/// `GET /operations/{id}` of an operation in `status`.
fn op(status: &str) -> String {
    let body = format!(
        r#"{{"uuid":"op-1","kind":"instance","status":"{status}","error":null,"created_at":"2026-06-08T20:00:00Z","duration":0.0,"image_size":null,"consumed_cpu":null,"consumed_memory":null,"image_uuid":null,"result_image_uuid":null,"metadata":{{}},"result":null}}"#
    );
    json("200 OK", &body, "")
}

fn json(status: &str, body: &str, extra: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn a_broken_stream_resumes_after_the_last_event_without_repeats() {
    let cut = sse(&[(0, "spawn"), (1, "stdout")]);
    let failed = format!(
        "{}: stream ended with error, retry since last event id\n\nevent: sse_error\ndata: event log read failed\n\n",
        sse(&[(2, "stdout")])
    );
    let rest = sse(&[(1, "stdout"), (2, "stdout"), (3, "future_kind"), (4, "exit"), (5, "completion")]);
    // After the cut the client asks whether the operation ended (it has not).
    let (url, seen) = server(vec![cut, op("EXECUTING"), failed, rest]).await;
    let client = Client::new(&url, "secret").unwrap();
    let events: Vec<_> =
        client.events("op-1", EventsOptions { follow: true, ..Default::default() }).try_collect().await.unwrap();
    let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids, [0, 1, 2, 4, 5], "each event once, in order; an unknown kind skipped");
    assert_eq!(events.last().unwrap().kind, EventKind::Completion);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 4);
    assert!(seen[0].starts_with("get /v1/operations/op-1/events?follow=1 "), "{}", seen[0]);
    assert!(seen[0].contains("authorization: bearer secret") && !seen[0].contains("last-event-id"));
    assert!(seen[1].starts_with("get /v1/operations/op-1 "), "{}", seen[1]);
    assert!(seen[2].contains("last-event-id: 1"), "resumed after 1: {}", seen[2]);
    assert!(seen[3].contains("last-event-id: 2"), "resumed after 2: {}", seen[3]);
}

/// One process's events carry no `completion`: its stream ends when the operation is over,
/// which is then a clean end, not a broken stream.
#[tokio::test]
async fn a_process_stream_ends_cleanly_with_its_operation() {
    let (url, seen) = server(vec![sse(&[(3, "spawn"), (4, "stdout"), (5, "exit")]), op("SUCCESS")]).await;
    let client = Client::new(&url, "t").unwrap();
    let options = EventsOptions { follow: true, spid: Some(2), ..Default::default() };
    let events: Vec<_> = client.events("op-1", options).try_collect().await.unwrap();
    assert_eq!(events.iter().map(|e| e.id).collect::<Vec<_>>(), [3, 4, 5]);
    assert_eq!(seen.lock().unwrap().len(), 2, "no reconnect");
}

#[tokio::test]
async fn idempotent_calls_are_retried_and_spawns_never() {
    let busy = json("503 Service Unavailable", r#"{"error":"busy","status":503}"#, "retry-after: 0\r\n");
    let ok = json("200 OK", r#"{"images":[]}"#, "");
    let (url, seen) = server(vec![busy.clone(), ok]).await;
    let client = Client::new(&url, "t").unwrap();
    assert!(client.images(&Default::default()).await.unwrap().is_empty());
    assert_eq!(seen.lock().unwrap().len(), 2, "the GET was sent again");

    let (url, seen) = server(vec![busy, json("201 Created", "{}", "")]).await;
    let client = Client::new(&url, "t").unwrap();
    let req = SpawnRequest { image: "tag:x".into(), ..Default::default() };
    match client.spawn(&req).await {
        Err(ClientError::Api { status: 503, message }) => assert_eq!(message, "busy"),
        other => panic!("expected the 503, got {other:?}"),
    }
    assert_eq!(seen.lock().unwrap().len(), 1, "a spawn is never sent twice");
}

#[tokio::test]
async fn refusals_carry_the_servers_message_and_a_proxys_page_its_status() {
    let (url, _) = server(vec![
        json("404 Not Found", r#"{"error":"image not found: tag:nope","status":404}"#, ""),
        json("404 Not Found", r#"{"error":{"detail":"Operation not in this namespace"}}"#, ""),
        "HTTP/1.1 502 Bad Gateway\r\ncontent-length: 5\r\nconnection: close\r\n\r\n<html".to_owned(),
    ])
    .await;
    let client = Client::new(&url, "t").unwrap();
    let err = client.lineage("x").await.unwrap_err();
    assert_eq!(err.status(), Some(404));
    assert_eq!(err.to_string(), "image not found: tag:nope (HTTP 404)");
    // Only `error` is certain, and it need not be a string.
    let err = client.operation("x", false).await.unwrap_err();
    assert_eq!(err.to_string(), r#"{"detail":"Operation not in this namespace"} (HTTP 404)"#);
    // A POST is not retried, so the 502 comes straight back, without the page.
    let err = client.import(&serde_json::from_str(r#"{"registry":{"url":"docker://x"}}"#).unwrap()).await.unwrap_err();
    assert_eq!(err.to_string(), "Bad Gateway (HTTP 502)");
    // Nothing listens: said so.
    let gone = Client::new("http://127.0.0.1:9", "t").unwrap();
    assert!(matches!(gone.whoami().await, Err(ClientError::Unreachable { .. })));
}
