//! Executes one instance operation: queue → boot a microVM → inject files → run the main
//! process → stream its output into the event log → save the changes as a new image (unless
//! disposable) → tear the VM down. Every path ends with a terminal status and a `completion`
//! event (store failures included: the service retries the failure write), and never leaves
//! QEMU running.

mod compact;
mod live;
mod main_process;
mod persist;
mod reclaim;
pub(crate) mod slots;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use boxwood_blob::BlobStore;
use boxwood_image::LayerStore;
use boxwood_protocol::RootfsSpec;
use boxwood_store::{ImageRecord, OperationRecord, Store};
use boxwood_vm::{DiskSpec, FileSpec, Vm, VmRuntime, VmSpec};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::clock::{format_ts, now_us};
use crate::error::{CoreResult, error_chain, reported};
use crate::events::EventLog;
use crate::model::{EventKind, InstanceResult};
use crate::operations::{self, Lifecycle as _, Status};
use crate::quota::Storage;
use crate::spec::{FileInjection, ValidSpawn};

pub(crate) use live::Live;
pub(crate) use main_process::MAIN_SPID;

/// The deepest layer stack a VM can mount: its disk slots.
pub(crate) const MAX_LAYER_DISKS: usize = boxwood_vm::LAYER_SLOTS;

/// Why a run was asked to stop early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    Cancelled = 1,
    Shutdown = 2,
}

/// Handle the service keeps for a run it may have to stop.
#[derive(Debug, Default)]
pub(crate) struct RunControl {
    pub(crate) token: CancellationToken,
    reason: AtomicU8,
}

impl RunControl {
    pub(crate) fn stop(&self, reason: StopReason) {
        let _ = self.reason.compare_exchange(0, reason as u8, Ordering::SeqCst, Ordering::SeqCst);
        self.token.cancel();
    }

    /// The terminal status and error of a run stopped early.
    pub(crate) fn stopped_outcome(&self) -> (Status, Option<String>) {
        if self.reason.load(Ordering::SeqCst) == StopReason::Cancelled as u8 {
            (Status::Cancelled, Some("operation cancelled".into()))
        } else {
            (Status::Failed, Some("the server shut down while the operation was active".into()))
        }
    }
}

/// Shared parts every run uses.
pub(crate) struct RunEnv {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) blobs: Arc<dyn BlobStore>,
    pub(crate) layers: Arc<dyn LayerStore>,
    pub(crate) runtime: Arc<dyn VmRuntime>,
    pub(crate) slots: Arc<Semaphore>,
    /// Quotas and the free-space reserve.
    pub(crate) storage: Arc<Storage>,
    /// One lock per image being compacted, so an image is never compacted twice at once.
    compacting: std::sync::Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
    /// Held by the one layer sweep under way.
    sweeping: tokio::sync::Mutex<()>,
    background: TaskTracker,
    /// Instances whose VM is up, for subprocess, stdin and signal requests.
    live: std::sync::Mutex<HashMap<Uuid, Arc<Live>>>,
}

impl RunEnv {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        blobs: Arc<dyn BlobStore>,
        layers: Arc<dyn LayerStore>,
        runtime: Arc<dyn VmRuntime>,
        slots: Arc<Semaphore>,
        storage: Arc<Storage>,
    ) -> Self {
        Self {
            store,
            blobs,
            layers,
            runtime,
            slots,
            storage,
            compacting: std::sync::Mutex::new(HashMap::new()),
            sweeping: tokio::sync::Mutex::new(()),
            background: TaskTracker::new(),
            live: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The live phase of an instance operation, if its VM is up and its main process runs.
    pub(crate) fn live(&self, op: Uuid) -> Option<Arc<Live>> {
        self.live_map().get(&op).cloned()
    }

    /// The QEMUs of runs whose command is running.
    pub(crate) fn live_qemu_pids(&self) -> Vec<u32> {
        self.live_map().values().map(|l| l.qemu_pid()).collect()
    }

    fn live_map(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Arc<Live>>> {
        self.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits for background compactions (at shutdown).
    pub(crate) async fn wait_for_background(&self) {
        self.background.close();
        self.background.wait().await;
    }
}

/// Removes an instance from the live registry when its live phase ends, however it ends.
struct LiveGuard<'a> {
    env: &'a RunEnv,
    op: Uuid,
    live: Arc<Live>,
}

impl LiveGuard<'_> {
    /// Stops accepting requests and kills the remaining subprocesses.
    async fn close(self) {
        self.env.live_map().remove(&self.op);
        self.live.close().await;
    }
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.env.live_map().remove(&self.op);
    }
}

/// An upload to place in the VM before the command.
#[derive(Debug, Clone)]
pub(crate) struct InjectedFile {
    pub(crate) spec: FileInjection,
    pub(crate) sha256: String,
}

pub(crate) struct Run {
    pub(crate) op: OperationRecord,
    pub(crate) spec: ValidSpawn,
    pub(crate) image: ImageRecord,
    pub(crate) files: Vec<InjectedFile>,
    pub(crate) log: EventLog,
    pub(crate) control: Arc<RunControl>,
    pub(crate) namespace_slots: Arc<Semaphore>,
}

/// How a run ended.
pub(crate) struct Ending {
    status: Status,
    error: Option<String>,
    result: Option<InstanceResult>,
}

impl Ending {
    fn failed(error: impl Into<String>) -> Self {
        Self { status: Status::Failed, error: Some(error.into()), result: None }
    }
}

impl Run {
    /// Drives the run to a terminal state. Only store failures are returned (the caller then
    /// fails the operation itself); everything else becomes the operation's FAILED status.
    pub(crate) async fn execute(mut self, env: &Arc<RunEnv>) -> CoreResult<()> {
        let permits = tokio::select! {
            p = slots::acquire(self.namespace_slots.clone(), env.slots.clone()) => p,
            () = self.control.token.cancelled() => None,
        };
        let Some(_permits) = permits else {
            let (status, error) = self.control.stopped_outcome();
            return self.finish(Ending { status, error, result: None }).await;
        };
        self.transition(Status::Assigned, env).await?;
        self.op.started_at_us = Some(now_us());
        env.store.update_operation(&self.op).await?;

        if !self.spec.disposable {
            // A run whose changes could not be kept is refused before it boots.
            if let Err(refusal) = env.storage.check_image_room(&self.op.namespace).await? {
                return self.finish(Ending::failed(format!("{refusal}; the run was not started"))).await;
            }
        }
        if self.image.layers.len() > MAX_LAYER_DISKS {
            match env.compact_now(self.image.uuid).await {
                Ok(layers) => self.image.layers = layers,
                Err(e) => {
                    // The cause names layer files: it goes to the log, the client gets an id.
                    return self.finish(Ending::failed(reported("flattening the image failed", &e))).await;
                }
            }
        }
        // Pinned until the run ends: a sweep leaves them while the VM may still open them.
        let (disks, _pinned) = match env.open_image_layers(&mut self.image).await {
            Ok(pinned) => (self.disks(&pinned.paths), pinned.pin),
            Err(e) => {
                tracing::warn!(op = %self.op.uuid, error = %error_chain(&e), "image layers unavailable");
                return self.finish(Ending::failed("Container image not found")).await;
            }
        };
        // Held until the VM is gone: its writable layer may fill this much of the host's disk.
        let scratch = env.storage.grant_scratch(self.spec.max_layer_bytes)?;
        if scratch.bytes < self.spec.max_layer_bytes {
            tracing::info!(op = %self.op.uuid, granted = scratch.bytes, "the host's free disk bounds this run's writable layer");
        }
        let upper_on_disk = scratch.bytes > 0;
        let vm_spec = VmSpec {
            name: self.op.uuid.to_string(),
            rootfs: RootfsSpec {
                lower_serials: disks.iter().map(|d| d.serial.clone()).collect(),
                upper_size_bytes: if upper_on_disk { scratch.bytes } else { self.spec.max_layer_bytes },
                upper_disk: None,
            },
            disks,
            hostname: self.spec.hostname.clone(),
            memory_mib: None,
            vcpus: None,
            network: self.spec.networking,
            upper_on_disk,
        };
        let started = tokio::select! {
            vm = env.runtime.start(vm_spec) => Some(vm),
            () = self.control.token.cancelled() => None,
        };
        let vm = match started {
            None => {
                let (status, error) = self.control.stopped_outcome();
                return self.finish(Ending { status, error, result: None }).await;
            }
            Some(Err(e)) => {
                let msg = format!("microVM failed to start: {}", error_chain(&e));
                tracing::warn!(op = %self.op.uuid, error = %msg, "boot failed");
                return self.finish(Ending::failed(msg)).await;
            }
            Some(Ok(vm)) => Arc::<dyn Vm>::from(vm),
        };
        let inside = self.inside_vm(&vm, env).await;
        let logged = match &inside {
            Ok((_, reason)) => {
                self.log
                    .append(Some(0), EventKind::Shutdown, json!({"stopped_at": format_ts(now_us()), "reason": reason}))
                    .await
            }
            Err(_) => Ok(()),
        };
        if let Err(e) = vm.shutdown().await {
            tracing::warn!(op = %self.op.uuid, error = %error_chain(&e), "VM shutdown was not clean");
        }
        logged?;
        let (ending, _) = inside?;
        self.finish(ending).await
    }

    /// Everything that happens while the VM is up. Returns how the run ends and the reason
    /// for the `shutdown` event.
    async fn inside_vm(&mut self, vm: &Arc<dyn Vm>, env: &Arc<RunEnv>) -> CoreResult<(Ending, &'static str)> {
        self.log_boot(vm.as_ref()).await?;
        if let Err(msg) = self.inject_files(vm.as_ref(), env).await {
            return Ok((Ending::failed(msg), "spawn_failed"));
        }
        let live = Arc::new(Live::new(vm.clone(), self.log.clone(), self.image.clone(), self.spec.timeout_secs));
        env.live_map().insert(self.op.uuid, live.clone());
        // Subprocess requests are accepted from here on (EXECUTING), until the main process
        // is done; `LiveGuard` withdraws them on every path out.
        let guard = LiveGuard { env, op: self.op.uuid, live };
        self.transition(Status::Executing, env).await?;
        let outcome = self.run_main(&guard.live).await;
        guard.close().await;
        let result = match outcome? {
            main_process::Outcome::Exited(result) => *result,
            main_process::Outcome::OutOfMemory(result) => {
                // FAILED, as the contract lists OOM among infrastructure failures; the result
                // (signal 9, the output so far) is kept for the client.
                self.record_usage(&result);
                let error = "the command ran out of memory: the VM's out-of-memory killer ended it".to_owned();
                return Ok((Ending { status: Status::Failed, error: Some(error), result: Some(*result) }, "oom"));
            }
            main_process::Outcome::Stopped => {
                let (status, error) = self.control.stopped_outcome();
                return Ok((Ending { status, error, result: None }, "signal"));
            }
            main_process::Outcome::SpawnFailed(msg) => return Ok((Ending::failed(msg), "spawn_failed")),
            main_process::Outcome::Timeout(msg) => return Ok((Ending::failed(msg), "timeout")),
            main_process::Outcome::Crashed(msg) => return Ok((Ending::failed(msg), "vm_crashed")),
        };
        self.record_usage(&result);
        let reason = if result.state.timed_out { "timeout" } else { "job_complete" };
        if !self.spec.disposable {
            // The command's exit code does not matter: a failing build step's state is kept.
            match self.persist(vm.as_ref(), env).await {
                Ok((image, size)) => {
                    self.op.result_image_uuid = Some(image);
                    self.op.image_size = Some(size);
                }
                Err(msg) => return Ok((Ending::failed(msg), reason)),
            }
        }
        Ok((Ending { status: Status::Success, error: None, result: Some(result) }, reason))
    }

    fn disks(&self, paths: &[std::path::PathBuf]) -> Vec<DiskSpec> {
        paths.iter().enumerate().map(|(i, path)| DiskSpec { path: path.clone(), serial: format!("layer{i}") }).collect()
    }

    async fn log_boot(&mut self, vm: &dyn Vm) -> CoreResult<()> {
        let hello = vm.hello().clone();
        let init = json!({
            "started_at": format_ts(self.op.started_at_us.unwrap_or_else(now_us)),
            "runtime_path": "/run/boxwood",
            "verbose": false,
            "init_pid": 1,
            "hostname": self.spec.hostname,
            "kernel": hello.kernel_release,
            "machine": hello.machine,
            "boot_id": hello.boot_id,
        });
        self.log.append(Some(0), EventKind::Init, init).await?;
        if let Some(net) = vm.setup_report().network.clone() {
            let data = json!({
                "interfaces": net.interfaces.iter().map(|i| json!({
                    "name": i.name, "rx_bytes": i.rx_bytes, "rx_packets": i.rx_packets, "rx_errs": i.rx_errs,
                    "rx_drop": i.rx_drop, "tx_bytes": i.tx_bytes, "tx_packets": i.tx_packets, "tx_errs": i.tx_errs,
                    "tx_drop": i.tx_drop,
                })).collect::<Vec<_>>(),
                "configured": {"ip4": net.configured.address, "ip4_gw": net.configured.gateway,
                               "nameserver": net.configured.nameserver},
                "error": net.error,
            });
            self.log.append(Some(0), EventKind::Network, data).await?;
        }
        Ok(())
    }

    /// Places the request's uploads; a failure is the operation's failure message.
    async fn inject_files(&self, vm: &dyn Vm, env: &RunEnv) -> Result<(), String> {
        for f in &self.files {
            let source = match env.blobs.path(&f.sha256) {
                Ok(Some(p)) => p,
                _ => return Err(format!("uploaded file {} is missing from the blob store", f.spec.uuid)),
            };
            let spec = FileSpec { path: f.spec.path.clone(), mode: f.spec.mode, uid: f.spec.uid, gid: f.spec.gid };
            let put = tokio::select! {
                r = vm.put_file(&spec, &source) => r,
                () = self.control.token.cancelled() => return Err("operation stopped while placing files".into()),
            };
            put.map_err(|e| format!("placing {} failed: {}", f.spec.path, error_chain(&e)))?;
        }
        Ok(())
    }

    fn record_usage(&mut self, result: &InstanceResult) {
        self.op.consumed_cpu = Some(result.resources.user_cpu_time + result.resources.system_cpu_time);
        self.op.consumed_memory = Some(result.resources.max_rss as i64);
    }

    async fn transition(&mut self, next: Status, env: &RunEnv) -> CoreResult<()> {
        let current = Status::parse(&self.op.status);
        debug_assert!(current.is_some_and(|c| c.can_become(next)), "{:?} -> {next:?}", self.op.status);
        self.op.status = next.as_str().into();
        env.store.update_operation(&self.op).await?;
        Ok(())
    }

    async fn finish(mut self, ending: Ending) -> CoreResult<()> {
        let Ending { status, error, result } = ending;
        operations::conclude(&mut self.op, status, error);
        self.op.result = result.map(|r| serde_json::to_value(r).unwrap_or(Value::Null));
        tracing::info!(op = %self.op.uuid, status = status.as_str(), error = ?self.op.error, "operation finished");
        self.log.complete(&self.op).await
    }
}
