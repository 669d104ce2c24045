//! Abuse: a tenant plants setuid-root files, setgid dirs, FIFOs, whiteouts and symlinks to
//! host secrets through a persisted run (`chmod u+s` in the guest, `files` with mode 4755) and
//! through an imported archive; the VM must still see them exactly, and the host's image store
//! must hold nothing live: its layers are private erofs files (data, never a host tree), and a
//! scan finds only private dirs and files.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::TestServer;

fn stdout(op: &Value) -> String {
    op["metadata"]["result"]["stdout"]["value"].as_str().unwrap_or_default().to_owned()
}

/// What the scan flags: anything but a 0700 directory or a 0600 regular file owned by the
/// server, or an xattr other than the tree's own record.
fn live_entries(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(path) = stack.pop() {
        let m = path.symlink_metadata().unwrap();
        let private = m.mode() == 0o040700 || m.mode() == 0o100600;
        let mut names = xattr_names(&path);
        names.retain(|n| n != boxwood_image::inert::META_XATTR);
        if !private || m.uid() != 0 || !names.is_empty() {
            found.push(format!("{} mode {:o} uid {} xattrs {names:?}", path.display(), m.mode(), m.uid()));
        }
        if m.is_dir() {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    found
}

fn xattr_names(path: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 65536];
    let n = rustix::fs::llistxattr(path, &mut buf[..]).unwrap_or(0);
    buf[..n].split(|&b| b == 0).filter(|n| !n.is_empty()).map(|n| String::from_utf8_lossy(n).into_owned()).collect()
}

/// A `docker save` archive of one layer holding a setuid-root shell, a setgid dir and a
/// symlink to the host's shadow file.
fn hostile_archive() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, kind: tar::EntryType, mode: u32, link: Option<&str>, body: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(body.len() as u64);
        if let Some(link) = link {
            h.set_link_name(link).unwrap();
        }
        h.set_path(name).unwrap();
        h.set_cksum();
        b.append(&h, body).unwrap();
    };
    add("rootsh", tar::EntryType::Regular, 0o4755, None, b"#!/bin/sh\nexec /bin/sh\n");
    add("sgid/", tar::EntryType::Directory, 0o2777, None, b"");
    add("shadow", tar::EntryType::Symlink, 0o777, Some("/etc/shadow"), b"");
    crate::harness::docker_archive(&b.into_inner().unwrap())
}

#[tokio::test]
async fn planted_setuid_files_devices_and_symlinks_are_inert_on_the_host() {
    let s = TestServer::start().await;
    let state: PathBuf = s.state.as_ref().unwrap().path().to_owned();

    // A persisted run as root: setuid and setgid bits, a FIFO, a whiteout (the deleted
    // /etc/group), a symlink to a host secret, and an uploaded file with mode 4755.
    let tool = s.upload(b"#!/bin/sh\necho tool\n".to_vec()).await;
    let (op, _) = s
        .run(json!({"command": "cp /bin/busybox /suid && chmod 4755 /suid && mkdir /sg && chmod 2777 /sg \
                                && mkfifo /fifo && rm /etc/group && ln -s /etc/shadow /shadow-link \
                                && mknod /null c 1 3; true",
                    "shell": true, "image": "tag:busybox:latest",
                    "files": {"/opt/tool": {"uuid": tool["uuid"], "mode": "0o104755"}}}))
        .await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    let persisted = op["result_image_uuid"].as_str().unwrap().to_owned();

    // An import of an archive holding a setuid-root file, a setgid dir and a symlink.
    let archive = s.upload(hostile_archive()).await;
    let r = s
        .req(Method::POST, "/images/import")
        .json(&json!({"registry": {"url": format!("docker-archive:upload:{}", archive["uuid"].as_str().unwrap())}}))
        .send()
        .await
        .unwrap();
    let id = r.json::<Value>().await.unwrap()["uuid"].as_str().unwrap().to_owned();
    let op = s.wait_as(&s.token, &id).await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    let imported = op["result"]["image"].as_str().unwrap().to_owned();

    // Positive control: the guest sees every bit exactly as planted.
    let (op, _) = s
        .run(json!({"command": "stat -c '%n %a %u %F' /suid /sg /fifo /shadow-link /opt/tool; \
                                test -e /etc/group && echo group-back || echo group-gone",
                    "shell": true, "image": persisted, "disposable": true}))
        .await;
    assert_eq!(
        stdout(&op),
        "/suid 4755 0 regular file\n/sg 2777 0 directory\n/fifo 644 0 fifo\n/shadow-link 777 0 symbolic link\n\
         /opt/tool 4755 0 regular file\ngroup-gone\n",
        "{op}"
    );
    let (_, listed) = s.get_json(&format!("/inspect/{imported}/list?path=/")).await;
    let files = listed["files"].as_array().unwrap();
    let mode_of = |name: &str| files.iter().find(|f| f["path"] == name).map(|f| f["mode"].clone());
    assert_eq!(mode_of("rootsh"), Some(json!(0o104755)), "{listed}");
    assert_eq!(mode_of("sgid"), Some(json!(0o042777)), "{listed}");
    assert_eq!(mode_of("shadow"), Some(json!(0o120777)), "{listed}");
    let (_, op) = {
        let r = s.req(Method::GET, &format!("/inspect/{imported}/download?path=/shadow")).send().await.unwrap();
        (r.status(), r.text().await.unwrap())
    };
    assert!(!op.contains("root:"), "the image's symlink never reaches the host's shadow file");

    // The scanner sees a live setuid file (its positive control) …
    let control = state.join("scan-control");
    std::fs::write(&control, b"x").unwrap();
    std::fs::set_permissions(&control, std::os::unix::fs::PermissionsExt::from_mode(0o4755)).unwrap();
    assert_eq!(live_entries(&control).len(), 1, "the scan flags a live setuid file");
    std::fs::remove_file(&control).unwrap();
    // … and finds nothing live in the image store: no tree outlives its commit, each layer is
    // one private erofs file.
    let images = state.join("images");
    let found = live_entries(&images);
    assert!(found.is_empty(), "live entries in the image store:\n{}", found.join("\n"));
    let layers = std::fs::read_dir(images.join("layers")).unwrap().count();
    assert!(layers >= 3, "base, persisted and imported layers scanned: {layers}");
    assert_eq!(std::fs::read_dir(images.join("tmp")).map(|d| d.count()).unwrap_or(0), 0, "no staging tree left");
    s.stop().await;
}
