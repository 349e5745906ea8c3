//! `rebuild_index`: the index deleted, a new one made from the segments
//! alone finds every blob byte for byte and every row of the layers above,
//! also after garbage collection and compaction moved and dropped records.

mod common;

use common::*;
use orlop_engine::{
    rebuild_index, CompactOptions, Digest, Error, GcOptions, Store, StoreConfig, Txn,
};
use std::collections::BTreeMap;

const CF: &str = "rows";

fn config(dir: &std::path::Path) -> StoreConfig {
    let mut c = small_config(dir);
    c.extra_column_families = vec![CF.to_string()];
    c
}

fn rows(s: &Store) -> BTreeMap<Vec<u8>, Vec<u8>> {
    s.kv_scan(CF, b"", None, 100_000)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .collect()
}

/// Compacts every sealed segment.
fn compact_all(s: &Store) -> orlop_engine::CompactReport {
    let opts = CompactOptions {
        live_fraction_max: 1.0,
        ..CompactOptions::default()
    };
    s.compact(&opts, &mut |_| {})
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Closes the store, rebuilds its index from the segments and reopens it;
/// the rows must be `want` and verify clean.
fn rebuilt(s: Store, cfg: &StoreConfig, want: &BTreeMap<Vec<u8>, Vec<u8>>) -> Store {
    s.close().unwrap_or_else(|e| panic!("{e}"));
    let rep = rebuild(cfg);
    let s = open(cfg);
    assert_eq!(&rows(&s), want, "{rep:?}");
    assert_clean(&s);
    s
}

fn rebuild(cfg: &StoreConfig) -> orlop_engine::RebuildReport {
    std::fs::remove_dir_all(cfg.data_dir.join("index")).unwrap_or_else(|e| panic!("{e}"));
    rebuild_index(cfg, &mut |_| {}).unwrap_or_else(|e| panic!("rebuild: {e}"))
}

#[test]
fn a_deleted_index_is_rebuilt_from_the_segments() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = config(dir.path());
    let s = open(&cfg);
    let mut kept: Vec<(Digest, Vec<u8>)> = Vec::new();
    let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    for i in 0..12u64 {
        // Every third blob repeats most of the one before (shared chunks).
        let data = if i % 3 == 2 {
            let mut d = kept[kept.len() - 1].1[..30_000].to_vec();
            d.extend_from_slice(&noise(100 + i, 5_000));
            d
        } else if i % 2 == 0 {
            noise(100 + i, 40_000)
        } else {
            text(100 + i, 40_000)
        };
        let d = s.put(&data, None).unwrap_or_else(|e| panic!("{e}")).digest;
        // A row names each blob and holds a reference on it.
        let mut t = Txn::new();
        let key = format!("blob/{i:02}").into_bytes();
        t.put(CF, key.clone(), d.to_string().into_bytes());
        t.add_ref(&d);
        s.apply(t).unwrap_or_else(|e| panic!("{e}"));
        model.insert(key, d.to_string().into_bytes());
        kept.push((d, data));
    }
    // Rows rewritten and deleted (a transaction's later change wins), and
    // one transaction large enough to be split across journal records.
    for i in 0..4u64 {
        let key = format!("blob/{i:02}").into_bytes();
        let d = kept[i as usize].0.clone();
        let mut t = Txn::new();
        t.delete(CF, key.clone());
        t.drop_ref(&d);
        s.apply(t).unwrap_or_else(|e| panic!("{e}"));
        model.remove(&key);
    }
    let mut big = Txn::new();
    for i in 0..40u32 {
        let key = format!("big/{i:03}").into_bytes();
        let value = noise(u64::from(i), 5_000);
        big.put(CF, key.clone(), value.clone());
        model.insert(key, value);
    }
    s.apply(big).unwrap_or_else(|e| panic!("{e}"));
    // Collect the blobs that lost their rows, then compact: records move
    // and dead ones (the collected blobs' journal records among them) go.
    let gc = GcOptions {
        grace: std::time::Duration::ZERO,
        ..GcOptions::default()
    };
    let freed = s
        .collect_garbage(&gc, &mut |_| {})
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(freed.blobs_freed, 4);
    let compacted = compact_all(&s);
    assert!(compacted.segments_removed > 0, "{compacted:?}");
    assert!(compacted.journal_records_moved > 0, "{compacted:?}");
    let before = s.verify().unwrap_or_else(|e| panic!("{e}"));
    assert!(before.is_clean(), "{:#?}", before.problems);
    assert!(before.journal_records > 0);
    assert_eq!(rows(&s), model);
    s.close().unwrap_or_else(|e| panic!("{e}"));

    let rep = rebuild(&cfg);
    assert!(rep.blobs_lost.is_empty(), "{:?}", rep.blobs_lost);
    assert_eq!(rep.records_damaged, 0);
    assert_eq!(rep.transactions_incomplete, 0);
    let s = open(&cfg);
    assert_eq!(rows(&s), model, "the rows replayed from the journal");
    for (d, data) in &kept[4..] {
        assert_eq!(&s.get(d).unwrap_or_else(|e| panic!("{d}: {e}")), data);
    }
    for (d, _) in &kept[..4] {
        assert!(
            s.stat(d).unwrap_or_else(|e| panic!("{e}")).is_none(),
            "a collected blob whose records compaction dropped stays gone"
        );
    }
    // Counts come from the layer above: the engine starts them at zero.
    let after = s.verify().unwrap_or_else(|e| panic!("{e}"));
    assert!(after.is_clean(), "{:#?}", after.problems);
    assert_eq!(after.blobs, 8);
    // The rebuilt store takes writes, and a second rebuild agrees.
    let extra = noise(999, 20_000);
    let e = s.put(&extra, None).unwrap_or_else(|e| panic!("{e}")).digest;
    s.close().unwrap_or_else(|e| panic!("{e}"));
    let again = rebuild(&cfg);
    assert_eq!(again.blobs, 9);
    let s = open(&cfg);
    assert_eq!(s.get(&e).unwrap_or_else(|e| panic!("{e}")), extra);
    assert_eq!(rows(&s), model);
    assert_clean(&s);
    s.close().unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn rebuild_refuses_an_existing_index_and_a_wrong_key() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = config(dir.path());
    let s = open(&cfg);
    s.put(&noise(1, 10_000), None)
        .unwrap_or_else(|e| panic!("{e}"));
    s.close().unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        rebuild_index(&cfg, &mut |_| {}),
        Err(Error::Config(_))
    ));
    std::fs::remove_dir_all(dir.path().join("index")).unwrap_or_else(|e| panic!("{e}"));
    let mut wrong = cfg.clone();
    wrong.key = orlop_engine::KeySource::Bytes([8; 32]);
    assert!(matches!(
        rebuild_index(&wrong, &mut |_| {}),
        Err(Error::WrongKey)
    ));
    let rep = rebuild_index(&cfg, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rep.blobs, 1);
}

/// A transaction journaled but never applied (its segment fsync failed)
/// is voided: verify stays clean after the reopen, its number is not used
/// again, and a rebuild does not apply it.
#[test]
fn an_unapplied_transaction_is_voided() {
    use orlop_engine::io::{FaultConfig, FaultIo};
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let io = FaultIo::new(3, FaultConfig::default());
    let mut cfg = fault_config(dir.path(), &io);
    cfg.extra_column_families = vec![CF.to_string()];
    let s = open(&cfg);
    s.kv_write(CF, vec![(b"a".to_vec(), Some(b"1".to_vec()))])
        .unwrap_or_else(|e| panic!("{e}"));
    io.set_config(FaultConfig {
        sync_eio_ppm: 1_000_000,
        ..FaultConfig::default()
    });
    let failed = s.kv_write(CF, vec![(b"b".to_vec(), Some(b"lost".to_vec()))]);
    assert!(failed.is_err(), "{failed:?}");
    io.set_config(FaultConfig::default());
    s.abandon();
    let s = open(&cfg);
    assert_clean(&s);
    s.kv_write(CF, vec![(b"c".to_vec(), Some(b"3".to_vec()))])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_clean(&s);
    let want: BTreeMap<Vec<u8>, Vec<u8>> = [
        (b"a".to_vec(), b"1".to_vec()),
        (b"c".to_vec(), b"3".to_vec()),
    ]
    .into_iter()
    .collect();
    assert_eq!(rows(&s), want);
    // The failed transaction is not replayed.
    let s = rebuilt(s, &cfg, &want);
    s.close().unwrap_or_else(|e| panic!("{e}"));
}

/// A transaction split across journal records, one part of which
/// compaction drops (all its changes overwritten later): the part that is
/// still current replays alone.
#[test]
fn a_partly_compacted_transaction_still_replays() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = config(dir.path());
    let s = open(&cfg);
    let mut t = Txn::new();
    t.put(CF, b"head".to_vec(), b"kept".to_vec());
    for i in 0..30u32 {
        t.put(
            CF,
            format!("tail/{i:02}").into_bytes(),
            noise(u64::from(i), 4_000),
        );
    }
    s.apply(t).unwrap_or_else(|e| panic!("{e}"));
    // Every tail row rewritten: the parts holding only tail rows are dead.
    for i in 0..30u32 {
        s.kv_write(
            CF,
            vec![(format!("tail/{i:02}").into_bytes(), Some(b"new".to_vec()))],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    // Fill segments so that the transaction's records are in sealed ones.
    for i in 0..8u64 {
        s.put(&noise(500 + i, 30_000), None)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let c = compact_all(&s);
    assert!(c.segments_removed > 0, "{c:?}");
    assert_clean(&s);
    let want = rows(&s);
    assert_eq!(want.get(b"head".as_slice()), Some(&b"kept".to_vec()));
    let s = rebuilt(s, &cfg, &want);
    s.close().unwrap_or_else(|e| panic!("{e}"));
}

/// Regression (model test): an empty blob has no recipe parts, and a
/// rebuild must still number new recipes past its recipe.
#[test]
fn rebuild_numbers_recipes_past_an_empty_blob() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = config(dir.path());
    let s = open(&cfg);
    let empty = s.put(b"", None).unwrap_or_else(|e| panic!("{e}")).digest;
    s.close().unwrap_or_else(|e| panic!("{e}"));
    rebuild(&cfg);
    let s = open(&cfg);
    let one = s.put(b"x", None).unwrap_or_else(|e| panic!("{e}")).digest;
    assert_eq!(s.get(&empty).unwrap_or_else(|e| panic!("{e}")), b"");
    assert_eq!(s.get(&one).unwrap_or_else(|e| panic!("{e}")), b"x");
    assert_clean(&s);
    s.close().unwrap_or_else(|e| panic!("{e}"));
}
