//! A minimal QMP (QEMU Machine Protocol) client: one JSON object per line over QEMU's
//! `-qmp unix:…` socket. Commands run one at a time; asynchronous events that arrive in
//! between are kept so a caller can wait for one (e.g. `MIGRATION` … `completed`).

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;

use crate::VmError;

/// A connected, negotiated QMP session.
pub(crate) struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    /// Events read while waiting for a command's reply, oldest first.
    events: VecDeque<Value>,
    deadline: Instant,
}

fn qmp_err(what: impl Into<String>) -> VmError {
    VmError::Qmp(what.into())
}

impl Qmp {
    /// Connects to `path` (retrying until QEMU listens), reads the greeting and leaves
    /// capability negotiation. Every later read is bounded by `deadline` too.
    pub async fn connect(path: &Path, deadline: Instant, alive: impl Fn() -> bool) -> Result<Self, VmError> {
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if !alive() || Instant::now() >= deadline => {
                    return Err(qmp_err(format!("connect {}: {e}", path.display())));
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(2)).await,
            }
        };
        let (r, w) = stream.into_split();
        let mut qmp = Self { reader: BufReader::new(r), writer: w, events: VecDeque::new(), deadline };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(qmp_err(format!("unexpected greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Moves the deadline for later reads (a pooled clone's session outlives its start).
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = deadline;
    }

    async fn read_message(&mut self) -> Result<Value, VmError> {
        let mut line = String::new();
        let n = tokio::time::timeout_at(self.deadline, self.reader.read_line(&mut line))
            .await
            .map_err(|_| qmp_err("timed out waiting for QEMU's monitor"))?
            .map_err(|e| qmp_err(format!("read: {e}")))?;
        if n == 0 {
            return Err(qmp_err("QEMU closed the monitor connection"));
        }
        serde_json::from_str(&line).map_err(|e| qmp_err(format!("bad JSON from QEMU ({e}): {line}")))
    }

    /// Sends several commands at once (QMP answers them in order) and returns their
    /// `return` values; the first `error` fails the whole batch. Batching saves a round trip
    /// per command on the restore path.
    pub async fn execute_batch(&mut self, commands: &[(&str, Option<Value>)]) -> Result<Vec<Value>, VmError> {
        let mut out = Vec::new();
        for (name, args) in commands {
            let cmd = match args {
                Some(a) => json!({"execute": name, "arguments": a}),
                None => json!({"execute": name}),
            };
            out.extend_from_slice(cmd.to_string().as_bytes());
            out.push(b'\n');
        }
        self.writer.write_all(&out).await.map_err(|e| qmp_err(format!("write: {e}")))?;
        let names: Vec<&str> = commands.iter().map(|(n, _)| *n).collect();
        self.collect(&names).await
    }

    /// Reads the replies to the commands `names`, sent in this order.
    async fn collect(&mut self, names: &[&str]) -> Result<Vec<Value>, VmError> {
        let mut results = Vec::with_capacity(names.len());
        let mut first_error = None;
        while results.len() < names.len() {
            let msg = self.read_message().await?;
            if msg.get("event").is_some() {
                self.events.push_back(msg);
                continue;
            }
            if let Some(err) = msg.get("error") {
                let name = names[results.len()];
                let desc = err.get("desc").and_then(Value::as_str).unwrap_or("unknown error");
                first_error.get_or_insert_with(|| qmp_err(format!("{name}: {desc}")));
                results.push(Value::Null);
                continue;
            }
            match msg.get("return") {
                Some(r) => results.push(r.clone()),
                None => return Err(qmp_err(format!("unexpected reply {msg}"))),
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(results),
        }
    }

    /// Runs one command with `fd` attached (`SCM_RIGHTS`, in the same message as the
    /// command's first bytes, as `getfd` and `add-fd` expect) and returns its `return` value.
    pub async fn execute_with_fd(&mut self, name: &str, args: Value, fd: BorrowedFd<'_>) -> Result<Value, VmError> {
        let mut line = json!({"execute": name, "arguments": args}).to_string().into_bytes();
        line.push(b'\n');
        let stream: &UnixStream = self.writer.as_ref();
        let fds = [fd.as_raw_fd()];
        let sent = loop {
            stream.writable().await.map_err(|e| qmp_err(format!("write: {e}")))?;
            let r = stream.try_io(tokio::io::Interest::WRITABLE, || {
                let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
                nix::sys::socket::sendmsg::<()>(
                    stream.as_raw_fd(),
                    &[IoSlice::new(&line)],
                    &cmsg,
                    nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match r {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(qmp_err(format!("sendmsg: {e}"))),
            }
        };
        self.writer.write_all(&line[sent..]).await.map_err(|e| qmp_err(format!("write: {e}")))?;
        let mut r = self.collect(&[name]).await?;
        Ok(r.pop().unwrap_or(Value::Null))
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(&mut self, name: &str, args: Option<Value>) -> Result<Value, VmError> {
        let mut r = self.execute_batch(&[(name, args)]).await?;
        Ok(r.pop().unwrap_or(Value::Null))
    }

    /// Waits for the first event (kept or new) for which `pred` holds, and returns it.
    pub async fn wait_event(&mut self, pred: impl Fn(&Value) -> bool) -> Result<Value, VmError> {
        if let Some(i) = self.events.iter().position(&pred) {
            return Ok(self.events.remove(i).unwrap_or(Value::Null));
        }
        loop {
            let msg = self.read_message().await?;
            if msg.get("event").is_some() {
                if pred(&msg) {
                    return Ok(msg);
                }
                // Kept: events of one change can come in either order (RESUME precedes
                // MIGRATION `completed` on an incoming migration).
                self.events.push_back(msg);
            }
        }
    }
}

/// `MIGRATION` event with `status` (needs the `events` migration capability).
pub(crate) fn is_migration_status(event: &Value, statuses: &[&str]) -> bool {
    event.get("event").and_then(Value::as_str) == Some("MIGRATION")
        && event.pointer("/data/status").and_then(Value::as_str).is_some_and(|s| statuses.contains(&s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_events() {
        let ev = json!({"event": "MIGRATION", "data": {"status": "completed"}});
        assert!(is_migration_status(&ev, &["completed", "failed"]));
        assert!(!is_migration_status(&ev, &["failed"]));
        assert!(!is_migration_status(&json!({"event": "RESUME"}), &["completed"]));
    }

    #[tokio::test]
    async fn batches_skip_events_and_report_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\": {\"version\": {}}}\n").await.unwrap();
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            assert!(line.contains("qmp_capabilities"));
            w.write_all(b"{\"return\": {}}\n").await.unwrap();
            for reply in [
                "{\"event\": \"STOP\"}\n{\"return\": {\"status\": \"running\"}}\n",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n",
            ] {
                line.clear();
                r.read_line(&mut line).await.unwrap();
                w.write_all(reply.as_bytes()).await.unwrap();
            }
            w.write_all(b"{\"event\": \"RESUME\"}\n").await.unwrap();
            w.write_all(b"{\"event\": \"MIGRATION\", \"data\": {\"status\": \"completed\"}}\n").await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        });
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let mut qmp = Qmp::connect(&path, deadline, || true).await.unwrap();
        let batch = qmp.execute_batch(&[("query-status", None), ("bad", Some(json!({"x": 1})))]).await;
        assert!(matches!(batch, Err(VmError::Qmp(m)) if m == "bad: nope"));
        let stop = qmp.wait_event(|e| e["event"] == "STOP").await.unwrap();
        assert_eq!(stop["event"], "STOP", "an event read during a command is kept");
        qmp.wait_event(|e| is_migration_status(e, &["completed"])).await.unwrap();
        qmp.wait_event(|e| e["event"] == "RESUME").await.unwrap();
        server.await.unwrap();
    }
}
