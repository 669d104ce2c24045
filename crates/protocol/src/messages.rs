//! The messages themselves. Field names are part of the protocol; postcard encodes by
//! position, so only append fields at the end of a struct and bump the version otherwise.
//! Byte payloads are `serde_bytes`: postcard copies them whole rather than one element at a
//! time (the bytes on the wire are the same), which is most of a bulk transfer's cost in a
//! TCG guest.

use serde::{Deserialize, Serialize};

/// Host → guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMessage {
    /// Prepare the VM for a run: clock, entropy, hostname and root filesystem.
    Setup(Setup),
    /// Start a process.
    Spawn(Spawn),
    /// Write to a process's stdin, optionally closing it afterwards.
    Stdin {
        id: u32,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        close: bool,
    },
    /// Send a signal to a process's whole process group.
    Signal { id: u32, signal: i32 },
    /// Sync filesystems and power off.
    Shutdown,
    /// One chunk of a file to create in the root filesystem before a run. Chunks of a file
    /// arrive in order; `offset == 0` creates (or truncates) it, creating missing parent
    /// directories (root-owned, 0755); `last` applies `mode`/`uid`/`gid` and closes it. The
    /// agent answers only the last chunk, with `FilePut` or `FileFailed` (a failure of an
    /// earlier chunk is remembered and reported then).
    PutFile(PutFile),
    /// Kill every process but the agent, sync, and stream the overlay's upper directory (the
    /// run's changes) as a tar: `UpperChunk`s, then `UpperDone` (or `UpperFailed`).
    ExportUpper,
    /// Before `Setup` only: run through the code paths a run takes without any run content:
    /// build a root from `rootfs` (as `Setup` would), configure the network, spawn `argv` in it with id
    /// [`crate::WARMUP_ID`] (its `Spawned`/`Output`/`Exited` are sent as for any process), then
    /// take the root down again; also prepares the empty network namespace runs without
    /// networking use. Under TCG, QEMU translates guest code again after every restore, so a
    /// freshly restored VM runs this once before it is handed to a run. Answered with
    /// `WarmedUp`.
    Warmup(Warmup),
    /// Before `Setup` only: unmount the scratch disk a `Warmup` mounted (see
    /// [`Warmup::upper`]), so the host can replace its filesystem. Answered with
    /// `UpperReleased`.
    ReleaseUpper,
}

/// Guest → host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestMessage {
    /// First message after the agent opened the port.
    Hello(Hello),
    SetupDone(SetupReport),
    SetupFailed {
        error: String,
    },
    Spawned {
        id: u32,
        pid: u32,
    },
    /// The process could not be started (exec failed, cwd not creatable, …).
    SpawnFailed {
        id: u32,
        error: String,
    },
    /// A chunk (≤ [`crate::OUTPUT_CHUNK_BYTES`]) of a process's output, within its output limit.
    Output {
        id: u32,
        stream: OutputStream,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The process ended; all of its `Output` precedes this message.
    Exited(Exit),
    /// A request could not be honoured (unknown process id, stdin already closed, …).
    Rejected {
        id: u32,
        error: String,
    },
    FilePut {
        path: String,
    },
    FileFailed {
        path: String,
        error: String,
    },
    /// Part of the upper-directory tar (see [`HostMessage::ExportUpper`]).
    UpperChunk {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The tar is complete: `entries` members, `bytes` of tar stream in total. An upper
    /// directory with no changes gives `entries == 0`.
    UpperDone {
        entries: u64,
        bytes: u64,
    },
    UpperFailed {
        error: String,
    },
    /// `Warmup` is done; `error` says what did not work (the VM is still usable).
    WarmedUp {
        error: Option<String>,
    },
    /// `ReleaseUpper` is done (`error`: it could not be; the VM is not usable for a run).
    UpperReleased {
        error: Option<String>,
    },
}

impl GuestMessage {
    /// The variant's name, for logs and errors that must not quote guest-chosen contents.
    pub fn kind(&self) -> &'static str {
        match self {
            GuestMessage::Hello(_) => "Hello",
            GuestMessage::SetupDone(_) => "SetupDone",
            GuestMessage::SetupFailed { .. } => "SetupFailed",
            GuestMessage::Spawned { .. } => "Spawned",
            GuestMessage::SpawnFailed { .. } => "SpawnFailed",
            GuestMessage::Output { .. } => "Output",
            GuestMessage::Exited(_) => "Exited",
            GuestMessage::Rejected { .. } => "Rejected",
            GuestMessage::FilePut { .. } => "FilePut",
            GuestMessage::FileFailed { .. } => "FileFailed",
            GuestMessage::UpperChunk { .. } => "UpperChunk",
            GuestMessage::UpperDone { .. } => "UpperDone",
            GuestMessage::UpperFailed { .. } => "UpperFailed",
            GuestMessage::WarmedUp { .. } => "WarmedUp",
            GuestMessage::UpperReleased { .. } => "UpperReleased",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    /// `uname -r` of the guest kernel.
    pub kernel_release: String,
    /// `uname -m`.
    pub machine: String,
    /// Empty: the agent reads `/proc/sys/kernel/random/boot_id` only after `Setup` re-seeded
    /// the RNG (the kernel makes the id on first read), so VMs restored from one snapshot get
    /// distinct ids; see [`SetupReport::boot_id`].
    pub boot_id: String,
    /// The boot CPU's tick device (`/sys/devices/system/clockevents/clockevent0/current_device`;
    /// `none` where that file is empty), empty if unreadable. A microvm guest ticks on its local APIC timer (`lapic`,
    /// `lapic-deadline`); one whose kernel gave that timer up while calibrating it (a vCPU held
    /// off the host CPU at that moment) reports `none`, and every sleep in it hangs.
    pub clock_events: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Warmup {
    pub rootfs: RootfsSpec,
    /// Run chrooted in that root, as root, with an empty environment.
    pub argv: Vec<String>,
    /// Configure the NIC (if the VM has one) as a later `Setup` with this network would; it
    /// stays configured, in the namespace runs with networking use.
    pub network: Option<NetworkConfig>,
    /// Mount this scratch disk (an empty filesystem the host made) first, build the warm-up's
    /// root on it, and leave it mounted, emptied again, where a `Setup` naming the same disk
    /// and size finds it ready: mounting it, and the first ext4 writes, cost a pooled VM tens
    /// of milliseconds under TCG, paid here instead of in a run. Any other `Setup` fails until
    /// `ReleaseUpper`.
    pub upper: Option<UpperDisk>,
}

/// A scratch disk by its virtio serial and the size of its filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpperDisk {
    pub serial: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setup {
    /// Host wall clock, nanoseconds since the Unix epoch; the guest sets its clock to it.
    pub wall_clock_unix_ns: u64,
    /// Random bytes the guest credits to its entropy pool.
    pub entropy: Vec<u8>,
    pub hostname: String,
    pub rootfs: RootfsSpec,
    /// Configure the (single) virtio-net interface; `None`: the VM has no network.
    pub network: Option<NetworkConfig>,
    /// PEM certificates the run trusts besides its image's CAs: the agent adds them to the
    /// image's system bundles (on a read-only layer of their own, so a persisted image never
    /// holds them) and names the bundle in `SSL_CERT_FILE` and its kin for every process.
    pub extra_ca_pem: Option<String>,
}

/// Static IPv4 configuration of the guest's interface (QEMU user-mode networking).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// CIDR, e.g. `10.0.2.15/24`.
    pub address: String,
    pub gateway: String,
    pub nameserver: String,
}

/// What the guest reports once Setup is done.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetupReport {
    /// Present when networking was configured.
    pub network: Option<NetworkReport>,
    /// `/proc/sys/kernel/random/boot_id`, read after the RNG was re-seeded.
    pub boot_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkReport {
    pub interfaces: Vec<InterfaceCounters>,
    pub configured: NetworkConfig,
    /// Set when reading counters failed (`interfaces` is then empty).
    pub error: Option<String>,
}

/// `/sys/class/net/<name>/statistics/*` of one interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceCounters {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errs: u64,
    pub rx_drop: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errs: u64,
    pub tx_drop: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutFile {
    /// Absolute path inside the root filesystem.
    pub path: String,
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub offset: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    pub last: bool,
}

/// How the agent assembles the root filesystem processes run in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsSpec {
    /// Virtio serials (`virtio-blk-device,serial=…`) of read-only erofs block devices,
    /// **topmost layer first**, stacked as overlayfs lower layers. Serials, not `/dev/vdX`
    /// names, because the guest's probe order is not a contract.
    pub lower_serials: Vec<String>,
    /// Size cap of the writable upper layer, in bytes.
    pub upper_size_bytes: u64,
    /// Virtio serial of the run's scratch disk: a raw disk of `upper_size_bytes` holding an
    /// empty ext4 filesystem, which then holds the writable layer (so the guest's RAM does not
    /// bound what a run writes). `None`: the layer is a tmpfs capped at `upper_size_bytes`.
    pub upper_disk: Option<String>,
}

/// `Debug` shows env names only and the stdin's length (env values are secrets).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spawn {
    /// Host-chosen process id (Contree `spid`), unique within the VM.
    pub id: u32,
    /// `argv[0]` is looked up in the `PATH` of `env` (inside the rootfs) unless it has a `/`.
    pub argv: Vec<String>,
    /// The complete environment; nothing is inherited from the agent.
    pub env: Vec<(String, String)>,
    /// Absolute working directory inside the rootfs, created (as root) if missing.
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    /// Bytes written to stdin right after the start.
    pub stdin: Vec<u8>,
    /// Close stdin after writing `stdin`; otherwise more may follow via `HostMessage::Stdin`.
    pub close_stdin: bool,
    /// Kill the process group with SIGKILL after this long and report `timed_out`.
    pub timeout_ms: Option<u64>,
    /// Bytes per output stream forwarded to the host; the rest is read and counted only.
    pub output_limit_bytes: u64,
}

impl std::fmt::Debug for Spawn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let env: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Spawn")
            .field("id", &self.id)
            .field("argv", &self.argv)
            .field("env_names", &env)
            .field("cwd", &self.cwd)
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("stdin_bytes", &self.stdin.len())
            .field("close_stdin", &self.close_stdin)
            .field("timeout_ms", &self.timeout_ms)
            .field("output_limit_bytes", &self.output_limit_bytes)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    pub id: u32,
    pub pid: u32,
    /// Exit status 0..=255, or −1 when killed by a signal.
    pub code: i32,
    /// Terminating signal, or −1 on a normal exit.
    pub signal: i32,
    pub core_dump: bool,
    /// Killed because `timeout_ms` elapsed.
    pub timed_out: bool,
    /// Died of SIGKILL while the guest kernel's OOM killer killed something (its
    /// `/proc/vmstat` `oom_kill` counter rose during the process's life).
    pub oom_killed: bool,
    pub duration_us: u64,
    pub rusage: Rusage,
    pub stdout: StreamTotals,
    pub stderr: StreamTotals,
}

/// Byte counts of one output stream over the process's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamTotals {
    /// Forwarded to the host.
    pub emitted: u64,
    /// Read from the process but not forwarded, past `output_limit_bytes`.
    pub dropped: u64,
}

/// `struct rusage` of the process (from `wait4`), in the units of `getrusage(2)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rusage {
    pub user_time_us: u64,
    pub sys_time_us: u64,
    pub max_rss_kb: u64,
    pub shared_memory: u64,
    pub unshared_memory: u64,
    pub swaps: u64,
    pub minor_faults: u64,
    pub major_faults: u64,
    pub voluntary_ctx_switches: u64,
    pub involuntary_ctx_switches: u64,
    pub block_input_ops: u64,
    pub block_output_ops: u64,
    pub ipc_msgs_sent: u64,
    pub ipc_msgs_received: u64,
    pub signals_received: u64,
}
