//! Boxwood guest agent: runs as PID 1 inside every sandbox VM, prepares the guest and serves
//! the host's requests over the `boxwood.agent` virtio-serial port.
//!
//! Layout: [`init`] brings the guest up (mounts, kernel modules, channel discovery),
//! [`channel`] frames messages over the port, [`setup`] builds the sandbox root filesystem and
//! [`net`] the network, [`spawn`] starts and supervises processes (inside the [`jobs`]
//! cgroup), [`reaper`] collects every exit status, [`files`] writes injected files (resolving
//! paths via [`inroot`]), [`export`] streams the run's changes as a [`tar`], and [`server`]
//! dispatches host messages.

mod ca;
mod channel;
mod export;
mod fiemap;
mod files;
mod init;
mod inroot;
mod jobs;
mod net;
mod reaper;
mod server;
mod setup;
mod spawn;
mod splice;
mod stuck;
mod tar;
mod testdir;
mod warmup;

use std::time::Duration;

fn main() {
    if std::process::id() != 1 {
        eprintln!("boxwood-agent: refusing to run: must be PID 1 inside a Boxwood VM");
        std::process::exit(2);
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    match runtime {
        Ok(rt) => {
            if let Err(err) = rt.block_on(server::run()) {
                log(&format!("fatal: {err}"));
            }
        }
        Err(err) => log(&format!("fatal: cannot create runtime: {err}")),
    }
    power_off();
}

/// Writes one line to the console (the kernel's `/dev/console`, i.e. the VM's serial log).
pub fn log(msg: &str) {
    eprintln!("boxwood-agent: {msg}");
}

/// Syncs and powers the VM off. PID 1 must never return: if power-off fails, it idles forever.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let Err(err) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    log(&format!("power-off failed: {err}"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
