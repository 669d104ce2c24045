//! Imports OCI / Docker images into one flat rootfs tree.
//!
//! Sources ([`parse_source`]): a registry (`docker://HOST/REPO:TAG`, `…@sha256:…`), an OCI
//! layout directory (`oci:DIR[:TAG]`), a tar of one (`oci-archive:PATH`) or a
//! `docker-archive:PATH` (paths only beneath [`RegistryConfig::local_dirs`]), or an archive the
//! server opened for the client ([`ImageSource::Opened`], e.g. its own upload; the source
//! string `oci-archive:upload:UUID` parses to [`ImageSource::Upload`], which the server turns
//! into that). [`Importer::resolve`] finds the linux/amd64 manifest and config
//! digests cheaply; [`Importer::import`] downloads the layers (streamed to files in the work
//! dir and sha256-verified before anything is applied), then applies them in order with OCI
//! whiteout semantics into a caller-given empty directory ([`apply_layers`] does that part
//! alone). Every failure is an [`OciError`]; on failure the tree is left empty.
//!
//! Registry access: Docker Registry HTTP API v2 / OCI distribution, anonymous, Basic or
//! Bearer-token auth, mirrors per registry host ([`RegistryConfig`]), plain http for hosts
//! listed as insecure and for loopback.

mod apply;
mod confine;
mod error;
mod fsutil;
mod local;
mod manifest;
mod netguard;
mod registry;
mod scratch;
mod source;

pub use apply::apply_layers;
pub use error::OciError;
pub use source::{ArchiveFile, ArchiveFormat, DOCKER_HUB, ImageSource, Reference, parse_source};

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;

use crate::confine::open_source;
use crate::error::io_err;
use crate::local::{BlobLoc, LocalPlan};
use crate::manifest::{Document, ImageConfig, ImageManifest};
use crate::registry::{Endpoint, RegistryClient};
use crate::scratch::Scratch;

/// Layers downloaded at the same time.
const PARALLEL_DOWNLOADS: usize = 3;

/// Registry settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Registry host (as in the source, e.g. `docker.io`) → mirror base URLs
    /// (`http://127.0.0.1:5000`), tried in order before the registry itself.
    pub mirrors: BTreeMap<String, Vec<String>>,
    /// Registry hosts (`host[:port]`) spoken to over plain http. Loopback hosts always are.
    pub insecure: Vec<String>,
    /// Hosts (names or IP literals, no port) imports may reach even though they are, or
    /// resolve to, the host itself, loopback, link-local or private addresses. Mirrors'
    /// hosts are always allowed; nothing else is by default.
    pub allow_hosts: Vec<String>,
    /// Directories `oci:`, `oci-archive:` and `docker-archive:` sources may name files in.
    /// Empty (the default): local imports are disabled.
    pub local_dirs: Vec<PathBuf>,
}

/// Registry credentials, used for Basic auth and for the Bearer token exchange.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).finish_non_exhaustive()
    }
}

/// The image a source currently names, by content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Digest of the linux/amd64 image manifest (picked from an index when the source names
    /// one). For a docker-archive, which has no registry manifest, the sha256 of its
    /// `manifest.json`.
    pub manifest_digest: String,
    /// Digest of the image config: the image's identity across sources.
    pub config_digest: String,
}

/// What an import produced.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The config's `Env`, `KEY=VALUE` split at the first `=`.
    pub env: BTreeMap<String, String>,
    pub resolved: Resolved,
    /// Bytes of regular-file content in the tree (each hard-linked file once).
    pub content_bytes: u64,
}

/// Resolves and imports images; cheap to share (`&self` methods), holds the HTTP client and
/// the registry token cache.
pub struct Importer {
    client: RegistryClient,
    work_dir: PathBuf,
    local_dirs: Arc<Vec<PathBuf>>,
}

/// A registry image located on one endpoint.
struct RemotePlan {
    endpoint: Endpoint,
    resolved: Resolved,
    manifest: ImageManifest,
}

impl Importer {
    /// `work_dir` holds per-import scratch directories (downloaded layers); it is created if
    /// missing and may be shared by several importers and processes.
    pub fn new(config: RegistryConfig, work_dir: PathBuf) -> Self {
        let local_dirs = Arc::new(config.local_dirs.clone());
        Self { client: RegistryClient::new(config), work_dir, local_dirs }
    }

    /// What can be said about a source before any work: a local path on a server that
    /// imports nothing local is refused up front (uploads are not local paths).
    pub fn check(&self, src: &ImageSource) -> Result<(), OciError> {
        match src {
            ImageSource::Registry { .. } | ImageSource::Upload { .. } | ImageSource::Opened { .. } => Ok(()),
            _ if self.local_dirs.is_empty() => Err(OciError::LocalDisabled),
            _ => Ok(()),
        }
    }

    /// Cheap: resolves the manifest (and config digest) without downloading layers, so
    /// callers can dedup re-imports.
    pub async fn resolve(&self, src: &ImageSource, creds: Option<&Credentials>) -> Result<Resolved, OciError> {
        match src {
            ImageSource::Registry { host, repository, reference } => {
                Ok(self.resolve_remote(host, repository, reference, creds).await?.resolved)
            }
            _ => Ok(plan_local(src.clone(), self.local_dirs.clone()).await?.resolved),
        }
    }

    /// Downloads (streamed to files in the work dir, sha256-verified against the manifest)
    /// and applies all layers in order into `tree`, an existing empty directory, producing a
    /// flat rootfs. On error `tree` is left empty. Dropping the future cancels the import:
    /// downloads stop, scratch files are removed, and layer application stops at its next
    /// member and empties the tree.
    pub async fn import(
        &self,
        src: &ImageSource,
        creds: Option<&Credentials>,
        tree: &Path,
    ) -> Result<Imported, OciError> {
        apply::check_tree(tree)?;
        let work_dir = self.work_dir.clone();
        let scratch = blocking(move || Scratch::create(&work_dir)).await?;
        let (resolved, config, layers) = match src {
            ImageSource::Registry { host, repository, reference } => {
                let plan = self.resolve_remote(host, repository, reference, creds).await?;
                let config_digest = &plan.resolved.config_digest;
                let bytes = self.client.get_blob_bytes(&plan.endpoint, repository, config_digest, creds).await?;
                manifest::verify_bytes("image config", &bytes, config_digest)?;
                let config = ImageConfig::parse(&bytes)?;
                check_architecture(&config)?;
                let layers = self.download_layers(&plan, repository, creds, &scratch.dir).await?;
                (plan.resolved, config, layers)
            }
            _ => {
                let plan = plan_local(src.clone(), self.local_dirs.clone()).await?;
                check_architecture(&plan.config)?;
                let layers = blocking(move || {
                    plan.layers.iter().try_for_each(local::verify_layer)?;
                    Ok(plan.layers.into_iter().map(|l| (l.loc, l.name)).collect::<Vec<_>>())
                })
                .await?;
                (plan.resolved, plan.config, layers)
            }
        };
        let tree_owned = tree.to_owned();
        let cancel = scratch.cancel.clone();
        let content_bytes = blocking(move || apply::apply_all(&layers, &tree_owned, &cancel)).await?;
        drop(scratch);
        Ok(Imported { env: config.env(), resolved, content_bytes })
    }

    /// Tries each mirror for `host` and then `host` itself; on total failure reports the first
    /// answer that is not "unreachable" (a mirror's "not found" says more than an offline
    /// upstream's DNS failure), else the first error.
    async fn resolve_remote(
        &self,
        host: &str,
        repo: &str,
        reference: &Reference,
        creds: Option<&Credentials>,
    ) -> Result<RemotePlan, OciError> {
        let mut errors = Vec::new();
        for endpoint in self.client.endpoints(host) {
            match self.resolve_at(&endpoint, repo, reference, creds).await {
                Ok((resolved, manifest)) => return Ok(RemotePlan { endpoint, resolved, manifest }),
                Err(e) => {
                    if endpoint.mirror {
                        tracing::warn!(mirror = %endpoint.base, error = %e, "mirror failed; trying the next endpoint");
                    }
                    errors.push(e);
                }
            }
        }
        let first_answer = errors.iter().position(|e| !matches!(e, OciError::Connect { .. })).unwrap_or(0);
        Err(errors.swap_remove(first_answer))
    }

    async fn resolve_at(
        &self,
        ep: &Endpoint,
        repo: &str,
        reference: &Reference,
        creds: Option<&Credentials>,
    ) -> Result<(Resolved, ImageManifest), OciError> {
        let (mut bytes, mut content_type) = self.client.get_manifest(ep, repo, &reference.to_string(), creds).await?;
        let mut digest = manifest::sha256_digest(&bytes);
        if let Reference::Digest(expected) = reference {
            manifest::verify_bytes("manifest", &bytes, expected)?;
        }
        for _ in 0..4 {
            match manifest::parse_document(&bytes, content_type.as_deref())? {
                Document::Manifest(m) => {
                    let resolved = Resolved { manifest_digest: digest, config_digest: m.config.digest.clone() };
                    return Ok((resolved, m));
                }
                Document::Index(list) => {
                    let picked = manifest::pick_amd64(&list)?.digest.clone();
                    (bytes, content_type) = self.client.get_manifest(ep, repo, &picked, creds).await?;
                    manifest::verify_bytes("manifest", &bytes, &picked)?;
                    digest = picked;
                }
            }
        }
        Err(error::invalid("image index", "nested too deeply"))
    }

    /// Downloads every distinct layer to `dir`, [`PARALLEL_DOWNLOADS`] at a time; returns
    /// the layers in manifest order.
    async fn download_layers(
        &self,
        plan: &RemotePlan,
        repo: &str,
        creds: Option<&Credentials>,
        dir: &Path,
    ) -> Result<Vec<(BlobLoc, String)>, OciError> {
        let mut unique: HashMap<String, u64> = HashMap::new();
        for l in &plan.manifest.layers {
            unique.insert(l.digest.clone(), l.size);
        }
        let path_of = |digest: &str| dir.join(digest.replacen(':', "-", 1));
        // Futures built up front (owned digests), so the import future stays `Send`.
        let downloads: Vec<_> = unique
            .into_iter()
            .map(|(digest, size)| {
                let dest = path_of(&digest);
                async move { self.client.download_blob(&plan.endpoint, repo, &digest, size, creds, &dest).await }
            })
            .collect();
        futures::stream::iter(downloads).buffer_unordered(PARALLEL_DOWNLOADS).try_collect::<Vec<()>>().await?;
        let mut out = Vec::new();
        for l in &plan.manifest.layers {
            let path = path_of(&l.digest);
            let len = std::fs::metadata(&path).map_err(io_err(&path))?.len();
            out.push((BlobLoc { path, offset: 0, len, keep: None }, l.digest.clone()));
        }
        Ok(out)
    }
}

/// An image config for another architecture would give a rootfs that cannot run.
fn check_architecture(config: &ImageConfig) -> Result<(), OciError> {
    match config.architecture.as_deref() {
        None | Some("") | Some("amd64") => Ok(()),
        Some(other) => Err(OciError::NoPlatform { available: vec![format!("linux/{other}")] }),
    }
}

async fn plan_local(src: ImageSource, dirs: Arc<Vec<PathBuf>>) -> Result<LocalPlan, OciError> {
    blocking(move || match &src {
        ImageSource::OciDir(dir, tag) => local::plan_oci(open_source(&dirs, dir, true)?, tag.as_deref(), false),
        ImageSource::OciArchive(path) => local::plan_oci(open_source(&dirs, path, false)?, None, true),
        ImageSource::DockerArchive(path) => local::plan_docker_archive(open_source(&dirs, path, false)?),
        ImageSource::Opened { format: ArchiveFormat::Oci, file } => local::plan_oci(file.opened.clone(), None, true),
        ImageSource::Opened { format: ArchiveFormat::Docker, file } => local::plan_docker_archive(file.opened.clone()),
        ImageSource::Upload { .. } => {
            Err(OciError::InvalidSource { input: src.to_string(), reason: "the upload was not opened".into() })
        }
        ImageSource::Registry { .. } => {
            Err(OciError::InvalidSource { input: src.to_string(), reason: "not local".into() })
        }
    })
    .await
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, OciError> + Send + 'static) -> Result<T, OciError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| OciError::Io {
        path: PathBuf::new(),
        source: std::io::Error::other(format!("import worker failed: {e}")),
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Callers spawn imports on a multi-threaded runtime, so the futures must be `Send`.
    #[test]
    fn futures_are_send() {
        fn is_send<T: Send>(_: &T) {}
        let imp = Importer::new(RegistryConfig::default(), PathBuf::from("/nonexistent"));
        let src = ImageSource::OciDir(PathBuf::from("/nonexistent"), None);
        is_send(&imp.resolve(&src, None));
        is_send(&imp.import(&src, None, Path::new("/nonexistent")));
    }

    #[test]
    fn config_deserialises() {
        let c: RegistryConfig =
            serde_json::from_str(r#"{"mirrors":{"docker.io":["http://127.0.0.1:5000"]},"insecure":["reg:5000"]}"#)
                .unwrap();
        assert_eq!(c.mirrors["docker.io"], ["http://127.0.0.1:5000"]);
        assert_eq!(c.insecure, ["reg:5000"]);
        let empty: RegistryConfig = serde_json::from_str("{}").unwrap();
        assert!(empty.mirrors.is_empty() && empty.insecure.is_empty());
    }
}
