//! Which addresses registry fetches may connect to: never the host itself, loopback,
//! link-local (cloud metadata), private or otherwise internal ranges — unless the operator
//! trusts the host (a configured mirror or an `allow_hosts` entry). Names are checked where
//! they are resolved, at connect time, so DNS rebinding and redirects are covered too.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// The error a connection attempt fails with when every address of a host is internal.
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves only to internal addresses, which imports may not reach")]
pub(crate) struct Blocked {
    pub host: String,
}

/// The hosts imports may reach whatever they resolve to. The host's own addresses are read
/// at each check, so an address the host gains later is refused too.
#[derive(Debug, Clone)]
pub(crate) struct NetGuard {
    trusted: Arc<HashSet<String>>,
}

impl NetGuard {
    /// `trusted`: host names or IP literals (no port, any case).
    pub fn new(trusted: impl IntoIterator<Item = String>) -> Self {
        let trusted = trusted.into_iter().map(|h| unbracket(&h).to_ascii_lowercase()).collect();
        Self { trusted: Arc::new(trusted) }
    }

    fn is_trusted(&self, host: &str) -> bool {
        self.trusted.contains(&unbracket(host).to_ascii_lowercase())
    }

    /// Whether `ip` may be connected to for an untrusted host.
    pub fn allowed_ip(&self, ip: IpAddr) -> bool {
        is_public(ip) && !is_own(canonical(ip))
    }

    /// Checks a URL before a request: reqwest does not resolve IP-literal hosts, so those are
    /// checked here; names are checked by the resolver.
    pub fn check_url(&self, url: &Url) -> Result<(), Blocked> {
        let Some(host) = url.host_str() else {
            return Err(Blocked { host: String::new() });
        };
        let Ok(ip) = unbracket(host).parse::<IpAddr>() else {
            return Ok(());
        };
        if self.is_trusted(host) || self.allowed_ip(ip) { Ok(()) } else { Err(Blocked { host: host.to_owned() }) }
    }
}

impl Resolve for NetGuard {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let usable: Vec<SocketAddr> = if guard.is_trusted(&host) {
                found
            } else {
                found.into_iter().filter(|a| guard.allowed_ip(a.ip())).collect()
            };
            if usable.is_empty() {
                return Err(Box::new(Blocked { host }) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(usable.into_iter()) as Addrs)
        })
    }
}

fn unbracket(host: &str) -> &str {
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

/// An IPv4-mapped or NAT64 IPv6 address stands for its IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                    let [a, b, c, d] = [s[6] >> 8, s[6] & 0xff, s[7] >> 8, s[7] & 0xff].map(|x| x as u8);
                    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
                } else {
                    ip
                }
            }
        },
        v4 => v4,
    }
}

/// Not the host, not internal: what a registry on the Internet may be.
pub(crate) fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(a) => {
            let [o0, o1, o2, _] = a.octets();
            !(o0 == 0
                || o0 == 10
                || o0 == 127
                || (o0 == 100 && (64..128).contains(&o1))
                || (o0 == 169 && o1 == 254)
                || (o0 == 172 && (16..32).contains(&o1))
                || (o0 == 192 && o1 == 168)
                || (o0 == 192 && o1 == 0 && o2 == 0)
                || (o0 == 198 && (o1 == 18 || o1 == 19))
                || o0 >= 224)
        }
        IpAddr::V6(a) => {
            let first = a.segments()[0];
            !(a.is_loopback()
                || a.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || (first & 0xff00) == 0xff00
                || a == Ipv6Addr::from(1u128))
        }
    }
}

/// Whether `ip` is an address of one of this host's interfaces now (a registry URL naming
/// the host's public address would otherwise reach its own services). When the interfaces
/// cannot be listed, every address counts as the host's: the check fails closed.
fn is_own(ip: IpAddr) -> bool {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        tracing::warn!("cannot list this host's addresses; refusing the registry connection");
        return true;
    };
    addrs.filter_map(|i| i.address).any(|a| {
        let addr = if let Some(v4) = a.as_sockaddr_in() {
            Some(IpAddr::V4(v4.ip()))
        } else {
            a.as_sockaddr_in6().map(|v6| canonical(IpAddr::V6(v6.ip())))
        };
        addr == Some(ip)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_ranges_are_not_public() {
        for internal in [
            "127.0.0.1",
            "127.8.9.10",
            "10.0.0.1",
            "172.16.5.4",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(!is_public(internal.parse().unwrap()), "{internal} counted as public");
        }
        // 203.0.113.0/24 is where this machine's package registries resolve: the Internet.
        for public in ["203.0.113.80", "8.8.8.8", "172.32.0.1", "100.128.0.1", "2001:4860:4860::8888"] {
            assert!(is_public(public.parse().unwrap()), "{public} counted as internal");
        }
    }

    #[test]
    fn ip_literal_urls_are_checked_and_trusted_hosts_pass() {
        let g = NetGuard::new(["127.0.0.1".to_owned(), "[::1]".to_owned(), "Mirror.Lan".to_owned()]);
        let url = |u: &str| Url::parse(u).unwrap();
        assert!(g.check_url(&url("http://127.0.0.1:5000/v2/")).is_ok(), "a trusted mirror");
        assert!(g.check_url(&url("http://[::1]:5000/v2/")).is_ok());
        assert!(g.check_url(&url("http://127.0.0.2:8080/v2/")).is_err());
        assert!(g.check_url(&url("http://169.254.169.254/latest/meta-data/")).is_err());
        assert!(g.check_url(&url("http://[::ffff:10.0.0.1]/")).is_err());
        assert!(g.check_url(&url("https://203.0.113.80/v2/")).is_ok());
        assert!(g.check_url(&url("https://registry.example/v2/")).is_ok(), "names are the resolver's job");
        assert!(g.is_trusted("mirror.lan"));
    }

    #[tokio::test]
    async fn names_resolving_to_internal_addresses_are_refused() {
        let g = NetGuard::new([]);
        let err = match g.resolve("localhost".parse().unwrap()).await {
            Ok(addrs) => panic!("localhost resolved to {:?}", addrs.collect::<Vec<_>>()),
            Err(e) => e,
        };
        assert!(err.downcast_ref::<Blocked>().is_some(), "{err}");
        let trusted = NetGuard::new(["localhost".to_owned()]);
        assert!(trusted.resolve("localhost".parse().unwrap()).await.is_ok(), "positive control: trusted");
    }
}
