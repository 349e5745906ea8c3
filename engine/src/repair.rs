//! `Store::repair`: what `orlop fsck --repair` does to the engine's half of
//! a store, on a stopped store (the tool opens it writable, so RocksDB's lock
//! keeps a server out).
//!
//! - A damaged chunk (its record fails its CRC, AEAD tag or name, or its
//!   segment is gone) that recipes still name is *quarantined*: its raw
//!   record is copied aside to `<data>/quarantine/` for inspection and its
//!   entry loses its location (`ChunkEntry::quarantined`), keeping its
//!   count. A chunk recipes name that has no entry at all gets such an
//!   entry too. Readers refuse quarantined chunks (`Error::ChunkQuarantined`)
//!   instead of reading bytes that would not check anyway; the next write of
//!   the same content stores a fresh copy and the committer gives the entry
//!   that home again, which restores every blob that names it.
//! - A damaged chunk nothing names is dropped (compaction reclaims its
//!   record with the segment).
//! - Every chunk's count is set to the recount over all recipes.
//! - Blobs that name a quarantined chunk are marked *broken* (`broken`
//!   column family), so a read fails at once with `Error::BlobBroken` rather
//!   than partway through; marks of blobs restored since are cleared.
//!
//! The quarantine, the counts and the marks go through the committer in
//! one synced batch; then damaged segments are rewritten by compaction
//! (without their damaged records) and the journal records damage took are
//! written again.

use crate::commit::{Overlay, Request};
use crate::compact::CompactOptions;
use crate::error::Result;
use crate::ids::{ChunkId, Digest, SegmentId};
use crate::index::codec::{BlobEntry, ChunkEntry};
use crate::index::{Index, CF_BLOBS, CF_BROKEN};
use crate::read::count_quarantined;
use crate::store::{now_unix_ms, Inner, Store};
use crate::txn::Txn;
use crate::verify::{Problem, Progress, VerifyReport};
use rocksdb::WriteBatch;
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

/// One chunk quarantined by a repair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuarantinedChunk {
    pub chunk: ChunkId,
    /// Where its damaged record was (`None`: the index had no entry).
    pub segment: Option<SegmentId>,
    pub offset: u32,
    /// Recipe entries that name it.
    pub references: u64,
    pub reason: String,
}

/// A blob that names quarantined chunks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokenBlob {
    pub digest: Digest,
    /// Recipe entries naming a quarantined chunk.
    pub chunks: u64,
}

/// What a repair found and did.
#[derive(Clone, Debug, Default)]
pub struct RepairReport {
    /// verify() before the repair.
    pub before: VerifyReport,
    /// Chunks quarantined by this run.
    pub quarantined: Vec<QuarantinedChunk>,
    /// Damaged chunks that nothing named, dropped.
    pub damaged_dropped: u64,
    /// Chunk counts set to the recount (quarantined ones included).
    pub counts_fixed: u64,
    /// Every blob broken after the run (earlier runs' included).
    pub broken: Vec<BrokenBlob>,
    /// Broken marks cleared: their chunks were stored again since.
    pub restored: u64,
    /// Damaged segments rewritten without their damaged records.
    pub segments_rewritten: u64,
    /// Journal records written again from the index (damage took them):
    /// blobs, and row changes.
    pub rejournaled_blobs: u64,
    pub rejournaled_rows: u64,
    /// Problems a repair cannot fix (a corrupt recipe or blob entry, a
    /// damaged segment footer): reported, left as they are.
    pub unrepaired: Vec<Problem>,
    pub dry_run: bool,
    pub elapsed: Duration,
}

/// Writes changed chunk entries into the group's overlay; a quarantined
/// entry left without references is deleted (no recipe names it, and a
/// writer never deduplicates against it, so nothing will).
pub(crate) fn settle(ov: &mut Overlay, changed: impl IntoIterator<Item = (ChunkId, ChunkEntry)>) {
    for (id, c) in changed {
        if c.is_quarantined() && c.refs == 0 {
            ov.chunks.remove(&id);
            ov.removed_chunks.insert(id);
        } else {
            ov.chunks.insert(id, c);
        }
    }
}

/// The committer's half: chunk entries to write or delete, broken marks to
/// set or clear.
#[derive(Default)]
pub(crate) struct RepairPlan {
    pub chunks: Vec<(ChunkId, Option<ChunkEntry>)>,
    pub broken: Vec<(Digest, Option<u64>)>,
}

pub(crate) fn apply(
    index: &Index,
    ov: &mut Overlay,
    batch: &mut WriteBatch,
    plan: RepairPlan,
) -> Result<()> {
    for (id, e) in plan.chunks {
        match e {
            Some(e) => {
                ov.chunks.insert(id, e);
            }
            None => {
                ov.chunks.remove(&id);
                ov.removed_chunks.insert(id);
            }
        }
    }
    let cf = index.cf(CF_BROKEN)?;
    for (d, chunks) in plan.broken {
        match chunks {
            Some(n) => {
                index.note_broken();
                let mut v = [0u8; 16];
                v[..8].copy_from_slice(&n.to_le_bytes());
                v[8..].copy_from_slice(&now_unix_ms().to_le_bytes());
                batch.put_cf(cf, d.to_key(), v);
            }
            None => batch.delete_cf(cf, d.to_key()),
        }
    }
    Ok(())
}

impl Store {
    /// Repairs what verify() finds that can be repaired (see the module
    /// documentation); with `dry_run`, reports what it would do. Run it on
    /// a store no server has open.
    pub fn repair(
        &self,
        dry_run: bool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<RepairReport> {
        let started = Instant::now();
        let inner = self.inner();
        let before = self.verify_with_progress(progress)?;
        let mut rep = RepairReport {
            dry_run,
            ..RepairReport::default()
        };
        let mut plan: BTreeMap<ChunkId, Option<ChunkEntry>> = BTreeMap::new();
        let mut recount: BTreeMap<ChunkId, u64> = BTreeMap::new();
        let mut damaged_segments: HashSet<SegmentId> = HashSet::new();
        for p in &before.problems {
            match p {
                Problem::RefcountMismatch { chunk, actual, .. } => {
                    recount.insert(*chunk, *actual);
                }
                Problem::SegmentDamaged { segment, .. } => {
                    damaged_segments.insert(*segment);
                }
                Problem::ChunkCorrupt { .. }
                | Problem::ChunkMissing { .. }
                | Problem::BlobUnreadable { .. }
                | Problem::DanglingChunk { .. }
                | Problem::JournalIncomplete { .. } => {}
                other => rep.unrepaired.push(other.clone()),
            }
        }
        for p in &before.problems {
            match p {
                Problem::ChunkCorrupt { chunk, error } => {
                    let Some(e) = inner.index.chunk(chunk)? else {
                        continue;
                    };
                    let refs = recount.get(chunk).copied().unwrap_or(e.refs);
                    if refs == 0 {
                        rep.damaged_dropped += 1;
                        plan.insert(*chunk, None);
                        continue;
                    }
                    if !dry_run {
                        keep_aside(inner, chunk, &e);
                    }
                    damaged_segments.insert(e.loc.segment);
                    rep.quarantined.push(QuarantinedChunk {
                        chunk: *chunk,
                        segment: Some(e.loc.segment),
                        offset: e.loc.offset,
                        references: refs,
                        reason: error.clone(),
                    });
                    plan.insert(*chunk, Some(ChunkEntry::quarantined(e.loc.raw_len, refs)));
                }
                Problem::ChunkMissing {
                    chunk,
                    references,
                    raw_len,
                } => {
                    rep.quarantined.push(QuarantinedChunk {
                        chunk: *chunk,
                        segment: None,
                        offset: 0,
                        references: *references,
                        reason: "named by recipes but missing from the index".into(),
                    });
                    plan.insert(*chunk, Some(ChunkEntry::quarantined(*raw_len, *references)));
                }
                _ => {}
            }
        }
        for (chunk, actual) in &recount {
            rep.counts_fixed += 1;
            if plan.contains_key(chunk) {
                continue;
            }
            if let Some(mut e) = inner.index.chunk(chunk)? {
                e.refs = *actual;
                plan.insert(*chunk, Some(e));
            }
        }
        // Broken marks follow the chunks' state after the change, which is
        // applied with them in one batch: no quarantined chunk goes
        // without its blobs' marks.
        let mut marks = Vec::new();
        for kv in inner.index.scan(CF_BLOBS)? {
            let (k, v) = kv?;
            let (Ok(d), Ok(b)) = (Digest::from_key(&k), BlobEntry::decode(&v)) else {
                continue;
            };
            let n = would_be_broken(inner, &b, &plan)?;
            let marked = inner.index.broken(&d)?;
            if n > 0 {
                rep.broken.push(BrokenBlob {
                    digest: d.clone(),
                    chunks: n,
                });
                marks.push((d, Some(n)));
            } else if marked {
                rep.restored += 1;
                marks.push((d, None));
            }
        }
        if !dry_run && (!plan.is_empty() || !marks.is_empty()) {
            let chunks = plan.iter().map(|(k, v)| (*k, *v)).collect();
            inner.request(|reply| Request::Repair {
                plan: RepairPlan {
                    chunks,
                    broken: marks,
                },
                reply,
            })?;
        }
        if !dry_run {
            self.rewrite_damaged(&damaged_segments, &before, &mut rep, progress)?;
            self.rejournal(&mut rep, progress)?;
        } else {
            rep.unrepaired.extend(
                before
                    .problems
                    .iter()
                    .filter(|p| matches!(p, Problem::SegmentDamaged { .. }))
                    .cloned(),
            );
        }
        rep.before = before;
        rep.elapsed = started.elapsed();
        Ok(rep)
    }

    /// Compacts the damaged segments (their damaged records are left
    /// behind, live records copied); a segment that cannot be rewritten
    /// stays reported.
    fn rewrite_damaged(
        &self,
        segments: &HashSet<SegmentId>,
        before: &VerifyReport,
        rep: &mut RepairReport,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<()> {
        if segments.is_empty() {
            return Ok(());
        }
        let opts = CompactOptions {
            only: Some(segments.clone()),
            segments_max: segments.len(),
            writer_wait: Duration::from_secs(10),
            ..CompactOptions::default()
        };
        let r = self.compact(&opts, progress)?;
        rep.segments_rewritten = r.segments_removed;
        let left: HashSet<SegmentId> = self.inner().segments.ids().into_iter().collect();
        rep.unrepaired.extend(
            before
                .problems
                .iter()
                .filter(|p| matches!(p, Problem::SegmentDamaged { segment, .. } if left.contains(segment)))
                .cloned(),
        );
        Ok(())
    }

    /// Writes again the journal records damage took: each blob's from its
    /// entry and recipe, each differing row as a transaction of its current
    /// value (or its deletion).
    fn rejournal(&self, rep: &mut RepairReport, progress: &mut dyn FnMut(Progress)) -> Result<()> {
        let gaps = self.verify_with_progress(progress)?.journal_gaps;
        for digests in gaps.blobs.chunks(REJOURNAL_BATCH) {
            let digests = digests.to_vec();
            rep.rejournaled_blobs += digests.len() as u64;
            self.inner()
                .request(|reply| Request::Rejournal { digests, reply })?;
        }
        for rows in gaps.rows.chunks(REJOURNAL_BATCH) {
            let mut t = Txn::new();
            for (cf, key, value) in rows {
                match value {
                    Some(v) => t.put(cf, key.clone(), v.clone()),
                    None => t.delete(cf, key.clone()),
                }
            }
            rep.rejournaled_rows += rows.len() as u64;
            self.apply(t)?;
        }
        Ok(())
    }
}

/// Blobs or rows journaled again per committer request.
const REJOURNAL_BATCH: usize = 1024;

/// `quarantined_chunks` with the plan applied in memory.
fn would_be_broken(
    inner: &Inner,
    b: &BlobEntry,
    plan: &BTreeMap<ChunkId, Option<ChunkEntry>>,
) -> Result<u64> {
    count_quarantined(inner, b, |id| match plan.get(id) {
        Some(planned) => Ok(*planned),
        None => inner.index.chunk(id),
    })
}

/// Copies a damaged record's raw bytes to `<data>/quarantine/` for whoever
/// investigates the damage; a failure to do so is logged, not fatal (the
/// record stays in its segment until compaction anyway).
fn keep_aside(inner: &Inner, chunk: &ChunkId, e: &ChunkEntry) {
    let dir = inner.cfg.data_dir.join("quarantine");
    let name = format!(
        "seg-{:016x}-{:010}-{chunk}.rec",
        e.loc.segment.0, e.loc.offset
    );
    let kept = inner
        .segments
        .read_raw(&e.loc)
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            std::fs::create_dir_all(&dir)
                .and_then(|_| std::fs::write(dir.join(&name), bytes))
                .map_err(|e| e.to_string())
        });
    match kept {
        Ok(()) => {
            tracing::warn!(%chunk, segment = %e.loc.segment, offset = e.loc.offset, file = %name, "chunk quarantined; its record is kept aside")
        }
        Err(err) => {
            tracing::warn!(%chunk, segment = %e.loc.segment, offset = e.loc.offset, error = %err, "chunk quarantined; its record could not be copied aside")
        }
    }
}
