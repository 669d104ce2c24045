//! Abuse: a local user reads the server's state. After a run, an upload and a persisted run,
//! an unprivileged uid can neither list the state dir nor read the database (event logs, env
//! values), an upload, a layer or a guest asset, and no entry under the state dir (the
//! unpacked image trees aside: the image store's part) is group- or world-accessible, not
//! even behind the dir; a state dir an older version left open is made private at start.
//! Each probe is first shown to work where access is allowed.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::harness::TestServer;

/// A uid with no business in the state dir (`nobody`).
const OTHER_UID: u32 = 65534;

/// What a probe as `uid` (gid the same, no supplementary groups) got.
#[derive(Debug, PartialEq)]
enum Probe {
    Ok(Vec<u8>),
    Denied,
    Other(String),
}

/// `ls` (a dir) or reads the first 64 bytes (a file) as `uid`.
fn probe(uid: u32, path: &Path) -> Probe {
    let mut cmd = if path.is_dir() { Command::new("ls") } else { Command::new("head") };
    if !path.is_dir() {
        cmd.args(["-c", "64"]);
    }
    let out = cmd.arg(path).uid(uid).gid(uid).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        Probe::Ok(out.stdout)
    } else if err.contains("Permission denied") {
        Probe::Denied
    } else {
        Probe::Other(err)
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn files_in(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    v.sort();
    v
}

/// The state's secrets after some use: (label, path, a prefix its contents start with).
struct Secrets {
    db: PathBuf,
    files: Vec<(&'static str, PathBuf, Vec<u8>)>,
}

/// Uploads a file, runs a disposable command and a persisted one; returns what to probe.
async fn use_the_server(s: &TestServer, state: &Path) -> Secrets {
    let upload = s.upload(b"tenant-upload-secret\n".to_vec()).await;
    let sha = upload["sha256"].as_str().unwrap().to_owned();
    let (op, _) =
        s.run(json!({"command": "echo $SECRET", "shell": true, "env": {"SECRET": "s3cr3t"}, "disposable": true})).await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    let (op, _) = s.run(json!({"command": "echo persisted > /kept", "shell": true})).await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    let db = state.join("boxwood.db");
    let layers = files_in(&state.join("images/layers"), ".erofs");
    assert!(layers.len() >= 2, "the base and the persisted run's layer: {layers:?}");
    let kernel = files_in(&state.join("guest"), "").into_iter().find(|p| {
        p.file_name().unwrap().to_string_lossy().starts_with("vmlinux-")
            || p.file_name().unwrap().to_string_lossy().starts_with("initramfs-")
    });
    let mut files = vec![
        ("database", db.clone(), b"SQLite format 3".to_vec()),
        ("upload", state.join("blobs/sha256").join(&sha[..2]).join(&sha), b"tenant-upload-secret".to_vec()),
        ("layer", layers.last().unwrap().clone(), Vec::new()),
        ("bootstrap token", state.join("bootstrap-token"), s.token.as_bytes().to_vec()),
    ];
    if let Some(k) = kernel {
        files.push(("guest asset", k, Vec::new()));
    }
    for wal in ["boxwood.db-wal", "boxwood.db-shm"] {
        if state.join(wal).exists() {
            files.push(("database log", state.join(wal), Vec::new()));
        }
    }
    Secrets { db, files }
}

/// Every path from `state` down to `file`'s dir (the dirs a reader must traverse).
fn dirs_to(state: &Path, file: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![state.to_owned()];
    let mut at = state.to_owned();
    for part in file.parent().unwrap().strip_prefix(state).unwrap().components() {
        at = at.join(part);
        dirs.push(at.clone());
    }
    dirs
}

/// Entries of the state dir two levels down (the image trees' contents aside).
fn top_entries(state: &Path) -> Vec<PathBuf> {
    let mut out = vec![state.to_owned()];
    for e in std::fs::read_dir(state).unwrap().flatten() {
        out.push(e.path());
        if e.path().is_dir() && !e.file_type().unwrap().is_symlink() {
            out.extend(std::fs::read_dir(e.path()).unwrap().flatten().map(|e| e.path()));
        }
    }
    out.retain(|p| !p.starts_with(state.join("images/trees")) || p == &state.join("images/trees"));
    out
}

fn scan_state(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/scan-state.sh");
    let out = Command::new(script).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test]
async fn a_local_user_cannot_read_the_state() {
    let s = TestServer::start().await;
    let state = s.state.as_ref().unwrap().path().to_owned();
    let secrets = use_the_server(&s, &state).await;

    // Positive control: root reads every secret and lists the dir; the probe tells success
    // from a denial.
    assert!(matches!(probe(0, &state), Probe::Ok(ref l) if String::from_utf8_lossy(l).contains("boxwood.db")));
    for (what, path, starts) in &secrets.files {
        match probe(0, path) {
            Probe::Ok(body) => assert!(body.starts_with(starts), "{what}: {}", path.display()),
            other => panic!("root cannot read the {what} {}: {other:?}", path.display()),
        }
    }

    // The attack: a local user lists the state dir and reads each secret.
    assert_eq!(probe(OTHER_UID, &state), Probe::Denied, "the state dir is listed");
    for (what, path, _) in &secrets.files {
        assert_eq!(probe(OTHER_UID, path), Probe::Denied, "the {what} {} is read", path.display());
    }
    for p in top_entries(&state) {
        let md = std::fs::symlink_metadata(&p).unwrap();
        if md.file_type().is_symlink() {
            continue;
        }
        assert_eq!(md.mode() & 0o077, 0, "{} is {:o}", p.display(), md.mode() & 0o7777);
        let vm_dir = p.parent() == Some(&state.join("run"));
        assert!(md.uid() == 0 || vm_dir, "{} is owned by {}", p.display(), md.uid());
    }

    // Behind the dir, each file is private too: with every dir on the way made traversable
    // (not listable), the files still refuse, and one made world-readable does not.
    let mut opened = Vec::new();
    for (_, path, _) in &secrets.files {
        for d in dirs_to(&state, path) {
            if !opened.contains(&d) {
                opened.push(d.clone());
                chmod(&d, 0o711);
            }
        }
    }
    for (what, path, _) in &secrets.files {
        assert_eq!(probe(OTHER_UID, path), Probe::Denied, "the {what} {} is read behind an open dir", path.display());
    }
    let (_, blob, content) = &secrets.files[1];
    chmod(blob, 0o644);
    assert!(matches!(probe(OTHER_UID, blob), Probe::Ok(ref b) if b.starts_with(content)), "control: a 0644 blob");
    chmod(blob, 0o600);
    for d in opened.iter().rev() {
        chmod(d, 0o700);
    }

    // The state scan agrees on the live state (the inert image trees included), and sees a
    // world-readable database when there is one.
    let pid = std::process::id().to_string();
    let (ok, out) = scan_state(&[state.as_os_str(), pid.as_ref()]);
    assert!(ok, "the scan finds the state open:\n{out}");
    chmod(&secrets.db, 0o644);
    let (ok, out) = scan_state(&[state.as_os_str()]);
    chmod(&secrets.db, 0o600);
    assert!(!ok && out.contains("boxwood.db"), "the scan misses a world-readable database:\n{out}");
    s.stop().await;
}

#[tokio::test]
async fn an_older_state_dir_is_made_private_at_start() {
    let s = TestServer::start().await;
    let state = s.state.as_ref().unwrap().path().to_owned();
    let mut secrets = use_the_server(&s, &state).await;
    let dir = s.stop().await.unwrap();
    // A clean shutdown checkpoints the database: its -wal and -shm are gone or left empty
    // (nothing to read in them), so only files that still hold bytes are probed.
    secrets.files.retain(|(_, path, _)| path.metadata().is_ok_and(|m| m.len() > 0));

    // As an older version left it: dirs 0755, files 0644.
    for (_, path, _) in &secrets.files {
        for d in dirs_to(&state, path) {
            chmod(&d, 0o755);
        }
        chmod(path, 0o644);
    }
    for (what, path, starts) in &secrets.files {
        assert!(
            matches!(probe(OTHER_UID, path), Probe::Ok(ref b) if b.starts_with(starts)),
            "control: the open {what} {} is readable",
            path.display()
        );
    }

    let s = TestServer::start_in(dir, |_| {}).await;
    assert_eq!(probe(OTHER_UID, &state), Probe::Denied, "the state dir is listed");
    for (what, path, _) in &secrets.files {
        assert_eq!(probe(OTHER_UID, path), Probe::Denied, "the {what} {} is read", path.display());
        assert_eq!(mode(path), 0o600, "{what}");
        for d in dirs_to(&state, path) {
            assert_eq!(mode(&d), 0o700, "{}", d.display());
        }
    }
    // VMs still boot from the now-private guest assets.
    let (op, _) = s.run(json!({"command": "echo booted", "shell": true, "disposable": true})).await;
    assert_eq!(op["metadata"]["result"]["stdout"]["value"], "booted\n", "{op}");
    s.stop().await;
}
