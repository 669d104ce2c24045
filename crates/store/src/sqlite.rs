//! [`Store`] on an SQLite file (WAL journal, `synchronous=FULL`: a write the API
//! acknowledged survives a crash of the server or the machine).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Connection as _, QueryBuilder, Row, Sqlite};
use uuid::Uuid;

mod directory_states;
mod retention;

use crate::records::EnvMap;
use crate::{
    EventRecord, FileFilter, FileRecord, ImageFilter, ImageListing, ImageRecord, OperationFilter, OperationRecord,
    Store, StoreError, StoreResult, TagRecord, TokenRecord,
};

/// The embedded store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pub(crate) pool: SqlitePool,
}

impl SqliteStore {
    /// Closes every connection (the last one checkpoints the WAL), waiting for them.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Opens (creating if needed) the database file and applies pending migrations.
    pub async fn open(path: &Path) -> StoreResult<Self> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        Self::with_options(opts, 8).await
    }

    /// A private in-memory database, for tests.
    pub async fn in_memory() -> StoreResult<Self> {
        let opts = SqliteConnectOptions::from_str("sqlite::memory:")?.foreign_keys(true);
        // One connection: every connection to ":memory:" is a separate database.
        Self::with_options(opts, 1).await
    }

    async fn with_options(opts: SqliteConnectOptions, max: u32) -> StoreResult<Self> {
        let pool = SqlitePoolOptions::new()
            .max_connections(max)
            .after_release(|conn, _| Box::pin(reusable(conn)))
            .connect_with(opts)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool })
    }
}

/// Whether a connection handed back to the pool may serve again. A failed statement or commit
/// on a full disk (SQLITE_FULL, IOERR) makes SQLite roll the transaction back by itself; the
/// ROLLBACK sqlx then sends fails, and sqlx goes on counting the connection inside a
/// transaction. Its next transaction would be a SAVEPOINT, whose failure rolls back only to
/// the savepoint and leaves a real transaction open: the write lock held, every other writer
/// "database is locked", this connection reading an old snapshot. Such a connection is closed
/// (which ends whatever SQLite still holds) and the pool opens a fresh one.
async fn reusable(conn: &mut SqliteConnection) -> Result<bool, sqlx::Error> {
    // Lets the rollback a dropped transaction queued run first, so only a connection it left
    // inside a transaction is counted as one.
    conn.ping().await?;
    let clean = !conn.is_in_transaction();
    if !clean {
        tracing::warn!("closing a database connection a failed transaction left open");
    }
    Ok(clean)
}

fn uuid_col(row: &SqliteRow, col: &'static str) -> StoreResult<Uuid> {
    let s: String = row.try_get(col)?;
    Uuid::parse_str(&s).map_err(|_| StoreError::Corrupt { what: col, key: s })
}

fn opt_uuid_col(row: &SqliteRow, col: &'static str) -> StoreResult<Option<Uuid>> {
    let s: Option<String> = row.try_get(col)?;
    s.map(|s| Uuid::parse_str(&s).map_err(|_| StoreError::Corrupt { what: col, key: s })).transpose()
}

fn json_col<T: serde::de::DeserializeOwned>(row: &SqliteRow, col: &'static str) -> StoreResult<T> {
    let s: String = row.try_get(col)?;
    serde_json::from_str(&s).map_err(|_| StoreError::Corrupt { what: col, key: s })
}

fn image_from_row(row: &SqliteRow) -> StoreResult<ImageRecord> {
    Ok(ImageRecord {
        uuid: uuid_col(row, "uuid")?,
        namespace: row.try_get("namespace")?,
        parent_uuid: opt_uuid_col(row, "parent_uuid")?,
        operation_uuid: opt_uuid_col(row, "operation_uuid")?,
        layers: json_col(row, "layers")?,
        env: json_col::<EnvMap>(row, "env")?,
        workdir: row.try_get("workdir")?,
        size_bytes: row.try_get("size_bytes")?,
        created_at_us: row.try_get("created_at")?,
    })
}

fn file_from_row(row: &SqliteRow) -> StoreResult<FileRecord> {
    Ok(FileRecord {
        uuid: uuid_col(row, "uuid")?,
        namespace: row.try_get("namespace")?,
        sha256: row.try_get("sha256")?,
        size: row.try_get("size")?,
        created_at_us: row.try_get("created_at")?,
        updated_at_us: row.try_get("updated_at")?,
    })
}

fn token_from_row(row: &SqliteRow) -> StoreResult<TokenRecord> {
    Ok(TokenRecord {
        sha256: row.try_get("sha256")?,
        uuid: uuid_col(row, "uuid")?,
        namespace: row.try_get("namespace")?,
        permissions: json_col(row, "permissions")?,
        description: row.try_get("description")?,
        created_at_us: row.try_get("created_at")?,
        revoked_at_us: row.try_get("revoked_at")?,
    })
}

fn operation_from_row(row: &SqliteRow) -> StoreResult<OperationRecord> {
    let result: Option<String> = row.try_get("result")?;
    let result = result
        .map(|s| serde_json::from_str(&s).map_err(|_| StoreError::Corrupt { what: "result", key: s }))
        .transpose()?;
    Ok(OperationRecord {
        uuid: uuid_col(row, "uuid")?,
        namespace: row.try_get("namespace")?,
        kind: row.try_get("kind")?,
        status: row.try_get("status")?,
        error: row.try_get("error")?,
        created_at_us: row.try_get("created_at")?,
        started_at_us: row.try_get("started_at")?,
        finished_at_us: row.try_get("finished_at")?,
        image_uuid: opt_uuid_col(row, "image_uuid")?,
        result_image_uuid: opt_uuid_col(row, "result_image_uuid")?,
        result_tag: row.try_get("result_tag")?,
        image_size: row.try_get("image_size")?,
        consumed_cpu: row.try_get("consumed_cpu")?,
        consumed_memory: row.try_get("consumed_memory")?,
        metadata: json_col(row, "metadata")?,
        result,
    })
}

fn event_from_row(row: &SqliteRow) -> StoreResult<EventRecord> {
    Ok(EventRecord {
        operation_uuid: uuid_col(row, "operation_uuid")?,
        id: row.try_get("id")?,
        ts_us: row.try_get("ts")?,
        spid: row.try_get("spid")?,
        kind: row.try_get("type")?,
        data: json_col(row, "data")?,
    })
}

/// ` AND <col> >= since AND <col> <= until` (each when given).
fn push_time_range(q: &mut QueryBuilder<Sqlite>, col: &str, since: Option<i64>, until: Option<i64>) {
    if let Some(since) = since {
        q.push(format!(" AND {col} >= ")).push_bind(since);
    }
    if let Some(until) = until {
        q.push(format!(" AND {col} <= ")).push_bind(until);
    }
}

/// ` ORDER BY <order> LIMIT … OFFSET …`.
fn push_page(q: &mut QueryBuilder<Sqlite>, order: &str, limit: i64, offset: i64) {
    q.push(format!(" ORDER BY {order} LIMIT ")).push_bind(limit).push(" OFFSET ").push_bind(offset);
}

async fn write_operation<'e, E>(exec: E, op: &OperationRecord) -> StoreResult<()>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    sqlx::query(
        "UPDATE operations SET status = ?, error = ?, started_at = ?, finished_at = ?, image_uuid = ?, \
         result_image_uuid = ?, result_tag = ?, image_size = ?, consumed_cpu = ?, consumed_memory = ?, \
         metadata = ?, result = ? WHERE uuid = ?",
    )
    .bind(&op.status)
    .bind(&op.error)
    .bind(op.started_at_us)
    .bind(op.finished_at_us)
    .bind(op.image_uuid.map(|u| u.to_string()))
    .bind(op.result_image_uuid.map(|u| u.to_string()))
    .bind(&op.result_tag)
    .bind(op.image_size)
    .bind(op.consumed_cpu)
    .bind(op.consumed_memory)
    .bind(op.metadata.to_string())
    .bind(op.result.as_ref().map(|r| r.to_string()))
    .bind(op.uuid.to_string())
    .execute(exec)
    .await?;
    Ok(())
}

async fn insert_event<'e, E>(exec: E, ev: &EventRecord) -> StoreResult<()>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    sqlx::query("INSERT INTO events (operation_uuid, id, ts, spid, type, data) VALUES (?, ?, ?, ?, ?, ?)")
        .bind(ev.operation_uuid.to_string())
        .bind(ev.id)
        .bind(ev.ts_us)
        .bind(ev.spid)
        .bind(&ev.kind)
        .bind(ev.data.to_string())
        .execute(exec)
        .await?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_image(&self, image: &ImageRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO images (uuid, namespace, parent_uuid, operation_uuid, layers, env, workdir, size_bytes, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(image.uuid.to_string())
        .bind(&image.namespace)
        .bind(image.parent_uuid.map(|u| u.to_string()))
        .bind(image.operation_uuid.map(|u| u.to_string()))
        .bind(serde_json::Value::from(image.layers.clone()).to_string())
        .bind(serde_json::to_value(&image.env).unwrap_or_default().to_string())
        .bind(&image.workdir)
        .bind(image.size_bytes)
        .bind(image.created_at_us)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_image(&self, uuid: Uuid) -> StoreResult<Option<ImageRecord>> {
        let row = sqlx::query("SELECT * FROM images WHERE uuid = ?")
            .bind(uuid.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(image_from_row).transpose()
    }

    async fn set_tag(&self, namespace: &str, tag: &str, image: Uuid, now_us: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO tags (namespace, tag, image_uuid, created_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (namespace, tag) DO UPDATE SET image_uuid = excluded.image_uuid, created_at = excluded.created_at",
        )
        .bind(namespace)
        .bind(tag)
        .bind(image.to_string())
        .bind(now_us)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn resolve_tag(&self, namespace: &str, tag: &str) -> StoreResult<Option<Uuid>> {
        let row = sqlx::query("SELECT image_uuid FROM tags WHERE namespace = ? AND tag = ?")
            .bind(namespace)
            .bind(tag)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(|r| uuid_col(r, "image_uuid")).transpose()
    }

    async fn tags_of(&self, image: Uuid, namespaces: &[String]) -> StoreResult<Vec<TagRecord>> {
        let mut q = QueryBuilder::<Sqlite>::new("SELECT namespace, tag, image_uuid FROM tags WHERE image_uuid = ");
        q.push_bind(image.to_string()).push(" AND namespace IN (");
        let mut sep = q.separated(", ");
        for ns in namespaces {
            sep.push_bind(ns);
        }
        q.push(") ORDER BY tag");
        let rows = q.build().fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(TagRecord {
                    namespace: r.try_get("namespace")?,
                    tag: r.try_get("tag")?,
                    image_uuid: uuid_col(r, "image_uuid")?,
                })
            })
            .collect()
    }

    async fn list_images(&self, f: &ImageFilter) -> StoreResult<Vec<ImageListing>> {
        // Tags are visible from the caller's namespaces; a namespace's own tag shadows a
        // public tag of the same name (the first namespace in the list is the caller's).
        let mut q = QueryBuilder::<Sqlite>::new("SELECT i.*, t.tag AS tag FROM images i ");
        q.push(if f.tagged || f.tag_prefix.is_some() { "JOIN" } else { "LEFT JOIN" });
        q.push(" tags t ON t.image_uuid = i.uuid AND t.namespace IN (");
        let mut sep = q.separated(", ");
        for ns in &f.namespaces {
            sep.push_bind(ns);
        }
        q.push(")");
        if let Some(own) = f.namespaces.first() {
            q.push(" AND NOT (t.namespace <> ")
                .push_bind(own)
                .push(" AND EXISTS (SELECT 1 FROM tags o WHERE o.namespace = ")
                .push_bind(own)
                .push(" AND o.tag = t.tag))");
        }
        q.push(" WHERE i.namespace IN (");
        let mut sep = q.separated(", ");
        for ns in &f.namespaces {
            sep.push_bind(ns);
        }
        q.push(")");
        if let Some(prefix) = &f.tag_prefix {
            q.push(" AND substr(t.tag, 1, length(").push_bind(prefix).push(")) = ").push_bind(prefix);
        }
        if let Some(uuid) = f.uuid {
            q.push(" AND i.uuid = ").push_bind(uuid.to_string());
        }
        if let Some(since) = f.since_us {
            q.push(" AND i.created_at >= ").push_bind(since);
        }
        if let Some(until) = f.until_us {
            q.push(" AND i.created_at <= ").push_bind(until);
        }
        q.push(" ORDER BY i.created_at DESC, i.uuid, t.tag LIMIT ")
            .push_bind(f.limit)
            .push(" OFFSET ")
            .push_bind(f.offset);
        let rows = q.build().fetch_all(&self.pool).await?;
        rows.iter().map(|r| Ok(ImageListing { image: image_from_row(r)?, tag: r.try_get("tag")? })).collect()
    }

    async fn delete_tag(&self, namespace: &str, tag: &str, image: Uuid) -> StoreResult<bool> {
        let r = sqlx::query("DELETE FROM tags WHERE namespace = ? AND tag = ? AND image_uuid = ?")
            .bind(namespace)
            .bind(tag)
            .bind(image.to_string())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn delete_tags_of(&self, namespace: &str, image: Uuid) -> StoreResult<u64> {
        let r = sqlx::query("DELETE FROM tags WHERE namespace = ? AND image_uuid = ?")
            .bind(namespace)
            .bind(image.to_string())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    async fn children_of(&self, image: Uuid) -> StoreResult<Vec<ImageRecord>> {
        let rows = sqlx::query("SELECT * FROM images WHERE parent_uuid = ? ORDER BY created_at, uuid")
            .bind(image.to_string())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(image_from_row).collect()
    }

    async fn set_image_layers(&self, image: Uuid, layers: &[String]) -> StoreResult<()> {
        sqlx::query("UPDATE images SET layers = ? WHERE uuid = ?")
            .bind(serde_json::Value::from(layers.to_vec()).to_string())
            .bind(image.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn introduced_layers(&self, namespace: &str) -> StoreResult<Vec<String>> {
        let rows = sqlx::query(
            "SELECT i.layers AS layers, p.layers AS parent_layers FROM images i \
             LEFT JOIN images p ON p.uuid = i.parent_uuid \
             WHERE i.namespace = ? AND i.operation_uuid IS NOT NULL",
        )
        .bind(namespace)
        .fetch_all(&self.pool)
        .await?;
        let mut digests = std::collections::BTreeSet::new();
        for row in &rows {
            let parent: Vec<String> = match row.try_get::<Option<String>, _>("parent_layers")? {
                Some(s) => serde_json::from_str(&s).map_err(|_| StoreError::Corrupt { what: "layers", key: s })?,
                None => Vec::new(),
            };
            digests.extend(json_col::<Vec<String>>(row, "layers")?.into_iter().filter(|d| !parent.contains(d)));
        }
        Ok(digests.into_iter().collect())
    }

    async fn referenced_layers(&self) -> StoreResult<std::collections::HashSet<String>> {
        let rows = sqlx::query("SELECT layers FROM images").fetch_all(&self.pool).await?;
        let mut digests = std::collections::HashSet::new();
        for row in &rows {
            digests.extend(json_col::<Vec<String>>(row, "layers")?);
        }
        Ok(digests)
    }

    async fn upsert_file(&self, namespace: &str, sha256: &str, size: i64, now_us: i64) -> StoreResult<FileRecord> {
        sqlx::query(
            "INSERT INTO files (uuid, namespace, sha256, size, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (namespace, sha256) DO UPDATE SET updated_at = excluded.updated_at",
        )
        .bind(Uuid::new_v4().to_string())
        .bind(namespace)
        .bind(sha256)
        .bind(size)
        .bind(now_us)
        .bind(now_us)
        .execute(&self.pool)
        .await?;
        self.file_by_sha256(namespace, sha256)
            .await?
            .ok_or_else(|| StoreError::Corrupt { what: "files", key: sha256.to_owned() })
    }

    async fn file_by_sha256(&self, namespace: &str, sha256: &str) -> StoreResult<Option<FileRecord>> {
        let row = sqlx::query("SELECT * FROM files WHERE namespace = ? AND sha256 = ?")
            .bind(namespace)
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(file_from_row).transpose()
    }

    async fn file_by_uuid(&self, uuid: Uuid) -> StoreResult<Option<FileRecord>> {
        let row =
            sqlx::query("SELECT * FROM files WHERE uuid = ?").bind(uuid.to_string()).fetch_optional(&self.pool).await?;
        row.as_ref().map(file_from_row).transpose()
    }

    async fn files_not_in(&self, namespace: &str, uuids: &[Uuid]) -> StoreResult<Vec<Uuid>> {
        // Well under SQLite's 32 766 bound parameters per statement.
        const CHUNK: usize = 1000;
        let mut present = std::collections::HashSet::with_capacity(uuids.len());
        for chunk in uuids.chunks(CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new("SELECT uuid FROM files WHERE namespace = ");
            q.push_bind(namespace).push(" AND uuid IN (");
            let mut sep = q.separated(", ");
            for uuid in chunk {
                sep.push_bind(uuid.to_string());
            }
            q.push(")");
            let found: Vec<String> = q.build_query_scalar().fetch_all(&self.pool).await?;
            present.extend(found);
        }
        Ok(uuids.iter().filter(|u| !present.contains(&u.to_string())).copied().collect())
    }

    async fn list_files(&self, f: &FileFilter) -> StoreResult<Vec<FileRecord>> {
        let mut q = QueryBuilder::<Sqlite>::new("SELECT * FROM files WHERE namespace = ");
        q.push_bind(&f.namespace);
        push_time_range(&mut q, "created_at", f.since_us, f.until_us);
        push_page(&mut q, "created_at DESC, uuid", f.limit, f.offset);
        let rows = q.build().fetch_all(&self.pool).await?;
        rows.iter().map(file_from_row).collect()
    }

    async fn namespace_upload_bytes(&self, namespace: &str) -> StoreResult<u64> {
        let total: i64 =
            sqlx::query_scalar("SELECT COALESCE(SUM(size), 0) FROM files WHERE namespace = ? AND size > 0")
                .bind(namespace)
                .fetch_one(&self.pool)
                .await?;
        Ok(u64::try_from(total).unwrap_or(0))
    }

    async fn insert_token(&self, t: &TokenRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO tokens (sha256, uuid, namespace, permissions, description, created_at, revoked_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&t.sha256)
        .bind(t.uuid.to_string())
        .bind(&t.namespace)
        .bind(serde_json::Value::from(t.permissions.clone()).to_string())
        .bind(&t.description)
        .bind(t.created_at_us)
        .bind(t.revoked_at_us)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn active_token(&self, sha256: &str) -> StoreResult<Option<TokenRecord>> {
        let row = sqlx::query("SELECT * FROM tokens WHERE sha256 = ? AND revoked_at IS NULL")
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn list_tokens(&self) -> StoreResult<Vec<TokenRecord>> {
        let rows = sqlx::query("SELECT * FROM tokens ORDER BY created_at").fetch_all(&self.pool).await?;
        rows.iter().map(token_from_row).collect()
    }

    async fn revoke_token(&self, uuid: Uuid, now_us: i64) -> StoreResult<bool> {
        let r = sqlx::query("UPDATE tokens SET revoked_at = ? WHERE uuid = ? AND revoked_at IS NULL")
            .bind(now_us)
            .bind(uuid.to_string())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn insert_operation(&self, op: &OperationRecord) -> StoreResult<()> {
        // One transaction: the row never exists without its mutable columns.
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO operations (uuid, namespace, kind, status, created_at, metadata) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(op.uuid.to_string())
        .bind(&op.namespace)
        .bind(&op.kind)
        .bind(&op.status)
        .bind(op.created_at_us)
        .bind(op.metadata.to_string())
        .execute(&mut *tx)
        .await?;
        write_operation(&mut *tx, op).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn update_operation(&self, op: &OperationRecord) -> StoreResult<()> {
        write_operation(&self.pool, op).await
    }

    async fn finish_operation(&self, op: &OperationRecord, last_event: &EventRecord) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        write_operation(&mut *tx, op).await?;
        insert_event(&mut *tx, last_event).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_operation(&self, uuid: Uuid) -> StoreResult<Option<OperationRecord>> {
        let row = sqlx::query("SELECT * FROM operations WHERE uuid = ?")
            .bind(uuid.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(operation_from_row).transpose()
    }

    async fn list_operations(&self, f: &OperationFilter) -> StoreResult<Vec<OperationRecord>> {
        let mut q = QueryBuilder::<Sqlite>::new("SELECT * FROM operations WHERE namespace = ");
        q.push_bind(&f.namespace);
        if let Some(status) = &f.status {
            q.push(" AND status = ").push_bind(status);
        }
        if let Some(kind) = &f.kind {
            q.push(" AND kind = ").push_bind(kind);
        }
        push_time_range(&mut q, "created_at", f.since_us, f.until_us);
        push_page(&mut q, "created_at DESC, uuid", f.limit, f.offset);
        let rows = q.build().fetch_all(&self.pool).await?;
        rows.iter().map(operation_from_row).collect()
    }

    async fn unfinished_operations(&self) -> StoreResult<Vec<OperationRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM operations WHERE status NOT IN ('SUCCESS', 'FAILED', 'CANCELLED') ORDER BY created_at",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(operation_from_row).collect()
    }

    async fn append_event(&self, event: &EventRecord) -> StoreResult<()> {
        insert_event(&self.pool, event).await
    }

    async fn events(
        &self,
        operation: Uuid,
        after: Option<i64>,
        spid: Option<i64>,
        limit: i64,
    ) -> StoreResult<Vec<EventRecord>> {
        let mut q = QueryBuilder::<Sqlite>::new("SELECT * FROM events WHERE operation_uuid = ");
        q.push_bind(operation.to_string());
        if let Some(after) = after {
            q.push(" AND id > ").push_bind(after);
        }
        if let Some(spid) = spid {
            q.push(" AND spid = ").push_bind(spid);
        }
        q.push(" ORDER BY id LIMIT ").push_bind(limit);
        let rows = q.build().fetch_all(&self.pool).await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn last_event_id(&self, operation: Uuid) -> StoreResult<Option<i64>> {
        let row = sqlx::query("SELECT MAX(id) AS id FROM events WHERE operation_uuid = ?")
            .bind(operation.to_string())
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("id")?)
    }

    async fn size_bytes(&self) -> StoreResult<u64> {
        let row = sqlx::query("SELECT page_count * page_size AS n FROM pragma_page_count(), pragma_page_size()")
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(row.try_get::<i64, _>("n")?).unwrap_or(0))
    }

    async fn probe_write(&self, now_us: i64) -> StoreResult<()> {
        sqlx::query("INSERT INTO health (id, checked_at) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at")
            .bind(now_us)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
