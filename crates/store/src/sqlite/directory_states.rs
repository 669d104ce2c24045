//! [`DirectoryStates`] on SQLite.

use async_trait::async_trait;
use sqlx::Row;

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
        let id: i64 =
            sqlx::query_scalar("INSERT INTO directory_states (namespace, created_at) VALUES (?, ?) RETURNING id")
                .bind(namespace)
                .bind(created_at_us)
                .fetch_one(&mut *tx)
                .await?;
        for e in entries {
            sqlx::query("INSERT INTO directory_state_files (state_id, path, file_uuid, mode) VALUES (?, ?, ?, ?)")
                .bind(id)
                .bind(&e.path)
                .bind(e.file_uuid.to_string())
                .bind(i64::from(e.mode))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(id)
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
        assert_eq!((got.id, got.created_at_us, got.entries), (id, 7, entries));
        assert_eq!(store.directory_state("other", id).await.unwrap(), None, "another namespace's");
        let next = store.insert_directory_state("ns", 8, &[]).await.unwrap();
        assert!(next > id);
        assert_eq!(store.directory_state("ns", next).await.unwrap().unwrap().entries, []);
    }
}
