//! Records the store's test binaries build their cases from.
#![allow(dead_code)]

use std::collections::BTreeMap;

use boxwood_store::{ImageRecord, OperationRecord};
use serde_json::json;
use uuid::Uuid;

/// An instance operation of `namespace` in `status`, created at 1 µs, nothing else set.
pub fn operation(namespace: &str, status: &str) -> OperationRecord {
    OperationRecord {
        uuid: Uuid::new_v4(),
        namespace: namespace.into(),
        kind: "instance".into(),
        status: status.into(),
        error: None,
        created_at_us: 1,
        started_at_us: None,
        finished_at_us: None,
        image_uuid: None,
        result_image_uuid: None,
        result_tag: None,
        image_size: None,
        consumed_cpu: None,
        consumed_memory: None,
        metadata: json!({}),
        result: None,
    }
}

/// A root image of `namespace` on one layer, created at `created` µs.
pub fn image(namespace: &str, created: i64) -> ImageRecord {
    ImageRecord {
        uuid: Uuid::new_v4(),
        namespace: namespace.into(),
        parent_uuid: None,
        operation_uuid: None,
        layers: vec!["sha256:aa".into()],
        env: BTreeMap::new(),
        workdir: None,
        size_bytes: 10,
        created_at_us: created,
    }
}
