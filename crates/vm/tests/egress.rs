//! The guest egress filter against real sockets: probe processes run as a uid inside the
//! filtered block (as a guest's QEMU does) and, as the positive control, as a uid outside it,
//! against listeners on this host. Needs root and nftables.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::ops::RangeInclusive;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use boxwood_vm::egress::{AllowRule, EgressFilter, table_name};

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

/// Connects to `addr` as `uid`; true when the connection was made.
fn connects_as(uid: u32, addr: SocketAddr) -> bool {
    let host = match addr.ip() {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => a.to_string(),
    };
    let script = format!("exec 3<>/dev/tcp/{host}/{}", addr.port());
    let status =
        Command::new("timeout").args(["5", "bash", "-c", &script]).uid(uid).gid(uid).status().expect("bash runs");
    status.success()
}

/// The host's own non-loopback address (the one its default route uses); no packet is sent.
fn host_address() -> IpAddr {
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    s.connect("203.0.113.1:9").unwrap();
    s.local_addr().unwrap().ip()
}

fn counter_packets(table: &str) -> u64 {
    let out = Command::new("nft").args(["list", "table", "inet", table]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("packets ").skip(1).filter_map(|t| t.split_whitespace().next()?.parse::<u64>().ok()).sum()
}

#[test]
fn guests_cannot_reach_the_host_but_others_can() {
    if !can_filter() {
        return;
    }
    let uids = block(0);
    let (guest, outsider) = (*uids.start(), 4242);
    let (lo, lo_hits) = listener(Ipv4Addr::LOCALHOST.into());
    let (own, own_hits) = listener(IpAddr::from([0, 0, 0, 0]));
    let own = SocketAddr::new(host_address(), own.port());

    // Positive control: without the filter, a guest's uid reaches both listeners.
    assert!(connects_as(guest, lo), "a guest uid reaches the loopback listener unfiltered");
    assert!(connects_as(guest, own), "a guest uid reaches the host's address unfiltered");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!((lo_hits.load(Ordering::SeqCst), own_hits.load(Ordering::SeqCst)), (1, 1));

    let filter = EgressFilter::install(&uids, &[]).expect("filter installs");
    let t = Instant::now();
    assert!(!connects_as(guest, lo), "loopback must be refused to a guest");
    assert!(!connects_as(guest, own), "the host's own address must be refused to a guest");
    assert!(!connects_as(guest, "[::1]:22".parse().unwrap()), "IPv6 loopback must be refused");
    assert!(t.elapsed() < Duration::from_secs(3), "refusals are immediate resets, took {:?}", t.elapsed());
    // Other uids are untouched.
    assert!(connects_as(outsider, lo) && connects_as(outsider, own), "other processes keep their network");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!((lo_hits.load(Ordering::SeqCst), own_hits.load(Ordering::SeqCst)), (2, 2));

    drop(filter);
    let listed = Command::new("nft").args(["list", "table", "inet", &table_name(&uids)]).output().unwrap();
    assert!(!listed.status.success(), "the table is removed on drop");
    assert!(connects_as(guest, lo), "without the filter the guest uid connects again");
}

#[test]
fn private_and_link_local_destinations_are_rejected_locally() {
    if !can_filter() {
        return;
    }
    let uids = block(1);
    let filter = EgressFilter::install(&uids, &[]).unwrap();
    let before = counter_packets(filter.table());
    let t = Instant::now();
    for dest in ["169.254.169.254:80", "10.1.2.3:80", "192.168.1.1:80", "172.16.0.1:80", "100.64.0.1:80"] {
        assert!(!connects_as(*uids.start(), dest.parse().unwrap()), "{dest} must be refused");
    }
    assert!(t.elapsed() < Duration::from_secs(3), "rejected in the host, not timed out: {:?}", t.elapsed());
    // Each SYN hit a reject rule: the packets never left the host.
    assert!(counter_packets(filter.table()) >= before + 5, "reject counters must count the probes");
}

#[test]
fn allowed_destinations_dns_and_the_internet_stay_reachable() {
    if !can_filter() {
        return;
    }
    let uids = block(2);
    let (allowed, allowed_hits) = listener(Ipv4Addr::LOCALHOST.into());
    let (other, _) = listener(Ipv4Addr::LOCALHOST.into());
    let rule: AllowRule = format!("127.0.0.1:{}", allowed.port()).parse().unwrap();
    let _filter = EgressFilter::install(&uids, &[rule]).unwrap();
    let guest = *uids.start();
    assert!(connects_as(guest, allowed), "an allowed host port is reachable");
    assert!(!connects_as(guest, other), "only that port");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(allowed_hits.load(Ordering::SeqCst), 1);

    let dns = Command::new("getent").args(["hosts", "pypi.org"]).uid(guest).gid(guest).output().unwrap();
    assert!(dns.status.success(), "DNS through the host's resolver works for a guest uid");
    let https = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "30", "https://pypi.org/simple/"])
        .uid(guest)
        .gid(guest)
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&https.stdout);
    assert!(code.starts_with('2') || code.starts_with('3'), "the package index is reachable: {code:?} {https:?}");
}
