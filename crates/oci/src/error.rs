//! [`OciError`]: every way an image import can fail, worded for the person who typed the source.

use std::path::{Path, PathBuf};

/// Why resolving or importing an image failed.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The source string could not be parsed.
    #[error("invalid image source {input:?}: {reason}")]
    InvalidSource { input: String, reason: String },
    /// The registry could not be reached (unknown host, connection refused, TLS failure, timeout).
    #[error("cannot reach registry at {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The registry answered 401: credentials are missing, or were rejected.
    #[error("{}", unauthorized_message(registry, *credentials_given, detail))]
    Unauthorized { registry: String, credentials_given: bool, detail: String },
    /// The registry answered 403: the credentials are valid but may not pull this repository.
    #[error("access to {repository} on {registry} denied: {detail}")]
    Denied { registry: String, repository: String, detail: String },
    /// The manifest, tag, repository or blob does not exist.
    #[error("{what} not found on {registry} ({detail})")]
    NotFound { registry: String, what: String, detail: String },
    /// An image index without a linux/amd64 image.
    #[error("image index has no linux/amd64 image (available: {})", if available.is_empty() { "none".to_string() } else { available.join(", ") })]
    NoPlatform { available: Vec<String> },
    /// A manifest, config or layer of a kind this importer cannot handle.
    #[error("unsupported media type {media_type:?} for {what}")]
    UnsupportedMediaType { media_type: String, what: String },
    /// Content whose sha256 (or size) does not match what the manifest promised.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch { what: String, expected: String, actual: String },
    /// A manifest, index or config that is not valid JSON of the expected shape.
    #[error("invalid {what}: {reason}")]
    InvalidManifest { what: String, reason: String },
    /// A layer that cannot be decompressed or is not a valid tar.
    #[error("corrupt layer {digest}: {reason}")]
    CorruptLayer { digest: String, reason: String },
    /// A layer member refused because it would write outside the tree or is otherwise unsafe.
    #[error("refusing member {member:?} of layer {digest}: {reason}")]
    HostileLayer { digest: String, member: String, reason: String },
    /// The server imports nothing from its own file system (no `registry.local_dirs`).
    #[error("local image sources (oci:, oci-archive:, docker-archive:) are disabled on this server")]
    LocalDisabled,
    /// A local path outside the allowed directories, missing, a symlink, or not a regular
    /// file (or directory, for `oci:`): one answer for all, so nothing about the host leaks.
    #[error(
        "no usable image archive or layout at that path (local sources must be regular files, or layout directories, inside the server's registry.local_dirs)"
    )]
    LocalRefused,
    /// An OCI layout or archive on disk that does not hold what the source asked for.
    #[error("cannot use image at {path}: {reason}")]
    LocalSource { path: PathBuf, reason: String },
    /// The target tree is not an existing empty directory.
    #[error("invalid target tree {path}: {reason}")]
    InvalidTree { path: PathBuf, reason: String },
    /// Any other unexpected registry answer.
    #[error("registry {url} answered {status}: {detail}")]
    Registry { url: String, status: u16, detail: String },
    /// A transfer that broke off or was malformed after the connection was made.
    #[error("transfer from {url} failed: {reason}")]
    Transfer { url: String, reason: String },
    /// Writing the image's (inert) tree failed.
    #[error("cannot write the image tree")]
    Tree(#[from] boxwood_image::ImageError),
    /// A local file-system operation failed.
    #[error("i/o error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The registry host is, or resolves only to, an address imports may not reach (the
    /// host itself, loopback, link-local, private ranges) and is not an allowed host.
    #[error(
        "registry host {host:?} is not reachable from this server: it is an internal address (allow it with registry.allow_hosts)"
    )]
    Blocked { host: String },
    /// The import was cancelled (its future dropped) while layers were being applied.
    #[error("import cancelled")]
    Cancelled,
}

impl OciError {
    /// The error as the client may see it: what it can act on, without the host's paths, a
    /// remote server's response bodies or a parser's text (which may quote the bytes it read).
    /// The full error belongs in the server log.
    pub fn client_message(&self) -> String {
        match self {
            OciError::InvalidSource { .. }
            | OciError::NoPlatform { .. }
            | OciError::DigestMismatch { .. }
            | OciError::Blocked { .. }
            | OciError::LocalDisabled
            | OciError::LocalRefused
            | OciError::Cancelled => self.to_string(),
            OciError::Connect { url, .. } => format!("cannot reach registry {}", host_of(url)),
            OciError::Unauthorized { registry, credentials_given: true, .. } => {
                format!("registry {} rejected the credentials (401)", host_of(registry))
            }
            OciError::Unauthorized { registry, credentials_given: false, .. } => {
                format!("registry {} requires credentials (401) and none were given", host_of(registry))
            }
            OciError::Denied { registry, repository, .. } => {
                format!("access to {repository} on {} denied (403)", host_of(registry))
            }
            OciError::NotFound { registry, what, .. } => format!("{what} not found on {}", host_of(registry)),
            OciError::UnsupportedMediaType { what, .. } => format!("unsupported media type for {what}"),
            OciError::InvalidManifest { what, .. } => format!("invalid {what}"),
            OciError::CorruptLayer { digest, .. } => format!("corrupt layer {digest}"),
            OciError::HostileLayer { digest, .. } => {
                format!("layer {digest} has a member that would write outside the image or is unsafe")
            }
            OciError::LocalSource { .. } => "the local source is not a usable image archive or layout".into(),
            OciError::Registry { url, status, .. } => format!("registry {} answered HTTP {status}", host_of(url)),
            OciError::Transfer { url, .. } => format!("the transfer from registry {} broke off", host_of(url)),
            OciError::InvalidTree { .. } | OciError::Io { .. } | OciError::Tree(_) => {
                "the server could not store the import".into()
            }
        }
    }
}

/// `host[:port]` of a URL (or the text itself when it is not one).
fn host_of(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            _ => String::new(),
        },
        Err(_) => url.to_owned(),
    }
}

fn unauthorized_message(registry: &str, credentials_given: bool, detail: &str) -> String {
    if credentials_given {
        format!("registry {registry} rejected the credentials (401): {detail}")
    } else {
        format!("registry {registry} requires credentials (401) and none were given: {detail}")
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OciError + '_ {
    move |source| OciError::Io { path: path.to_owned(), source }
}

pub(crate) fn invalid(what: impl Into<String>, reason: impl std::fmt::Display) -> OciError {
    OciError::InvalidManifest { what: what.into(), reason: reason.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the full error holds (host paths, bodies, parser text quoting file bytes), the
    /// client's message keeps only what it can act on.
    #[test]
    fn client_messages_hold_no_host_paths_bodies_or_parser_text() {
        let secret = "root:$6$SECRET";
        let errors = [
            OciError::LocalSource {
                path: "/var/lib/boxwood/blobs/x".into(),
                reason: format!("not a valid tar: {secret}"),
            },
            OciError::Io { path: "/var/lib/boxwood/tmp".into(), source: std::io::Error::other(secret) },
            OciError::InvalidTree { path: "/var/lib/boxwood/t".into(), reason: secret.into() },
            OciError::Registry { url: "http://reg.example:5000/v2/x".into(), status: 500, detail: secret.into() },
            OciError::Unauthorized {
                registry: "https://reg.example".into(),
                credentials_given: false,
                detail: secret.into(),
            },
            OciError::Denied { registry: "reg.example".into(), repository: "a/b".into(), detail: secret.into() },
            OciError::NotFound { registry: "reg.example".into(), what: "manifest a/b:1".into(), detail: secret.into() },
            OciError::InvalidManifest { what: "image config".into(), reason: secret.into() },
            OciError::CorruptLayer { digest: "sha256:ab".into(), reason: secret.into() },
            OciError::HostileLayer { digest: "sha256:ab".into(), member: secret.into(), reason: secret.into() },
            OciError::Transfer { url: "http://reg.example/v2/x".into(), reason: secret.into() },
            OciError::Connect { url: "http://reg.example/v2/x".into(), reason: secret.into() },
            OciError::UnsupportedMediaType { media_type: secret.into(), what: "layer".into() },
        ];
        for e in errors {
            assert!(e.to_string().contains("SECRET"), "positive control: the full error holds it: {e}");
            let shown = e.client_message();
            assert!(!shown.contains("SECRET") && !shown.contains("/var/lib"), "{shown}");
            assert!(!shown.is_empty());
        }
    }
}
