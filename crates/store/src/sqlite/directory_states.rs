//! [`DirectoryStates`] on SQLite.

use async_trait::async_trait;
use sqlx::{QueryBuilder, Row, Sqlite};

use super::{SqliteStore, uuid_col};
use crate::StoreResult;
use crate::directory_states::{DirectoryEntry, DirectoryStateRecord, DirectoryStates};

#[async_trait]
impl DirectoryStates for SqliteStore {
    async fn insert_directory_state(
        &self,
        namespace: &str,
        created_at_us: i64,
        entries: &[DirectoryEntry],
    ) -> StoreResult<i64> {
        let mut tx = self.pool.begin().await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO directory_states (namespace, created_at, used_at) VALUES (?, ?, ?) RETURNING id",
        )
        .bind(namespace)
        .bind(created_at_us)
        .bind(created_at_us)
        .fetch_one(&mut *tx)
        .await?;
        // Many rows per statement (4 parameters each, well under SQLite's 32 766).
        for chunk in entries.chunks(1000) {
            let mut q =
                QueryBuilder::<Sqlite>::new("INSERT INTO directory_state_files (state_id, path, file_uuid, mode) ");
            q.push_values(chunk, |mut row, e| {
                row.push_bind(id).push_bind(&e.path).push_bind(e.file_uuid.to_string()).push_bind(i64::from(e.mode));
            });
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(id)
    }

    async fn touch_directory_state(&self, namespace: &str, id: i64, now_us: i64) -> StoreResult<bool> {
        let done = sqlx::query("UPDATE directory_states SET used_at = MAX(used_at, ?) WHERE id = ? AND namespace = ?")
            .bind(now_us)
            .bind(id)
            .bind(namespace)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn expired_directory_states(&self, cutoff_us: i64) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM directory_states WHERE used_at < ?")
            .bind(cutoff_us)
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn remove_directory_states(&self, cutoff_us: i64, limit: i64) -> StoreResult<u64> {
        // Entries go with their state (ON DELETE CASCADE; the pool turns foreign keys on).
        let done = sqlx::query(
            "DELETE FROM directory_states WHERE id IN \
             (SELECT id FROM directory_states WHERE used_at < ? ORDER BY used_at LIMIT ?)",
        )
        .bind(cutoff_us)
        .bind(limit)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn directory_state(&self, namespace: &str, id: i64) -> StoreResult<Option<DirectoryStateRecord>> {
        let row = sqlx::query("SELECT created_at FROM directory_states WHERE id = ? AND namespace = ?")
            .bind(id)
            .bind(namespace)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let created_at_us: i64 = row.try_get("created_at")?;
        let rows =
            sqlx::query("SELECT path, file_uuid, mode FROM directory_state_files WHERE state_id = ? ORDER BY path")
                .bind(id)
                .fetch_all(&self.pool)
                .await?;
        let entries = rows
            .iter()
            .map(|r| {
                let mode: i64 = r.try_get("mode")?;
                Ok(DirectoryEntry {
                    path: r.try_get("path")?,
                    file_uuid: uuid_col(r, "file_uuid")?,
                    mode: u32::try_from(mode).unwrap_or(0o644) & 0o7777,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(Some(DirectoryStateRecord { id, namespace: namespace.to_owned(), created_at_us, entries }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn states_round_trip_and_stay_in_their_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).await.unwrap();
        let entries = vec![
            DirectoryEntry { path: "/app/a".into(), file_uuid: uuid::Uuid::new_v4(), mode: 0o755 },
            DirectoryEntry { path: "/app/b".into(), file_uuid: uuid::Uuid::new_v4(), mode: 0o644 },
        ];
        let id = store.insert_directory_state("ns", 7, &entries).await.unwrap();
        let got = store.directory_state("ns", id).await.unwrap().unwrap();
        assert_eq!((got.id, got.created_at_us, got.entries), (id, 7, entries.clone()));
        // A state past one insert statement keeps every entry, in path order.
        let many: Vec<DirectoryEntry> = (0..2500)
            .map(|i| DirectoryEntry { path: format!("/t/{i:05}"), file_uuid: uuid::Uuid::new_v4(), mode: 0o600 })
            .collect();
        let big = store.insert_directory_state("ns", 8, &many).await.unwrap();
        assert_eq!(store.directory_state("ns", big).await.unwrap().unwrap().entries, many);
        assert_eq!(store.directory_state("other", id).await.unwrap(), None, "another namespace's");
        let next = store.insert_directory_state("ns", 8, &[]).await.unwrap();
        assert!(next > id);
        assert_eq!(store.directory_state("ns", next).await.unwrap().unwrap().entries, []);
    }

    #[tokio::test]
    async fn states_unused_since_the_cutoff_go_with_their_entries() {
        let store = SqliteStore::in_memory().await.unwrap();
        let e = |p: &str| DirectoryEntry { path: p.into(), file_uuid: uuid::Uuid::new_v4(), mode: 0o644 };
        let old = store.insert_directory_state("ns", 10, &[e("/a")]).await.unwrap();
        let used = store.insert_directory_state("ns", 10, &[e("/b")]).await.unwrap();
        let new = store.insert_directory_state("ns", 500, &[e("/c")]).await.unwrap();
        assert!(store.touch_directory_state("ns", used, 600).await.unwrap());
        assert!(!store.touch_directory_state("other", old, 600).await.unwrap(), "not another namespace's");
        assert!(store.touch_directory_state("ns", used, 20).await.unwrap(), "an older use changes nothing");
        assert_eq!(store.expired_directory_states(100).await.unwrap(), 1);
        assert_eq!(store.remove_directory_states(100, 10).await.unwrap(), 1);
        assert_eq!(store.directory_state("ns", old).await.unwrap(), None);
        for kept in [used, new] {
            assert!(store.directory_state("ns", kept).await.unwrap().is_some(), "{kept}");
        }
        let orphans: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM directory_state_files WHERE state_id = ?")
            .bind(old)
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(orphans, 0, "the entries went too");
        assert_eq!(store.remove_directory_states(700, 1).await.unwrap(), 1, "at most `limit` a call");
    }
}
