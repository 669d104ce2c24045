//! `vm.extra_ca_certs`: CA certificates the operator hands every guest (a TLS-intercepting
//! proxy's, a corporate CA). Read once when the runtime starts and kept as PEM text holding
//! certificates only: a private key that shares the file must never reach a guest.

use std::io::Read;
use std::path::PathBuf;

use crate::VmError;

/// Largest file read, and largest bundle handed to guests (it rides in every `Setup`).
const MAX_BYTES: u64 = 512 * 1024;

const BEGIN: &str = "-----BEGIN ";
const END: &str = "-----END ";

/// The certificates of `paths`, each file holding at least one; `None` without any path.
pub fn load(paths: &[PathBuf]) -> Result<Option<String>, VmError> {
    if paths.is_empty() {
        return Ok(None);
    }
    let mut bundle = String::new();
    for path in paths {
        let bad = |why: String| VmError::Invalid(format!("vm.extra_ca_certs: {}: {why}", path.display()));
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_BYTES + 1).read_to_string(&mut text))
            .map_err(|e| bad(e.to_string()))?;
        if text.len() as u64 > MAX_BYTES {
            return Err(bad(format!("larger than {MAX_BYTES} bytes")));
        }
        let certs = certificates(&text).map_err(bad)?;
        bundle.push_str(&certs);
    }
    if bundle.len() as u64 > MAX_BYTES {
        return Err(VmError::Invalid(format!("vm.extra_ca_certs: more than {MAX_BYTES} bytes of certificates")));
    }
    Ok(Some(bundle))
}

/// The `CERTIFICATE` blocks of `text`, normalised (text around them, e.g. comments, dropped).
/// Any other block (a key, a CSR) or a malformed one is an error.
fn certificates(text: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut lines = text.lines().map(str::trim);
    let mut count = 0;
    while let Some(line) = lines.next() {
        let Some(label) = line.strip_prefix(BEGIN).and_then(|l| l.strip_suffix("-----")) else {
            continue;
        };
        if label != "CERTIFICATE" {
            return Err(format!("holds a {label:?} block; only certificates may be given to guests"));
        }
        let mut body = Vec::new();
        loop {
            match lines.next() {
                None => return Err("a certificate has no END line".into()),
                Some(l) if l.starts_with(END) => {
                    if l != "-----END CERTIFICATE-----" {
                        return Err(format!("a certificate ends with {l:?}"));
                    }
                    break;
                }
                Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)) => {
                    body.push(l);
                }
                Some(_) => return Err("a certificate's body is not base64".into()),
            }
        }
        if body.is_empty() {
            return Err("a certificate is empty".into());
        }
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for l in body {
            out.push_str(l);
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
        count += 1;
    }
    if count == 0 {
        return Err("no PEM certificate in it".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\nYWJj+/0=\n-----END CERTIFICATE-----\n";

    #[test]
    fn certificates_are_kept_and_normalised() {
        let text = format!("# a comment\r\n{}\nsubject=CN = x\n  {CERT}", CERT.replace('\n', "\r\n"));
        assert_eq!(certificates(&text).unwrap(), format!("{CERT}{CERT}"));
    }

    #[test]
    fn keys_junk_and_empty_files_are_refused() {
        let key = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";
        assert!(certificates(&format!("{CERT}{key}")).unwrap_err().contains("PRIVATE KEY"));
        assert!(certificates("-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n").is_err());
        assert!(certificates("-----BEGIN CERTIFICATE-----\nMIIB\n").is_err());
        assert!(certificates("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n").is_err());
        assert!(certificates("nothing here\n").is_err());
    }

    #[test]
    fn files_are_read_bounded_and_joined() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, big) = (dir.path().join("a.crt"), dir.path().join("b.pem"), dir.path().join("big.crt"));
        std::fs::write(&a, CERT).unwrap();
        std::fs::write(&b, CERT).unwrap();
        std::fs::write(&big, "x".repeat(MAX_BYTES as usize + 1)).unwrap();
        assert_eq!(load(&[]).unwrap(), None);
        assert_eq!(load(&[a.clone(), b]).unwrap().unwrap(), format!("{CERT}{CERT}"));
        assert!(load(&[a.clone(), big]).unwrap_err().to_string().contains("larger than"));
        assert!(load(&[dir.path().join("missing")]).is_err());
    }
}
