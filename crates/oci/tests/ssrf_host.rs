//! A registry URL naming one of the host's own (non-loopback) interface addresses reaches the
//! host's services as surely as 127.0.0.1 does; it is refused unless allowed, and a name
//! resolving there is refused the same way. Each probe first shows the listener would be hit.

mod common;

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use boxwood_oci::{Importer, OciError, RegistryConfig, parse_source};
use common::counting_listener;

/// The first non-loopback IPv4 address of this host's interfaces (192.0.2.2 on the test
/// machine), which is not in any private or internal range.
fn own_address() -> Option<IpAddr> {
    nix::ifaddrs::getifaddrs()
        .ok()?
        .filter_map(|i| i.address.and_then(|a| a.as_sockaddr_in().map(|s| IpAddr::V4(s.ip()))))
        .find(|ip| !ip.is_loopback())
}

fn importer(allow: Vec<String>) -> (Importer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (Importer::new(RegistryConfig { allow_hosts: allow, ..Default::default() }, dir.path().join("w")), dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hosts_own_address_is_refused_unless_allowed() {
    let own = own_address().expect("the host has a non-loopback IPv4 address");
    let (addr, hits) = counting_listener(own);
    let port = addr.port();
    let src = parse_source(&format!("docker://{own}:{port}/library/x:1")).unwrap();

    // Positive control: allowed, the fetch connects to the host's own listener.
    let (open, _d) = importer(vec![own.to_string()]);
    let _ = tokio::time::timeout(Duration::from_secs(10), open.resolve(&src, None)).await;
    std::thread::sleep(Duration::from_millis(100));
    assert!(hits.load(Ordering::SeqCst) >= 1, "an allowed own address is contacted");
    let before = hits.load(Ordering::SeqCst);

    let (imp, _d) = importer(Vec::new());
    let err = imp.resolve(&src, None).await.unwrap_err();
    assert!(matches!(err, OciError::Blocked { .. }), "{err}");
    // The same address as an IPv4-mapped IPv6 literal.
    let mapped = parse_source(&format!("docker://[::ffff:{own}]:{port}/library/x:1")).unwrap();
    let err = imp.resolve(&mapped, None).await.unwrap_err();
    assert!(matches!(err, OciError::Blocked { .. }), "{err}");
    // CGNAT and broadcast literals, refused before any packet leaves.
    for host in ["100.64.0.1", "255.255.255.255", "0.0.0.0"] {
        let src = parse_source(&format!("docker://{host}:{port}/library/x:1")).unwrap();
        let err = imp.resolve(&src, None).await.unwrap_err();
        assert!(matches!(err, OciError::Blocked { .. }), "{host}: {err}");
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(hits.load(Ordering::SeqCst), before, "no connection reached the host's own listener");
}
