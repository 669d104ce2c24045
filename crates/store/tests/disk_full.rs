//! The store on a filesystem that fills up and frees again (a small tmpfs; needs root to
//! mount it): writes fail while it is full, reads keep working, nothing acknowledged is lost,
//! no reader sees two states of one row, and writes succeed again as soon as space returns,
//! with no reopen.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use boxwood_store::{EventRecord, OperationRecord, SqliteStore, Store};
use serde_json::json;
use uuid::Uuid;

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        Self(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Writes `path` until the filesystem refuses: afterwards it has no free block.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    loop {
        if f.write_all(&chunk).is_err() {
            break;
        }
    }
    // The last partial chunk may have left a few bytes; take them in small steps.
    while f.write_all(&[0xa5]).is_ok() {}
    let _ = f.sync_all();
}

fn op(status: &str) -> OperationRecord {
    // Big enough that a full disk is met within a few rows.
    OperationRecord { metadata: json!({ "pad": "x".repeat(16 * 1024) }), ..common::operation("ns", status) }
}

fn event(op: Uuid, id: i64) -> EventRecord {
    EventRecord { operation_uuid: op, id, ts_us: id, spid: None, kind: "completion".into(), data: json!({"id": id}) }
}

/// One round of the writes the service makes: create a run, move it on, finish it.
async fn run_once(store: &SqliteStore) -> Result<OperationRecord, boxwood_store::StoreError> {
    let mut rec = op("PENDING");
    store.insert_operation(&rec).await?;
    rec.status = "EXECUTING".into();
    store.update_operation(&rec).await?;
    rec.status = "SUCCESS".into();
    store.finish_operation(&rec, &event(rec.uuid, 1)).await?;
    Ok(rec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_fails_writes_and_they_recover_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    // Room, once the filler goes, for the 16 rounds below: each appends ~120 KiB of pages to the
    // WAL, which does not checkpoint before 4 MiB.
    let mnt = Tmpfs::new(&dir.path().join("mnt"), "4m");
    let store = Arc::new(SqliteStore::open(&mnt.0.join("boxwood.db")).await.unwrap());
    let before = run_once(&store).await.unwrap();

    fill(&mnt.0.join("filler"));

    // Many writers at once, as runs finishing together would be; each round either fails
    // or, if it reports success, must be stored in full.
    let mut acknowledged = Vec::new();
    let mut failed = 0;
    for _ in 0..5 {
        let rounds: Vec<_> = (0..16)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { run_once(&store).await })
            })
            .collect();
        for r in rounds {
            match r.await.unwrap() {
                Ok(rec) => acknowledged.push(rec),
                Err(_) => failed += 1,
            }
        }
    }
    assert!(failed > 0, "the attack is not seen: every write succeeded on a full disk");

    // Reads keep answering while the disk is full, and each row reads the same on every try
    // (a connection stuck in an old transaction would serve a stale snapshot).
    let t = Instant::now();
    for _ in 0..32 {
        let got = store.get_operation(before.uuid).await.unwrap().unwrap();
        assert_eq!(got.status, "SUCCESS");
    }
    assert!(t.elapsed() < Duration::from_secs(5), "reads on a full disk took {:?}", t.elapsed());

    std::fs::remove_file(mnt.0.join("filler")).unwrap();

    // Writes work again at once, with no reopen: no connection holds a lock or a transaction.
    let t = Instant::now();
    for _ in 0..16 {
        let rec = run_once(&store).await.expect("a write after space returned");
        acknowledged.push(rec);
    }
    assert!(t.elapsed() < Duration::from_secs(5), "writes after recovery took {:?}", t.elapsed());

    for rec in &acknowledged {
        for _ in 0..4 {
            let got = store.get_operation(rec.uuid).await.unwrap().expect("an acknowledged run is stored");
            assert_eq!(got.status, "SUCCESS", "operation {} read in another state", rec.uuid);
        }
        assert_eq!(store.last_event_id(rec.uuid).await.unwrap(), Some(1));
    }
    store.close().await;
}
