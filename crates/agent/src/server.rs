//! The agent's main loop: bring the guest up, say `Hello`, then dispatch host messages.

use std::io;
use std::time::Duration;

use boxwood_protocol::{GuestMessage, HostMessage, PORT_NAME};

use crate::files::Files;
use crate::jobs::Jobs;
use crate::reaper::Reaper;
use crate::setup::Sandbox;
use crate::spawn::Table;
use crate::{channel, export, init, setup, spawn, warmup};

/// Runs until `Shutdown` (which powers off) or a fatal error (returned).
pub async fn run() -> io::Result<()> {
    init::early_mounts()?;
    init::load_modules();
    init::check_nic(Duration::from_secs(3))?;
    // Before the first fork, so that no exit can be missed.
    let reaper = Reaper::start()?;
    let mut port = init::open_port(PORT_NAME, Duration::from_secs(10))?;
    channel::send_now(&mut port, &GuestMessage::Hello(init::hello()))?;
    let channel::Channel { outbox: out, mut inbox, writer } = channel::start(port)?;
    let table = Table::new(Jobs::init());
    let mut sandbox: Option<Sandbox> = None;
    let mut files = Files::default();
    let mut no_net_ns = None;
    // The scratch disk a warm-up left mounted for the coming `Setup`.
    let mut prepared = None;

    while let Some(msg) = inbox.recv().await {
        match msg {
            HostMessage::Setup(s) => {
                let reply = if sandbox.is_some() {
                    GuestMessage::SetupFailed { error: "already set up".into() }
                } else {
                    match setup::apply(&s, no_net_ns.as_ref(), prepared.take()) {
                        Ok((sb, report)) => {
                            sandbox = Some(sb);
                            GuestMessage::SetupDone(report)
                        }
                        Err(error) => GuestMessage::SetupFailed { error },
                    }
                };
                let _ = out.send(reply).await;
            }
            HostMessage::Spawn(mut s) => {
                if let Some(bundle) = sandbox.as_ref().and_then(|sb| sb.ca_bundle.as_deref()) {
                    crate::ca::add_env(&mut s.env, bundle);
                }
                spawn::spawn(s, &table, &reaper, &out).await;
            }
            HostMessage::Stdin { id, data, close } => {
                if let Err(error) = table.stdin(id, data, close) {
                    let _ = out.send(GuestMessage::Rejected { id, error }).await;
                }
            }
            HostMessage::Signal { id, signal } => {
                if let Err(error) = table.signal(id, signal) {
                    let _ = out.send(GuestMessage::Rejected { id, error }).await;
                }
            }
            HostMessage::PutFile(put) => {
                let reply = if sandbox.is_some() {
                    files.chunk(put)
                } else {
                    put.last.then(|| GuestMessage::FileFailed { path: put.path, error: "the VM is not set up".into() })
                };
                if let Some(reply) = reply {
                    let _ = out.send(reply).await;
                }
            }
            HostMessage::ExportUpper => export::run(sandbox.as_ref().map(|s| &s.upper), &reaper, &writer).await,
            HostMessage::Warmup(w) => {
                let error = if sandbox.is_some() {
                    Some("already set up".into())
                } else if prepared.is_some() {
                    Some("already warmed up".into())
                } else {
                    warmup::run(&w, &mut no_net_ns, &mut prepared, &table, &reaper, &out).await
                };
                let _ = out.send(GuestMessage::WarmedUp { error }).await;
            }
            HostMessage::ReleaseUpper => {
                let error = if sandbox.is_some() {
                    Some("already set up".into())
                } else if prepared.take().is_some() {
                    setup::release_upper().err()
                } else {
                    None
                };
                let _ = out.send(GuestMessage::UpperReleased { error }).await;
            }
            HostMessage::Shutdown => {
                table.kill_all();
                // Orphans too: -1 is every process but PID 1 itself.
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), nix::sys::signal::Signal::SIGKILL);
                crate::power_off();
            }
        }
    }
    Err(io::Error::other("channel reader stopped"))
}
