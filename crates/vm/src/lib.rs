//! Boxwood's host side of the sandbox VMs: building the guest kernel and initramfs,
//! booting QEMU microVMs, and talking to the in-guest agent (`boxwood-agent`).
//!
//! - [`prepare_guest_assets`] turns an installed Debian cloud kernel plus the agent binary into
//!   a bootable `vmlinux` + uncompressed initramfs.
//! - [`QemuRuntime`] implements [`VmRuntime`]: it starts a VM per [`VmSpec`] and returns a
//!   [`Vm`], which spawns processes through the agent and streams their [`ProcessEvent`]s.
//!   VMs start as clones of a snapshotted template VM, most of them taken from a warm pool
//!   (see `docs/ARCHITECTURE.md`, "Fast start"); without a template they cold-boot.
//! - Before a run, [`Vm::put_file`] injects files; after it, [`Vm::export_upper`] fetches the
//!   run's filesystem changes as a tar.
//! - [`reap_stale`] cleans up after a crashed server.

mod assets;
mod ca;
mod clone;
mod console;
mod cpio;
mod decompress;
pub mod egress;
mod error;
mod guest;
mod jail;
mod modules;
mod patience;
mod pool;
mod qemu;
mod qmp;
mod runtime;
mod scratch;
mod stale;
mod template;
mod transfer;
mod vm;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use boxwood_protocol::{Exit, Hello, OutputStream, RootfsSpec, SetupReport, Spawn};
use serde::Deserialize;
use tokio::io::AsyncWrite;

pub use assets::{GuestAssets, prepare_guest_assets};
pub use error::VmError;
pub use jail::JailConfig;
pub use modules::NEEDED_MODULES;
pub use qemu::{SLOTS as LAYER_SLOTS, kernel_cmdline};
pub use runtime::QemuRuntime;
pub use scratch::MIN_SCRATCH_BYTES;
pub use stale::reap_stale;

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM if a probe VM boots with it, TCG otherwise.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// How VMs are run; usually part of the server configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmConfig {
    pub qemu_binary: PathBuf,
    pub accel: Accel,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// From QEMU spawn to the agent's `SetupDone`.
    pub boot_timeout_secs: u64,
    /// Guest TSC frequency for `tsc_early_khz=`; `None` reads the host's "cpu MHz".
    pub tsc_khz: Option<u32>,
    pub extra_kernel_args: Vec<String>,
    /// Fast start: boot a template VM once, snapshot it, and start every VM as a
    /// copy-on-write clone of it. `false`: every VM cold-boots.
    pub snapshot: bool,
    /// Restored, warmed clones kept waiting for runs (with `snapshot`). `None`: sized to the
    /// machine (2 per CPU, at most 16, and at most one per 4 × `memory_mib` of available memory); `0`:
    /// no pool, each VM is restored when asked for.
    pub pool_size: Option<usize>,
    /// How each QEMU is confined (`vm.jail`).
    pub jail: JailConfig,
    /// Each run's writable layer is an ext4 filesystem on a scratch disk of its size (a sparse,
    /// unlinked file on the host), so what a run writes is bounded by its cap, not by the
    /// guest's RAM. `false`: the layer is a tmpfs in guest RAM.
    pub upper_disk: bool,
    /// The `mkfs.ext4` that formats scratch disks (e2fsprogs).
    pub mkfs_ext4: PathBuf,
    /// PEM files of CA certificates every guest trusts besides its image's own (a
    /// TLS-intercepting proxy's): added to the system bundles and named by the usual env
    /// variables for the run, never written into a persisted image. Empty: none.
    pub extra_ca_certs: Vec<PathBuf>,
    /// The writable-layer size of a run that asks for none (the server's
    /// `core.limits.max_layer_bytes`; set by the server, not read from the file): pooled
    /// clones have a scratch disk of this size mounted before a run takes one. `None`: made
    /// when a run takes it.
    #[serde(skip)]
    pub usual_upper_bytes: Option<u64>,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            accel: Accel::Auto,
            memory_mib: 256,
            vcpus: 1,
            boot_timeout_secs: 60,
            tsc_khz: None,
            extra_kernel_args: Vec::new(),
            snapshot: true,
            pool_size: None,
            jail: JailConfig::default(),
            upper_disk: true,
            mkfs_ext4: scratch::default_mkfs(),
            extra_ca_certs: Vec::new(),
            usual_upper_bytes: None,
        }
    }
}

/// A read-only raw disk image attached as `virtio-blk-device,serial=…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    /// At most 20 bytes of `[A-Za-z0-9._-]` (the virtio-blk serial limit).
    pub serial: String,
}

/// One VM to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// Unique among live VMs; names the scratch dir `run_dir/<name>/`. `[A-Za-z0-9._-]`, ≤ 64.
    pub name: String,
    pub disks: Vec<DiskSpec>,
    pub rootfs: RootfsSpec,
    pub hostname: String,
    /// Overrides [`VmConfig::memory_mib`].
    pub memory_mib: Option<u32>,
    /// Overrides [`VmConfig::vcpus`].
    pub vcpus: Option<u32>,
    /// QEMU user-mode networking (NAT to the host; the guest is `10.0.2.15/24`, gateway
    /// `10.0.2.2` = the host's loopback, DNS `10.0.2.3`). `false`: no network device at all.
    pub network: bool,
    /// The writable layer goes on a scratch disk of `rootfs.upper_size_bytes` (with
    /// `vm.upper_disk`); `false`: in guest RAM, costing the host no disk.
    pub upper_on_disk: bool,
}

/// Where and how [`Vm::put_file`] creates a file in the guest's root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    /// Absolute path inside the root; missing parents are created root-owned, 0755.
    pub path: String,
    /// Permission bits, `& 0o7777` (set-id bits included).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The host's own bound on an export, checked as bytes arrive (the agent's counts are not
/// trusted). A plain `u64` is a byte cap.
pub trait ExportBudget: Send + Sync {
    /// `total` bytes of tar have arrived so far; `Err(reason)` stops the export at once
    /// ([`VmError::ExportRefused`]) and the partial file is removed.
    fn admit(&self, total: u64) -> Result<(), String>;
}

impl ExportBudget for u64 {
    fn admit(&self, total: u64) -> Result<(), String> {
        if total > *self { Err(format!("the changes exceed {self} bytes")) } else { Ok(()) }
    }
}

/// What [`Vm::export_upper`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpperStats {
    /// Tar members as the agent counts them (a guest's claim; 0 when the run changed nothing).
    pub entries: u64,
    /// Bytes of tar stream.
    pub tar_bytes: u64,
}

/// Something that can boot VMs.
#[async_trait]
pub trait VmRuntime: Send + Sync {
    /// Starts a VM (a pooled or freshly restored template clone, or a cold boot), attaches the
    /// spec's disks and network, sends Setup (host wall clock and 64 random bytes from the host,
    /// both taken now, hostname, rootfs, network) and waits for SetupDone.
    async fn start(&self, spec: VmSpec) -> Result<Box<dyn Vm>, VmError>;
    /// The accelerator actually in use ("kvm" or "tcg").
    fn accel(&self) -> &str;
    /// Whether VMs start from a template snapshot yet (readiness).
    fn fast_start(&self) -> FastStartState {
        FastStartState::Off
    }
    /// QEMU processes kept waiting for runs (the warm pool's clones).
    fn idle_qemu_pids(&self) -> Vec<u32> {
        Vec::new()
    }
}

/// CPU time and proportional memory of a set of processes, read from `/proc` (processes that
/// are gone count nothing).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessUsage {
    pub cpu_seconds: f64,
    pub pss_bytes: u64,
}

impl ProcessUsage {
    pub fn of(pids: &[u32]) -> Self {
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
        let mut usage = Self::default();
        for pid in pids {
            // Fields after the parenthesised command: utime and stime are the 12th and 13th.
            if let Some(rest) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.to_owned()))
            {
                let f: Vec<&str> = rest.split_whitespace().collect();
                let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                usage.cpu_seconds += (t(11) + t(12)) as f64 / ticks;
            }
            if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
                let kib = s
                    .lines()
                    .find_map(|l| l.strip_prefix("Pss:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
                usage.pss_bytes += kib.unwrap_or(0) * 1024;
            }
        }
        usage
    }
}

/// Where fast start is: VMs cold-boot until the template is ready, and for good when it is
/// off or could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastStartState {
    /// The template is being built.
    Building,
    /// Runs start from pooled or restored template clones; `pooled` are warm now.
    Ready { pooled: usize, target: usize },
    /// No template could be made: every VM cold-boots.
    Unavailable,
    /// Configured off (`vm.snapshot = false`).
    Off,
}

/// A running VM.
#[async_trait]
pub trait Vm: Send + Sync {
    fn hello(&self) -> &Hello;
    /// What the agent reported after Setup (network configuration and counters).
    fn setup_report(&self) -> &SetupReport;
    /// QEMU spawn → SetupDone for a cold boot; for a clone, the call to
    /// [`VmRuntime::start`] → SetupDone (a pooled clone was restored earlier).
    fn boot_duration(&self) -> Duration;
    /// The VM's name (its [`VmSpec::name`]).
    fn name(&self) -> &str;
    /// Pid of the QEMU process.
    fn qemu_pid(&self) -> u32;
    /// The per-VM scratch dir (sockets, console log, pid file).
    fn dir(&self) -> &Path;
    /// Sends Spawn and waits for Spawned/SpawnFailed. Returns the pid and a stream of that
    /// process's events. SpawnFailed → [`VmError::SpawnFailed`].
    async fn spawn(&self, spawn: Spawn) -> Result<Process, VmError>;
    /// Writes to a process's stdin (any size; split into frames as needed), closing it after
    /// the data if `close`.
    async fn write_stdin(&self, id: u32, data: Vec<u8>, close: bool) -> Result<(), VmError>;
    /// Signals the process group of process `id`.
    async fn signal(&self, id: u32, signal: i32) -> Result<(), VmError>;
    /// Creates (or replaces) `file.path` in the guest's root with the content of the host file
    /// `source`, streamed in chunks of at most 1 MiB, then applies owner and mode. Symlinks in
    /// the guest path resolve inside the root. Guest-side failure → [`VmError::FileFailed`].
    async fn put_file(&self, file: &FileSpec, source: &Path) -> Result<(), VmError>;
    /// A handle of the run's scratch disk (`None`: its writable layer is in the guest's RAM):
    /// the export's disk-referenced members name extents of it, which the reader copies from
    /// here (see `boxwood_protocol::DISK_EXTENTS_RECORD`). Its content is the guest's.
    fn scratch_disk(&self) -> Result<Option<std::fs::File>, VmError>;
    /// Kills every guest process, syncs, and streams the overlay's upper directory (the run's
    /// changes) as a PAX tar into `out` (a file, or a pipe to a reader unpacking it as it
    /// comes), counted against `budget` before each write; large files on the scratch disk
    /// travel as extents of [`Self::scratch_disk`] instead of their bytes. Guest-side failure →
    /// [`VmError::ExportFailed`]; past `budget` → [`VmError::ExportRefused`]; on any error
    /// `out` holds a cut-off tar.
    async fn export_upper(
        &self,
        out: &mut (dyn AsyncWrite + Send + Unpin),
        budget: &dyn ExportBudget,
    ) -> Result<UpperStats, VmError>;
    /// Asks the agent to power off, waits up to a few seconds, then SIGKILLs QEMU; always reaps
    /// QEMU and removes the scratch dir. Later calls do nothing.
    async fn shutdown(&self) -> Result<(), VmError>;
}

/// A started process.
#[derive(Debug)]
pub struct Process {
    pub pid: u32,
    /// Unbounded, so the channel reader never waits for a slow consumer. Ends with exactly one
    /// `Exited` or `Lost`.
    pub events: tokio::sync::mpsc::UnboundedReceiver<ProcessEvent>,
}

/// What happens to a process, in order.
#[derive(Debug)]
pub enum ProcessEvent {
    Output {
        stream: OutputStream,
        data: Vec<u8>,
    },
    Exited(Exit),
    /// The VM died or the channel broke before the process exited.
    Lost(VmError),
}
