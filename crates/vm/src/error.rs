//! The error type of this crate.

use std::path::PathBuf;

use boxwood_protocol::ProtocolError;

/// Everything that can go wrong with guest assets and VMs.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("guest assets: {0}")]
    Assets(String),
    #[error("unix socket path {path:?} is {len} bytes, the limit is 107: use a shorter run_dir")]
    SocketPathTooLong { path: PathBuf, len: usize },
    /// Timeout, QEMU exit before Hello, or a bad Hello. `detail` has QEMU's status and the
    /// console tail.
    #[error("VM boot failed: {reason}\n{detail}")]
    Boot { reason: String, detail: String },
    /// The guest kernel came up without its APIC timer (see `guest::check_timer`); booting
    /// again almost always gets one.
    #[error("the guest kernel booted without a running timer (tick device {clock_events:?})")]
    NoTimer { clock_events: String },
    /// The VM died before its agent said `Hello`: the guest kernel panicked or oopsed while
    /// booting (or QEMU quit), before anything of a run's was in the guest. Booting again
    /// almost always gets through. `detail` has QEMU's status and the console tail.
    #[error("VM boot failed: the VM died before its agent started\n{detail}")]
    DiedBeforeHello { detail: String },
    #[error("guest setup failed: {error}")]
    SetupFailed { error: String },
    #[error("spawn failed: {error}")]
    SpawnFailed { error: String },
    /// The VM died or its channel broke; `detail` has QEMU's status and the console tail.
    #[error("VM crashed: {detail}")]
    Crashed { detail: String },
    /// The agent could not create a file ([`crate::Vm::put_file`]).
    #[error("cannot put {path}: {error}")]
    FileFailed { path: String, error: String },
    /// The agent could not export the upper directory ([`crate::Vm::export_upper`]).
    #[error("export of the run's changes failed: {error}")]
    ExportFailed { error: String },
    /// The host stopped an export that went past its budget ([`crate::ExportBudget`]).
    #[error("{reason}")]
    ExportRefused { reason: String },
    #[error("rejected: {0}")]
    Rejected(String),
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// QEMU's monitor (QMP) failed or refused a command.
    #[error("QEMU monitor: {0}")]
    Qmp(String),
    /// The guest egress filter could not be installed or removed.
    #[error("guest egress filter: {0}")]
    Egress(String),
    /// Building or loading a fast-start template failed.
    #[error("VM template: {0}")]
    Template(String),
    /// The host cannot jail QEMU (not root) or has no VM uid left.
    #[error("VM jail: {0}")]
    Jail(String),
}

impl VmError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { context: context.into(), source }
    }
}
