//! Deterministic tests of the engine's contract: dedupe, ranges, bad input,
//! keys, concurrency, and a blob larger than 4 GiB through the streaming API.

mod common;

use bytes::Bytes;
use common::*;
use orlop_engine::{Digest, Error, KeySource, Store};
use sha2::Digest as _;
use std::sync::Arc;

#[test]
fn put_get_dedupe_and_stats() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = open(&small_config(dir.path()));
    let a = noise(1, 200_000);
    let mut b = a.clone();
    b.extend_from_slice(&noise(2, 50_000));
    let ia = s.put(&a, None).unwrap_or_else(|e| panic!("{e}"));
    let ib = s.put(&b, None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ia.digest, Digest::sha256_of(&a));
    assert_eq!(s.get(&ia.digest).unwrap_or_else(|e| panic!("{e}")), a);
    assert_eq!(s.get(&ib.digest).unwrap_or_else(|e| panic!("{e}")), b);
    let st = s.stats().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(st.logical_bytes, (a.len() + b.len()) as u64);
    // b shares its first ~200 KB with a, so far fewer bytes are stored than pushed.
    assert!(st.unique_bytes < (a.len() + 60_000) as u64, "{st:?}");
    assert!(st.dedupe_ratio() > 1.5);
    assert!(
        st.segments.len() > 2,
        "64 KiB segments must have been sealed"
    );
    // Pushing the same blob again stores nothing new.
    let before = st.stored_bytes;
    s.put(&a, None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        s.stats().unwrap_or_else(|e| panic!("{e}")).stored_bytes,
        before
    );
    assert_clean(&s);
}

#[test]
fn compressible_data_is_compressed() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = open(&small_config(dir.path()));
    let t = text(3, 300_000);
    let d = s.put(&t, None).unwrap_or_else(|e| panic!("{e}")).digest;
    let st = s.stats().unwrap_or_else(|e| panic!("{e}"));
    assert!(st.compression_ratio() > 2.0, "{st:?}");
    assert!(st.compressed_chunks > 0);
    assert_eq!(s.get(&d).unwrap_or_else(|e| panic!("{e}")), t);
}

#[test]
fn empty_blob_and_zero_length_pieces() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = open(&small_config(dir.path()));
    let mut w = s
        .writer(Some(Digest::sha256_of(b"")))
        .unwrap_or_else(|e| panic!("{e}"));
    w.write(Bytes::new()).unwrap_or_else(|e| panic!("{e}"));
    let info = w.commit().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((info.size, info.chunk_count), (0, 0));
    assert_eq!(
        s.get(&info.digest).unwrap_or_else(|e| panic!("{e}")),
        Vec::<u8>::new()
    );
    assert!(s.range_reader(&info.digest, 0, 0).is_ok());
    assert!(matches!(
        s.range_reader(&info.digest, 0, 1),
        Err(Error::RangeInvalid { .. })
    ));
    assert_clean(&s);
}

#[test]
fn digest_mismatch_and_truncated_stream_commit_nothing() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = open(&small_config(dir.path()));
    let data = noise(4, 100_000);
    let expected = Digest::sha256_of(&data);
    // A stream cut short: the digest of what arrived differs from the one named.
    let r = s.put(&data[..60_000], Some(expected.clone()));
    assert!(matches!(r, Err(Error::DigestMismatch { .. })), "{r:?}");
    assert!(s
        .stat(&expected)
        .unwrap_or_else(|e| panic!("{e}"))
        .is_none());
    assert!(s
        .stat(&Digest::sha256_of(&data[..60_000]))
        .unwrap_or_else(|e| panic!("{e}"))
        .is_none());
    assert!(matches!(s.get(&expected), Err(Error::BlobUnknown(_))));
    // An abandoned writer commits nothing either (dropped, it stops: what
    // it had cut and appended past the chunker's 1 MiB window is left).
    let mut w = s.writer(None).unwrap_or_else(|e| panic!("{e}"));
    w.write(Bytes::from(noise(5, 1_500_000)))
        .unwrap_or_else(|e| panic!("{e}"));
    drop(w);
    let st = s.stats().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(st.blobs, 0);
    let rep = s.verify().unwrap_or_else(|e| panic!("{e}"));
    assert!(rep.is_clean(), "{:?}", rep.problems);
    assert!(
        rep.dead_records > 0,
        "the refused data is reclaimable, not referenced"
    );
    assert_eq!(rep.pending_writes, 0);
    // The full stream with the right digest commits.
    s.put(&data, Some(expected.clone()))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.get(&expected).unwrap_or_else(|e| panic!("{e}")), data);
}

#[test]
fn sha512_digests_are_accepted() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = open(&small_config(dir.path()));
    let data = noise(6, 10_000);
    let d = Digest::new(
        orlop_engine::DigestAlgorithm::Sha512,
        &sha2::Sha512::digest(&data),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let info = s
        .put(&data, Some(d.clone()))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(info.digest, d);
    assert_eq!(s.get(&d).unwrap_or_else(|e| panic!("{e}")), data);
    assert_clean(&s);
}

#[test]
fn references_are_counted_exactly() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = small_config(dir.path());
    let s = open(&cfg);
    let d = s
        .put(&noise(7, 20_000), None)
        .unwrap_or_else(|e| panic!("{e}"))
        .digest;
    assert!(matches!(s.drop_ref(&d), Err(Error::RefUnderflow(_))));
    assert_eq!(s.add_ref(&d).unwrap_or_else(|e| panic!("{e}")), 1);
    assert_eq!(s.add_ref(&d).unwrap_or_else(|e| panic!("{e}")), 2);
    assert_eq!(s.drop_ref(&d).unwrap_or_else(|e| panic!("{e}")), 1);
    let unknown = Digest::sha256_of(b"nope");
    assert!(matches!(s.add_ref(&unknown), Err(Error::BlobUnknown(_))));
    drop(s);
    let s = open(&cfg);
    assert_eq!(
        s.stat(&d).unwrap_or_else(|e| panic!("{e}")).map(|i| i.refs),
        Some(1)
    );
    assert_eq!(s.drop_ref(&d).unwrap_or_else(|e| panic!("{e}")), 0);
    assert_eq!(
        s.stats()
            .unwrap_or_else(|e| panic!("{e}"))
            .unreferenced_blobs,
        1
    );
    assert_clean(&s);
}

#[test]
fn wrong_key_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = small_config(dir.path());
    let s = open(&cfg);
    s.put(b"hello", None).unwrap_or_else(|e| panic!("{e}"));
    drop(s);
    cfg.key = KeySource::Bytes([8; 32]);
    assert!(matches!(Store::open(cfg.clone()), Err(Error::WrongKey)));
    cfg.read_only = true;
    assert!(matches!(Store::open(cfg), Err(Error::WrongKey)));
}

#[test]
fn default_key_file_is_created_once() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = small_config(dir.path());
    cfg.key = KeySource::Default;
    let d = open(&cfg)
        .put(b"x", None)
        .unwrap_or_else(|e| panic!("{e}"))
        .digest;
    assert!(dir.path().join("store.key").exists());
    let s = open(&cfg);
    assert_eq!(s.get(&d).unwrap_or_else(|e| panic!("{e}")), b"x");
    drop(s);
    // Losing the key file must not silently create a new key for an existing store.
    std::fs::remove_file(dir.path().join("store.key")).unwrap_or_else(|e| panic!("{e}"));
    assert!(Store::open(cfg).is_err());
}

#[test]
fn concurrent_writers_of_shared_data() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = Arc::new(open(&small_config(dir.path())));
    let common = noise(9, 150_000);
    let handles: Vec<_> = (0..8u64)
        .map(|t| {
            let s = s.clone();
            let common = common.clone();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                for i in 0..6u64 {
                    let mut data = common.clone();
                    data.extend_from_slice(&noise(100 + t * 10 + i, 20_000));
                    let d = s.put(&data, None).unwrap_or_else(|e| panic!("{e}")).digest;
                    s.add_ref(&d).unwrap_or_else(|e| panic!("{e}"));
                    out.push((d, data));
                }
                out
            })
        })
        .collect();
    let all: Vec<_> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap_or_else(|_| panic!("thread")))
        .collect();
    for (d, data) in &all {
        assert_eq!(&s.get(d).unwrap_or_else(|e| panic!("{e}")), data);
        assert_eq!(
            s.stat(d).unwrap_or_else(|e| panic!("{e}")).map(|i| i.refs),
            Some(1)
        );
    }
    let st = s.stats().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(st.blobs, 48);
    assert!(st.dedupe_ratio() > 3.0, "{st:?}");
    assert_clean(&s);
}

#[test]
fn writers_go_inline_when_many_are_live() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut c = small_config(dir.path());
    c.write_inline_from_writers = 3;
    let s = open(&c);
    let ok = |r: Result<orlop_engine::BlobWriter, Error>| r.unwrap_or_else(|e| panic!("{e}"));
    let mut a = ok(s.writer(None));
    let mut b = ok(s.writer(None));
    let mut third = ok(s.writer(None));
    assert_eq!(
        (a.is_inline(), b.is_inline(), third.is_inline()),
        (false, false, true)
    );
    // Interleaved pieces, shared chunks among them, a checkpoint on the
    // inline one: each blob reads back, and the store is clean.
    let common = noise(3, 40_000);
    let datas: Vec<Vec<u8>> = (0..3u64)
        .map(|i| [common.clone(), noise(10 + i, 50_000), text(20 + i, 30_000)].concat())
        .collect();
    for off in (0..datas[0].len()).step_by(9_000) {
        for (w, d) in [&mut a, &mut b, &mut third].into_iter().zip(&datas) {
            let end = (off + 9_000).min(d.len());
            w.write(Bytes::copy_from_slice(&d[off..end]))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        if off == 54_000 {
            let held = third.checkpoint(b"t").unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(held, 63_000);
        }
    }
    let infos: Vec<_> = [a, b, third]
        .into_iter()
        .map(|w| w.commit().unwrap_or_else(|e| panic!("{e}")))
        .collect();
    for (info, d) in infos.iter().zip(&datas) {
        assert_eq!(info.digest, Digest::sha256_of(d));
        assert!(&s.get(&info.digest).unwrap_or_else(|e| panic!("{e}")) == d);
    }
    assert_clean(&s);
    // With the others gone, a lone writer runs its own threads again; an
    // aborted inline writer leaves nothing behind.
    let lone = ok(s.writer(None));
    assert!(!lone.is_inline());
    let (mut x, mut y) = (ok(s.writer(None)), ok(s.writer(None)));
    assert!(y.is_inline());
    y.write(Bytes::from(noise(77, 30_000)))
        .unwrap_or_else(|e| panic!("{e}"));
    x.write(Bytes::from(noise(78, 30_000)))
        .unwrap_or_else(|e| panic!("{e}"));
    y.abort();
    drop(x);
    drop(lone);
    let r = s.verify().unwrap_or_else(|e| panic!("{e}"));
    assert!(r.is_clean(), "{:#?}", r.problems);
    assert_eq!(r.pending_writes, 0);
}

/// A writer parked at a checkpoint (an upload session between requests, or
/// one its client left) does not count among the busy writers that make a
/// new one cut inline; once it writes again, it does.
#[test]
fn parked_writers_do_not_make_new_ones_inline() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut c = small_config(dir.path());
    c.write_inline_from_writers = 2;
    let s = open(&c);
    let ok = |r: Result<orlop_engine::BlobWriter, Error>| r.unwrap_or_else(|e| panic!("{e}"));
    let put = |w: &mut orlop_engine::BlobWriter, d: &[u8]| {
        w.write(Bytes::copy_from_slice(d))
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let datas: Vec<Vec<u8>> = (0..3u64).map(|i| noise(40 + i, 60_000)).collect();
    let mut a = ok(s.writer(None));
    put(&mut a, &datas[0][..30_000]);
    assert_eq!(a.checkpoint(b"a").unwrap_or_else(|e| panic!("{e}")), 30_000);
    let mut b = ok(s.writer(None));
    assert!(!b.is_inline(), "a parked writer counted as busy");
    put(&mut a, &datas[0][30_000..]);
    let mut third = ok(s.writer(None));
    assert!(third.is_inline(), "a writer writing again did not count");
    put(&mut b, &datas[1]);
    put(&mut third, &datas[2]);
    for (w, d) in [a, b, third].into_iter().zip(&datas) {
        let info = w.commit().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(info.digest, Digest::sha256_of(d));
        assert!(&s.get(&info.digest).unwrap_or_else(|e| panic!("{e}")) == d);
    }
    // Parked, then dropped: the count forgets it.
    let mut p = ok(s.writer(None));
    put(&mut p, &datas[0][..10_000]);
    p.checkpoint(b"p").unwrap_or_else(|e| panic!("{e}"));
    let held = p.recipe();
    p.detach();
    let (x, y) = (ok(s.writer(None)), ok(s.writer(None)));
    assert_eq!((x.is_inline(), y.is_inline()), (false, true));
    drop((x, y));
    s.abort_held(held).unwrap_or_else(|e| panic!("{e}"));
    assert_clean(&s);
}

#[test]
fn io_uring_backend_or_clean_fallback() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = small_config(dir.path());
    cfg.io = orlop_engine::IoBackend::Auto;
    let s = open(&cfg);
    let uring_ok = orlop_engine::io::UringIo::new().is_ok();
    assert_eq!(s.io_backend(), if uring_ok { "io_uring" } else { "pread" });
    let data = noise(10, 300_000);
    let d = s.put(&data, None).unwrap_or_else(|e| panic!("{e}")).digest;
    assert_eq!(s.get(&d).unwrap_or_else(|e| panic!("{e}")), data);
    assert_clean(&s);
}

/// A blob over 4 GiB, streamed from a generator and never held in memory.
/// Its 1 MiB blocks repeat (64 distinct), so the store holds ~64 MiB.
#[test]
fn blob_larger_than_4_gib_streams() {
    const BLOCK: usize = 1 << 20;
    const BLOCKS: u64 = 4 * 1024 + 17;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = small_config(dir.path());
    cfg.chunk = orlop_engine::ChunkParams::default();
    cfg.segment_bytes = 32 << 20;
    let s = open(&cfg);
    let palette: Vec<Bytes> = (0..64)
        .map(|i| Bytes::from(noise(1000 + i, BLOCK)))
        .collect();
    let block = |i: u64| palette[((i * 7) % 64) as usize].clone();
    let mut w = s.writer(None).unwrap_or_else(|e| panic!("{e}"));
    let mut h = sha2::Sha256::new();
    for i in 0..BLOCKS {
        let b = block(i);
        h.update(&b);
        w.write(b).unwrap_or_else(|e| panic!("{e}"));
    }
    let expected = Digest::new(orlop_engine::DigestAlgorithm::Sha256, &h.finalize())
        .unwrap_or_else(|e| panic!("{e}"));
    let info = w.commit().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(info.digest, expected);
    assert_eq!(info.size, BLOCKS * BLOCK as u64);
    assert!(info.size > 4 << 30);
    // A range that straddles the 4 GiB boundary.
    let off = (4u64 << 30) - 1000;
    let mut r = s
        .range_reader(&info.digest, off, 3000)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut r, &mut got).unwrap_or_else(|e| panic!("{e}"));
    let mut want = Vec::new();
    for i in (off / BLOCK as u64)..=((off + 3000) / BLOCK as u64) {
        want.extend_from_slice(&block(i));
    }
    let skip = (off % BLOCK as u64) as usize;
    assert!(got == want[skip..skip + 3000]);
    let st = s.stats().unwrap_or_else(|e| panic!("{e}"));
    assert!(st.unique_bytes < 80 << 20, "{st:?}");
}

/// A chunk repeated throughout one blob is stored once and counted per use.
#[test]
fn repeated_chunks_inside_a_blob_are_stored_once() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = open(&small_config(dir.path()));
    let zeros = vec![0u8; 2 << 20];
    let info = s.put(&zeros, None).unwrap_or_else(|e| panic!("{e}"));
    assert!(info.chunk_count >= 256, "{info:?}");
    let st = s.stats().unwrap_or_else(|e| panic!("{e}"));
    assert!(st.chunks <= 2, "{st:?}");
    let rep = s.verify().unwrap_or_else(|e| panic!("{e}"));
    assert!(rep.is_clean(), "{:?}", rep.problems);
    assert_eq!(rep.dead_records, 0, "no duplicate records were appended");
    assert_eq!(s.get(&info.digest).unwrap_or_else(|e| panic!("{e}")), zeros);
}

/// A store whose creation was cut short, with its key file half written,
/// or after RocksDB made its files but before the first (meta) batch, opens
/// as a new store; a store with data but no format version is still refused.
#[test]
fn interrupted_creation_opens_as_a_new_store() {
    let want = noise(5, 30_000);
    // Killed while writing the key: a partial temporary key file only.
    let a = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = small_config(a.path());
    cfg.key = KeySource::Default;
    std::fs::write(a.path().join("store.key.new"), b"orlop-k").unwrap_or_else(|e| panic!("{e}"));
    let s = open(&cfg);
    s.put(&want, None).unwrap_or_else(|e| panic!("{e}"));
    assert_clean(&s);
    drop(s);
    assert!(!a.path().join("store.key.new").exists());
    assert!(a.path().join("store.key").exists());

    // Killed after the key and RocksDB's files, before the meta batch.
    let b = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = small_config(b.path());
    cfg.key = KeySource::Default;
    orlop_engine::MasterKey::generate()
        .and_then(|k| k.write_file(&b.path().join("store.key")))
        .unwrap_or_else(|e| panic!("{e}"));
    drop(
        orlop_engine::index::Index::open(&b.path().join("index"), false, &[])
            .unwrap_or_else(|e| panic!("{e}")),
    );
    assert!(b.path().join("index/CURRENT").exists());
    let s = open(&cfg);
    let info = s.put(&want, None).unwrap_or_else(|e| panic!("{e}"));
    assert_clean(&s);
    drop(s);
    let s = open(&cfg);
    assert_eq!(s.get(&info.digest).unwrap_or_else(|e| panic!("{e}")), want);
    drop(s);

    // An index with entries but no format version is damage, not a new store.
    let other = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg2 = small_config(other.path());
    drop(open(&cfg2));
    {
        let ix = orlop_engine::index::Index::open(&other.path().join("index"), false, &[])
            .unwrap_or_else(|e| panic!("{e}"));
        let meta = ix
            .cf(orlop_engine::index::CF_META)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut b = rocksdb::WriteBatch::default();
        b.delete_cf(meta, orlop_engine::index::META_FORMAT_VERSION);
        ix.write_synced(b).unwrap_or_else(|e| panic!("{e}"));
    }
    match Store::open(cfg2) {
        Err(Error::CorruptIndex { .. }) => {}
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("a store without its format version opened"),
    }
}

/// Batches of large chunks (8 of up to 1 MiB each are appended together)
/// fill the 1 MiB append buffer several times over (a full buffer is
/// written after the append lock is released, so the batch lets it go and
/// takes it again), hold records larger than the buffer, and run past the
/// end of a segment in the middle. Every chunk lands where its location
/// says, for a threaded and an inline writer, before and after a reopen.
#[test]
fn a_batch_spanning_buffers_and_segments_lands_whole() {
    for seed in [0u64, 1] {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut cfg = small_config(dir.path());
        inline_by_seed(&mut cfg, seed);
        cfg.chunk = orlop_engine::ChunkParams {
            min_bytes: 256 << 10,
            avg_bytes: 512 << 10,
            max_bytes: 1 << 20,
        };
        cfg.segment_bytes = 5 << 20;
        let data = noise(40 + seed, 40 << 20);
        let digest = {
            let s = open(&cfg);
            let mut w = s.writer(None).unwrap_or_else(|e| panic!("{e}"));
            w.write(Bytes::from(data.clone()))
                .unwrap_or_else(|e| panic!("{e}"));
            let info = w.commit().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(s.get(&info.digest).unwrap_or_else(|e| panic!("{e}")), data);
            let st = s.stats().unwrap_or_else(|e| panic!("{e}"));
            assert!(st.segments.len() >= 4, "seed {seed}: {st:?}");
            assert_clean(&s);
            info.digest
        };
        let s = open(&cfg);
        assert_eq!(s.get(&digest).unwrap_or_else(|e| panic!("{e}")), data);
        assert_clean(&s);
    }
}
