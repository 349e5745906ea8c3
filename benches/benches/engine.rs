//! Engine throughput on 256 MiB of realistic data, beside the raw single-core
//! SHA-256 rate of the same bytes (the one step that cannot be parallelised
//! within a blob). Prints the ratios the engine's targets are stated in.

use bytes::Bytes;
use criterion::{criterion_group, BatchSize, Criterion, SamplingMode, Throughput};
use orlop_benches::{gzip_corpus, tar_corpus};
use orlop_engine::{Digest, KeySource, Store, StoreConfig};
use sha2::Digest as _;
use std::time::Duration;

const CORPUS_BYTES: usize = 256 << 20;
const PIECE_BYTES: usize = 1 << 20;

fn config(dir: &std::path::Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.key = KeySource::Bytes([3; 32]);
    c
}

fn ingest(store: &Store, data: &Bytes) -> Digest {
    let mut w = store.writer(None).unwrap_or_else(|e| panic!("{e}"));
    let mut off = 0;
    while off < data.len() {
        let end = (off + PIECE_BYTES).min(data.len());
        w.write(data.slice(off..end))
            .unwrap_or_else(|e| panic!("{e}"));
        off = end;
    }
    w.commit().unwrap_or_else(|e| panic!("{e}")).digest
}

fn benches(c: &mut Criterion) {
    let corpora = [
        ("gzip", Bytes::from(gzip_corpus(CORPUS_BYTES))),
        ("tar", Bytes::from(tar_corpus(CORPUS_BYTES))),
    ];
    let mut g = c.benchmark_group("engine");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .warm_up_time(Duration::from_secs(1));
    for (name, data) in &corpora {
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_function(format!("sha256/{name}"), |b| {
            b.iter(|| sha2::Sha256::digest(data))
        });
        g.bench_function(format!("ingest/{name}"), |b| {
            b.iter_batched(
                || {
                    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
                    let store = Store::open(config(dir.path())).unwrap_or_else(|e| panic!("{e}"));
                    (dir, store)
                },
                |(dir, store)| {
                    ingest(&store, data);
                    (dir, store)
                },
                BatchSize::PerIteration,
            )
        });
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = Store::open(config(dir.path())).unwrap_or_else(|e| panic!("{e}"));
        let digest = ingest(&store, data);
        g.bench_function(format!("read/{name}"), |b| {
            b.iter(|| {
                let mut r = store.reader(&digest).unwrap_or_else(|e| panic!("{e}"));
                let mut n = 0;
                while let Some(p) = r.next_piece().unwrap_or_else(|e| panic!("{e}")) {
                    n += p.len();
                }
                assert_eq!(n, data.len());
            })
        });
        let st = store.stats().unwrap_or_else(|e| panic!("{e}"));
        println!(
            "corpus {name}: {} chunks (avg {} KiB), compression ratio {:.2}, {} of {} chunks compressed",
            st.chunks,
            st.unique_bytes / st.chunks.max(1) / 1024,
            st.compression_ratio(),
            st.compressed_chunks,
            st.chunks
        );
    }
    g.finish();
}

/// Mean time of one criterion benchmark, from its saved estimates.
fn mean_ns(id: &str) -> Option<f64> {
    let base = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "target".into());
    let candidates = [
        base.join("criterion"),
        std::path::PathBuf::from("../target/criterion"),
    ];
    candidates.iter().find_map(|root| {
        let text = std::fs::read_to_string(
            root.join("engine")
                .join(id.replace('/', "_"))
                .join("new/estimates.json"),
        )
        .ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v["mean"]["point_estimate"].as_f64()
    })
}

fn report() {
    let gbps = |id: &str| mean_ns(id).map(|ns| CORPUS_BYTES as f64 / ns);
    println!("\nthroughput ratios (each / single-core SHA-256 of the same bytes):");
    println!(
        "{:<14} {:>10} {:>10} {:>8} {:>8}",
        "benchmark", "GB/s", "sha GB/s", "ratio", "target"
    );
    for (id, sha, target) in [
        ("ingest/gzip", "sha256/gzip", 0.7),
        ("ingest/tar", "sha256/tar", 0.25),
        ("read/gzip", "sha256/gzip", 1.5),
        ("read/tar", "sha256/tar", 1.5),
    ] {
        match (gbps(id), gbps(sha)) {
            (Some(x), Some(s)) => println!(
                "{id:<14} {x:>10.2} {s:>10.2} {:>8.2} {target:>8.2} {}",
                x / s,
                if x / s >= target { "ok" } else { "MISSED" }
            ),
            _ => println!("{id:<14} (no estimate: run without a filter)"),
        }
    }
}

criterion_group!(engine, benches);

fn main() {
    engine();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
    report();
}
