//! Held writes: a checkpointed write survives a clean restart and a crash
//! that loses everything unsynced after the checkpoint, resumes with the
//! right digest state, and commits byte for byte; an aborted one leaves
//! nothing behind.

mod common;

use bytes::Bytes;
use common::*;
use orlop_engine::io::{FaultConfig, FaultIo};
use orlop_engine::{Digest, Error, Store};

fn ok<T>(r: Result<T, Error>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn write_all(w: &mut orlop_engine::BlobWriter, data: &[u8]) {
    for piece in data.chunks(7_777) {
        ok(w.write(Bytes::copy_from_slice(piece)));
    }
}

fn assert_no_pending(s: &Store) {
    let r = ok(s.verify());
    assert!(r.is_clean(), "{:#?}", r.problems);
    assert_eq!(r.pending_writes, 0);
    assert!(ok(s.held_writes()).is_empty());
}

#[test]
fn held_write_survives_restart_and_resumes() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let c = small_config(dir.path());
    // Content with internal repeats, so that chunks dedupe within the blob.
    let mut data = noise(1, 150_000);
    data.extend_from_within(..60_000);
    data.extend_from_slice(&text(2, 90_000));
    let (a, b) = data.split_at(170_000);
    let s = open(&c);
    // An unrelated write in flight at the restart is discarded, not held.
    let mut other = ok(s.writer(None));
    write_all(&mut other, &noise(9, 20_000));
    let mut w = ok(s.writer(None));
    write_all(&mut w, &a[..100_000]);
    assert_eq!(ok(w.checkpoint(b"session-1")), 100_000);
    write_all(&mut w, &a[100_000..]);
    assert_eq!(ok(w.checkpoint(b"session-1")), a.len() as u64);
    let recipe = w.recipe();
    w.detach();
    other.detach(); // never checkpointed: the next open discards it
    drop(s);

    let s = open(&c);
    let held = ok(s.held_writes());
    assert_eq!(held.len(), 1);
    assert_eq!((held[0].recipe, held[0].size), (recipe, a.len() as u64));
    assert_eq!(held[0].tag, b"session-1");
    assert_eq!(
        ok(s.verify()).pending_writes,
        1,
        "only the held write remains pending"
    );
    let mut w = ok(s.resume_writer(recipe));
    assert_eq!(w.size(), a.len() as u64);
    write_all(&mut w, b);
    ok(w.expect_digest(Digest::sha256_of(&data)));
    let info = ok(w.commit());
    assert_eq!(info.digest, Digest::sha256_of(&data));
    assert!(ok(s.get(&info.digest)) == data);
    assert_no_pending(&s);
}

#[test]
fn a_wrong_digest_after_resume_commits_nothing() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let c = small_config(dir.path());
    let data = noise(3, 50_000);
    let s = open(&c);
    let mut w = ok(s.writer(None));
    write_all(&mut w, &data);
    ok(w.checkpoint(b"t"));
    let recipe = w.recipe();
    w.detach();
    drop(s);
    let s = open(&c);
    let mut w = ok(s.resume_writer(recipe));
    ok(w.write(Bytes::from_static(b"tail")));
    ok(w.expect_digest(Digest::sha256_of(&data)));
    assert!(matches!(w.commit(), Err(Error::DigestMismatch { .. })));
    assert!(ok(s.stat(&Digest::sha256_of(&data))).is_none());
    assert_no_pending(&s);
}

#[test]
fn crash_after_checkpoint_keeps_exactly_the_checkpoint() {
    for seed in 0..8u64 {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let io = FaultIo::new(seed, FaultConfig::default());
        let mut c = fault_config(dir.path(), &io);
        inline_by_seed(&mut c, seed);
        let data = noise(100 + seed, 200_000);
        let s = open(&c);
        let mut w = ok(s.writer(None));
        write_all(&mut w, &data[..120_000]);
        ok(w.checkpoint(b"crashy"));
        let recipe = w.recipe();
        // More bytes after the checkpoint, never made durable.
        write_all(&mut w, &noise(999, 60_000));
        w.detach();
        s.abandon();
        io.crash().unwrap_or_else(|e| panic!("crash: {e}"));

        let s = open(&c);
        let held = ok(s.held_writes());
        assert_eq!(held.len(), 1, "seed {seed}");
        assert_eq!(held[0].size, 120_000, "seed {seed}");
        let mut w = ok(s.resume_writer(recipe));
        write_all(&mut w, &data[120_000..]);
        let info = ok(w.commit());
        assert_eq!(info.digest, Digest::sha256_of(&data), "seed {seed}");
        assert!(ok(s.get(&info.digest)) == data, "seed {seed}");
        assert_no_pending(&s);
    }
}

#[test]
fn aborting_a_held_write_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let c = small_config(dir.path());
    let s = open(&c);
    let mut w = ok(s.writer(None));
    write_all(&mut w, &noise(5, 40_000));
    ok(w.checkpoint(b"gone"));
    let recipe = w.recipe();
    w.detach();
    drop(s);
    let s = open(&c);
    ok(s.abort_held(recipe));
    assert!(matches!(
        s.resume_writer(recipe),
        Err(Error::HeldWriteUnknown(_))
    ));
    assert_no_pending(&s);
    drop(s);
    let s = open(&c);
    assert_no_pending(&s);
}

#[test]
fn an_empty_checkpoint_resumes() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let c = small_config(dir.path());
    let s = open(&c);
    let mut w = ok(s.writer(None));
    assert_eq!(ok(w.checkpoint(b"empty")), 0);
    let recipe = w.recipe();
    w.detach();
    drop(s);
    let s = open(&c);
    let w = ok(s.resume_writer(recipe));
    let info = ok(w.commit());
    assert_eq!(info.digest, Digest::sha256_of(b""));
    assert_no_pending(&s);
}

#[test]
fn resumed_twice_with_checkpoints_reads_back() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let c = small_config(dir.path());
    let data = noise(7, 300_000);
    let s = open(&c);
    let mut w = ok(s.writer(None));
    write_all(&mut w, &data[..100_000]);
    ok(w.checkpoint(b"x"));
    let recipe = w.recipe();
    w.detach();
    drop(s);
    for (from, to) in [(100_000, 200_000), (200_000, 300_000)] {
        let s = open(&c);
        let mut w = ok(s.resume_writer(recipe));
        write_all(&mut w, &data[from..to]);
        assert_eq!(ok(w.checkpoint(b"x")), to as u64);
        if to == 300_000 {
            let info = ok(w.commit());
            assert!(ok(s.get(&info.digest)) == data);
            assert_no_pending(&s);
        } else {
            w.detach();
        }
    }
}

#[test]
fn resumed_then_checkpointed_twice_reads_back() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut c = small_config(dir.path());
    c.chunk = orlop_engine::ChunkParams::default();
    c.segment_bytes = 8 << 20;
    let data = noise(8, 900_000);
    let s = open(&c);
    let mut w = ok(s.writer(None));
    write_all(&mut w, &data[..300_000]);
    ok(w.checkpoint(b"x"));
    let recipe = w.recipe();
    w.detach();
    s.abandon();
    let s = open(&c);
    let mut w = ok(s.resume_writer(recipe));
    write_all(&mut w, &data[300_000..600_000]);
    ok(w.checkpoint(b"x"));
    write_all(&mut w, &data[600_000..]);
    ok(w.checkpoint(b"x"));
    let info = ok(w.commit());
    assert_eq!(info.digest, Digest::sha256_of(&data));
    assert!(ok(s.get(&info.digest)) == data);
    assert_no_pending(&s);
}

#[test]
fn aborting_a_committed_recipe_changes_nothing() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let c = small_config(dir.path());
    let data = noise(11, 80_000);
    let s = open(&c);
    let mut w = ok(s.writer(None));
    write_all(&mut w, &data);
    ok(w.checkpoint(b"x"));
    let recipe = w.recipe();
    let info = ok(w.commit());
    // A late abort of the same recipe (a racing cleanup) must not touch it.
    ok(s.abort_held(recipe));
    assert!(ok(s.get(&info.digest)) == data);
    assert_no_pending(&s);
}

#[test]
fn repeating_held_chunks_after_resume_survives_a_crash() {
    // A resumed write that sees its held chunks again must not re-stage
    // them at locations that a crash can lose.
    for seed in 0..4u64 {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let io = FaultIo::new(seed, FaultConfig::default());
        let mut c = fault_config(dir.path(), &io);
        inline_by_seed(&mut c, seed);
        let a = noise(200 + seed, 60_000);
        let s = open(&c);
        let mut w = ok(s.writer(None));
        write_all(&mut w, &a);
        ok(w.checkpoint(b"r"));
        let recipe = w.recipe();
        w.detach();
        drop(s);
        let segments = || -> Vec<std::path::PathBuf> {
            std::fs::read_dir(dir.path().join("segments"))
                .unwrap_or_else(|e| panic!("{e}"))
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect()
        };
        let before = segments();
        let s = open(&c);
        let mut w = ok(s.resume_writer(recipe));
        // The same chunks again, never checkpointed: enough of them to pass
        // the chunker's window and reach the appender before the detach.
        for _ in 0..40 {
            write_all(&mut w, &a);
        }
        w.detach();
        s.abandon();
        io.crash().unwrap_or_else(|e| panic!("crash: {e}"));
        // The worst a crash may do: every record appended since the reopen
        // (never fsynced) is gone; a new segment that was not sealed (sealed
        // ones are fsynced and exactly `segment_bytes` long) keeps only its
        // synced header.
        let unsealed = |p: &std::path::PathBuf| {
            std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) < c.segment_bytes
        };
        for p in segments()
            .into_iter()
            .filter(|p| !before.contains(p) && unsealed(p))
        {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap_or_else(|e| panic!("{e}"));
            f.set_len(64).unwrap_or_else(|e| panic!("{e}"));
        }
        let s = open(&c);
        let mut w = ok(s.resume_writer(recipe));
        write_all(&mut w, b"end");
        let info = ok(w.commit());
        let mut want = a.clone();
        want.extend_from_slice(b"end");
        assert!(ok(s.get(&info.digest)) == want, "seed {seed}");
        assert_no_pending(&s);
    }
}

#[test]
fn a_detached_write_shares_nothing_that_compaction_may_delete() {
    // A write appends chunks past its checkpoint, then is detached: those
    // records are dead (a resume drops them), so compaction may delete
    // their segments. No later writer may dedupe against them. Both modes:
    // inline (staged placements still batched when detached) and threaded.
    for seed in 0..2u64 {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut c = small_config(dir.path());
        inline_by_seed(&mut c, seed);
        let s = open(&c);
        let data = noise(400 + seed, 3_500_000);
        let (held, after) = data.split_at(2_000_000);
        let mut w = ok(s.writer(None));
        write_all(&mut w, held);
        ok(w.checkpoint(b"d"));
        // More than the chunker's 1 MiB window, so that chunks are cut,
        // appended and (some of them) not yet staged.
        write_all(&mut w, after);
        let recipe = w.recipe();
        w.detach();
        let opts = orlop_engine::CompactOptions {
            live_fraction_max: 1.0,
            ..orlop_engine::CompactOptions::default()
        };
        ok(s.compact(&opts, &mut |_| {}));
        // The same bytes again, cut at the same boundaries (the checkpoint
        // forced one where `after` starts).
        let info = ok(s.put(after, None));
        assert!(ok(s.get(&info.digest)) == after, "seed {seed}");
        let r = ok(s.verify());
        assert!(r.is_clean(), "seed {seed}: {:#?}", r.problems);
        // The held write resumes and commits whole.
        let mut w = ok(s.resume_writer(recipe));
        write_all(&mut w, after);
        let info = ok(w.commit());
        assert!(ok(s.get(&info.digest)) == data, "seed {seed}");
        let r = ok(s.verify());
        assert!(r.is_clean(), "seed {seed}: {:#?}", r.problems);
    }
}

#[test]
fn placements_staged_past_a_checkpoint_do_not_survive_a_resume() {
    // Chunks appended and staged after the checkpoint were never made
    // durable: a crash may lose their records while the index keeps their
    // placements. A resumed write sending the same bytes must store them
    // again, not trust those placements.
    for seed in 0..4u64 {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let io = FaultIo::new(seed, FaultConfig::default());
        let mut c = fault_config(dir.path(), &io);
        inline_by_seed(&mut c, seed);
        let data = noise(500 + seed, 3_500_000);
        let (held, after) = data.split_at(2_000_000);
        let s = open(&c);
        let mut w = ok(s.writer(None));
        write_all(&mut w, held);
        ok(w.checkpoint(b"c"));
        write_all(&mut w, after);
        let recipe = w.recipe();
        w.detach();
        s.abandon();
        io.crash().unwrap_or_else(|e| panic!("crash: {e}"));

        let s = open(&c);
        let mut w = ok(s.resume_writer(recipe));
        write_all(&mut w, after);
        let info = ok(w.commit());
        assert_eq!(info.digest, Digest::sha256_of(&data), "seed {seed}");
        assert!(ok(s.get(&info.digest)) == data, "seed {seed}");
        assert_no_pending(&s);
    }
}
