//! End-to-end tests of guest networking (QEMU user-mode network, TCG): address, default
//! route, DNS config kept out of the upper layer, a fetch from a host listener, counters.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use boxwood_vm::{VmRuntime, VmSpec};
use common::*;

/// Serves `body` over HTTP to at most `max` connections on 127.0.0.1, for at most 120 s.
fn http_server(body: &'static str, max: usize) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut served = 0;
        while served < max && Instant::now() < deadline {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    conn.set_nonblocking(false).unwrap();
                    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let mut req = [0u8; 4096];
                    let _ = conn.read(&mut req);
                    let reply = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                    let _ = conn.write_all(reply.as_bytes());
                    served += 1;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_route_fetch_dns_and_counters() {
    let port = http_server("hello-from-host\n", 1);
    let dir = run_dir();
    let rt = runtime(dir.path(), Vec::new()).await;
    let vm = rt.start(VmSpec { network: true, ..vm_spec("net") }).await.expect("boot");
    eprintln!("BOOT net (network=true) {:?}", vm.boot_duration());
    let vm = vm.as_ref();

    let report = vm.setup_report().network.clone().expect("a network report");
    eprintln!("network report: {report:?}");
    assert_eq!(report.error, None);
    assert_eq!(report.configured.address, "10.0.2.15/24");
    assert_eq!((report.configured.gateway.as_str(), report.configured.nameserver.as_str()), ("10.0.2.2", "10.0.2.3"));
    let names: Vec<&str> = report.interfaces.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["eth0"], "every interface but lo");

    let r = run(vm, spawn_req(1, &["sh", "-c", "ls /sys/class/net; cat /proc/net/route; cat /etc/resolv.conf"])).await;
    let out = r.out();
    assert!(out.starts_with("eth0\nlo\n"), "{out}");
    let default_route = out.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Iface Destination Gateway (hex, little-endian): 10.0.2.2 = 0202000A.
        f.len() > 3 && f[0] == "eth0" && f[1] == "00000000" && f[2] == "0202000A"
    });
    assert!(default_route, "no default route via eth0:\n{out}");
    assert!(out.ends_with("nameserver 10.0.2.3\n"), "{out}");

    let url = format!("http://10.0.2.2:{port}/");
    let r = run(vm, spawn_req(2, &["wget", "-q", "-O-", &url])).await;
    assert_eq!((r.out().as_str(), r.exit.code), ("hello-from-host\n", 0), "{}", String::from_utf8_lossy(&r.stderr));

    // resolv.conf (and the placeholder the image needed) stay out of the export.
    let host = tempfile::tempdir().unwrap();
    let stats = export_to(vm, &host.path().join("none.tar"), &u64::MAX).await.expect("export");
    assert_eq!(stats.entries, 0, "{stats:?}");

    // The cost of exporting a 1 KiB change.
    let r = run(vm, spawn_req(3, &["sh", "-c", "head -c 1024 /dev/urandom > /k1"])).await;
    assert_eq!(r.exit.code, 0);
    let started = Instant::now();
    let stats = export_to(vm, &host.path().join("k1.tar"), &u64::MAX).await.expect("export");
    eprintln!("EXPORT 1 KiB change: {:?} {stats:?}", started.elapsed());
    assert_eq!(stats.entries, 1);

    // An export abandoned midway does not confuse the next one.
    let cut =
        tokio::time::timeout(Duration::from_millis(5), export_to(vm, &host.path().join("cut.tar"), &u64::MAX)).await;
    eprintln!("abandoned export finished anyway: {}", cut.is_ok());

    // A file the run puts next to the placeholder brings its (placeholder-made) parent along.
    let r = run(vm, spawn_req(4, &["sh", "-c", "echo '127.0.0.1 x' > /etc/hosts"])).await;
    assert_eq!(r.exit.code, 0);
    let tar_path = host.path().join("etc.tar");
    export_to(vm, &tar_path, &u64::MAX).await.expect("export");
    let mut archive = tar::Archive::new(std::fs::File::open(&tar_path).unwrap());
    let mut names: Vec<String> =
        archive.entries().unwrap().map(|e| String::from_utf8(e.unwrap().path_bytes().into_owned()).unwrap()).collect();
    names.sort();
    assert_eq!(names, ["etc/", "etc/hosts", "k1"]);

    let console = std::fs::read_to_string(vm.dir().join("console.log")).unwrap();
    assert!(!console.contains("boxwood-agent:"), "the agent logged problems:\n{console}");
}

/// Boot time with and without the NIC, interleaved (slow under TCG: run on demand with
/// `cargo test -p boxwood-vm --test network -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, ~30 s"]
async fn boot_time_with_and_without_network() {
    let dir = run_dir();
    let rt = runtime(dir.path(), Vec::new()).await;
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for i in 0..5 {
        for network in [false, true] {
            let vm = rt.start(VmSpec { network, ..vm_spec(&format!("b{i}{network}")) }).await.expect("boot");
            if network { &mut with } else { &mut without }.push(vm.boot_duration());
            vm.shutdown().await.unwrap();
        }
    }
    eprintln!("BOOT without network: median {:?} {without:?}", median(without.clone()));
    eprintln!("BOOT with network:    median {:?} {with:?}", median(with.clone()));
}

/// A VM whose NIC got no interface (here: its driver is kept from loading) fails its boot
/// before the agent's Hello, so it is booted again and then refused, never handed to a run
/// that would find no network; without a NIC the same kernel boots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nic_without_its_driver_fails_the_boot_before_hello() {
    let dir = run_dir();
    let rt = cold_runtime(dir.path(), vec!["module_blacklist=virtio_net".into()]).await;
    match rt.start(VmSpec { network: true, ..vm_spec("no-driver") }).await {
        Err(boxwood_vm::VmError::DiedBeforeHello { detail }) => {
            assert!(detail.contains("virtio_net did not load or probe"), "{detail}");
        }
        Err(other) => panic!("expected DiedBeforeHello, got {other}"),
        Ok(_) => panic!("a NIC without its interface must fail the boot"),
    }
    let vm = rt.start(vm_spec("no-nic")).await.expect("without a NIC the boot needs no driver");
    vm.shutdown().await.unwrap();
}
