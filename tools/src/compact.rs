//! `orlop compact`: empties sealed segments whose live fraction is low on a
//! stopped store, with a progress bar and a summary (`--dry-run` only
//! reports). Run `orlop gc` first: compaction reclaims what collection freed.

use crate::StoreArgs;
use anyhow::Result;
use clap::Args;
use orlop_engine::{CompactOptions, Store};

#[derive(Args)]
pub struct CompactArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Report what would be reclaimed; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Compact segments whose live bytes are at most this fraction of their
    /// data (0 to 1).
    #[arg(long, default_value_t = 0.5)]
    live_fraction_max: f64,
    /// Segments compacted in this run at most.
    #[arg(long, default_value_t = 1024)]
    segments_max: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: CompactArgs) -> Result<i32> {
    if !(0.0..=1.0).contains(&a.live_fraction_max) {
        anyhow::bail!("--live-fraction-max must be between 0 and 1");
    }
    let mut cfg = a.store.config();
    cfg.read_only = a.dry_run;
    let store = Store::open(cfg)?;
    let bar = crate::progress_bar(!a.json, "segments");
    let opts = CompactOptions {
        live_fraction_max: a.live_fraction_max,
        segments_max: a.segments_max,
        dry_run: a.dry_run,
        ..CompactOptions::default()
    };
    let r = store.compact(&opts, &mut |p| crate::show_progress(&bar, p))?;
    bar.finish_and_clear();
    if !a.dry_run {
        store.close()?;
    }
    if a.json {
        let v = serde_json::json!({
            "dry_run": r.dry_run,
            "segments_scanned": r.segments_scanned,
            "segments_chosen": r.segments_chosen,
            "segments_removed": r.segments_removed,
            "segments_kept": r.segments_kept,
            "records_moved": r.records_moved,
            "bytes_moved": r.bytes_moved,
            "chunks_dropped": r.chunks_dropped,
            "bytes_reclaimed": r.bytes_reclaimed,
            "incomplete": r.incomplete,
            "seconds": r.elapsed.as_secs_f64(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if r.dry_run {
        println!(
            "compact (dry run): {} segments scanned, {} at most {:.0}% live; about {} bytes to reclaim",
            r.segments_scanned,
            r.segments_chosen,
            a.live_fraction_max * 100.0,
            r.bytes_reclaimed
        );
    } else {
        println!(
            "compact: {} segments scanned, {} chosen, {} removed; moved {} records ({} bytes), dropped {} unreferenced chunks; reclaimed {} bytes; {:.2}s",
            r.segments_scanned,
            r.segments_chosen,
            r.segments_removed,
            r.records_moved,
            r.bytes_moved,
            r.chunks_dropped,
            r.bytes_reclaimed,
            r.elapsed.as_secs_f64()
        );
    }
    if r.segments_kept > 0 {
        println!(
            "{} segments were kept because a record could not be read or is still in use: run orlop fsck",
            r.segments_kept
        );
    }
    Ok(if r.segments_kept > 0 { 1 } else { 0 })
}
