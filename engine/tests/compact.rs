//! Compaction: space of collected blobs comes back, live data never moves
//! out from under readers, writers or held writes.

mod common;

use common::*;
use orlop_engine::{CompactOptions, Digest, GcOptions, Store};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn segment_files_bytes(dir: &Path) -> (usize, u64) {
    let mut n = 0;
    let mut bytes = 0;
    for e in std::fs::read_dir(dir.join("segments")).unwrap_or_else(|e| panic!("{e}")) {
        let e = e.unwrap_or_else(|e| panic!("{e}"));
        n += 1;
        // Allocated blocks, not the (sparse) file length.
        bytes +=
            std::os::unix::fs::MetadataExt::blocks(&e.metadata().unwrap_or_else(|e| panic!("{e}")))
                * 512;
    }
    (n, bytes)
}

fn gc_now(s: &Store) {
    let opts = GcOptions {
        grace: Duration::ZERO,
        ..GcOptions::default()
    };
    s.collect_garbage(&opts, &mut |_| {})
        .unwrap_or_else(|e| panic!("gc: {e}"));
}

fn compact_all(s: &Store) -> orlop_engine::CompactReport {
    let opts = CompactOptions {
        live_fraction_max: 0.75,
        ..CompactOptions::default()
    };
    s.compact(&opts, &mut |_| {})
        .unwrap_or_else(|e| panic!("compact: {e}"))
}

#[test]
fn compaction_returns_the_space_of_collected_blobs() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = small_config(dir.path());
    let s = open(&cfg);
    let mut kept = Vec::new();
    let mut dropped = Vec::new();
    for i in 0..60u64 {
        let data = noise(i, 12_000);
        let info = s.put(&data, None).unwrap_or_else(|e| panic!("{e}"));
        if i % 3 == 0 {
            s.add_ref(&info.digest).unwrap_or_else(|e| panic!("{e}"));
            kept.push((info.digest, data));
        } else {
            dropped.push(info.digest);
        }
    }
    let dry = s
        .compact(
            &CompactOptions {
                dry_run: true,
                ..CompactOptions::default()
            },
            &mut |_| {},
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(dry.segments_removed, 0);
    gc_now(&s);
    let unref_before = s
        .verify()
        .unwrap_or_else(|e| panic!("{e}"))
        .unreferenced_chunks;
    let (files_before, bytes_before) = segment_files_bytes(dir.path());
    let r = compact_all(&s);
    assert!(r.segments_removed > 0, "{r:?}");
    assert!(r.chunks_dropped > 0, "{r:?}");
    assert_eq!(r.segments_kept, 0, "{r:?}");
    let (files_after, bytes_after) = segment_files_bytes(dir.path());
    assert!(
        files_after < files_before,
        "{files_before} -> {files_after}"
    );
    // About two thirds of the data was garbage.
    assert!(
        bytes_after * 10 < bytes_before * 7,
        "{bytes_before} -> {bytes_after} bytes"
    );
    for (d, data) in &kept {
        assert!(s.get(d).unwrap_or_else(|e| panic!("{d}: {e}")) == *data);
    }
    for d in &dropped {
        assert!(s.stat(d).unwrap_or_else(|e| panic!("{e}")).is_none());
    }
    assert_clean(&s);
    let rep = s.verify().unwrap_or_else(|e| panic!("{e}"));
    // What is left without references lies in segments still mostly live
    // (or the active one).
    assert!(
        rep.unreferenced_chunks * 4 < unref_before,
        "{unref_before} -> {rep:?}"
    );
    // The same content stored again after its chunks were dropped.
    let again = noise(1, 12_000);
    let info = s.put(&again, None).unwrap_or_else(|e| panic!("{e}"));
    assert!(s.get(&info.digest).unwrap_or_else(|e| panic!("{e}")) == again);
    drop(s);
    let s = open(&cfg);
    assert_clean(&s);
    for (d, data) in &kept {
        assert!(s.get(d).unwrap_or_else(|e| panic!("{d}: {e}")) == *data);
    }
}

#[test]
fn a_held_write_keeps_the_chunks_it_names() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = small_config(dir.path());
    let s = open(&cfg);
    let base = noise(7, 40_000);
    let first = s.put(&base, None).unwrap_or_else(|e| panic!("{e}"));
    // A resumable upload of the same bytes deduplicates against them.
    let mut w = s.writer(None).unwrap_or_else(|e| panic!("{e}"));
    w.write(bytes::Bytes::from(base.clone()))
        .unwrap_or_else(|e| panic!("{e}"));
    w.checkpoint(b"upload").unwrap_or_else(|e| panic!("{e}"));
    let recipe = w.recipe();
    w.detach();
    // Fill a few segments so the first one is sealed, then drop everything.
    for i in 0..8 {
        s.put(&noise(100 + i, 20_000), None)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    gc_now(&s);
    assert!(s
        .stat(&first.digest)
        .unwrap_or_else(|e| panic!("{e}"))
        .is_none());
    let r = compact_all(&s);
    assert!(r.segments_removed > 0, "{r:?}");
    drop(s);
    let s = open(&cfg);
    let mut w = s
        .resume_writer(recipe)
        .unwrap_or_else(|e| panic!("resume: {e}"));
    w.write(bytes::Bytes::from_static(b"tail"))
        .unwrap_or_else(|e| panic!("{e}"));
    let info = w.commit().unwrap_or_else(|e| panic!("commit: {e}"));
    let mut want = base.clone();
    want.extend_from_slice(b"tail");
    assert_eq!(info.digest, Digest::sha256_of(&want));
    assert!(s.get(&info.digest).unwrap_or_else(|e| panic!("{e}")) == want);
    assert_clean(&s);
}

/// Writers re-store content of collected blobs while collection and
/// compaction run flat out and readers read what is referenced.
#[test]
fn compaction_beside_writers_readers_and_the_collector() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = small_config(dir.path());
    let s = Arc::new(open(&cfg));
    let stop = Arc::new(AtomicBool::new(false));
    let reclaimer = {
        let (s, stop) = (s.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut runs = (0u64, 0u64);
            // Flat out while the writers run; after they stop, on until a
            // run has removed a segment (a loaded machine may finish the
            // writers before one could), within a bound.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while !(stop.load(Ordering::Relaxed) && runs.1 > 0)
                && std::time::Instant::now() < deadline
            {
                let g = GcOptions {
                    grace: Duration::from_millis(200),
                    ..GcOptions::default()
                };
                s.collect_garbage(&g, &mut |_| {})
                    .unwrap_or_else(|e| panic!("gc: {e}"));
                let r = compact_all(&s);
                runs.0 += 1;
                runs.1 += r.segments_removed;
            }
            runs
        })
    };
    let writers: Vec<_> = (0..3u64)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut kept: Vec<(Digest, Vec<u8>)> = Vec::new();
                for i in 0..120u64 {
                    // Content drawn from a small pool: later writes reuse
                    // the chunks of blobs collected meanwhile.
                    let mut data = noise(i % 10, 6_000);
                    data.extend_from_slice(&noise(1000 + (i * 7 + t) % 13, 6_000));
                    let info = s.put(&data, None).unwrap_or_else(|e| panic!("put: {e}"));
                    if i % 4 == t % 4 {
                        s.add_ref(&info.digest)
                            .unwrap_or_else(|e| panic!("ref: {e}"));
                        kept.push((info.digest, data));
                    }
                    if let Some((d, want)) = kept.get(i as usize % kept.len().max(1)) {
                        let got = s.get(d).unwrap_or_else(|e| panic!("read {d}: {e}"));
                        assert!(got == *want, "blob {d} differs");
                    }
                }
                kept
            })
        })
        .collect();
    let mut kept = Vec::new();
    for w in writers {
        kept.extend(w.join().unwrap_or_else(|_| panic!("writer")));
    }
    stop.store(true, Ordering::Relaxed);
    let (runs, removed) = reclaimer.join().unwrap_or_else(|_| panic!("reclaimer"));
    eprintln!("{runs} gc+compaction runs removed {removed} segments");
    assert!(removed > 0, "compaction must have removed segments");
    for (d, want) in &kept {
        assert!(s.get(d).unwrap_or_else(|e| panic!("{d}: {e}")) == *want);
    }
    assert_clean(&s);
}
