//! The MCP resources of contree-mcp 0.5.0 (COMPAT §7.2), under the same `contree://` URIs so
//! prompts written for it carry over: an image's files and directories without a VM, its
//! lineage, an operation, and the guide.

use boxwood_client::types::OperationKind;
use rmcp::model::ResourceTemplate;

/// What a `contree://` URI names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// `contree://image/{image}/read/{path}`: a file's text (`base64:…` if not UTF-8).
    Read { image: String, path: String },
    /// `contree://image/{image}/ls/{path}`: a directory as `ls -l` prints it.
    List { image: String, path: String },
    /// `contree://image/{image}/lineage`: the image's ancestors and children.
    Lineage { image: String },
    /// `contree://operations/{instance|import}/{id}`: an operation of that kind.
    Operation { kind: OperationKind, id: String },
    /// `contree://guide/{section}`.
    Guide { section: String },
}

const SCHEME: &str = "contree://";

/// The templates `resources/templates/list` answers.
pub fn templates() -> Vec<ResourceTemplate> {
    let t = |uri: &str, name: &str, what: &str| ResourceTemplate::new(uri, name).with_description(what);
    vec![
        t(
            "contree://image/{image}/read/{path}",
            "image file",
            "A file of an image (a UUID or tag:NAME), no VM started",
        ),
        t("contree://image/{image}/ls/{path}", "image directory", "A directory of an image as `ls -l` prints it"),
        t(
            "contree://image/{image}/lineage",
            "image lineage",
            "The image's ancestors and children, as the server records them",
        ),
        t("contree://operations/instance/{id}", "run", "A run (operation of kind instance) as get_operation shows it"),
        t("contree://operations/import/{id}", "import", "An image import as get_operation shows it"),
        t("contree://guide/{section}", "guide", "A section of the usage guide (quickstart, workflow, state, …)"),
    ]
}

/// Parses a `contree://` URI; the error says what was wrong. Segments are percent-decoded
/// (a tag holding `/` is written `%2F`); the path after `read/` or `ls/` may hold `/`.
pub fn parse(uri: &str) -> Result<Resource, String> {
    let rest = uri.strip_prefix(SCHEME).ok_or_else(|| format!("{uri:?} is not a {SCHEME} resource"))?;
    let segments: Vec<String> = rest.split('/').map(decode).collect::<Result<_, _>>()?;
    let path = |tail: &[String]| format!("/{}", tail.join("/").trim_start_matches('/'));
    let named = |s: &String| !s.is_empty();
    match segments.as_slice() {
        [kind, image, action, tail @ ..] if kind == "image" && named(image) => match action.as_str() {
            "read" if tail.iter().any(named) => Ok(Resource::Read { image: image.clone(), path: path(tail) }),
            "ls" => Ok(Resource::List { image: image.clone(), path: path(tail) }),
            "lineage" if tail.is_empty() => Ok(Resource::Lineage { image: image.clone() }),
            _ => Err(format!("{uri:?}: after the image comes read/PATH, ls/PATH or lineage")),
        },
        [ops, kind, id] if ops == "operations" && named(id) => {
            let kind = match kind.as_str() {
                "instance" => OperationKind::Instance,
                "import" => OperationKind::ImageImport,
                _ => return Err(format!("{uri:?}: operations are instance/ID or import/ID")),
            };
            Ok(Resource::Operation { kind, id: id.clone() })
        }
        [guide, section] if guide == "guide" && named(section) => Ok(Resource::Guide { section: section.clone() }),
        _ => Err(format!(
            "{uri:?} names no resource: contree://image/IMAGE/read/PATH, …/ls/PATH, …/lineage, \
             contree://operations/instance/ID, contree://operations/import/ID or contree://guide/SECTION"
        )),
    }
}

/// `%XX` escapes decoded, as UTF-8.
fn decode(segment: &str) -> Result<String, String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
            out.push(hex.ok_or_else(|| format!("bad %-escape in {segment:?}"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{segment:?} is not UTF-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contree_uris_parse_and_mistakes_say_what_is_expected() {
        let read = |image: &str, path: &str| Resource::Read { image: image.into(), path: path.into() };
        assert_eq!(
            parse("contree://image/tag:busybox:latest/read/etc/passwd"),
            Ok(read("tag:busybox:latest", "/etc/passwd"))
        );
        assert_eq!(parse("contree://image/tag:a%2Fb:1/read//etc/x%20y"), Ok(read("tag:a/b:1", "/etc/x y")));
        let list = |path: &str| Resource::List { image: "u".into(), path: path.into() };
        assert_eq!(parse("contree://image/u/ls"), Ok(list("/")));
        assert_eq!(parse("contree://image/u/ls/etc/"), Ok(list("/etc/")));
        assert_eq!(parse("contree://image/u/lineage"), Ok(Resource::Lineage { image: "u".into() }));
        assert_eq!(
            parse("contree://operations/import/abc"),
            Ok(Resource::Operation { kind: OperationKind::ImageImport, id: "abc".into() })
        );
        assert_eq!(parse("contree://guide/state"), Ok(Resource::Guide { section: "state".into() }));
        for bad in [
            "file:///etc/passwd",
            "contree://image//read/x",
            "contree://image/u/read",
            "contree://image/u/read/",
            "contree://image/u/lineage/x",
            "contree://image/u/cat/x",
            "contree://operations/build/1",
            "contree://operations/instance/",
            "contree://guide",
            "contree://image/u/read/%zz",
            "contree://image/u/read/%ff",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(templates().len(), 6);
    }
}
