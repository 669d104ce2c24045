//! The image tree: persisted runs, deep chains, image metadata, tags and lineage.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::TestServer;

fn stdout(op: &Value) -> String {
    op["metadata"]["result"]["stdout"]["value"].as_str().unwrap_or_default().to_owned()
}

async fn base_uuid(s: &TestServer) -> String {
    let r = s.req(Method::GET, "/inspect/?tag=busybox:latest").send().await.unwrap();
    r.headers()["location"].to_str().unwrap().trim_end_matches('/').to_owned()
}

#[tokio::test]
async fn persisted_runs_make_child_images_and_leave_parents_untouched() {
    let s = TestServer::start().await;
    let base = base_uuid(&s).await;
    let (op, frames) = s.run(json!({"command": "true", "shell": true, "image": base.clone()})).await;
    assert_eq!(op["result_image_uuid"], base.as_str(), "no change: the source image");
    assert_eq!(op["result"], json!({"image": base, "tag": null}));
    assert_eq!(frames.last().unwrap().data["data"]["result_image_uuid"], base.as_str());

    let (op, frames) = s
        .run(json!({"command": "mkdir -p /data && echo chained > /data/state.txt; exit 3", "shell": true,
                    "image": base.clone()}))
        .await;
    assert_eq!(op["status"], "SUCCESS");
    assert_eq!(op["metadata"]["result"]["state"]["exit_code"], 3, "a failing command still saves its changes");
    let child = op["result_image_uuid"].as_str().unwrap().to_owned();
    assert_ne!(child, base);
    assert_eq!(op["result"]["image"], child.as_str());
    assert!(op["image_size"].as_i64().unwrap() >= 8, "bytes written: {}", op["image_size"]);
    let completion = &frames.last().unwrap().data["data"];
    assert_eq!(
        (completion["result_image_uuid"].as_str(), completion["image_size_bytes"].as_i64()),
        (Some(child.as_str()), op["image_size"].as_i64())
    );

    let (op, _) = s
        .run(json!({"command": "cat /data/state.txt", "shell": true, "image": child.clone(), "disposable": true}))
        .await;
    assert_eq!(stdout(&op), "chained\n");
    let (op, _) = s.run(json!({"command": "test -e /data && echo present || echo absent", "shell": true, "image": base.clone(), "disposable": true})).await;
    assert_eq!(stdout(&op), "absent\n", "the parent is untouched");

    let (status, lineage) = s.get_json(&format!("/images/{child}/lineage")).await;
    assert_eq!(status, StatusCode::OK, "{lineage}");
    assert_eq!(lineage["parent"], base.as_str());
    assert_eq!(lineage["ancestors"][0]["uuid"], base.as_str());
    let (_, parent_lineage) = s.get_json(&format!("/images/{base}/lineage")).await;
    assert!(parent_lineage["children"].as_array().unwrap().iter().any(|c| c["uuid"] == child.as_str()));
    let (_, image) = s.get_json(&format!("/inspect/{child}/")).await;
    assert!(image["operation_uuid"].is_string(), "own images name the operation that made them: {image}");
    s.stop().await;
}

/// Twenty chained persisted runs, each deleting, renaming, chmodding and linking things; the
/// final image must hold exactly the expected tree (and a deep chain must keep working).
#[tokio::test]
async fn twenty_step_chain_keeps_every_change() {
    let s = TestServer::start().await;
    let mut image = base_uuid(&s).await;
    let (op, _) = s
        .run(json!({"command": "mkdir -p /w && cd /w && for i in 0 1 2 3 4 5 6 7 8 9; do echo f$i > f$i; done && mkdir d && echo x > d/x",
                    "shell": true, "image": image}))
        .await;
    image = op["result_image_uuid"].as_str().unwrap().to_owned();
    for step in 0..20 {
        let cmd = format!(
            "cd /w && rm -f f{del} && if [ -e f{src} ]; then mv f{src} r{step}; fi && echo s{step} > s{step} && chmod 0{mode} s{step} \
             && ln -sf s{step} l{step} && ln -f s{step} h{step} && rm -rf d && mkdir d && echo {step} > d/x",
            del = step % 10,
            src = (step + 5) % 10,
            mode = [600, 640, 700, 755][step % 4],
        );
        let (op, _) = s.run(json!({"command": cmd, "shell": true, "image": image})).await;
        assert_eq!(op["metadata"]["result"]["state"]["exit_code"], 0, "step {step}: {}", op["metadata"]["result"]);
        let next = op["result_image_uuid"].as_str().unwrap().to_owned();
        assert_ne!(next, image, "step {step} changed the filesystem");
        image = next;
    }
    let listing = "cd /w && for f in $(ls -A | sort); do \
        if [ -L $f ]; then echo \"$f link $(readlink $f)\"; \
        elif [ -d $f ]; then echo \"$f dir $(stat -c %a $f) $(ls -A $f | tr '\\n' ' ')\"; \
        else echo \"$f file $(stat -c '%a %h' $f) $(cat $f)\"; fi; done; cat d/x";
    let (op, _) = s.run(json!({"command": listing, "shell": true, "image": image, "disposable": true})).await;
    let got = stdout(&op);
    // Replay the same steps on a model of the directory.
    use std::collections::BTreeMap;
    let mut files: BTreeMap<String, String> = (0..10).map(|i| (format!("f{i}"), format!("file 644 1 f{i}"))).collect();
    for step in 0..20 {
        files.remove(&format!("f{}", step % 10));
        if let Some(v) = files.remove(&format!("f{}", (step + 5) % 10)) {
            files.insert(format!("r{step}"), v);
        }
        let mode = [600, 640, 700, 755][step % 4];
        files.insert(format!("s{step}"), format!("file {mode} 2 s{step}"));
        files.insert(format!("h{step}"), format!("file {mode} 2 s{step}"));
        files.insert(format!("l{step}"), format!("link s{step}"));
    }
    files.insert("d".into(), "dir 755 x ".into());
    let mut want: String = files.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
    want.push_str("19\n");
    let mut got_lines: Vec<&str> = got.lines().collect();
    let mut want_lines: Vec<&str> = want.lines().collect();
    let (got_last, want_last) = (got_lines.pop(), want_lines.pop());
    got_lines.sort();
    want_lines.sort();
    assert_eq!(got_lines, want_lines, "the tree after 20 persisted steps");
    assert_eq!(got_last, want_last, "a directory removed and recreated holds only its new content");

    // 21 generations deep, the stack stays within the VM's disks: a deeper one has its top
    // layers merged in the background (waited for by a run from it).
    let db = boxwood_store::SqliteStore::open(&s.state.as_ref().unwrap().path().join("boxwood.db")).await.unwrap();
    let uuid: uuid::Uuid = image.parse().unwrap();
    let depth = |db: boxwood_store::SqliteStore| async move {
        boxwood_store::Store::get_image(&db, uuid).await.unwrap().unwrap().layers.len()
    };
    let disks = boxwood_vm::LAYER_SLOTS;
    let mut settled = depth(db.clone()).await;
    assert!(settled <= disks + 1, "stack depth after 21 generations: {settled}");
    for _ in 0..100 {
        if settled <= disks {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        settled = depth(db.clone()).await;
    }
    assert!(settled <= disks, "background compaction keeps the stack mountable (depth {settled})");
    assert!(settled < 22, "21 generations were merged somewhere (depth {settled})");

    // What compaction replaced is removed, not kept beside its merge: every layer file is one
    // an image names (once the background compactions are done), and a restart finds nothing
    // to reclaim either.
    let layers_dir = s.state.as_ref().unwrap().path().join("images/layers");
    let files = || -> std::collections::HashSet<String> {
        std::fs::read_dir(&layers_dir)
            .unwrap()
            .map(|e| format!("sha256:{}", e.unwrap().file_name().to_string_lossy().trim_end_matches(".erofs")))
            .collect()
    };
    let referenced = || async { boxwood_store::Store::referenced_layers(&db).await.unwrap() };
    let mut unreferenced = files().len() - referenced().await.len();
    for _ in 0..100 {
        if unreferenced == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        unreferenced = files().difference(&referenced().await).count();
    }
    let (on_disk, named) = (files(), referenced().await);
    assert_eq!(on_disk, named, "layer files are exactly the layers images name");
    eprintln!("{} layer files for 22 images after the compactions", on_disk.len());
    let dir = s.stop().await.unwrap();
    let s = TestServer::start_in(dir, |_| {}).await;
    assert_eq!(files(), named, "nothing left for the start-up sweep");
    s.stop().await;
}

#[tokio::test]
async fn preserve_env_and_cwd_become_image_metadata() {
    let s = TestServer::start().await;
    let (op, _) = s
        .run(json!({"command": "true", "shell": true, "image": "tag:busybox:latest", "env": {"KEEP": "1", "PATH": "/bin:/usr/bin"},
                    "preserve_env": true, "cwd": "/srv/app", "preserve_cwd": true}))
        .await;
    let img = op["result_image_uuid"].as_str().unwrap().to_owned();
    let (op, _) =
        s.run(json!({"command": "echo $KEEP; pwd", "shell": true, "image": img.clone(), "disposable": true})).await;
    assert_eq!(stdout(&op), "1\n/srv/app\n", "env and workdir carried by the image");
    let (op, _) = s
        .run(json!({"command": "true", "shell": true, "image": img.clone(), "env": {"KEEP": ""}, "preserve_env": true}))
        .await;
    let img2 = op["result_image_uuid"].as_str().unwrap().to_owned();
    assert_ne!(img2, img, "a metadata-only change is a new image");
    let (op, _) =
        s.run(json!({"command": "echo \"${KEEP-unset}\"", "shell": true, "image": img2, "disposable": true})).await;
    assert_eq!(stdout(&op), "unset\n", "an empty value removes the variable");
    s.stop().await;
}

#[tokio::test]
async fn tags_move_resolve_and_delete() {
    let s = TestServer::start().await;
    let (op, _) = s.run(json!({"command": "echo t > /tagged", "shell": true, "image": "tag:busybox:latest"})).await;
    let child = op["result_image_uuid"].as_str().unwrap().to_owned();
    let tag = |t: &str| json!({"tag": t});
    let r =
        s.req(Method::PATCH, &format!("/images/{child}/tag")).json(&tag("conformance/tagged:1")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!((body["uuid"].as_str(), body["tag"].as_str()), (Some(child.as_str()), Some("conformance/tagged:1")));
    let (op, _) = s
        .run(json!({"command": "cat /tagged", "shell": true, "image": "tag:conformance/tagged:1", "disposable": true}))
        .await;
    assert_eq!(stdout(&op), "t\n");
    let (status, bad_prefix) = s.get_json("/images?tag=conformance/").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a prefix ending in a separator is not tag syntax: {bad_prefix}");
    let (_, listed) = s.get_json("/images?tag=conformance").await;
    assert_eq!(listed["images"].as_array().unwrap().len(), 1);
    for bad in ["bad tag", "", ":x"] {
        let r = s.req(Method::PATCH, &format!("/images/{child}/tag")).json(&tag(bad)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad:?}");
    }
    let r =
        s.req(Method::PATCH, &format!("/images/{}/tag", uuid::Uuid::new_v4())).json(&tag("a:1")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // Shadowing the public busybox:latest in this namespace, then falling back to it.
    let public = base_uuid(&s).await;
    let r = s.req(Method::PATCH, &format!("/images/{child}/tag")).json(&tag("busybox:latest")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(base_uuid(&s).await, child, "a namespace tag shadows the public one");
    let r = s.req(Method::DELETE, &format!("/images/{child}/tag?tag=busybox:latest")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(base_uuid(&s).await, public, "deleting it tracks the public image again");
    let r = s.req(Method::DELETE, &format!("/images/{child}/tag?tag=busybox:latest")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = s.req(Method::DELETE, &format!("/images/{child}/tag")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = s.req(Method::GET, "/inspect/?tag=conformance/tagged:1").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "all tags removed");
    s.stop().await;
}
