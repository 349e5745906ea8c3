//! Chooses the FastCDC average chunk size by measurement: for each candidate,
//! store a 128 MiB tar and an "upgraded" copy of it (bytes inserted and
//! changed at 64 places, as when a few files in a layer change), then report
//! the bytes stored for the second copy, the chunk count (index size) and the
//! ingest rate.
//!
//! run: cargo run --profile dev --example chunk_size --workspace

use bytes::Bytes;
use orlop_benches::tar_corpus;
use orlop_engine::{ChunkParams, KeySource, Store, StoreConfig};
use std::time::Instant;

fn upgraded(base: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(base.len() + (1 << 20));
    let step = base.len() / 64;
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for (i, part) in base.chunks(step).enumerate() {
        out.extend_from_slice(part);
        // A modified file: a few KiB of new bytes.
        for _ in 0..(1024 + (i * 977) % 8192) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.push(x as u8);
        }
    }
    out
}

fn main() {
    let base = tar_corpus(128 << 20);
    let next = upgraded(&base);
    println!(
        "{:>8} {:>10} {:>14} {:>12} {:>10}",
        "avg KiB", "chunks", "new MiB (v2)", "dedupe v2", "MB/s"
    );
    for avg_kib in [16u32, 32, 64, 128, 256] {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut cfg = StoreConfig::new(dir.path());
        cfg.key = KeySource::Bytes([1; 32]);
        cfg.chunk = ChunkParams {
            min_bytes: avg_kib * 256,
            avg_bytes: avg_kib * 1024,
            max_bytes: avg_kib * 4096,
        };
        let store = Store::open(cfg).unwrap_or_else(|e| panic!("{e}"));
        let t = Instant::now();
        store.put(&base, None).unwrap_or_else(|e| panic!("{e}"));
        let secs = t.elapsed().as_secs_f64();
        let before = store.stats().unwrap_or_else(|e| panic!("{e}"));
        let mut w = store.writer(None).unwrap_or_else(|e| panic!("{e}"));
        w.write(Bytes::from(next.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        w.commit().unwrap_or_else(|e| panic!("{e}"));
        let after = store.stats().unwrap_or_else(|e| panic!("{e}"));
        let new_bytes = after.unique_bytes - before.unique_bytes;
        println!(
            "{:>8} {:>10} {:>14.2} {:>12.1} {:>10.0}",
            avg_kib,
            after.chunks,
            new_bytes as f64 / (1 << 20) as f64,
            next.len() as f64 / new_bytes.max(1) as f64,
            base.len() as f64 / secs / 1e6
        );
    }
}
