//! The guest egress filter against real sockets: probe processes run as a uid inside the
//! filtered block (as a guest's QEMU does) and, as the positive control, as a uid outside it
//! or before the filter exists, against listeners on this host. Needs root and nftables.
//!
//! No probe leaves the host except DNS to its resolver and HTTPS to the package index: every
//! probe to a private or link-local address is a single packet the filter rejects in the
//! output hook, which its counter shows.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::ops::RangeInclusive;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use boxwood_vm::VmError;
use boxwood_vm::egress::{AllowRule, EgressFilter, NetworkConfig, sweep_stale, table_name};

/// A block of its own per test (tests run in parallel, and a real server may run too).
fn block(n: u32) -> RangeInclusive<u32> {
    let base = 2_140_000_000 + (std::process::id() % 1000) * 4096 + n * 256;
    base..=base + 255
}

fn can_filter() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let nft = Command::new("nft").arg("--version").output().is_ok_and(|o| o.status.success());
    if !(root && nft) {
        eprintln!("skipped: needs root and nft (scripts/install-deps.sh installs nftables)");
    }
    root && nft
}

fn config(allow: &[String]) -> NetworkConfig {
    NetworkConfig { allow: allow.iter().map(|a| a.parse::<AllowRule>().unwrap()).collect(), ..Default::default() }
}

/// A listener that counts the connections it accepts.
fn listener(addr: IpAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind((addr, 0)).unwrap();
    let local = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            if conn.is_ok() {
                h.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    (local, hits)
}

/// Connects to `host`:`port` as `uid` (bash's `/dev/tcp`, so `host` may be any form
/// getaddrinfo takes); true when the connection was made.
fn connects_as(uid: u32, host: &str, port: u16) -> bool {
    let script = format!("exec 3<>/dev/tcp/{host}/{port}");
    let status = Command::new("timeout")
        .args(["5", "bash", "-c", &script])
        .uid(uid)
        .gid(uid)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("bash runs");
    status.success()
}

fn connects(uid: u32, addr: SocketAddr) -> bool {
    connects_as(uid, &addr.ip().to_string(), addr.port())
}

/// Sends one UDP datagram to `addr` as `uid`.
fn udp_as(uid: u32, addr: SocketAddr) {
    let script = format!("echo probe > /dev/udp/{}/{}", addr.ip(), addr.port());
    let _ = Command::new("timeout").args(["5", "bash", "-c", &script]).uid(uid).gid(uid).status();
}

/// The host's own address that traffic to `probe` would come from; no packet is sent.
fn source_address(bind: &str, probe: &str) -> Option<IpAddr> {
    let s = UdpSocket::bind(bind).ok()?;
    s.connect(probe).ok()?;
    Some(s.local_addr().ok()?.ip())
}

/// Packets counted by the table's reject rules.
fn rejected_packets(table: &str) -> u64 {
    let out = Command::new("nft").args(["list", "table", "inet", table]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("packets ").skip(1).filter_map(|t| t.split_whitespace().next()?.parse::<u64>().ok()).sum()
}

fn table_exists(table: &str) -> bool {
    Command::new("nft").args(["list", "table", "inet", table]).output().unwrap().status.success()
}

fn settle() {
    std::thread::sleep(Duration::from_millis(100));
}

#[test]
fn guests_cannot_reach_the_host_but_others_can() {
    if !can_filter() {
        return;
    }
    let uids = block(0);
    let (guest, outsider) = (*uids.start(), 4242);
    let (v4_any, v4_hits) = listener(Ipv4Addr::UNSPECIFIED.into());
    let (v6_lo, v6_hits) = listener(Ipv6Addr::LOCALHOST.into());
    let port = v4_any.port();
    // The same listener answers on every IPv4 address of the host: loopback (which a guest
    // sees as 10.0.2.2), another loopback address, eth0's address and the IPv4-mapped form.
    let mut v4_targets = vec!["127.0.0.1".to_owned(), "127.1.2.3".to_owned(), "::ffff:127.0.0.1".to_owned()];
    let own_v4 = source_address("0.0.0.0:0", "203.0.113.1:9").expect("a default IPv4 route");
    assert!(!own_v4.is_loopback());
    v4_targets.push(own_v4.to_string());
    let mut v6_targets = vec![(Ipv6Addr::LOCALHOST.to_string(), v6_lo.port(), v6_hits.clone())];
    if let Some(own_v6) = source_address("[::]:0", "[2001:db8::1]:9") {
        let (l, hits) = listener(own_v6);
        v6_targets.push((own_v6.to_string(), l.port(), hits));
    }
    let hits = || -> Vec<usize> {
        std::iter::once(v4_hits.load(Ordering::SeqCst))
            .chain(v6_targets.iter().map(|(_, _, h)| h.load(Ordering::SeqCst)))
            .collect()
    };

    // Positive control: without the filter, a guest's uid reaches every one of them.
    for t in &v4_targets {
        assert!(connects_as(guest, t, port), "unfiltered, a guest uid reaches {t}");
    }
    for (t, p, _) in &v6_targets {
        assert!(connects_as(guest, t, *p), "unfiltered, a guest uid reaches [{t}]");
    }
    settle();
    let before = hits();
    assert_eq!(before[0], v4_targets.len());
    assert!(before[1..].iter().all(|&h| h == 1), "{before:?}");

    let filter = EgressFilter::install(&uids, &config(&[])).expect("filter installs");
    let rejected = rejected_packets(filter.table());
    let t = Instant::now();
    for t in &v4_targets {
        assert!(!connects_as(guest, t, port), "{t} must be refused to a guest");
    }
    for (t, p, _) in &v6_targets {
        assert!(!connects_as(guest, t, *p), "[{t}] must be refused to a guest");
    }
    assert!(t.elapsed() < Duration::from_secs(3), "refusals are immediate resets, took {:?}", t.elapsed());
    settle();
    assert_eq!(hits(), before, "no refused probe reached a listener");
    let probes = (v4_targets.len() + v6_targets.len()) as u64;
    assert!(rejected_packets(filter.table()) >= rejected + probes, "each probe hit a reject rule");

    // Other uids are untouched.
    for t in &v4_targets {
        assert!(connects_as(outsider, t, port), "other processes keep reaching {t}");
    }
    for (t, p, _) in &v6_targets {
        assert!(connects_as(outsider, t, *p), "other processes keep reaching [{t}]");
    }
    // So is the uid just past the block (the range's bounds are inclusive, and no wider).
    assert!(connects_as(*uids.end() + 1, "127.0.0.1", port));
    assert!(!connects_as(*uids.end(), "127.0.0.1", port), "the block's last uid is filtered");

    drop(filter);
    assert!(!table_exists(&table_name(&uids)), "the table is removed on drop");
    assert!(connects_as(guest, "127.0.0.1", port), "without the filter the guest uid connects again");
}

#[test]
fn private_and_link_local_destinations_are_rejected_locally() {
    if !can_filter() {
        return;
    }
    let uids = block(1);
    let guest = *uids.start();
    let filter = EgressFilter::install(&uids, &config(&[])).unwrap();
    let t = Instant::now();
    let tcp =
        ["169.254.169.254:80", "10.1.2.3:80", "192.168.1.1:80", "172.16.0.1:80", "100.64.0.1:80", "198.18.0.1:80"];
    let tcp6 = ["[fd12:3456::1]:80", "[fe80::1]:80", "[64:ff9b::a01:203]:80"];
    for dest in tcp.iter().chain(&tcp6) {
        let before = rejected_packets(filter.table());
        let addr: SocketAddr = dest.parse().unwrap();
        let link_local_v6 = matches!(addr.ip(), IpAddr::V6(a) if a.segments()[0] == 0xfe80);
        // A link-local IPv6 address needs an interface; bash cannot name one, so its connect
        // fails before any packet: probe it with the interface scope through getaddrinfo.
        let host = if link_local_v6 { format!("{}%eth0", addr.ip()) } else { addr.ip().to_string() };
        assert!(!connects_as(guest, &host, addr.port()), "{dest} must be refused");
        // Exactly this probe's SYN was rejected in the output hook: it never left the host.
        assert!(rejected_packets(filter.table()) > before, "{dest}: the reject rule did not count the probe");
    }
    assert!(t.elapsed() < Duration::from_secs(5), "rejected in the host, not timed out: {:?}", t.elapsed());
    // UDP (metadata endpoints and internal DNS servers speak it too): one datagram each,
    // counted by the reject rule, so it was not sent.
    for dest in ["169.254.169.254:53", "10.1.2.3:53", "[fd12:3456::1]:53"] {
        let before = rejected_packets(filter.table());
        udp_as(guest, dest.parse().unwrap());
        assert!(rejected_packets(filter.table()) > before, "{dest}: the UDP datagram was not rejected");
    }
}

#[test]
fn allowed_destinations_dns_and_the_internet_stay_reachable() {
    if !can_filter() {
        return;
    }
    let uids = block(2);
    let guest = *uids.start();
    let (by_addr, by_addr_hits) = listener(Ipv4Addr::LOCALHOST.into());
    let (by_name, _) = listener(Ipv4Addr::LOCALHOST.into());
    let (udp_only, _) = listener(Ipv4Addr::LOCALHOST.into());
    let (other, _) = listener(Ipv4Addr::LOCALHOST.into());
    let allow = [
        format!("127.0.0.1:{}", by_addr.port()),
        format!("localhost:{}/tcp", by_name.port()),
        format!("127.0.0.1:{}/udp", udp_only.port()),
    ];
    let _filter = EgressFilter::install(&uids, &config(&allow)).unwrap();
    assert!(connects(guest, by_addr), "an allowed host port is reachable");
    assert!(connects(guest, by_name), "a host port allowed by name is reachable");
    assert!(!connects(guest, udp_only), "a port allowed for UDP stays closed to TCP");
    assert!(!connects(guest, other), "only the allowed ports");
    settle();
    assert_eq!(by_addr_hits.load(Ordering::SeqCst), 1);

    let dns = Command::new("getent").args(["hosts", "pypi.org"]).uid(guest).gid(guest).output().unwrap();
    assert!(dns.status.success(), "DNS through the host's resolver works for a guest uid: {dns:?}");
    let addr = String::from_utf8_lossy(&dns.stdout);
    eprintln!("pypi.org as the guest uid: {}", addr.trim());
    let https = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "30", "https://pypi.org/simple/"])
        .uid(guest)
        .gid(guest)
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&https.stdout);
    assert!(code.starts_with('2') || code.starts_with('3'), "the package index is reachable: {code:?} {https:?}");
}

#[test]
fn install_replaces_the_table_and_stale_tables_are_swept() {
    if !can_filter() {
        return;
    }
    let (mine, theirs) = (block(3), block(4));
    let guest = *mine.start();
    let (a, _) = listener(Ipv4Addr::LOCALHOST.into());
    let (b, _) = listener(Ipv4Addr::LOCALHOST.into());
    let first = EgressFilter::install(&mine, &config(&[format!("127.0.0.1:{}", a.port())])).unwrap();
    assert!(connects(guest, a) && !connects(guest, b));
    // A second install for the same block (a restarted server) replaces the rules whole.
    std::mem::forget(first); // as if the server had died without removing it
    let second = EgressFilter::install(&mine, &config(&[format!("127.0.0.1:{}", b.port())])).unwrap();
    assert!(!connects(guest, a) && connects(guest, b), "the new rules replaced the old ones");
    let listed = Command::new("nft").args(["list", "tables", "inet"]).output().unwrap();
    let name = table_name(&mine);
    let count = String::from_utf8_lossy(&listed.stdout).lines().filter(|l| l.ends_with(&name)).count();
    assert_eq!(count, 1, "one table per block");

    // A dead server's table is swept; a live one's is kept.
    let live = EgressFilter::install(&theirs, &config(&[])).unwrap();
    std::mem::forget(second);
    let swept = sweep_stale(Path::new("nft"), |base| (base == *mine.start()).then_some(())).unwrap();
    assert_eq!(swept, vec![name.as_str()]);
    assert!(!table_exists(&name) && table_exists(live.table()));
    assert!(connects(guest, a), "the swept block is unfiltered again");
}

#[test]
fn the_filter_fails_loudly_and_refuses_root() {
    if !can_filter() {
        return;
    }
    let missing = NetworkConfig { nft_binary: PathBuf::from("/nonexistent/nft"), ..Default::default() };
    let err = EgressFilter::install(&block(5), &missing).unwrap_err();
    assert!(matches!(err, VmError::Egress(_)), "{err:?}");
    // A block holding root would filter the server itself (and every root process).
    let err = EgressFilter::install(&(0..=255), &config(&[])).unwrap_err();
    assert!(matches!(err, VmError::Invalid(_)), "{err:?}");
    assert!(!table_exists(&table_name(&(0..=255))));
}
