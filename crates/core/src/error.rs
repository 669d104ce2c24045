//! The core's error type and its classification; the API maps [`ErrorKind`] to HTTP status
//! codes in exactly one place.

use boxwood_image::ImageError;
use boxwood_store::{Condition, StoreError};

/// What kind of failure an error is, independent of transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    /// The thing existed but is finished for good (an instance that ended).
    Gone,
    /// Not ready yet; the same request may succeed shortly (a VM still booting).
    TooEarly,
    Unprocessable,
    TooLarge,
    /// The server is short of disk space for this (its free-space reserve is reached).
    InsufficientStorage,
    /// Temporarily unable to take the request (shutting down); nothing was done.
    Unavailable,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The request is malformed or a value is out of range.
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("token lacks the `{0}` permission")]
    Forbidden(&'static str),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    TooEarly(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Unavailable(String),
    /// Storing this would take the host's free-space reserve; nothing was stored.
    #[error("{0}")]
    InsufficientStorage(String),
    #[error("{}", store_message(.0))]
    Store(#[from] StoreError),
    /// Image reads and layer work; client-facing for the path errors of inspection.
    #[error("{0}")]
    Image(#[from] ImageError),
    #[error("{0}")]
    Internal(String),
}

impl CoreError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            CoreError::BadRequest(_) => ErrorKind::BadRequest,
            CoreError::Unauthorized => ErrorKind::Unauthorized,
            CoreError::Forbidden(_) => ErrorKind::Forbidden,
            CoreError::NotFound(_) => ErrorKind::NotFound,
            CoreError::Conflict(_) => ErrorKind::Conflict,
            CoreError::Gone(_) => ErrorKind::Gone,
            CoreError::TooEarly(_) => ErrorKind::TooEarly,
            CoreError::TooLarge(_) => ErrorKind::TooLarge,
            CoreError::Unavailable(_) => ErrorKind::Unavailable,
            CoreError::InsufficientStorage(_) => ErrorKind::InsufficientStorage,
            // Reading an image: the request named something the image does not have.
            CoreError::Image(ImageError::NotFound { .. }) => ErrorKind::NotFound,
            CoreError::Image(
                ImageError::NotDirectory { .. } | ImageError::NotRegular { .. } | ImageError::SymlinkLoop { .. },
            ) => ErrorKind::Unprocessable,
            CoreError::Image(ImageError::BadRequest(_)) => ErrorKind::BadRequest,
            CoreError::Store(e) => match e.condition() {
                Condition::Full => ErrorKind::InsufficientStorage,
                Condition::Unavailable => ErrorKind::Unavailable,
                Condition::Broken => ErrorKind::Internal,
            },
            CoreError::Image(_) | CoreError::Internal(_) => ErrorKind::Internal,
        }
    }

    /// The host's disk filled up under this request (below the reserve, something else took
    /// the space); nothing of it was kept.
    pub(crate) fn disk_full() -> Self {
        CoreError::InsufficientStorage(DISK_FULL.into())
    }

    pub(crate) fn bad(msg: impl Into<String>) -> Self {
        CoreError::BadRequest(msg.into())
    }
}

pub type CoreResult<T> = Result<T, CoreError>;

const DISK_FULL: &str = "the server's disk is full; retry once space is freed";

/// What a client is told of a store failure: its condition, never SQLite's text.
fn store_message(e: &StoreError) -> &'static str {
    match e.condition() {
        Condition::Full => DISK_FULL,
        Condition::Unavailable => "the metadata store is temporarily unavailable; retry shortly",
        Condition::Broken => "metadata store failure",
    }
}

/// Logs `e` in full under a fresh error id and returns `shown` (what the client may read)
/// with that id, so an operator can find the details the client was not told.
pub fn reported(shown: &str, e: &dyn std::error::Error) -> String {
    let id = error_id();
    let id = id.as_str();
    tracing::warn!(error_id = id, error = %error_chain(e), "{shown}");
    format!("{shown} (error id {id})")
}

/// A fresh id for one failure, quoted to the client and logged with the details.
pub fn error_id() -> String {
    let mut id = uuid::Uuid::new_v4().simple().to_string();
    id.truncate(12);
    id
}

/// Whether `e` or one of its sources is the host's filesystem running out of space (or of
/// its quota).
pub(crate) fn out_of_space(e: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind::{QuotaExceeded, StorageFull};
    let mut cur = Some(e);
    while let Some(e) = cur {
        if e.downcast_ref::<std::io::Error>().is_some_and(|e| matches!(e.kind(), StorageFull | QuotaExceeded)) {
            return true;
        }
        cur = e.source();
    }
    false
}

/// An error and its sources on one line, for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}
