//! The scrub inside `orlop serve`: every `scrub_interval_secs` the engine
//! re-reads and checks every sealed segment at `scrub_bytes_per_sec_max`
//! (see `orlop_engine::Store::scrub`); each piece of damage gets an error
//! log line naming segment, offset and chunk, and the pass a summary line
//! and the `orlop_scrub_*` metrics. The scrub only reports: `orlop fsck
//! --repair` on the stopped store quarantines what it found.

use crate::app::App;
use orlop_engine::{ScrubOptions, ScrubReport};

/// One pass. Does nothing once shutdown has begun.
pub fn run(app: &App) -> Option<ScrubReport> {
    if app.gc_cancel.load(std::sync::atomic::Ordering::SeqCst) {
        return None;
    }
    let opts = ScrubOptions {
        bytes_per_sec_max: app.cfg.scrub_bytes_per_sec_max,
        cancel: app.gc_cancel.clone(),
    };
    let m = &app.metrics.scrub;
    let mut on_damage = |d: &orlop_engine::ScrubDamage| {
        m.damaged.inc();
        tracing::error!(
            segment = %d.segment,
            offset = d.offset,
            chunk = d.chunk.map(|c| c.to_string()),
            detail = %d.detail,
            "scrub found damage; run orlop fsck --repair on the stopped store"
        );
    };
    match app
        .registry
        .store()
        .scrub(&opts, &mut on_damage, &mut |_| {})
    {
        Ok(r) => {
            m.passes.inc();
            m.bytes.inc_by(r.bytes);
            m.records.inc_by(r.records);
            if !r.incomplete {
                m.last_pass_damaged
                    .set(i64::try_from(r.damaged.len()).unwrap_or(i64::MAX));
                let now_secs = crate::meta::now_unix_ms() / 1000;
                m.last_pass_unix_seconds
                    .set(i64::try_from(now_secs).unwrap_or(i64::MAX));
            }
            tracing::info!(
                segments = r.segments,
                records = r.records,
                live_records = r.live_records,
                bytes = r.bytes,
                damaged = r.damaged.len(),
                incomplete = r.incomplete,
                seconds = r.elapsed.as_secs_f64(),
                "scrub"
            );
            Some(r)
        }
        Err(e) => {
            m.failures.inc();
            tracing::error!(error = %e, "scrub failed");
            None
        }
    }
}
