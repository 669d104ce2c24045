//! Behaviour of the SQLite store against a real (temporary) database file.

use std::collections::BTreeMap;

use boxwood_store::*;
use serde_json::json;
use uuid::Uuid;

fn image(ns: &str, created: i64) -> ImageRecord {
    ImageRecord {
        uuid: Uuid::new_v4(),
        namespace: ns.into(),
        parent_uuid: None,
        operation_uuid: None,
        layers: vec!["sha256:aa".into()],
        env: BTreeMap::from([("PATH".into(), "/bin".into())]),
        workdir: None,
        size_bytes: 10,
        created_at_us: created,
    }
}

fn op(ns: &str, created: i64) -> OperationRecord {
    OperationRecord {
        uuid: Uuid::new_v4(),
        namespace: ns.into(),
        kind: "instance".into(),
        status: "PENDING".into(),
        error: None,
        created_at_us: created,
        started_at_us: None,
        finished_at_us: None,
        image_uuid: None,
        result_image_uuid: None,
        result_tag: None,
        image_size: None,
        consumed_cpu: None,
        consumed_memory: None,
        metadata: json!({"command": "true"}),
        result: None,
    }
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
