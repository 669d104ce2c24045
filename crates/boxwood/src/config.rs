//! Server configuration, loaded once: a TOML file, then `BOXWOOD_*` environment variables,
//! then command-line flags (each later source wins). Defaults work out of the box.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use boxwood_core::CoreConfig;
use boxwood_core::auth::TokenConfig;
use boxwood_vm::egress::NetworkConfig;
use boxwood_vm::{Accel, VmConfig};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// Root of everything the server keeps: database, image layers, guest assets, VM scratch.
    pub state_dir: PathBuf,
    /// The static guest agent; by default looked up next to the `boxwood` executable and in
    /// the workspace's agent build output.
    pub agent_binary: Option<PathBuf>,
    /// Static busybox the built-in `busybox:latest` image is made from.
    pub busybox: PathBuf,
    /// Guest kernel release (`/boot/vmlinuz-<release>`); newest `*-cloud-amd64` by default.
    pub kernel_release: Option<String>,
    pub vm: VmConfig,
    /// What guests with networking may reach (the egress filter; `docs/ARCHITECTURE.md`,
    /// "Guest networks").
    pub network: NetworkConfig,
    pub core: CoreConfig,
    /// Deadlines for peers that stall (headers, bodies, writes), the connection cap and the
    /// shutdown grace.
    pub http: boxwood_api::HttpConfig,
    /// Image imports: registry mirrors, plain-http registries, internal hosts imports may reach
    /// (`allow_hosts`) and the directories local sources may name (`local_dirs`, none by default).
    pub registry: boxwood_oci::RegistryConfig,
    /// API tokens. With none configured, the server creates one bootstrap token with every
    /// permission (kept in `<state_dir>/bootstrap-token`) and prints it at start.
    pub tokens: Vec<TokenConfig>,
    /// The MCP tools over streamable HTTP at `/mcp`.
    pub mcp: McpConfig,
}

/// `[mcp]`: the tool set `boxwood mcp` serves on stdio, also at `/mcp` (same tokens and
/// namespaces as the API).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct McpConfig {
    /// `Host` header values `/mcp` accepts (a guard against DNS rebinding): loopback by
    /// default; list the names clients use to reach a server that is not on loopback.
    pub allowed_hosts: Vec<String>,
    /// Let `/mcp`'s `upload` (with `path`), `download` and `rsync` read and write this host's
    /// files, as the server's user, for whoever holds a token. Only for a machine whose only
    /// user is the one running the server (the conformance tests); off by default, and then
    /// those tools say to run `boxwood mcp` beside the agent instead.
    pub host_files: bool,
}

impl Default for McpConfig {
    fn default() -> Self {
        Self { allowed_hosts: ["localhost", "127.0.0.1", "::1", "[::1]"].map(String::from).to_vec(), host_files: false }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            state_dir: PathBuf::from("/var/lib/boxwood"),
            agent_binary: None,
            busybox: PathBuf::from("/bin/busybox"),
            kernel_release: None,
            vm: VmConfig::default(),
            network: NetworkConfig::default(),
            core: CoreConfig::default(),
            http: boxwood_api::HttpConfig::default(),
            registry: boxwood_oci::RegistryConfig::default(),
            tokens: Vec::new(),
            mcp: McpConfig::default(),
        }
    }
}

/// Values that may come from the environment or flags, on top of the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub state_dir: Option<PathBuf>,
    pub accel: Option<String>,
    pub agent_binary: Option<PathBuf>,
}

impl Overrides {
    /// `BOXWOOD_LISTEN`, `BOXWOOD_STATE_DIR`, `BOXWOOD_ACCEL`, `BOXWOOD_AGENT_BIN`.
    pub fn from_env() -> anyhow::Result<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Ok(Self {
            listen: var("BOXWOOD_LISTEN").map(|v| v.parse()).transpose().context("BOXWOOD_LISTEN")?,
            state_dir: var("BOXWOOD_STATE_DIR").map(PathBuf::from),
            accel: var("BOXWOOD_ACCEL"),
            agent_binary: var("BOXWOOD_AGENT_BIN").map(PathBuf::from),
        })
    }

    fn apply(self, cfg: &mut Config) -> anyhow::Result<()> {
        if let Some(v) = self.listen {
            cfg.listen = v;
        }
        if let Some(v) = self.state_dir {
            cfg.state_dir = v;
        }
        if let Some(v) = self.accel {
            cfg.vm.accel = parse_accel(&v)?;
        }
        if let Some(v) = self.agent_binary {
            cfg.agent_binary = Some(v);
        }
        Ok(())
    }
}

fn parse_accel(v: &str) -> anyhow::Result<Accel> {
    match v {
        "auto" => Ok(Accel::Auto),
        "kvm" => Ok(Accel::Kvm),
        "tcg" => Ok(Accel::Tcg),
        other => anyhow::bail!("accel must be auto, kvm or tcg, got {other:?}"),
    }
}

impl Config {
    /// File (if any), then environment, then flags.
    pub fn load(file: Option<&Path>, env: Overrides, flags: Overrides) -> anyhow::Result<Self> {
        let mut cfg = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => Config::default(),
        };
        env.apply(&mut cfg)?;
        flags.apply(&mut cfg)?;
        cfg.core.retention.validate().map_err(anyhow::Error::msg)?;
        cfg.http.validate().map_err(anyhow::Error::msg)?;
        Ok(cfg)
    }

    /// The agent binary to put in the guest initramfs.
    pub fn agent_path(&self) -> anyhow::Result<PathBuf> {
        if let Some(p) = &self.agent_binary {
            return Ok(p.clone());
        }
        let exe = std::env::current_exe().context("locating the boxwood executable")?;
        let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        // In a checkout, the static build of scripts/build-agent.sh
        // (target/{debug,release}/boxwood → target/x86_64-unknown-linux-gnu/agent/boxwood-agent;
        // target/debug/deps/<test> one level further down). Not target/debug/boxwood-agent:
        // that is the workspace's dynamically linked host build, which cannot be /init.
        let mut candidates: Vec<PathBuf> = [dir.parent(), dir.parent().and_then(Path::parent)]
            .into_iter()
            .flatten()
            .map(|up| up.join("x86_64-unknown-linux-gnu/agent/boxwood-agent"))
            .collect();
        // An installed layout: the agent next to the server binary.
        if dir.file_name().is_none_or(|n| n != "debug" && n != "release" && n != "deps") {
            candidates.push(dir.join("boxwood-agent"));
        }
        candidates.into_iter().find(|p| p.is_file()).with_context(|| {
            "the guest agent binary was not found; build it with scripts/build-agent.sh or set agent_binary / BOXWOOD_AGENT_BIN"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("boxwood.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\nstate_dir = \"/srv/a\"\n[vm]\naccel = \"kvm\"\nmemory_mib = 512\n\
             [core]\nmax_concurrent_runs = 3\n[[tokens]]\ntoken = \"t\"\nnamespace = \"n\"\npermissions = [\"list\"]\n",
        )
        .unwrap();
        let env = Overrides { state_dir: Some("/srv/b".into()), accel: Some("tcg".into()), ..Default::default() };
        let flags = Overrides { state_dir: Some("/srv/c".into()), ..Default::default() };
        let cfg = Config::load(Some(&path), env, flags).unwrap();
        assert_eq!(cfg.listen.port(), 9000);
        assert_eq!(cfg.state_dir, PathBuf::from("/srv/c"));
        assert_eq!(cfg.vm.accel, Accel::Tcg);
        assert_eq!(cfg.vm.memory_mib, 512);
        assert_eq!(cfg.core.max_concurrent_runs, 3);
        assert_eq!(cfg.tokens.len(), 1);
    }

    #[test]
    fn network_section() {
        use boxwood_vm::egress::{FilterMode, Target};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("boxwood.toml");
        let load = |text: &str| {
            std::fs::write(&path, text).unwrap();
            Config::load(Some(&path), Overrides::default(), Overrides::default())
        };
        let cfg = load("").unwrap();
        assert_eq!((cfg.network.filter, cfg.network.allow.len()), (FilterMode::Nftables, 0), "filtered, nothing open");
        let cfg = load(
            "[network]\nallow = [\"10.1.2.3:3128/tcp\", \"192.168.0.0/16\", \"[fd00::1]:443\", \"mirror.example:443\"]\n",
        )
        .unwrap();
        assert_eq!(cfg.network.allow.len(), 4);
        assert_eq!(cfg.network.allow[3].target, Target::Host("mirror.example".into()));
        assert_eq!(load("[network]\nfilter = \"off\"\n").unwrap().network.filter, FilterMode::Off);
        for bad in
            ["[network]\nallow = [\"10.0.0.0/33\"]\n", "[network]\nfilter = \"iptables\"\n", "[network]\nalow = []\n"]
        {
            assert!(load(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn fair_share_and_request_limits_are_configurable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("boxwood.toml");
        let cfg = Config::load(None, Overrides::default(), Overrides::default()).unwrap();
        assert_eq!(cfg.core.max_concurrent_runs_per_namespace, None, "defaults to all but one slot");
        std::fs::write(
            &path,
            "[core]\nmax_concurrent_runs = 6\nmax_concurrent_runs_per_namespace = 2\n\
             [core.limits]\nmax_argv_env_bytes = 4096\nmax_env_vars = 5\nmax_stdin_bytes = 10\n",
        )
        .unwrap();
        let cfg = Config::load(Some(&path), Overrides::default(), Overrides::default()).unwrap();
        assert_eq!(cfg.core.max_concurrent_runs_per_namespace, Some(2));
        let l = &cfg.core.limits;
        assert_eq!((l.max_argv_env_bytes, l.max_env_vars, l.max_stdin_bytes), (4096, 5, 10));
    }

    #[test]
    fn typos_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("boxwood.toml");
        std::fs::write(&path, "listne = \"127.0.0.1:9000\"\n").unwrap();
        assert!(Config::load(Some(&path), Overrides::default(), Overrides::default()).is_err());
        let bad = Overrides { accel: Some("fast".into()), ..Default::default() };
        assert!(Config::load(None, bad, Overrides::default()).is_err());
    }

    #[test]
    fn deadlines_that_would_cut_everything_off_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("boxwood.toml");
        std::fs::write(&path, "[http]\nwrite_timeout_secs = 0\n").unwrap();
        let err = Config::load(Some(&path), Overrides::default(), Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("http.write_timeout_secs"), "{err}");
        std::fs::write(&path, "[http]\nwrite_timeout_secs = 1\nshutdown_grace_secs = 0\n").unwrap();
        assert!(Config::load(Some(&path), Overrides::default(), Overrides::default()).is_ok());
    }

    /// The README's example is the documentation of the file format: it must load.
    #[test]
    fn readme_example_loads() {
        let readme = include_str!("../../../README.md");
        let start = readme.find("```toml\n").expect("README has a toml example") + 8;
        let text = &readme[start..start + readme[start..].find("```").unwrap()];
        let cfg: Config = toml::from_str(text).unwrap_or_else(|e| panic!("README example: {e}"));
        assert_eq!(cfg.registry.mirrors["docker.io"], ["http://127.0.0.1:5000"]);
        assert!(cfg.registry.local_dirs.is_empty() && cfg.registry.allow_hosts.is_empty());
    }
}
