//! Behaviour of the SQLite store against a real (temporary) database file.

mod common;

use std::collections::BTreeMap;

use boxwood_store::*;
use serde_json::json;
use uuid::Uuid;

fn image(ns: &str, created: i64) -> ImageRecord {
    ImageRecord { env: BTreeMap::from([("PATH".into(), "/bin".into())]), ..common::image(ns, created) }
}

fn op(ns: &str, created: i64) -> OperationRecord {
    OperationRecord { created_at_us: created, metadata: json!({"command": "true"}), ..common::operation(ns, "PENDING") }
}

fn ev(op: Uuid, id: i64, spid: Option<i64>, kind: &str) -> EventRecord {
    EventRecord { operation_uuid: op, id, ts_us: id, spid, kind: kind.into(), data: json!({"n": id}) }
}

#[tokio::test]
async fn images_tags_and_shadowing() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
    let public = image("public", 1);
    let own = image("ns1", 2);
    let other = image("ns2", 3);
    for i in [&public, &own, &other] {
        store.insert_image(i).await.unwrap();
    }
    store.set_tag("public", "busybox:latest", public.uuid, 1).await.unwrap();
    store.set_tag("public", "alpine:3", public.uuid, 1).await.unwrap();
    store.set_tag("ns1", "busybox:latest", own.uuid, 2).await.unwrap();
    store.set_tag("ns2", "secret:1", other.uuid, 3).await.unwrap();

    let visible = vec!["ns1".to_string(), "public".to_string()];
    let f = ImageFilter { namespaces: visible.clone(), tagged: true, limit: 100, ..Default::default() };
    let rows = store.list_images(&f).await.unwrap();
    let got: Vec<_> = rows.iter().map(|r| (r.image.uuid, r.tag.clone().unwrap())).collect();
    assert_eq!(
        got,
        vec![(own.uuid, "busybox:latest".into()), (public.uuid, "alpine:3".into())],
        "own tag shadows public"
    );

    let f = ImageFilter { namespaces: visible.clone(), limit: 100, ..Default::default() };
    assert_eq!(store.list_images(&f).await.unwrap().len(), 2, "untagged listing shows visible images once per tag");

    let f = ImageFilter { namespaces: visible, tag_prefix: Some("alp".into()), limit: 100, ..Default::default() };
    assert_eq!(store.list_images(&f).await.unwrap().len(), 1);

    // moving a tag takes it from its previous holder
    store.set_tag("ns1", "busybox:latest", public.uuid, 4).await.unwrap();
    assert_eq!(store.resolve_tag("ns1", "busybox:latest").await.unwrap(), Some(public.uuid));
    assert_eq!(store.resolve_tag("ns1", "secret:1").await.unwrap(), None);
    assert_eq!(store.get_image(own.uuid).await.unwrap().unwrap(), own);
}

#[tokio::test]
async fn operations_and_event_log_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let mut o = op("ns1", 10);
    {
        let store = SqliteStore::open(&path).await.unwrap();
        store.insert_operation(&o).await.unwrap();
        store.insert_operation(&op("ns2", 11)).await.unwrap();
        for (id, spid, kind) in [(0, Some(0), "init"), (1, Some(1), "spawn"), (2, Some(1), "stdout")] {
            store.append_event(&ev(o.uuid, id, spid, kind)).await.unwrap();
        }
        assert_eq!(store.unfinished_operations().await.unwrap().len(), 2);
        o.status = "SUCCESS".into();
        o.result = Some(json!({"stdout": {"value": "hi"}}));
        store.finish_operation(&o, &ev(o.uuid, 3, None, "completion")).await.unwrap();
        // a duplicate event id is refused rather than silently reordering the log
        assert!(store.append_event(&ev(o.uuid, 3, None, "completion")).await.is_err());
    }
    let store = SqliteStore::open(&path).await.unwrap();
    assert_eq!(store.get_operation(o.uuid).await.unwrap().unwrap(), o);
    assert_eq!(store.unfinished_operations().await.unwrap().len(), 1);
    let all = store.events(o.uuid, None, None, 100).await.unwrap();
    assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    let after = store.events(o.uuid, Some(1), Some(1), 100).await.unwrap();
    assert_eq!(after.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), vec!["stdout"]);
    assert_eq!(store.last_event_id(o.uuid).await.unwrap(), Some(3));
    let f =
        OperationFilter { namespace: "ns1".into(), status: Some("SUCCESS".into()), limit: 10, ..Default::default() };
    assert_eq!(store.list_operations(&f).await.unwrap().len(), 1);
}

#[tokio::test]
async fn files_tokens_tag_removal_and_lineage() {
    let store = SqliteStore::in_memory().await.unwrap();
    let sha = "a".repeat(64);
    let first = store.upsert_file("ns1", &sha, 5, 100).await.unwrap();
    let again = store.upsert_file("ns1", &sha, 5, 200).await.unwrap();
    assert_eq!(first.uuid, again.uuid, "same content, same uuid");
    assert_eq!((again.created_at_us, again.updated_at_us), (100, 200));
    let other_ns = store.upsert_file("ns2", &sha, 5, 300).await.unwrap();
    assert_ne!(other_ns.uuid, first.uuid, "files are per namespace");
    assert_eq!(store.file_by_uuid(first.uuid).await.unwrap().unwrap().namespace, "ns1");
    assert!(store.file_by_sha256("ns3", &sha).await.unwrap().is_none());
    let f = FileFilter { namespace: "ns1".into(), limit: 10, ..Default::default() };
    assert_eq!(store.list_files(&f).await.unwrap().len(), 1);
    // Past one statement's chunk: ns1's own upload is there, ns2's and unknown ones are not.
    let unknown: Vec<Uuid> = (0..2500).map(|_| Uuid::new_v4()).collect();
    let mut asked = vec![unknown[0], first.uuid, other_ns.uuid];
    asked.extend(&unknown[1..]);
    let mut expected = vec![unknown[0], other_ns.uuid];
    expected.extend(&unknown[1..]);
    assert_eq!(store.files_not_in("ns1", &asked).await.unwrap(), expected);
    assert!(store.files_not_in("ns1", &[first.uuid]).await.unwrap().is_empty());
    assert!(store.files_not_in("ns1", &[]).await.unwrap().is_empty());

    let t = TokenRecord {
        sha256: "b".repeat(64),
        uuid: Uuid::new_v4(),
        namespace: "ns1".into(),
        permissions: vec!["list".into()],
        description: Some("ci".into()),
        created_at_us: 1,
        revoked_at_us: None,
    };
    store.insert_token(&t).await.unwrap();
    assert_eq!(store.active_token(&t.sha256).await.unwrap(), Some(t.clone()));
    assert!(store.revoke_token(t.uuid, 2).await.unwrap());
    assert!(!store.revoke_token(t.uuid, 3).await.unwrap());
    assert!(store.active_token(&t.sha256).await.unwrap().is_none());
    assert_eq!(store.list_tokens().await.unwrap()[0].revoked_at_us, Some(2));

    let parent = image("ns1", 1);
    let mut child = image("ns1", 2);
    child.parent_uuid = Some(parent.uuid);
    store.insert_image(&parent).await.unwrap();
    store.insert_image(&child).await.unwrap();
    assert_eq!(store.children_of(parent.uuid).await.unwrap(), vec![child.clone()]);
    store.set_image_layers(child.uuid, &["sha256:bb".into(), "sha256:aa".into()]).await.unwrap();
    assert_eq!(store.get_image(child.uuid).await.unwrap().unwrap().layers.len(), 2);
    store.set_tag("ns1", "x:1", child.uuid, 1).await.unwrap();
    store.set_tag("ns1", "x:2", child.uuid, 1).await.unwrap();
    assert!(!store.delete_tag("ns1", "x:1", parent.uuid).await.unwrap(), "tag names another image");
    assert!(store.delete_tag("ns1", "x:1", child.uuid).await.unwrap());
    assert_eq!(store.delete_tags_of("ns1", child.uuid).await.unwrap(), 1);
    assert!(store.resolve_tag("ns1", "x:2").await.unwrap().is_none());
}

#[tokio::test]
async fn usage_per_namespace_counts_each_layer_and_upload_once() {
    let store = SqliteStore::in_memory().await.unwrap();
    assert!(store.introduced_layers("ns1").await.unwrap().is_empty());
    assert_eq!(store.namespace_upload_bytes("ns1").await.unwrap(), 0);
    // The server's own base image (no operation) in public; a run of ns1 on it, a run on that
    // run's image, an import in ns1; ns2 runs on the same base.
    let mut base = image("public", 1);
    base.layers = vec!["sha256:aa".into()];
    let made = |ns: &str, parent: &ImageRecord, layers: &[&str]| ImageRecord {
        uuid: Uuid::new_v4(),
        namespace: ns.into(),
        parent_uuid: Some(parent.uuid),
        operation_uuid: Some(Uuid::new_v4()),
        layers: layers.iter().map(|l| l.to_string()).collect(),
        ..image(ns, 2)
    };
    let a = made("ns1", &base, &["sha256:bb", "sha256:aa"]);
    let b = made("ns1", &a, &["sha256:cc", "sha256:bb", "sha256:aa"]);
    let compacted = made("ns1", &a, &["sha256:ee", "sha256:aa"]);
    let imported = ImageRecord { parent_uuid: None, layers: vec!["sha256:ff".into()], ..made("ns1", &base, &[]) };
    let other = made("ns2", &base, &["sha256:dd", "sha256:aa"]);
    for i in [&base, &a, &b, &compacted, &imported, &other] {
        store.insert_image(i).await.unwrap();
    }
    let ns1 = store.introduced_layers("ns1").await.unwrap();
    assert_eq!(ns1, ["sha256:bb", "sha256:cc", "sha256:ee", "sha256:ff"], "never the base layer");
    assert_eq!(store.introduced_layers("ns2").await.unwrap(), ["sha256:dd"]);
    assert!(store.introduced_layers("public").await.unwrap().is_empty(), "the server's base image counts for nobody");

    store.upsert_file("ns1", &"a".repeat(64), 5, 100).await.unwrap();
    store.upsert_file("ns1", &"a".repeat(64), 5, 200).await.unwrap();
    store.upsert_file("ns1", &"b".repeat(64), 7, 200).await.unwrap();
    store.upsert_file("ns2", &"a".repeat(64), 5, 300).await.unwrap();
    assert_eq!(store.namespace_upload_bytes("ns1").await.unwrap(), 12, "the same content twice counts once");
    assert_eq!(store.namespace_upload_bytes("ns2").await.unwrap(), 5);
}

/// Store failures are told apart by what they mean for the caller: a full database is
/// `Full`, a write lock held elsewhere `Unavailable`, a broken constraint `Broken`.
#[tokio::test]
async fn failures_say_full_unavailable_or_broken() {
    use sqlx::{ConnectOptions as _, Connection as _, Executor as _};
    let dir = tempfile::tempdir().unwrap();
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(dir.path().join("t.db"))
        .create_if_missing(true)
        .busy_timeout(std::time::Duration::ZERO);
    let mut a = opts.connect().await.unwrap();
    a.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)").await.unwrap();

    let broken = a.execute("INSERT INTO t (k) VALUES (1)").await.unwrap_err();
    assert_eq!(StoreError::from(broken).condition(), Condition::Broken);

    // A database capped at a few pages fills up like a full disk (SQLITE_FULL).
    a.execute("PRAGMA max_page_count = 4").await.unwrap();
    let full = a.execute(sqlx::query("INSERT INTO t (v) VALUES (?)").bind("x".repeat(64 << 10))).await.unwrap_err();
    assert_eq!(StoreError::from(full).condition(), Condition::Full);

    let mut b = opts.connect().await.unwrap();
    let mut tx = a.begin().await.unwrap();
    tx.execute("INSERT INTO t (v) VALUES ('held')").await.unwrap();
    let busy = b.execute("INSERT INTO t (v) VALUES ('blocked')").await.unwrap_err();
    assert_eq!(StoreError::from(busy).condition(), Condition::Unavailable);
    tx.rollback().await.unwrap();
    b.execute("INSERT INTO t (v) VALUES ('free again')").await.unwrap();
}

/// The readiness probe's write commits again and again (one row, rewritten in place).
#[tokio::test]
async fn the_probe_write_commits_repeatedly() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
    for t in 0..3 {
        store.probe_write(t).await.unwrap();
    }
    store.close().await;
}
