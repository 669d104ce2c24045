//! Imports from a real `docker-registry`: tags, digests, indexes, auth, mirrors and failures.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use boxwood_oci::{Credentials, ImageSource, Importer, OciError, RegistryConfig, parse_source};
use common::*;

fn importer(work: &Path) -> Importer {
    // The test registry listens on loopback, which imports may reach only when allowed.
    let config = RegistryConfig { allow_hosts: vec!["127.0.0.1".into()], ..RegistryConfig::default() };
    Importer::new(config, work.join("work"))
}

fn src(s: &str) -> ImageSource {
    parse_source(s).unwrap()
}

fn creds(user: &str, pass: &str) -> Credentials {
    Credentials { username: user.into(), password: pass.into() }
}

fn empty(tree: &Path) -> bool {
    std::fs::read_dir(tree).unwrap().next().is_none()
}

fn scratch_left(work: &Path) -> Vec<String> {
    match std::fs::read_dir(work.join("work")) {
        Ok(d) => d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    }
}

async fn import_into(
    imp: &Importer,
    s: &ImageSource,
    c: Option<&Credentials>,
    tmp: &Path,
    name: &str,
) -> Result<boxwood_oci::Imported, OciError> {
    let tree = tmp.join(name);
    std::fs::create_dir(&tree).unwrap();
    imp.import(s, c, &tree).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_by_tag_and_digest_with_whiteouts_and_env() {
    let reg = TestRegistry::start(None).await;
    let pushed =
        reg.pusher().image("app/base", "v1", "amd64", &["PATH=/bin", "GREETING=hello=world"], &standard_layers()).await;
    let tmp = tempfile::tempdir().unwrap();
    let imp = importer(tmp.path());

    let by_tag = src(&format!("docker://{}/app/base:v1", reg.host));
    let resolved = imp.resolve(&by_tag, None).await.unwrap();
    assert_eq!(resolved.manifest_digest, pushed.manifest_digest);
    assert_eq!(resolved.config_digest, pushed.config_digest);

    let imported = import_into(&imp, &by_tag, None, tmp.path(), "t1").await.unwrap();
    assert_eq!(imported.resolved, resolved);
    assert_eq!(
        imported.env,
        BTreeMap::from([("GREETING".into(), "hello=world".into()), ("PATH".into(), "/bin".into())])
    );
    assert!(imported.content_bytes > 1_000_000, "busybox counted: {}", imported.content_bytes);
    check_standard_tree(&tmp.path().join("t1"));

    let by_digest = src(&format!("docker://{}/app/base@{}", reg.host, pushed.manifest_digest));
    let again = import_into(&imp, &by_digest, None, tmp.path(), "t2").await.unwrap();
    assert_eq!(again.resolved, resolved);
    check_standard_tree(&tmp.path().join("t2"));
    assert!(scratch_left(tmp.path()).is_empty(), "scratch files left: {:?}", scratch_left(tmp.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_picks_linux_amd64() {
    let reg = TestRegistry::start(None).await;
    let p = reg.pusher();
    let arm_layer = LayerBuilder::new().file("arch", b"arm64").build();
    let amd_layer = LayerBuilder::new().file("arch", b"amd64").build();
    let arm = p.image("multi", "arm", "arm64", &[], &[(arm_layer, LAYER_GZIP)]).await;
    let amd = p.image("multi", "amd", "amd64", &["ARCH=amd64"], &[(amd_layer, LAYER_GZIP)]).await;
    let entry = |d: &Pushed, arch: &str| {
        serde_json::json!({"mediaType": OCI_MANIFEST, "digest": d.manifest_digest, "size": d.manifest_size,
            "platform": {"os": "linux", "architecture": arch}})
    };
    let index = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [entry(&arm, "arm64"), entry(&amd, "amd64")]}))
    .unwrap();
    p.manifest("multi", "latest", OCI_INDEX, &index).await;
    let arm_only = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [entry(&arm, "arm64")]}))
    .unwrap();
    p.manifest("multi", "armonly", OCI_INDEX, &arm_only).await;

    let tmp = tempfile::tempdir().unwrap();
    let imp = importer(tmp.path());
    let imported =
        import_into(&imp, &src(&format!("docker://{}/multi:latest", reg.host)), None, tmp.path(), "t").await.unwrap();
    assert_eq!(imported.resolved.manifest_digest, amd.manifest_digest);
    assert_eq!(imported.resolved.config_digest, amd.config_digest);
    assert_eq!(std::fs::read(tmp.path().join("t/arch")).unwrap(), b"amd64");
    assert_eq!(imported.env["ARCH"], "amd64");

    let err = imp.resolve(&src(&format!("docker://{}/multi:armonly", reg.host)), None).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, OciError::NoPlatform { .. }), "{err}");
    assert!(err.to_string().contains("linux/arm64"), "{err}");
    // A single-arch arm64 image pulled by tag is refused as well.
    let err =
        import_into(&imp, &src(&format!("docker://{}/multi:arm", reg.host)), None, tmp.path(), "t2").await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, OciError::NoPlatform { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth() {
    let reg = TestRegistry::start(Some(("alice", "s3cret"))).await;
    let layer = LayerBuilder::new().file("hello", b"world").build();
    reg.pusher().image("private/app", "v1", "amd64", &["A=1"], &[(layer, LAYER_GZIP)]).await;
    let tmp = tempfile::tempdir().unwrap();
    let imp = importer(tmp.path());
    let s = src(&format!("docker://{}/private/app:v1", reg.host));

    let ok = import_into(&imp, &s, Some(&creds("alice", "s3cret")), tmp.path(), "ok").await.unwrap();
    assert_eq!(ok.env["A"], "1");
    assert_eq!(std::fs::read(tmp.path().join("ok/hello")).unwrap(), b"world");

    let err = import_into(&imp, &s, Some(&creds("alice", "wrong")), tmp.path(), "bad").await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, OciError::Unauthorized { credentials_given: true, .. }), "{err}");
    assert!(err.to_string().contains("rejected the credentials"), "{err}");
    assert!(empty(&tmp.path().join("bad")));

    let err = imp.resolve(&s, None).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, OciError::Unauthorized { credentials_given: false, .. }), "{err}");
    assert!(err.to_string().contains("requires credentials"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_exchange() {
    let reg = TestRegistry::start(None).await;
    let layer = LayerBuilder::new().file("tok", b"en").build();
    let pushed = reg.pusher().image("tok/app", "v1", "amd64", &[], &[(layer, LAYER_ZSTD)]).await;
    let gate = bearer::start(&reg.host, "bob", "pw").await;
    let tmp = tempfile::tempdir().unwrap();
    let imp = importer(tmp.path());
    let s = src(&format!("docker://{gate}/tok/app:v1"));

    let ok = import_into(&imp, &s, Some(&creds("bob", "pw")), tmp.path(), "ok").await.unwrap();
    assert_eq!(ok.resolved.manifest_digest, pushed.manifest_digest);
    assert_eq!(std::fs::read(tmp.path().join("ok/tok")).unwrap(), b"en");

    let err = imp.resolve(&s, Some(&creds("bob", "nope"))).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, OciError::Unauthorized { credentials_given: true, .. }), "{err}");
    let err = imp.resolve(&s, None).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, OciError::Unauthorized { credentials_given: false, .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_and_unreachable() {
    let reg = TestRegistry::start(None).await;
    let layer = LayerBuilder::new().file("f", b"f").build();
    reg.pusher().image("exists", "v1", "amd64", &[], &[(layer, LAYER_GZIP)]).await;
    let tmp = tempfile::tempdir().unwrap();
    let imp = importer(tmp.path());

    for missing in ["exists:nope", "nosuchrepo:v1"] {
        let err = imp.resolve(&src(&format!("docker://{}/{missing}", reg.host)), None).await.unwrap_err();
        eprintln!("{err}");
        assert!(matches!(err, OciError::NotFound { .. }), "{missing}: {err}");
    }
    let err =
        imp.resolve(&src(&format!("docker://{}/exists@sha256:{}", reg.host, "0".repeat(64))), None).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, OciError::NotFound { .. }), "{err}");

    let closed = free_port();
    let err = imp.resolve(&src(&format!("docker://127.0.0.1:{closed}/x:y")), None).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, OciError::Connect { .. }), "{err}");
    assert!(err.to_string().to_lowercase().contains("connection refused"), "{err}");

    let err = imp.resolve(&src("docker://no-such-host.invalid/x:y"), None).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, OciError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("no-such-host.invalid"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_and_corrupt_blobs_are_refused() {
    let reg = TestRegistry::start(None).await;
    let p = reg.pusher();
    let l1 = LayerBuilder::new().file("first", b"1").build();
    let l2 = LayerBuilder::new().file("second", &vec![b'2'; 4096]).build();
    p.image("tamper", "v1", "amd64", &[], &[(l1, LAYER_TAR), (l2.clone(), LAYER_TAR)]).await;
    // Same length, different bytes: the registry serves it, the digest check must catch it.
    let blob = reg.blob_file(&digest_of(&l2));
    let mut bytes = std::fs::read(&blob).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let imp = importer(tmp.path());
    let err =
        import_into(&imp, &src(&format!("docker://{}/tamper:v1", reg.host)), None, tmp.path(), "t").await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, OciError::DigestMismatch { .. }), "{err}");
    assert!(empty(&tmp.path().join("t")), "nothing published");
    assert!(scratch_left(tmp.path()).is_empty(), "scratch left: {:?}", scratch_left(tmp.path()));

    // Valid digest, but not gzip/tar inside.
    let mut garbage = vec![0x1f, 0x8b, 0x08, 0x00];
    garbage.extend_from_slice(&[0x55; 200]);
    let digest = p.blob("corrupt", &garbage).await;
    let config = config_json("amd64", &[], std::slice::from_ref(&digest));
    let config_digest = p.blob("corrupt", &config).await;
    let manifest = |layer_type: &str| {
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": layer_type, "digest": digest, "size": garbage.len()}]}))
        .unwrap()
    };
    p.manifest("corrupt", "v1", OCI_MANIFEST, &manifest(LAYER_GZIP)).await;
    p.manifest("corrupt", "bz", OCI_MANIFEST, &manifest("application/vnd.oci.image.layer.v1.tar+bzip2")).await;
    let err =
        import_into(&imp, &src(&format!("docker://{}/corrupt:v1", reg.host)), None, tmp.path(), "c").await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, OciError::CorruptLayer { .. }), "{err}");
    assert!(empty(&tmp.path().join("c")));
    let err = imp.resolve(&src(&format!("docker://{}/corrupt:bz", reg.host)), None).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, OciError::UnsupportedMediaType { .. }), "{err}");
    assert!(err.to_string().contains("bzip2"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_hub_names_go_to_the_mirror() {
    let reg = TestRegistry::start(None).await;
    let layer = LayerBuilder::new().file("mirrored", b"yes").build();
    let pushed = reg.pusher().image("library/busybox", "latest", "amd64", &["M=1"], &[(layer, LAYER_GZIP)]).await;
    let tmp = tempfile::tempdir().unwrap();
    let config = RegistryConfig {
        mirrors: BTreeMap::from([("docker.io".into(), vec![format!("http://{}", reg.host)])]),
        ..RegistryConfig::default()
    };
    let imp = Importer::new(config, tmp.path().join("work"));
    for s in ["docker://docker.io/library/busybox:latest", "docker://busybox"] {
        let tree = tmp.path().join(s.replace(['/', ':'], "_"));
        std::fs::create_dir(&tree).unwrap();
        let imported = imp.import(&src(s), None, &tree).await.unwrap();
        assert_eq!(imported.resolved.manifest_digest, pushed.manifest_digest, "{s}");
        assert_eq!(std::fs::read(tree.join("mirrored")).unwrap(), b"yes");
    }
    // A mirror that lacks the image: its "not found" is reported, not the offline upstream's DNS failure.
    let err = imp.resolve(&src("docker://docker.io/library/alpine:3"), None).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, OciError::NotFound { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_import_cleans_up() {
    let reg = TestRegistry::start(None).await;
    // Incompressible content so the download takes a moment.
    let mut big = vec![0u8; 32 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in big.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let layer = LayerBuilder::new().file("big", &big).build();
    reg.pusher().image("big", "v1", "amd64", &[], &[(layer, LAYER_GZIP)]).await;
    let tmp = tempfile::tempdir().unwrap();
    // A stale scratch dir from a "crashed" import is swept by the next one.
    std::fs::create_dir_all(tmp.path().join("work/import-deadbeef/x")).unwrap();
    let imp = importer(tmp.path());
    let tree = tmp.path().join("t");
    std::fs::create_dir(&tree).unwrap();
    let s = src(&format!("docker://{}/big:v1", reg.host));
    let res = tokio::time::timeout(std::time::Duration::from_millis(30), imp.import(&s, None, &tree)).await;
    assert!(res.is_err(), "import should not finish in 30 ms");
    // Any blocking apply step notices the cancellation and empties the tree.
    for _ in 0..100 {
        if scratch_left(tmp.path()).is_empty() && empty(&tree) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(scratch_left(tmp.path()).is_empty(), "scratch left: {:?}", scratch_left(tmp.path()));
    assert!(empty(&tree), "tree left: {:?}", list_tree(&tree));
    // And a full import still works afterwards.
    let imported = imp.import(&s, None, &tree).await.unwrap();
    assert_eq!(imported.content_bytes, 32 << 20);
}

/// A Bearer-token gate in front of the test registry: `/token` hands out a token for Basic
/// credentials; `/v2/…` requires it and forwards to the registry.
mod bearer {
    use axum::body::Body;
    use axum::extract::{Request, State};
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;

    #[derive(Clone)]
    struct Gate {
        upstream: String,
        realm: String,
        basic: String,
    }

    pub async fn start(upstream: &str, user: &str, pass: &str) -> String {
        use base64_free::encode;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Gate {
            upstream: format!("http://{upstream}"),
            realm: format!("http://{addr}/token"),
            basic: format!("Basic {}", encode(format!("{user}:{pass}").as_bytes())),
        };
        let app = axum::Router::new().route("/token", get(token)).fallback(proxy).with_state(gate);
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr.to_string()
    }

    async fn token(State(g): State<Gate>, headers: HeaderMap) -> Response {
        match headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
            Some(a) if a == g.basic => {
                ([(header::CONTENT_TYPE, "application/json")], r#"{"token":"tok-123"}"#).into_response()
            }
            Some(_) => (StatusCode::UNAUTHORIZED, "bad credentials").into_response(),
            // Like Docker Hub: anonymous tokens exist but grant nothing on private repos.
            None => ([(header::CONTENT_TYPE, "application/json")], r#"{"token":"anonymous"}"#).into_response(),
        }
    }

    async fn proxy(State(g): State<Gate>, req: Request) -> Response {
        let authorized =
            req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) == Some("Bearer tok-123");
        if !authorized {
            let challenge = format!(r#"Bearer realm="{}",service="test",scope="repository:tok/app:pull""#, g.realm);
            return (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, challenge)], "").into_response();
        }
        let mut upstream = reqwest::Client::new().get(format!("{}{}", g.upstream, req.uri()));
        if let Some(a) = req.headers().get(header::ACCEPT) {
            upstream = upstream.header(header::ACCEPT, a.as_bytes());
        }
        let resp = upstream.send().await.unwrap();
        let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
        let ct = resp.headers().get("content-type").map(|v| v.to_str().unwrap_or("").to_string()).unwrap_or_default();
        let body = resp.bytes().await.unwrap();
        (status, [(header::CONTENT_TYPE, ct)], Body::from(body)).into_response()
    }

    /// Base64 without another dependency.
    mod base64_free {
        pub fn encode(input: &[u8]) -> String {
            const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let mut out = String::new();
            for chunk in input.chunks(3) {
                let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
                let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
                for i in 0..4 {
                    if i <= chunk.len() {
                        out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
                    } else {
                        out.push('=');
                    }
                }
            }
            out
        }
    }
}
