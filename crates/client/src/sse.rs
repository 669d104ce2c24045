//! Server-sent events: an incremental frame parser, and the follower that turns an
//! operation's event stream into [`EventView`]s, reconnecting with `Last-Event-Id` when the
//! connection breaks (or the server ends it with `sse_error`) so no event is lost or repeated.

use std::collections::VecDeque;
use std::time::Duration;

use boxwood_types::{EventKind, EventView};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};

use crate::{Client, ClientError};

/// The contract's cap on one frame (contree-client refuses larger ones too).
const MAX_FRAME_BYTES: usize = 4 << 20;
/// Connections in a row that bring nothing before the follower gives up.
const MAX_RECONNECTS: u32 = 8;
/// Pause before reopening a stream the server ended early.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

/// One frame: its fields, `data` lines joined with `\n`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// Splits a byte stream into frames; comments (`: keepalive`) are dropped.
#[derive(Debug, Default)]
pub(crate) struct Parser {
    line: Vec<u8>,
    frame: Frame,
    has_data: bool,
    size: usize,
}

impl Parser {
    /// Feeds `bytes`; returns the frames they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Frame>, String> {
        let mut out = Vec::new();
        for &b in bytes {
            if b != b'\n' {
                self.line.push(b);
                self.size += 1;
                if self.size > MAX_FRAME_BYTES {
                    return Err(format!("a frame is longer than {MAX_FRAME_BYTES} bytes"));
                }
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.is_empty() {
                // A frame without data is not dispatched (the SSE rule).
                if self.has_data {
                    out.push(std::mem::take(&mut self.frame));
                }
                self.frame = Frame::default();
                self.has_data = false;
                self.size = 0;
                continue;
            }
            let line = String::from_utf8(line).map_err(|_| "a frame is not UTF-8".to_owned())?;
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((&line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => self.frame.id = Some(value.to_owned()),
                "event" => self.frame.event = Some(value.to_owned()),
                "data" => {
                    if self.has_data {
                        self.frame.data.push('\n');
                    }
                    self.frame.data.push_str(value);
                    self.has_data = true;
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

/// What to read of an operation's log.
#[derive(Debug, Clone, Copy, Default)]
pub struct EventsOptions {
    /// Only events after this id.
    pub since: Option<i64>,
    /// Only this process's events.
    pub spid: Option<i64>,
    /// Keep the stream open until the operation is terminal (needs a spawn permission).
    pub follow: bool,
}

struct Follower {
    client: Client,
    operation: String,
    options: EventsOptions,
    /// The last event handed out: a reconnect resumes after it.
    last_id: Option<i64>,
    body: Option<BoxStream<'static, reqwest::Result<Bytes>>>,
    parser: Parser,
    ready: VecDeque<EventView>,
    failures: u32,
    done: bool,
}

impl Follower {
    fn broken(&self, reason: impl Into<String>) -> ClientError {
        ClientError::Stream { operation: self.operation.clone(), reason: reason.into() }
    }

    async fn next(&mut self) -> Option<Result<EventView, ClientError>> {
        loop {
            if let Some(ev) = self.ready.pop_front() {
                self.last_id = Some(ev.id);
                self.done |= ev.kind == EventKind::Completion;
                return Some(Ok(ev));
            }
            if self.done {
                return None;
            }
            let Some(body) = self.body.as_mut() else {
                if let Err(e) = self.connect().await {
                    self.done = true;
                    return Some(Err(e));
                }
                continue;
            };
            match body.next().await {
                Some(Ok(bytes)) => {
                    // Bytes arrived (a keepalive too): the connection works.
                    self.failures = 0;
                    let frames = match self.parser.push(&bytes) {
                        Ok(frames) => frames,
                        Err(reason) => {
                            self.done = true;
                            return Some(Err(self.broken(reason)));
                        }
                    };
                    for frame in frames {
                        if let Err(e) = self.take(frame) {
                            self.done = true;
                            return Some(Err(e));
                        }
                    }
                }
                // Cut off: resume after the last event.
                Some(Err(_)) => self.body = None,
                // The server ends a non-following stream at the log's end.
                None if !self.options.follow => self.done = true,
                // A following one ends after `completion`, which a stream of one process's
                // events does not carry: ended cleanly if the operation is terminal.
                None => match self.client.operation(&self.operation, false).await {
                    Ok(op) if op.summary.status.is_terminal() => self.done = true,
                    _ => {
                        self.body = None;
                        tokio::time::sleep(RECONNECT_PAUSE).await;
                    }
                },
            }
        }
    }

    fn take(&mut self, frame: Frame) -> Result<(), ClientError> {
        if frame.event.as_deref() == Some("sse_error") {
            // The server could not read its log: resume from the last event.
            self.body = None;
            return Ok(());
        }
        let decode = |e| ClientError::Decode { what: format!("an event of operation {}", self.operation), source: e };
        let raw: serde_json::Value = serde_json::from_str(&frame.data).map_err(decode)?;
        // A kind this client does not know (a newer server's) is skipped, not fatal.
        if raw.get("type").and_then(serde_json::Value::as_str).and_then(EventKind::parse).is_none() {
            return Ok(());
        }
        let ev: EventView = serde_json::from_value(raw).map_err(decode)?;
        if self.last_id.is_some_and(|last| ev.id <= last) || self.ready.back().is_some_and(|b| ev.id <= b.id) {
            return Ok(()); // already handed out
        }
        self.ready.push_back(ev);
        Ok(())
    }

    async fn connect(&mut self) -> Result<(), ClientError> {
        loop {
            self.parser = Parser::default();
            self.failures += 1;
            if self.failures > MAX_RECONNECTS {
                return Err(self.broken(format!("{MAX_RECONNECTS} connections in a row brought nothing")));
            }
            match self.client.open_events(&self.operation, self.options, self.last_id).await {
                Ok(resp) => {
                    self.body = Some(resp.bytes_stream().boxed());
                    return Ok(());
                }
                Err(ClientError::Unreachable { .. }) => tokio::time::sleep(backoff(self.failures)).await,
                Err(e) => return Err(e),
            }
        }
    }
}

pub(crate) fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64 << attempt.min(5))
}

/// See [`Client::events`].
pub(crate) fn follow(
    client: Client,
    operation: String,
    options: EventsOptions,
) -> impl Stream<Item = Result<EventView, ClientError>> + Send + 'static {
    let follower = Follower {
        client,
        operation,
        last_id: options.since,
        options,
        body: None,
        parser: Parser::default(),
        ready: VecDeque::new(),
        failures: 0,
        done: false,
    };
    futures::stream::unfold(follower, |mut f| async move { f.next().await.map(|item| (item, f)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_anywhere_keepalives_dropped_data_joined() {
        let text =
            ": keepalive\n\nid: 2\nevent: exit\ndata: {\"a\":\ndata: 1}\n\nid: 3\r\nevent: stdout\r\ndata: x\r\n\r\n";
        for cut in 0..text.len() {
            let mut p = Parser::default();
            let mut frames = p.push(&text.as_bytes()[..cut]).unwrap();
            frames.extend(p.push(&text.as_bytes()[cut..]).unwrap());
            assert_eq!(
                frames,
                [
                    Frame { id: Some("2".into()), event: Some("exit".into()), data: "{\"a\":\n1}".into() },
                    Frame { id: Some("3".into()), event: Some("stdout".into()), data: "x".into() },
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn an_endless_frame_is_refused() {
        let mut p = Parser::default();
        let chunk = vec![b'a'; 1 << 20];
        let mut result = Ok(Vec::new());
        for _ in 0..5 {
            result = p.push(&chunk);
            if result.is_err() {
                break;
            }
        }
        assert!(result.is_err());
    }
}
