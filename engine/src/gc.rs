//! Garbage collection of blobs: a blob whose reference count is zero and
//! whose last commit is older than a grace period is deleted (its entry and
//! recipe), and every chunk its recipe names loses one reference.
//!
//! The protocol (docs/ARCHITECTURE.md, "Garbage collection"):
//! - candidates are found by a scan outside the committer, and the committer
//!   decides again for each one, with the group's latest state: a reference
//!   taken or a commit made since the scan wins;
//! - the grace period covers the gap between a blob's commit and the first
//!   reference a layer above takes on it (the server links an upload, or
//!   records a manifest, in a transaction after the commit), and a blob
//!   written again while unreferenced is renewed (its commit time moves);
//! - chunk entries are never deleted here, even at zero references: a writer
//!   that deduplicated against a chunk, or a held write that names one,
//!   still finds it at its commit (which takes the count from 0 to 1).
//!   Reclaiming the bytes of zero-reference chunks is compaction's job.

use crate::commit::{Overlay, Request};
use crate::error::Result;
use crate::ids::{ChunkId, Digest};
use crate::index::codec::{recipe_prefix, recipe_range, BlobEntry, ChunkEntry, RecipePart};
use crate::index::{Index, CF_BLOBS, CF_RECIPES};
use crate::store::{now_unix_ms, Store};
use crate::verify::Progress;
use rocksdb::WriteBatch;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Candidates sent to the committer per request, and the recipe entries
/// they may hold in all (at least one blob goes), so that a collection run
/// never holds up pushes for long: the committer reads each recipe entry's
/// chunk once.
const COLLECT_BATCH_BLOBS: usize = 128;
const COLLECT_BATCH_ENTRIES: u64 = 1 << 16;
/// Candidates held in memory at once by one run.
const CANDIDATES_MAX: usize = 1 << 20;

/// What a collection run may do.
#[derive(Clone, Debug, Default)]
pub struct GcOptions {
    /// Blobs committed more recently than this are kept.
    pub grace: Duration,
    /// Report what would be freed without changing anything.
    pub dry_run: bool,
    /// Set to end the run early (between batches): a server shutting down.
    pub cancel: Arc<AtomicBool>,
}

/// What one collection run found and freed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Blobs scanned.
    pub blobs_scanned: u64,
    /// Blobs without references.
    pub unreferenced_blobs: u64,
    /// Unreferenced blobs kept because they are within the grace period
    /// (or gained a reference during the run).
    pub kept_young: u64,
    /// Blobs deleted (or, in a dry run, that would be).
    pub blobs_freed: u64,
    /// Their logical size.
    pub bytes_freed: u64,
    /// Chunks whose last reference went with them: their records are now
    /// dead bytes, reclaimable by compaction.
    pub chunks_released: u64,
    /// Stored (record) bytes of those chunks.
    pub chunk_bytes_released: u64,
    /// Candidates skipped because their index entries are damaged (each is
    /// logged; `orlop fsck` names them).
    pub damaged: u64,
    /// The run ended early: cancelled, or more candidates than one run holds
    /// (the next run goes on).
    pub incomplete: bool,
    pub dry_run: bool,
    pub elapsed: Duration,
}

/// What the committer did with one batch of candidates.
#[derive(Clone, Debug, Default)]
pub(crate) struct CollectOutcome {
    pub kept: u64,
    pub damaged: u64,
    pub freed: u64,
    pub bytes: u64,
    pub chunks_released: u64,
    pub chunk_bytes_released: u64,
}

impl Store {
    /// Collects blobs without references whose last commit is older than
    /// `opts.grace`. Runs beside reads and writes; see the module docs for
    /// why that is safe.
    pub fn collect_garbage(
        &self,
        opts: &GcOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<GcReport> {
        let started = Instant::now();
        let inner = self.inner();
        if !opts.dry_run {
            inner.segments.check_writable()?;
        }
        let index = &*inner.index;
        let now = now_unix_ms();
        let grace_ms = u64::try_from(opts.grace.as_millis()).unwrap_or(u64::MAX);
        let mut rep = GcReport {
            dry_run: opts.dry_run,
            ..GcReport::default()
        };
        let mut candidates: Vec<(Digest, BlobEntry)> = Vec::new();
        for kv in index.scan(CF_BLOBS)? {
            if opts.cancel.load(Ordering::Relaxed) {
                rep.incomplete = true;
                break;
            }
            let (k, v) = kv?;
            rep.blobs_scanned += 1;
            let (d, e) = match (Digest::from_key(&k), BlobEntry::decode(&v)) {
                (Ok(d), Ok(e)) => (d, e),
                (Err(err), _) | (_, Err(err)) => {
                    tracing::warn!(error = %err, "gc: skipping a damaged blob entry");
                    rep.damaged += 1;
                    continue;
                }
            };
            if e.refs != 0 {
                continue;
            }
            rep.unreferenced_blobs += 1;
            if now.saturating_sub(e.created_unix_ms) < grace_ms {
                rep.kept_young += 1;
            } else if candidates.len() < CANDIDATES_MAX {
                candidates.push((d, e));
            } else {
                rep.incomplete = true;
            }
        }
        let total = candidates.len() as u64;
        if opts.dry_run {
            let out = simulate(index, &candidates)?;
            add(&mut rep, &out);
            progress(Progress {
                phase: "gc",
                done: total,
                total,
            });
        } else {
            let mut done = 0u64;
            let mut rest = &candidates[..];
            while !rest.is_empty() {
                if opts.cancel.load(Ordering::Relaxed) {
                    rep.incomplete = true;
                    break;
                }
                let n = batch_len(rest);
                let digests: Vec<Digest> = rest[..n].iter().map(|(d, _)| d.clone()).collect();
                rest = &rest[n..];
                let out = inner.request(|reply| Request::Collect {
                    digests,
                    now_unix_ms: now,
                    grace_ms,
                    reply,
                })?;
                add(&mut rep, &out);
                done += n as u64;
                progress(Progress {
                    phase: "gc",
                    done,
                    total,
                });
            }
        }
        rep.elapsed = started.elapsed();
        Ok(rep)
    }
}

/// How many of the next candidates go to the committer in one request.
fn batch_len(rest: &[(Digest, BlobEntry)]) -> usize {
    let mut entries = 0u64;
    let mut n = 0;
    for (_, e) in rest.iter().take(COLLECT_BATCH_BLOBS) {
        entries = entries.saturating_add(e.chunk_count);
        if n > 0 && entries > COLLECT_BATCH_ENTRIES {
            break;
        }
        n += 1;
    }
    n
}

fn add(rep: &mut GcReport, out: &CollectOutcome) {
    rep.kept_young += out.kept;
    rep.damaged += out.damaged;
    rep.blobs_freed += out.freed;
    rep.bytes_freed += out.bytes;
    rep.chunks_released += out.chunks_released;
    rep.chunk_bytes_released += out.chunk_bytes_released;
}

/// Every recipe entry of a committed blob, in order.
fn recipe_entries(index: &Index, e: &BlobEntry) -> Result<Vec<ChunkId>> {
    let mut ids = Vec::with_capacity(usize::try_from(e.chunk_count).unwrap_or(0).min(1 << 20));
    for kv in index.scan_prefix(CF_RECIPES, &recipe_prefix(e.recipe))? {
        let (_, v) = kv?;
        ids.extend(RecipePart::decode(&v)?.entries.iter().map(|r| r.chunk));
    }
    Ok(ids)
}

/// A dry run: what collecting `candidates` would release, from the index as
/// it is (nothing is changed).
fn simulate(index: &Index, candidates: &[(Digest, BlobEntry)]) -> Result<CollectOutcome> {
    let mut out = CollectOutcome::default();
    let mut refs: HashMap<ChunkId, ChunkEntry> = HashMap::new();
    for (d, e) in candidates {
        match release(index, d, e, &mut |id| match refs.get(id) {
            Some(c) => Ok(Some(*c)),
            None => index.chunk(id),
        }) {
            Ok(changed) => {
                out.freed += 1;
                out.bytes += e.size;
                count_released(&mut out, &changed);
                refs.extend(changed);
            }
            Err(err) => skip_damaged(&mut out, d, &err),
        }
    }
    Ok(out)
}

fn skip_damaged(out: &mut CollectOutcome, d: &Digest, err: &crate::Error) {
    tracing::warn!(digest = %d, error = %err, "gc: skipping a blob whose index entries are damaged");
    out.damaged += 1;
}

fn count_released(out: &mut CollectOutcome, changed: &HashMap<ChunkId, ChunkEntry>) {
    for c in changed.values().filter(|c| c.refs == 0) {
        out.chunks_released += 1;
        out.chunk_bytes_released += c.loc.record_len();
    }
}

/// The chunk entries after dropping one reference per recipe entry of the
/// blob, starting from the counts `current` gives; an error (a missing
/// chunk, a count that would go below zero, a damaged recipe) changes
/// nothing.
pub(crate) fn release(
    index: &Index,
    d: &Digest,
    e: &BlobEntry,
    current: &mut dyn FnMut(&ChunkId) -> Result<Option<ChunkEntry>>,
) -> Result<HashMap<ChunkId, ChunkEntry>> {
    let mut changed: HashMap<ChunkId, ChunkEntry> = HashMap::new();
    for id in recipe_entries(index, e)? {
        let mut c = match changed.get(&id) {
            Some(c) => *c,
            None => current(&id)?.ok_or_else(|| crate::Error::CorruptIndex {
                cf: "chunks",
                reason: format!("blob {d} names missing chunk {id}"),
            })?,
        };
        c.refs = c
            .refs
            .checked_sub(1)
            .ok_or_else(|| crate::Error::CorruptIndex {
                cf: "chunks",
                reason: format!("chunk {id} would lose more references than it has"),
            })?;
        changed.insert(id, c);
    }
    Ok(changed)
}

/// The committer's half: deletes each candidate that still has no
/// references and is still past the grace period, and drops the references
/// its recipe holds on chunks. A candidate whose entries are damaged is
/// skipped (and counted); the others go on.
///
/// Recipes are read from the index, not the group's batch: a blob committed
/// in this same group is younger than any grace period and is kept.
pub(crate) fn collect(
    index: &Index,
    ov: &mut Overlay,
    batch: &mut WriteBatch,
    digests: &[Digest],
    now_unix_ms: u64,
    grace_ms: u64,
) -> Result<CollectOutcome> {
    let mut out = CollectOutcome::default();
    let recipes = index.cf(CF_RECIPES)?;
    let mut seen = HashSet::new();
    for d in digests {
        if !seen.insert(d) {
            continue;
        }
        let Some(e) = ov.blob(index, d)? else {
            continue;
        };
        if e.refs != 0 || now_unix_ms.saturating_sub(e.created_unix_ms) < grace_ms {
            out.kept += 1;
            continue;
        }
        let changed = match release(index, d, &e, &mut |id| ov.chunk(index, id)) {
            Ok(c) => c,
            Err(err) => {
                skip_damaged(&mut out, d, &err);
                continue;
            }
        };
        count_released(&mut out, &changed);
        crate::repair::settle(ov, changed);
        let (from, to) = recipe_range(e.recipe);
        batch.delete_range_cf(recipes, from, to);
        ov.blobs.insert(d.clone(), None);
        out.freed += 1;
        out.bytes += e.size;
    }
    Ok(out)
}
