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
use crate::index::codec::{recipe_prefix, BlobEntry, RecipePart};
use crate::index::{Index, CF_BLOBS, CF_RECIPES};
use crate::store::{now_unix_ms, Store};
use crate::verify::Progress;
use rocksdb::WriteBatch;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Candidates sent to the committer per request, so that a collection run
/// never holds up pushes for long.
const COLLECT_BATCH_BLOBS: usize = 128;
/// Candidates held in memory at once by one run.
const CANDIDATES_MAX: usize = 1 << 20;

/// What a collection run may do.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Blobs committed more recently than this are kept.
    pub grace: Duration,
    /// Report what would be freed without changing anything.
    pub dry_run: bool,
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
    pub dry_run: bool,
    pub elapsed: Duration,
}

/// What the committer did with one batch of candidates.
#[derive(Clone, Debug, Default)]
pub(crate) struct CollectOutcome {
    pub kept: u64,
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
        let index = &*inner.index;
        let now = now_unix_ms();
        let grace_ms = u64::try_from(opts.grace.as_millis()).unwrap_or(u64::MAX);
        let mut rep = GcReport {
            dry_run: opts.dry_run,
            ..GcReport::default()
        };
        let mut candidates: Vec<(Digest, BlobEntry)> = Vec::new();
        for kv in index.scan(CF_BLOBS)? {
            let (k, v) = kv?;
            rep.blobs_scanned += 1;
            let e = BlobEntry::decode(&v)?;
            if e.refs != 0 {
                continue;
            }
            rep.unreferenced_blobs += 1;
            if now.saturating_sub(e.created_unix_ms) < grace_ms {
                rep.kept_young += 1;
            } else if candidates.len() < CANDIDATES_MAX {
                candidates.push((Digest::from_key(&k)?, e));
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
            for part in candidates.chunks(COLLECT_BATCH_BLOBS) {
                let digests: Vec<Digest> = part.iter().map(|(d, _)| d.clone()).collect();
                let out = inner.request(|reply| Request::Collect {
                    digests,
                    now_unix_ms: now,
                    grace_ms,
                    reply,
                })?;
                add(&mut rep, &out);
                done += part.len() as u64;
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

fn add(rep: &mut GcReport, out: &CollectOutcome) {
    rep.kept_young += out.kept;
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
    let mut refs: HashMap<ChunkId, u64> = HashMap::new();
    for (_, e) in candidates {
        out.freed += 1;
        out.bytes += e.size;
        for id in recipe_entries(index, e)? {
            let Some(c) = index.chunk(&id)? else { continue };
            let left = refs.entry(id).or_insert(c.refs);
            *left = left.saturating_sub(1);
            if *left == 0 {
                out.chunks_released += 1;
                out.chunk_bytes_released += c.loc.record_len();
            }
        }
    }
    Ok(out)
}

/// The committer's half: deletes each candidate that still has no
/// references and is still past the grace period, and drops the references
/// its recipe holds on chunks.
pub(crate) fn collect(
    index: &Index,
    ov: &mut Overlay,
    batch: &mut WriteBatch,
    digests: &[Digest],
    now_unix_ms: u64,
    grace_ms: u64,
) -> Result<CollectOutcome> {
    let mut out = CollectOutcome::default();
    // Checked in full before anything changes, so an error leaves the
    // overlay and the batch as they were.
    let mut plans = Vec::new();
    for d in digests {
        let Some(e) = ov.blob(index, d)? else {
            continue;
        };
        if e.refs != 0 || now_unix_ms.saturating_sub(e.created_unix_ms) < grace_ms {
            out.kept += 1;
            continue;
        }
        plans.push((d, e, recipe_entries(index, &e)?));
    }
    let mut chunks = HashMap::new();
    for (_, _, ids) in &plans {
        for id in ids {
            let c = match chunks.get(id) {
                Some(c) => *c,
                None => ov
                    .chunk(index, id)?
                    .ok_or_else(|| crate::Error::CorruptIndex {
                        cf: "chunks",
                        reason: format!("a collected blob names missing chunk {id}"),
                    })?,
            };
            let mut c = c;
            c.refs = c
                .refs
                .checked_sub(1)
                .ok_or_else(|| crate::Error::CorruptIndex {
                    cf: "chunks",
                    reason: format!("chunk {id} would lose more references than it has"),
                })?;
            if c.refs == 0 {
                out.chunks_released += 1;
                out.chunk_bytes_released += c.loc.record_len();
            }
            chunks.insert(*id, c);
        }
    }
    let recipes = index.cf(CF_RECIPES)?;
    for (d, e, _) in plans {
        let from = recipe_prefix(e.recipe);
        let to = e
            .recipe
            .0
            .checked_add(1)
            .map(|n| n.to_be_bytes())
            .unwrap_or([0xff; 8]);
        batch.delete_range_cf(recipes, from, to);
        ov.blobs.insert(d.clone(), None);
        out.freed += 1;
        out.bytes += e.size;
    }
    ov.chunks.extend(chunks);
    Ok(out)
}
