//! Tar export read back with the `tar` crate.

use std::collections::BTreeMap;
use std::io::Read;

use tar::EntryType;

use super::{BUSYBOX, T0, fixture, write};
use crate::ImageError;
use crate::inspect::ImageView;

/// One member as read back.
#[derive(Debug)]
struct Member {
    kind: EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    uname: Option<String>,
    gname: Option<String>,
    mtime: u64,
    link: Option<String>,
    body: Vec<u8>,
}

/// Archives `path`, checks the stream is a complete tar, returns members in order.
fn archive(view: &ImageView, path: &str) -> Vec<(String, Member)> {
    let mut out = Vec::new();
    view.write_archive(path, &mut out).unwrap();
    assert_eq!(out.len() % 512, 0);
    assert!(out.ends_with(&[0; 1024]));
    let mut members = Vec::new();
    let mut ar = tar::Archive::new(out.as_slice());
    for entry in ar.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
        let header = entry.header().clone();
        let link = entry.link_name_bytes().map(|l| String::from_utf8(l.into_owned()).unwrap());
        let mut body = Vec::new();
        entry.read_to_end(&mut body).unwrap();
        members.push((
            name,
            Member {
                kind: header.entry_type(),
                mode: header.mode().unwrap(),
                uid: header.uid().unwrap(),
                gid: header.gid().unwrap(),
                uname: header.username().unwrap().filter(|s| !s.is_empty()).map(str::to_owned),
                gname: header.groupname().unwrap().filter(|s| !s.is_empty()).map(str::to_owned),
                mtime: header.mtime().unwrap(),
                link,
                body,
            },
        ));
    }
    members
}

fn names(members: &[(String, Member)]) -> Vec<&str> {
    members.iter().map(|(n, _)| n.as_str()).collect()
}

#[test]
fn directory_archive_is_rooted_at_its_basename() {
    let fx = fixture();
    let view = fx.view();
    let members = archive(&view, "/etc");
    assert_eq!(names(&members), ["etc/", "etc/group", "etc/hosts", "etc/lib", "etc/passwd", "etc/x"]);
    let by_name: BTreeMap<&str, &Member> = members.iter().map(|(n, m)| (n.as_str(), m)).collect();
    let etc = by_name["etc/"];
    assert_eq!((etc.kind, etc.mode, etc.mtime), (EntryType::Directory, 0o755, T0 as u64));
    let hosts = by_name["etc/hosts"];
    assert_eq!((hosts.kind, hosts.mode, hosts.uid, hosts.gid), (EntryType::Regular, 0o644, 0, 0));
    assert_eq!((hosts.uname.as_deref(), hosts.gname.as_deref()), (Some("root"), Some("root")));
    assert_eq!((hosts.mtime, hosts.body.as_slice()), (T0 as u64, &b"10.0.0.1 boxwood\n"[..]));
    let lib = by_name["etc/lib"];
    assert_eq!((lib.kind, lib.link.as_deref()), (EntryType::Symlink, Some("/usr/share")));
    assert_eq!(by_name["etc/x"].link.as_deref(), Some("/etc/passwd"));

    // hardlinks, FIFOs, hidden files, unknown owners; symlinks are not followed
    let members = archive(&view, "/srv");
    assert_eq!(
        names(&members),
        [
            "srv/",
            "srv/.hidden",
            "srv/fifo",
            "srv/gone.txt/",
            "srv/link/",
            "srv/link/hard1",
            "srv/link/hard2",
            "srv/linkdir",
            "srv/orphan"
        ]
    );
    let by_name: BTreeMap<&str, &Member> = members.iter().map(|(n, m)| (n.as_str(), m)).collect();
    assert_eq!(by_name["srv/link/hard1"].body, b"same inode root\n");
    let hard2 = by_name["srv/link/hard2"];
    assert_eq!((hard2.kind, hard2.link.as_deref()), (EntryType::Link, Some("srv/link/hard1")));
    assert!(hard2.body.is_empty());
    assert_eq!((by_name["srv/fifo"].kind, by_name["srv/fifo"].mode), (EntryType::Fifo, 0o640));
    let orphan = by_name["srv/orphan"];
    assert_eq!((orphan.uid, orphan.gid, orphan.uname.as_deref()), (4242, 4343, None));
    assert_eq!(by_name["srv/linkdir"].kind, EntryType::Symlink);

    // a symlink to a directory is followed for the requested path, named as requested
    let members = archive(&view, "/etc/lib");
    assert_eq!(names(&members), ["lib/", "lib/doc/", "lib/doc/notes.md", "lib/doc/readme.txt"]);
}

#[test]
fn file_and_root_archives() {
    let fx = fixture();
    let view = fx.view();
    let members = archive(&view, "/bin/sh");
    assert_eq!(names(&members), ["sh"]);
    assert_eq!((members[0].1.kind, members[0].1.mode), (EntryType::Regular, 0o755));
    assert_eq!(members[0].1.body, BUSYBOX);

    let members = archive(&view, "/");
    let all = names(&members);
    assert_eq!(all[..3], ["a/", "a/b", "a/up"]);
    assert!(all.iter().all(|n| !n.starts_with('/') && !n.starts_with("removed_dir")));
    assert!(all.contains(&"etc/hosts") && all.contains(&"opt/data/c.txt") && !all.contains(&"opt/data/a.txt"));
    assert!(!all.contains(&"etc/old.conf"));
    assert_eq!(archive(&view, "/a/up").len(), members.len() + 1, "named `up/`, with a root member");

    assert!(matches!(view.write_archive("/srv/fifo", &mut Vec::new()), Err(ImageError::NotRegular { .. })));
    assert!(matches!(view.write_archive("/nope", &mut Vec::new()), Err(ImageError::NotFound { .. })));
    assert!(matches!(view.write_archive("/dangling", &mut Vec::new()), Err(ImageError::NotFound { .. })));
}

#[test]
fn long_names_and_links_use_pax_headers() {
    let fx = fixture();
    let long_dir = "d".repeat(150);
    let long_file = format!("{}.txt", "f".repeat(120));
    write(&fx.layers[0].join("deep").join(&long_dir).join(&long_file), b"deep\n", 0o600);
    let target = format!("/{}", "t".repeat(200));
    std::os::unix::fs::symlink(&target, fx.layers[0].join("deep/longlink")).unwrap();
    crate::inert::make_inert(&fx.layers[0]).unwrap();
    let view = fx.view();
    let members = archive(&view, "/deep");
    let file_name = format!("deep/{long_dir}/{long_file}");
    assert_eq!(names(&members), ["deep/".to_owned(), format!("deep/{long_dir}/"), file_name, "deep/longlink".into()]);
    assert_eq!(members[2].1.body, b"deep\n");
    assert_eq!(members[2].1.mode, 0o600);
    assert_eq!(members[3].1.link.as_deref(), Some(target.as_str()));
}
