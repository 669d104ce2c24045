//! The retention queries against a real (temporary) SQLite database: what may go, and that a
//! removal re-checks its conditions when it happens.

mod common;

use boxwood_store::*;
use serde_json::json;
use uuid::Uuid;

fn image(parent: Option<Uuid>, created: i64) -> ImageRecord {
    ImageRecord { parent_uuid: parent, operation_uuid: Some(Uuid::new_v4()), ..common::image("ns", created) }
}

fn op(status: &str, image: Option<Uuid>, finished: Option<i64>) -> OperationRecord {
    OperationRecord { image_uuid: image, finished_at_us: finished, ..common::operation("ns", status) }
}

async fn open() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
    (dir, store)
}

fn uuids(images: &[ImageRecord]) -> Vec<Uuid> {
    images.iter().map(|i| i.uuid).collect()
}

#[tokio::test]
async fn only_untagged_unused_leaves_expire_and_removal_rechecks() {
    let (_dir, store) = open().await;
    let root = image(None, 10);
    let child = image(Some(root.uuid), 20);
    let tagged = image(None, 30);
    let busy = image(None, 40);
    let used = image(None, 50);
    let fresh = image(None, 1_000);
    for i in [&root, &child, &tagged, &busy, &used, &fresh] {
        store.insert_image(i).await.unwrap();
    }
    store.set_tag("ns", "keep:1", tagged.uuid, 30).await.unwrap();
    store.insert_operation(&op("EXECUTING", Some(busy.uuid), None)).await.unwrap();
    assert!(store.touch_image(used.uuid, 900).await.unwrap());

    // The parent has a child, the tagged one a tag, the busy one a live run, the used one a
    // recent use, the fresh one its age: only the child qualifies.
    assert_eq!(uuids(&store.expired_images(500, 100).await.unwrap()), vec![child.uuid]);
    assert!(store.remove_image(child.uuid, 500, 600, "retention").await.unwrap());
    assert!(store.get_image(child.uuid).await.unwrap().is_none());
    // Its parent is now a leaf, and goes next; lineage keeps both.
    assert_eq!(uuids(&store.expired_images(500, 100).await.unwrap()), vec![root.uuid]);
    let removed = store.removed_children(root.uuid).await.unwrap();
    assert_eq!(removed.len(), 1);
    assert_eq!((removed[0].uuid, removed[0].removed_at_us, removed[0].reason.as_str()), (child.uuid, 600, "retention"));

    // A run that starts on the root touches it first: the removal no longer applies.
    assert!(store.touch_image(root.uuid, 700).await.unwrap());
    assert!(!store.remove_image(root.uuid, 500, 800, "retention").await.unwrap());
    assert!(store.get_image(root.uuid).await.unwrap().is_some());
    // And a touch that comes after a removal says the image is gone.
    assert!(!store.touch_image(child.uuid, 900).await.unwrap());
    // A tag set after the listing keeps an image too.
    let late = image(None, 60);
    store.insert_image(&late).await.unwrap();
    assert!(store.expired_images(500, 100).await.unwrap().iter().any(|i| i.uuid == late.uuid));
    store.set_tag("ns", "late:1", late.uuid, 950).await.unwrap();
    assert!(!store.remove_image(late.uuid, 500, 960, "retention").await.unwrap());
    assert!(store.removed_image(late.uuid).await.unwrap().is_none());
    assert_eq!(store.removed_image(child.uuid).await.unwrap().map(|r| r.parent_uuid), Some(Some(root.uuid)));
}

#[tokio::test]
async fn uploads_expire_by_last_use_and_content_is_counted_across_namespaces() {
    let (_dir, store) = open().await;
    let a = store.upsert_file("a", "sha256:11", 5, 10).await.unwrap();
    let b = store.upsert_file("b", "sha256:11", 5, 10).await.unwrap();
    let c = store.upsert_file("a", "sha256:22", 7, 10).await.unwrap();
    assert!(store.touch_file(c.uuid, 900).await.unwrap());
    let expired: Vec<Uuid> = store.expired_files(500, 10).await.unwrap().iter().map(|f| f.uuid).collect();
    assert_eq!(expired.len(), 2);
    assert!(expired.contains(&a.uuid) && expired.contains(&b.uuid));
    assert!(store.remove_file(a.uuid, 500).await.unwrap());
    assert!(store.content_referenced("sha256:11").await.unwrap(), "namespace b still has it");
    // Uploaded again since the listing: kept.
    store.upsert_file("b", "sha256:11", 5, 950).await.unwrap();
    assert!(!store.remove_file(b.uuid, 500).await.unwrap());
    assert!(!store.remove_file(c.uuid, 500).await.unwrap(), "used recently");
    // An unfinished run that names an upload keeps it, however old.
    let named = store.upsert_file("a", "sha256:33", 1, 10).await.unwrap();
    let mut run = op("PENDING", None, None);
    run.metadata = json!({"files": {"/x": {"uuid": named.uuid.to_string()}}});
    store.insert_operation(&run).await.unwrap();
    assert!(!store.expired_files(500, 10).await.unwrap().iter().any(|f| f.uuid == named.uuid));
    assert!(!store.remove_file(named.uuid, 500).await.unwrap());
}

#[tokio::test]
async fn finished_operations_go_with_their_event_logs_and_usage_counts_namespaces() {
    let (_dir, store) = open().await;
    let old = op("SUCCESS", None, Some(100));
    let recent = op("FAILED", None, Some(900));
    let live = op("EXECUTING", None, None);
    for o in [&old, &recent, &live] {
        store.insert_operation(o).await.unwrap();
        for id in 1..=3 {
            let data = json!({"data": "xxxx"});
            store
                .append_event(&EventRecord {
                    operation_uuid: o.uuid,
                    id,
                    ts_us: id,
                    spid: None,
                    kind: "stdout".into(),
                    data,
                })
                .await
                .unwrap();
        }
    }
    let expired = store.expired_operations(500, 10).await.unwrap();
    assert_eq!(expired, vec![ExpiredOperation { uuid: old.uuid, namespace: "ns".into(), events: 3 }]);
    let before = store.namespace_counts().await.unwrap();
    assert_eq!((before[0].operations, before[0].event_bytes > 0), (3, true));
    assert!(store.remove_operation(old.uuid, 500).await.unwrap());
    assert!(!store.remove_operation(recent.uuid, 500).await.unwrap());
    assert!(!store.remove_operation(live.uuid, i64::MAX).await.unwrap(), "an unfinished operation never goes");
    assert!(store.get_operation(old.uuid).await.unwrap().is_none());
    assert!(store.events(old.uuid, None, None, 10).await.unwrap().is_empty());
    let after = store.namespace_counts().await.unwrap();
    assert_eq!(after[0].operations, 2);
    assert_eq!(after[0].event_bytes * 3, before[0].event_bytes * 2);
}

/// Removing finished operations while other operations are written (a retention pass during
/// runs) waits for the write lock instead of failing: a removal that read before it wrote
/// failed with "database is locked" whenever another connection committed in between
/// (`bench/soak.sh`: two of five passes in 1000 runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_operations_while_others_are_written_waits_its_turn() {
    let (_dir, store) = open().await;
    let mut expired = Vec::new();
    for _ in 0..200 {
        let o = op("SUCCESS", None, Some(10));
        store.insert_operation(&o).await.unwrap();
        store
            .append_event(&EventRecord {
                operation_uuid: o.uuid,
                id: 1,
                ts_us: 1,
                spid: None,
                kind: "x".into(),
                data: json!({}),
            })
            .await
            .unwrap();
        expired.push(o.uuid);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|_| {
            let (store, stop) = (store.clone(), stop.clone());
            tokio::spawn(async move {
                let mut written = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    store.insert_operation(&op("PENDING", None, None)).await.unwrap();
                    written += 1;
                }
                written
            })
        })
        .collect();
    for uuid in expired {
        let removed = store.remove_operation(uuid, 100).await;
        assert!(matches!(removed, Ok(true)), "{uuid}: {removed:?}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        assert!(w.await.unwrap() > 0, "the writers wrote while the removals ran");
    }
}
