//! Boxwood's core: the single service that owns the rules of the Contree model (instances,
//! operations and their lifecycle, event logs, images and tags, tokens and namespaces).
//! Transports parse requests into the types of [`model`] and call [`Service`]; storage, layers
//! and the VM runtime are reached only through their traits.

pub mod auth;
pub mod clock;
mod error;
mod events;
pub mod metrics;
pub mod model;
pub mod operations;
mod process;
pub mod quota;
mod redact;
mod runner;
mod service;
pub mod spec;

/// Shapes of image inspection (owned by the image crate, served as they are).
pub mod inspect {
    pub use boxwood_image::{DirectoryList, FileItem, GrepCase, GrepMatch, GrepRequest, GrepResult};
}

pub use error::{CoreError, CoreResult, ErrorKind, error_chain, error_id, reported};
pub use service::{
    Backends, CoreConfig, GcImage, GcReport, ImageQuery, NamespaceUsage, OperationQuery, Page, RetentionConfig, Service,
};
