//! The retention policy: untagged, childless images no run used for N days, uploads no run
//! or import used for N days, finished operations (with their event logs) after N days and
//! directory states nobody fetched for N days are removed, by a background collector and on an operator's request (`boxwood gc`).
//! Nothing tagged, nothing with children and nothing an unfinished operation uses is ever
//! removed: each removal re-checks that in its own transaction, and runs and imports mark
//! what they use before they use it. Removed images stay named in lineage.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Service;
use crate::clock::{format_ts, now_us};
use crate::error::{CoreError, CoreResult, error_chain};

/// `[core.retention]`. Days may be fractional; an absent value keeps that kind forever.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Untagged images without children that no run started from for this long.
    pub images_after_days: Option<f64>,
    /// Uploads not uploaded again nor used by a run or an import for this long (Contree
    /// keeps them about 6 months).
    pub uploads_after_days: Option<f64>,
    /// Finished operations and their event logs, this long after they ended.
    pub operations_after_days: Option<f64>,
    /// Directory states (`rsync`'s) nobody fetched for this long; a later run with the id
    /// hears "run rsync again".
    pub directory_states_after_days: Option<f64>,
    /// Seconds between the background collector's passes (the first comes after at most
    /// 5 minutes); 0 turns the collector off (`boxwood gc` still works).
    pub interval_secs: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            images_after_days: Some(30.0),
            uploads_after_days: Some(180.0),
            operations_after_days: Some(30.0),
            directory_states_after_days: Some(30.0),
            interval_secs: 3600,
        }
    }
}

impl RetentionConfig {
    /// Refuses negative or non-finite ages (at load, before anything starts).
    pub fn validate(&self) -> Result<(), String> {
        for (name, days) in [
            ("images_after_days", self.images_after_days),
            ("uploads_after_days", self.uploads_after_days),
            ("operations_after_days", self.operations_after_days),
            ("directory_states_after_days", self.directory_states_after_days),
        ] {
            if days.is_some_and(|d| !d.is_finite() || d < 0.0) {
                return Err(format!("core.retention.{name} must be a number of days ≥ 0"));
            }
        }
        Ok(())
    }
}

/// The cutoff (µs) before which things of an age of `days` were last used.
fn cutoff(now_us: i64, days: Option<f64>) -> Option<i64> {
    days.map(|d| now_us.saturating_sub((d * 86_400e6) as i64))
}

/// How stale the per-namespace usage in the metrics may be.
const USAGE_MAX_AGE: Duration = Duration::from_secs(300);

/// Rows looked at per query; a pass loops until nothing more qualifies.
const BATCH: i64 = 500;
/// Rounds of the image pass (each can make parents leaves); a bound, not an expectation.
const MAX_IMAGE_ROUNDS: usize = 64;

/// What one collection removed (or, in a dry run, would remove first).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub images: Vec<GcImage>,
    pub uploads: u64,
    pub upload_bytes: u64,
    pub operations: u64,
    pub events: u64,
    pub directory_states: u64,
    /// Layer files no image names any more, removed after the images went.
    pub layer_files: u64,
    pub layer_bytes: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GcImage {
    pub uuid: String,
    pub namespace: String,
    pub parent: Option<String>,
    pub created_at: String,
}

/// What one namespace keeps (`boxwood usage`, and the per-namespace metrics).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NamespaceUsage {
    pub namespace: String,
    pub images: u64,
    pub tags: u64,
    /// Allocated bytes of the layers the namespace's images introduced.
    pub image_bytes: u64,
    pub uploads: u64,
    pub upload_bytes: u64,
    pub operations: u64,
    pub event_bytes: u64,
}

impl Service {
    /// One pass of the retention policy. A dry run lists what the pass would remove first
    /// (parents that only become leaves during the pass are not listed) and removes nothing.
    pub async fn collect(&self, dry_run: bool) -> CoreResult<GcReport> {
        let inner = &self.inner;
        let _one = inner.collecting.lock().await;
        let started = std::time::Instant::now();
        let (store, policy, now) = (&inner.store, &inner.config.retention, now_us());
        let mut report = GcReport { dry_run, ..GcReport::default() };

        if let Some(cutoff) = cutoff(now, policy.images_after_days) {
            for _ in 0..MAX_IMAGE_ROUNDS {
                let batch = store.expired_images(cutoff, BATCH).await?;
                let mut removed = 0;
                for img in batch {
                    if dry_run || store.remove_image(img.uuid, cutoff, now, "retention").await? {
                        removed += 1;
                        report.images.push(GcImage {
                            uuid: img.uuid.to_string(),
                            namespace: img.namespace,
                            parent: img.parent_uuid.map(|p| p.to_string()),
                            created_at: format_ts(img.created_at_us),
                        });
                    }
                }
                if dry_run || removed == 0 {
                    break;
                }
            }
        }

        if let Some(cutoff) = cutoff(now, policy.uploads_after_days) {
            loop {
                let batch = store.expired_files(cutoff, BATCH).await?;
                let mut removed = 0;
                for file in batch {
                    if dry_run {
                        report.uploads += 1;
                        report.upload_bytes += u64::try_from(file.size).unwrap_or(0);
                        continue;
                    }
                    // Held while the row and maybe the blob go: an upload of the same content
                    // records its row under the read side, so it either keeps the blob or
                    // finds it gone and says so.
                    let _blobs = inner.uploads_gate.write().await;
                    if !store.remove_file(file.uuid, cutoff).await? {
                        continue;
                    }
                    removed += 1;
                    report.uploads += 1;
                    if !store.content_referenced(&file.sha256).await? {
                        let freed =
                            inner.blobs.remove(&file.sha256).map_err(|e| CoreError::Internal(error_chain(&e)))?;
                        report.upload_bytes += freed;
                    }
                }
                if dry_run || removed == 0 {
                    break;
                }
            }
        }

        if let Some(cutoff) = cutoff(now, policy.operations_after_days) {
            loop {
                let batch = store.expired_operations(cutoff, BATCH).await?;
                let mut removed = 0;
                for op in batch {
                    if dry_run || store.remove_operation(op.uuid, cutoff).await? {
                        removed += 1;
                        report.operations += 1;
                        report.events += op.events;
                    }
                }
                if dry_run || removed == 0 {
                    break;
                }
            }
        }

        if let Some(cutoff) = cutoff(now, policy.directory_states_after_days) {
            report.directory_states = if dry_run {
                store.expired_directory_states(cutoff).await?
            } else {
                let mut removed = 0;
                loop {
                    let n = store.remove_directory_states(cutoff, BATCH).await?;
                    removed += n;
                    if n == 0 {
                        break removed;
                    }
                }
            };
        }

        if !dry_run && !report.images.is_empty() {
            let reclaimed = inner.env.reclaim_layers().await?;
            report.layer_files = reclaimed.layers.len() as u64;
            report.layer_bytes = reclaimed.bytes;
        }
        report.seconds = started.elapsed().as_secs_f64();
        if !dry_run {
            *inner.usage_cache.lock().await = None;
            crate::metrics::collected(&report);
            tracing::info!(
                images = report.images.len(),
                uploads = report.uploads,
                operations = report.operations,
                directory_states = report.directory_states,
                layer_bytes = report.layer_bytes,
                upload_bytes = report.upload_bytes,
                seconds = report.seconds,
                "retention pass"
            );
        }
        Ok(report)
    }

    /// [`Service::usage`] at most [`USAGE_MAX_AGE`] old: scrapes come every few seconds, and
    /// counting means scanning every event log and stat-ing every layer.
    pub(super) async fn recent_usage(&self) -> CoreResult<Vec<NamespaceUsage>> {
        let mut cached = self.inner.usage_cache.lock().await;
        if let Some((at, usage)) = cached.as_ref()
            && at.elapsed() < USAGE_MAX_AGE
        {
            return Ok(usage.clone());
        }
        let usage = self.usage().await?;
        *cached = Some((std::time::Instant::now(), usage.clone()));
        Ok(usage)
    }

    /// What each namespace keeps now.
    pub async fn usage(&self) -> CoreResult<Vec<NamespaceUsage>> {
        let mut out = Vec::new();
        for c in self.inner.store.namespace_counts().await? {
            let image_bytes = self.inner.env.storage.image_usage(&c.namespace).await?;
            out.push(NamespaceUsage {
                namespace: c.namespace,
                images: c.images,
                tags: c.tags,
                image_bytes,
                uploads: c.uploads,
                upload_bytes: c.upload_bytes,
                operations: c.operations,
                event_bytes: c.event_bytes,
            });
        }
        Ok(out)
    }

    /// Runs a pass every `interval_secs` until shutdown begins (the first after at most
    /// 5 minutes, so a server restarted often still collects).
    pub(super) fn start_collector(&self) {
        let interval = self.inner.config.retention.interval_secs;
        if interval == 0 {
            return;
        }
        let svc = self.clone();
        let stop = self.inner.stopping.clone();
        let mut wait = Duration::from_secs(interval.min(300));
        self.inner.tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                if let Err(e) = svc.collect(false).await {
                    tracing::warn!(error = %crate::error::error_chain(&e), "retention pass failed; trying again later");
                }
                wait = Duration::from_secs(interval);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_become_cutoffs_and_bad_ones_are_refused() {
        let day = 86_400_000_000;
        assert_eq!(cutoff(10 * day, Some(3.0)), Some(7 * day));
        assert_eq!(cutoff(10 * day, Some(0.5)), Some(10 * day - day / 2));
        assert_eq!(cutoff(10 * day, None), None);
        assert!(RetentionConfig::default().validate().is_ok());
        let bad = RetentionConfig { uploads_after_days: Some(-1.0), ..RetentionConfig::default() };
        assert!(bad.validate().unwrap_err().contains("uploads_after_days"));
        let nan = RetentionConfig { images_after_days: Some(f64::NAN), ..RetentionConfig::default() };
        assert!(nan.validate().is_err());
    }
}
