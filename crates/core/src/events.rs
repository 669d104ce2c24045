//! Operation event logs: the per-operation writer that assigns ids and persists events,
//! the hub that wakes live followers, and the follow stream behind SSE.
//!
//! The store is the single source of truth: followers are woken through a `watch` channel
//! carrying the newest id and then read the store, so a slow follower can never miss or
//! reorder events, and a follower that connects late reads exactly what an early one saw.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boxwood_store::{EventRecord, OperationRecord, Store};
use futures::Stream;
use serde_json::Value;
use tokio::sync::watch;
use uuid::Uuid;

use crate::clock::{format_ts, now_us};
use crate::error::CoreResult;
use crate::model::{EventKind, EventView};
use crate::operations::{self, Status};

/// Live operations' newest event ids, for waking followers.
#[derive(Debug, Default)]
pub(crate) struct EventHub {
    live: Mutex<HashMap<Uuid, watch::Sender<i64>>>,
}

impl EventHub {
    fn register(&self, op: Uuid, last_id: i64) -> watch::Sender<i64> {
        let (tx, _) = watch::channel(last_id);
        self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(op, tx.clone());
        tx
    }

    fn subscribe(&self, op: Uuid) -> Option<watch::Receiver<i64>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).get(&op).map(|tx| tx.subscribe())
    }

    fn remove(&self, op: Uuid) {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).remove(&op);
    }
}

/// Appends events to one operation's log. Clones share one writer, so the main process,
/// subprocesses and the run's service events interleave with strictly increasing ids.
#[derive(Clone)]
pub(crate) struct EventLog {
    inner: Arc<tokio::sync::Mutex<LogWriter>>,
}

struct LogWriter {
    store: Arc<dyn Store>,
    hub: Arc<EventHub>,
    op: Uuid,
    next_id: i64,
    notify: watch::Sender<i64>,
    /// Bytes of stream payloads logged so far, and the cap past which they are dropped.
    stream_bytes: u64,
    cap_bytes: u64,
    capped: bool,
    /// `completion` was written: nothing may follow it.
    completed: bool,
}

impl EventLog {
    /// Starts the log of an operation that has no events yet; stream events past
    /// `cap_bytes` in total are dropped after one `size_cap` event.
    pub(crate) fn fresh(store: Arc<dyn Store>, hub: Arc<EventHub>, op: Uuid, cap_bytes: u64) -> Self {
        let notify = hub.register(op, -1);
        Self::wrap(LogWriter {
            store,
            hub,
            op,
            next_id: 0,
            notify,
            stream_bytes: 0,
            cap_bytes,
            capped: false,
            completed: false,
        })
    }

    /// Continues the log of `op` after its last stored event.
    pub(crate) async fn open(store: Arc<dyn Store>, hub: Arc<EventHub>, op: Uuid) -> CoreResult<Self> {
        let last = store.last_event_id(op).await?;
        let notify = hub.register(op, last.unwrap_or(-1));
        Ok(Self::wrap(LogWriter {
            store,
            hub,
            op,
            next_id: last.map_or(0, |l| l + 1),
            notify,
            stream_bytes: 0,
            cap_bytes: u64::MAX,
            capped: false,
            completed: false,
        }))
    }

    fn wrap(w: LogWriter) -> Self {
        Self { inner: Arc::new(tokio::sync::Mutex::new(w)) }
    }

    /// Appends one event. Stream events past the log's size cap are dropped (the first one
    /// dropped adds `size_cap`); anything after `completion` is dropped.
    pub(crate) async fn append(&self, spid: Option<i64>, kind: EventKind, data: Value) -> CoreResult<()> {
        let mut w = self.inner.lock().await;
        if w.completed {
            return Ok(());
        }
        // The size cap applies to process streams only.
        if kind.is_stream() {
            if w.capped {
                return Ok(());
            }
            let size = data.get("value").and_then(Value::as_str).map_or(0, str::len) as u64;
            if w.stream_bytes.saturating_add(size) > w.cap_bytes {
                w.capped = true;
                let file_size = w.stream_bytes;
                let cap = serde_json::json!({"limit_bytes": w.cap_bytes, "file_size": file_size});
                return w.write(Some(0), EventKind::SizeCap, cap).await;
            }
            w.stream_bytes += size;
        }
        w.write(spid, kind, data).await
    }

    /// Persists the terminal operation row together with its `completion` event, the last
    /// event of every log.
    pub(crate) async fn complete(&self, op: &OperationRecord) -> CoreResult<()> {
        let mut w = self.inner.lock().await;
        let ev = w.record(None, EventKind::Completion, completion_data(op));
        w.store.finish_operation(op, &ev).await?;
        crate::metrics::operation_finished(op);
        w.completed = true;
        w.notify.send_replace(ev.id);
        Ok(())
    }
}

impl LogWriter {
    fn record(&mut self, spid: Option<i64>, kind: EventKind, data: Value) -> EventRecord {
        let id = self.next_id;
        self.next_id += 1;
        EventRecord { operation_uuid: self.op, id, ts_us: now_us(), spid, kind: kind.as_str().into(), data }
    }

    async fn write(&mut self, spid: Option<i64>, kind: EventKind, data: Value) -> CoreResult<()> {
        let ev = self.record(spid, kind, data);
        self.store.append_event(&ev).await?;
        self.notify.send_replace(ev.id);
        Ok(())
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        self.hub.remove(self.op);
    }
}

/// The `completion` payload of a terminal operation row.
fn completion_data(op: &OperationRecord) -> Value {
    let duration_ms = match (op.started_at_us, op.finished_at_us) {
        (Some(s), Some(f)) => (f - s).max(0) / 1000,
        _ => 0,
    };
    serde_json::json!({
        "status": op.status,
        "duration_ms": duration_ms,
        "result_image_uuid": op.result_image_uuid.map(|u| u.to_string()),
        "error": op.error,
        "image_size_bytes": op.image_size.unwrap_or(0),
    })
}

/// Fails an active operation outside its run (after a restart, or when its run hit a store
/// error): appends `completion` after whatever the log already holds.
pub(crate) async fn fail_operation(store: Arc<dyn Store>, hub: Arc<EventHub>, op: Uuid, error: &str) -> CoreResult<()> {
    let Some(mut record) = store.get_operation(op).await? else { return Ok(()) };
    if Status::parse(&record.status).is_none_or(Status::is_terminal) {
        return Ok(());
    }
    let log = EventLog::open(store, hub, op).await?;
    operations::conclude(&mut record, Status::Failed, Some(error.into()));
    log.complete(&record).await
}

/// The wire view of a stored event; `None` for a kind the core never writes.
pub(crate) fn view(ev: &EventRecord) -> Option<EventView> {
    let Some(kind) = EventKind::parse(&ev.kind) else {
        tracing::warn!(op = %ev.operation_uuid, id = ev.id, kind = %ev.kind, "skipping a stored event of an unknown kind");
        return None;
    };
    Some(EventView { id: ev.id, ts: format_ts(ev.ts_us), spid: ev.spid, kind, data: ev.data.clone() })
}

const PAGE: i64 = 512;

struct Follow {
    store: Arc<dyn Store>,
    hub: Arc<EventHub>,
    op: Uuid,
    after: Option<i64>,
    spid: Option<i64>,
    follow: bool,
    buffer: VecDeque<EventRecord>,
    done: bool,
}

impl Follow {
    async fn next(&mut self) -> Option<CoreResult<EventView>> {
        loop {
            while let Some(ev) = self.buffer.pop_front() {
                self.after = Some(ev.id);
                let Some(view) = view(&ev) else { continue };
                if view.kind == EventKind::Completion {
                    self.done = true;
                }
                if self.spid.is_none() || self.spid == ev.spid {
                    return Some(Ok(view));
                }
            }
            if self.done {
                return None;
            }
            // Subscribe before reading, so an event appended in between still wakes us.
            let rx = if self.follow { self.hub.subscribe(self.op) } else { None };
            let page = match self.store.events(self.op, self.after, None, PAGE).await {
                Ok(p) => p,
                Err(e) => {
                    // The stream ends after reporting the error; the client resumes from its
                    // last id.
                    self.done = true;
                    return Some(Err(e.into()));
                }
            };
            if !page.is_empty() {
                self.buffer.extend(page);
                continue;
            }
            if !self.follow {
                return None;
            }
            match self.store.get_operation(self.op).await {
                Ok(Some(op)) if Status::parse(&op.status).is_none_or(Status::is_terminal) => {
                    // Terminal: the completion event was committed with the row; read it.
                    self.follow = false;
                    continue;
                }
                Ok(None) => return None,
                Ok(Some(_)) => {}
                Err(e) => {
                    self.done = true;
                    return Some(Err(e.into()));
                }
            }
            match rx {
                Some(mut rx) => {
                    let _ = tokio::time::timeout(Duration::from_secs(5), rx.changed()).await;
                }
                // The run's log is gone (it ended between our reads, or it belongs to a
                // previous server process): poll until the terminal row shows.
                None => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

/// Events of `op` with id > `since`, optionally only of one `spid`; with `follow`, waits for
/// new events until the operation is terminal (its `completion` was read).
pub(crate) fn follow(
    store: Arc<dyn Store>,
    hub: Arc<EventHub>,
    op: Uuid,
    since: Option<i64>,
    spid: Option<i64>,
    follow: bool,
) -> impl Stream<Item = CoreResult<EventView>> + Send + 'static {
    let state = Follow { store, hub, op, after: since, spid, follow, buffer: VecDeque::new(), done: false };
    futures::stream::unfold(state, |mut s| async move { s.next().await.map(|item| (item, s)) })
}
