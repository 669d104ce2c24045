//! [`QemuRuntime`]: accelerator choice and the boot sequence (QEMU spawn → agent Hello →
//! Setup → SetupDone).
#![allow(unsafe_code)]

use std::fs::{self, File};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use boxwood_protocol::{
    FrameDecoder, GuestMessage, Hello, HostMessage, NetworkConfig, PROTOCOL_VERSION, RootfsSpec, Setup, SetupReport,
    encode_frame,
};
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;

use crate::qemu::{Accelerator, QemuArgs, VmPaths, host_tsc_khz, kernel_cmdline, qemu_argv};
use crate::vm::{QemuChild, QemuVm, Shared, describe, route};
use crate::{Accel, GuestAssets, Vm, VmConfig, VmError, VmRuntime, VmSpec};

/// How long the KVM probe may take to reach the agent's Hello.
const KVM_PROBE_DEADLINE: Duration = Duration::from_secs(5);

/// Boots VMs with QEMU (microvm machine type).
#[derive(Debug)]
pub struct QemuRuntime {
    config: VmConfig,
    assets: GuestAssets,
    run_dir: PathBuf,
    accel: Accelerator,
    cmdline: String,
}

/// The guest side of QEMU's user-mode network (its built-in defaults).
fn user_net_config() -> NetworkConfig {
    NetworkConfig { address: "10.0.2.15/24".into(), gateway: "10.0.2.2".into(), nameserver: "10.0.2.3".into() }
}

/// A connected channel after a successful handshake.
struct Handshake {
    hello: Hello,
    setup_report: SetupReport,
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    decoder: FrameDecoder,
}

impl QemuRuntime {
    /// `run_dir`: per-VM scratch dirs go in `run_dir/<name>/`. With [`Accel::Auto`], a
    /// throwaway VM is booted with KVM once; on any failure TCG is used.
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
        let mut rt = Self { config, assets, run_dir, accel: Accelerator::Tcg, cmdline };
        rt.accel = match rt.config.accel {
            Accel::Tcg => Accelerator::Tcg,
            Accel::Kvm => Accelerator::Kvm,
            Accel::Auto => rt.probe_kvm().await,
        };
        tracing::info!(accel = rt.accel.as_str(), kernel = %rt.assets.kernel.display(), "VM runtime ready");
        Ok(rt)
    }

    async fn probe_kvm(&self) -> Accelerator {
        if let Err(e) = File::options().read(true).write(true).open("/dev/kvm") {
            tracing::info!("using TCG: /dev/kvm is not usable: {e}");
            return Accelerator::Tcg;
        }
        let spec = VmSpec {
            name: format!("kvm-probe-{}-{:08x}", std::process::id(), rand::random::<u32>()),
            disks: Vec::new(),
            rootfs: RootfsSpec { lower_serials: Vec::new(), upper_size_bytes: 0 },
            hostname: "probe".into(),
            memory_mib: Some(128),
            vcpus: Some(1),
            network: false,
        };
        match self.boot(&spec, Accelerator::Kvm, KVM_PROBE_DEADLINE, false).await {
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

    async fn boot(&self, spec: &VmSpec, accel: Accelerator, limit: Duration, setup: bool) -> Result<QemuVm, VmError> {
        check_name(&spec.name)?;
        if spec.hostname.is_empty() || spec.hostname.len() > 64 {
            return Err(VmError::Invalid(format!("bad hostname {:?}", spec.hostname)));
        }
        let paths = VmPaths::new(self.run_dir.join(&spec.name))?;
        let argv = qemu_argv(&QemuArgs {
            accel,
            memory_mib: spec.memory_mib.unwrap_or(self.config.memory_mib),
            vcpus: spec.vcpus.unwrap_or(self.config.vcpus),
            kernel: &self.assets.kernel,
            initramfs: &self.assets.initramfs,
            cmdline: &self.cmdline,
            paths: &paths,
            disks: &spec.disks,
            network: spec.network,
        })?;
        match fs::create_dir(&paths.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(VmError::Invalid(format!("VM dir {} already exists", paths.dir.display())));
            }
            Err(e) => return Err(VmError::io(format!("create {}", paths.dir.display()), e)),
        }
        // Removes the dir on failure *and* when this future is dropped mid-boot (a run
        // cancelled while its VM boots); QEMU itself dies with its kill-on-drop child.
        let mut guard = DirGuard { dir: paths.dir.clone(), armed: true };
        let result = self.boot_in(spec, &paths, argv, limit, setup).await;
        guard.armed = result.is_err();
        result
    }

    async fn boot_in(
        &self,
        spec: &VmSpec,
        paths: &VmPaths,
        argv: Vec<std::ffi::OsString>,
        limit: Duration,
        setup: bool,
    ) -> Result<QemuVm, VmError> {
        let log = File::create(&paths.qemu_log).map_err(|e| VmError::io("create qemu.log", e))?;
        let mut cmd = tokio::process::Command::new(&self.config.qemu_binary);
        cmd.args(&argv).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).kill_on_drop(true);
        let parent = nix::unistd::getpid();
        // SAFETY: runs in the forked child before exec; prctl and getppid are async-signal-safe
        // and nothing is allocated.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
                if nix::unistd::getppid() != parent {
                    return Err(std::io::Error::other("parent exited"));
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let child = cmd.spawn().map_err(|e| VmError::io(format!("spawn {}", self.config.qemu_binary.display()), e))?;
        let qemu = QemuChild::start(child)?;
        if let Err(e) = fs::write(&paths.pid_file, qemu.pid.to_string()) {
            qemu.kill();
            return Err(VmError::io("write qemu.pid", e));
        }
        let deadline = started + limit;
        let handshake = self.handshake(spec, paths, &qemu, deadline, setup).await;
        let Handshake { hello, setup_report, reader, writer, decoder } = match handshake {
            Ok(h) => h,
            Err(err) => {
                qemu.kill();
                let status = qemu.wait(Duration::from_secs(5)).await;
                return Err(match err {
                    VmError::Boot { reason, .. } => {
                        let detail = describe(paths, status.as_deref(), &reason);
                        VmError::Boot { reason, detail }
                    }
                    other => other,
                });
            }
        };
        let boot_duration = started.elapsed();
        tracing::info!(vm = spec.name, accel = accel_name(&argv), boot_ms = boot_duration.as_millis(), "VM booted");
        let shared = Arc::new(Shared::new(paths.clone(), writer, qemu.exit.clone()));
        tokio::spawn(route(shared.clone(), reader, decoder));
        Ok(QemuVm {
            name: spec.name.clone(),
            hello,
            setup_report,
            boot_duration,
            qemu,
            shared,
            finished: AtomicBool::new(false),
        })
    }

    async fn handshake(
        &self,
        spec: &VmSpec,
        paths: &VmPaths,
        qemu: &QemuChild,
        deadline: Instant,
        setup: bool,
    ) -> Result<Handshake, VmError> {
        let stream = loop {
            match UnixStream::connect(&paths.agent_sock).await {
                Ok(s) => break s,
                Err(_) if qemu.exited().is_some() => {
                    return Err(boot_err("QEMU exited before it listened"));
                }
                Err(_) if Instant::now() >= deadline => {
                    return Err(boot_err("timed out waiting for QEMU's socket"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let (mut reader, mut writer) = stream.into_split();
        let mut decoder = FrameDecoder::new();
        let hello = match recv(&mut reader, &mut decoder, qemu, deadline).await? {
            GuestMessage::Hello(h) => h,
            other => return Err(boot_err(&format!("expected Hello, got {other:?}"))),
        };
        if hello.version != PROTOCOL_VERSION {
            let why = format!("agent speaks protocol {}, host {PROTOCOL_VERSION}", hello.version);
            return Err(boot_err(&why));
        }
        let mut setup_report = SetupReport::default();
        if setup {
            let mut entropy = vec![0u8; 64];
            rand::rng().fill(&mut entropy[..]);
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            let msg = HostMessage::Setup(Setup {
                wall_clock_unix_ns: u64::try_from(now.as_nanos()).unwrap_or(u64::MAX),
                entropy,
                hostname: spec.hostname.clone(),
                rootfs: spec.rootfs.clone(),
                network: spec.network.then(user_net_config),
            });
            let frame = encode_frame(&msg)?;
            writer.write_all(&frame).await.map_err(|e| boot_err(&format!("sending Setup: {e}")))?;
            match recv(&mut reader, &mut decoder, qemu, deadline).await? {
                GuestMessage::SetupDone(report) => setup_report = report,
                GuestMessage::SetupFailed { error } => return Err(VmError::SetupFailed { error }),
                other => return Err(boot_err(&format!("expected SetupDone, got {other:?}"))),
            }
        }
        Ok(Handshake { hello, setup_report, reader, writer, decoder })
    }
}

/// Removes a VM dir when dropped armed.
struct DirGuard {
    dir: PathBuf,
    armed: bool,
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn boot_err(reason: &str) -> VmError {
    VmError::Boot { reason: reason.to_owned(), detail: String::new() }
}

fn accel_name(argv: &[std::ffi::OsString]) -> &'static str {
    if argv.iter().any(|a| a == "kvm") { "kvm" } else { "tcg" }
}

/// Reads the next guest message during boot, bounded by `deadline` and QEMU's life.
async fn recv(
    reader: &mut OwnedReadHalf,
    decoder: &mut FrameDecoder,
    qemu: &QemuChild,
    deadline: Instant,
) -> Result<GuestMessage, VmError> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut exit = qemu.exit.clone();
    loop {
        if let Some(msg) = decoder.next_message()? {
            return Ok(msg);
        }
        let read = tokio::select! {
            r = tokio::time::timeout_at(deadline, reader.read(&mut buf)) => Some(r),
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
            Some(Ok(Ok(n))) => decoder.push(&buf[..n]),
            Some(Ok(Err(e))) => return Err(boot_err(&format!("agent channel read failed: {e}"))),
        }
    }
}

/// VM names become directory names: `[A-Za-z0-9._-]`, 1–64 bytes, not starting with `.`.
fn check_name(name: &str) -> Result<(), VmError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok { Ok(()) } else { Err(VmError::Invalid(format!("bad VM name {name:?}"))) }
}

#[async_trait]
impl VmRuntime for QemuRuntime {
    async fn start(&self, spec: VmSpec) -> Result<Box<dyn Vm>, VmError> {
        let limit = Duration::from_secs(self.config.boot_timeout_secs);
        Ok(Box::new(self.boot(&spec, self.accel, limit, true).await?))
    }

    fn accel(&self) -> &str {
        self.accel.as_str()
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

    #[test]
    fn config_defaults_and_parsing() {
        let c = VmConfig::default();
        assert_eq!((c.memory_mib, c.vcpus, c.boot_timeout_secs, c.accel), (256, 1, 60, Accel::Auto));
        assert_eq!(c.qemu_binary, PathBuf::from("qemu-system-x86_64"));
        let c: VmConfig = serde_json::from_str(r#"{"accel": "tcg", "memory_mib": 512, "tsc_khz": 2100000}"#).unwrap();
        assert_eq!((c.accel, c.memory_mib, c.vcpus, c.tsc_khz), (Accel::Tcg, 512, 1, Some(2_100_000)));
        let c: VmConfig = serde_json::from_str(r#"{"accel": "kvm"}"#).unwrap();
        assert_eq!(c.accel, Accel::Kvm);
        assert!(serde_json::from_str::<VmConfig>(r#"{"memroy_mib": 1}"#).is_err(), "unknown fields are rejected");
        assert!(serde_json::from_str::<VmConfig>(r#"{"accel": "KVM"}"#).is_err());
    }
}
