//! Compaction: sealed segments whose live fraction is low are emptied (their
//! live records copied, unchanged, to the active segment), the index switches
//! to the copies in one committer batch, and the old files are deleted.
//!
//! The protocol (docs/ARCHITECTURE.md, "Compaction"):
//! - *Choosing.* Only sealed segments below every live writer's floor (the
//!   lowest segment its appends, or placements it shares, can be in) and
//!   not named by any staged placement (a held write's) are candidates.
//! - *Retiring.* The chosen segments are published as retiring: from then
//!   on a writer's lookup that finds a chunk stored in one of them writes a
//!   fresh copy instead of deduplicating, and its commit moves the chunk's
//!   entry to that copy. Writers that started before the publication may
//!   have deduplicated against a chunk there without its count showing it
//!   yet, so compaction waits until they have all finished (or gives up
//!   after `writer_wait`, changing nothing).
//! - *Copying.* A record is live when the chunk entry points at it and its
//!   count is above zero or a pending or held write's recipe names it; live
//!   records are copied; a zero-count entry no write names is dropped.
//! - *Switching.* The committer, after the group's segment fsync, moves each
//!   entry that still points at the old record and drops each that still
//!   has no references; then a scan checks that no entry points into the
//!   segments any more (a segment that still has one is kept).
//! - *Deleting.* The segments' index entries go first (synced), then the
//!   files. A reader that looked a chunk up before the switch and finds the
//!   segment gone looks it up again; one already holding the file reads on
//!   (an unlinked file stays readable). A crash anywhere loses nothing: the
//!   copies are dead bytes until the switch, the old segments are dead
//!   bytes after it, and a file whose entry is gone is removed next run.

use crate::commit::{Overlay, Request};
use crate::error::{Error, Result};
use crate::ids::{ChunkId, SegmentId};
use crate::index::codec::{recipe_prefix, ChunkEntry, Location, RecipePart, SegmentEntry};
use crate::index::{Index, CF_CHUNKS, CF_PENDING, CF_RECIPES, CF_SEGMENTS, CF_STAGED};
use crate::pace::Pacer;
use crate::segment::format::{HEADER_BYTES, KIND_CHUNK};
use crate::segment::scan_segment;
use crate::store::{Inner, Store};
use crate::verify::Progress;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Moves sent to the committer per request.
const RELOCATE_BATCH: usize = 4096;

/// What a compaction run may do.
#[derive(Clone, Debug)]
pub struct CompactOptions {
    /// Segments whose live bytes are at most this fraction of their data
    /// are compacted (0.0 only empty ones, 1.0 every sealed segment).
    pub live_fraction_max: f64,
    /// Segments compacted per run at most.
    pub segments_max: usize,
    /// Bytes copied per second at most (0: no bound), so that pushes and
    /// pulls keep their speed.
    pub copy_bytes_per_sec_max: u64,
    /// How long to wait for writers that started before the run.
    pub writer_wait: Duration,
    /// Report what would be compacted without changing anything.
    pub dry_run: bool,
    /// Set to end the run early (before the switch nothing changes).
    pub cancel: Arc<AtomicBool>,
    /// Compact exactly these segments (those that qualify as sealed and
    /// out of every writer's way), whatever their live fraction: a repair
    /// rewrites damaged segments without their damaged records.
    pub only: Option<HashSet<SegmentId>>,
}

impl Default for CompactOptions {
    fn default() -> Self {
        CompactOptions {
            live_fraction_max: 0.5,
            segments_max: 64,
            copy_bytes_per_sec_max: 0,
            writer_wait: Duration::from_secs(60),
            dry_run: false,
            cancel: Arc::default(),
            only: None,
        }
    }
}

/// What one compaction run found and did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompactReport {
    pub segments_scanned: u64,
    /// Segments that met the threshold.
    pub segments_chosen: u64,
    /// Segments emptied and deleted.
    pub segments_removed: u64,
    /// Chosen segments kept: a record could not be read (damage: run fsck)
    /// or an entry still pointed into them.
    pub segments_kept: u64,
    /// Chunk records copied, and the bytes of every record copied.
    pub records_moved: u64,
    /// Journal records still describing the index, copied.
    pub journal_records_moved: u64,
    pub bytes_moved: u64,
    /// Zero-count chunk entries dropped with their segment.
    pub chunks_dropped: u64,
    /// File bytes of the deleted segments, less what was copied out of them.
    pub bytes_reclaimed: u64,
    /// Writers that started before the run did not finish in time; nothing
    /// was changed (the next run tries again).
    pub deferred: bool,
    pub incomplete: bool,
    pub dry_run: bool,
    pub elapsed: Duration,
}

/// One chunk entry to move from a record to its copy.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Move {
    pub id: ChunkId,
    pub from: Location,
    pub to: Location,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct RelocateOutcome {
    pub moved: u64,
    pub dropped: u64,
}

/// A sealed segment and its space.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    id: SegmentId,
    data_bytes: u64,
    live_bytes: u64,
}

/// Clears the retiring set however the run ends.
struct Retiring<'a>(&'a Inner);

impl Drop for Retiring<'_> {
    fn drop(&mut self) {
        self.0.set_retiring(HashSet::new());
    }
}

impl Store {
    /// Compacts sealed segments whose live fraction is at most
    /// `opts.live_fraction_max`, beside reads and writes. See the module
    /// docs for the protocol.
    pub fn compact(
        &self,
        opts: &CompactOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<CompactReport> {
        let started = Instant::now();
        let inner = &**self.inner();
        if !opts.dry_run {
            inner.segments.check_writable()?;
        }
        let mut rep = CompactReport {
            dry_run: opts.dry_run,
            ..CompactReport::default()
        };
        let chosen = choose(inner, opts, &mut rep)?;
        rep.segments_chosen = chosen.len() as u64;
        if opts.dry_run || chosen.is_empty() {
            rep.bytes_reclaimed = chosen
                .iter()
                .map(|c| c.data_bytes.saturating_sub(c.live_bytes))
                .sum();
            rep.elapsed = started.elapsed();
            return Ok(rep);
        }
        let victims: HashSet<SegmentId> = chosen.iter().map(|c| c.id).collect();
        let generation = {
            let mut w = inner.writers.lock().unwrap_or_else(|p| p.into_inner());
            w.generation += 1;
            inner.set_retiring(victims.clone());
            w.generation
        };
        let _retiring = Retiring(inner);
        if !wait_for_writers(inner, generation, opts) {
            rep.deferred = !opts.cancel.load(Ordering::Relaxed);
            rep.incomplete = opts.cancel.load(Ordering::Relaxed);
            rep.elapsed = started.elapsed();
            return Ok(rep);
        }
        let protected = pending_chunks(&inner.index)?;
        let mut damaged: HashSet<SegmentId> = HashSet::new();
        let mut copier = Copier {
            inner,
            pace: Pacer::new(opts.copy_bytes_per_sec_max),
            journal_copied: false,
            moves: Vec::new(),
            drops: Vec::new(),
        };
        let total = chosen.len() as u64;
        for (n, c) in chosen.iter().enumerate() {
            if opts.cancel.load(Ordering::Relaxed) {
                rep.incomplete = true;
                break;
            }
            if let Err(e) = copier.empty(c.id, &protected, &mut rep) {
                if matches!(e, Error::Poisoned | Error::ShuttingDown) {
                    return Err(e);
                }
                tracing::warn!(segment = %c.id, error = %e, "compaction: keeping a segment it could not read");
                damaged.insert(c.id);
            }
            progress(Progress {
                phase: "compact",
                done: n as u64 + 1,
                total,
            });
        }
        copier.flush(&mut rep)?;
        let removable = still_pointed_at(&inner.index, &victims)?;
        let gone: Vec<SegmentId> = chosen
            .iter()
            .map(|c| c.id)
            .filter(|id| !damaged.contains(id) && !removable.contains(id))
            .filter(|_| !rep.incomplete)
            .collect();
        for id in &removable {
            tracing::warn!(segment = %id, "compaction: an entry still points into the segment; keeping it");
        }
        inner.segments.forget(&gone)?;
        for id in &gone {
            inner.segments.remove_sealed(*id)?;
        }
        inner.segments.sync_dir()?;
        let gone_set: HashSet<SegmentId> = gone.iter().copied().collect();
        rep.segments_removed = gone.len() as u64;
        rep.segments_kept = rep.segments_chosen - rep.segments_removed;
        rep.bytes_reclaimed = chosen
            .iter()
            .filter(|c| gone_set.contains(&c.id))
            .map(|c| c.data_bytes.saturating_sub(c.live_bytes))
            .sum();
        rep.elapsed = started.elapsed();
        Ok(rep)
    }
}

/// Sealed segments below every writer's floor, not named by a staged
/// placement, whose live fraction meets the threshold; least live first.
fn choose(inner: &Inner, opts: &CompactOptions, rep: &mut CompactReport) -> Result<Vec<Candidate>> {
    let index = &*inner.index;
    let limit = {
        let w = inner.writers.lock().unwrap_or_else(|p| p.into_inner());
        let floor = inner.segments.append_floor()?.0;
        w.live
            .values()
            .map(|(f, _)| f.load(Ordering::SeqCst))
            .fold(floor, u64::min)
    };
    let mut staged: HashSet<SegmentId> = HashSet::new();
    for kv in index.scan(CF_STAGED)? {
        let (_, v) = kv?;
        staged.insert(Location::decode(&v, CF_STAGED)?.segment);
    }
    let mut sealed: BTreeMap<SegmentId, u64> = BTreeMap::new();
    for kv in index.scan(CF_SEGMENTS)? {
        let (k, v) = kv?;
        let (Some(id), Ok(e)) = (crate::index::codec::u64_be(&k), SegmentEntry::decode(&v)) else {
            continue;
        };
        if e.sealed {
            sealed.insert(SegmentId(id), e.durable_len);
        }
    }
    let mut live: HashMap<SegmentId, u64> = HashMap::new();
    for kv in index.scan(CF_CHUNKS)? {
        let (_, v) = kv?;
        let e = ChunkEntry::decode(&v)?;
        if e.refs > 0 {
            *live.entry(e.loc.segment).or_insert(0) += e.loc.record_len();
        }
    }
    let mut out = Vec::new();
    for id in inner.segments.ids() {
        rep.segments_scanned += 1;
        if id.0 >= limit || staged.contains(&id) {
            continue;
        }
        // A file the index no longer knows (a crash between forgetting a
        // segment and deleting it) holds nothing anyone points at.
        let data_end = match sealed.get(&id) {
            Some(end) => *end,
            None if inner.index.segment(id)?.is_none() => HEADER_BYTES,
            None => continue,
        };
        let data_bytes = data_end.saturating_sub(HEADER_BYTES);
        let mut live_bytes = live.get(&id).copied().unwrap_or(0);
        let fraction = |live: u64| {
            if data_bytes == 0 {
                0.0
            } else {
                live as f64 / data_bytes as f64
            }
        };
        let wanted = match &opts.only {
            Some(only) => only.contains(&id),
            // Journal records that still describe the index are live too
            // (else a segment of them would be copied again every run).
            None if fraction(live_bytes) <= opts.live_fraction_max => {
                live_bytes += live_journal_bytes(inner, id)?;
                fraction(live_bytes) <= opts.live_fraction_max
            }
            None => false,
        };
        if wanted {
            out.push(Candidate {
                id,
                data_bytes,
                live_bytes,
            });
        }
    }
    out.sort_by(|a, b| {
        let fa = a.live_bytes as f64 / a.data_bytes.max(1) as f64;
        let fb = b.live_bytes as f64 / b.data_bytes.max(1) as f64;
        fa.total_cmp(&fb)
    });
    out.truncate(opts.segments_max);
    Ok(out)
}

/// Bytes of a segment's journal records that still describe the index
/// (found by walking the record headers; only journal records are read).
fn live_journal_bytes(inner: &Inner, seg: SegmentId) -> Result<u64> {
    let file = inner.segments.file(seg)?;
    let mut journal = Vec::new();
    crate::segment::walk_headers(&*file, |off, h| {
        if h.kind != KIND_CHUNK {
            journal.push(Location {
                segment: seg,
                offset: off as u32,
                payload_len: h.payload_len,
                raw_len: h.raw_len,
                flags: h.flags,
            });
        }
    })
    .map_err(|e| Error::io(inner.segments.path_of(seg), e))?;
    let mut bytes = 0u64;
    for loc in journal {
        // A record that does not read is not live (the copy skips it too).
        let Ok(record) = inner.segments.read_record(&loc) else {
            continue;
        };
        let Ok((h, plain)) = crate::read::open_any(inner, &loc, record) else {
            continue;
        };
        let _g = inner.journal_lock.lock().unwrap_or_else(|p| p.into_inner());
        if crate::journal::is_live(inner, h.kind, &plain)? {
            bytes += loc.record_len();
        }
    }
    Ok(bytes)
}

/// Waits until no live writer started before `generation`; false when the
/// wait times out or the run is cancelled.
fn wait_for_writers(inner: &Inner, generation: u64, opts: &CompactOptions) -> bool {
    let deadline = Instant::now() + opts.writer_wait;
    loop {
        let old = inner
            .writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .live
            .values()
            .any(|(_, g)| *g < generation);
        if !old {
            return true;
        }
        if Instant::now() >= deadline || opts.cancel.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Chunks named by the recipes of pending and held writes: a commit (or a
/// resume) will need them, whatever their counts say now.
fn pending_chunks(index: &Index) -> Result<HashSet<ChunkId>> {
    let mut out = HashSet::new();
    for kv in index.scan(CF_PENDING)? {
        let (k, _) = kv?;
        let Some(r) = crate::index::codec::u64_be(&k) else {
            continue;
        };
        let prefix = recipe_prefix(crate::ids::RecipeId(r));
        for kv in index.scan_prefix(CF_RECIPES, &prefix)? {
            let (_, v) = kv?;
            out.extend(RecipePart::decode(&v)?.entries.iter().map(|e| e.chunk));
        }
    }
    Ok(out)
}

/// Segments of `victims` that a chunk entry still points into.
fn still_pointed_at(index: &Index, victims: &HashSet<SegmentId>) -> Result<HashSet<SegmentId>> {
    let mut out = HashSet::new();
    for kv in index.scan(CF_CHUNKS)? {
        let (_, v) = kv?;
        let e = ChunkEntry::decode(&v)?;
        if victims.contains(&e.loc.segment) {
            out.insert(e.loc.segment);
        }
    }
    Ok(out)
}

struct Copier<'a> {
    inner: &'a Inner,
    pace: Pacer,
    moves: Vec<Move>,
    drops: Vec<(ChunkId, Location)>,
    /// Journal records copied since the last flush.
    journal_copied: bool,
}

impl Copier<'_> {
    /// Copies a segment's live records and lists its droppable entries.
    fn empty(
        &mut self,
        seg: SegmentId,
        protected: &HashSet<ChunkId>,
        rep: &mut CompactReport,
    ) -> Result<()> {
        let inner = self.inner;
        let file = inner.segments.file(seg)?;
        let mut records = Vec::new();
        let scan = scan_segment(&*file, |off, h| records.push((off, h.clone())))
            .map_err(|e| Error::io(inner.segments.path_of(seg), e))?;
        // A sealed segment's damaged records are skipped by the scan; a
        // live chunk among them still points into the segment, which the
        // check after the switch then keeps. Without a footer nothing past
        // the damage can be found: keep the segment.
        if let (Some(why), None) = (scan.stopped, &scan.footer) {
            return Err(Error::CorruptSegment {
                segment: seg,
                reason: why,
            });
        }
        for (off, h) in records {
            let id = h.chunk;
            if h.kind != KIND_CHUNK {
                let loc = Location {
                    segment: seg,
                    offset: off as u32,
                    payload_len: h.payload_len,
                    raw_len: h.raw_len,
                    flags: h.flags,
                };
                self.copy_journal_record(&loc, rep)?;
                continue;
            }
            let Some(e) = inner.index.chunk(&id)? else {
                continue;
            };
            if e.loc.segment != seg || u64::from(e.loc.offset) != off {
                continue;
            }
            if e.refs == 0 && !protected.contains(&id) {
                self.drops.push((id, e.loc));
                continue;
            }
            let record = inner.segments.read_record(&e.loc)?;
            let to = inner.segments.append_raw(&record)?;
            rep.records_moved += 1;
            rep.bytes_moved += record.len() as u64;
            self.moves.push(Move {
                id,
                from: e.loc,
                to,
            });
            self.pace.wait(rep.bytes_moved);
            if self.moves.len() >= RELOCATE_BATCH {
                self.flush(rep)?;
            }
        }
        Ok(())
    }

    /// Copies a journal record that still describes the index (see
    /// `journal::is_live`); the rest are dropped with the segment.
    fn copy_journal_record(&mut self, loc: &Location, rep: &mut CompactReport) -> Result<()> {
        let inner = self.inner;
        let record = inner.segments.read_record(loc)?;
        let (h, plain) = crate::read::open_any(inner, loc, record.clone())?;
        let live = {
            let _g = inner.journal_lock.lock().unwrap_or_else(|p| p.into_inner());
            crate::journal::is_live(inner, h.kind, &plain)?
        };
        if !live {
            return Ok(());
        }
        inner.segments.append_raw(&record)?;
        rep.journal_records_moved += 1;
        rep.bytes_moved += record.len() as u64;
        // Made durable by the next flush, before the segment goes.
        self.journal_copied = true;
        self.pace.wait(rep.bytes_moved);
        Ok(())
    }

    fn flush(&mut self, rep: &mut CompactReport) -> Result<()> {
        if self.moves.is_empty() && self.drops.is_empty() && !self.journal_copied {
            return Ok(());
        }
        self.journal_copied = false;
        let moves = std::mem::take(&mut self.moves);
        let drops = std::mem::take(&mut self.drops);
        let out = self.inner.request(|reply| Request::Relocate {
            moves,
            drops,
            reply,
        })?;
        rep.chunks_dropped += out.dropped;
        Ok(())
    }
}

/// The committer's half: moves each entry that still points at the record
/// that was copied, drops each listed entry that still points at its record
/// with no references. Anything else changed since the copy is left alone
/// (the segment is then kept by the check that follows).
pub(crate) fn relocate(
    index: &Index,
    ov: &mut Overlay,
    moves: &[Move],
    drops: &[(ChunkId, Location)],
) -> Result<RelocateOutcome> {
    let mut out = RelocateOutcome::default();
    for m in moves {
        if let Some(mut e) = ov.chunk(index, &m.id)? {
            if e.loc == m.from {
                e.loc = m.to;
                ov.chunks.insert(m.id, e);
                out.moved += 1;
            }
        }
    }
    for (id, loc) in drops {
        if let Some(e) = ov.chunk(index, id)? {
            if e.loc == *loc && e.refs == 0 {
                ov.chunks.remove(id);
                ov.removed_chunks.insert(*id);
                out.dropped += 1;
            }
        }
    }
    Ok(out)
}
