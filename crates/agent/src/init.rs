//! Guest bring-up before the host is reachable: basic mounts, kernel modules, locating the
//! agent's virtio-serial port, and the `Hello` facts.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use boxwood_protocol::{Hello, PROTOCOL_VERSION};
use nix::errno::Errno;
use nix::kmod::{ModuleInitFlags, finit_module};
use nix::mount::{MsFlags, mount};

/// Directory holding the `.ko` files and `boxwood.order`.
const MODULE_DIR: &str = "/lib/modules";

/// Mounts `/dev`, `/proc` and `/sys` in the initramfs.
pub fn early_mounts() -> io::Result<()> {
    for (fstype, target) in [("devtmpfs", "/dev"), ("proc", "/proc"), ("sysfs", "/sys")] {
        fs::create_dir_all(target)?;
        match mount(Some(fstype), target, Some(fstype), MsFlags::MS_NOSUID, None::<&str>) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(err) => {
                return Err(io::Error::other(format!("mount {fstype} on {target}: {err}")));
            }
        }
    }
    Ok(())
}

/// Loads the modules named in `/lib/modules/boxwood.order`, in order. Failures are logged and
/// skipped: a missing driver shows up later as a missing device, with a clearer error.
pub fn load_modules() {
    let order = Path::new(MODULE_DIR).join("boxwood.order");
    let list = match fs::read_to_string(&order) {
        Ok(list) => list,
        Err(err) => {
            crate::log(&format!("no module list {}: {err}", order.display()));
            return;
        }
    };
    for name in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = Path::new(MODULE_DIR).join(name);
        let result = File::open(&path).map_err(|e| e.to_string()).and_then(|f| {
            match finit_module(&f, c"", ModuleInitFlags::empty()) {
                Ok(()) | Err(Errno::EEXIST) => Ok(()),
                Err(err) => Err(err.to_string()),
            }
        });
        if let Err(err) = result {
            crate::log(&format!("module {name}: {err}"));
        }
    }
}

/// Virtio's device id of a network card (`/sys/bus/virtio/devices/*/device`).
const VIRTIO_NET_ID: &str = "0x0001";

/// With a virtio NIC present, waits up to `limit` for its interface. A NIC whose driver did
/// not make one (its module failed to load or probe) is a boot that failed: the agent gives
/// up before `Hello`, so the host boots the VM again instead of handing a run a VM whose
/// network cannot work.
pub fn check_nic(limit: Duration) -> io::Result<()> {
    let has_device = fs::read_dir("/sys/bus/virtio/devices").is_ok_and(|d| {
        d.flatten().any(|e| fs::read_to_string(e.path().join("device")).is_ok_and(|id| id.trim() == VIRTIO_NET_ID))
    });
    if !has_device {
        return Ok(());
    }
    crate::net::wait_for_nic(limit).map(drop).map_err(|_| {
        io::Error::other(format!("the virtio NIC has no interface after {limit:?}: virtio_net did not load or probe"))
    })
}

/// Waits for the virtio-serial port named `name` and opens it read/write.
pub fn open_port(name: &str, timeout: Duration) -> io::Result<File> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        if let Some(dev) = find_port(name) {
            match OpenOptions::new().read(true).write(true).open(&dev) {
                Ok(file) => return Ok(file),
                Err(err) => last_err = Some(err),
            }
        }
        if Instant::now() >= deadline {
            let why = last_err.map(|e| format!(": {e}")).unwrap_or_default();
            return Err(io::Error::other(format!("virtio port {name:?} not found{why}")));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn find_port(name: &str) -> Option<PathBuf> {
    for entry in fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let port_name = fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim_end() == name {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    None
}

/// The agent's first message.
pub fn hello() -> Hello {
    let (kernel_release, machine) = match nix::sys::utsname::uname() {
        Ok(u) => (u.release().to_string_lossy().into_owned(), u.machine().to_string_lossy().into_owned()),
        Err(_) => (String::new(), String::new()),
    };
    // No boot id here: the kernel makes it on first read, and a template snapshotted after
    // Hello would hand the same id to every clone. `Setup` reads it after re-seeding the RNG.
    Hello { version: PROTOCOL_VERSION, kernel_release, machine, boot_id: String::new(), clock_events: tick_device() }
}

/// The boot CPU's tick device as sysfs names it: `none` where the file is empty (the kernel
/// has no device ticking that CPU), empty if the file cannot be read.
fn tick_device() -> String {
    match std::fs::read_to_string("/sys/devices/system/clockevents/clockevent0/current_device") {
        Ok(name) if name.trim().is_empty() => "none".to_owned(),
        Ok(name) => name.trim().to_owned(),
        Err(_) => String::new(),
    }
}
