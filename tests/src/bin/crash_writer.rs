//! Child process of the crash test: writes blobs forever, printing one line per
//! acknowledged operation, until the parent kills it with SIGKILL. Beside the
//! writer, garbage collection (grace 1 s: blobs left without a reference)
//! and compaction run back to back, so that kills land inside both.
//!
//! usage: crash_writer <data-dir> <seed> <first-index>

use orlop_engine::{CompactOptions, Digest, GcOptions, Store};
use orlop_tests::{blob_content, crash_store_config};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: crash_writer <data-dir> <seed> <first-index>");
        std::process::exit(2);
    }
    let seed: u64 = args[2].parse().unwrap_or_else(|e| panic!("seed: {e}"));
    let first: u64 = args[3].parse().unwrap_or_else(|e| panic!("index: {e}"));
    let store = Arc::new(
        Store::open(crash_store_config(std::path::Path::new(&args[1])))
            .unwrap_or_else(|e| panic!("open: {e}")),
    );
    let reclaim = store.clone();
    std::thread::spawn(move || loop {
        let gc = GcOptions {
            grace: Duration::from_secs(1),
            ..GcOptions::default()
        };
        reclaim
            .collect_garbage(&gc, &mut |_| {})
            .unwrap_or_else(|e| panic!("gc: {e}"));
        reclaim
            .compact(&CompactOptions::default(), &mut |_| {})
            .unwrap_or_else(|e| panic!("compact: {e}"));
        std::thread::sleep(Duration::from_millis(20));
    });
    let mut out = std::io::stdout().lock();
    for i in first..first + 100_000 {
        let data = blob_content(seed, i);
        let info = store
            .put(&data, Some(Digest::sha256_of(&data)))
            .unwrap_or_else(|e| panic!("put: {e}"));
        writeln!(out, "PUT {i} {}", info.digest)
            .and_then(|_| out.flush())
            .unwrap_or_else(|e| panic!("{e}"));
        if i % 3 == 0 {
            let n = store
                .add_ref(&info.digest)
                .unwrap_or_else(|e| panic!("ref: {e}"));
            writeln!(out, "REF {} {n}", info.digest)
                .and_then(|_| out.flush())
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
}
