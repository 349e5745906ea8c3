//! `orlop rebuild-index`: recreates a lost or corrupt RocksDB index from the
//! segments alone (the engine's `rebuild_index`), then sets every blob's
//! reference count from the registry's rows, opens the store (recovery seals
//! what a crash left open) and verifies it, with progress and a summary.

use crate::StoreArgs;
use anyhow::{anyhow, Context, Result};
use clap::Args;
use orlop_engine::Store;
use std::sync::Arc;
use std::time::Instant;

#[derive(Args)]
pub struct RebuildArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Move an existing index aside (to index.old-<unix seconds>) first.
    #[arg(long)]
    force: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: RebuildArgs) -> Result<i32> {
    let started = Instant::now();
    let cfg = a.store.config();
    let index_dir = cfg.data_dir.join("index");
    if index_dir.exists() {
        let in_use = index_dir.join("CURRENT").exists();
        if in_use && !a.force {
            anyhow::bail!(
                "{} holds an index: pass --force to move it aside and rebuild",
                index_dir.display()
            );
        }
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let aside = cfg.data_dir.join(format!("index.old-{secs}"));
        std::fs::rename(&index_dir, &aside)
            .with_context(|| format!("moving {} aside", index_dir.display()))?;
        if !a.json {
            println!("moved the old index to {}", aside.display());
        }
    }
    let bar = crate::progress_bar(!a.json, "segments");
    let rep = orlop_engine::rebuild_index(&cfg, &mut |p| crate::show_progress(&bar, p))?;
    bar.finish_and_clear();
    let store = Arc::new(Store::open(cfg).context("opening the rebuilt store")?);
    let reg_err = |e: orlop_server::ApiError| anyhow!("registry: {e}");
    let (registry_fixed, registry_problems) =
        if store.has_column_family(orlop_server::meta::CF_LINKS) {
            let reg = orlop_server::Registry::new(store.clone());
            let fixed = reg.repair_refs().map_err(reg_err)?;
            (fixed, reg.audit_refs().map_err(reg_err)?)
        } else {
            (0, Vec::new())
        };
    let bar = crate::progress_bar(!a.json, "");
    let after = store.verify_with_progress(&mut |p| crate::show_progress(&bar, p))?;
    bar.finish_and_clear();
    let whole = after.is_whole()
        && registry_problems.is_empty()
        && rep.blobs_lost.is_empty()
        && !rep.journal_missing;
    let secs = started.elapsed().as_secs_f64();
    if a.json {
        let v = serde_json::json!({
            "segments": rep.segments,
            "segments_skipped": rep.segments_skipped,
            "records": rep.records,
            "records_damaged": rep.records_damaged,
            "blobs": rep.blobs,
            "chunks": rep.chunks,
            "blobs_lost": rep.blobs_lost.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            "journal_missing": rep.journal_missing,
            "transactions": rep.transactions,
            "transactions_incomplete": rep.transactions_incomplete,
            "row_changes": rep.rows,
            "blob_counts_set": registry_fixed,
            "clean": after.is_clean() && registry_problems.is_empty(),
            "problems": after.problems.iter().map(|p| p.to_string()).chain(registry_problems.iter().cloned()).collect::<Vec<_>>(),
            "seconds": secs,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        if rep.journal_missing {
            println!("WARNING the segments hold chunks but no metadata journal (written before the journal existed): no blob could be rebuilt");
        }
        for d in &rep.blobs_lost {
            println!("LOST blob {d}: a recipe part or chunk is missing from the segments");
        }
        for p in &after.problems {
            println!("PROBLEM {p}");
        }
        for p in &registry_problems {
            println!("PROBLEM registry: {p}");
        }
        println!(
            "rebuilt from {} segments ({} skipped), {} records ({} damaged journal records): {} blobs, {} chunks, {} transactions replayed ({} row changes, {} incomplete), {} blob reference counts set, in {secs:.2}s",
            rep.segments,
            rep.segments_skipped,
            rep.records,
            rep.records_damaged,
            rep.blobs,
            rep.chunks,
            rep.transactions,
            rep.rows,
            rep.transactions_incomplete,
            registry_fixed,
        );
        println!(
            "{}",
            if whole {
                "the rebuilt store is clean".to_string()
            } else {
                format!(
                    "{} blobs lost, {} problems after the rebuild",
                    rep.blobs_lost.len(),
                    after.problems.len() + registry_problems.len()
                )
            }
        );
    }
    Ok(if whole { 0 } else { 1 })
}
