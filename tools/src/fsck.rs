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
        Problem::SegmentDamaged { segment, detail } => (
            "segment_damaged",
            serde_json::json!({"segment": segment.to_string(), "detail": detail}),
        ),
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
    cfg.read_only = true;
    let store = std::sync::Arc::new(Store::open(cfg)?);
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
    let secs = started.elapsed().as_secs_f64();
    if a.json {
        let v = serde_json::json!({
            "clean": clean,
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
            if clean {
                "store is clean".to_string()
            } else {
                format!(
                    "{} problems found",
                    report.problems.len() + registry_problems.len()
                )
            }
        );
    }
    Ok(if clean { 0 } else { 1 })
}
