//! What the service reports for Prometheus, through the `metrics` facade (the binary installs
//! the exporter): counters and histograms as things happen, gauges sampled at each scrape.

use boxwood_store::OperationRecord;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, histogram};

/// Describes every series and creates the counters at zero, so a scrape shows them before
/// the first event.
pub fn describe() {
    describe_counter!("boxwood_operations_total", "Operations that ended, by kind and status");
    describe_histogram!("boxwood_run_duration_seconds", "From start to end of an operation, by kind");
    describe_histogram!("boxwood_run_queue_wait_seconds", "From creation to start of an operation, by kind");
    describe_counter!("boxwood_vm_starts_total", "VMs started, by path: pooled clone, restored clone, cold boot");
    describe_gauge!("boxwood_pool_idle_vms", "Warm template clones waiting for runs");
    describe_gauge!("boxwood_pool_target_vms", "Warm clones the pool keeps");
    describe_gauge!("boxwood_live_vms", "VMs of runs whose command is running");
    describe_gauge!("boxwood_qemu_cpu_seconds", "CPU time of the server's QEMUs alive now (pooled and live)");
    describe_gauge!("boxwood_qemu_pss_bytes", "Proportional memory of the server's QEMUs alive now");
    describe_counter!("boxwood_store_errors_total", "Failed metadata store calls, by condition");
    describe_gauge!("boxwood_disk_free_bytes", "Free space of the state dir's filesystem");
    describe_gauge!("boxwood_disk_total_bytes", "Size of the state dir's filesystem");
    describe_gauge!("boxwood_stored_bytes", "Disk taken, by kind: layers, blobs, db");
    describe_counter!("boxwood_gc_reclaimed_bytes_total", "Disk freed by removing unreferenced objects, by kind");
    describe_counter!("boxwood_gc_reclaimed_total", "Unreferenced objects removed, by kind");
    for condition in ["full", "unavailable", "broken"] {
        counter!("boxwood_store_errors_total", "condition" => condition).absolute(0);
    }
    for path in ["pooled", "restored", "cold"] {
        counter!("boxwood_vm_starts_total", "path" => path).absolute(0);
    }
    describe_counter!("boxwood_gc_removed_total", "Records the retention policy removed, by kind");
    describe_histogram!("boxwood_gc_pass_seconds", "Duration of retention passes");
    describe_gauge!("boxwood_namespace_bytes", "Disk a namespace's data takes, by namespace and kind");
    describe_gauge!("boxwood_namespace_objects", "Records a namespace keeps, by namespace and kind");
    for kind in ["layers", "uploads"] {
        counter!("boxwood_gc_reclaimed_bytes_total", "kind" => kind).absolute(0);
        counter!("boxwood_gc_reclaimed_total", "kind" => kind).absolute(0);
    }
    for kind in ["images", "uploads", "operations", "events"] {
        counter!("boxwood_gc_removed_total", "kind" => kind).absolute(0);
    }
}

/// A retention pass ended.
pub(crate) fn collected(r: &crate::service::GcReport) {
    for (kind, n) in [
        ("images", r.images.len() as u64),
        ("uploads", r.uploads),
        ("operations", r.operations),
        ("events", r.events),
        ("directory_states", r.directory_states),
    ] {
        counter!("boxwood_gc_removed_total", "kind" => kind).increment(n);
    }
    counter!("boxwood_gc_reclaimed_bytes_total", "kind" => "uploads").increment(r.upload_bytes);
    counter!("boxwood_gc_reclaimed_total", "kind" => "uploads").increment(r.uploads);
    histogram!("boxwood_gc_pass_seconds").record(r.seconds);
}

/// An operation reached its terminal status.
pub(crate) fn operation_finished(op: &OperationRecord) {
    counter!("boxwood_operations_total", "kind" => op.kind.clone(), "status" => op.status.clone()).increment(1);
    let secs = |from: i64, to: i64| (to - from).max(0) as f64 / 1e6;
    if let Some(started) = op.started_at_us {
        histogram!("boxwood_run_queue_wait_seconds", "kind" => op.kind.clone()).record(secs(op.created_at_us, started));
        if let Some(finished) = op.finished_at_us {
            histogram!("boxwood_run_duration_seconds", "kind" => op.kind.clone()).record(secs(started, finished));
        }
    }
}

/// A layer sweep removed `layers` files taking `bytes`.
pub(crate) fn layers_reclaimed(layers: usize, bytes: u64) {
    counter!("boxwood_gc_reclaimed_total", "kind" => "layers").increment(layers as u64);
    counter!("boxwood_gc_reclaimed_bytes_total", "kind" => "layers").increment(bytes);
}
