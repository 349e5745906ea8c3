//! Online garbage collection inside `orlop serve`: the engine collects blobs
//! without references (see `orlop_engine::Store::collect_garbage` for why
//! that is safe beside pushes); this runs it, logs one line per run and
//! feeds the `orlop_gc_*` metrics.

use crate::app::App;
use orlop_engine::{CompactOptions, GcOptions, GcReport};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How long a link must go unused before the sweep removes it: 1.5 x the
/// grace, since HEAD and GET renew a link only once it is older than half
/// the grace (`routes::blobs::linked_blob`).
pub fn unused_ms(grace_secs: u64) -> u64 {
    grace_secs.saturating_mul(1500)
}

/// Clears `App::gc_running` when a run ends, however it ends.
struct Running<'a>(&'a AtomicBool);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// One collection run with the server's grace period. Does nothing once
/// shutdown has begun.
pub fn run(app: &App) -> Option<GcReport> {
    app.gc_running.store(true, Ordering::SeqCst);
    let _running = Running(&app.gc_running);
    if app.gc_cancel.load(Ordering::SeqCst) {
        return None;
    }
    let opts = GcOptions {
        // At least 1 s even when periodic runs are off (an on-demand run):
        // the grace covers the gap between an upload's commit and its link.
        grace: Duration::from_secs(app.cfg.gc_grace_secs.max(1)),
        dry_run: false,
        cancel: app.gc_cancel.clone(),
    };
    let m = &app.metrics.gc;
    m.runs.inc();
    // Untagged manifests first (when asked), then links: each step can
    // leave the next something to free.
    if app.cfg.gc_untagged_age_secs > 0 {
        let age_ms = app.cfg.gc_untagged_age_secs.saturating_mul(1000);
        match app.registry.expire_untagged(age_ms, &app.gc_cancel) {
            Ok(n) => {
                m.untagged_deleted.inc_by(n);
                tracing::info!(deleted = n, "untagged manifests expired");
            }
            Err(e) => {
                m.failures.inc();
                tracing::error!(error = %e, "expiring untagged manifests failed");
            }
        }
    }
    // Links next: the blobs whose last reference they held are then
    // collected in the same run once their own grace period is over.
    match app
        .registry
        .sweep_links(unused_ms(app.cfg.gc_grace_secs.max(1)), &app.gc_cancel)
    {
        Ok(s) => {
            m.links_removed.inc_by(s.removed);
            m.damaged.inc_by(s.damaged);
            tracing::info!(
                links = s.links,
                removed = s.removed,
                kept_young = s.kept_young,
                damaged = s.damaged,
                "link sweep"
            );
        }
        Err(e) => {
            // The collector still runs: what it frees does not depend on it.
            m.failures.inc();
            tracing::error!(error = %e, "link sweep failed");
        }
    }
    match app.registry.store().collect_garbage(&opts, &mut |_| {}) {
        Ok(r) => {
            m.blobs_freed.inc_by(r.blobs_freed);
            m.damaged.inc_by(r.damaged);
            m.bytes_freed.inc_by(r.bytes_freed);
            m.chunk_bytes_released.inc_by(r.chunk_bytes_released);
            m.last_duration_seconds.set(r.elapsed.as_secs_f64());
            let now_secs = crate::meta::now_unix_ms() / 1000;
            m.last_success_unix_seconds
                .set(i64::try_from(now_secs).unwrap_or(i64::MAX));
            compact(app);
            tracing::info!(
                blobs_scanned = r.blobs_scanned,
                unreferenced = r.unreferenced_blobs,
                kept_young = r.kept_young,
                blobs_freed = r.blobs_freed,
                bytes_freed = r.bytes_freed,
                chunks_released = r.chunks_released,
                chunk_bytes_released = r.chunk_bytes_released,
                damaged = r.damaged,
                incomplete = r.incomplete,
                seconds = r.elapsed.as_secs_f64(),
                "garbage collection"
            );
            Some(r)
        }
        Err(e) => {
            m.failures.inc();
            tracing::error!(error = %e, "garbage collection failed");
            None
        }
    }
}

/// Compaction after a collection: returns the segment space of what was
/// freed, copying at most `compact_bytes_per_sec_max`. A run that older
/// upload writers hold up changes nothing and is tried again next time.
fn compact(app: &App) {
    let opts = CompactOptions {
        live_fraction_max: app.cfg.compact_live_fraction_max,
        copy_bytes_per_sec_max: app.cfg.compact_bytes_per_sec_max,
        writer_wait: Duration::from_secs(10),
        cancel: app.gc_cancel.clone(),
        ..CompactOptions::default()
    };
    let m = &app.metrics.gc;
    match app.registry.store().compact(&opts, &mut |_| {}) {
        Ok(r) => {
            m.segments_compacted.inc_by(r.segments_removed);
            m.bytes_compacted.inc_by(r.bytes_reclaimed);
            m.bytes_moved.inc_by(r.bytes_moved);
            tracing::info!(
                segments_scanned = r.segments_scanned,
                segments_chosen = r.segments_chosen,
                segments_removed = r.segments_removed,
                segments_kept = r.segments_kept,
                records_moved = r.records_moved,
                bytes_moved = r.bytes_moved,
                chunks_dropped = r.chunks_dropped,
                bytes_reclaimed = r.bytes_reclaimed,
                deferred = r.deferred,
                seconds = r.elapsed.as_secs_f64(),
                "compaction"
            );
        }
        Err(e) => {
            m.failures.inc();
            tracing::error!(error = %e, "compaction failed");
        }
    }
}
