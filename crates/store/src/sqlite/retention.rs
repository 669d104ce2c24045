//! [`Retention`] on SQLite. Every removal re-checks its conditions inside its transaction,
//! so a run that starts on an image (it touches it first) or a tag set a moment before
//! keeps the image, whatever the collector listed earlier.

use async_trait::async_trait;
use sqlx::Row;
use uuid::Uuid;

use super::{SqliteStore, file_from_row, image_from_row, opt_uuid_col, uuid_col};
use crate::retention::{ExpiredOperation, NamespaceCounts, RemovedImage, Retention};
use crate::{FileRecord, ImageRecord, StoreResult};

// SQL fragments as macros: sqlx takes only static query text, which `concat!` keeps.

/// Statuses no operation leaves.
macro_rules! terminal {
    () => {
        "('SUCCESS', 'FAILED', 'CANCELLED')"
    };
}

/// The conditions under which image `i` may be removed (`?` is the cutoff).
macro_rules! image_expired {
    () => {
        concat!(
            "NOT EXISTS (SELECT 1 FROM tags t WHERE t.image_uuid = i.uuid) ",
            "AND NOT EXISTS (SELECT 1 FROM images c WHERE c.parent_uuid = i.uuid) ",
            "AND NOT EXISTS (SELECT 1 FROM operations o WHERE o.image_uuid = i.uuid AND o.status NOT IN ",
            terminal!(),
            ") AND MAX(i.created_at, COALESCE(i.used_at, 0)) < ?"
        )
    };
}

/// The conditions under which an upload may be removed (`?` is the cutoff): no unfinished
/// operation names it (a run's `files`, an import's source; uuids are unique, so finding the
/// text is finding the reference).
macro_rules! file_expired {
    () => {
        concat!(
            "NOT EXISTS (SELECT 1 FROM operations o WHERE o.status NOT IN ",
            terminal!(),
            " AND instr(o.metadata, files.uuid) > 0) ",
            "AND MAX(files.created_at, files.updated_at, COALESCE(files.used_at, 0)) < ?"
        )
    };
}

fn removed_from_row(row: &sqlx::sqlite::SqliteRow) -> StoreResult<RemovedImage> {
    Ok(RemovedImage {
        uuid: uuid_col(row, "uuid")?,
        namespace: row.try_get("namespace")?,
        parent_uuid: opt_uuid_col(row, "parent_uuid")?,
        operation_uuid: opt_uuid_col(row, "operation_uuid")?,
        size_bytes: row.try_get("size_bytes")?,
        created_at_us: row.try_get("created_at")?,
        removed_at_us: row.try_get("removed_at")?,
        reason: row.try_get("reason")?,
    })
}

fn count(row: &sqlx::sqlite::SqliteRow, col: &str) -> StoreResult<u64> {
    Ok(u64::try_from(row.try_get::<i64, _>(col)?).unwrap_or(0))
}

#[async_trait]
impl Retention for SqliteStore {
    async fn touch_image(&self, uuid: Uuid, now_us: i64) -> StoreResult<bool> {
        let r = sqlx::query("UPDATE images SET used_at = ? WHERE uuid = ?")
            .bind(now_us)
            .bind(uuid.to_string())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn touch_file(&self, uuid: Uuid, now_us: i64) -> StoreResult<bool> {
        let r = sqlx::query("UPDATE files SET used_at = ? WHERE uuid = ?")
            .bind(now_us)
            .bind(uuid.to_string())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn expired_images(&self, cutoff_us: i64, limit: i64) -> StoreResult<Vec<ImageRecord>> {
        let sql = concat!("SELECT * FROM images i WHERE ", image_expired!(), " ORDER BY i.created_at, i.uuid LIMIT ?");
        let rows = sqlx::query(sql).bind(cutoff_us).bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(image_from_row).collect()
    }

    async fn remove_image(&self, image: Uuid, cutoff_us: i64, now_us: i64, reason: &str) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let record = concat!(
            "INSERT INTO removed_images (uuid, namespace, parent_uuid, operation_uuid, size_bytes, created_at, ",
            "removed_at, reason) ",
            "SELECT i.uuid, i.namespace, i.parent_uuid, i.operation_uuid, i.size_bytes, i.created_at, ?, ? ",
            "FROM images i WHERE i.uuid = ? AND ",
            image_expired!()
        );
        let r = sqlx::query(record)
            .bind(now_us)
            .bind(reason)
            .bind(image.to_string())
            .bind(cutoff_us)
            .execute(&mut *tx)
            .await?;
        if r.rows_affected() == 0 {
            return Ok(false);
        }
        sqlx::query("DELETE FROM images WHERE uuid = ?").bind(image.to_string()).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn removed_image(&self, uuid: Uuid) -> StoreResult<Option<RemovedImage>> {
        let row = sqlx::query("SELECT * FROM removed_images WHERE uuid = ?")
            .bind(uuid.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(removed_from_row).transpose()
    }

    async fn removed_children(&self, image: Uuid) -> StoreResult<Vec<RemovedImage>> {
        let rows = sqlx::query("SELECT * FROM removed_images WHERE parent_uuid = ? ORDER BY created_at, uuid")
            .bind(image.to_string())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(removed_from_row).collect()
    }

    async fn expired_files(&self, cutoff_us: i64, limit: i64) -> StoreResult<Vec<FileRecord>> {
        let sql = concat!("SELECT * FROM files WHERE ", file_expired!(), " ORDER BY created_at, uuid LIMIT ?");
        let rows = sqlx::query(sql).bind(cutoff_us).bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(file_from_row).collect()
    }

    async fn remove_file(&self, uuid: Uuid, cutoff_us: i64) -> StoreResult<bool> {
        let sql = concat!("DELETE FROM files WHERE uuid = ? AND ", file_expired!());
        let r = sqlx::query(sql).bind(uuid.to_string()).bind(cutoff_us).execute(&self.pool).await?;
        Ok(r.rows_affected() == 1)
    }

    async fn content_referenced(&self, sha256: &str) -> StoreResult<bool> {
        let row = sqlx::query("SELECT EXISTS (SELECT 1 FROM files WHERE sha256 = ?) AS e")
            .bind(sha256)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<bool, _>("e")?)
    }

    async fn expired_operations(&self, cutoff_us: i64, limit: i64) -> StoreResult<Vec<ExpiredOperation>> {
        let sql = concat!(
            "SELECT o.uuid AS uuid, o.namespace AS namespace, ",
            "(SELECT COUNT(*) FROM events e WHERE e.operation_uuid = o.uuid) AS events ",
            "FROM operations o WHERE o.status IN ",
            terminal!(),
            " AND o.finished_at < ? ORDER BY o.finished_at, o.uuid LIMIT ?"
        );
        let rows = sqlx::query(sql).bind(cutoff_us).bind(limit).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                Ok(ExpiredOperation {
                    uuid: uuid_col(row, "uuid")?,
                    namespace: row.try_get("namespace")?,
                    events: count(row, "events")?,
                })
            })
            .collect()
    }

    async fn remove_operation(&self, uuid: Uuid, cutoff_us: i64) -> StoreResult<bool> {
        // Writes only, the first one taking the write lock: a deferred transaction that read
        // first and then writes fails at once with "database is locked" when another
        // connection committed in between (SQLite cannot move its snapshot, so the busy
        // timeout does not apply), which every run's events make likely.
        let mut tx = self.pool.begin().await?;
        let events = concat!(
            "DELETE FROM events WHERE operation_uuid = ?1 AND EXISTS (SELECT 1 FROM operations ",
            "WHERE uuid = ?1 AND status IN ",
            terminal!(),
            " AND finished_at < ?2)"
        );
        sqlx::query(events).bind(uuid.to_string()).bind(cutoff_us).execute(&mut *tx).await?;
        let operation =
            concat!("DELETE FROM operations WHERE uuid = ? AND status IN ", terminal!(), " AND finished_at < ?");
        let r = sqlx::query(operation).bind(uuid.to_string()).bind(cutoff_us).execute(&mut *tx).await?;
        if r.rows_affected() == 0 {
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn namespace_counts(&self) -> StoreResult<Vec<NamespaceCounts>> {
        let rows = sqlx::query(
            "WITH ns(namespace) AS ( \
                 SELECT namespace FROM images UNION SELECT namespace FROM files \
                 UNION SELECT namespace FROM operations) \
             SELECT ns.namespace AS namespace, \
               (SELECT COUNT(*) FROM images i WHERE i.namespace = ns.namespace) AS images, \
               (SELECT COUNT(*) FROM tags t WHERE t.namespace = ns.namespace) AS tags, \
               (SELECT COUNT(*) FROM files f WHERE f.namespace = ns.namespace) AS uploads, \
               (SELECT COALESCE(SUM(f.size), 0) FROM files f WHERE f.namespace = ns.namespace AND f.size > 0) AS upload_bytes, \
               (SELECT COUNT(*) FROM operations o WHERE o.namespace = ns.namespace) AS operations, \
               (SELECT COALESCE(SUM(LENGTH(e.data)), 0) FROM events e JOIN operations o \
                  ON o.uuid = e.operation_uuid WHERE o.namespace = ns.namespace) AS event_bytes \
             FROM ns ORDER BY ns.namespace",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(NamespaceCounts {
                    namespace: row.try_get("namespace")?,
                    images: count(row, "images")?,
                    tags: count(row, "tags")?,
                    uploads: count(row, "uploads")?,
                    upload_bytes: count(row, "upload_bytes")?,
                    operations: count(row, "operations")?,
                    event_bytes: count(row, "event_bytes")?,
                })
            })
            .collect()
    }
}
