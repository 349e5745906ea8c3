//! `rebuild_index`: a new RocksDB index made from the segments alone, for a
//! store whose index was lost or is corrupt (`orlop rebuild-index`).
//!
//! Every segment is scanned (records whose CRC checks; a torn tail ends a
//! scan). Chunk records give each chunk a location. The metadata journal
//! (`crate::journal`) gives the rest: each blob's latest blob record whose
//! recipe parts are all present and whose chunks are all found becomes a
//! blob entry (reference count 0: the layers above recount theirs from
//! their rows, as `Registry::repair_refs` does), chunk counts are recounted
//! from the chosen recipes, and the transactions are replayed in sequence
//! order into the layers' column families (one with a part missing is
//! skipped). Held (resumable) writes are not journaled and are lost: their
//! clients upload again. A blob collected before the loss whose records a
//! compaction had not yet dropped comes back unreferenced, and the next
//! collection takes it again.

use crate::config::StoreConfig;
use crate::crypto::ChunkCipher;
use crate::error::{Error, Result};
use crate::ids::{ChunkId, Digest, RecipeId, SegmentId};
use crate::index::codec::{recipe_key, BlobEntry, ChunkEntry, Location, RecipePart, SegmentEntry};
use crate::index::*;
use crate::io::OpenMode;
use crate::journal::{BlobRecord, RecipeRecord, Replay, TxnRecord, VoidRecord};
use crate::keys::MasterKey;
use crate::read::open_with;
use crate::segment::format::{
    SegmentHeader, HEADER_BYTES, KIND_BLOB, KIND_CHUNK, KIND_RECIPE, KIND_TXN, KIND_VOID,
};
use crate::segment::scan_segment_records;
use crate::verify::Progress;
use rocksdb::WriteBatch;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Index writes per batch while rebuilding.
const REBUILD_BATCH_OPS: usize = 16 * 1024;

/// What a rebuild found and wrote.
#[derive(Clone, Debug, Default)]
pub struct RebuildReport {
    pub segments: u64,
    /// Segments skipped: unreadable header, or another store's.
    pub segments_skipped: u64,
    pub records: u64,
    /// Chunks named by the blobs rebuilt.
    pub chunks: u64,
    pub blobs: u64,
    /// Blobs the journal names that could not be rebuilt (a recipe part or
    /// a chunk is missing): their digests.
    pub blobs_lost: Vec<Digest>,
    /// Transactions replayed, and those skipped for a missing part.
    pub transactions: u64,
    pub transactions_incomplete: u64,
    /// Puts and deletes replayed into the layers' column families.
    pub rows: u64,
    /// Journal records that failed authentication or decoding.
    pub records_damaged: u64,
    /// The segments hold chunks but no journal (a store written before the
    /// journal existed): the rebuilt index has no blob in it.
    pub journal_missing: bool,
    pub elapsed: Duration,
}

/// What the scan of the segments gathered.
#[derive(Default)]
struct Found {
    store_id: Option<[u8; 16]>,
    max_segment: u64,
    sealed: Vec<(SegmentId, u64)>,
    chunks: HashMap<ChunkId, Location>,
    parts: HashMap<(RecipeId, u32), RecipePart>,
    blobs: HashMap<Digest, Vec<BlobRecord>>,
    replay: Replay,
    authentic: u64,
    /// A chunk record authenticated (or failed to) under the key.
    chunk_key_ok: bool,
    chunk_key_failed: bool,
}

/// Rebuilds the index of the store `cfg` names from its segments. The
/// index directory must not hold an index (move a damaged one aside).
pub fn rebuild_index(
    cfg: &StoreConfig,
    progress: &mut dyn FnMut(Progress),
) -> Result<RebuildReport> {
    let started = Instant::now();
    let dir = &cfg.data_dir;
    let index_dir = dir.join("index");
    if index_dir.join("CURRENT").exists() {
        return Err(Error::Config(format!(
            "{} holds an index; move it aside before rebuilding",
            index_dir.display()
        )));
    }
    let key = MasterKey::load(&cfg.key, dir, false)?;
    let sub = key.subkeys();
    let mut rep = RebuildReport::default();
    let found = scan_all(cfg, &key, &sub.naming, &mut rep, progress)?;
    // No segment at all: the store held nothing (compaction may have
    // emptied every segment), and an empty index under a new id is it.
    let store_id = match found.store_id {
        Some(id) => id,
        None => {
            let mut id = [0u8; 16];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
                .map_err(|_| Error::Config("system random generator failed".into()))?;
            id
        }
    };
    if found.authentic == 0
        && !found.chunk_key_ok
        && (rep.records_damaged > 0 || found.chunk_key_failed)
    {
        // Not one record authenticates: the key is not this store's.
        return Err(Error::WrongKey);
    }
    rep.journal_missing = found.authentic == 0 && !found.chunks.is_empty();
    std::fs::create_dir_all(&index_dir).map_err(|e| Error::io(&index_dir, e))?;
    let index = Index::open(&index_dir, false, &cfg.extra_column_families)?;
    let mut w = Writer {
        index: &index,
        batch: WriteBatch::default(),
        ops: 0,
    };
    write_blobs(&mut w, &found, &mut rep)?;
    write_rows(&mut w, &found, cfg, &mut rep)?;
    for (id, data_end) in &found.sealed {
        let e = SegmentEntry {
            sealed: true,
            durable_len: *data_end,
        };
        w.put(CF_SEGMENTS, &id.0.to_be_bytes(), &e.encode())?;
    }
    // Past every recipe the journal names (an empty blob's has no parts).
    let next_recipe = found
        .parts
        .keys()
        .map(|(r, _)| r.0)
        .chain(found.blobs.values().flatten().map(|b| b.recipe.0))
        .max()
        .unwrap_or(0)
        .saturating_add(1);
    // Past every number the log holds (the next open starts a new epoch).
    let next_seq = found.replay.max_seq() + 1;
    w.put(CF_META, META_NEXT_RECIPE, &next_recipe.to_le_bytes())?;
    w.put(CF_META, META_NEXT_TXN_SEQ, &next_seq.to_le_bytes())?;
    w.put(
        CF_META,
        META_NEXT_SEGMENT,
        &found.max_segment.saturating_add(1).to_le_bytes(),
    )?;
    w.put(CF_META, META_STORE_ID, &store_id)?;
    w.put(CF_META, META_KEY_CHECK, &sub.check)?;
    // Last, so that an interrupted rebuild leaves no index a store opens.
    w.put(
        CF_META,
        META_FORMAT_VERSION,
        &INDEX_FORMAT_VERSION.to_le_bytes(),
    )?;
    w.flush(true)?;
    rep.elapsed = started.elapsed();
    Ok(rep)
}

fn scan_all(
    cfg: &StoreConfig,
    key: &MasterKey,
    naming: &[u8; 32],
    rep: &mut RebuildReport,
    progress: &mut dyn FnMut(Progress),
) -> Result<Found> {
    let seg_dir = cfg.data_dir.join("segments");
    let mut ids: Vec<SegmentId> = std::fs::read_dir(&seg_dir)
        .map_err(|e| Error::io(&seg_dir, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(SegmentId::parse_file_name))
        .collect();
    ids.sort();
    let io = crate::store::pick_io(&cfg.io)?;
    let mut found = Found::default();
    let mut cipher: Option<ChunkCipher> = None;
    let total = ids.len() as u64;
    for (n, id) in ids.into_iter().enumerate() {
        let path = seg_dir.join(id.file_name());
        // Read-write: what the new index records as durable is synced first
        // (the files may hold bytes a crash never let reach the disk).
        let file = io
            .open(&path, OpenMode::ReadWrite)
            .map_err(|e| Error::io(&path, e))?;
        file.sync().map_err(|e| Error::io(&path, e))?;
        let mut hb = [0u8; HEADER_BYTES as usize];
        let header = file
            .read_at(&mut hb, 0)
            .ok()
            .and_then(|_| SegmentHeader::decode(&hb).ok())
            .filter(|h| h.segment == id && found.store_id.is_none_or(|s| s == h.store_id));
        let Some(header) = header else {
            tracing::warn!(segment = %id, "skipping a segment whose header is unreadable or another store's");
            rep.segments_skipped += 1;
            continue;
        };
        let store_id = header.store_id;
        found.store_id = Some(store_id);
        found.max_segment = found.max_segment.max(id.0);
        let cipher = cipher.get_or_insert_with(|| ChunkCipher::new(&key.encryption_key(&store_id)));
        rep.segments += 1;
        let scan = scan_segment_records(&*file, |off, h, rec| {
            rep.records += 1;
            let loc = Location {
                segment: id,
                offset: off as u32,
                payload_len: h.payload_len,
                raw_len: h.raw_len,
                flags: h.flags,
            };
            if h.kind == KIND_CHUNK {
                // The key is checked on chunks too, while no journal record
                // has authenticated yet (a store without a journal).
                if found.authentic == 0 && !found.chunk_key_ok && found.chunks.len() < 4 {
                    match open_with(cipher, naming, &loc, rec) {
                        Ok(_) => found.chunk_key_ok = true,
                        Err(_) => found.chunk_key_failed = true,
                    }
                }
                found.chunks.entry(h.chunk).or_insert(loc);
                return true;
            }
            let gathered = open_with(cipher, naming, &loc, rec)
                .and_then(|(h, plain)| gather(&mut found, h.kind, &plain));
            match gathered {
                Ok(()) => found.authentic += 1,
                Err(e) => {
                    tracing::warn!(segment = %id, offset = off, error = %e, "skipping a damaged journal record");
                    rep.records_damaged += 1;
                }
            }
            true
        })
        .map_err(|e| Error::io(&path, e))?;
        if scan.footer.is_some() {
            found.sealed.push((id, scan.data_end));
        }
        progress(Progress {
            phase: "scan",
            done: n as u64 + 1,
            total,
        });
    }
    Ok(found)
}

fn gather(found: &mut Found, kind: u8, plain: &[u8]) -> Result<()> {
    match kind {
        KIND_RECIPE => {
            let r = RecipeRecord::decode(plain)?;
            found.parts.insert((r.recipe, r.part_no), r.part);
        }
        KIND_BLOB => {
            let b = BlobRecord::decode(plain)?;
            found.blobs.entry(b.digest.clone()).or_default().push(b);
        }
        KIND_TXN => found.replay.add_txn(TxnRecord::decode(plain)?),
        KIND_VOID => found.replay.add_void(VoidRecord::decode(plain)?),
        _ => {}
    }
    Ok(())
}

/// The recipe of a blob record, when every part and chunk is there.
fn complete_recipe<'a>(found: &'a Found, b: &BlobRecord) -> Option<Vec<&'a RecipePart>> {
    let mut parts = Vec::with_capacity(b.parts as usize);
    let (mut size, mut count) = (0u64, 0u64);
    for p in 0..b.parts {
        let part = found.parts.get(&(b.recipe, p))?;
        if part.start != size {
            return None;
        }
        for e in &part.entries {
            let loc = found.chunks.get(&e.chunk)?;
            if loc.raw_len != e.raw_len {
                return None;
            }
            size += e.raw_len as u64;
            count += 1;
        }
        parts.push(part);
    }
    (size == b.size && count == b.chunk_count).then_some(parts)
}

fn write_blobs(w: &mut Writer, found: &Found, rep: &mut RebuildReport) -> Result<()> {
    let mut refs: HashMap<ChunkId, u64> = HashMap::new();
    for (digest, records) in &found.blobs {
        let mut records: Vec<&BlobRecord> = records.iter().collect();
        records.sort_by_key(|b| std::cmp::Reverse(b.created_unix_ms));
        let chosen = records
            .iter()
            .find_map(|b| complete_recipe(found, b).map(|parts| (*b, parts)));
        let Some((b, parts)) = chosen else {
            rep.blobs_lost.push(digest.clone());
            continue;
        };
        for (p, part) in parts.iter().enumerate() {
            for e in &part.entries {
                *refs.entry(e.chunk).or_insert(0) += 1;
            }
            w.put(CF_RECIPES, &recipe_key(b.recipe, p as u32), &part.encode())?;
        }
        let entry = BlobEntry {
            size: b.size,
            recipe: b.recipe,
            chunk_count: b.chunk_count,
            refs: 0,
            created_unix_ms: b.created_unix_ms,
        };
        w.put(CF_BLOBS, &digest.to_key(), &entry.encode())?;
        rep.blobs += 1;
    }
    for (id, n) in refs {
        if let Some(loc) = found.chunks.get(&id) {
            let e = ChunkEntry { loc: *loc, refs: n };
            w.put(CF_CHUNKS, &id.0, &e.encode())?;
            rep.chunks += 1;
        }
    }
    rep.blobs_lost.sort();
    Ok(())
}

fn write_rows(
    w: &mut Writer,
    found: &Found,
    cfg: &StoreConfig,
    rep: &mut RebuildReport,
) -> Result<()> {
    let (changes, applied, incomplete) = found.replay.changes();
    rep.transactions = applied;
    rep.transactions_incomplete = incomplete;
    for (cf, key, value) in changes {
        if !cfg.extra_column_families.iter().any(|c| c == cf) {
            continue;
        }
        let h = w.index.extra_cf(cf)?;
        match value {
            Some(v) => w.batch.put_cf(h, key, v),
            None => w.batch.delete_cf(h, key),
        }
        rep.rows += 1;
        w.tick()?;
    }
    Ok(())
}

/// Batched writes into the new index.
struct Writer<'a> {
    index: &'a Index,
    batch: WriteBatch,
    ops: usize,
}

impl Writer<'_> {
    fn put(&mut self, cf: &str, key: &[u8], value: &[u8]) -> Result<()> {
        self.batch.put_cf(self.index.cf(cf)?, key, value);
        self.tick()
    }

    fn tick(&mut self) -> Result<()> {
        self.ops += 1;
        if self.ops >= REBUILD_BATCH_OPS {
            self.flush(false)?;
        }
        Ok(())
    }

    fn flush(&mut self, synced: bool) -> Result<()> {
        let batch = std::mem::take(&mut self.batch);
        self.ops = 0;
        if synced {
            self.index.write_synced(batch)
        } else {
            self.index.write_unsynced(batch)
        }
    }
}
