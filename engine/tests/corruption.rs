//! Damage on disk: flipped bits, truncated segments, bit flips on read.
//! verify() reports each, reads fail loudly, nothing panics, never wrong bytes.

mod common;

use common::*;
use orlop_engine::io::{FaultConfig, FaultIo};
use orlop_engine::{Digest, Error, Problem, Store, StoreConfig, VerifyReport};

fn populate(cfg: &StoreConfig) -> Vec<(Digest, Vec<u8>)> {
    let s = open(cfg);
    let blobs: Vec<_> = (0..6u64)
        .map(|i| {
            let data = if i % 2 == 0 {
                noise(i, 40_000)
            } else {
                text(i, 40_000)
            };
            (
                s.put(&data, None).unwrap_or_else(|e| panic!("{e}")).digest,
                data,
            )
        })
        .collect();
    s.close().unwrap_or_else(|e| panic!("{e}"));
    blobs
}

/// Whether verify() reported a problem of the kind `is`.
fn reports(rep: &VerifyReport, is: fn(&Problem) -> bool) -> bool {
    rep.problems.iter().any(is)
}

/// Every blob either reads back exactly or fails with a corruption error.
fn reads_never_lie(s: &Store, blobs: &[(Digest, Vec<u8>)]) -> usize {
    let mut failed = 0;
    for (d, data) in blobs {
        match s.get(d) {
            Ok(got) => assert!(got == *data, "wrong bytes returned for {d}"),
            Err(e) => {
                assert!(e.is_corruption(), "unexpected error kind: {e}");
                failed += 1;
            }
        }
    }
    failed
}

#[test]
fn flipped_payload_bit_is_reported_and_reads_fail() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = small_config(dir.path());
    let blobs = populate(&cfg);
    let seg = &segment_files(dir.path())[1];
    let (off, len) = records(seg)[1];
    flip(seg, off + 64 + len / 2);
    let s = Store::open(cfg).unwrap_or_else(|e| panic!("{e}"));
    let rep = s.verify().unwrap_or_else(|e| panic!("{e}"));
    assert!(!rep.is_clean());
    let named: Vec<_> = rep
        .problems
        .iter()
        .filter_map(|p| match p {
            Problem::BlobUnreadable { digest, error } => Some((digest.clone(), error.clone())),
            _ => None,
        })
        .collect();
    assert!(!named.is_empty(), "{:?}", rep.problems);
    assert!(
        named.iter().all(|(_, e)| e.contains("segment")),
        "{named:?}"
    );
    assert!(reports(&rep, |p| matches!(
        p,
        Problem::SegmentDamaged { .. }
    )));
    let failed = reads_never_lie(&s, &blobs);
    assert_eq!(failed, named.len());
}

#[test]
fn flipped_header_bit_is_a_checksum_mismatch() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = small_config(dir.path());
    let blobs = populate(&cfg);
    let seg = &segment_files(dir.path())[0];
    let (off, _) = records(seg)[0];
    flip(seg, off + 20); // inside the chunk id
    let s = Store::open(cfg).unwrap_or_else(|e| panic!("{e}"));
    assert!(!s.verify().unwrap_or_else(|e| panic!("{e}")).is_clean());
    let errs: Vec<_> = blobs.iter().filter_map(|(d, _)| s.get(d).err()).collect();
    assert!(
        errs.iter()
            .any(|e| matches!(e, Error::ChecksumMismatch { .. })),
        "{errs:?}"
    );
    reads_never_lie(&s, &blobs);
}

#[test]
fn truncated_segment_refuses_writable_open_but_fsck_reports() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = small_config(dir.path());
    let blobs = populate(&cfg);
    let seg = &segment_files(dir.path())[1];
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(seg)
        .unwrap_or_else(|e| panic!("{e}"));
    let (off, _) = records(seg)[2];
    f.set_len(off + 100).unwrap_or_else(|e| panic!("{e}"));
    drop(f);
    let r = Store::open(cfg.clone());
    assert!(
        matches!(r, Err(Error::DurableDataLost { .. })),
        "{:?}",
        r.err()
    );
    let mut ro = cfg;
    ro.read_only = true;
    let s = Store::open(ro).unwrap_or_else(|e| panic!("{e}"));
    let rep = s.verify().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        reports(&rep, |p| matches!(p, Problem::SegmentDamaged { .. })),
        "{:?}",
        rep.problems
    );
    assert!(
        reports(&rep, |p| matches!(p, Problem::BlobUnreadable { .. })),
        "{:?}",
        rep.problems
    );
    assert!(reads_never_lie(&s, &blobs) > 0);
}

#[test]
fn bit_flips_on_read_never_return_wrong_bytes() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let io = FaultIo::new(42, FaultConfig::default());
    let cfg = fault_config(dir.path(), &io);
    let blobs = populate(&cfg);
    let s = open(&cfg);
    io.set_config(FaultConfig {
        read_bitflip_ppm: 200_000,
        ..Default::default()
    });
    let mut failed = 0;
    for _ in 0..5 {
        failed += reads_never_lie(&s, &blobs);
    }
    assert!(failed > 0 && io.faults_injected() > 0);
    io.set_config(FaultConfig::default());
    assert_eq!(reads_never_lie(&s, &blobs), 0, "the data on disk is intact");
    assert_clean(&s);
}

#[test]
fn torn_writes_poison_until_reopen() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let io = FaultIo::new(7, FaultConfig::default());
    let cfg = fault_config(dir.path(), &io);
    let s = open(&cfg);
    let keep = s
        .put(&noise(1, 30_000), None)
        .unwrap_or_else(|e| panic!("{e}"))
        .digest;
    io.set_config(FaultConfig {
        torn_write_ppm: 1_000_000,
        ..Default::default()
    });
    assert!(s.put(&noise(2, 30_000), None).is_err());
    io.set_config(FaultConfig::default());
    assert!(matches!(
        s.put(&noise(3, 30_000), None),
        Err(Error::Poisoned)
    ));
    assert!(matches!(s.add_ref(&keep), Err(Error::Poisoned)));
    assert_eq!(
        s.get(&keep).map(|v| v.len()).ok(),
        Some(30_000),
        "reads still work"
    );
    drop(s);
    let s = open(&cfg);
    s.put(&noise(3, 30_000), None)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_clean(&s);
}

#[test]
fn garbage_segment_file_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = small_config(dir.path());
    populate(&cfg);
    let seg = &segment_files(dir.path())[0];
    std::fs::write(seg, noise(5, 70_000)).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        Store::open(cfg),
        Err(Error::CorruptSegment { .. })
    ));
}
