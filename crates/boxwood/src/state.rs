//! Keeps the state dir private: the server's umask, the state dir's own mode and owner, and a
//! start-up fix-up of what older versions left group- or world-accessible.
//!
//! Everything the server creates gets its mode from the umask ([`PRIVATE_UMASK`]: files 0600,
//! dirs 0700); the few files another uid must open are handed over as fds, never by path
//! (see "The QEMU jail" in docs/ARCHITECTURE.md). The unpacked layer trees older versions
//! kept (`images/trees/`) are left to the image store, which removes them when it opens.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// No bit for group or others on anything the server (or a QEMU it spawns) creates.
pub const PRIVATE_UMASK: u32 = 0o077;

/// The subtree the fix-up leaves alone (relative to the state dir).
const TREES: &str = "images/trees";

/// How many changed paths are logged one by one; the rest only counted.
const LOG_EACH: usize = 20;

/// Sets the process umask to [`PRIVATE_UMASK`]; call before anything creates a file.
pub fn set_private_umask() {
    // Process-wide, which is the point: every thread and child (QEMU included) creates
    // files private to its owner.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(PRIVATE_UMASK));
}

/// What [`prepare`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fixed {
    /// Entries whose group/other bits were removed: (path, old mode, new mode).
    pub modes: Vec<(PathBuf, u32, u32)>,
    /// The state dir's owner was changed to the server's uid (from this uid).
    pub owner_from: Option<u32>,
}

/// Creates the state dir 0700 owned by the server's uid, or makes an existing one so, and
/// removes group/other bits from everything under it except `images/trees/` (symlinks
/// skipped: their mode means nothing, and they are never followed). Logs what it changed.
pub fn prepare(state_dir: &Path) -> anyhow::Result<Fixed> {
    set_private_umask();
    fs::create_dir_all(state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
    let mut fixed = Fixed::default();
    let meta = fs::symlink_metadata(state_dir).with_context(|| format!("reading {}", state_dir.display()))?;
    anyhow::ensure!(meta.is_dir(), "the state dir {} is not a directory", state_dir.display());
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        std::os::unix::fs::chown(state_dir, Some(me), None)
            .with_context(|| format!("making {} the server's own", state_dir.display()))?;
        tracing::warn!(dir = %state_dir.display(), from_uid = meta.uid(), to_uid = me, "took ownership of the state dir");
        fixed.owner_from = Some(meta.uid());
    }
    if meta.mode() & 0o7777 != 0o700 {
        fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", state_dir.display()))?;
        fixed.modes.push((state_dir.to_owned(), meta.mode() & 0o7777, 0o700));
    }
    let skip = state_dir.join(TREES);
    let mut stack = vec![state_dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot check the modes under a state-dir entry");
                continue;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path == skip {
                continue;
            }
            let Ok(meta) = fs::symlink_metadata(&path) else { continue };
            if meta.file_type().is_symlink() {
                continue;
            }
            let mode = meta.mode() & 0o7777;
            if mode & 0o077 != 0 {
                let new = mode & 0o700;
                fs::set_permissions(&path, fs::Permissions::from_mode(new))
                    .with_context(|| format!("chmod {new:o} {}", path.display()))?;
                fixed.modes.push((path.clone(), mode, new));
            }
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    for (path, old, new) in fixed.modes.iter().take(LOG_EACH) {
        tracing::warn!(path = %path.display(), old = format!("{old:04o}"), new = format!("{new:04o}"), "made a state-dir entry private");
    }
    if !fixed.modes.is_empty() {
        tracing::warn!(
            count = fixed.modes.len(),
            dir = %state_dir.display(),
            "removed group/other permissions left by an older version under the state dir (images/trees/ excepted)"
        );
    }
    Ok(fixed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn creates_the_state_dir_private() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("a/state");
        let fixed = prepare(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
        assert!(fixed.modes.is_empty(), "{fixed:?}");
        fs::write(state.join("new"), b"x").unwrap();
        assert_eq!(mode(&state.join("new")), 0o600, "the umask makes new files private");
        fs::create_dir(state.join("d")).unwrap();
        assert_eq!(mode(&state.join("d")), 0o700);
    }

    #[test]
    fn fixes_an_older_state_dir_but_not_the_trees() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let set = |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
        for d in ["blobs/sha256/ab", "images/layers", "images/trees/x/usr/bin", "guest/templates/k"] {
            fs::create_dir_all(state.join(d)).unwrap();
        }
        let files = ["boxwood.db", "boxwood.db-wal", "blobs/sha256/ab/abcd", "images/layers/l.erofs", "guest/vmlinux"];
        for f in files.iter().chain(&["images/trees/x/usr/bin/su", "guest/templates/k/ram"]) {
            fs::write(state.join(f), b"x").unwrap();
            set(&state.join(f), 0o644);
        }
        set(&state.join("images/trees/x/usr/bin/su"), 0o4755);
        set(&state.join("guest/templates/k/ram"), 0o600);
        let dirs = ["blobs", "blobs/sha256", "blobs/sha256/ab", "images", "images/layers", "guest", "guest/templates"];
        for d in dirs.iter().chain(&["", "guest/templates/k", "images/trees", "images/trees/x"]) {
            set(&state.join(d), 0o755);
        }
        std::os::unix::fs::symlink("/etc/passwd", state.join("link")).unwrap();
        let link_mode = mode(&state.join("link"));

        let fixed = prepare(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
        for f in files {
            assert_eq!(mode(&state.join(f)), 0o600, "{f}");
        }
        for d in dirs.iter().chain(&["guest/templates/k"]) {
            assert_eq!(mode(&state.join(d)), 0o700, "{d}");
        }
        assert_eq!(mode(&state.join("guest/templates/k/ram")), 0o600);
        assert_eq!(mode(&state.join("images/trees")), 0o755, "the trees are the image store's");
        assert_eq!(mode(&state.join("images/trees/x/usr/bin/su")), 0o4755);
        assert_eq!(mode(&state.join("link")), link_mode, "symlinks are left alone");
        assert_eq!(mode(Path::new("/etc/passwd")), 0o644, "and never followed");
        assert_eq!(fixed.modes.len(), 1 + files.len() + dirs.len() + 1, "{fixed:?}");
        assert!(fixed.modes.contains(&(state.join("boxwood.db"), 0o644, 0o600)));

        assert!(prepare(&state).unwrap().modes.is_empty(), "a second start changes nothing");
    }

    #[test]
    fn refuses_a_state_path_that_is_not_a_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        fs::write(&f, b"").unwrap();
        assert!(prepare(&f).is_err());
    }
}
