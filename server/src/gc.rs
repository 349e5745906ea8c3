//! Online garbage collection inside `orlop serve`: the engine collects blobs
//! without references (see `orlop_engine::Store::collect_garbage` for why
//! that is safe beside pushes); this runs it, logs one line per run and
//! feeds the `orlop_gc_*` metrics.

use crate::app::App;
use orlop_engine::{GcOptions, GcReport};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
        grace: Duration::from_secs(app.cfg.gc_grace_secs),
        dry_run: false,
        cancel: app.gc_cancel.clone(),
    };
    let m = &app.metrics.gc;
    m.runs.inc();
    match app.registry.store().collect_garbage(&opts, &mut |_| {}) {
        Ok(r) => {
            m.blobs_freed.inc_by(r.blobs_freed);
            m.damaged.inc_by(r.damaged);
            m.bytes_freed.inc_by(r.bytes_freed);
            m.chunk_bytes_released.inc_by(r.chunk_bytes_released);
            m.last_duration_seconds.set(r.elapsed.as_secs_f64());
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            m.last_success_unix_seconds
                .set(i64::try_from(now).unwrap_or(i64::MAX));
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
