//! Importing images through the API from a real `docker-registry` on loopback: tags, env,
//! dedup of unchanged re-imports, docker.io mirrors, readable failures; then running and
//! inspecting the imported image.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::harness::TestServer;

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `docker-registry serve` on a free loopback port, killed on drop.
pub(crate) struct Registry {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    pub host: String,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    pub async fn start() -> Self {
        assert!(
            std::path::Path::new("/usr/bin/docker-registry").exists(),
            "install docker-registry (scripts/install-deps.sh)"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{ level: warn }}\nstorage: {{ filesystem: {{ rootdirectory: {} }} }}\nhttp: {{ addr: 127.0.0.1:{port}, secret: s }}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let host = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while reqwest::get(format!("http://{host}/v2/")).await.map(|r| r.status() != 200).unwrap_or(true) {
            assert!(Instant::now() < deadline, "docker-registry did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Registry { child, _dir: dir, host }
    }

    async fn blob(&self, http: &reqwest::Client, repo: &str, bytes: &[u8]) -> String {
        let d = digest(bytes);
        let r = http.post(format!("http://{}/v2/{repo}/blobs/uploads/", self.host)).send().await.unwrap();
        let loc = r.headers()["location"].to_str().unwrap().to_owned();
        let loc = if loc.starts_with("http") { loc } else { format!("http://{}{loc}", self.host) };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = http.put(format!("{loc}{sep}digest={d}")).body(bytes.to_vec()).send().await.unwrap();
        assert_eq!(r.status(), 201);
        d
    }

    /// Pushes a one-layer busybox image whose config sets `env`.
    async fn push_busybox(&self, repo: &str, tag: &str, env: &[&str]) {
        let src = tempfile::tempdir().unwrap();
        boxwood_image::build_busybox_tree(std::path::Path::new("/bin/busybox"), src.path()).unwrap();
        // The tree is inert on the host; its tar export carries the image's real metadata.
        let mut tar = Vec::new();
        let images = tempfile::tempdir().unwrap();
        let view = boxwood_image::ImageView::of_trees(&[src.path().to_owned()], images.path()).unwrap();
        view.write_archive("/", &mut tar).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        let layer = gz.finish().unwrap();
        let http = reqwest::Client::new();
        let layer_digest = self.blob(&http, repo, &layer).await;
        let config = serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux", "config": {"Env": env},
            "rootfs": {"type": "layers", "diff_ids": [digest(&tar)]}}))
        .unwrap();
        let config_digest = self.blob(&http, repo, &config).await;
        let manifest = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer.len()}]}))
        .unwrap();
        let r = http
            .put(format!("http://{}/v2/{repo}/manifests/{tag}", self.host))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(manifest)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
}

/// Starts an import and polls it to the end, as the clients do.
pub(crate) async fn import(s: &TestServer, body: Value) -> Value {
    let r = s.req(Method::POST, "/images/import").json(&body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(r.headers()["location"].to_str().unwrap().starts_with("/v1/operations/"));
    let id = r.json::<Value>().await.unwrap()["uuid"].as_str().unwrap().to_owned();

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, op) = s.get_json(&format!("/operations/{id}")).await;
        if matches!(op["status"].as_str(), Some("SUCCESS" | "FAILED" | "CANCELLED")) {
            return op;
        }
        assert!(Instant::now() < deadline, "import did not finish: {op}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn imports_run_inspect_dedup_and_fail_readably() {
    let reg = Registry::start().await;
    reg.push_busybox("team/tools", "v1", &["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "IMPORTED=yes=really"]).await;
    reg.push_busybox("library/busybox", "latest", &["PATH=/bin"]).await;
    let mirror = format!("http://{}", reg.host);
    let s = TestServer::start_with(|c| {
        c.registry.mirrors.insert("docker.io".into(), vec![mirror.clone()]);
    })
    .await;

    let url = format!("docker://{}/team/tools:v1", reg.host);
    let op = import(
        &s,
        json!({"registry": {"url": url, "credentials": {"username": "u", "password": "secret-pw"}},
                               "tag": "tools:v1"}),
    )
    .await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    assert_eq!(op["kind"], "image_import");
    assert_eq!(op["image_uuid"], Value::Null);
    let image = op["result"]["image"].as_str().unwrap().to_owned();
    assert_eq!(op["result"], json!({"image": image, "tag": "tools:v1"}));
    assert_eq!(op["result_image_uuid"], image.as_str());
    assert_eq!(op["metadata"]["registry"]["credentials"], json!({"username": "u", "password": "<MASKED>"}));
    assert!(!op.to_string().contains("secret-pw"), "the password never shows");

    let (run, _) = s
        .run(json!({"command": "echo $IMPORTED; cat /etc/os-release | head -1", "shell": true,
                                "image": "tag:tools:v1", "disposable": true}))
        .await;
    assert_eq!(run["metadata"]["result"]["stdout"]["value"], "yes=really\nNAME=\"Boxwood busybox\"\n", "{run}");
    let (status, listing) = s.get_json(&format!("/inspect/{image}/list?path=/bin")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(listing["files"].as_array().unwrap().iter().any(|f| f["path"] == "busybox"));

    let again = import(&s, json!({"registry": {"url": url}, "tag": "tools:again"})).await;
    assert_eq!(again["result"]["image"], image.as_str(), "an unchanged re-import yields the same image");

    let hub =
        import(&s, json!({"registry": {"url": "docker://docker.io/library/busybox:latest"}, "tag": "busybox:latest"}))
            .await;
    assert_eq!(hub["status"], "SUCCESS", "docker.io through the configured mirror: {hub}");
    let (_, tagged) = s.get_json("/images?tag=busybox").await;
    assert_eq!(tagged["images"][0]["uuid"], hub["result"]["image"], "the namespace's import shadows the public tag");

    let missing = import(&s, json!({"registry": {"url": format!("docker://{}/team/tools:nope", reg.host)}})).await;
    assert_eq!(missing["status"], "FAILED");
    assert!(missing["error"].as_str().unwrap().contains("not found"), "{missing}");
    let refused = import(&s, json!({"registry": {"url": "docker://127.0.0.1:1/x/y:z"}})).await;
    assert_eq!(refused["status"], "FAILED");
    assert!(refused["error"].as_str().unwrap().contains("cannot reach registry 127.0.0.1:1"), "{refused}");

    for (body, want) in [
        (json!({"registry": {"url": "ftp://nope"}}), StatusCode::BAD_REQUEST),
        (json!({"registry": {"url": url.clone()}, "tag": "bad tag"}), StatusCode::BAD_REQUEST),
        (json!({"registry": {"url": url.clone()}, "timeout": 0}), StatusCode::BAD_REQUEST),
        (json!({"tag": "x"}), StatusCode::BAD_REQUEST),
    ] {
        let r = s.req(Method::POST, "/images/import").json(&body).send().await.unwrap();
        assert_eq!(r.status(), want, "{body}");
    }
    let (_, ops) = s.get_json("/operations?kind=image_import").await;
    assert_eq!(ops.as_array().unwrap().len(), 5);
    s.stop().await;
}
