//! Garbage collection of unreferenced blobs: what it frees, what it keeps,
//! and that it is exact while writers run beside it.

mod common;
use common::*;
use orlop_engine::{Digest, Error, GcOptions, GcReport, Store};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn gc(s: &Store, grace_secs: u64, dry_run: bool) -> GcReport {
    s.collect_garbage(
        &GcOptions {
            grace: Duration::from_secs(grace_secs),
            dry_run,
            ..GcOptions::default()
        },
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("gc: {e}"))
}

fn put(s: &Store, data: &[u8]) -> Digest {
    s.put(data, None)
        .unwrap_or_else(|e| panic!("put: {e}"))
        .digest
}

#[test]
fn collects_unreferenced_blobs_and_keeps_shared_chunks() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = small_config(dir.path());
    let s = open(&cfg);
    let shared = noise(1, 200_000);
    let a_data = [shared.clone(), noise(2, 100_000)].concat();
    let b_data = [shared, noise(3, 100_000)].concat();
    let (a, b) = (put(&s, &a_data), put(&s, &b_data));
    s.add_ref(&a).unwrap_or_else(|e| panic!("{e}"));
    s.add_ref(&b).unwrap_or_else(|e| panic!("{e}"));

    // Everything is referenced: nothing to do.
    let r = gc(&s, 0, false);
    assert_eq!((r.blobs_scanned, r.blobs_freed), (2, 0));

    s.drop_ref(&a).unwrap_or_else(|e| panic!("{e}"));
    // Within the grace period: kept.
    let r = gc(&s, 3600, false);
    assert_eq!(
        (r.unreferenced_blobs, r.kept_young, r.blobs_freed),
        (1, 1, 0)
    );
    assert!(s.stat(&a).unwrap_or_else(|e| panic!("{e}")).is_some());

    let before = s.stats().unwrap_or_else(|e| panic!("{e}"));
    let dry = gc(&s, 0, true);
    assert_eq!((dry.blobs_freed, dry.bytes_freed), (1, a_data.len() as u64));
    assert!(
        s.stat(&a).unwrap_or_else(|e| panic!("{e}")).is_some(),
        "a dry run changes nothing"
    );
    let r = gc(&s, 0, false);
    assert_eq!(
        (
            r.blobs_freed,
            r.bytes_freed,
            r.chunks_released,
            r.chunk_bytes_released
        ),
        (
            dry.blobs_freed,
            dry.bytes_freed,
            dry.chunks_released,
            dry.chunk_bytes_released
        ),
        "the dry run predicts the run"
    );
    // a's own 100 KB are several chunks; the shared part stays with b.
    assert!(r.chunks_released >= 3, "{r:?}");
    assert!(r.chunk_bytes_released < a_data.len() as u64, "{r:?}");
    assert!(s.stat(&a).unwrap_or_else(|e| panic!("{e}")).is_none());
    assert!(matches!(s.get(&a), Err(Error::BlobUnknown(_))));
    assert_eq!(s.get(&b).unwrap_or_else(|e| panic!("{e}")), b_data);
    let after = s.stats().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(after.blobs, before.blobs - 1);
    let v = s.verify().unwrap_or_else(|e| panic!("{e}"));
    assert!(v.is_clean(), "{:#?}", v.problems);
    assert_eq!(v.unreferenced_chunks, r.chunks_released);

    // Written again: its released chunks are reused, not stored again.
    let stored = after.unique_bytes;
    assert_eq!(put(&s, &a_data), a);
    assert_eq!(s.get(&a).unwrap_or_else(|e| panic!("{e}")), a_data);
    assert_eq!(
        s.stats().unwrap_or_else(|e| panic!("{e}")).unique_bytes,
        stored
    );
    assert_clean(&s);
    drop(s);
    let s = open(&cfg);
    assert_eq!(s.get(&a).unwrap_or_else(|e| panic!("{e}")), a_data);
    assert_eq!(s.get(&b).unwrap_or_else(|e| panic!("{e}")), b_data);
    assert_clean(&s);
}

#[test]
fn a_blob_written_again_is_renewed() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = open(&small_config(dir.path()));
    let data = noise(9, 50_000);
    let d = put(&s, &data);
    let created = |s: &Store| {
        s.stat(&d)
            .unwrap_or_else(|e| panic!("{e}"))
            .map(|i| i.created_unix_ms)
            .unwrap_or_default()
    };
    let first = created(&s);
    std::thread::sleep(Duration::from_millis(20));
    put(&s, &data);
    let second = created(&s);
    assert!(second > first, "{first} -> {second}");
    // Also while referenced: the reference may go before the writer's
    // caller takes its own, and the grace period must cover that gap.
    s.add_ref(&d).unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_millis(20));
    put(&s, &data);
    assert!(created(&s) > second);
    s.drop_ref(&d).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(gc(&s, 3600, false).kept_young, 1);
    assert_clean(&s);
}

/// Writers re-use content of blobs that lose their last reference while a
/// collector runs flat out (grace 0, the harshest setting). A blob that holds
/// a reference always reads back; counts stay exact.
#[test]
fn collector_running_beside_writers_keeps_counts_exact() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = small_config(dir.path());
    let s = Arc::new(open(&cfg));
    let contents: Vec<Vec<u8>> = (0..6)
        .map(|i| [noise(100, 60_000), noise(200 + i, 30_000)].concat())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let collector = {
        let (s, stop) = (s.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut freed = 0;
            while !stop.load(Ordering::SeqCst) {
                freed += gc(&s, 0, false).blobs_freed;
            }
            freed
        })
    };
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let (s, contents) = (s.clone(), contents.clone());
            std::thread::spawn(move || {
                let mut raced = 0;
                for round in 0..60 {
                    let data = &contents[(w * 7 + round) % contents.len()];
                    let d = put(&s, data);
                    // With no grace period the collector may take the blob
                    // between its commit and the first reference: the
                    // reference is then refused, never dangling.
                    match s.add_ref(&d) {
                        Ok(_) => {}
                        Err(Error::BlobUnknown(_)) => {
                            raced += 1;
                            continue;
                        }
                        Err(e) => panic!("add_ref: {e}"),
                    }
                    assert_eq!(&s.get(&d).unwrap_or_else(|e| panic!("get: {e}")), data);
                    s.drop_ref(&d).unwrap_or_else(|e| panic!("drop_ref: {e}"));
                }
                raced
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap_or_else(|_| panic!("writer panicked"));
    }
    stop.store(true, Ordering::SeqCst);
    let freed = collector
        .join()
        .unwrap_or_else(|_| panic!("collector panicked"));
    assert!(freed > 0, "the collector freed nothing");
    assert_clean(&s);
    gc(&s, 0, false);
    let st = s.stats().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(st.blobs, 0, "every blob lost its last reference");
    assert_clean(&s);
    drop(s);
    let s = open(&cfg);
    assert_clean(&s);
    // Every content can be written and read again after all that.
    for c in &contents {
        let d = put(&s, c);
        assert_eq!(&s.get(&d).unwrap_or_else(|e| panic!("{e}")), c);
    }
    assert_clean(&s);
}
