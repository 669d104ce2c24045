//! The QEMU command line and the guest kernel command line.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::{DiskSpec, VmError};

/// Longest usable `sun_path` (108 bytes including the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// The fixed part of the kernel command line (runtime.md "BEST1"; `tsc_early_khz`, `lpj` added).
/// `panic=-1` + QEMU's `-no-reboot` turn a guest kernel panic into a QEMU exit.
const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 quiet cryptomgr.notests mitigations=off \
tsc=reliable 8250.nr_uarts=1 no_timer_check noreplace-smp audit=0 \
initcall_blacklist=tracer_init_tracefs,btf_vmlinux_init,cubictcp_register,init_kprobe_trace,\
trace_eval_init,load_system_certificate_list,crypto_kdf108_init \
rodata=off init_on_alloc=0 ipv6.disable=1 nowatchdog nosoftlockup";

/// Guest kernel command line. `tsc_early_khz` is mandatory on QEMU 7.2 microvm (the kernel
/// hangs calibrating the TSC without it); `lpj` is derived from it for HZ=250.
pub fn kernel_cmdline(tsc_khz: u32, extra: &[String]) -> String {
    let lpj = u64::from(tsc_khz) * 1000 / 250;
    let mut line = format!("{BASE_CMDLINE} tsc_early_khz={tsc_khz} lpj={lpj}");
    for arg in extra {
        line.push(' ');
        line.push_str(arg);
    }
    line
}

/// Host TSC frequency in kHz, from the first "cpu MHz" line of `/proc/cpuinfo`.
pub fn host_tsc_khz(cpuinfo: &str) -> Option<u32> {
    let line = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    let khz = (mhz * 1000.0).round();
    (khz >= 1.0 && khz < f64::from(u32::MAX)).then_some(khz as u32)
}

/// Accelerator chosen for one QEMU process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accelerator {
    Kvm,
    Tcg,
}

impl Accelerator {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

/// Files of one VM's scratch dir.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
    pub agent_sock: PathBuf,
    pub qmp_sock: PathBuf,
    pub console_log: PathBuf,
    pub qemu_log: PathBuf,
    pub pid_file: PathBuf,
}

impl VmPaths {
    /// Paths for `dir`; fails if a socket path would be too long or `dir` is not usable in
    /// QEMU option syntax.
    pub fn new(dir: PathBuf) -> Result<Self, VmError> {
        let paths = Self {
            agent_sock: dir.join("agent.sock"),
            qmp_sock: dir.join("qmp.sock"),
            console_log: dir.join("console.log"),
            qemu_log: dir.join("qemu.log"),
            pid_file: dir.join("qemu.pid"),
            dir,
        };
        for sock in [&paths.agent_sock, &paths.qmp_sock] {
            let len = sock.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                return Err(VmError::SocketPathTooLong { path: sock.clone(), len });
            }
        }
        let dir_str = path_str(&paths.dir)?;
        if dir_str.contains(',') {
            return Err(VmError::Invalid(format!("run dir {dir_str:?} contains a comma")));
        }
        Ok(paths)
    }
}

fn path_str(p: &Path) -> Result<&str, VmError> {
    p.to_str().ok_or_else(|| VmError::Invalid(format!("path {p:?} is not UTF-8")))
}

/// Escapes a value for QEMU's `key=value,…` option syntax.
fn opt_escape(s: &str) -> String {
    s.replace(',', ",,")
}

/// Everything needed to build the QEMU argv.
#[derive(Debug, Clone)]
pub struct QemuArgs<'a> {
    pub accel: Accelerator,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub kernel: &'a Path,
    pub initramfs: &'a Path,
    pub cmdline: &'a str,
    pub paths: &'a VmPaths,
    pub devices: Devices<'a>,
}

/// The devices behind the agent port: a cold boot gets exactly the run's, a template and its
/// clones get the fixed [`crate::template`] layout (a clone must have the same device set as
/// the template it restores, and the template cannot know the run).
#[derive(Debug, Clone)]
pub enum Devices<'a> {
    Cold {
        disks: &'a [DiskSpec],
        /// A virtio-net NIC on QEMU's user-mode (slirp) network; `false`: no NIC at all.
        network: bool,
    },
    Fixed {
        /// Guest RAM as a file: written through (`share=on`) by the template, mapped
        /// copy-on-write (`share=off`) by its clones.
        ram_file: &'a Path,
        shared_ram: bool,
        /// The empty qcow2 every slot starts out with, and the small erofs image it is
        /// backed by until a run's layer replaces it (what the warm-up mounts).
        slot_image: &'a Path,
        warm_image: &'a Path,
        /// Start paused, waiting for `migrate-incoming` (a clone).
        incoming: bool,
    },
}

/// Disk slots in the fixed layout: microvm's eight virtio-mmio transports minus the agent
/// port and the NIC.
pub const SLOTS: usize = 6;

/// Node name of the warm-up erofs image behind every slot.
pub const WARM_NODE: &str = "warm";

/// Virtio serial of fixed-layout slot `i` (what the guest sees in `/sys/block/vdX/serial`).
pub fn slot_serial(i: usize) -> String {
    format!("bwslot{i}")
}

/// Node names of slot `i`: the qcow2 format node the device uses and its `file` child.
pub fn slot_nodes(i: usize) -> (String, String) {
    (format!("slot{i}"), format!("slot{i}f"))
}

/// Checks a virtio-blk serial: 1–20 bytes of `[A-Za-z0-9._-]`.
pub fn check_serial(serial: &str) -> Result<(), VmError> {
    let ok = !serial.is_empty()
        && serial.len() <= 20
        && serial.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok { Ok(()) } else { Err(VmError::Invalid(format!("bad disk serial {serial:?}"))) }
}

/// QEMU's arguments (without the binary).
pub fn qemu_argv(a: &QemuArgs<'_>) -> Result<Vec<OsString>, VmError> {
    let mut v: Vec<OsString> = Vec::new();
    let mut push = |args: &[&str]| v.extend(args.iter().map(OsString::from));
    let (mem, smp) = (a.memory_mib.to_string(), a.vcpus.to_string());
    match &a.devices {
        Devices::Cold { .. } => push(&["-M", "microvm"]),
        Devices::Fixed { ram_file, shared_ram, .. } => {
            let share = if *shared_ram { "on" } else { "off" };
            let ram = format!(
                "memory-backend-file,id=mem,size={mem}M,mem-path={},share={share}",
                opt_escape(path_str(ram_file)?)
            );
            push(&["-M", "microvm,memory-backend=mem", "-object", &ram]);
        }
    }
    match a.accel {
        Accelerator::Tcg => push(&["-accel", "tcg,thread=multi", "-cpu", "max,-erms,-fsrm"]),
        Accelerator::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
    }
    push(&["-m", &mem, "-smp", &smp]);
    push(&["-nodefaults", "-no-reboot", "-display", "none"]);
    // A clone always has the NIC (the template's device set); its link is down unless the run
    // wants networking (see `template`).
    if matches!(a.devices, Devices::Fixed { .. } | Devices::Cold { network: true, .. }) {
        push(&["-netdev", "user,id=net0", "-device", "virtio-net-device,netdev=net0"]);
    } else {
        push(&["-nic", "none"]);
    }
    let p = a.paths;
    // The console goes to QEMU's stdout, a pipe the host bounds (see `console`).
    push(&["-serial", "stdio"]);
    let agent = format!("socket,id=agent,path={},server=on,wait=off", path_str(&p.agent_sock)?);
    push(&["-device", "virtio-serial-device", "-chardev", &agent]);
    let port = format!("virtserialport,chardev=agent,name={}", boxwood_protocol::PORT_NAME);
    push(&["-device", &port]);
    let qmp = format!("unix:{},server=on,wait=off", path_str(&p.qmp_sock)?);
    push(&["-qmp", &qmp]);
    match &a.devices {
        Devices::Cold { disks, .. } => {
            for (n, disk) in disks.iter().enumerate() {
                check_serial(&disk.serial)?;
                let file = opt_escape(path_str(&disk.path)?);
                let drive = format!("file={file},if=none,id=d{n},format=raw,readonly=on");
                let dev = format!("virtio-blk-device,drive=d{n},serial={}", disk.serial);
                push(&["-drive", &drive, "-device", &dev]);
            }
        }
        Devices::Fixed { slot_image, warm_image, incoming, .. } => {
            let image = opt_escape(path_str(slot_image)?);
            let warm = format!(
                "driver=file,node-name={WARM_NODE},filename={},read-only=on",
                opt_escape(path_str(warm_image)?)
            );
            push(&["-blockdev", &warm]);
            for i in 0..SLOTS {
                let (node, file_node) = slot_nodes(i);
                let file = format!("driver=file,node-name={file_node},filename={image},read-only=on");
                let fmt = format!("driver=qcow2,node-name={node},file={file_node},backing={WARM_NODE},read-only=on");
                let dev = format!("virtio-blk-device,drive={node},serial={}", slot_serial(i));
                push(&["-blockdev", &file, "-blockdev", &fmt, "-device", &dev]);
            }
            if *incoming {
                push(&["-incoming", "defer"]);
            }
        }
    }
    push(&["-append", a.cmdline]);
    v.push("-kernel".into());
    v.push(a.kernel.into());
    v.push("-initrd".into());
    v.push(a.initramfs.into());
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_has_tsc_lpj_panic_and_extras() {
        let c = kernel_cmdline(2_100_000, &["foo=1".into(), "bar".into()]);
        assert!(c.contains(" tsc_early_khz=2100000 lpj=8400000 foo=1 bar"), "{c}");
        assert!(c.starts_with("console=ttyS0 panic=-1 quiet "));
        assert!(!c.contains("  "));
    }

    #[test]
    fn tsc_from_cpuinfo() {
        let info = "processor\t: 0\nmodel name\t: Xeon\ncpu MHz\t\t: 2100.000\ncache size\t: 1\ncpu MHz\t\t: 999.0\n";
        assert_eq!(host_tsc_khz(info), Some(2_100_000));
        assert_eq!(host_tsc_khz("cpu MHz : 2999.998"), Some(2_999_998));
        assert_eq!(host_tsc_khz("nothing"), None);
    }

    #[test]
    fn socket_path_limit() {
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(100)));
        assert!(matches!(VmPaths::new(long), Err(VmError::SocketPathTooLong { len, .. }) if len > 107));
        assert!(VmPaths::new(PathBuf::from("/run/boxwood/vm1")).is_ok());
        assert!(matches!(VmPaths::new(PathBuf::from("/tmp/a,b")), Err(VmError::Invalid(_))));
    }

    #[test]
    fn argv_for_tcg_with_disks() {
        let paths = VmPaths::new(PathBuf::from("/run/bw/vm1")).unwrap();
        let disks = vec![
            DiskSpec { path: "/img/a,b.erofs".into(), serial: "layer0".into() },
            DiskSpec { path: "/img/c.erofs".into(), serial: "layer1".into() },
        ];
        let args = QemuArgs {
            accel: Accelerator::Tcg,
            memory_mib: 256,
            vcpus: 1,
            kernel: Path::new("/k/vmlinux"),
            initramfs: Path::new("/k/init.cpio"),
            cmdline: "console=ttyS0",
            paths: &paths,
            devices: Devices::Cold { disks: &disks, network: false },
        };
        let argv: Vec<String> = qemu_argv(&args).unwrap().into_iter().map(|s| s.into_string().unwrap()).collect();
        let line = argv.join(" ");
        for want in [
            "-M microvm -accel tcg,thread=multi -cpu max,-erms,-fsrm -m 256 -smp 1",
            "-nodefaults -no-reboot",
            "-serial stdio",
            "-chardev socket,id=agent,path=/run/bw/vm1/agent.sock,server=on,wait=off",
            "-device virtserialport,chardev=agent,name=boxwood.agent",
            "-qmp unix:/run/bw/vm1/qmp.sock,server=on,wait=off",
            "-drive file=/img/a,,b.erofs,if=none,id=d0,format=raw,readonly=on -device virtio-blk-device,drive=d0,serial=layer0",
            "-drive file=/img/c.erofs,if=none,id=d1,format=raw,readonly=on -device virtio-blk-device,drive=d1,serial=layer1",
            "-kernel /k/vmlinux -initrd /k/init.cpio",
            "-nic none",
        ] {
            assert!(line.contains(want), "missing {want:?} in {line}");
        }
        let i = argv.iter().position(|a| a == "-append").unwrap();
        assert_eq!(argv[i + 1], "console=ttyS0", "the cmdline stays one argument");

        let kvm = QemuArgs { accel: Accelerator::Kvm, ..args.clone() };
        let line = qemu_argv(&kvm).unwrap().into_iter().map(|s| s.into_string().unwrap()).collect::<Vec<_>>().join(" ");
        assert!(line.contains("-accel kvm -cpu host"));
        let net = QemuArgs { devices: Devices::Cold { disks: &disks, network: true }, ..args.clone() };
        let line = qemu_argv(&net).unwrap().into_iter().map(|s| s.into_string().unwrap()).collect::<Vec<_>>().join(" ");
        assert!(line.contains("-netdev user,id=net0 -device virtio-net-device,netdev=net0"), "{line}");
        assert!(!line.contains("-nic none"), "{line}");
        assert!(!qemu_argv(&args).unwrap().iter().any(|a| a == "-netdev"));
        let bad = [DiskSpec { path: "/x".into(), serial: "has space".into() }];
        assert!(qemu_argv(&QemuArgs { devices: Devices::Cold { disks: &bad, network: false }, ..args }).is_err());
    }

    #[test]
    fn argv_for_a_clone() {
        let paths = VmPaths::new(PathBuf::from("/run/bw/c1")).unwrap();
        let args = QemuArgs {
            accel: Accelerator::Tcg,
            memory_mib: 256,
            vcpus: 1,
            kernel: Path::new("/k/vmlinux"),
            initramfs: Path::new("/k/init.cpio"),
            cmdline: "console=ttyS0",
            paths: &paths,
            devices: Devices::Fixed {
                ram_file: Path::new("/t/k/ram"),
                shared_ram: false,
                slot_image: Path::new("/t/k/slot.qcow2"),
                warm_image: Path::new("/t/k/warm.erofs"),
                incoming: true,
            },
        };
        let line =
            qemu_argv(&args).unwrap().into_iter().map(|s| s.into_string().unwrap()).collect::<Vec<_>>().join(" ");
        for want in [
            "-M microvm,memory-backend=mem -object memory-backend-file,id=mem,size=256M,mem-path=/t/k/ram,share=off",
            "-netdev user,id=net0 -device virtio-net-device,netdev=net0",
            "-blockdev driver=file,node-name=warm,filename=/t/k/warm.erofs,read-only=on \
             -blockdev driver=file,node-name=slot0f,filename=/t/k/slot.qcow2,read-only=on \
             -blockdev driver=qcow2,node-name=slot0,file=slot0f,backing=warm,read-only=on \
             -device virtio-blk-device,drive=slot0,serial=bwslot0",
            "-device virtio-blk-device,drive=slot5,serial=bwslot5",
            "-incoming defer",
        ] {
            let want = want.split_whitespace().collect::<Vec<_>>().join(" ");
            assert!(line.contains(&want), "missing {want:?} in {line}");
        }
        assert!(!line.contains("slot6"));
        // Template and clone differ only in how RAM is mapped and whether QEMU waits.
        let template = QemuArgs {
            devices: Devices::Fixed {
                ram_file: Path::new("/t/k/ram"),
                shared_ram: true,
                slot_image: Path::new("/t/k/slot.qcow2"),
                warm_image: Path::new("/t/k/warm.erofs"),
                incoming: false,
            },
            ..args.clone()
        };
        let t =
            qemu_argv(&template).unwrap().into_iter().map(|s| s.into_string().unwrap()).collect::<Vec<_>>().join(" ");
        assert_eq!(t.replace("share=on", "share=off"), line.replace(" -incoming defer", ""));
    }
}
