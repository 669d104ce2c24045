//! Guest networking with plain ioctls (no external tools exist in the initramfs): loopback is
//! always brought up; with a [`NetworkConfig`] the virtio-net interface gets its address and a
//! default route, the root's `/etc/resolv.conf` is covered by a bind mount of a file kept
//! outside the root, and the interface counters are reported.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use boxwood_protocol::{InterfaceCounters, NetworkConfig, NetworkReport};
use nix::mount::{MsFlags, mount};

use crate::inroot::{self, RootPath};

/// The file bind-mounted over the root's `/etc/resolv.conf` (outside the root, so writes to
/// it never reach the upper layer).
const RESOLV_CONF: &str = "/run/boxwood/resolv.conf";
/// How long the NIC may take to appear after its driver loaded.
const NIC_WAIT: Duration = Duration::from_secs(3);
/// How long a NIC that is up may take to report its carrier.
const CARRIER_WAIT: Duration = Duration::from_secs(2);

/// Brings `lo` up (the kernel gives it 127.0.0.1/8 when it comes up).
pub fn loopback_up() -> Result<(), String> {
    let sock = inet_socket()?;
    set_up(&sock, "lo")
}

/// Configures the NIC per `cfg`. Paths of placeholders created inside the root (relative,
/// to be left out of exports) are pushed onto `created`. Configuring an already configured
/// NIC again (a warmed-up clone) is fine. `carrier`: wait briefly for the link (not during a
/// warm-up, when the host keeps it down).
pub fn configure(cfg: &NetworkConfig, created: &mut Vec<String>, carrier: bool) -> Result<NetworkReport, String> {
    let (address, prefix) = parse_cidr(&cfg.address)?;
    let gateway: Ipv4Addr = cfg.gateway.parse().map_err(|_| format!("bad gateway {:?}", cfg.gateway))?;
    let nameserver: Ipv4Addr = cfg.nameserver.parse().map_err(|_| format!("bad nameserver {:?}", cfg.nameserver))?;
    let nic = wait_for_nic(NIC_WAIT)?;
    let sock = inet_socket()?;
    set_addr(&sock, &nic, libc::SIOCSIFADDR, address)?;
    set_addr(&sock, &nic, libc::SIOCSIFNETMASK, netmask(prefix))?;
    set_up(&sock, &nic)?;
    if carrier {
        wait_for_carrier(&nic, CARRIER_WAIT);
    }
    add_default_route(&sock, &nic, gateway)?;
    resolv_conf(nameserver, created)?;
    let (interfaces, error) = match counters() {
        Ok(list) => (list, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    Ok(NetworkReport { interfaces, configured: cfg.clone(), error })
}

/// `a.b.c.d/nn` → address and prefix length.
pub fn parse_cidr(cidr: &str) -> Result<(Ipv4Addr, u8), String> {
    let bad = || format!("bad address {cidr:?} (want a.b.c.d/nn)");
    let (addr, prefix) = cidr.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    if prefix > 32 {
        return Err(bad());
    }
    Ok((addr, prefix))
}

pub fn netmask(prefix: u8) -> Ipv4Addr {
    let bits = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) };
    Ipv4Addr::from(bits)
}

/// Waits (at most `limit`) until `nic` reports a carrier. A clone's NIC comes from a template
/// whose link was down; the host raises it just before `Setup`, and the guest learns of it
/// asynchronously. Packets sent before that would be dropped (a TCP SYN then costs a 1 s
/// retransmission), so wait briefly; on timeout carry on, the link may still come.
fn wait_for_carrier(nic: &str, limit: Duration) {
    let path = format!("/sys/class/net/{nic}/carrier");
    let deadline = Instant::now() + limit;
    while fs::read_to_string(&path).map(|c| c.trim() != "1").unwrap_or(true) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The first interface that is not `lo` (`eth0` on these VMs), once the driver created it.
pub fn wait_for_nic(limit: Duration) -> Result<String, String> {
    let deadline = Instant::now() + limit;
    loop {
        let mut names: Vec<String> = fs::read_dir("/sys/class/net")
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.retain(|n| n != "lo");
        names.sort();
        if let Some(name) = names.into_iter().next() {
            return Ok(name);
        }
        if Instant::now() >= deadline {
            return Err(format!("no network interface appeared within {limit:?} (is virtio_net loaded?)"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn inet_socket() -> Result<OwnedFd, String> {
    // SAFETY: plain socket(2) call with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> Result<libc::ifreq, String> {
    if name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(format!("bad interface name {name:?}"));
    }
    // SAFETY: an all-zero `ifreq` is a valid value of this plain C struct/union.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src.cast_signed();
    }
    Ok(req)
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(ip.octets()) },
        sin_zero: [0; 8],
    };
    // SAFETY: `sockaddr_in` and `sockaddr` are both 16-byte plain C structs; reinterpreting
    // an AF_INET address as the generic type is what the socket API expects.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl(sock: &OwnedFd, request: libc::c_ulong, arg: *mut libc::c_void, what: &str) -> Result<(), String> {
    raw_ioctl(sock, request, arg).map_err(|e| format!("{what}: {e}"))
}

fn raw_ioctl(sock: &OwnedFd, request: libc::c_ulong, arg: *mut libc::c_void) -> std::io::Result<()> {
    // SAFETY: callers pass a pointer to a live struct of the type `request` expects.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, arg) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn set_addr(sock: &OwnedFd, nic: &str, request: libc::c_ulong, ip: Ipv4Addr) -> Result<(), String> {
    let mut req = ifreq(nic)?;
    req.ifr_ifru.ifru_addr = sockaddr(ip);
    ioctl(sock, request, (&raw mut req).cast(), &format!("set {ip} on {nic}"))
}

fn set_up(sock: &OwnedFd, nic: &str) -> Result<(), String> {
    let mut req = ifreq(nic)?;
    ioctl(sock, libc::SIOCGIFFLAGS, (&raw mut req).cast(), &format!("get flags of {nic}"))?;
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    ioctl(sock, libc::SIOCSIFFLAGS, (&raw mut req).cast(), &format!("bring {nic} up"))
}

fn add_default_route(sock: &OwnedFd, nic: &str, gateway: Ipv4Addr) -> Result<(), String> {
    let dev = CString::new(nic).map_err(|_| format!("bad interface name {nic:?}"))?;
    // SAFETY: an all-zero `rtentry` is a valid value of this plain C struct.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    rt.rt_dev = dev.as_ptr().cast_mut();
    // `dev` outlives the call; the kernel only reads the name.
    let what = format!("default route via {gateway}");
    match raw_ioctl(sock, libc::SIOCADDRT, (&raw mut rt).cast()) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            // Left by the warm-up, possibly via another gateway: replace it.
            rt.rt_gateway = sockaddr(Ipv4Addr::UNSPECIFIED);
            rt.rt_flags = libc::RTF_UP;
            ioctl(sock, libc::SIOCDELRT, (&raw mut rt).cast(), "remove the old default route")?;
            rt.rt_gateway = sockaddr(gateway);
            rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
            ioctl(sock, libc::SIOCADDRT, (&raw mut rt).cast(), &what)
        }
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// Makes the root's `/etc/resolv.conf` name `nameserver` by bind-mounting a file kept outside
/// the root over it. If the image has none, an empty placeholder (and `/etc`, if missing) is
/// created first and recorded in `created`. A dangling symlink is left alone (no DNS config).
fn resolv_conf(nameserver: Ipv4Addr, created: &mut Vec<String>) -> Result<(), String> {
    fs::write(RESOLV_CONF, format!("nameserver {nameserver}\n")).map_err(|e| format!("write {RESOLV_CONF}: {e}"))?;
    let root = inroot::open_root().map_err(|e| format!("open root: {e}"))?;
    let path = RootPath::parse("/etc/resolv.conf")?;
    let target = match inroot::open_in_root(root.as_fd(), &path.relative(), libc::O_PATH) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            let mut made = Vec::new();
            let etc = inroot::make_parents(root.as_fd(), &path, &mut made).map_err(|e| format!("/etc: {e}"))?;
            if inroot::lstat_at(etc.as_fd(), path.name()).map_err(|e| format!("/etc/resolv.conf: {e}"))?.is_some() {
                crate::log("/etc/resolv.conf is a dangling symlink; DNS is not configured");
                return Ok(());
            }
            let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
            drop(inroot::open_at(etc.as_fd(), path.name(), flags, 0o644).map_err(|e| format!("placeholder: {e}"))?);
            // Creating the file copied `/etc` up (or made it): leave both out of exports.
            created.push("etc".into());
            created.extend(made);
            created.push(path.relative());
            inroot::open_at(etc.as_fd(), path.name(), libc::O_PATH | libc::O_NOFOLLOW, 0)
                .map_err(|e| format!("placeholder: {e}"))?
        }
        Err(e) => return Err(format!("/etc/resolv.conf: {e}")),
    };
    let target_path = inroot::proc_fd_path(&target);
    mount(Some(Path::new(RESOLV_CONF)), Path::new(&target_path), None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| format!("bind-mount resolv.conf: {e}"))
}

/// `/sys/class/net/*/statistics` of every interface but `lo`.
fn counters() -> Result<Vec<InterfaceCounters>, String> {
    let dir = Path::new("/sys/class/net");
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(|e| format!("read {}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let stats = dir.join(&name).join("statistics");
            let read = |file: &str| -> Result<u64, String> {
                let path = stats.join(file);
                let text = fs::read_to_string(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
                text.trim().parse().map_err(|_| format!("bad number in {}", path.display()))
            };
            Ok(InterfaceCounters {
                rx_bytes: read("rx_bytes")?,
                rx_packets: read("rx_packets")?,
                rx_errs: read("rx_errors")?,
                rx_drop: read("rx_dropped")?,
                tx_bytes: read("tx_bytes")?,
                tx_packets: read("tx_packets")?,
                tx_errs: read("tx_errors")?,
                tx_drop: read("tx_dropped")?,
                name,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_and_netmask() {
        assert_eq!(parse_cidr("10.0.2.15/24").unwrap(), (Ipv4Addr::new(10, 0, 2, 15), 24));
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(netmask(32), Ipv4Addr::BROADCAST);
        for bad in ["10.0.2.15", "10.0.2.15/33", "x/24", "10.0.2/24"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }
}
