//! `orlop stats`: space accounting.

use crate::StoreArgs;
use anyhow::Result;
use clap::Args;
use orlop_engine::Store;

#[derive(Args)]
pub struct StatsArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[arg(long)]
    json: bool,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

pub fn run(a: StatsArgs) -> Result<i32> {
    let mut cfg = a.store.config();
    cfg.read_only = true;
    let s = Store::open(cfg)?.stats()?;
    if a.json {
        let v = serde_json::json!({
            "blobs": s.blobs,
            "unreferenced_blobs": s.unreferenced_blobs,
            "chunks": s.chunks,
            "compressed_chunks": s.compressed_chunks,
            "logical_bytes": s.logical_bytes,
            "unique_bytes": s.unique_bytes,
            "stored_bytes": s.stored_bytes,
            "segment_bytes": s.segment_bytes(),
            "dedupe_ratio": s.dedupe_ratio(),
            "compression_ratio": s.compression_ratio(),
            "segments": s.segments.iter().map(|g| serde_json::json!({
                "id": g.id.to_string(), "sealed": g.sealed, "data_bytes": g.data_bytes,
                "live_bytes": g.live_bytes, "live_ratio": g.live_ratio(),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!(
        "blobs              {} ({} unreferenced)",
        s.blobs, s.unreferenced_blobs
    );
    println!(
        "chunks             {} ({} compressed)",
        s.chunks, s.compressed_chunks
    );
    println!("logical bytes      {:.1} MiB", mib(s.logical_bytes));
    println!("unique bytes       {:.1} MiB", mib(s.unique_bytes));
    println!("stored bytes       {:.1} MiB", mib(s.stored_bytes));
    println!("dedupe ratio       {:.2}", s.dedupe_ratio());
    println!("compression ratio  {:.2}", s.compression_ratio());
    println!(
        "segments           {} ({:.1} MiB written)",
        s.segments.len(),
        mib(s.segment_bytes())
    );
    for g in &s.segments {
        println!(
            "  {} {:>7} {:>10.1} MiB  live {:>5.1}%",
            g.id,
            if g.sealed { "sealed" } else { "active" },
            mib(g.data_bytes),
            g.live_ratio() * 100.0
        );
    }
    Ok(0)
}
