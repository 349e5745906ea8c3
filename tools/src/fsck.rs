//! `orlop fsck`: runs the engine's verify() with a progress bar and a summary.

use crate::StoreArgs;
use anyhow::Result;
use clap::Args;
use orlop_engine::{Problem, Store};
use std::time::Instant;

#[derive(Args)]
pub struct FsckArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Repair what can be repaired (on a stopped store): quarantine damaged
    /// chunks, mark the blobs that use them broken, set every reference
    /// count to its recount, and name the repositories, manifests and tags
    /// each broken blob takes with it.
    #[arg(long)]
    repair: bool,
    /// With --repair: report what would be done, change nothing.
    #[arg(long, requires = "repair")]
    dry_run: bool,
}

fn problem_json(p: &Problem) -> serde_json::Value {
    let (kind, mut v) = match p {
        Problem::BlobUnreadable { digest, error } => (
            "blob_unreadable",
            serde_json::json!({"digest": digest.to_string(), "error": error}),
        ),
        Problem::BlobDigestMismatch { digest, actual } => (
            "blob_digest_mismatch",
            serde_json::json!({"digest": digest.to_string(), "actual": actual.to_string()}),
        ),
        Problem::BlobSizeMismatch {
            digest,
            recorded,
            actual,
        } => (
            "blob_size_mismatch",
            serde_json::json!({"digest": digest.to_string(), "recorded": recorded, "actual": actual}),
        ),
        Problem::DanglingChunk { digest, chunk } => (
            "dangling_chunk",
            serde_json::json!({"digest": digest.to_string(), "chunk": hex::encode(chunk.0)}),
        ),
        Problem::ChunkCorrupt { chunk, error } => (
            "chunk_corrupt",
            serde_json::json!({"chunk": hex::encode(chunk.0), "error": error}),
        ),
        Problem::RefcountMismatch {
            chunk,
            recorded,
            actual,
        } => (
            "refcount_mismatch",
            serde_json::json!({"chunk": hex::encode(chunk.0), "recorded": recorded, "actual": actual}),
        ),
        Problem::ChunkMissing {
            chunk,
            references,
            raw_len,
        } => (
            "chunk_missing",
            serde_json::json!({"chunk": hex::encode(chunk.0), "references": references, "raw_len": raw_len}),
        ),
        Problem::SegmentDamaged { segment, detail } => (
            "segment_damaged",
            serde_json::json!({"segment": segment.to_string(), "detail": detail}),
        ),
        Problem::JournalIncomplete { detail } => {
            ("journal_incomplete", serde_json::json!({"detail": detail}))
        }
        Problem::IndexCorrupt { detail } => {
            ("index_corrupt", serde_json::json!({"detail": detail}))
        }
    };
    v["kind"] = kind.into();
    v["message"] = p.to_string().into();
    v
}

pub fn run(a: FsckArgs) -> Result<i32> {
    let mut cfg = a.store.config();
    cfg.read_only = !a.repair || a.dry_run;
    let store = std::sync::Arc::new(Store::open(cfg)?);
    if a.repair {
        return crate::repair::run(store, a.dry_run, a.json);
    }
    let started = Instant::now();
    let bar = crate::progress_bar(!a.json, "");
    let report = store.verify_with_progress(&mut |p| crate::show_progress(&bar, p))?;
    bar.finish_and_clear();
    // A registry's store: its rows must account for every blob reference.
    let registry_problems = if store.has_column_family(orlop_server::meta::CF_LINKS) {
        orlop_server::Registry::new(store.clone())
            .audit_refs()
            .map_err(|e| anyhow::anyhow!("auditing registry references: {e}"))?
    } else {
        Vec::new()
    };
    let clean = report.is_clean() && registry_problems.is_empty();
    let whole = clean && report.broken_blobs.is_empty();
    let secs = started.elapsed().as_secs_f64();
    if a.json {
        let v = serde_json::json!({
            "clean": clean,
            "whole": whole,
            "registry_problems": registry_problems,
            "blobs": report.blobs,
            "chunks": report.chunks,
            "segments": report.segments,
            "bytes_verified": report.bytes_verified,
            "unreferenced_blobs": report.unreferenced_blobs,
            "unreferenced_chunks": report.unreferenced_chunks,
            "unreferenced_chunk_bytes": report.unreferenced_chunk_bytes,
            "dead_records": report.dead_records,
            "dead_record_bytes": report.dead_record_bytes,
            "pending_writes": report.pending_writes,
            "quarantined_chunks": report.quarantined_chunks,
            "broken_blobs": report.broken_blobs.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            "problems": report.problems.iter().map(problem_json).collect::<Vec<_>>(),
            "seconds": secs,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for p in &report.problems {
            println!("PROBLEM {p}");
        }
        for p in &registry_problems {
            println!("PROBLEM registry: {p}");
        }
        for d in &report.broken_blobs {
            println!("BROKEN blob {d}: names quarantined chunks (push it again to restore it)");
        }
        println!(
            "fsck: {} blobs, {} chunks, {} segments, {:.1} MiB verified in {:.2}s",
            report.blobs,
            report.chunks,
            report.segments,
            report.bytes_verified as f64 / (1 << 20) as f64,
            secs
        );
        println!(
            "reclaimable: {} unreferenced blobs, {} unreferenced chunks ({} bytes), {} dead records ({} bytes); {} uncommitted writes",
            report.unreferenced_blobs,
            report.unreferenced_chunks,
            report.unreferenced_chunk_bytes,
            report.dead_records,
            report.dead_record_bytes,
            report.pending_writes
        );
        println!(
            "{}",
            if whole {
                "store is clean".to_string()
            } else if clean {
                format!(
                    "consistent, but {} broken blobs ({} quarantined chunks)",
                    report.broken_blobs.len(),
                    report.quarantined_chunks
                )
            } else {
                format!(
                    "{} problems found",
                    report.problems.len() + registry_problems.len()
                )
            }
        );
    }
    Ok(if whole { 0 } else { 1 })
}
