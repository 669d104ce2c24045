//! Guests with networking cannot reach the host or internal networks, and still reach the
//! Internet. The positive control: a host port the operator allows is reached by the same probe.

use std::net::UdpSocket;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;

use crate::harness::{TestServer, counting_listener};

/// The host's own non-loopback address (no packet is sent).
fn host_address() -> String {
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    s.connect("203.0.113.1:9").unwrap();
    s.local_addr().unwrap().ip().to_string()
}

#[tokio::test]
async fn guests_reach_the_internet_but_not_the_host() {
    let (allowed, allowed_hits) = counting_listener("127.0.0.1");
    let (closed, closed_hits) = counting_listener("0.0.0.0");
    let s = TestServer::start_with(move |c| {
        c.network.allow = vec![format!("127.0.0.1:{allowed}").parse().unwrap()];
    })
    .await;
    let api = s.url.rsplit(':').next().unwrap().to_owned();
    let host = host_address();
    let probe = |dest: String| format!("nc -w 3 {dest} </dev/null >/dev/null 2>&1; echo $?");

    // Positive control: the allowed host port is reached from the guest through 10.0.2.2.
    let (op, _) =
        s.run(json!({"command": probe(format!("10.0.2.2 {allowed}")), "shell": true, "disposable": true})).await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(allowed_hits.load(Ordering::SeqCst) >= 1, "the probe reaches an allowed host port: {op}");

    for dest in [
        format!("10.0.2.2 {closed}"),
        format!("10.0.2.2 {api}"),
        format!("{host} {closed}"),
        format!("{host} {api}"),
        "169.254.169.254 80".to_owned(),
        "10.20.30.40 80".to_owned(),
    ] {
        let (op, _) = s.run(json!({"command": probe(dest.clone()), "shell": true, "disposable": true})).await;
        assert_eq!(op["status"], "SUCCESS", "{op}");
        let out = op["metadata"]["result"]["stdout"]["value"].as_str().unwrap_or_default().trim().to_owned();
        assert_ne!(out, "0", "{dest} must be unreachable from a guest: {op}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(closed_hits.load(Ordering::SeqCst), 0, "no guest connection reached the host's service");

    // The Internet stays reachable: the Debian archive, by the address this host resolves it to
    // (busybox's static wget and nslookup crash in this image; the guest DNS path is covered by
    // the vm crate's egress tests).
    let ip = std::net::ToSocketAddrs::to_socket_addrs(&("deb.debian.org", 80)).unwrap().next().unwrap().ip();
    let fetch = format!(
        "printf 'GET /debian/dists/bookworm/Release HTTP/1.0\\r\\nHost: deb.debian.org\\r\\n\\r\\n' | nc -w 20 {ip} 80 | head -c 400"
    );
    let (op, _) = s.run(json!({"command": fetch, "shell": true, "disposable": true})).await;
    let out = op["metadata"]["result"]["stdout"]["value"].as_str().unwrap_or_default();
    // Any HTTP answer is the archive (or this network's proxy in front of it) answering.
    assert!(out.starts_with("HTTP/1."), "the package archive is reachable from a guest: {op}");
    s.stop().await;
}
