//! The guest egress filter: an nftables table that keeps the sockets of a server's QEMU
//! processes (recognised by their jail uids) away from the host and from private ranges.
//!
//! A guest's network is QEMU's user-mode stack: every connection a guest makes is an ordinary
//! socket of its QEMU process, and the gateway `10.0.2.2` is the host's loopback. Matching
//! `meta skuid` on the uid block the runtime claimed catches exactly those sockets, whatever
//! address the guest asked for, after any DNS lookup and on every redirect.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, ToSocketAddrs};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
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
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    pub filter: FilterMode,
    /// Host or private destinations guests may reach anyway (see [`AllowRule`]). Nothing by
    /// default.
    pub allow: Vec<AllowRule>,
    /// The `nft` executable.
    pub nft_binary: PathBuf,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self { filter: FilterMode::default(), allow: Vec::new(), nft_binary: PathBuf::from("nft") }
    }
}

/// A transport protocol an [`AllowRule`] may be limited to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// Where an [`AllowRule`] points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An address (`prefix` = its full length) or a network, host bits cleared.
    Net { addr: IpAddr, prefix: u8 },
    /// A host name, resolved once when the filter is installed.
    Host(String),
}

/// One allowed destination: `ADDR`, `ADDR/PREFIX`, `ADDR:PORT`, `ADDR/PREFIX:PORT`,
/// `[V6ADDR]:PORT`, `[V6NET/PREFIX]:PORT`, `HOST`, `HOST:PORT`, each optionally followed by
/// `/tcp` or `/udp` (default: both). Host names are resolved when the server starts, to every
/// address they have then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    pub target: Target,
    pub port: Option<u16>,
    pub proto: Option<Proto>,
}

/// An [`AllowRule`] with its host name (if any) resolved: what the ruleset is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetRule {
    pub addr: IpAddr,
    pub prefix: u8,
    pub port: Option<u16>,
    pub proto: Option<Proto>,
}

impl FromStr for AllowRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("network.allow entry {s:?}: {why}");
        let (rest, proto) = match (s.strip_suffix("/tcp"), s.strip_suffix("/udp")) {
            (Some(r), _) => (r, Some(Proto::Tcp)),
            (_, Some(r)) => (r, Some(Proto::Udp)),
            _ => (s, None),
        };
        let (net, port) = if let Some(inner) = rest.strip_prefix('[') {
            let (net, tail) = inner.split_once(']').ok_or_else(|| bad("missing ']'"))?;
            let port = match tail {
                "" => None,
                t => Some(t.strip_prefix(':').ok_or_else(|| bad("expected ':PORT' after ']'"))?),
            };
            (net, port)
        } else if rest.matches(':').count() > 1 {
            (rest, None) // a bare IPv6 address or network
        } else {
            match rest.split_once(':') {
                Some((net, port)) => (net, Some(port)),
                None => (rest, None),
            }
        };
        let port = port
            .map(|p| p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| bad("the port must be 1-65535")))
            .transpose()?;
        let (addr, prefix) = match net.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (net, None),
        };
        let target = match addr.parse::<IpAddr>() {
            Ok(addr) => {
                let max = if addr.is_ipv4() { 32 } else { 128 };
                let prefix = match prefix {
                    Some(p) => p.parse::<u8>().ok().filter(|&p| p <= max).ok_or_else(|| bad("bad prefix length"))?,
                    None => max,
                };
                Target::Net { addr: mask(addr, prefix), prefix }
            }
            Err(_) if prefix.is_none() && is_host_name(addr) => Target::Host(addr.to_ascii_lowercase()),
            Err(_) => return Err(bad("not an IP address, network or host name")),
        };
        Ok(Self { target, port, proto })
    }
}

/// Letters, digits, `-` and `.`, with a letter somewhere (so `1.2.3` is not taken for a name).
fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        && s.bytes().any(|b| b.is_ascii_alphabetic())
}

impl AllowRule {
    /// The rule's networks: itself, or one host route per address its name resolves to now.
    /// A name that does not resolve yields nothing (its destination stays closed).
    pub fn resolve(&self) -> Result<Vec<NetRule>, std::io::Error> {
        let rule = |addr: IpAddr, prefix: u8| NetRule { addr, prefix, port: self.port, proto: self.proto };
        match &self.target {
            Target::Net { addr, prefix } => Ok(vec![rule(*addr, *prefix)]),
            Target::Host(name) => {
                let mut addrs: Vec<IpAddr> = (name.as_str(), 0).to_socket_addrs()?.map(|a| a.ip()).collect();
                addrs.sort();
                addrs.dedup();
                Ok(addrs.into_iter().map(|a| rule(a, if a.is_ipv4() { 32 } else { 128 })).collect())
            }
        }
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

/// Prefix of every table this module makes; the rest of the name is the uid block's base.
pub const TABLE_PREFIX: &str = "boxwood_egress_";

/// The name of the table for a uid block: one per server, so parallel servers do not touch
/// each other's rules.
pub fn table_name(uids: &RangeInclusive<u32>) -> String {
    format!("{TABLE_PREFIX}{}", uids.start())
}

/// The nftables script that (re)creates the filter for `uids`: sockets of those uids may
/// reach the host's resolvers on port 53 (QEMU's user-mode DNS forwards guest queries to
/// them), the operator's allowed destinations, and everything that is neither one of the
/// host's own addresses nor in a denied range; the rest gets a TCP reset or an ICMP
/// "administratively prohibited", so a guest fails at once instead of timing out.
pub fn render(uids: &RangeInclusive<u32>, resolvers: &[IpAddr], allow: &[NetRule]) -> String {
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
        let l4 = match (rule.proto, rule.port) {
            (Some(p), Some(port)) => format!(" {} dport {port}", p.as_str()),
            (Some(p), None) => format!(" meta l4proto {}", p.as_str()),
            (None, Some(port)) => format!(" meta l4proto {{ tcp, udp }} th dport {port}"),
            (None, None) => String::new(),
        };
        let _ = writeln!(s, "    {} daddr {}/{}{l4} accept", family(&rule.addr), rule.addr, rule.prefix);
    }
    let denied = [
        // Every address of this host (127/8, ::1, eth0's, …) and its broadcast and multicast
        // addresses, whatever they are when the packet is sent.
        "fib daddr type { local, broadcast, multicast, anycast }".to_owned(),
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
    nft: PathBuf,
}

impl EgressFilter {
    /// Installs (or atomically replaces) the table for `uids` with `config.allow` (host names
    /// resolved now; one that does not resolve is logged and stays closed) and the name
    /// servers of `/etc/resolv.conf`. `uids` must be non-empty and exclude root.
    pub fn install(uids: &RangeInclusive<u32>, config: &NetworkConfig) -> Result<Self, VmError> {
        if uids.is_empty() || *uids.start() == 0 {
            return Err(VmError::Invalid(format!("egress uid block {uids:?} must be non-empty and exclude root")));
        }
        let mut allow = Vec::new();
        for rule in &config.allow {
            match rule.resolve() {
                Ok(nets) if nets.is_empty() => tracing::warn!(?rule, "network.allow: the name has no address"),
                Ok(nets) => allow.extend(nets),
                Err(e) => {
                    tracing::warn!(?rule, error = %e, "network.allow: the name does not resolve; it stays closed")
                }
            }
        }
        let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let script = render(uids, &resolvers(&resolv), &allow);
        nft(&config.nft_binary, &script)?;
        Ok(Self { table: table_name(uids), nft: config.nft_binary.clone() })
    }

    pub fn table(&self) -> &str {
        &self.table
    }
}

impl Drop for EgressFilter {
    fn drop(&mut self) {
        if let Err(e) = nft(&self.nft, &format!("delete table inet {}\n", self.table)) {
            tracing::warn!(table = %self.table, error = %e, "could not remove the guest egress filter");
        }
    }
}

/// Deletes the filter tables of uid blocks no server holds any more (their server died
/// without removing them): every `boxwood_egress_<base>` table for which `hold_if_free(base)`
/// gives a guard, deleted while the guard is held (so a server claiming the block meanwhile
/// keeps its new table). Returns the names deleted. A stale table only restricts uids nobody uses, and a
/// server that claims the block again replaces it, so this is tidiness, not safety.
pub fn sweep_stale<G>(nft_binary: &Path, hold_if_free: impl Fn(u32) -> Option<G>) -> Result<Vec<String>, VmError> {
    let mut removed = Vec::new();
    for (name, base) in tables(nft_binary)? {
        let Some(guard) = hold_if_free(base) else { continue };
        nft(nft_binary, &format!("delete table inet {name}\n"))?;
        drop(guard);
        tracing::info!(table = name, "removed a stale guest egress filter");
        removed.push(name);
    }
    Ok(removed)
}

/// Deletes the filter table of the uid block `uids`, which the caller has just claimed: a
/// table for it is a dead server's. [`EgressFilter::install`] replaces it anyway; this is for
/// a runtime that installs none (`network.filter = "off"`, the VM tests), whose guests it
/// would otherwise keep from reaching what they were allowed to. Returns whether one existed.
pub fn remove_own_stale(nft_binary: &Path, uids: &RangeInclusive<u32>) -> Result<bool, VmError> {
    let name = table_name(uids);
    if !tables(nft_binary)?.iter().any(|(n, _)| *n == name) {
        return Ok(false);
    }
    nft(nft_binary, &format!("delete table inet {name}\n"))?;
    tracing::info!(table = name, "removed a stale guest egress filter of this runtime's uid block");
    Ok(true)
}

/// The Boxwood filter tables there are: (name, first uid of their block).
fn tables(nft_binary: &Path) -> Result<Vec<(String, u32)>, VmError> {
    let out = Command::new(nft_binary)
        .args(["list", "tables", "inet"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| VmError::Egress(format!("cannot run nft: {e}")))?;
    if !out.status.success() {
        return Err(VmError::Egress(format!("nft list tables: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let name = line.trim().strip_prefix("table inet ")?;
            let base = name.strip_prefix(TABLE_PREFIX)?.parse::<u32>().ok()?;
            Some((name.to_owned(), base))
        })
        .collect())
}

/// Runs `nft -f -` with `script`.
fn nft(binary: &Path, script: &str) -> Result<(), VmError> {
    let fail = |why: String| VmError::Egress(why);
    let mut child = Command::new(binary)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run {}: {e}", binary.display())))?;
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

    fn net(s: &str) -> (String, u8, Option<u16>, Option<Proto>) {
        let r: AllowRule = s.parse().unwrap_or_else(|e| panic!("{e}"));
        match r.target {
            Target::Net { addr, prefix } => (addr.to_string(), prefix, r.port, r.proto),
            Target::Host(h) => panic!("{s:?} parsed as host {h}"),
        }
    }

    #[test]
    fn allow_rules_parse() {
        assert_eq!(net("10.1.2.3:3128"), ("10.1.2.3".into(), 32, Some(3128), None));
        assert_eq!(net("192.168.7.9/16"), ("192.168.0.0".into(), 16, None, None));
        assert_eq!(net("[fd00::1]:443"), ("fd00::1".into(), 128, Some(443), None));
        assert_eq!(net("fd00::/8"), ("fd00::".into(), 8, None, None));
        assert_eq!(net("10.1.2.3:3128/tcp"), ("10.1.2.3".into(), 32, Some(3128), Some(Proto::Tcp)));
        assert_eq!(net("192.168.0.0/16/udp"), ("192.168.0.0".into(), 16, None, Some(Proto::Udp)));
        assert_eq!(net("[fd00::/64]:53/udp"), ("fd00::".into(), 64, Some(53), Some(Proto::Udp)));
        let h: AllowRule = "Mirror.Example:443/tcp".parse().unwrap();
        assert_eq!(
            h,
            AllowRule { target: Target::Host("mirror.example".into()), port: Some(443), proto: Some(Proto::Tcp) }
        );
        for bad in [
            "",
            "10.0.0.1:0",
            "10.0.0.1:99999",
            "10.0.0.0/33",
            "[fd00::1",
            "1.2.3.4/x",
            "1.2.3",
            "host.example/24",
            "a..b:80",
            "ho st:80",
            "10.0.0.1:80/sctp",
        ] {
            assert!(bad.parse::<AllowRule>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn host_names_resolve_to_host_routes() {
        let r: AllowRule = "localhost:8000/tcp".parse().unwrap();
        let nets = r.resolve().unwrap();
        assert!(nets.iter().any(|n| n.addr == IpAddr::from([127, 0, 0, 1]) && n.prefix == 32), "{nets:?}");
        assert!(nets.iter().all(|n| n.port == Some(8000) && n.proto == Some(Proto::Tcp)));
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
        let allow: Vec<NetRule> = ["127.0.0.1:3128", "10.0.0.0/8", "[fd00::1]:443/tcp", "192.168.1.0/24/udp"]
            .iter()
            .flat_map(|r| r.parse::<AllowRule>().unwrap().resolve().unwrap())
            .collect();
        let s = render(&uids, &["10.255.255.53".parse().unwrap()], &allow);
        assert!(s.contains("meta skuid 2000000000-2000000255 jump guests"), "{s}");
        // The hook chain has no other rule: nothing else on the host is affected.
        let hook = s.split("chain output").nth(1).unwrap();
        assert_eq!(hook.matches("jump").count() + hook.matches("reject").count(), 1, "{hook}");
        assert!(hook.contains("policy accept"), "{hook}");
        let pos = |needle: &str| s.find(needle).unwrap_or_else(|| panic!("{needle} missing in {s}"));
        // Established flows, resolvers and allowed destinations come before the rejects, so they win.
        let first_reject = pos("fib daddr");
        assert!(pos("ct state established,related accept") < first_reject);
        assert!(pos("ip daddr 10.255.255.53 meta l4proto { tcp, udp } th dport 53 accept") < first_reject);
        assert!(pos("ip daddr 127.0.0.1/32 meta l4proto { tcp, udp } th dport 3128 accept") < first_reject);
        assert!(pos("ip daddr 10.0.0.0/8 accept") < first_reject);
        assert!(pos("ip6 daddr fd00::1/128 tcp dport 443 accept") < first_reject);
        assert!(pos("ip daddr 192.168.1.0/24 meta l4proto udp accept") < first_reject);
        for range in DENY_V4.iter().chain(DENY_V6) {
            assert!(s.contains(range), "{range} not denied");
        }
        // Each denied class both resets TCP and refuses the rest; nothing is accepted after them.
        let tail = &s[first_reject..s.find("chain output").unwrap()];
        assert_eq!(tail.matches("reject with tcp reset").count(), 4, "{tail}");
        assert_eq!(tail.matches("reject with icmpx admin-prohibited").count(), 4, "{tail}");
        assert!(!tail.contains("accept"), "{tail}");
    }
}
