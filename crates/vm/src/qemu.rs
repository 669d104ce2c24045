//! The QEMU command line and the guest kernel command line.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use crate::scratch::SCRATCH_SERIAL;
use crate::{DiskSpec, VmError};

/// Longest usable `sun_path` (108 bytes including the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// The fixed part of the kernel command line (runtime.md "BEST1"; `tsc_early_khz`, `lpj` added).
/// `panic=-1` + QEMU's `-no-reboot` turn a guest kernel panic into a QEMU exit. Kernel text
/// stays read-only (no `rodata=off`, which saved ~30 ms of a cold boot): a stray write into
/// it faults where it happens, instead of corrupting a function that crashes later or never.
const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 quiet cryptomgr.notests mitigations=off \
tsc=reliable 8250.nr_uarts=1 no_timer_check noreplace-smp audit=0 \
initcall_blacklist=tracer_init_tracefs,btf_vmlinux_init,cubictcp_register,init_kprobe_trace,\
trace_eval_init,load_system_certificate_list,crypto_kdf108_init \
init_on_alloc=0 ipv6.disable=1 nowatchdog nosoftlockup";

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

/// Everything needed to build the QEMU argv. QEMU runs in its VM dir (its sockets and logs
/// are named relative to it) and reaches every host file through an inherited fd.
#[derive(Debug, Clone)]
pub struct QemuArgs<'a> {
    pub accel: Accelerator,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Inherited fds of the guest kernel and initramfs.
    pub kernel: RawFd,
    pub initramfs: RawFd,
    pub cmdline: &'a str,
    pub devices: Devices<'a>,
}

/// File names QEMU uses inside its own dir (its working directory).
const AGENT_SOCK: &str = "agent.sock";
const QMP_SOCK: &str = "qmp.sock";

/// An inherited fd as a path QEMU can open.
pub(crate) fn fd_path(fd: RawFd) -> String {
    format!("/proc/self/fd/{fd}")
}

/// TCG's translation cache, in MiB. QEMU 7.2's default is 1 GiB, all of it resident once
/// filled: a size of our own keeps QEMU's memory bounded (its cgroup's limit counts it).
pub const TCG_TB_MIB: u32 = 256;

/// QEMU's `-sandbox`: its seccomp filter, with everything it does not need denied (no
/// obsolete syscalls, no set*id, no fork/exec, no scheduler or NUMA changes).
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The devices behind the agent port: a cold boot gets exactly the run's, a template and its
/// clones get the fixed [`crate::template`] layout (a clone must have the same device set as
/// the template it restores, and the template cannot know the run).
#[derive(Debug, Clone)]
pub enum Devices<'a> {
    Cold {
        disks: &'a [DiskSpec],
        /// One inherited read-only fd per disk, in order (each becomes an fdset).
        disk_fds: &'a [RawFd],
        /// A virtio-net NIC on QEMU's user-mode (slirp) network; `false`: no NIC at all.
        network: bool,
        /// The inherited read-write fd of the run's scratch disk (see [`crate::scratch`]).
        scratch: Option<RawFd>,
    },
    Fixed {
        /// Guest RAM as an inherited fd: the template's file, written through (`share=on`);
        /// for its clones a sealed memfd copy, mapped copy-on-write (`share=off`).
        ram: RawFd,
        shared_ram: bool,
        /// Inherited read-only fds of the empty qcow2 every slot starts out with, and of the
        /// small erofs image it is backed by until a run's layer replaces it (what the
        /// warm-up mounts).
        slot_image: RawFd,
        warm_image: RawFd,
        /// The inherited read-write fd of this VM's own scratch disk: a placeholder until a
        /// run is assigned, when it is filled and grown to the run's size.
        scratch: RawFd,
        /// Start paused, waiting for `migrate-incoming` (a clone).
        incoming: bool,
    },
}

/// Disk slots in the fixed layout, so the deepest layer stack a VM mounts. microvm has 24
/// virtio-mmio transports (with its second IO-APIC, on by default); the agent
/// port, the NIC and the scratch disk take three, and these sixteen leave five spare. Every
/// VM carries them (a slot no run fills is a qcow2 node over the warm-up image), and
/// compaction merges only stacks deeper than this: past ~15 diffs the modelled cost of a
/// long chain stops falling (`core::runner::compact`).
pub const SLOTS: usize = 16;

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

/// Node name of the scratch disk's format node (what `block_resize` grows at assignment).
pub const SCRATCH_NODE: &str = "upper";

/// The scratch disk from fdset `set`: raw, read-write, flushes ignored (its data never
/// outlives the VM), guest discards punched into the host file, and write errors (the host's
/// disk full) reported to the guest as I/O errors instead of pausing the VM.
fn push_scratch(push: &mut impl FnMut(&[&str]), set: usize) {
    let file =
        format!("driver=file,node-name={SCRATCH_NODE}f,filename=/dev/fdset/{set},discard=unmap,cache.no-flush=on");
    let fmt = format!("driver=raw,node-name={SCRATCH_NODE},file={SCRATCH_NODE}f,discard=unmap");
    let dev = format!("virtio-blk-device,drive={SCRATCH_NODE},serial={SCRATCH_SERIAL},werror=report,rerror=report");
    push(&["-blockdev", &file, "-blockdev", &fmt, "-device", &dev]);
}

/// The machine. No 8259 PIC: under QEMU 10's TCG, with the PIC present, about half of all
/// boots (kernels 6.1 and 6.12 alike) die where `start_kernel` first enables interrupts, on
/// an interrupt taken at vector 0 ("divide error" in the idle task; the PIC answering before
/// it is programmed). Legacy interrupts (the PIT's, the serial port's) reach the IOAPIC
/// without it. Measured on QEMU 10.0.2 and 10.0.13: 40 of 82 cold boots failed with the PIC,
/// 0 of 60 without; QEMU 7.2 boots in the same time either way (p50 1.32 s).
const MACHINE: &str = "microvm,pic=off";

/// QEMU's arguments (without the binary).
pub fn qemu_argv(a: &QemuArgs<'_>) -> Result<Vec<OsString>, VmError> {
    let mut v: Vec<OsString> = Vec::new();
    let mut push = |args: &[&str]| v.extend(args.iter().map(OsString::from));
    let (mem, smp) = (a.memory_mib.to_string(), a.vcpus.to_string());
    match &a.devices {
        Devices::Cold { .. } => push(&["-M", MACHINE]),
        Devices::Fixed { ram, shared_ram, .. } => {
            let share = if *shared_ram { "on" } else { "off" };
            let ram = format!("memory-backend-file,id=mem,size={mem}M,mem-path={},share={share}", fd_path(*ram));
            push(&["-M", &format!("{MACHINE},memory-backend=mem"), "-object", &ram]);
        }
    }
    match a.accel {
        Accelerator::Tcg => {
            push(&["-accel", &format!("tcg,thread=multi,tb-size={TCG_TB_MIB}"), "-cpu", "max,-erms,-fsrm"])
        }
        Accelerator::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
    }
    push(&["-m", &mem, "-smp", &smp]);
    push(&["-nodefaults", "-no-reboot", "-display", "none", "-sandbox", SANDBOX]);
    // A clone always has the NIC (the template's device set); its link is down unless the run
    // wants networking (see `template`).
    if matches!(a.devices, Devices::Fixed { .. } | Devices::Cold { network: true, .. }) {
        push(&["-netdev", "user,id=net0", "-device", "virtio-net-device,netdev=net0"]);
    } else {
        push(&["-nic", "none"]);
    }
    // The console goes to QEMU's stdout, a pipe the host bounds (see `console`).
    push(&["-serial", "stdio"]);
    let agent = format!("socket,id=agent,path={AGENT_SOCK},server=on,wait=off");
    push(&["-device", "virtio-serial-device", "-chardev", &agent]);
    let port = format!("virtserialport,chardev=agent,name={}", boxwood_protocol::PORT_NAME);
    push(&["-device", &port]);
    let qmp = format!("unix:{QMP_SOCK},server=on,wait=off");
    push(&["-qmp", &qmp]);
    match &a.devices {
        Devices::Cold { disks, disk_fds, scratch, .. } => {
            if disks.len() != disk_fds.len() {
                return Err(VmError::Invalid("one fd per disk".into()));
            }
            for (n, (disk, fd)) in disks.iter().zip(disk_fds.iter()).enumerate() {
                check_serial(&disk.serial)?;
                if disk.serial == SCRATCH_SERIAL {
                    return Err(VmError::Invalid(format!("disk serial {SCRATCH_SERIAL:?} is reserved")));
                }
                let set = n + 1;
                let add = format!("fd={fd},set={set}");
                let drive = format!("file=/dev/fdset/{set},if=none,id=d{n},format=raw,readonly=on");
                let dev = format!("virtio-blk-device,drive=d{n},serial={}", disk.serial);
                push(&["-add-fd", &add, "-drive", &drive, "-device", &dev]);
            }
            if let Some(fd) = scratch {
                let set = disks.len() + 1;
                push(&["-add-fd", &format!("fd={fd},set={set}")]);
                push_scratch(&mut push, set);
            }
        }
        Devices::Fixed { slot_image, warm_image, scratch, incoming, .. } => {
            // Sets 1 and 2; a run's layers get theirs over QMP (`add-fd`) when it is assigned.
            let (warm_set, slot_set) = (1, 2);
            let adds = [format!("fd={warm_image},set={warm_set}"), format!("fd={slot_image},set={slot_set}")];
            push(&["-add-fd", &adds[0], "-add-fd", &adds[1]]);
            let warm = format!("driver=file,node-name={WARM_NODE},filename=/dev/fdset/{warm_set},read-only=on");
            push(&["-blockdev", &warm]);
            for i in 0..SLOTS {
                let (node, file_node) = slot_nodes(i);
                let file = format!("driver=file,node-name={file_node},filename=/dev/fdset/{slot_set},read-only=on");
                let fmt = format!("driver=qcow2,node-name={node},file={file_node},backing={WARM_NODE},read-only=on");
                let dev = format!("virtio-blk-device,drive={node},serial={}", slot_serial(i));
                push(&["-blockdev", &file, "-blockdev", &fmt, "-device", &dev]);
            }
            push(&["-add-fd", &format!("fd={scratch},set=3")]);
            push_scratch(&mut push, 3);
            if *incoming {
                push(&["-incoming", "defer"]);
            }
        }
    }
    push(&["-append", a.cmdline, "-kernel", &fd_path(a.kernel), "-initrd", &fd_path(a.initramfs)]);
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

    fn line(a: &QemuArgs<'_>) -> String {
        qemu_argv(a).unwrap().into_iter().map(|s| s.into_string().unwrap()).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn argv_for_tcg_with_disks() {
        let disks = vec![
            DiskSpec { path: "/img/a,b.erofs".into(), serial: "layer0".into() },
            DiskSpec { path: "/img/c.erofs".into(), serial: "layer1".into() },
        ];
        let args = QemuArgs {
            accel: Accelerator::Tcg,
            memory_mib: 256,
            vcpus: 1,
            kernel: 3,
            initramfs: 4,
            cmdline: "console=ttyS0",
            devices: Devices::Cold { disks: &disks, disk_fds: &[7, 9], network: false, scratch: Some(11) },
        };
        let argv: Vec<String> = qemu_argv(&args).unwrap().into_iter().map(|s| s.into_string().unwrap()).collect();
        let l = argv.join(" ");
        for want in [
            "-M microvm,pic=off -accel tcg,thread=multi,tb-size=256 -cpu max,-erms,-fsrm -m 256 -smp 1",
            "-nodefaults -no-reboot -display none \
             -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-serial stdio",
            "-chardev socket,id=agent,path=agent.sock,server=on,wait=off",
            "-device virtserialport,chardev=agent,name=boxwood.agent",
            "-qmp unix:qmp.sock,server=on,wait=off",
            "-add-fd fd=7,set=1 -drive file=/dev/fdset/1,if=none,id=d0,format=raw,readonly=on \
             -device virtio-blk-device,drive=d0,serial=layer0",
            "-add-fd fd=9,set=2 -drive file=/dev/fdset/2,if=none,id=d1,format=raw,readonly=on \
             -device virtio-blk-device,drive=d1,serial=layer1",
            "-add-fd fd=11,set=3 \
             -blockdev driver=file,node-name=upperf,filename=/dev/fdset/3,discard=unmap,cache.no-flush=on \
             -blockdev driver=raw,node-name=upper,file=upperf,discard=unmap \
             -device virtio-blk-device,drive=upper,serial=bwupper,werror=report,rerror=report",
            "-kernel /proc/self/fd/3 -initrd /proc/self/fd/4",
            "-nic none",
        ] {
            let want = want.split_whitespace().collect::<Vec<_>>().join(" ");
            assert!(l.contains(&want), "missing {want:?} in {l}");
        }
        assert!(!l.contains("/img/"), "QEMU never sees a host path: {l}");
        let i = argv.iter().position(|a| a == "-append").unwrap();
        assert_eq!(argv[i + 1], "console=ttyS0", "the cmdline stays one argument");

        let kvm = QemuArgs { accel: Accelerator::Kvm, ..args.clone() };
        assert!(line(&kvm).contains("-accel kvm -cpu host"));
        let net = QemuArgs {
            devices: Devices::Cold { disks: &disks, disk_fds: &[7, 9], network: true, scratch: None },
            ..args.clone()
        };
        let l = line(&net);
        assert!(l.contains("-netdev user,id=net0 -device virtio-net-device,netdev=net0"), "{l}");
        assert!(!l.contains("-nic none"), "{l}");
        assert!(!qemu_argv(&args).unwrap().iter().any(|a| a == "-netdev"));
        assert!(!l.contains("bwupper"), "no scratch disk unless given one: {l}");
        let reserved = [DiskSpec { path: "/x".into(), serial: "bwupper".into() }];
        let reserved = Devices::Cold { disks: &reserved, disk_fds: &[7], network: false, scratch: None };
        assert!(qemu_argv(&QemuArgs { devices: reserved, ..args.clone() }).is_err(), "a layer cannot pose as it");
        let bad = [DiskSpec { path: "/x".into(), serial: "has space".into() }];
        let bad_args = QemuArgs {
            devices: Devices::Cold { disks: &bad, disk_fds: &[7], network: false, scratch: None },
            ..args.clone()
        };
        assert!(qemu_argv(&bad_args).is_err());
        let missing = Devices::Cold { disks: &disks, disk_fds: &[7], network: false, scratch: None };
        let missing = QemuArgs { devices: missing, ..args };
        assert!(qemu_argv(&missing).is_err(), "every disk needs its fd");
    }

    #[test]
    fn argv_for_a_clone() {
        let fixed = |shared_ram, incoming| Devices::Fixed {
            ram: 5,
            shared_ram,
            slot_image: 6,
            warm_image: 8,
            scratch: 10,
            incoming,
        };
        let args = QemuArgs {
            accel: Accelerator::Tcg,
            memory_mib: 256,
            vcpus: 1,
            kernel: 3,
            initramfs: 4,
            cmdline: "console=ttyS0",
            devices: fixed(false, true),
        };
        let l = line(&args);
        for want in [
            "-M microvm,pic=off,memory-backend=mem -object memory-backend-file,id=mem,size=256M,mem-path=/proc/self/fd/5,share=off",
            "-netdev user,id=net0 -device virtio-net-device,netdev=net0",
            "-add-fd fd=8,set=1 -add-fd fd=6,set=2 \
             -blockdev driver=file,node-name=warm,filename=/dev/fdset/1,read-only=on \
             -blockdev driver=file,node-name=slot0f,filename=/dev/fdset/2,read-only=on \
             -blockdev driver=qcow2,node-name=slot0,file=slot0f,backing=warm,read-only=on \
             -device virtio-blk-device,drive=slot0,serial=bwslot0",
            "-device virtio-blk-device,drive=slot15,serial=bwslot15 -add-fd fd=10,set=3 \
             -blockdev driver=file,node-name=upperf,filename=/dev/fdset/3,discard=unmap,cache.no-flush=on \
             -blockdev driver=raw,node-name=upper,file=upperf,discard=unmap \
             -device virtio-blk-device,drive=upper,serial=bwupper,werror=report,rerror=report",
            "-incoming defer",
        ] {
            let want = want.split_whitespace().collect::<Vec<_>>().join(" ");
            assert!(l.contains(&want), "missing {want:?} in {l}");
        }
        assert!(!l.contains("slot16"));
        // Template and clone differ only in how RAM is mapped and whether QEMU waits.
        let template = QemuArgs { devices: fixed(true, false), ..args.clone() };
        assert_eq!(line(&template).replace("share=on", "share=off"), l.replace(" -incoming defer", ""));
    }
}
