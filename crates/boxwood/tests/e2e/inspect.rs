//! Reading images without a VM: listings, downloads, archives and grep over the merged layers,
//! including images made by runs (whiteouts, symlinks that try to escape the rootfs).

use std::io::Read;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::TestServer;

async fn get(s: &TestServer, path: &str) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
    let r = s.req(Method::GET, path).send().await.unwrap();
    (r.status(), r.headers().clone(), r.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn inspect_lists_reads_archives_and_greps_without_a_vm() {
    let s = TestServer::start().await;
    // A child image that deletes, escapes and dangles.
    let (op, _) = s
        .run(json!({"command": "rm /etc/hostname; ln -s ../../../../etc/passwd /escape; ln -s /nowhere /dangling; \
                                mkdir -p /srv && echo 'root of srv' > /srv/note && ln /srv/note /srv/hard",
                    "shell": true, "image": "tag:busybox:latest"}))
        .await;
    let img = op["result_image_uuid"].as_str().unwrap().to_owned();
    let base = format!("/inspect/{img}");

    let (status, listing) = s.get_json(&format!("{base}/list?path=/")).await;
    assert_eq!(status, StatusCode::OK, "{listing}");
    assert_eq!(listing["path"], "/");
    let files = listing["files"].as_array().unwrap();
    let bin = files.iter().find(|f| f["path"] == "bin").expect("bin listed");
    for key in [
        "size",
        "path",
        "owner",
        "group",
        "uid",
        "gid",
        "mode",
        "mtime",
        "nlink",
        "is_dir",
        "is_regular",
        "is_symlink",
        "is_socket",
        "is_fifo",
        "symlink_to",
    ] {
        assert!(bin.get(key).is_some(), "FileItem.{key}");
    }
    assert_eq!((bin["is_dir"].as_bool(), bin["mode"].as_u64().map(|m| m & 0o170000)), (Some(true), Some(0o040000)));
    assert_eq!(bin["owner"], "root");
    let escape = files.iter().find(|f| f["path"] == "escape").unwrap();
    assert_eq!(
        (escape["is_symlink"].as_bool(), escape["symlink_to"].as_str()),
        (Some(true), Some("../../../../etc/passwd"))
    );
    let (_, etc) = s.get_json(&format!("{base}/list?path=/etc")).await;
    let names: Vec<&str> = etc["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert!(names.contains(&"passwd") && !names.contains(&"hostname"), "the run's deletion shows: {names:?}");
    let (status, _, text) = get(&s, &format!("{base}/list?path=/etc&text=1")).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(text).unwrap();
    assert!(
        text.starts_with("total ") && text.lines().any(|l| l.starts_with("-rw-r--r-- ") && l.ends_with(" passwd")),
        "{text}"
    );

    let (status, headers, passwd) = get(&s, &format!("{base}/download?path=/etc/passwd")).await;
    assert_eq!((status, headers["content-type"].to_str().unwrap()), (StatusCode::OK, "application/octet-stream"));
    assert!(passwd.starts_with(b"root:x:0:0:"));
    let (status, _, escaped) = get(&s, &format!("{base}/download?path=/escape")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(escaped, passwd, "a `..` symlink resolves inside the image, never to the host's files");
    for (path, want) in [
        ("/dangling", StatusCode::NOT_FOUND),
        ("/etc", StatusCode::UNPROCESSABLE_ENTITY),
        ("/etc/hostname", StatusCode::NOT_FOUND),
        ("/bin/sh", StatusCode::OK),
    ] {
        let r = s.req(Method::HEAD, &format!("{base}/download?path={path}")).send().await.unwrap();
        assert_eq!(r.status(), want, "HEAD download {path}");
    }
    let (status, body) = s.get_json(&format!("{base}/list?path=/etc/passwd")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, _) = s.get_json(&format!("{base}/list")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "path is required");

    let (status, headers, tar) = get(&s, &format!("{base}/archive?path=/srv")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-disposition"], "attachment; filename=\"srv.tar\"");
    let mut archive = tar::Archive::new(&tar[..]);
    let mut members = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut e = entry.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let kind = e.header().entry_type();
        let mut body = String::new();
        e.read_to_string(&mut body).unwrap();
        members.push((name, kind, body));
    }
    assert_eq!(members[0].0.trim_end_matches('/'), "srv", "rooted at the directory's basename");
    // The two names of one inode: the first in walk order carries the bytes, the other links.
    let pair: Vec<_> = members.iter().filter(|(n, _, _)| n == "srv/note" || n == "srv/hard").collect();
    assert_eq!(pair.len(), 2, "{members:?}");
    assert!(pair[0].1.is_file() && pair[0].2 == "root of srv\n", "{members:?}");
    assert!(pair[1].1.is_hard_link(), "{members:?}");
    let r = s.req(Method::HEAD, &format!("{base}/archive?path=/nope")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // contree-cli `export` keeps the body as served: gzip when the client accepts it.
    let r = s
        .req(Method::GET, &format!("{base}/archive?path=/etc"))
        .header("Accept-Encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-encoding"], "gzip");
    let gz = r.bytes().await.unwrap();
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut plain).unwrap();
    let names: Vec<String> = tar::Archive::new(&plain[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(names.contains(&"etc/passwd".to_owned()), "{names:?}");

    let (status, grep) = s.get_json(&format!("{base}/grep?pattern=%5Eroot:&path=/etc")).await;
    assert_eq!(status, StatusCode::OK, "{grep}");
    assert_eq!(grep["path"], "/etc");
    let matches = grep["matches"].as_array().unwrap();
    assert_eq!(
        matches.iter().map(|m| m["path"].as_str().unwrap()).collect::<Vec<_>>(),
        vec!["/etc/group", "/etc/passwd"]
    );
    let m = &matches[1];
    assert_eq!((m["line_number"].as_u64(), m["type"].as_str()), (Some(1), Some("match")));
    assert_eq!(m["submatches"][0], json!({"text": "root:", "start": 0, "end": 5}));
    let (_, none) = s.get_json(&format!("{base}/grep?pattern=no-such-text-anywhere&path=/etc")).await;
    assert_eq!((none["matches"].clone(), none["truncated"].clone()), (json!([]), json!(false)));
    let (_, many) = s.get_json(&format!("{base}/grep?pattern=x&path=/etc&max_total=1")).await;
    assert_eq!((many["matches"].as_array().unwrap().len(), many["truncated"].as_bool()), (1, Some(true)));
    for bad in ["grep?path=/etc", "grep?pattern=(&path=/etc", "grep?pattern=x&case=loud", "grep?pattern=x&max_count=-1"]
    {
        let (status, body) = s.get_json(&format!("{base}/{bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    let (status, _) = s.get_json(&format!("{base}/grep?pattern=x&path=/missing")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let _: Value = grep;
    s.stop().await;
}
