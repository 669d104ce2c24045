//! `boxwood gc` and `boxwood usage`: requests to a running server over its admin socket in
//! the state dir (whoever may open that socket is the operator).

use std::path::Path;

use anyhow::{Context as _, bail};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

/// Largest answer read from the socket.
const MAX_ANSWER: u64 = 64 << 20;

/// Sends one request and returns the JSON body of a 200 answer.
pub async fn request(state_dir: &Path, method: &str, target: &str) -> anyhow::Result<Value> {
    let path = state_dir.join(boxwood_api::ADMIN_SOCKET);
    let mut sock = UnixStream::connect(&path)
        .await
        .with_context(|| format!("connecting to {} (is the server running on this state dir?)", path.display()))?;
    // HTTP/1.0: the server closes the connection after its answer, which ends the body.
    let head = format!("{method} {target} HTTP/1.0\r\nHost: boxwood-admin\r\nContent-Length: 0\r\n\r\n");
    sock.write_all(head.as_bytes()).await.context("sending the request")?;
    let mut raw = Vec::new();
    sock.take(MAX_ANSWER).read_to_end(&mut raw).await.context("reading the answer")?;
    let (status, body) = parse_answer(&raw)?;
    let json: Value =
        serde_json::from_slice(body).with_context(|| format!("the server answered {status} without JSON"))?;
    if status != 200 {
        let msg = json.get("error").and_then(Value::as_str).unwrap_or("(no message)");
        bail!("the server answered {status}: {msg}");
    }
    Ok(json)
}

/// The status code and body of an HTTP/1.x answer.
fn parse_answer(raw: &[u8]) -> anyhow::Result<(u16, &[u8])> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").context("the answer has no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).context("the answer's headers are not text")?;
    let status =
        head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("the answer has no status code")?;
    Ok((status, &raw[split + 4..]))
}

/// Prints a retention report for a person.
pub fn print_gc(report: &Value) {
    let n = |k: &str| report.get(k).and_then(Value::as_u64).unwrap_or(0);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let images = report.get("images").and_then(Value::as_array).cloned().unwrap_or_default();
    let dry = report.get("dry_run").and_then(Value::as_bool).unwrap_or(false);
    let verb = if dry { "would remove" } else { "removed" };
    for img in &images {
        let field = |k: &str| img.get(k).and_then(Value::as_str).unwrap_or("-").to_owned();
        println!("image {} ({}; made {})", field("uuid"), field("namespace"), field("created_at"));
    }
    println!(
        "{verb}: {} images, {} uploads ({:.1} MiB), {} operations ({} events)",
        images.len(),
        n("uploads"),
        mib(n("upload_bytes")),
        n("operations"),
        n("events")
    );
    if !dry {
        println!("layer files removed: {} ({:.1} MiB)", n("layer_files"), mib(n("layer_bytes")));
    }
}

/// Prints per-namespace usage as a table.
pub fn print_usage(rows: &Value) {
    println!(
        "{:<24} {:>7} {:>5} {:>12} {:>8} {:>12} {:>10} {:>12}",
        "NAMESPACE", "IMAGES", "TAGS", "IMAGE_BYTES", "UPLOADS", "UPLOAD_BYTES", "OPERATIONS", "EVENT_BYTES"
    );
    for r in rows.as_array().into_iter().flatten() {
        let n = |k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
        let ns = r.get("namespace").and_then(Value::as_str).unwrap_or("-");
        println!(
            "{ns:<24} {:>7} {:>5} {:>12} {:>8} {:>12} {:>10} {:>12}",
            n("images"),
            n("tags"),
            n("image_bytes"),
            n("uploads"),
            n("upload_bytes"),
            n("operations"),
            n("event_bytes")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_split_into_status_and_body() {
        let (status, body) = parse_answer(b"HTTP/1.0 507 Insufficient Storage\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((status, body), (507, &b"{}"[..]));
        assert!(parse_answer(b"HTTP/1.0 200 OK\r\n").is_err());
        assert!(parse_answer(b"garbage\r\n\r\n").is_err());
    }
}
