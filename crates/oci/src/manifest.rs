//! OCI / Docker manifest, index and config documents: parsing, media-type checks, platform choice.

use std::collections::BTreeMap;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::source::valid_digest;
use crate::{OciError, error::invalid};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// The `Accept` header for manifest requests, best first.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// Upper bound for manifests, indexes and configs held in memory.
pub const MAX_DOCUMENT: u64 = 8 << 20;

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Checks fetched bytes against the digest they were asked for.
pub fn verify_bytes(what: &str, bytes: &[u8], expected: &str) -> Result<(), OciError> {
    let actual = sha256_digest(bytes);
    if actual == expected {
        Ok(())
    } else {
        Err(OciError::DigestMismatch { what: what.into(), expected: expected.into(), actual })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    pub fn check_digest(&self, what: &str) -> Result<(), OciError> {
        if valid_digest(&self.digest) {
            Ok(())
        } else {
            Err(invalid(what, format!("unsupported digest {:?}; only sha256 is supported", self.digest)))
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

/// The parts of a manifest or index document this importer reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDocument {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// A parsed manifest-endpoint document.
#[derive(Debug)]
pub enum Document {
    Index(Vec<Descriptor>),
    Manifest(ImageManifest),
}

#[derive(Debug, Clone)]
pub struct ImageManifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// Parses a manifest or index, using the transport's content type when it is a specific one and
/// the document's own `mediaType` (or its shape) otherwise.
pub fn parse_document(bytes: &[u8], content_type: Option<&str>) -> Result<Document, OciError> {
    let raw: RawDocument = serde_json::from_slice(bytes).map_err(|e| invalid("manifest", e))?;
    let header = content_type.map(|c| c.split(';').next().unwrap_or("").trim().to_string());
    let media_type = match (header.as_deref(), raw.media_type.as_deref()) {
        (Some(h), _) if is_known(h) || h.contains("manifest.v1") => h.to_string(),
        (_, Some(m)) => m.to_string(),
        _ if raw.manifests.is_some() => OCI_INDEX.to_string(),
        _ if raw.config.is_some() => OCI_MANIFEST.to_string(),
        _ if raw.schema_version == Some(1) => "application/vnd.docker.distribution.manifest.v1+json".to_string(),
        _ => return Err(invalid("manifest", "neither an image manifest nor an index")),
    };
    match media_type.as_str() {
        OCI_INDEX | DOCKER_LIST => {
            let manifests = raw.manifests.ok_or_else(|| invalid("image index", "missing `manifests`"))?;
            Ok(Document::Index(manifests))
        }
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let config = raw.config.ok_or_else(|| invalid("image manifest", "missing `config`"))?;
            let layers = raw.layers.ok_or_else(|| invalid("image manifest", "missing `layers`"))?;
            config.check_digest("image manifest")?;
            if !config.media_type.is_empty() && config.media_type != OCI_CONFIG && config.media_type != DOCKER_CONFIG {
                return Err(OciError::UnsupportedMediaType {
                    media_type: config.media_type,
                    what: "image config (the artifact is not a container image)".into(),
                });
            }
            for layer in &layers {
                layer.check_digest("image manifest")?;
                check_layer_media_type(&layer.media_type)?;
            }
            Ok(Document::Manifest(ImageManifest { config, layers }))
        }
        other => Err(OciError::UnsupportedMediaType { media_type: other.to_string(), what: "manifest".into() }),
    }
}

fn is_known(media_type: &str) -> bool {
    [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST].contains(&media_type)
}

/// Layer kinds the importer can apply. The compression is sniffed from the content itself, so
/// this only rejects layers that are not plain/gzip/zstd tars (encrypted, bzip2, artifacts, …).
pub fn check_layer_media_type(media_type: &str) -> Result<(), OciError> {
    const OK: [&str; 10] = [
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.diff.tar.zstd",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    ];
    if OK.contains(&media_type) {
        Ok(())
    } else {
        Err(OciError::UnsupportedMediaType { media_type: media_type.to_string(), what: "layer".into() })
    }
}

/// The linux/amd64 entry of an index (the first one, when variants repeat it).
pub fn pick_amd64(manifests: &[Descriptor]) -> Result<&Descriptor, OciError> {
    let found =
        manifests.iter().find(|d| d.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == "amd64"));
    match found {
        Some(d) => {
            d.check_digest("image index")?;
            Ok(d)
        }
        None => Err(OciError::NoPlatform {
            available: manifests
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| match &p.variant {
                    Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                    None => format!("{}/{}", p.os, p.architecture),
                })
                .collect(),
        }),
    }
}

/// The parts of an image config this importer reads.
#[derive(Debug, Default, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: Option<String>,
    #[serde(default)]
    pub config: Option<RunConfig>,
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RunConfig {
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

impl ImageConfig {
    pub fn parse(bytes: &[u8]) -> Result<Self, OciError> {
        serde_json::from_slice(bytes).map_err(|e| invalid("image config", e))
    }

    /// `Env` as a map; an entry without `=` maps to the empty string, later entries win.
    pub fn env(&self) -> BTreeMap<String, String> {
        let entries = self.config.as_ref().and_then(|c| c.env.as_ref());
        entries
            .into_iter()
            .flatten()
            .map(|e| match e.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (e.clone(), String::new()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_platform_choice() {
        let doc = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":1,"platform":{"os":"linux","architecture":"arm64","variant":"v8"}},
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222","size":1,"platform":{"os":"linux","architecture":"amd64"}}]}"#;
        let Document::Index(m) = parse_document(doc, Some("text/plain")).unwrap() else { panic!("not an index") };
        assert!(pick_amd64(&m).unwrap().digest.starts_with("sha256:2222"));
        let err = pick_amd64(&m[..1]).unwrap_err();
        assert_eq!(err.to_string(), "image index has no linux/amd64 image (available: linux/arm64/v8)");
    }

    #[test]
    fn schema1_and_artifacts_are_unsupported() {
        let s1 = br#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}"#;
        assert!(matches!(parse_document(s1, None), Err(OciError::UnsupportedMediaType { .. })));
        let art = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{"mediaType":"application/vnd.cncf.helm.config.v1+json","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":1},"layers":[]}"#;
        assert!(matches!(parse_document(art, None), Err(OciError::UnsupportedMediaType { .. })));
    }

    #[test]
    fn env_parsing() {
        let c = ImageConfig::parse(br#"{"config":{"Env":["PATH=/bin:/usr/bin","A=b=c","EMPTY"]}}"#).unwrap();
        let env = c.env();
        assert_eq!(env["PATH"], "/bin:/usr/bin");
        assert_eq!(env["A"], "b=c");
        assert_eq!(env["EMPTY"], "");
    }
}
