//! Readiness (what a load balancer or an orchestrator asks before sending this server work)
//! and the gauges a metrics scrape samples.

use boxwood_vm::{FastStartState, ProcessUsage};
use metrics::gauge;

use super::Service;
use crate::clock::now_us;
use crate::error::error_chain;
use crate::model::{Check, Readiness, ReadinessChecks, TemplateCheck};

/// How long one store write probe answers readiness checks for.
const PROBE_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

impl Service {
    /// Checks the store (a real committed write), the disk (above the reserve), fast start
    /// and whether runs are accepted. Failures are logged, never shown.
    pub async fn readiness(&self) -> Readiness {
        let inner = &self.inner;
        let store = self.store_writable().await;
        let disk = match inner.env.storage.above_reserve() {
            Ok(true) => Check::Ok,
            Ok(false) => Check::Failing,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "readiness: cannot read the free space");
                Check::Failing
            }
        };
        let template = match inner.env.runtime.fast_start() {
            FastStartState::Building => TemplateCheck::Building,
            FastStartState::Ready { .. } => TemplateCheck::Ready,
            FastStartState::Unavailable => TemplateCheck::ColdBoot,
            FastStartState::Off => TemplateCheck::Off,
        };
        let accepting = inner.runs.lock().unwrap_or_else(|e| e.into_inner()).is_some();
        let runs = if accepting { Check::Ok } else { Check::Failing };
        let checks = ReadinessChecks { store, disk, template, runs };
        Readiness { ready: checks.failing().is_empty(), checks }
    }
}

impl Service {
    /// Whether the store commits a write, probed at most once per [`PROBE_MAX_AGE`]: the
    /// probe is a synced commit, and `/readyz` needs no token, so anyone reaching the port
    /// could otherwise make the disk sync at will.
    async fn store_writable(&self) -> Check {
        let mut last = self.inner.store_probe.lock().await;
        if let Some((at, check)) = *last
            && at.elapsed() < PROBE_MAX_AGE
        {
            return check;
        }
        let check = match self.inner.store.probe_write(now_us()).await {
            Ok(()) => Check::Ok,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "readiness: the store refuses writes");
                Check::Failing
            }
        };
        *last = Some((std::time::Instant::now(), check));
        check
    }

    /// Sets the gauges from the state now (called before each scrape is rendered).
    pub async fn sample_metrics(&self) {
        let env = &self.inner.env;
        match env.runtime.fast_start() {
            FastStartState::Ready { pooled, target } => {
                gauge!("boxwood_pool_idle_vms").set(pooled as f64);
                gauge!("boxwood_pool_target_vms").set(target as f64);
            }
            _ => {
                gauge!("boxwood_pool_idle_vms").set(0.0);
                gauge!("boxwood_pool_target_vms").set(0.0);
            }
        }
        let live = env.live_qemu_pids();
        gauge!("boxwood_live_vms").set(live.len() as f64);
        let mut pids = env.runtime.idle_qemu_pids();
        pids.extend(live);
        let (layers, blobs) = (env.layers.clone(), env.blobs.clone());
        let sampled = tokio::task::spawn_blocking(move || {
            (ProcessUsage::of(&pids), layers.space(), layers.stored_bytes_total(), blobs.stored_bytes_total())
        })
        .await;
        let Ok((usage, space, layer_bytes, blob_bytes)) = sampled else { return };
        gauge!("boxwood_qemu_cpu_seconds").set(usage.cpu_seconds);
        gauge!("boxwood_qemu_pss_bytes").set(usage.pss_bytes as f64);
        match space {
            Ok(space) => {
                gauge!("boxwood_disk_free_bytes").set(space.free_bytes as f64);
                gauge!("boxwood_disk_total_bytes").set(space.total_bytes as f64);
            }
            Err(e) => tracing::warn!(error = %error_chain(&e), "metrics: cannot read the free space"),
        }
        if let Ok(n) = layer_bytes {
            gauge!("boxwood_stored_bytes", "kind" => "layers").set(n as f64);
        }
        if let Ok(n) = blob_bytes {
            gauge!("boxwood_stored_bytes", "kind" => "blobs").set(n as f64);
        }
        if let Ok(n) = self.inner.store.size_bytes().await {
            gauge!("boxwood_stored_bytes", "kind" => "db").set(n as f64);
        }
        match self.recent_usage().await {
            Ok(namespaces) => {
                for u in namespaces {
                    let ns = u.namespace;
                    for (kind, n) in [("images", u.image_bytes), ("uploads", u.upload_bytes), ("events", u.event_bytes)]
                    {
                        gauge!("boxwood_namespace_bytes", "namespace" => ns.clone(), "kind" => kind).set(n as f64);
                    }
                    for (kind, n) in
                        [("images", u.images), ("tags", u.tags), ("uploads", u.uploads), ("operations", u.operations)]
                    {
                        gauge!("boxwood_namespace_objects", "namespace" => ns.clone(), "kind" => kind).set(n as f64);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %error_chain(&e), "metrics: cannot read the namespaces' usage"),
        }
    }
}
