//! The guest egress filter: an nftables table that keeps the sockets of a server's QEMU
//! processes (recognised by their jail uids) away from the host and from private ranges.
//!
//! A guest's network is QEMU's user-mode stack: every connection a guest makes is an ordinary
//! socket of its QEMU process, and the gateway `10.0.2.2` is the host's loopback. Matching
//! `meta skuid` on the uid block the runtime claimed catches exactly those sockets, whatever
//! address the guest asked for, after any DNS lookup and on every redirect.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::process::{Command, Stdio};
use std::str::FromStr;

use serde::Deserialize;

use crate::VmError;

/// Destinations no guest reaches unless the operator allows them: "this network", private,
/// shared (CGNAT), loopback, link-local (cloud metadata), IETF protocol assignments,
/// benchmarking, multicast, reserved and broadcast; for IPv6 the same classes plus
/// IPv4-mapped addresses (which would carry an IPv4 destination past the IPv4 rules).
const DENY_V4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
];
const DENY_V6: &[&str] =
    &["::/127", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "fc00::/7", "fe80::/10", "ff00::/8"];

/// How guest networks are filtered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FilterMode {
    /// Install the nftables filter; if that fails, runs with networking are refused.
    #[default]
    Nftables,
    /// No filter: guests reach the host's loopback, its addresses and private ranges.
    /// Only for hosts whose network is otherwise isolated.
    Off,
}

/// Guest network policy, part of the server configuration (`[network]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    pub filter: FilterMode,
    /// Host or private destinations guests may reach anyway: `ADDR`, `ADDR/PREFIX`,
    /// `ADDR:PORT`, `ADDR/PREFIX:PORT`, `[V6ADDR]:PORT` (TCP and UDP). Nothing by default.
    pub allow: Vec<AllowRule>,
}

/// One allowed destination: a network and optionally one port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    pub addr: IpAddr,
    pub prefix: u8,
    pub port: Option<u16>,
}

impl FromStr for AllowRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("network.allow entry {s:?}: {why}");
        let (net, port) = if let Some(rest) = s.strip_prefix('[') {
            let (net, tail) = rest.split_once(']').ok_or_else(|| bad("missing ']'"))?;
            let port = match tail {
                "" => None,
                t => Some(t.strip_prefix(':').ok_or_else(|| bad("expected ':PORT' after ']'"))?),
            };
            (net, port)
        } else if s.matches(':').count() > 1 {
            (s, None) // a bare IPv6 address or network
        } else {
            match s.split_once(':') {
                Some((net, port)) => (net, Some(port)),
                None => (s, None),
            }
        };
        let port = port
            .map(|p| p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| bad("the port must be 1-65535")))
            .transpose()?;
        let (addr, prefix) = match net.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (net, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP address or network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|&p| p <= max).ok_or_else(|| bad("bad prefix length"))?,
            None => max,
        };
        Ok(Self { addr: mask(addr, prefix), prefix, port })
    }
}

impl<'de> Deserialize<'de> for AllowRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// nftables rejects a network whose host bits are set; normalise instead of failing.
fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a) & u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(bits.into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a) & u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(bits.into())
        }
    }
}

fn family(addr: &IpAddr) -> &'static str {
    if addr.is_ipv4() { "ip" } else { "ip6" }
}

/// The name of the table for a uid block: one per server, so parallel servers do not touch
/// each other's rules.
pub fn table_name(uids: &RangeInclusive<u32>) -> String {
    format!("boxwood_egress_{}", uids.start())
}

/// The nftables script that (re)creates the filter for `uids`: sockets of those uids may
/// reach the host's resolvers on port 53 (QEMU's user-mode DNS forwards guest queries to
/// them), the operator's allowed destinations, and everything that is neither one of the
/// host's own addresses nor in a denied range; the rest gets a TCP reset or an ICMP
/// "administratively prohibited", so a guest fails at once instead of timing out.
pub fn render(uids: &RangeInclusive<u32>, resolvers: &[IpAddr], allow: &[AllowRule]) -> String {
    let table = table_name(uids);
    let mut s = String::new();
    // `add` then `delete` makes the script work whether or not the table exists, and the
    // whole file is applied atomically.
    let _ = writeln!(s, "add table inet {table}\ndelete table inet {table}\ntable inet {table} {{");
    let _ = writeln!(s, "  chain guests {{");
    let _ = writeln!(s, "    ct state established,related accept");
    for r in resolvers {
        let _ = writeln!(s, "    {} daddr {r} meta l4proto {{ tcp, udp }} th dport 53 accept", family(r));
    }
    for rule in allow {
        let port = rule.port.map(|p| format!(" meta l4proto {{ tcp, udp }} th dport {p}")).unwrap_or_default();
        let _ = writeln!(s, "    {} daddr {}/{}{port} accept", family(&rule.addr), rule.addr, rule.prefix);
    }
    let denied = [
        "fib daddr type local".to_owned(),
        format!("ip daddr {{ {} }}", DENY_V4.join(", ")),
        "ip daddr 255.255.255.255".to_owned(),
        format!("ip6 daddr {{ {} }}", DENY_V6.join(", ")),
    ];
    for d in &denied {
        let _ = writeln!(s, "    {d} meta l4proto tcp counter reject with tcp reset");
        let _ = writeln!(s, "    {d} counter reject with icmpx admin-prohibited");
    }
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  chain output {{\n    type filter hook output priority filter; policy accept;");
    // Only packets of a socket owned by a guest's QEMU enter the guest chain: packets without
    // a socket (kernel-made resets, ICMP) and every other process keep the host's own rules.
    let _ = writeln!(s, "    meta skuid {}-{} jump guests", uids.start(), uids.end());
    let _ = writeln!(s, "  }}\n}}");
    s
}

/// The name servers of a `resolv.conf`.
pub fn resolvers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next())
        // A scoped IPv6 address (fe80::1%eth0) names the link, which nftables cannot match on.
        .filter_map(|a| a.split('%').next()?.parse().ok())
        .collect()
}

/// An installed filter; the table is deleted when this is dropped.
#[derive(Debug)]
pub struct EgressFilter {
    table: String,
}

impl EgressFilter {
    /// Installs (or replaces) the table for `uids`.
    pub fn install(uids: &RangeInclusive<u32>, allow: &[AllowRule]) -> Result<Self, VmError> {
        let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let script = render(uids, &resolvers(&resolv), allow);
        nft(&script)?;
        Ok(Self { table: table_name(uids) })
    }

    pub fn table(&self) -> &str {
        &self.table
    }
}

impl Drop for EgressFilter {
    fn drop(&mut self) {
        if let Err(e) = nft(&format!("delete table inet {}\n", self.table)) {
            tracing::warn!(table = %self.table, error = %e, "could not remove the guest egress filter");
        }
    }
}

/// Runs `nft -f -` with `script`.
fn nft(script: &str) -> Result<(), VmError> {
    let fail = |why: String| VmError::Egress(why);
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run nft: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(|e| fail(format!("writing to nft: {e}")))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(format!("waiting for nft: {e}")))?;
    if !out.status.success() {
        return Err(fail(format!("nft failed: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_rules_parse() {
        let r: AllowRule = "10.1.2.3:3128".parse().unwrap();
        assert_eq!((r.addr.to_string(), r.prefix, r.port), ("10.1.2.3".into(), 32, Some(3128)));
        let r: AllowRule = "192.168.7.9/16".parse().unwrap();
        assert_eq!((r.addr.to_string(), r.prefix, r.port), ("192.168.0.0".into(), 16, None));
        let r: AllowRule = "[fd00::1]:443".parse().unwrap();
        assert_eq!((r.addr.to_string(), r.prefix, r.port), ("fd00::1".into(), 128, Some(443)));
        let r: AllowRule = "fd00::/8".parse().unwrap();
        assert_eq!((r.addr.to_string(), r.prefix, r.port), ("fd00::".into(), 8, None));
        for bad in ["", "host.example:80", "10.0.0.1:0", "10.0.0.1:99999", "10.0.0.0/33", "[fd00::1", "1.2.3.4/x"] {
            assert!(bad.parse::<AllowRule>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn resolv_conf_name_servers() {
        let conf = "# c\nnameserver 10.255.255.53\nsearch x\nnameserver fe80::1%eth0\nnameserver bogus\n";
        let got: Vec<String> = resolvers(conf).iter().map(ToString::to_string).collect();
        assert_eq!(got, ["10.255.255.53", "fe80::1"]);
    }

    #[test]
    fn ruleset_scopes_everything_to_the_uid_block() {
        let uids = 2_000_000_000..=2_000_000_255;
        let allow: Vec<AllowRule> = vec!["127.0.0.1:3128".parse().unwrap(), "10.0.0.0/8".parse().unwrap()];
        let s = render(&uids, &["10.255.255.53".parse().unwrap()], &allow);
        assert!(s.contains("meta skuid 2000000000-2000000255 jump guests"), "{s}");
        // The hook chain has no other rule: nothing else on the host is affected.
        let hook = s.split("chain output").nth(1).unwrap();
        assert_eq!(hook.matches("jump").count() + hook.matches("reject").count(), 1, "{hook}");
        let pos = |needle: &str| s.find(needle).unwrap_or_else(|| panic!("{needle} missing in {s}"));
        // Resolvers and allowed destinations come before the rejects, so they win.
        assert!(pos("ip daddr 10.255.255.53 meta l4proto { tcp, udp } th dport 53 accept") < pos("fib daddr"));
        assert!(pos("ip daddr 127.0.0.1/32 meta l4proto { tcp, udp } th dport 3128 accept") < pos("fib daddr"));
        assert!(pos("ip daddr 10.0.0.0/8 accept") < pos("fib daddr"));
        for range in DENY_V4.iter().chain(DENY_V6) {
            assert!(s.contains(range), "{range} not denied");
        }
    }
}
