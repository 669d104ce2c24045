//! [`QemuRuntime`]: accelerator choice and how a VM gets started: a warm pooled clone of the
//! template, a clone restored on demand, or a cold boot (QEMU spawn → agent Hello → Setup →
//! SetupDone) when no template is available.
#![allow(unsafe_code)]

use std::fs::{self, File};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use boxwood_protocol::{
    FrameDecoder, GuestMessage, Hello, HostMessage, MAX_GUEST_FRAME_BYTES, NetworkConfig, PROTOCOL_VERSION, RootfsSpec,
    Setup, SetupReport, UpperDisk, WARMUP_ID, Warmup, encode_frame,
};
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;

use crate::jail::{ChildSetup, Confinement, Inherited, Jail, UidLease, VmJail, give_dir};
use crate::pool::FastStart;
use crate::qemu::{Accelerator, Devices, QemuArgs, VmPaths, host_tsc_khz, kernel_cmdline, qemu_argv, slot_serial};
use crate::scratch::{Bases, SCRATCH_SERIAL, scratch_bytes};
use crate::template::WARM_BINARY;
use crate::vm::{QemuChild, QemuVm, Shared, describe, route};
use crate::{Accel, GuestAssets, Vm, VmConfig, VmError, VmRuntime, VmSpec};

/// Nice value of QEMUs doing background work (template build, pool refill): under load they
/// yield the CPU to VMs that serve runs.
pub(crate) const BACKGROUND_NICE: i32 = 10;

/// How long the KVM probe may take to reach the agent's Hello.
const KVM_PROBE_DEADLINE: Duration = Duration::from_secs(5);

/// Starts VMs with QEMU (microvm machine type).
pub struct QemuRuntime {
    base: Arc<Base>,
    /// Templates and the warm pool; `None` with `snapshot = false`.
    fast: Option<FastStart>,
}

impl std::fmt::Debug for QemuRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuRuntime").field("base", &self.base).field("fast_start", &self.fast.is_some()).finish()
    }
}

/// What every way of starting a VM needs.
#[derive(Debug, Clone)]
pub(crate) struct Base {
    pub config: VmConfig,
    pub assets: GuestAssets,
    pub run_dir: PathBuf,
    pub accel: Accelerator,
    pub cmdline: String,
    /// How this runtime's QEMUs are confined; `None` with `vm.jail.enabled = false`.
    pub jail: Option<Arc<Jail>>,
    /// The guest kernel and initramfs as sealed memfds (see [`BootFiles`]).
    pub boot: Arc<BootFiles>,
    /// Formatted scratch filesystems (see [`crate::scratch`]), in `run_dir/.scratch-bases`.
    pub scratch: Arc<Bases>,
    /// `vm.extra_ca_certs`, as certificates only (see [`crate::ca`]).
    pub extra_ca: Option<Arc<str>>,
}

/// QEMU 7.2 opens `-kernel` and `-initrd` by name only, so a jailed QEMU reopens them through
/// `/proc/self/fd/N`, and a reopen checks the file's own mode: the assets in the state dir
/// (0600, root's) would refuse it. Sealed memfd copies, made once per runtime, are readable
/// by any uid holding the fd and writable by none, so no file under the state dir has to be.
#[derive(Debug)]
pub(crate) struct BootFiles {
    kernel: std::os::fd::OwnedFd,
    initramfs: std::os::fd::OwnedFd,
}

impl BootFiles {
    pub fn load(assets: &GuestAssets) -> Result<Self, VmError> {
        Ok(Self {
            kernel: crate::template::sealed_copy(&assets.kernel, "boxwood-kernel")?,
            initramfs: crate::template::sealed_copy(&assets.initramfs, "boxwood-initramfs")?,
        })
    }
}

/// What a QEMU is started for: its accelerator and guest size (its cgroup's limits follow).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub accel: Accelerator,
    pub memory_mib: u32,
    pub vcpus: u32,
}

/// The guest side of QEMU's user-mode network (its built-in defaults).
pub(crate) fn user_net_config() -> NetworkConfig {
    NetworkConfig { address: "10.0.2.15/24".into(), gateway: "10.0.2.2".into(), nameserver: "10.0.2.3".into() }
}

/// The agent channel while a VM is being brought up (before the router task owns it).
pub(crate) struct BootChannel {
    pub reader: OwnedReadHalf,
    pub writer: OwnedWriteHalf,
    pub decoder: FrameDecoder,
}

impl BootChannel {
    /// Connects to the agent socket, retrying until QEMU listens.
    pub async fn connect(paths: &VmPaths, qemu: &QemuChild, deadline: Instant) -> Result<Self, VmError> {
        let stream = loop {
            match UnixStream::connect(&paths.agent_sock).await {
                Ok(s) => break s,
                Err(_) if qemu.exited().is_some() => {
                    return Err(boot_err("QEMU exited before it listened"));
                }
                Err(_) if Instant::now() >= deadline => {
                    return Err(boot_err("timed out waiting for QEMU's socket"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        };
        let (reader, writer) = stream.into_split();
        Ok(Self { reader, writer, decoder: FrameDecoder::with_limit(MAX_GUEST_FRAME_BYTES) })
    }

    pub async fn send(&mut self, msg: &HostMessage) -> Result<(), VmError> {
        let frame = encode_frame(msg)?;
        self.writer.write_all(&frame).await.map_err(|e| boot_err(&format!("agent channel write failed: {e}")))
    }

    /// Reads the next guest message, bounded by `deadline` and QEMU's life.
    pub async fn recv(&mut self, qemu: &QemuChild, deadline: Instant) -> Result<GuestMessage, VmError> {
        let mut buf = vec![0u8; 16 * 1024];
        let mut exit = qemu.exit.clone();
        loop {
            if let Some(msg) = self.decoder.next_message()? {
                return Ok(msg);
            }
            let read = tokio::select! {
                r = tokio::time::timeout_at(deadline, self.reader.read(&mut buf)) => Some(r),
                _ = exit.wait_for(Option::is_some) => None,
            };
            match read {
                None => return Err(boot_err("QEMU exited during boot")),
                Some(Err(_)) => return Err(boot_err("timed out waiting for the agent")),
                Some(Ok(Ok(0))) => {
                    let why = match qemu.wait(Duration::from_secs(2)).await {
                        Some(_) => "QEMU exited during boot",
                        None => "the agent channel closed during boot",
                    };
                    return Err(boot_err(why));
                }
                Some(Ok(Ok(n))) => self.decoder.push(&buf[..n]),
                Some(Ok(Err(e))) => return Err(boot_err(&format!("agent channel read failed: {e}"))),
            }
        }
    }

    /// Waits for the agent's `Hello` and checks its protocol version.
    pub async fn hello(&mut self, qemu: &QemuChild, deadline: Instant) -> Result<Hello, VmError> {
        let hello = match self.recv(qemu, deadline).await {
            Ok(GuestMessage::Hello(h)) => crate::guest::bounded_hello(h),
            Err(VmError::Boot { .. }) if qemu.exited().is_some() => {
                return Err(VmError::DiedBeforeHello { detail: String::new() });
            }
            Err(e) => return Err(e),
            Ok(other) => return Err(boot_err(&format!("expected Hello, got {}", other.kind()))),
        };
        if hello.version != PROTOCOL_VERSION {
            let why = format!("agent speaks protocol {}, host {PROTOCOL_VERSION}", hello.version);
            return Err(boot_err(&why));
        }
        crate::guest::check_timer(&hello)?;
        Ok(hello)
    }

    /// Sends `Warmup` (the warm-up image in slot 0, its `/warm` run, the NIC configured as
    /// runs with networking have it) and waits for
    /// `WarmedUp`, passing over the warm-up process's own messages; `upper`: the scratch disk
    /// to leave mounted for a run. Returns what the agent said did not work.
    pub async fn warm_up(
        &mut self,
        qemu: &QemuChild,
        deadline: Instant,
        upper: Option<UpperDisk>,
    ) -> Result<Option<String>, VmError> {
        let rootfs = RootfsSpec { lower_serials: vec![slot_serial(0)], upper_size_bytes: 16 << 20, upper_disk: None };
        let warmup = Warmup { rootfs, argv: vec![WARM_BINARY.into()], network: Some(user_net_config()), upper };
        self.send(&HostMessage::Warmup(warmup)).await?;
        loop {
            match self.recv(qemu, deadline).await? {
                GuestMessage::WarmedUp { error } => return Ok(error),
                GuestMessage::Spawned { id, .. }
                | GuestMessage::Output { id, .. }
                | GuestMessage::Exited(boxwood_protocol::Exit { id, .. })
                | GuestMessage::SpawnFailed { id, .. }
                    if id == WARMUP_ID => {}
                other => return Err(boot_err(&format!("expected WarmedUp, got {}", other.kind()))),
            }
        }
    }

    /// Sends `ReleaseUpper` and waits for `UpperReleased`; `Err` if the agent could not.
    pub async fn release_upper(&mut self, qemu: &QemuChild, deadline: Instant) -> Result<(), VmError> {
        self.send(&HostMessage::ReleaseUpper).await?;
        match self.recv(qemu, deadline).await? {
            GuestMessage::UpperReleased { error: None } => Ok(()),
            GuestMessage::UpperReleased { error: Some(e) } => {
                Err(boot_err(&format!("releasing the scratch disk failed: {}", crate::guest::text(e))))
            }
            other => Err(boot_err(&format!("expected UpperReleased, got {}", other.kind()))),
        }
    }

    /// Sends `Setup` (the host's wall clock and 64 fresh random bytes, taken now) and waits
    /// for `SetupDone`.
    pub async fn setup(
        &mut self,
        spec: &VmSpec,
        rootfs: RootfsSpec,
        extra_ca: Option<&str>,
        qemu: &QemuChild,
        deadline: Instant,
    ) -> Result<SetupReport, VmError> {
        let mut entropy = vec![0u8; 64];
        rand::rng().fill(&mut entropy[..]);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let msg = HostMessage::Setup(Setup {
            wall_clock_unix_ns: u64::try_from(now.as_nanos()).unwrap_or(u64::MAX),
            entropy,
            hostname: spec.hostname.clone(),
            rootfs,
            network: spec.network.then(user_net_config),
            extra_ca_pem: extra_ca.map(str::to_owned),
        });
        self.send(&msg).await?;
        match self.recv(qemu, deadline).await? {
            GuestMessage::SetupDone(report) => Ok(crate::guest::bounded_report(report)),
            GuestMessage::SetupFailed { error } => Err(VmError::SetupFailed { error: crate::guest::text(error) }),
            other => Err(boot_err(&format!("expected SetupDone, got {}", other.kind()))),
        }
    }
}

impl Base {
    /// The argv; the guest kernel and initramfs are added to `inherited`.
    pub fn argv(
        &self,
        shape: Shape,
        inherited: &mut Inherited,
        devices: Devices<'_>,
    ) -> Result<Vec<std::ffi::OsString>, VmError> {
        let dup = |fd: &std::os::fd::OwnedFd| fd.try_clone().map_err(|e| VmError::io("dup a boot file", e));
        let kernel = inherited.add(dup(&self.boot.kernel)?);
        let initramfs = inherited.add(dup(&self.boot.initramfs)?);
        let Shape { accel, memory_mib, vcpus } = shape;
        qemu_argv(&QemuArgs { accel, memory_mib, vcpus, kernel, initramfs, cmdline: &self.cmdline, devices })
    }

    /// Spawns QEMU (stderr to `qemu.log`, the console through a pipe to `console.log`, see
    /// `console`; pid in `qemu.pid`) in `paths.dir`, with the `inherited` fds; when jailed (see
    /// [`crate::jail`]) as `lease`'s uid, in its own namespaces and root and in a cgroup sized
    /// for `shape`. It gets SIGKILL when the spawning thread dies (`PR_SET_PDEATHSIG`): call
    /// this from a runtime worker thread, never from a `spawn_blocking` thread, which may end
    /// while QEMU still runs. `background`: QEMU runs at [`BACKGROUND_NICE`] (template builds
    /// and pool refills take only spare CPU; [`foreground`] undoes it when a run gets the VM).
    pub fn spawn_qemu(
        &self,
        argv: Vec<std::ffi::OsString>,
        paths: &VmPaths,
        background: bool,
        inherited: Inherited,
        lease: Option<UidLease>,
        shape: Shape,
    ) -> Result<QemuChild, VmError> {
        let log = File::create(&paths.qemu_log).map_err(|e| VmError::io("create qemu.log", e))?;
        let (program, jailed) = match (&self.jail, lease) {
            (Some(jail), Some(lease)) => {
                let cgroup = jail.cgroups.create(lease.uid(), jail.limits(shape.memory_mib, shape.vcpus))?;
                let root = jail.root.plan(&paths.dir, shape.accel == Accelerator::Kvm)?;
                let confinement = Confinement {
                    uid: lease.uid(),
                    cgroup_procs: cgroup.procs().iter().map(std::os::fd::AsRawFd::as_raw_fd).collect(),
                    root,
                };
                (jail.root.qemu.clone(), Some((VmJail { cgroup, _lease: lease }, confinement)))
            }
            (None, None) => (self.config.qemu_binary.clone(), None),
            _ => return Err(VmError::Jail("a jailed QEMU needs a uid lease".into())),
        };
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&argv).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log).kill_on_drop(true);
        let (mut jailed, confinement) = jailed.unzip();
        let setup = ChildSetup::new(&paths.dir, confinement, &inherited, background, BACKGROUND_NICE)?;
        // SAFETY: runs in the forked child before exec; `apply` makes only async-signal-safe
        // syscalls on data prepared above and allocates nothing.
        unsafe {
            cmd.pre_exec(move || setup.apply());
        }
        let mut child =
            cmd.spawn().map_err(|e| VmError::io(format!("spawn {}", self.config.qemu_binary.display()), e))?;
        // The child has its copies (and has joined its cgroup); ours close now.
        drop(inherited);
        if let Some(j) = &mut jailed {
            j.cgroup.joined();
        }
        let console = child.stdout.take().map(|out| tokio::spawn(crate::console::pump(out, paths.console_log.clone())));
        let qemu = QemuChild::start(child, jailed, console)?;
        if let Err(e) = fs::write(&paths.pid_file, qemu.pid.to_string()) {
            qemu.kill();
            return Err(VmError::io("write qemu.pid", e));
        }
        Ok(qemu)
    }

    /// The scratch disk size for `spec`, if it gets one (`vm.upper_disk`, a writable layer on
    /// disk asked for, none given already).
    pub fn scratch_size(&self, spec: &VmSpec) -> Option<u64> {
        let rootfs = &spec.rootfs;
        (self.config.upper_disk && spec.upper_on_disk && rootfs.upper_size_bytes > 0 && rootfs.upper_disk.is_none())
            .then(|| scratch_bytes(rootfs.upper_size_bytes))
    }

    /// The scratch disk pooled clones have ready: that of a run of the usual size
    /// ([`VmConfig::usual_upper_bytes`]), if runs get one.
    pub fn pooled_scratch_size(&self) -> Option<u64> {
        self.config.usual_upper_bytes.filter(|&b| self.config.upper_disk && b > 0).map(scratch_bytes)
    }

    /// A uid for a new VM (`None` when not jailed).
    pub fn lease_uid(&self) -> Result<Option<UidLease>, VmError> {
        self.jail.as_ref().map(|j| j.uids.lease()).transpose()
    }

    /// Creates the scratch dir of a new VM (owned by `lease`'s uid, 0700, when jailed); the
    /// guard removes it unless disarmed.
    pub fn create_vm_dir(&self, name: &str, lease: Option<&UidLease>) -> Result<(VmPaths, DirGuard), VmError> {
        check_name(name)?;
        let paths = VmPaths::new(self.run_dir.join(name))?;
        match fs::create_dir(&paths.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(VmError::Invalid(format!("VM dir {} already exists", paths.dir.display())));
            }
            Err(e) => return Err(VmError::io(format!("create {}", paths.dir.display()), e)),
        }
        let guard = DirGuard { dir: paths.dir.clone(), armed: true };
        if let Some(lease) = lease {
            give_dir(&paths.dir, lease.uid())?;
        }
        Ok((paths, guard))
    }

    /// Boots a VM from scratch with exactly the spec's devices.
    pub async fn cold_boot(
        &self,
        spec: &VmSpec,
        accel: Accelerator,
        limit: Duration,
        setup: bool,
    ) -> Result<QemuVm, VmError> {
        // One deadline for all attempts: a boot retried for its timer takes no longer in all.
        let deadline = Instant::now() + limit;
        boot_with_retries(&spec.name, || {
            self.cold_boot_once(spec, accel, deadline.saturating_duration_since(Instant::now()), setup)
        })
        .await
    }

    async fn cold_boot_once(
        &self,
        spec: &VmSpec,
        accel: Accelerator,
        limit: Duration,
        setup: bool,
    ) -> Result<QemuVm, VmError> {
        check_hostname(&spec.hostname)?;
        let lease = self.lease_uid()?;
        let (paths, mut guard) = self.create_vm_dir(&spec.name, lease.as_ref())?;
        let mut inherited = Inherited::default();
        let disk_fds = spec.disks.iter().map(|d| inherited.open(&d.path)).collect::<Result<Vec<_>, _>>()?;
        let mut rootfs = spec.rootfs.clone();
        let (scratch, scratch_file) = match self.scratch_size(spec) {
            Some(bytes) => {
                let disk = self.scratch.create(&paths.dir, bytes).await?;
                let kept = disk.try_clone().map_err(|e| VmError::io("dup the scratch disk", e))?;
                rootfs.upper_size_bytes = bytes;
                rootfs.upper_disk = Some(SCRATCH_SERIAL.to_owned());
                (Some(inherited.add(disk)), Some(kept))
            }
            None => (None, None),
        };
        let devices = Devices::Cold { disks: &spec.disks, disk_fds: &disk_fds, network: spec.network, scratch };
        let shape = Shape {
            accel,
            memory_mib: spec.memory_mib.unwrap_or(self.config.memory_mib),
            vcpus: spec.vcpus.unwrap_or(self.config.vcpus),
        };
        let argv = self.argv(shape, &mut inherited, devices)?;
        // The guard removes the dir on failure *and* when this future is dropped mid-boot (a
        // run cancelled while its VM boots); QEMU itself dies with its kill-on-drop child.
        let started = Instant::now();
        let qemu = self.spawn_qemu(argv, &paths, false, inherited, lease, shape)?;
        let deadline = started + limit;
        let handshake = async {
            let mut chan = BootChannel::connect(&paths, &qemu, deadline).await?;
            let hello = chan.hello(&qemu, deadline).await?;
            let report = if setup {
                chan.setup(spec, rootfs, self.extra_ca.as_deref(), &qemu, deadline).await?
            } else {
                SetupReport::default()
            };
            Ok::<_, VmError>((chan, hello, report))
        };
        let (chan, mut hello, setup_report) = match handshake.await {
            Ok(h) => h,
            Err(err) => return Err(fail_boot(err, &paths, &qemu).await),
        };
        if hello.boot_id.is_empty() {
            hello.boot_id.clone_from(&setup_report.boot_id);
        }
        let boot_duration = started.elapsed();
        tracing::info!(vm = spec.name, accel = accel.as_str(), boot_ms = boot_duration.as_millis(), "VM booted");
        guard.armed = false;
        Ok(into_vm(spec, hello, setup_report, boot_duration, qemu, paths, chan, false, scratch_file))
    }
}

/// Boots a guest kernel may come up without its APIC timer in before it is refused for good.
const TIMER_ATTEMPTS: u32 = 3;

/// Boots that may die before the agent starts before the failure is the caller's.
const DIED_ATTEMPTS: u32 = 2;

/// Runs `boot` again while it fails in a way a fresh boot of the same VM gets past: the guest
/// came up without a running timer ([`VmError::NoTimer`]), or it died before its agent started
/// ([`VmError::DiedBeforeHello`]: under TCG on a busy host a cold boot's kernel now and then
/// oopses while loading its modules, before anything of a run's is in the guest). Each
/// attempt must clean up after itself (its QEMU killed, its dir removed).
pub(crate) async fn boot_with_retries<T, F, Fut>(vm: &str, mut boot: F) -> Result<T, VmError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, VmError>>,
{
    let (mut timer_attempts, mut died_attempts) = (1, 1);
    loop {
        match boot().await {
            Err(VmError::NoTimer { clock_events }) if timer_attempts < TIMER_ATTEMPTS => {
                tracing::warn!(
                    vm,
                    attempt = timer_attempts,
                    clock_events,
                    "the guest kernel gave up its APIC timer; booting it again"
                );
                metrics::counter!("boxwood_vm_boot_retries_total", "reason" => "no_timer").increment(1);
                timer_attempts += 1;
            }
            Err(VmError::DiedBeforeHello { detail }) if died_attempts < DIED_ATTEMPTS => {
                // The console says why; it goes to the server log, the run never sees it.
                tracing::warn!(
                    vm,
                    attempt = died_attempts,
                    "the VM died before its agent started; booting it again\n{detail}"
                );
                metrics::counter!("boxwood_vm_boot_retries_total", "reason" => "died_before_hello").increment(1);
                died_attempts += 1;
            }
            other => return other,
        }
    }
}

/// Gives every thread of QEMU `pid` this process's own nice value again (a background clone
/// handed to a run). Raising priority may need `CAP_SYS_NICE`: without it the VM keeps the
/// background priority, which costs only speed under load.
pub(crate) fn foreground(pid: u32) {
    // SAFETY: getpriority/setpriority only read and write scheduler attributes of the named
    // threads; errno is reset first because -1 is a valid getpriority result.
    let own = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, 0)
    };
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse::<libc::id_t>().ok()) else { continue };
        // SAFETY: see above.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, own) } != 0 {
            tracing::debug!(pid, tid, "cannot raise a VM's priority: {}", std::io::Error::last_os_error());
            return;
        }
    }
}

/// Kills a QEMU whose start failed and turns a boot error into one carrying the diagnosis.
pub(crate) async fn fail_boot(err: VmError, paths: &VmPaths, qemu: &QemuChild) -> VmError {
    qemu.kill();
    let status = qemu.wait(Duration::from_secs(5)).await;
    match err {
        VmError::Boot { reason, .. } => {
            let detail = describe(paths, status.as_deref(), &reason);
            VmError::Boot { reason, detail }
        }
        VmError::DiedBeforeHello { .. } => {
            VmError::DiedBeforeHello { detail: describe(paths, status.as_deref(), "QEMU exited during boot") }
        }
        other => other,
    }
}

/// Tar bytes an export may carry: the writable layer's size plus room for the headers of
/// every entry the layer's tmpfs can hold. The host counts the bytes itself.
fn export_limit(upper_size_bytes: u64) -> u64 {
    upper_size_bytes.saturating_add(256 << 20)
}

/// Hands a set-up VM's channel to the router task and wraps it as a [`QemuVm`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn into_vm(
    spec: &VmSpec,
    hello: Hello,
    setup_report: SetupReport,
    boot_duration: Duration,
    qemu: QemuChild,
    paths: VmPaths,
    chan: BootChannel,
    fast_teardown: bool,
    scratch: Option<std::fs::File>,
) -> QemuVm {
    let name = spec.name.clone();
    let export_limit = export_limit(spec.rootfs.upper_size_bytes);
    let shared = Arc::new(Shared::new(paths, chan.writer, qemu.exit.clone(), export_limit, qemu.pid));
    tokio::spawn(route(shared.clone(), chan.reader, chan.decoder));
    QemuVm {
        name,
        hello,
        setup_report,
        boot_duration,
        qemu,
        shared,
        fast_teardown,
        scratch,
        finished: AtomicBool::new(false),
    }
}

impl QemuRuntime {
    /// `run_dir`: per-VM scratch dirs go in `run_dir/<name>/`. With [`Accel::Auto`], a
    /// throwaway VM is booted with KVM once; on any failure TCG is used. With
    /// [`VmConfig::snapshot`] (the default) a template is built (or reused) in the background
    /// and a warm pool of its clones kept; until it is ready VMs cold-boot.
    pub async fn new(config: VmConfig, assets: GuestAssets, run_dir: PathBuf) -> Result<Self, VmError> {
        if config.memory_mib < 64 || config.vcpus == 0 {
            return Err(VmError::Invalid("memory_mib must be ≥ 64 and vcpus ≥ 1".into()));
        }
        fs::create_dir_all(&run_dir).map_err(|e| VmError::io(format!("create {}", run_dir.display()), e))?;
        let tsc_khz = match config.tsc_khz {
            Some(khz) => khz,
            None => {
                let info = fs::read_to_string("/proc/cpuinfo").map_err(|e| VmError::io("read /proc/cpuinfo", e))?;
                host_tsc_khz(&info)
                    .ok_or_else(|| VmError::Invalid("no \"cpu MHz\" in /proc/cpuinfo: set tsc_khz".into()))?
            }
        };
        let cmdline = kernel_cmdline(tsc_khz, &config.extra_kernel_args);
        let jail = if config.jail.enabled {
            let jail = Jail::new(&config.jail, &config.qemu_binary)?;
            // No nft (a host without the egress filter) is no stale table either.
            if let Err(e) =
                crate::egress::remove_own_stale(&crate::egress::NetworkConfig::default().nft_binary, &jail.uids.range())
            {
                tracing::debug!(error = %e, "could not look for a stale egress filter of this uid block");
            }
            Some(Arc::new(jail))
        } else {
            tracing::warn!(
                "vm.jail.enabled = false: QEMU runs with the server's own privileges, in its namespaces, \
                 without a cgroup: one QEMU bug is a host compromise"
            );
            None
        };
        let boot = {
            let assets = assets.clone();
            tokio::task::spawn_blocking(move || BootFiles::load(&assets).map(Arc::new))
                .await
                .map_err(|e| VmError::Invalid(format!("loading the boot files failed: {e}")))??
        };
        let scratch = Arc::new(Bases::new(run_dir.join(".scratch-bases"), config.mkfs_ext4.clone()));
        if config.upper_disk {
            scratch.check().map_err(|e| VmError::Invalid(format!("vm.upper_disk needs a working mkfs.ext4: {e}")))?;
        }
        let extra_ca = crate::ca::load(&config.extra_ca_certs)?.map(Arc::from);
        let mut base =
            Base { config, assets, run_dir, accel: Accelerator::Tcg, cmdline, jail, boot, scratch, extra_ca };
        base.accel = match base.config.accel {
            Accel::Tcg => Accelerator::Tcg,
            Accel::Kvm => Accelerator::Kvm,
            Accel::Auto => probe_kvm(&base).await,
        };
        tracing::info!(accel = base.accel.as_str(), kernel = %base.assets.kernel.display(), "VM runtime ready");
        let base = Arc::new(base);
        let fast = if base.config.snapshot {
            Some(FastStart::launch(base.clone()))
        } else {
            tracing::info!("fast start is off (vm.snapshot = false): every VM cold-boots");
            None
        };
        Ok(Self { base, fast })
    }

    /// Waits until the template is ready (or known to be unavailable) and the warm pool is
    /// full. Returns whether fast start is in use. For tests and benchmarks.
    pub async fn wait_ready(&self, limit: Duration) -> bool {
        match &self.fast {
            Some(fast) => fast.wait_ready(limit).await,
            None => false,
        }
    }

    /// Kills the pooled clones and stops refilling the pool (also done on drop).
    pub fn drain(&self) {
        if let Some(fast) = &self.fast {
            fast.drain();
        }
    }

    /// The uids this runtime's QEMUs run as (a block of 256 claimed host-wide for the
    /// runtime's life): every QEMU it starts runs with a uid and gid in this range, so every
    /// socket of its QEMUs is owned by one of them (`meta skuid`). `None` with
    /// `vm.jail.enabled = false`.
    pub fn jail_uid_range(&self) -> Option<std::ops::RangeInclusive<u32>> {
        self.base.jail.as_ref().map(|j| j.uids.range())
    }

    /// Holds the lock of the uid block that starts at `first_uid` (a block of this runtime's
    /// `uid_base`) while no server holds it, so what a crashed server left for that block can
    /// be removed without racing a server that claims it. `None` if it is held, or without
    /// the jail.
    pub fn hold_stale_uid_block(&self, first_uid: u32) -> Option<Box<dyn Send>> {
        self.base.jail.as_ref()?.uids.hold_sibling_if_free(first_uid)
    }

    /// The cgroup dirs of the VM whose QEMU runs as `uid` (one with cgroup v2; memory, pids
    /// and cpu with v1), whether or not they exist. Empty without the jail. For tests and
    /// diagnostics.
    pub fn jail_cgroup_dirs(&self, uid: u32) -> Vec<PathBuf> {
        self.base.jail.as_ref().map(|j| j.cgroups.leaves(uid)).unwrap_or_default()
    }

    /// QEMU pids of the idle pooled clones (for measurements such as PSS).
    pub fn pooled_pids(&self) -> Vec<u32> {
        self.fast.as_ref().map(FastStart::pooled_pids).unwrap_or_default()
    }
}

async fn probe_kvm(base: &Base) -> Accelerator {
    if let Err(e) = File::options().read(true).write(true).open("/dev/kvm") {
        tracing::info!("using TCG: /dev/kvm is not usable: {e}");
        return Accelerator::Tcg;
    }
    let spec = VmSpec {
        name: format!("kvm-probe-{}-{:08x}", std::process::id(), rand::random::<u32>()),
        disks: Vec::new(),
        rootfs: RootfsSpec { lower_serials: Vec::new(), upper_size_bytes: 0, upper_disk: None },
        hostname: "probe".into(),
        memory_mib: Some(128),
        vcpus: Some(1),
        network: false,
        upper_on_disk: true,
    };
    match base.cold_boot(&spec, Accelerator::Kvm, KVM_PROBE_DEADLINE, false).await {
        Ok(vm) => {
            let _ = vm.shutdown().await;
            tracing::info!("using KVM: the probe VM booted");
            Accelerator::Kvm
        }
        Err(e) => {
            tracing::info!("using TCG: the KVM probe VM failed: {e}");
            Accelerator::Tcg
        }
    }
}

/// Removes a VM dir when dropped armed.
pub(crate) struct DirGuard {
    pub dir: PathBuf,
    pub armed: bool,
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

pub(crate) fn boot_err(reason: &str) -> VmError {
    VmError::Boot { reason: reason.to_owned(), detail: String::new() }
}

/// VM names become directory names: `[A-Za-z0-9._-]`, 1–64 bytes, not starting with `.`.
pub(crate) fn check_name(name: &str) -> Result<(), VmError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok { Ok(()) } else { Err(VmError::Invalid(format!("bad VM name {name:?}"))) }
}

pub(crate) fn check_hostname(hostname: &str) -> Result<(), VmError> {
    if hostname.is_empty() || hostname.len() > 64 {
        return Err(VmError::Invalid(format!("bad hostname {hostname:?}")));
    }
    Ok(())
}

#[async_trait]
impl VmRuntime for QemuRuntime {
    async fn start(&self, spec: VmSpec) -> Result<Box<dyn Vm>, VmError> {
        if let Some(fast) = &self.fast
            && let Some(vm) = fast.start(&spec).await?
        {
            return Ok(Box::new(vm));
        }
        let limit = Duration::from_secs(self.base.config.boot_timeout_secs);
        metrics::counter!("boxwood_vm_starts_total", "path" => "cold").increment(1);
        Ok(Box::new(self.base.cold_boot(&spec, self.base.accel, limit, true).await?))
    }

    fn accel(&self) -> &str {
        self.base.accel.as_str()
    }

    fn fast_start(&self) -> crate::FastStartState {
        self.fast.as_ref().map_or(crate::FastStartState::Off, FastStart::state)
    }

    fn idle_qemu_pids(&self) -> Vec<u32> {
        self.pooled_pids()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("vm-1.a_b").is_ok());
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_guest_without_a_timer_is_booted_three_times_and_a_timeout_once() {
        let no_timer = || VmError::NoTimer { clock_events: "none".into() };
        let mut attempts = 0;
        let r: Result<(), _> = boot_with_retries("t", || {
            attempts += 1;
            std::future::ready(Err(no_timer()))
        })
        .await;
        assert!(matches!(r, Err(VmError::NoTimer { .. })));
        assert_eq!(attempts, TIMER_ATTEMPTS);
        let mut attempts = 0;
        let r = boot_with_retries("t", || {
            attempts += 1;
            std::future::ready(if attempts == 1 { Err(no_timer()) } else { Ok(attempts) })
        })
        .await;
        assert_eq!(r.unwrap(), 2, "a second boot that gets its timer is used");
        let mut attempts = 0;
        let r: Result<(), _> = boot_with_retries("t", || {
            attempts += 1;
            std::future::ready(Err(boot_err("timed out waiting for the agent")))
        })
        .await;
        assert!(matches!(r, Err(VmError::Boot { .. })));
        assert_eq!(attempts, 1, "a timeout is not worth another boot");
    }

    #[tokio::test]
    async fn a_vm_that_died_before_hello_is_booted_once_more() {
        let died = || VmError::DiedBeforeHello { detail: "Kernel panic".into() };
        let mut attempts = 0;
        let r: Result<(), _> = boot_with_retries("t", || {
            attempts += 1;
            std::future::ready(Err(died()))
        })
        .await;
        assert!(matches!(r, Err(VmError::DiedBeforeHello { .. })));
        assert_eq!(attempts, DIED_ATTEMPTS);
        let mut attempts = 0;
        let r = boot_with_retries("t", || {
            attempts += 1;
            std::future::ready(match attempts {
                1 => Err(died()),
                2 => Err(VmError::NoTimer { clock_events: "none".into() }),
                n => Ok(n),
            })
        })
        .await;
        assert_eq!(r.unwrap(), 3, "each reason has its own budget");
        let mut attempts = 0;
        let r: Result<(), _> = boot_with_retries("t", || {
            attempts += 1;
            std::future::ready(Err(VmError::SetupFailed { error: "mount".into() }))
        })
        .await;
        assert!(matches!(r, Err(VmError::SetupFailed { .. })));
        assert_eq!(attempts, 1, "a setup failure (the run's inputs) is not retried");
    }

    #[test]
    fn config_defaults_and_parsing() {
        let c = VmConfig::default();
        assert_eq!((c.memory_mib, c.vcpus, c.boot_timeout_secs, c.accel), (256, 1, 60, Accel::Auto));
        assert_eq!(c.qemu_binary, PathBuf::from("qemu-system-x86_64"));
        assert!(c.snapshot && c.pool_size.is_none(), "fast start is on by default, pool sized to the machine");
        let c: VmConfig = serde_json::from_str(r#"{"accel": "tcg", "memory_mib": 512, "tsc_khz": 2100000}"#).unwrap();
        assert_eq!((c.accel, c.memory_mib, c.vcpus, c.tsc_khz), (Accel::Tcg, 512, 1, Some(2_100_000)));
        let c: VmConfig = serde_json::from_str(r#"{"accel": "kvm"}"#).unwrap();
        assert_eq!(c.accel, Accel::Kvm);
        let c: VmConfig = serde_json::from_str(r#"{"snapshot": false, "pool_size": 0}"#).unwrap();
        assert_eq!((c.snapshot, c.pool_size), (false, Some(0)));
        assert!(serde_json::from_str::<VmConfig>(r#"{"memroy_mib": 1}"#).is_err(), "unknown fields are rejected");
        assert!(serde_json::from_str::<VmConfig>(r#"{"accel": "KVM"}"#).is_err());
    }
}
