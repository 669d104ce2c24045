//! Reading an image without a VM (`/inspect/{uuid}/…`): listings, file contents, archives and
//! grep over the merged view of its layers, read in place.

use boxwood_image::{DirectoryList, GrepRequest, GrepResult, ImageView, format_listing};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::Service;
use crate::auth::Caller;
use crate::auth::Permission;
use crate::error::{CoreError, CoreResult};

/// Archive bytes are handed to the transport in pieces of this size.
const ARCHIVE_CHUNK: usize = 256 * 1024;

impl Service {
    /// The merged read-only view of an image the caller can see.
    async fn view(&self, caller: &Caller, uuid: Uuid) -> CoreResult<ImageView> {
        caller.require(Permission::List)?;
        let mut img = self.visible_image(caller, uuid).await?;
        // Pinned until the view has its files open; then they stay readable whatever a
        // sweep does.
        let pinned = self.inner.env.open_image_layers(&mut img).await?;
        tokio::task::spawn_blocking(move || ImageView::open(&pinned.paths))
            .await
            .map_err(|e| CoreError::Internal(format!("inspection task failed: {e}")))?
            .map_err(CoreError::from)
    }

    /// Runs blocking filesystem work on an image view.
    async fn with_view<T: Send + 'static>(
        &self,
        caller: &Caller,
        uuid: Uuid,
        work: impl FnOnce(&ImageView) -> Result<T, boxwood_image::ImageError> + Send + 'static,
    ) -> CoreResult<T> {
        let view = self.view(caller, uuid).await?;
        tokio::task::spawn_blocking(move || work(&view))
            .await
            .map_err(|e| CoreError::Internal(format!("inspection task failed: {e}")))?
            .map_err(CoreError::from)
    }

    pub async fn inspect_list(&self, caller: &Caller, uuid: Uuid, path: String) -> CoreResult<DirectoryList> {
        self.with_view(caller, uuid, move |v| Ok(DirectoryList { files: v.list(&path)?, path })).await
    }

    /// The listing as `ls -l` text (contree-cli's default output).
    pub async fn inspect_list_text(&self, caller: &Caller, uuid: Uuid, path: String) -> CoreResult<String> {
        self.with_view(caller, uuid, move |v| Ok(format_listing(&path, &v.list(&path)?))).await
    }

    /// The size of a regular file (symlinks followed inside the image): the `HEAD` answer.
    pub async fn inspect_file_size(&self, caller: &Caller, uuid: Uuid, path: String) -> CoreResult<u64> {
        self.with_view(caller, uuid, move |v| v.open_file(&path).map(|(_, size)| size)).await
    }

    /// A regular file's size and its bytes, streamed like an archive (an `Err` chunk if the
    /// read broke midway).
    pub async fn inspect_download(
        &self,
        caller: &Caller,
        uuid: Uuid,
        path: String,
    ) -> CoreResult<(u64, mpsc::Receiver<std::io::Result<Vec<u8>>>)> {
        let (mut file, size) = self.with_view(caller, uuid, move |v| v.open_file(&path)).await?;
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let mut out = ChunkWriter { tx: tx.clone(), buf: Vec::with_capacity(ARCHIVE_CHUNK) };
            let mut buf = vec![0u8; ARCHIVE_CHUNK];
            let result = loop {
                match std::io::Read::read(&mut file, &mut buf) {
                    Ok(0) => break std::io::Write::flush(&mut out),
                    Ok(n) => {
                        if let Err(e) = std::io::Write::write_all(&mut out, &buf[..n]) {
                            break Err(e);
                        }
                    }
                    Err(e) => break Err(e),
                }
            };
            if let Err(e) = result {
                let _ = tx.blocking_send(Err(e));
            }
        });
        Ok((size, rx))
    }

    /// Whether `path` can be archived (a file or a directory).
    pub async fn inspect_check_archive(&self, caller: &Caller, uuid: Uuid, path: String) -> CoreResult<()> {
        self.with_view(caller, uuid, move |v| v.check_archive(&path)).await
    }

    /// A PAX tar of `path`, streamed: the receiver yields chunks, and an `Err` if the archive
    /// broke midway (the transport must then abort rather than end the body cleanly).
    pub async fn inspect_archive(
        &self,
        caller: &Caller,
        uuid: Uuid,
        path: String,
    ) -> CoreResult<mpsc::Receiver<std::io::Result<Vec<u8>>>> {
        let view = self.view(caller, uuid).await?;
        let checked = path.clone();
        let view = tokio::task::spawn_blocking(move || view.check_archive(&checked).map(|()| view))
            .await
            .map_err(|e| CoreError::Internal(format!("inspection task failed: {e}")))??;
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let mut out = ChunkWriter { tx: tx.clone(), buf: Vec::with_capacity(ARCHIVE_CHUNK) };
            let result = view.write_archive(&path, &mut out).map_err(std::io::Error::other);
            let result = result.and_then(|()| std::io::Write::flush(&mut out));
            if let Err(e) = result {
                let _ = tx.blocking_send(Err(e));
            }
        });
        Ok(rx)
    }

    pub async fn inspect_grep(&self, caller: &Caller, uuid: Uuid, req: GrepRequest) -> CoreResult<GrepResult> {
        self.with_view(caller, uuid, move |v| v.grep(&req)).await
    }
}

/// Feeds a blocking writer's output to an async consumer in bounded chunks.
struct ChunkWriter {
    tx: mpsc::Sender<std::io::Result<Vec<u8>>>,
    buf: Vec<u8>,
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= ARCHIVE_CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(ARCHIVE_CHUNK));
        // The client went away: stop writing.
        self.tx.blocking_send(Ok(chunk)).map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
}
