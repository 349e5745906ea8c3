//! `Store::repair`: damaged chunks are quarantined, the blobs that use them
//! are marked broken and refuse reads with a clear error (never wrong bytes),
//! wrong counts and missing chunk entries are fixed, and storing the same
//! content again restores every broken blob.

mod common;

use common::*;
use orlop_engine::index::codec::ChunkEntry;
use orlop_engine::index::{Index, CF_CHUNKS};
use orlop_engine::{Digest, Error, Problem, Store};
use std::collections::BTreeSet;

fn put(s: &Store, data: &[u8]) -> Digest {
    s.put(data, None)
        .unwrap_or_else(|e| panic!("put: {e}"))
        .digest
}

fn repair(s: &Store, dry_run: bool) -> orlop_engine::RepairReport {
    s.repair(dry_run, &mut |_| {})
        .unwrap_or_else(|e| panic!("repair: {e}"))
}

fn broken_set(r: &orlop_engine::RepairReport) -> BTreeSet<Digest> {
    r.broken.iter().map(|b| b.digest.clone()).collect()
}

#[test]
fn damaged_chunk_is_quarantined_and_a_push_restores_it() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = small_config(dir.path());
    let a_data = noise(1, 30_000);
    // b begins with a's bytes, so it shares a's first chunks.
    let mut b_data = a_data[..20_000].to_vec();
    b_data.extend_from_slice(&noise(2, 20_000));
    let c_data = noise(3, 30_000);
    let s = open(&cfg);
    let (a, b, c) = (put(&s, &a_data), put(&s, &b_data), put(&s, &c_data));
    s.close().unwrap_or_else(|e| panic!("{e}"));
    // The first record of the first segment: a's first chunk.
    let seg = &segment_files(dir.path())[0];
    let (off, len) = records(seg)[0];
    flip(seg, off + 64 + len / 2);

    let s = open(&cfg);
    let before = s.verify().unwrap_or_else(|e| panic!("{e}"));
    assert!(before
        .problems
        .iter()
        .any(|p| matches!(p, Problem::ChunkCorrupt { .. })));
    // A dry run says what a run does and changes nothing.
    let dry = repair(&s, true);
    assert_eq!(dry.quarantined.len(), 1);
    assert_eq!(broken_set(&dry), BTreeSet::from([a.clone(), b.clone()]));
    assert!(!s.verify().unwrap_or_else(|e| panic!("{e}")).is_clean());

    let rep = repair(&s, false);
    assert_eq!(rep.quarantined.len(), 1, "{:#?}", rep.quarantined);
    let q = &rep.quarantined[0];
    assert_eq!(q.references, 2, "a and b both name the chunk");
    assert_eq!(broken_set(&rep), broken_set(&dry));
    assert!(rep.unrepaired.is_empty(), "{:#?}", rep.unrepaired);
    assert_eq!(
        rep.segments_rewritten, 1,
        "the damaged segment is rewritten"
    );
    let kept_aside = std::fs::read_dir(dir.path().join("quarantine"))
        .unwrap_or_else(|e| panic!("no quarantine directory: {e}"))
        .count();
    assert_eq!(kept_aside, 1);

    let after = s.verify().unwrap_or_else(|e| panic!("{e}"));
    assert!(after.is_clean(), "{:#?}", after.problems);
    assert!(!after.is_whole());
    assert_eq!(after.quarantined_chunks, 1);
    assert_eq!(
        after.broken_blobs.iter().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from([a.clone(), b.clone()])
    );
    for d in [&a, &b] {
        match s.get(d) {
            Err(Error::BlobBroken { digest, chunks }) => {
                assert_eq!(&digest, d);
                assert_eq!(chunks, 1);
            }
            other => panic!("a broken blob read as {other:?}"),
        }
    }
    assert_eq!(s.get(&c).unwrap_or_else(|e| panic!("{e}")), c_data);
    // Reported absent, so that clients push it again.
    assert!(s.stat(&a).unwrap_or_else(|e| panic!("{e}")).is_none());
    assert!(s.stat(&c).unwrap_or_else(|e| panic!("{e}")).is_some());

    // A second run has nothing new to do.
    let again = repair(&s, false);
    assert!(again.quarantined.is_empty());
    assert_eq!(again.counts_fixed, 0);
    assert_eq!(broken_set(&again), broken_set(&rep));

    // Pushing a again stores a fresh copy of the chunk: a and b read back.
    assert_eq!(put(&s, &a_data), a);
    assert_eq!(s.get(&a).unwrap_or_else(|e| panic!("{e}")), a_data);
    assert_eq!(s.get(&b).unwrap_or_else(|e| panic!("{e}")), b_data);
    assert!(s.stat(&a).unwrap_or_else(|e| panic!("{e}")).is_some());
    assert!(s.stat(&b).unwrap_or_else(|e| panic!("{e}")).is_some());
    let healed = s.verify().unwrap_or_else(|e| panic!("{e}"));
    assert!(healed.is_whole(), "{healed:#?}");
    let cleared = repair(&s, false);
    assert!(cleared.broken.is_empty());
    // a's mark went with its commit; b's is cleared by the run.
    assert_eq!(cleared.restored, 1);
    s.close().unwrap_or_else(|e| panic!("{e}"));

    let s = open(&cfg);
    assert!(s.verify().unwrap_or_else(|e| panic!("{e}")).is_whole());
    assert_eq!(s.get(&b).unwrap_or_else(|e| panic!("{e}")), b_data);
    s.close().unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn wrong_counts_and_lost_chunk_entries_are_repaired() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = small_config(dir.path());
    let data = noise(9, 50_000);
    let other = noise(10, 20_000);
    let s = open(&cfg);
    let d = put(&s, &data);
    let o = put(&s, &other);
    s.close().unwrap_or_else(|e| panic!("{e}"));
    // Damage the index behind the engine's back: one chunk's count too
    // high, another chunk's entry gone.
    {
        let index =
            Index::open(&dir.path().join("index"), false, &[]).unwrap_or_else(|e| panic!("{e}"));
        let cf = index.cf(CF_CHUNKS).unwrap_or_else(|e| panic!("{e}"));
        let entries: Vec<orlop_engine::index::Row> = index
            .scan(CF_CHUNKS)
            .unwrap_or_else(|e| panic!("{e}"))
            .map(|kv| kv.unwrap_or_else(|e| panic!("{e}")))
            .collect();
        assert!(entries.len() >= 4);
        let mut e = ChunkEntry::decode(&entries[0].1).unwrap_or_else(|e| panic!("{e}"));
        e.refs += 5;
        index
            .db()
            .put_cf(cf, &entries[0].0, e.encode())
            .unwrap_or_else(|e| panic!("{e}"));
        index
            .db()
            .delete_cf(cf, &entries[1].0)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let s = open(&cfg);
    let before = s.verify().unwrap_or_else(|e| panic!("{e}"));
    assert!(before
        .problems
        .iter()
        .any(|p| matches!(p, Problem::RefcountMismatch { .. })));
    assert!(before
        .problems
        .iter()
        .any(|p| matches!(p, Problem::ChunkMissing { .. })));
    let rep = repair(&s, false);
    assert_eq!(rep.counts_fixed, 1);
    assert_eq!(rep.quarantined.len(), 1);
    assert_eq!(rep.quarantined[0].segment, None);
    let after = s.verify().unwrap_or_else(|e| panic!("{e}"));
    assert!(after.is_clean(), "{:#?}", after.problems);
    assert_eq!(after.broken_blobs.len(), 1);
    let broken = after.broken_blobs[0].clone();
    assert!(matches!(s.get(&broken), Err(Error::BlobBroken { .. })));
    // The blob that lost an entry is restored by storing it again.
    let (lost, kept) = if broken == d {
        (&data, (&o, &other))
    } else {
        (&other, (&d, &data))
    };
    assert_eq!(&s.get(kept.0).unwrap_or_else(|e| panic!("{e}")), kept.1);
    put(&s, lost);
    assert_eq!(&s.get(&broken).unwrap_or_else(|e| panic!("{e}")), lost);
    assert!(s.verify().unwrap_or_else(|e| panic!("{e}")).is_whole());
    s.close().unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn scrub_finds_a_flipped_bit_in_a_sealed_segment() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = small_config(dir.path());
    let s = open(&cfg);
    let blobs: Vec<(Digest, Vec<u8>)> = (0..6u64)
        .map(|i| {
            let data = noise(20 + i, 40_000);
            (put(&s, &data), data)
        })
        .collect();
    let scrub = |s: &Store| {
        let mut heard = Vec::new();
        let r = s
            .scrub(
                &orlop_engine::ScrubOptions::default(),
                &mut |d| heard.push(d.clone()),
                &mut |_| {},
            )
            .unwrap_or_else(|e| panic!("scrub: {e}"));
        assert_eq!(heard, r.damaged, "every damage is heard as it is found");
        r
    };
    let clean = scrub(&s);
    assert!(clean.damaged.is_empty(), "{:#?}", clean.damaged);
    assert!(clean.segments >= 2, "{clean:?}");
    assert!(clean.live_records > 0 && clean.bytes > 100_000, "{clean:?}");
    // Damage a record of the first (sealed) segment while the store is open.
    let seg = &segment_files(dir.path())[0];
    let (off, len) = records(seg)[1];
    flip(seg, off + 64 + len / 3);
    let found = scrub(&s);
    assert!(
        found
            .damaged
            .iter()
            .any(|d| d.offset == Some(off) && d.segment.0 == 1),
        "{:#?}",
        found.damaged
    );
    // A cancelled pass reads nothing and says so.
    let cancel = orlop_engine::ScrubOptions {
        cancel: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
        ..Default::default()
    };
    let r = s
        .scrub(&cancel, &mut |_| {}, &mut |_| {})
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(r.incomplete && r.bytes == 0, "{r:?}");
    // The scrub only reports: the blobs are as they were.
    let failed = blobs.iter().filter(|(d, _)| s.get(d).is_err()).count();
    assert_eq!(failed, 1);
    s.close().unwrap_or_else(|e| panic!("{e}"));
}

/// A broken blob pushed again in different pieces (an upload's checkpoints
/// force chunk cuts, so its chunks differ from the stored recipe's) takes
/// the new recipe: it reads back whole and its mark goes.
#[test]
fn a_broken_blob_pushed_again_in_other_pieces_is_restored() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = small_config(dir.path());
    let data = noise(77, 60_000);
    let s = open(&cfg);
    let d = put(&s, &data);
    s.add_ref(&d).unwrap_or_else(|e| panic!("{e}"));
    s.close().unwrap_or_else(|e| panic!("{e}"));
    let seg = &segment_files(dir.path())[0];
    let (off, len) = records(seg)[0];
    flip(seg, off + 64 + len / 2);
    let s = open(&cfg);
    let rep = repair(&s, false);
    assert_eq!(broken_set(&rep), BTreeSet::from([d.clone()]));
    assert!(s.stat(&d).unwrap_or_else(|e| panic!("{e}")).is_none());
    // Written again with a checkpoint 7 bytes in: every chunk boundary of
    // the first content-defined chunk moves.
    let mut w = s.writer(Some(d.clone())).unwrap_or_else(|e| panic!("{e}"));
    w.write(bytes::Bytes::copy_from_slice(&data[..7]))
        .unwrap_or_else(|e| panic!("{e}"));
    w.checkpoint(b"again").unwrap_or_else(|e| panic!("{e}"));
    w.write(bytes::Bytes::copy_from_slice(&data[7..]))
        .unwrap_or_else(|e| panic!("{e}"));
    w.commit().unwrap_or_else(|e| panic!("{e}"));
    let info = s
        .stat(&d)
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("the blob is still reported absent"));
    assert_eq!(info.refs, 1, "the references held on it are kept");
    assert_eq!(s.get(&d).unwrap_or_else(|e| panic!("{e}")), data);
    let v = s.verify().unwrap_or_else(|e| panic!("{e}"));
    assert!(v.is_whole(), "{v:#?}");
    s.close().unwrap_or_else(|e| panic!("{e}"));
    let s = open(&cfg);
    assert_eq!(s.get(&d).unwrap_or_else(|e| panic!("{e}")), data);
    assert!(s.verify().unwrap_or_else(|e| panic!("{e}")).is_whole());
    s.close().unwrap_or_else(|e| panic!("{e}"));
}
