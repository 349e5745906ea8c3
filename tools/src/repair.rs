//! `orlop fsck --repair`: the engine's repair (quarantine, counts, broken
//! marks), the registry's reference recount, a report of every repository,
//! manifest and tag a damaged blob takes with it, and a verify afterwards.

use anyhow::{anyhow, Result};
use orlop_engine::{RepairReport, Store};
use orlop_server::meta::BlobUse;
use orlop_server::Registry;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

fn use_json(u: &BlobUse) -> serde_json::Value {
    serde_json::json!({
        "repositories": u.repos,
        "manifests": u.manifests.iter().map(|(r, d)| format!("{r}@{d}")).collect::<Vec<_>>(),
        "tags": u.tags.iter().map(|(r, t)| format!("{r}:{t}")).collect::<Vec<_>>(),
    })
}

fn print_text(rep: &RepairReport, refs_fixed: u64, uses: &BTreeMap<orlop_engine::Digest, BlobUse>) {
    for p in &rep.before.problems {
        println!("FOUND {p}");
    }
    for q in &rep.quarantined {
        let at = match q.segment {
            Some(s) => format!("segment {s} offset {}", q.offset),
            None => "no record".to_string(),
        };
        println!(
            "QUARANTINED chunk {} ({at}, {} references): {}",
            q.chunk, q.references, q.reason
        );
    }
    for b in &rep.broken {
        println!(
            "BROKEN blob {} ({} chunk references quarantined)",
            b.digest, b.chunks
        );
        if let Some(u) = uses.get(&b.digest) {
            for r in &u.repos {
                println!("  repository {r}");
            }
            for (r, d) in &u.manifests {
                println!("  manifest {r}@{d}");
            }
            for (r, t) in &u.tags {
                println!("  tag {r}:{t}");
            }
        }
    }
    for p in &rep.unrepaired {
        println!("NOT REPAIRED {p}");
    }
    println!(
        "repair{}: {} chunks quarantined, {} damaged unreferenced chunks dropped, {} chunk counts and {} blob counts set to the recount, {} broken blobs ({} restored since an earlier repair) in {:.2}s",
        if rep.dry_run { " (dry run)" } else { "" },
        rep.quarantined.len(),
        rep.damaged_dropped,
        rep.counts_fixed,
        refs_fixed,
        rep.broken.len(),
        rep.restored,
        rep.elapsed.as_secs_f64()
    );
    if !rep.broken.is_empty() {
        println!("broken blobs fail to pull with a clear error; push them again (same content) to restore them, or delete what uses them");
    }
}

/// Runs the repair; the exit code is 0 only when the store is clean and
/// whole afterwards.
pub fn run(store: Arc<Store>, dry_run: bool, json: bool) -> Result<i32> {
    let started = Instant::now();
    let bar = crate::progress_bar(!json, "");
    let rep = store.repair(dry_run, &mut |p| crate::show_progress(&bar, p))?;
    bar.finish_and_clear();
    let registry = store
        .has_column_family(orlop_server::meta::CF_LINKS)
        .then(|| Registry::new(store.clone()));
    let reg_err = |e: orlop_server::ApiError| anyhow!("registry: {e}");
    let mut refs_fixed = 0;
    let mut uses = BTreeMap::new();
    if let Some(reg) = &registry {
        if dry_run {
            refs_fixed = reg.audit_refs().map_err(reg_err)?.len() as u64;
        } else {
            refs_fixed = reg.repair_refs().map_err(reg_err)?;
        }
        let broken: Vec<_> = rep.broken.iter().map(|b| b.digest.clone()).collect();
        uses = reg.damage_report(&broken).map_err(reg_err)?;
    }
    // Leaked chunks (counts that were too high, now zero) and orphan
    // records are reclaimed as compaction always does.
    let compacted = if dry_run {
        None
    } else {
        let bar = crate::progress_bar(!json, "segments");
        let c = store.compact(&orlop_engine::CompactOptions::default(), &mut |p| {
            crate::show_progress(&bar, p)
        })?;
        bar.finish_and_clear();
        Some(c)
    };
    // Proof: the store as the repair left it.
    let bar = crate::progress_bar(!json, "");
    let after = store.verify_with_progress(&mut |p| crate::show_progress(&bar, p))?;
    bar.finish_and_clear();
    let registry_after = match &registry {
        Some(reg) => reg.audit_refs().map_err(reg_err)?,
        None => Vec::new(),
    };
    let whole = after.is_whole() && registry_after.is_empty();
    if json {
        let v = serde_json::json!({
            "dry_run": dry_run,
            "found": rep.before.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            "quarantined": rep.quarantined.iter().map(|q| serde_json::json!({
                "chunk": q.chunk.to_string(),
                "segment": q.segment.map(|s| s.to_string()),
                "offset": q.offset,
                "references": q.references,
                "reason": q.reason,
            })).collect::<Vec<_>>(),
            "damaged_dropped": rep.damaged_dropped,
            "chunk_counts_fixed": rep.counts_fixed,
            "blob_counts_fixed": refs_fixed,
            "broken": rep.broken.iter().map(|b| {
                let mut v = uses.get(&b.digest).map(use_json).unwrap_or_default();
                v["digest"] = b.digest.to_string().into();
                v["chunks"] = b.chunks.into();
                v
            }).collect::<Vec<_>>(),
            "restored": rep.restored,
            "segments_rewritten": rep.segments_rewritten,
            "rejournaled_blobs": rep.rejournaled_blobs,
            "rejournaled_rows": rep.rejournaled_rows,
            "compacted_segments": compacted.as_ref().map_or(0, |c| c.segments_removed),
            "reclaimed_bytes": compacted.as_ref().map_or(0, |c| c.bytes_reclaimed),
            "not_repaired": rep.unrepaired.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            "after": {
                "clean": after.is_clean() && registry_after.is_empty(),
                "problems": after.problems.iter().map(|p| p.to_string()).chain(registry_after.iter().cloned()).collect::<Vec<_>>(),
                "broken_blobs": after.broken_blobs.len(),
            },
            "seconds": started.elapsed().as_secs_f64(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_text(&rep, refs_fixed, &uses);
        println!(
            "{} damaged segments rewritten, journal records written again for {} blobs and {} rows",
            rep.segments_rewritten, rep.rejournaled_blobs, rep.rejournaled_rows
        );
        if let Some(c) = &compacted {
            println!(
                "compaction: {} segments removed, {} bytes reclaimed",
                c.segments_removed, c.bytes_reclaimed
            );
        }
        for p in after
            .problems
            .iter()
            .map(|p| p.to_string())
            .chain(registry_after)
        {
            println!("STILL {p}");
        }
        println!(
            "after repair: {} ({} broken blobs)",
            if after.is_clean() {
                "consistent"
            } else {
                "problems remain"
            },
            after.broken_blobs.len()
        );
    }
    Ok(if whole { 0 } else { 1 })
}
