//! The host's extra CA certificates (`Setup.extra_ca_pem`) made visible to a run: each system
//! bundle the image has gets the extras appended, on an overlay layer of its own above the
//! image (so a persisted image, made from the upper layer, never holds them, and a tool that
//! regenerates a bundle replaces it as usual), and every process is told the bundle's path in
//! the env variables tools read.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt, chown};
use std::path::Path;

/// Where distributions keep their bundle (Go's list): Debian/Ubuntu/Alpine, Fedora/RHEL 6,
/// openSUSE, RHEL 7+, Alpine's alias. The first is made when the image has none.
const SYSTEM_BUNDLES: [&str; 5] = [
    "etc/ssl/certs/ca-certificates.crt",
    "etc/pki/tls/certs/ca-bundle.crt",
    "etc/ssl/ca-bundle.pem",
    "etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "etc/ssl/cert.pem",
];

/// OpenSSL (and Python's `ssl`, Go, Ruby), requests and pip, curl, Node.js.
const ENV_VARS: [&str; 4] = ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"];

/// A bundle larger than this in the image is left alone (no real one comes close).
const MAX_BUNDLE: u64 = 16 << 20;

/// Fills `layer` (an empty dir) with the image's bundles found under `root` plus `pem`;
/// returns the path (inside the root) the env variables name, or `None` if no bundle could be
/// placed (the image's `/etc/ssl/certs` is not a directory).
///
/// Runs before any process of the run, so nothing changes `root` meanwhile; symlinks are never
/// followed (a bundle that is a symlink is reached through its target, also in the list).
pub fn build_layer(root: &Path, layer: &Path, pem: &str) -> Result<Option<String>, String> {
    let mut first = None;
    for rel in SYSTEM_BUNDLES {
        if !parents_are_dirs(root, rel) {
            continue;
        }
        let path = root.join(rel);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() && m.len() <= MAX_BUNDLE => m,
            _ => continue,
        };
        let mut content = String::new();
        fs::File::open(&path)
            .and_then(|f| f.take(MAX_BUNDLE).read_to_string(&mut content))
            .map_err(|e| format!("read /{rel}: {e}"))?;
        place(root, layer, rel, &content, Some(&meta), pem)?;
        first.get_or_insert(rel);
    }
    if first.is_none() && parents_are_dirs(root, SYSTEM_BUNDLES[0]) {
        place(root, layer, SYSTEM_BUNDLES[0], "", None, pem)?;
        first = Some(SYSTEM_BUNDLES[0]);
    }
    Ok(first.map(|rel| format!("/{rel}")))
}

/// Adds the env variables naming `bundle` to `env`, leaving any the run set itself.
pub fn add_env(env: &mut Vec<(String, String)>, bundle: &str) {
    for var in ENV_VARS {
        if !env.iter().any(|(k, _)| k == var) {
            env.push((var.to_owned(), bundle.to_owned()));
        }
    }
}

/// Whether every parent of `rel` under `root` is a real directory or missing (from there on).
fn parents_are_dirs(root: &Path, rel: &str) -> bool {
    let mut dir = root.to_owned();
    for part in Path::new(rel).parent().into_iter().flat_map(Path::iter) {
        dir.push(part);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return false,
            Err(_) => return true,
        }
    }
    true
}

/// Writes `content` + `pem` at `rel` in `layer`. Its directories copy the image's owner and
/// mode, since overlayfs shows the topmost layer's for a merged directory.
fn place(
    root: &Path,
    layer: &Path,
    rel: &str,
    content: &str,
    meta: Option<&fs::Metadata>,
    pem: &str,
) -> Result<(), String> {
    let mut dir = layer.to_owned();
    let mut image_dir = root.to_owned();
    for part in Path::new(rel).parent().into_iter().flat_map(Path::iter) {
        dir.push(part);
        image_dir.push(part);
        if !dir.exists() {
            fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
            let (mode, uid, gid) = match fs::symlink_metadata(&image_dir) {
                Ok(m) => (m.mode() & 0o7777, m.uid(), m.gid()),
                Err(_) => (0o755, 0, 0),
            };
            set_owner_mode(&dir, uid, gid, mode)?;
        }
    }
    let file = layer.join(rel);
    let mut text = content.to_owned();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(pem);
    fs::write(&file, text).map_err(|e| format!("write {}: {e}", file.display()))?;
    let (mode, uid, gid) = meta.map_or((0o644, 0, 0), |m| (m.mode() & 0o777, m.uid(), m.gid()));
    set_owner_mode(&file, uid, gid, mode)
}

fn set_owner_mode(path: &Path, uid: u32, gid: u32, mode: u32) -> Result<(), String> {
    chown(path, Some(uid), Some(gid)).map_err(|e| format!("chown {}: {e}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| format!("chmod {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn me() -> (u32, u32) {
        let m = fs::metadata("/proc/self").unwrap();
        (m.uid(), m.gid())
    }

    #[test]
    fn image_bundles_get_the_extras_and_symlinks_are_left_alone() {
        let (root, layer) = (crate::testdir::tempdir("ca"), crate::testdir::tempdir("ca"));
        let (r, l) = (root.as_path(), layer.as_path());
        fs::create_dir_all(r.join("etc/ssl/certs")).unwrap();
        fs::set_permissions(r.join("etc/ssl"), fs::Permissions::from_mode(0o750)).unwrap();
        fs::write(r.join("etc/ssl/certs/ca-certificates.crt"), "SYSTEM").unwrap();
        std::os::unix::fs::symlink("certs/ca-certificates.crt", r.join("etc/ssl/cert.pem")).unwrap();
        let (uid, gid) = me();
        chown(r.join("etc/ssl/certs/ca-certificates.crt"), Some(uid), Some(gid)).unwrap();

        let bundle = build_layer(r, l, PEM).unwrap();
        assert_eq!(bundle.as_deref(), Some("/etc/ssl/certs/ca-certificates.crt"));
        assert_eq!(fs::read_to_string(l.join("etc/ssl/certs/ca-certificates.crt")).unwrap(), format!("SYSTEM\n{PEM}"));
        assert!(!l.join("etc/ssl/cert.pem").exists(), "a symlink bundle is reached through its target");
        assert!(!l.join("etc/pki").exists());
        assert_eq!(fs::metadata(l.join("etc/ssl")).unwrap().mode() & 0o7777, 0o750, "the image's dir mode");
        // The image itself is untouched.
        assert_eq!(fs::read_to_string(r.join("etc/ssl/certs/ca-certificates.crt")).unwrap(), "SYSTEM");
    }

    #[test]
    fn an_image_without_a_bundle_gets_the_extras_alone_unless_certs_is_a_symlink() {
        let (root, layer) = (crate::testdir::tempdir("ca"), crate::testdir::tempdir("ca"));
        assert_eq!(
            build_layer(root.as_path(), layer.as_path(), PEM).unwrap().as_deref(),
            Some("/etc/ssl/certs/ca-certificates.crt")
        );
        assert_eq!(fs::read_to_string(layer.as_path().join("etc/ssl/certs/ca-certificates.crt")).unwrap(), PEM);

        let (root, layer) = (crate::testdir::tempdir("ca"), crate::testdir::tempdir("ca"));
        fs::create_dir_all(root.as_path().join("etc/pki/tls/certs")).unwrap();
        fs::create_dir_all(root.as_path().join("etc/ssl")).unwrap();
        std::os::unix::fs::symlink("/etc/pki/tls/certs", root.as_path().join("etc/ssl/certs")).unwrap();
        fs::write(root.as_path().join("etc/pki/tls/certs/ca-bundle.crt"), "RHEL\n").unwrap();
        let bundle = build_layer(root.as_path(), layer.as_path(), PEM).unwrap();
        assert_eq!(bundle.as_deref(), Some("/etc/pki/tls/certs/ca-bundle.crt"));
        assert!(!layer.as_path().join("etc/ssl/certs").exists(), "a symlinked dir is never shadowed");
    }

    #[test]
    fn env_names_the_bundle_unless_the_run_set_it() {
        let mut env = vec![("CURL_CA_BUNDLE".to_owned(), "/mine".to_owned())];
        add_env(&mut env, "/etc/ssl/certs/ca-certificates.crt");
        assert_eq!(env.len(), 4);
        assert!(env.contains(&("CURL_CA_BUNDLE".into(), "/mine".into())));
        assert!(env.contains(&("SSL_CERT_FILE".into(), "/etc/ssl/certs/ca-certificates.crt".into())));
    }
}
