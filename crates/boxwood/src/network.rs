//! Guest networks fail closed: the server installs the egress filter for its VMs' uid block
//! at start, and if that fails, a [`NetworkGate`] in front of the VM runtime refuses every
//! run that asks for networking (runs without networking go on).

use std::ops::RangeInclusive;
use std::sync::Arc;

use async_trait::async_trait;
use boxwood_vm::egress::{EgressFilter, FilterMode, NetworkConfig, sweep_stale};
use boxwood_vm::{Vm, VmError, VmRuntime, VmSpec};

/// What a refused run's error says (no host detail: that is in the server log).
pub const REFUSAL: &str = "networking is unavailable on this server (its guest network filter is not in place); \
                           run with networking disabled or ask the operator";

/// The outcome of [`start_egress`].
#[derive(Debug)]
pub enum Egress {
    /// The filter is installed; it is removed when this is dropped.
    Filtered(EgressFilter),
    /// `network.filter = "off"`: guests reach everything QEMU's host process reaches.
    Off,
    /// VMs do not run under a uid block of their own (`vm.jail.enabled = false`), so no
    /// filter can tell their sockets from the server's; networking runs are refused unless
    /// the operator turns the filter off.
    Unscoped,
    /// The filter could not be installed; networking runs are refused.
    Failed,
}

impl Egress {
    /// Whether runs with networking must be refused.
    pub fn refuses_networking(&self) -> bool {
        matches!(self, Self::Failed | Self::Unscoped)
    }
}

/// Installs the egress filter for `uids` (the block the VM runtime runs QEMU under) as
/// `config` says, logging loudly whenever guests are not filtered, after removing the tables
/// crashed servers left (`hold_stale_block`: see `QemuRuntime::hold_stale_uid_block`).
pub fn start_egress<G>(
    config: &NetworkConfig,
    uids: Option<RangeInclusive<u32>>,
    hold_stale_block: impl Fn(u32) -> Option<G>,
) -> Egress {
    if config.filter == FilterMode::Off {
        tracing::warn!(
            "network.filter = \"off\": guests with networking reach this host's loopback services (the Boxwood \
             API included), its addresses and every private and link-local network it can reach"
        );
        return Egress::Off;
    }
    let Some(uids) = uids else {
        tracing::error!(
            "the guest egress filter cannot be installed: VMs do not run under a uid block of their own \
             (vm.jail.enabled = false); runs with networking are refused unless network.filter = \"off\""
        );
        return Egress::Unscoped;
    };
    if let Err(e) = sweep_stale(&config.nft_binary, hold_stale_block) {
        tracing::warn!(error = %e, "could not look for stale guest egress filters");
    }
    match EgressFilter::install(&uids, config) {
        Ok(f) => {
            tracing::info!(table = f.table(), uids = ?uids, allowed = config.allow.len(), "guest egress filter installed");
            Egress::Filtered(f)
        }
        Err(e) => {
            tracing::error!(
                error = %e,
                "the guest egress filter could not be installed (needs nft and a kernel with nf_tables; \
                 scripts/install-deps.sh installs nftables): runs with networking will be REFUSED; \
                 set network.filter = \"off\" only on a host whose network is isolated otherwise"
            );
            Egress::Failed
        }
    }
}

/// A VM runtime that refuses networking when the egress filter is not in place.
pub struct NetworkGate {
    inner: Arc<dyn VmRuntime>,
    refuse: bool,
}

impl NetworkGate {
    pub fn new(inner: Arc<dyn VmRuntime>, egress: &Egress) -> Self {
        Self { inner, refuse: egress.refuses_networking() }
    }
}

#[async_trait]
impl VmRuntime for NetworkGate {
    async fn start(&self, spec: VmSpec) -> Result<Box<dyn Vm>, VmError> {
        if spec.network && self.refuse {
            return Err(VmError::Rejected(REFUSAL.to_owned()));
        }
        self.inner.start(spec).await
    }

    fn accel(&self) -> &str {
        self.inner.accel()
    }

    fn fast_start(&self) -> boxwood_vm::FastStartState {
        self.inner.fast_start()
    }

    fn idle_qemu_pids(&self) -> Vec<u32> {
        self.inner.idle_qemu_pids()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use boxwood_protocol::RootfsSpec;

    use super::*;

    fn no_stale(_: u32) -> Option<()> {
        None
    }

    /// Counts the starts that reach it and fails them (no VM is needed to see the gate).
    #[derive(Default)]
    struct Counting(AtomicUsize);

    #[async_trait]
    impl VmRuntime for Counting {
        async fn start(&self, _spec: VmSpec) -> Result<Box<dyn Vm>, VmError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Err(VmError::Invalid("reached the runtime".into()))
        }
        fn accel(&self) -> &str {
            "tcg"
        }
    }

    fn spec(network: bool) -> VmSpec {
        VmSpec {
            name: "t".into(),
            disks: Vec::new(),
            rootfs: RootfsSpec { lower_serials: Vec::new(), upper_size_bytes: 0, upper_disk: None },
            hostname: "t".into(),
            memory_mib: None,
            vcpus: None,
            network,
            upper_on_disk: true,
        }
    }

    async fn reached(egress: &Egress, network: bool) -> (bool, String) {
        let inner = Arc::new(Counting::default());
        let gate = NetworkGate::new(inner.clone(), egress);
        let err = gate.start(spec(network)).await.err().expect("both runtimes fail");
        (inner.0.load(Ordering::SeqCst) == 1, err.to_string())
    }

    #[tokio::test]
    async fn a_failed_filter_refuses_networking_runs_only() {
        let broken = NetworkConfig { nft_binary: PathBuf::from("/nonexistent/nft"), ..Default::default() };
        let egress = start_egress(&broken, Some(2_140_500_000..=2_140_500_255), no_stale);
        assert!(matches!(egress, Egress::Failed), "{egress:?}");
        let (went_on, err) = reached(&egress, true).await;
        assert!(!went_on && err.contains("networking is unavailable"), "{err}");
        assert!(!err.contains("nft") && !err.contains('/'), "no host detail in the refusal: {err}");
        assert!(reached(&egress, false).await.0, "runs without networking go on");
    }

    #[tokio::test]
    async fn off_lets_networking_through_and_unscoped_does_not() {
        let off = NetworkConfig { filter: FilterMode::Off, ..Default::default() };
        // The positive control of the test above: the same gate passes networking runs on.
        assert!(reached(&start_egress(&off, Some(2_140_500_256..=2_140_500_511), no_stale), true).await.0);
        assert!(
            reached(&start_egress(&off, None, no_stale), true).await.0,
            "off without a jail: the operator's choice"
        );
        let unscoped = start_egress(&NetworkConfig::default(), None, no_stale);
        assert!(!reached(&unscoped, true).await.0, "no uid block, no filter: networking is refused");
        assert!(reached(&unscoped, false).await.0);
    }
}
