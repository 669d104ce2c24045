//! Registry fetches cannot be pointed at the host or internal networks: not by an IP literal,
//! not by a name resolving there, not by a redirect or a token realm. Each probe first shows
//! the target would be reached when allowed.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::get;
use boxwood_oci::{Importer, OciError, RegistryConfig, parse_source};
use common::counting_listener;

fn importer(allow: &[&str]) -> (Importer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = RegistryConfig { allow_hosts: allow.iter().map(|s| s.to_string()).collect(), ..Default::default() };
    (Importer::new(config, dir.path().join("work")), dir)
}

async fn resolve(imp: &Importer, src: &str) -> Result<(), OciError> {
    imp.resolve(&parse_source(src).unwrap(), None).await.map(|_| ())
}

fn settle() {
    std::thread::sleep(Duration::from_millis(100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_and_internal_literals_are_refused_unless_allowed() {
    let (addr, hits) = counting_listener([127, 0, 0, 1].into());
    let src = format!("docker://127.0.0.1:{}/library/x:1", addr.port());
    // Positive control: allowed, the fetch reaches the listener.
    let (open, _d) = importer(&["127.0.0.1"]);
    let _ = resolve(&open, &src).await;
    settle();
    assert!(hits.load(Ordering::SeqCst) >= 1, "an allowed loopback registry is contacted");
    let before = hits.load(Ordering::SeqCst);

    let (imp, _d) = importer(&[]);
    let err = resolve(&imp, &src).await.unwrap_err();
    assert!(matches!(err, OciError::Blocked { .. }), "{err}");
    let err = resolve(&imp, &format!("docker://localhost:{}/library/x:1", addr.port())).await.unwrap_err();
    assert!(matches!(err, OciError::Blocked { .. }), "a name resolving to loopback: {err}");
    for internal in ["169.254.169.254", "10.1.2.3:5000", "192.168.0.1", "[::1]:5000", "[::ffff:127.0.0.1]:5000"] {
        let err = resolve(&imp, &format!("docker://{internal}/library/x:1")).await.unwrap_err();
        assert!(matches!(err, OciError::Blocked { .. }), "{internal}: {err}");
    }
    settle();
    assert_eq!(hits.load(Ordering::SeqCst), before, "nothing reached the listener");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_and_token_realms_cannot_reach_internal_hosts() {
    let (target, hits) = counting_listener([127, 0, 0, 2].into());
    let to = format!("http://127.0.0.2:{}/v2/library/x/manifests/1", target.port());
    let realm = format!("http://127.0.0.2:{}/token", target.port());
    let app = Router::new()
        .route("/v2/redirect/x/manifests/1", get(move || async move { (StatusCode::FOUND, [(header::LOCATION, to)]) }))
        .route(
            "/v2/realm/x/manifests/1",
            get(move |_: HeaderMap| async move {
                (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, format!("Bearer realm=\"{realm}\",service=s"))])
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    // Positive control: when the internal target is allowed too, the redirect reaches it.
    let (open, _d) = importer(&["127.0.0.1", "127.0.0.2"]);
    let _ = resolve(&open, &format!("docker://127.0.0.1:{port}/redirect/x:1")).await;
    settle();
    assert!(hits.load(Ordering::SeqCst) >= 1, "the redirect target is contacted when allowed");
    let before = hits.load(Ordering::SeqCst);

    let (imp, _d) = importer(&["127.0.0.1"]);
    let err = resolve(&imp, &format!("docker://127.0.0.1:{port}/redirect/x:1")).await.unwrap_err();
    assert!(matches!(err, OciError::Blocked { .. }), "redirect: {err}");
    let err = resolve(&imp, &format!("docker://127.0.0.1:{port}/realm/x:1")).await.unwrap_err();
    assert!(matches!(err, OciError::Blocked { .. }), "token realm: {err}");
    settle();
    assert_eq!(hits.load(Ordering::SeqCst), before, "nothing reached the internal target");
}
