//! Reading tar member names and PAX times the same way wherever layers are unpacked (the
//! guest's diff layers here, OCI layers in `boxwood-oci`).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// A member name as a relative path of normal components: `.` and empty components dropped
/// (so `./a//b/` is `a/b`, and `./` is the empty path, the root); absolute or `..` refused.
pub fn member_path(raw: &[u8]) -> Result<PathBuf, String> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path".into());
    }
    if raw.contains(&0) {
        return Err("NUL byte in path".into());
    }
    let mut rel = PathBuf::new();
    for component in Path::new(OsStr::from_bytes(raw)).components() {
        match component {
            Component::Normal(part) => rel.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("`..` component in path".into()),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path".into()),
        }
    }
    Ok(rel)
}

/// A PAX time `[-]secs[.frac]` as (seconds, nanoseconds ≥ 0).
pub fn pax_time(value: &str) -> Option<(i64, u32)> {
    let (secs, frac) = value.split_once('.').unwrap_or((value, ""));
    let negative = secs.starts_with('-');
    let secs: i64 = secs.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let nanos: u32 = digits.parse().ok()?;
    if negative && nanos > 0 { Some((secs - 1, 1_000_000_000 - nanos)) } else { Some((secs, nanos)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_are_normalised_or_refused() {
        assert_eq!(member_path(b"./a//b/").unwrap(), PathBuf::from("a/b"));
        assert_eq!(member_path(b"./").unwrap(), PathBuf::new());
        assert!(member_path(b"/etc/passwd").is_err());
        assert!(member_path(b"a/../../x").is_err());
        assert!(member_path(b"..").is_err());
        assert!(member_path(b"a\0b").is_err());
    }

    #[test]
    fn pax_times_parse() {
        assert_eq!(pax_time("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(pax_time("1700000000.5"), Some((1_700_000_000, 500_000_000)));
        assert_eq!(pax_time("-1.25"), Some((-2, 750_000_000)));
        assert_eq!(pax_time("12x"), None);
    }
}
