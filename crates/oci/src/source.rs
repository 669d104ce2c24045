//! Image source strings (`docker://…`, `oci:…`, `oci-archive:…`, `docker-archive:…`, and
//! `oci-archive:upload:UUID` / `docker-archive:upload:UUID` for a client's own upload) and
//! their parsed form.

use std::fmt;
use std::path::PathBuf;

use uuid::Uuid;

use crate::OciError;
use crate::confine::Opened;

/// What kind of tar an archive source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveFormat {
    /// A tar of an OCI image layout.
    Oci,
    /// A `docker save` tar.
    Docker,
}

impl ArchiveFormat {
    fn transport(self) -> &'static str {
        match self {
            ArchiveFormat::Oci => "oci-archive",
            ArchiveFormat::Docker => "docker-archive",
        }
    }
}

/// An archive the server opened itself (a client's upload, found in the caller's namespace),
/// never a path the client named. Opened read-only, without following symlinks, and checked
/// to be a regular file.
#[derive(Debug, Clone)]
pub struct ArchiveFile {
    pub(crate) opened: Opened,
    /// Shown instead of a path (`upload:UUID`).
    label: String,
}

impl ArchiveFile {
    /// Opens `path`, a file the server trusts (never a client-given path), labelled `label`
    /// in messages.
    pub fn open(path: &std::path::Path, label: impl Into<String>) -> Result<Self, OciError> {
        let opened = crate::confine::open_trusted(path).ok_or(OciError::LocalRefused)?;
        Ok(Self { opened, label: label.into() })
    }
}

impl PartialEq for ArchiveFile {
    fn eq(&self, other: &Self) -> bool {
        self.label == other.label
    }
}

impl Eq for ArchiveFile {}

/// The registry name Docker Hub references are normalised to.
pub const DOCKER_HUB: &str = "docker.io";

/// Which manifest of a repository to pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    /// `sha256:<64 hex>`.
    Digest(String),
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) | Reference::Digest(t) => f.write_str(t),
        }
    }
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A registry speaking the Docker Registry HTTP API v2 / OCI distribution spec.
    Registry { host: String, repository: String, reference: Reference },
    /// A tar of an OCI image layout (as `skopeo copy … oci-archive:PATH` writes).
    OciArchive(PathBuf),
    /// An OCI image layout directory, optionally naming the image by its `ref.name` tag.
    OciDir(PathBuf, Option<String>),
    /// A `docker save` / `skopeo copy … docker-archive:PATH` tar.
    DockerArchive(PathBuf),
    /// `oci-archive:upload:UUID` / `docker-archive:upload:UUID`: an archive the client uploaded
    /// with `POST /files`. The server finds it in the caller's namespace and passes it on as
    /// [`ImageSource::Opened`]; the importer never looks an upload up itself.
    Upload { format: ArchiveFormat, uuid: Uuid },
    /// An archive the server has opened (see [`ArchiveFile`]).
    Opened { format: ArchiveFormat, file: ArchiveFile },
}

impl fmt::Display for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageSource::Registry { host, repository, reference: Reference::Tag(t) } => {
                write!(f, "docker://{host}/{repository}:{t}")
            }
            ImageSource::Registry { host, repository, reference: Reference::Digest(d) } => {
                write!(f, "docker://{host}/{repository}@{d}")
            }
            ImageSource::OciArchive(p) => write!(f, "oci-archive:{}", p.display()),
            ImageSource::OciDir(p, None) => write!(f, "oci:{}", p.display()),
            ImageSource::OciDir(p, Some(t)) => write!(f, "oci:{}:{t}", p.display()),
            ImageSource::DockerArchive(p) => write!(f, "docker-archive:{}", p.display()),
            ImageSource::Upload { format, uuid } => write!(f, "{}:upload:{uuid}", format.transport()),
            ImageSource::Opened { format, file } => write!(f, "{}:{}", format.transport(), file.label),
        }
    }
}

/// Parses an image source:
/// * `docker://[HOST/]PATH[:TAG]`, `docker://[HOST/]PATH@sha256:HEX` (`oci://` is an alias). Without a
///   host (the first component has no `.` or `:` and is not `localhost`) the image is on Docker Hub,
///   whose single-component names live under `library/`; the tag defaults to `latest`.
/// * `oci-archive:PATH`, `oci:DIR[:TAG]`, `docker-archive:PATH`.
/// * `oci-archive:upload:UUID`, `docker-archive:upload:UUID`: the caller's own upload.
pub fn parse_source(input: &str) -> Result<ImageSource, OciError> {
    let bad = |reason: &str| OciError::InvalidSource { input: input.to_string(), reason: reason.to_string() };
    if let Some(rest) = input.strip_prefix("docker://").or_else(|| input.strip_prefix("oci://")) {
        return parse_registry(rest).map_err(|r| bad(&r));
    }
    for format in [ArchiveFormat::Oci, ArchiveFormat::Docker] {
        if let Some(id) = input.strip_prefix(format.transport()).and_then(|r| r.strip_prefix(":upload:")) {
            let uuid = Uuid::parse_str(id).map_err(|_| bad("expected upload:<file uuid> (from POST /files)"))?;
            return Ok(ImageSource::Upload { format, uuid });
        }
    }
    if let Some(rest) = input.strip_prefix("oci-archive:") {
        return Ok(ImageSource::OciArchive(local_path(rest).map_err(|r| bad(&r))?));
    }
    if let Some(rest) = input.strip_prefix("docker-archive:") {
        return Ok(ImageSource::DockerArchive(local_path(rest).map_err(|r| bad(&r))?));
    }
    if let Some(rest) = input.strip_prefix("oci:") {
        let (dir, tag) = match rest.rsplit_once(':') {
            Some((dir, tag)) if !tag.contains('/') && !dir.is_empty() => {
                if !valid_tag(tag) {
                    return Err(bad(&format!("invalid tag {tag:?}")));
                }
                (dir, Some(tag.to_string()))
            }
            _ => (rest, None),
        };
        return Ok(ImageSource::OciDir(local_path(dir).map_err(|r| bad(&r))?, tag));
    }
    Err(bad("unknown transport; expected docker://, oci://, oci:, oci-archive: or docker-archive:"))
}

fn local_path(raw: &str) -> Result<PathBuf, String> {
    if raw.is_empty() { Err("missing path".into()) } else { Ok(PathBuf::from(raw)) }
}

fn parse_registry(rest: &str) -> Result<ImageSource, String> {
    if rest.is_empty() {
        return Err("missing image name".into());
    }
    let (host, remainder) = match rest.split_once('/') {
        Some((first, tail)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            (normalise_host(first)?, tail)
        }
        _ => (DOCKER_HUB.to_string(), rest),
    };
    let (name, reference) = match remainder.split_once('@') {
        Some((name_and_tag, digest)) => {
            if !valid_digest(digest) {
                return Err(format!("invalid digest {digest:?}; expected sha256:<64 lowercase hex>"));
            }
            // `name:tag@digest` pulls by digest; the tag is informational.
            let name = split_tag(name_and_tag).0;
            (name, Reference::Digest(digest.to_string()))
        }
        None => {
            let (name, tag) = split_tag(remainder);
            let tag = tag.unwrap_or("latest");
            if !valid_tag(tag) {
                return Err(format!("invalid tag {tag:?}"));
            }
            (name, Reference::Tag(tag.to_string()))
        }
    };
    if name.is_empty() {
        return Err("missing repository".into());
    }
    for component in name.split('/') {
        if !valid_component(component) {
            return Err(format!(
                "invalid repository {name:?}: components must be non-empty lowercase letters, digits and separators"
            ));
        }
    }
    let repository = if host == DOCKER_HUB && !name.contains('/') { format!("library/{name}") } else { name.into() };
    Ok(ImageSource::Registry { host, repository, reference })
}

/// Splits a `:tag` off the last path component.
fn split_tag(s: &str) -> (&str, Option<&str>) {
    let last_slash = s.rfind('/').map_or(0, |i| i + 1);
    match s[last_slash..].rfind(':') {
        Some(i) => (&s[..last_slash + i], Some(&s[last_slash + i + 1..])),
        None => (s, None),
    }
}

fn normalise_host(host: &str) -> Result<String, String> {
    let lower = host.to_ascii_lowercase();
    if !lower.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b)) {
        return Err(format!("invalid registry host {host:?}"));
    }
    Ok(match lower.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => DOCKER_HUB.to_string(),
        _ => lower,
    })
}

fn valid_component(c: &str) -> bool {
    let bytes = c.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(f), Some(l)) if f.is_ascii_alphanumeric() && l.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(b))
}

pub(crate) fn valid_tag(t: &str) -> bool {
    let bytes = t.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(b))
}

/// `sha256:` followed by 64 lowercase hex digits (the only algorithm this importer accepts).
pub(crate) fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(host: &str, repo: &str, reference: Reference) -> ImageSource {
        ImageSource::Registry { host: host.into(), repository: repo.into(), reference }
    }
    fn tag(t: &str) -> Reference {
        Reference::Tag(t.into())
    }

    #[test]
    fn registry_references() {
        let d = format!("sha256:{}", "a".repeat(64));
        let cases = [
            ("docker://busybox", reg("docker.io", "library/busybox", tag("latest"))),
            ("docker://docker.io/busybox:latest", reg("docker.io", "library/busybox", tag("latest"))),
            ("docker://index.docker.io/library/busybox:1.36", reg("docker.io", "library/busybox", tag("1.36"))),
            ("docker://user/app:v1", reg("docker.io", "user/app", tag("v1"))),
            ("oci://127.0.0.1:5000/a/b:t", reg("127.0.0.1:5000", "a/b", tag("t"))),
            ("docker://localhost/x", reg("localhost", "x", tag("latest"))),
            ("docker://Quay.IO/org/img", reg("quay.io", "org/img", tag("latest"))),
            (&format!("docker://ghcr.io/o/i@{d}"), reg("ghcr.io", "o/i", Reference::Digest(d.clone()))),
            (&format!("docker://ghcr.io/o/i:t@{d}"), reg("ghcr.io", "o/i", Reference::Digest(d.clone()))),
            ("docker://[::1]:5000/r:t", reg("[::1]:5000", "r", tag("t"))),
        ];
        for (input, want) in cases {
            assert_eq!(parse_source(input).unwrap(), want, "{input}");
        }
    }

    #[test]
    fn local_sources() {
        assert_eq!(parse_source("oci-archive:/x/a.tar").unwrap(), ImageSource::OciArchive("/x/a.tar".into()));
        assert_eq!(parse_source("docker-archive:a.tar").unwrap(), ImageSource::DockerArchive("a.tar".into()));
        assert_eq!(parse_source("oci:/x/dir").unwrap(), ImageSource::OciDir("/x/dir".into(), None));
        assert_eq!(parse_source("oci:/x/dir:v1").unwrap(), ImageSource::OciDir("/x/dir".into(), Some("v1".into())));
        assert_eq!(parse_source("oci:/x:y/dir").unwrap(), ImageSource::OciDir("/x:y/dir".into(), None));
        let id = "0b6f2b3e-6c1e-4c59-9d0a-3f1f3e7e2a10";
        let up = |format| ImageSource::Upload { format, uuid: Uuid::parse_str(id).unwrap() };
        assert_eq!(parse_source(&format!("oci-archive:upload:{id}")).unwrap(), up(ArchiveFormat::Oci));
        assert_eq!(parse_source(&format!("docker-archive:upload:{id}")).unwrap(), up(ArchiveFormat::Docker));
        assert_eq!(up(ArchiveFormat::Docker).to_string(), format!("docker-archive:upload:{id}"));
    }

    #[test]
    fn bad_sources_are_refused() {
        for input in [
            "",
            "busybox",
            "http://x/y",
            "docker://",
            "docker://Busybox",
            "docker://host.io/",
            "docker://host.io/a//b",
            "docker://a:b:c",
            "docker://x@sha256:abc",
            "docker://x@md5:00",
            "docker://x:-bad",
            "oci-archive:",
            "oci-archive:upload:",
            "docker-archive:upload:../../blobs/x",
            "oci:",
            "oci:/dir:bad tag",
            "docker://bad host.io/x",
        ] {
            let err = parse_source(input).expect_err(input);
            assert!(matches!(err, OciError::InvalidSource { .. }), "{input}: {err}");
        }
    }
}
