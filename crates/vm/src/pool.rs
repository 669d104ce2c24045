//! Fast start: a background task builds (or reuses) the template, then keeps a warm pool of
//! restored clones that have run the agent's `Warmup`, refilling it as runs take them. A run
//! takes a pooled clone, or restores one on demand when the pool is empty, or cold-boots while
//! there is no template (still building, or unavailable: then one warning says why).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::clone::{Restored, clone_plan, restore};
use crate::runtime::Base;
use crate::template::{self, Template};
use crate::vm::QemuVm;
use crate::{VmError, VmSpec};

/// Longest pause between refill attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A refill starts only once no VM was asked for during this long: a run's first
/// milliseconds (Setup, its first command) then have the CPU to themselves, and under
/// sustained load runs restore clones on demand, which costs less CPU than restore + warm-up.
const REFILL_QUIET: Duration = Duration::from_millis(300);

/// Templates and the warm pool of one runtime. Dropping it kills the pooled clones.
pub(crate) struct FastStart {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

struct Shared {
    base: Arc<Base>,
    size: usize,
    template: OnceLock<Arc<Template>>,
    /// The template build ended (successfully or not).
    settled: AtomicBool,
    idle: Mutex<VecDeque<Restored>>,
    /// Wakes the refill loop when a clone was taken.
    taken: Notify,
    draining: AtomicBool,
    next_id: AtomicU64,
    /// When a VM was last asked for.
    last_demand: Mutex<Instant>,
}

impl Shared {
    fn idle(&self) -> MutexGuard<'_, VecDeque<Restored>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn limit(&self) -> Duration {
        Duration::from_secs(self.base.config.boot_timeout_secs)
    }

    /// The oldest pooled clone whose QEMU is still alive.
    fn take(&self) -> Option<Restored> {
        let mut idle = self.idle();
        while let Some(clone) = idle.pop_front() {
            if clone.qemu.exited().is_none() {
                return Some(clone);
            }
            tracing::warn!(dir = %clone.paths.dir.display(), "a pooled VM died while idle; discarded");
        }
        None
    }
}

/// The default pool size: 2 per CPU, at most 16, and at most one per 4 × `memory_mib` of
/// available memory (an idle clone costs ~20 MiB, but a run may grow it to `memory_mib`).
pub(crate) fn default_pool_size(memory_mib: u32) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let avail_mib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| mem_available_kib(&m)).map(|k| k / 1024);
    let by_memory = avail_mib.map_or(usize::MAX, |m| usize::try_from(m / (4 * u64::from(memory_mib))).unwrap_or(0));
    (2 * cpus).min(16).min(by_memory).max(1)
}

fn mem_available_kib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

impl FastStart {
    /// Starts the background task: template, then the pool.
    pub fn launch(base: Arc<Base>) -> Self {
        let size = base.config.pool_size.unwrap_or_else(|| default_pool_size(base.config.memory_mib));
        let shared = Arc::new(Shared {
            base,
            size,
            template: OnceLock::new(),
            settled: AtomicBool::new(false),
            idle: Mutex::new(VecDeque::new()),
            taken: Notify::new(),
            draining: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            last_demand: Mutex::new(Instant::now()),
        });
        let task = tokio::spawn(run(shared.clone()));
        Self { shared, task }
    }

    /// A clone for `spec`, attached and set up; `None` when the spec must cold-boot (no
    /// template yet, or a spec a clone cannot serve, or restoring failed: logged).
    pub async fn start(&self, spec: &VmSpec) -> Result<Option<QemuVm>, VmError> {
        let Some(template) = self.shared.template.get() else { return Ok(None) };
        let Some(rootfs) = clone_plan(spec, template)? else { return Ok(None) };
        let started = Instant::now();
        *self.shared.last_demand.lock().unwrap_or_else(PoisonError::into_inner) = started;
        let limit = self.shared.limit();
        let clone = match self.shared.take() {
            Some(clone) => {
                self.shared.taken.notify_one();
                metrics::counter!("boxwood_vm_starts_total", "path" => "pooled").increment(1);
                clone
            }
            None => match restore(&self.shared.base, template.clone(), &spec.name, limit, false).await {
                Ok(clone) => {
                    metrics::counter!("boxwood_vm_starts_total", "path" => "restored").increment(1);
                    clone
                }
                Err(e) => {
                    tracing::warn!(vm = spec.name, "restoring a template clone failed, cold-booting: {e}");
                    return Ok(None);
                }
            },
        };
        let base = &self.shared.base;
        clone.assign(spec, rootfs, base.scratch_size(spec), base.extra_ca.as_deref(), limit, started).await.map(Some)
    }

    pub fn state(&self) -> crate::FastStartState {
        let sh = &self.shared;
        match (sh.template.get(), sh.settled.load(Ordering::SeqCst)) {
            (Some(_), _) => crate::FastStartState::Ready { pooled: sh.idle().len(), target: sh.size },
            (None, false) => crate::FastStartState::Building,
            (None, true) => crate::FastStartState::Unavailable,
        }
    }

    pub async fn wait_ready(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let settled = self.shared.settled.load(Ordering::SeqCst);
            let ready = self.shared.template.get().is_some();
            if settled && (!ready || self.shared.idle().len() >= self.shared.size) {
                return ready;
            }
            if Instant::now() >= deadline {
                return ready;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn drain(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
        self.shared.taken.notify_one();
        let drained: Vec<Restored> = self.shared.idle().drain(..).collect();
        // Dropping a clone SIGKILLs its QEMU and removes its scratch dir.
        drop(drained);
    }

    pub fn pooled_pids(&self) -> Vec<u32> {
        self.shared.idle().iter().map(|c| c.qemu.pid).collect()
    }
}

impl Drop for FastStart {
    fn drop(&mut self) {
        self.task.abort();
        self.drain();
    }
}

/// The background task: the template, then refilling the pool whenever it is short.
async fn run(shared: Arc<Shared>) {
    let template = match template::prepare(&shared.base).await {
        Ok(t) => Arc::new(t),
        Err(e) => {
            tracing::warn!("fast start is unavailable, every VM cold-boots: {e}");
            shared.settled.store(true, Ordering::SeqCst);
            return;
        }
    };
    tracing::info!(key = template.key, pool = shared.size, "VM template ready: VMs start as clones");
    let _ = shared.template.set(template.clone());
    shared.settled.store(true, Ordering::SeqCst);
    let mut failures = 0u32;
    let mut announced = false;
    loop {
        if shared.draining.load(Ordering::SeqCst) {
            return;
        }
        if shared.idle().len() >= shared.size {
            // `notify_one` keeps a permit when nobody waits, so a take between the check and
            // here is not missed.
            shared.taken.notified().await;
            continue;
        }
        let quiet_since = *shared.last_demand.lock().unwrap_or_else(PoisonError::into_inner);
        if quiet_since.elapsed() < REFILL_QUIET {
            tokio::time::sleep_until(quiet_since + REFILL_QUIET).await;
            continue;
        }
        match fresh_clone(&shared, &template).await {
            Ok(clone) => {
                failures = 0;
                if shared.draining.load(Ordering::SeqCst) {
                    return;
                }
                let idle = {
                    let mut idle = shared.idle();
                    idle.push_back(clone);
                    idle.len()
                };
                if idle >= shared.size && !announced {
                    announced = true;
                    tracing::info!(size = shared.size, "warm pool ready");
                }
            }
            Err(e) => {
                failures += 1;
                let pause = (Duration::from_millis(100) * 2u32.saturating_pow(failures)).min(MAX_BACKOFF);
                tracing::warn!(failures, "could not add a VM to the warm pool (retrying in {pause:?}): {e}");
                tokio::time::sleep(pause).await;
            }
        }
    }
}

async fn fresh_clone(shared: &Shared, template: &Arc<Template>) -> Result<Restored, VmError> {
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let name = format!("pool-{}-{id}", std::process::id());
    let started = Instant::now();
    let mut clone = restore(&shared.base, template.clone(), &name, shared.limit(), true).await?;
    let restored = started.elapsed();
    clone.warm_up(shared.limit(), shared.base.pooled_scratch_size()).await?;
    tracing::debug!(vm = name, restore_ms = restored.as_millis(), total_ms = started.elapsed().as_millis(), "pooled");
    Ok(clone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo() {
        let m = "MemTotal:       24000000 kB\nMemFree:  1 kB\nMemAvailable:   23000000 kB\n";
        assert_eq!(mem_available_kib(m), Some(23_000_000));
        assert_eq!(mem_available_kib("nothing"), None);
        let n = default_pool_size(256);
        assert!((1..=16).contains(&n), "{n}");
    }
}
