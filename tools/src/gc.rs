//! `orlop gc`: collects blobs without references on a stopped store, with a
//! progress bar and a summary (`--dry-run` only reports).

use crate::StoreArgs;
use anyhow::Result;
use clap::Args;
use orlop_engine::{GcOptions, Store};
use std::time::Duration;

#[derive(Args)]
pub struct GcArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Report what would be freed; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Keep blobs committed, and repository links made or used, within this
    /// many seconds (as `serve` does): a client may be between its blob
    /// uploads and its manifest push across a restart. 0 frees everything
    /// unreferenced now.
    #[arg(long, default_value_t = 3600)]
    grace_secs: u64,
    /// Also delete manifests that no tag and no index names (referrers such
    /// as signatures excepted) and that were pushed this many seconds ago.
    #[arg(long, value_name = "SECS")]
    delete_untagged_older_than: Option<u64>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: GcArgs) -> Result<i32> {
    let mut cfg = a.store.config();
    cfg.read_only = a.dry_run;
    let store = std::sync::Arc::new(Store::open(cfg)?);
    // A registry's store: sweep links no manifest names first, as `serve` does.
    let mut links_removed = None;
    let mut untagged_deleted = None;
    if !a.dry_run && store.has_column_family(orlop_server::meta::CF_LINKS) {
        let reg = orlop_server::Registry::new(store.clone());
        if let Some(age) = a.delete_untagged_older_than {
            let n = reg
                .expire_untagged(age.saturating_mul(1000), &Default::default())
                .map_err(|e| anyhow::anyhow!("deleting untagged manifests: {e}"))?;
            untagged_deleted = Some(n);
        }
        let s = reg
            .sweep_links(
                orlop_server::gc::unused_ms(a.grace_secs),
                &Default::default(),
            )
            .map_err(|e| anyhow::anyhow!("sweeping repository links: {e}"))?;
        links_removed = Some(s.removed);
    }
    let bar = crate::progress_bar(!a.json, "blobs");
    let opts = GcOptions {
        grace: Duration::from_secs(a.grace_secs),
        dry_run: a.dry_run,
        ..GcOptions::default()
    };
    let r = store.collect_garbage(&opts, &mut |p| crate::show_progress(&bar, p))?;
    bar.finish_and_clear();
    if !a.dry_run {
        match std::sync::Arc::try_unwrap(store) {
            Ok(s) => s.close()?,
            Err(_) => anyhow::bail!("store still in use at exit"),
        }
    }
    if a.json {
        let v = serde_json::json!({
            "dry_run": r.dry_run,
            "blobs_scanned": r.blobs_scanned,
            "unreferenced_blobs": r.unreferenced_blobs,
            "kept_young": r.kept_young,
            "blobs_freed": r.blobs_freed,
            "bytes_freed": r.bytes_freed,
            "chunks_released": r.chunks_released,
            "chunk_bytes_released": r.chunk_bytes_released,
            "damaged": r.damaged,
            "links_removed": links_removed,
            "untagged_manifests_deleted": untagged_deleted,
            "incomplete": r.incomplete,
            "seconds": r.elapsed.as_secs_f64(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        if let Some(n) = untagged_deleted {
            println!("untagged: deleted {n} manifests");
        } else if a.dry_run && a.delete_untagged_older_than.is_some() {
            println!("untagged: not deleted in a dry run");
        }
        match links_removed {
            Some(n) => println!("links: removed {n} repository links that no manifest names"),
            None if a.dry_run => {
                println!("links: not swept in a dry run (a real run may free more)")
            }
            None => {}
        }
        println!(
            "gc{}: {} blobs scanned, {} unreferenced ({} within the grace period); {} {} blobs ({} bytes); {} chunks ({} stored bytes) left without references, for compaction to reclaim; {:.2}s",
            if r.dry_run { " (dry run)" } else { "" },
            r.blobs_scanned,
            r.unreferenced_blobs,
            r.kept_young,
            if r.dry_run { "would free" } else { "freed" },
            r.blobs_freed,
            r.bytes_freed,
            r.chunks_released,
            r.chunk_bytes_released,
            r.elapsed.as_secs_f64()
        );
    }
    if r.damaged > 0 {
        println!(
            "{} unreferenced blobs were skipped because their index entries are damaged: run orlop fsck",
            r.damaged
        );
    }
    if r.incomplete {
        println!("more candidates than one run holds: run again to go on");
    }
    Ok(if r.damaged > 0 { 1 } else { 0 })
}
