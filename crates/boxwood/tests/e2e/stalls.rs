//! Peers that stall: a client that sends half its headers, one that keeps a connection idle,
//! an upload that stops sending, an event-stream reader that stops reading, an upload that
//! drips forever across a shutdown. Each gets a deadline (`[http]`); each probe first shows
//! the connection alive before its deadline, so the close is the deadline's doing.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{TestServer, qemu_processes_with};

const HEADER_SECS: u64 = 2;
const BODY_SECS: u64 = 2;
const WRITE_SECS: u64 = 3;
const GRACE_SECS: u64 = 4;

async fn start() -> TestServer {
    TestServer::start_with(|c| {
        c.http.header_read_timeout_secs = HEADER_SECS;
        c.http.body_idle_timeout_secs = BODY_SECS;
        c.http.write_timeout_secs = WRITE_SECS;
        c.http.shutdown_grace_secs = GRACE_SECS;
    })
    .await
}

async fn connect(s: &TestServer) -> TcpStream {
    TcpStream::connect(s.url.trim_start_matches("http://")).await.unwrap()
}

/// Whether the server closed `conn` within `within` (EOF or reset; bytes it sent first are
/// read and dropped).
async fn closed_within(conn: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Reads what `conn` has until EOF or `within`; returns the bytes.
async fn read_all(conn: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, conn.read_to_end(&mut out)).await;
    out
}

#[tokio::test]
async fn stalled_headers_idle_connections_and_silent_uploads_are_cut_off() {
    let s = start().await;
    let auth = format!("Authorization: Bearer {}\r\n", s.token);

    // Half a request's headers: alive at first, closed past the header timeout.
    let mut half = connect(&s).await;
    half.write_all(b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    assert!(!closed_within(&mut half, Duration::from_secs(1)).await, "the connection is open before the deadline");
    assert!(closed_within(&mut half, Duration::from_secs(HEADER_SECS + 3)).await, "half headers are cut off");

    // A kept-alive connection: served, then idle, then closed the same way.
    let mut idle = connect(&s).await;
    let req = format!("GET /v1/whoami HTTP/1.1\r\nHost: x\r\n{auth}\r\n");
    idle.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 8192];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    assert!(!closed_within(&mut idle, Duration::from_secs(1)).await, "kept alive for a while");
    assert!(closed_within(&mut idle, Duration::from_secs(HEADER_SECS + 3)).await, "an idle connection is closed");

    // An upload that sends 1 MiB of 8 and goes silent: a 400 once the body idles past its
    // timeout, and nothing of it is stored.
    let mut upload = connect(&s).await;
    let head = format!(
        "POST /v1/files HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        8 << 20
    );
    upload.write_all(head.as_bytes()).await.unwrap();
    upload.write_all(&vec![3u8; 1 << 20]).await.unwrap();
    let t = Instant::now();
    let answer = read_all(&mut upload, Duration::from_secs(BODY_SECS + 5)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "the silent upload is refused: {answer}");
    assert!(answer.contains("reading the upload failed"), "{answer}");
    assert!(t.elapsed() >= Duration::from_secs(BODY_SECS), "not before its timeout: {:?}", t.elapsed());
    let (status, files) = s.get_json("/files").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(files["files"].as_array().map(Vec::len), Some(0), "nothing stored: {files}");
    let tmp = s.state.as_ref().unwrap().path().join("blobs/tmp");
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "no partial blob left");

    // The server still serves.
    let (status, _) = s.get_json("/whoami").await;
    assert_eq!(status, StatusCode::OK);
    s.stop().await;
}

#[tokio::test]
async fn an_event_stream_reader_that_stops_reading_is_disconnected() {
    let s = start().await;
    // A log of ~20 MiB (10 MiB, the most kept, on each of stdout and stderr): far more than
    // the socket buffers between server and reader hold.
    let cmd = "head -c 10485760 /dev/zero | tr '\\0' a; head -c 10485760 /dev/zero | tr '\\0' b >&2";
    let (op, _) = s.run(json!({"command": cmd, "shell": true, "truncate_output_at": 10 << 20})).await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    let id = op["uuid"].as_str().unwrap().to_owned();
    let request = format!(
        "GET /v1/operations/{id}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n",
        s.token
    );
    let reader = |pause: Duration| {
        let (url, request) = (s.url.clone(), request.clone());
        async move {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.set_recv_buffer_size(4096).unwrap();
            let mut conn = sock.connect(url.trim_start_matches("http://").parse().unwrap()).await.unwrap();
            conn.write_all(request.as_bytes()).await.unwrap();
            tokio::time::sleep(pause).await;
            read_all(&mut conn, Duration::from_secs(60)).await
        }
    };
    // Positive control: a reader pausing less than the write timeout gets the whole log.
    let full = reader(Duration::from_secs(1)).await;
    let full_text = String::from_utf8_lossy(&full);
    assert!(full.len() > 20 << 20 && full_text.contains("event: completion"), "{} bytes", full.len());
    // One that stops for longer is cut off: it finds a shorter log and the connection closed.
    let cut = reader(Duration::from_secs(WRITE_SECS + 3)).await;
    eprintln!("stuck reader: {} of {} bytes before the server closed", cut.len(), full.len());
    assert!(cut.len() < full.len() / 2, "the stuck reader was disconnected: {} of {} bytes", cut.len(), full.len());
    assert!(!String::from_utf8_lossy(&cut).contains("event: completion"));
    s.stop().await;
}

#[tokio::test]
async fn shutdown_ends_within_its_grace_despite_a_dripping_upload() {
    let s = start().await;
    let state = s.state.as_ref().unwrap().path().to_owned();
    // A run in flight and an upload that sends a byte a second, never idle long enough for
    // the body timeout, never done.
    let run = s.start_run(json!({"command": "sleep 600", "shell": true})).await;
    s.wait_status(&run, "EXECUTING", Duration::from_secs(120)).await;
    let mut drip = connect(&s).await;
    let head = format!(
        "POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 1000000\r\n\r\n",
        s.token
    );
    drip.write_all(head.as_bytes()).await.unwrap();
    let dripping = tokio::spawn(async move {
        loop {
            if drip.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(BODY_SECS + 1)).await;
    assert!(!dripping.is_finished(), "the dripping upload is still being served");
    assert!(!qemu_processes_with(&state.to_string_lossy()).is_empty(), "the server's QEMUs run");

    let t = Instant::now();
    let dir = tokio::time::timeout(Duration::from_secs(GRACE_SECS + 10), s.stop()).await.expect("stop ends").unwrap();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(GRACE_SECS + 3), "shutdown took {took:?} with a grace of {GRACE_SECS} s");
    tokio::time::timeout(Duration::from_secs(5), dripping)
        .await
        .expect("the dripping upload's connection was closed")
        .unwrap();
    let left = crate::harness::until_gone(|| {
        qemu_processes_with(&state.to_string_lossy()).into_iter().map(|(p, _)| p).collect()
    })
    .await;
    assert!(left.is_empty(), "QEMUs left after shutdown: {left:?}");

    // The run ended FAILED with the reason, as the next start shows.
    let s = TestServer::start_in(dir, |_| {}).await;
    let (_, op) = s.get_json(&format!("/operations/{run}")).await;
    assert_eq!(op["status"], "FAILED", "{op}");
    assert!(op["error"].as_str().unwrap().contains("shut down"), "{op}");
    s.stop().await;
}
