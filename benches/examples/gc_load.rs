//! Garbage collection under a push load: a store of 10,000 blobs, half of
//! them unreferenced, collected and then compacted (as `orlop serve` does,
//! with its default copy bound of 64 MiB/s) while a writer pushes 4 MiB
//! blobs; prints the collection's and the compaction's time and the push
//! throughput during them as a fraction of the throughput without them.
//!
//! `cargo run --workspace --profile dev --example gc_load [-- BLOBS]`

use bytes::Bytes;
use orlop_engine::{CompactOptions, GcOptions, KeySource, Store, StoreConfig};
use rand::{RngCore, SeedableRng};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BLOB_BYTES: usize = 16 << 10;
const PUSH_BYTES: usize = 4 << 20;

fn fail<T>(what: &str) -> impl FnOnce(orlop_engine::Error) -> T + '_ {
    move |e| panic!("{what}: {e}")
}

/// Pushes fresh random 4 MiB blobs until `stop`; counts bytes committed.
fn pusher(store: Arc<Store>, stop: Arc<AtomicBool>, bytes: Arc<AtomicU64>) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let mut buf = vec![0u8; PUSH_BYTES];
    while !stop.load(Ordering::Relaxed) {
        rng.fill_bytes(&mut buf);
        let mut w = store.writer(None).unwrap_or_else(fail("writer"));
        for piece in buf.chunks(1 << 20) {
            w.write(Bytes::copy_from_slice(piece))
                .unwrap_or_else(fail("write"));
        }
        let info = w.commit().unwrap_or_else(fail("commit"));
        store.add_ref(&info.digest).unwrap_or_else(fail("add_ref"));
        bytes.fetch_add(PUSH_BYTES as u64, Ordering::Relaxed);
    }
}

/// Push throughput (MB/s) over `window`, optionally with `during` running.
fn measure(store: &Arc<Store>, window: Duration, during: Option<&dyn Fn()>) -> (f64, Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let bytes = Arc::new(AtomicU64::new(0));
    let h = {
        let (s, st, b) = (store.clone(), stop.clone(), bytes.clone());
        std::thread::spawn(move || pusher(s, st, b))
    };
    // Let the pusher reach speed.
    std::thread::sleep(Duration::from_millis(500));
    let before = bytes.load(Ordering::Relaxed);
    let t = Instant::now();
    match during {
        Some(f) => f(),
        None => std::thread::sleep(window),
    }
    let elapsed = t.elapsed();
    let pushed = bytes.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap_or_else(|_| panic!("pusher panicked"));
    (pushed as f64 / elapsed.as_secs_f64() / 1e6, elapsed)
}

fn main() {
    let blobs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = StoreConfig::new(dir.path());
    cfg.key = KeySource::Bytes([5; 32]);
    // Segments small enough that the stored blobs fill many, so that
    // compaction has sealed segments to empty.
    cfg.segment_bytes = 8 << 20;
    let store = Arc::new(Store::open(cfg).unwrap_or_else(fail("open")));

    let t = Instant::now();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    let mut digests = Vec::with_capacity(blobs);
    let mut buf = vec![0u8; BLOB_BYTES];
    for i in 0..blobs {
        rng.fill_bytes(&mut buf);
        let d = store.put(&buf, None).unwrap_or_else(fail("put")).digest;
        // Every other blob keeps a reference; the rest are garbage.
        if i % 2 == 0 {
            store.add_ref(&d).unwrap_or_else(fail("add_ref"));
        }
        digests.push(d);
        if (i + 1) % 1000 == 0 {
            eprintln!("gc_load: stored {}/{blobs} blobs", i + 1);
        }
    }
    eprintln!(
        "gc_load: {blobs} blobs of {} KiB stored in {:.1}s",
        BLOB_BYTES >> 10,
        t.elapsed().as_secs_f64()
    );

    let (alone, _) = measure(&store, Duration::from_secs(5), None);
    let report = std::sync::Mutex::new(None);
    let gc = || {
        let t = Instant::now();
        let r = store
            .collect_garbage(
                &GcOptions {
                    grace: Duration::ZERO,
                    ..GcOptions::default()
                },
                &mut |_| {},
            )
            .unwrap_or_else(fail("gc"));
        let gc_secs = t.elapsed();
        let c = store
            .compact(
                &CompactOptions {
                    // Half of each segment is garbage, give or take.
                    live_fraction_max: 0.6,
                    copy_bytes_per_sec_max: 64 << 20,
                    segments_max: 1024,
                    ..CompactOptions::default()
                },
                &mut |_| {},
            )
            .unwrap_or_else(fail("compact"));
        *report.lock().unwrap_or_else(|p| p.into_inner()) = Some((r, gc_secs, c));
    };
    let (during, window) = measure(&store, Duration::ZERO, Some(&gc));
    let (r, gc_time, c) = report
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .unwrap_or_else(|| panic!("no report"));
    let v = store.verify().unwrap_or_else(fail("verify"));
    assert!(v.is_clean(), "{:?}", v.problems);
    for (i, d) in digests.iter().enumerate() {
        let present = store.stat(d).unwrap_or_else(fail("stat")).is_some();
        assert_eq!(present, i % 2 == 0, "blob {i}");
    }
    assert!(c.segments_removed > 0, "compaction removed nothing: {c:?}");
    println!("| blobs | garbage | freed | collection | compaction (segments removed, MiB copied, MiB reclaimed) | push MB/s alone | push MB/s during both | ratio |");
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} ({:.1} MiB) | {:.2} s | {:.2} s ({}, {:.1}, {:.1}) | {:.0} | {:.0} | {:.2} |",
        r.blobs_scanned,
        r.unreferenced_blobs,
        r.blobs_freed,
        r.bytes_freed as f64 / (1 << 20) as f64,
        gc_time.as_secs_f64(),
        c.elapsed.as_secs_f64(),
        c.segments_removed,
        c.bytes_moved as f64 / (1 << 20) as f64,
        c.bytes_reclaimed as f64 / (1 << 20) as f64,
        alone,
        during,
        during / alone
    );
    eprintln!("gc_load: window {:.2} s", window.as_secs_f64());
}
