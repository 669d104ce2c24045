//! Uploaded files: content-addressed per namespace (the same bytes give the same uuid).

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use boxwood_blob::{BlobError, normalize_sha256};
use boxwood_store::{FileFilter, FileRecord};
use tokio::io::{AsyncRead, ReadBuf};

use super::{Page, Service};
use crate::auth::{Caller, Permission};
use crate::clock::{format_ts, now_us};
use crate::error::{CoreError, CoreResult, error_chain, out_of_space};
use crate::model::{FileResponse, FileView};
use crate::quota::UploadCharge;

fn view(f: &FileRecord) -> FileView {
    FileView {
        uuid: f.uuid.to_string(),
        sha256: f.sha256.clone(),
        size: f.size,
        created_at: format_ts(f.created_at_us),
        updated_at: format_ts(f.updated_at_us),
    }
}

/// An upload body whose bytes are claimed from the namespace's quota as they are read.
struct Charged<'a> {
    inner: &'a mut (dyn AsyncRead + Send + Unpin),
    charge: &'a UploadCharge,
}

impl AsyncRead for Charged<'_> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut *this.inner).poll_read(cx, buf))?;
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            this.charge.admit(n).map_err(std::io::Error::other)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl Service {
    /// `POST /files`: streams the body into the blob store; uploading is part of preparing a
    /// run, so it takes a spawn permission.
    pub async fn upload_file(
        &self,
        caller: &Caller,
        body: &mut (dyn AsyncRead + Send + Unpin),
    ) -> CoreResult<FileResponse> {
        if !caller.permissions.contains(&Permission::SpawnDisposable) {
            caller.require(Permission::Spawn)?;
        }
        let limit = self.inner.config.max_upload_bytes;
        // Counted against the namespace's quota and the reserve as it streams: a refused
        // upload stops there and its partial blob is removed.
        let charge = self.inner.env.storage.begin_upload(&caller.namespace).await?;
        let mut charged = Charged { inner: body, charge: &charge };
        let blob = match self.inner.blobs.put(&mut charged, limit).await {
            Ok(blob) => blob,
            Err(e) => {
                return Err(match (charge.refusal(), e) {
                    (Some(refusal), _) => refusal.into(),
                    (None, BlobError::TooLarge { limit }) => {
                        CoreError::TooLarge(format!("uploads are limited to {limit} bytes"))
                    }
                    (None, BlobError::Source(e)) => CoreError::bad(format!("reading the upload failed: {e}")),
                    (None, e) if out_of_space(&e) => CoreError::disk_full(),
                    (None, other) => CoreError::Internal(error_chain(&other)),
                });
            }
        };
        let size = i64::try_from(blob.size).unwrap_or(i64::MAX);
        let record = {
            // Retention removes an unreferenced blob under the write side: the blob this
            // upload found or wrote is either still there, and recorded now, or gone.
            let _gate = self.inner.uploads_gate.read().await;
            if self.inner.blobs.path(&blob.sha256).map_err(|e| CoreError::Internal(e.to_string()))?.is_none() {
                return Err(CoreError::Unavailable(
                    "the same content was being removed by the retention policy; send the upload again".into(),
                ));
            }
            self.inner.store.upsert_file(&caller.namespace, &blob.sha256, size, now_us()).await?
        };
        charge.complete();
        Ok(FileResponse { uuid: record.uuid.to_string(), sha256: record.sha256, size: record.size })
    }

    /// `GET`/`HEAD /files/{sha256}`.
    pub async fn get_file(&self, caller: &Caller, sha256: &str) -> CoreResult<FileView> {
        caller.require(Permission::List)?;
        let sha = normalize_sha256(sha256).map_err(|_| CoreError::bad(format!("invalid sha256 {sha256:?}")))?;
        match self.inner.store.file_by_sha256(&caller.namespace, &sha).await? {
            Some(f) => Ok(view(&f)),
            None => Err(CoreError::NotFound(format!("file {sha}"))),
        }
    }

    pub async fn list_files(
        &self,
        caller: &Caller,
        since_us: Option<i64>,
        until_us: Option<i64>,
        page: Page,
    ) -> CoreResult<Vec<FileView>> {
        caller.require(Permission::List)?;
        let filter = FileFilter {
            namespace: caller.namespace.clone(),
            since_us,
            until_us,
            limit: page.limit,
            offset: page.offset,
        };
        Ok(self.inner.store.list_files(&filter).await?.iter().map(view).collect())
    }
}
