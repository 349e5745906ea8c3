//! The committer: the one thread that mutates chunk, blob and reference state
//! in the index. Requests that arrive together share one segment fsync and one
//! synced RocksDB write batch (group commit). Because it is the only mutator,
//! reference counts are read-modify-written without races.

use crate::error::{Error, Result};
use crate::ids::{ChunkId, Digest, RecipeId};
use crate::index::codec::{
    recipe_prefix, recipe_range, staged_key, BlobEntry, ChunkEntry, HeldEntry, Location,
    RecipePart, SegmentEntry,
};
use crate::index::{
    Index, CF_BLOBS, CF_BROKEN, CF_CHUNKS, CF_HELD, CF_META, CF_PENDING, CF_RECIPES, CF_SEGMENTS,
    CF_STAGED, META_NEXT_TXN_SEQ, META_TXN_VOID_PREFIX,
};
use crate::journal::{BlobRecord, KvChange, RecipeRecord, TxnRecord, VoidRecord};
use crate::segment::format::{KIND_BLOB, KIND_RECIPE, KIND_TXN, KIND_VOID};
use crate::store::Inner;
use crate::txn::{apply_delta, Txn};
use crossbeam_channel::{Receiver, Sender};
use rocksdb::WriteBatch;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

mod blob;
mod journal;

use blob::{commit_blob, rejournal};
use journal::append_journal;
pub(crate) use journal::{start_epoch, Seqs};

pub(crate) enum Request {
    Commit {
        recipe: RecipeId,
        digest: Digest,
        size: u64,
        chunk_count: u64,
        created_unix_ms: u64,
        reply: Sender<Result<BlobEntry>>,
    },
    Abort {
        recipe: RecipeId,
        reply: Sender<Result<()>>,
    },
    /// Collects blobs without references (see [`crate::gc`]).
    Collect {
        digests: Vec<Digest>,
        now_unix_ms: u64,
        grace_ms: u64,
        reply: Sender<Result<crate::gc::CollectOutcome>>,
    },
    /// Adjust a blob's reference count by +1 or -1.
    Ref {
        digest: Digest,
        add: bool,
        reply: Sender<Result<u64>>,
    },
    /// Switches chunk entries to the copies compaction made, and drops
    /// zero-count entries of the segments it empties (see [`crate::compact`]).
    Relocate {
        moves: Vec<crate::compact::Move>,
        drops: Vec<(ChunkId, Location)>,
        reply: Sender<Result<crate::compact::RelocateOutcome>>,
    },
    /// Makes a checkpointed write durable and keeps it across restarts.
    Hold {
        recipe: RecipeId,
        held: HeldEntry,
        reply: Sender<Result<()>>,
    },
    /// Quarantines chunks, fixes counts, marks broken blobs (see
    /// [`crate::repair`]).
    Repair {
        plan: crate::repair::RepairPlan,
        reply: Sender<Result<()>>,
    },
    /// Writes the journal records of these blobs again (a repair, after
    /// damage took them).
    Rejournal {
        digests: Vec<Digest>,
        reply: Sender<Result<()>>,
    },
    /// An atomic change from a layer above (see [`crate::Txn`]).
    Txn {
        txn: Txn,
        reply: Sender<Result<()>>,
    },
    Shutdown,
}

/// Changes made by earlier requests of the same group, not yet written.
#[derive(Default)]
pub(crate) struct Overlay {
    pub chunks: HashMap<ChunkId, ChunkEntry>,
    /// `None`: the blob was collected by an earlier request of the group.
    pub blobs: HashMap<Digest, Option<BlobEntry>>,
    /// Chunk entries deleted by compaction (unless written again in `chunks`).
    pub removed_chunks: HashSet<ChunkId>,
    inserted: HashSet<ChunkId>,
    finished_recipes: HashSet<RecipeId>,
    /// Values written by earlier transactions of the group, for their checks.
    kv: HashMap<(String, Vec<u8>), Option<Vec<u8>>>,
    /// Journal records (kind, payload) of the blobs the group commits.
    journal: Vec<(u8, Vec<u8>)>,
}

impl Overlay {
    pub fn chunk(&self, index: &Index, id: &ChunkId) -> Result<Option<ChunkEntry>> {
        match self.chunks.get(id) {
            Some(e) => Ok(Some(*e)),
            None if self.removed_chunks.contains(id) => Ok(None),
            None => index.chunk(id),
        }
    }
    pub fn blob(&self, index: &Index, d: &Digest) -> Result<Option<BlobEntry>> {
        match self.blobs.get(d) {
            Some(e) => Ok(*e),
            None => index.blob(d),
        }
    }
    fn kv(&self, index: &Index, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.kv.get(&(cf.to_string(), key.to_vec())) {
            Some(v) => Ok(v.clone()),
            None => Ok(index.db().get_cf(index.extra_cf(cf)?, key)?),
        }
    }
}

pub(crate) fn run(inner: Arc<Inner>, rx: Receiver<Request>, mut seqs: Seqs) {
    let max = inner.cfg.group_commit_requests_max;

    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < max {
            match rx.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        let stop = group.iter().any(|r| matches!(r, Request::Shutdown));
        process(&inner, group, &mut seqs);
        if stop {
            break;
        }
    }
}

type Reply = Box<dyn FnOnce(Result<(), &Error>)>;

/// Deletes a write's staging state (its staged placements and pending
/// marker) and, unless the write is being committed, its recipe parts.
pub(crate) fn delete_staging(
    batch: &mut WriteBatch,
    index: &Index,
    recipe: RecipeId,
    committed: bool,
) -> Result<()> {
    let (from, to) = recipe_range(recipe);
    if !committed {
        batch.delete_range_cf(index.cf(CF_RECIPES)?, from, to);
    }
    batch.delete_range_cf(index.cf(CF_STAGED)?, from, to);
    batch.delete_cf(index.cf(CF_PENDING)?, from);
    batch.delete_cf(index.cf(CF_HELD)?, from);
    Ok(())
}

fn process(inner: &Inner, group: Vec<Request>, seqs: &mut Seqs) {
    let index = &*inner.index;
    let observer = inner.cfg.observer.as_deref();
    if let Some(o) = observer {
        o.group_committed(group.len());
    }
    let needs_sync = group.iter().any(|r| {
        matches!(
            r,
            Request::Commit { .. } | Request::Hold { .. } | Request::Relocate { .. }
        )
    });
    let mut batch = WriteBatch::default();
    let mut ov = Overlay::default();
    let mut replies: Vec<Reply> = Vec::with_capacity(group.len());
    // Changes of the group's transactions, for the journal.
    let mut journal: Vec<Vec<KvChange>> = Vec::new();
    for req in group {
        match req {
            Request::Commit {
                recipe,
                digest,
                size,
                chunk_count,
                created_unix_ms,
                reply,
            } => {
                let r = commit_blob(
                    inner,
                    &mut ov,
                    &mut batch,
                    recipe,
                    &digest,
                    size,
                    chunk_count,
                    created_unix_ms,
                );
                replies.push(deferred(reply, r));
            }
            Request::Abort { recipe, reply } => {
                let r = abort(index, &mut ov, &mut batch, recipe);
                replies.push(deferred(reply, r));
            }
            Request::Ref { digest, add, reply } => {
                let r = adjust_ref(index, &mut ov, &digest, add);
                replies.push(deferred(reply, r));
            }
            Request::Collect {
                digests,
                now_unix_ms,
                grace_ms,
                reply,
            } => {
                let r =
                    crate::gc::collect(index, &mut ov, &mut batch, &digests, now_unix_ms, grace_ms);
                replies.push(deferred(reply, r));
            }
            Request::Relocate {
                moves,
                drops,
                reply,
            } => {
                let r = crate::compact::relocate(index, &mut ov, &moves, &drops);
                replies.push(deferred(reply, r));
            }
            Request::Hold {
                recipe,
                held,
                reply,
            } => {
                let r = hold(index, &ov, &mut batch, recipe, &held);
                replies.push(deferred(reply, r));
            }
            Request::Txn { txn, reply } => {
                let changes: Vec<KvChange> = txn
                    .ops
                    .iter()
                    .map(|o| (o.cf.clone(), o.key.clone(), o.value.clone()))
                    .collect();
                let r = apply_txn(index, &mut ov, &mut batch, txn);
                if r.is_ok() && !changes.is_empty() {
                    journal.push(changes);
                }
                replies.push(deferred(reply, r));
            }
            Request::Rejournal { digests, reply } => {
                let r = rejournal(inner, &mut ov, &digests);
                replies.push(deferred(reply, r));
            }
            Request::Repair { plan, reply } => {
                let r = crate::repair::apply(index, &mut ov, &mut batch, plan);
                replies.push(deferred(reply, r));
            }
            Request::Shutdown => {}
        }
    }
    // The journal's records go into the log, and the log is made durable
    // (chunks of commits, records of transactions), before the index batch.
    // Held until the index batch is written: compaction decides whether a
    // journal record is still current under it, so it never sees a record
    // whose change the index does not show yet.
    let journal_guard = inner.journal_lock.lock().unwrap_or_else(|p| p.into_inner());
    let blob_records = std::mem::take(&mut ov.journal);
    let durable = append_journal(inner, blob_records, journal, seqs, &mut batch);
    let durable = durable.and_then(|appended| {
        if !(needs_sync || appended) {
            return Ok(None);
        }
        let t = std::time::Instant::now();
        let d = inner.segments.sync_active();
        if let Some(o) = observer {
            o.segment_synced(t.elapsed());
        }
        d
    });
    let durable = match durable {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "group commit failed before writing the index");
            inner.segments.poison(&e);
            for r in replies {
                r(Err(&e));
            }
            return;
        }
    };
    let written = {
        let _meta = inner
            .segments
            .meta_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if inner.segments.is_poisoned() {
            Err(Error::Poisoned)
        } else {
            let t = std::time::Instant::now();
            let w = finish_batch(index, &ov, &mut batch, durable)
                .and_then(|_| index.write_synced(batch));
            if let Some(o) = observer {
                o.index_written(t.elapsed());
            }
            w
        }
    };
    drop(journal_guard);
    if let Err(e) = &written {
        inner.segments.poison(e);
    } else {
        let mut fl = inner.inflight.lock().unwrap_or_else(|p| p.into_inner());
        fl.retain(|id, (_, owner)| {
            !ov.inserted.contains(id) && !ov.finished_recipes.contains(owner)
        });
    }
    for r in replies {
        r(written.as_ref().map(|_| ()));
    }
}

fn deferred<T: Send + 'static>(reply: Sender<Result<T>>, r: Result<T>) -> Reply {
    Box::new(move |written: Result<(), &Error>| {
        let out = match (r, written) {
            (Err(e), _) => Err(e),
            (Ok(_), Err(_)) => Err(Error::Poisoned),
            (Ok(v), Ok(())) => Ok(v),
        };
        let _ = reply.send(out);
    })
}

fn finish_batch(
    index: &Index,
    ov: &Overlay,
    batch: &mut WriteBatch,
    durable: Option<(crate::SegmentId, u64)>,
) -> Result<()> {
    let chunks = index.cf(CF_CHUNKS)?;
    for id in ov
        .removed_chunks
        .iter()
        .filter(|id| !ov.chunks.contains_key(*id))
    {
        batch.delete_cf(chunks, id.0);
    }
    for (id, e) in &ov.chunks {
        batch.put_cf(chunks, id.0, e.encode());
    }
    let blobs = index.cf(CF_BLOBS)?;
    let broken = index.cf(CF_BROKEN)?;
    for (d, e) in &ov.blobs {
        match e {
            Some(e) => batch.put_cf(blobs, d.to_key(), e.encode()),
            None => {
                batch.delete_cf(blobs, d.to_key());
                // A collected blob takes its broken mark with it.
                batch.delete_cf(broken, d.to_key());
            }
        }
    }
    // The caller holds the segments' meta lock, under which sealing records
    // its entry too: a sealed entry read here stays sealed.
    if let Some((seg, len)) =
        durable.filter(|(seg, _)| !matches!(index.segment(*seg), Ok(Some(e)) if e.sealed))
    {
        batch.put_cf(
            index.cf(CF_SEGMENTS)?,
            seg.0.to_be_bytes(),
            SegmentEntry {
                sealed: false,
                durable_len: len,
            }
            .encode(),
        );
    }
    Ok(())
}

/// Discards a write that is still pending. A recipe that was committed (or
/// already discarded) is left alone: its parts may belong to a blob.
fn abort(index: &Index, ov: &mut Overlay, batch: &mut WriteBatch, recipe: RecipeId) -> Result<()> {
    if ov.finished_recipes.contains(&recipe)
        || index.get(CF_PENDING, &recipe_prefix(recipe))?.is_none()
    {
        return Ok(());
    }
    ov.finished_recipes.insert(recipe);
    delete_staging(batch, index, recipe, false)
}

/// Records a checkpoint of a write that is still pending. The group's
/// segment fsync has already made its chunks durable, and this synced batch
/// makes its recipe parts and staged placements (written unsynced before)
/// durable with it.
fn hold(
    index: &Index,
    ov: &Overlay,
    batch: &mut WriteBatch,
    recipe: RecipeId,
    held: &HeldEntry,
) -> Result<()> {
    let key = recipe_prefix(recipe);
    if ov.finished_recipes.contains(&recipe) || index.get(CF_PENDING, &key)?.is_none() {
        return Err(Error::HeldWriteUnknown(recipe.0));
    }
    batch.put_cf(index.cf(CF_HELD)?, key, held.encode());
    Ok(())
}

fn adjust_ref(index: &Index, ov: &mut Overlay, digest: &Digest, add: bool) -> Result<u64> {
    let mut e = ov
        .blob(index, digest)?
        .ok_or_else(|| Error::BlobUnknown(digest.clone()))?;
    e.refs = apply_delta(digest, e.refs, if add { 1 } else { -1 })?;
    ov.blobs.insert(digest.clone(), Some(e));
    Ok(e.refs)
}

/// Checks every precondition and reference delta first, so that a failed
/// transaction leaves neither the batch nor the overlay changed.
fn apply_txn(index: &Index, ov: &mut Overlay, batch: &mut WriteBatch, txn: Txn) -> Result<()> {
    for c in &txn.checks {
        if ov.kv(index, &c.cf, &c.key)? != c.value {
            return Err(Error::Conflict {
                cf: c.cf.clone(),
                key: String::from_utf8_lossy(&c.key).into_owned(),
            });
        }
    }
    let mut blobs = Vec::with_capacity(txn.refs.len());
    for (digest, delta) in &txn.refs {
        if *delta == 0 {
            continue;
        }
        let mut e = ov
            .blob(index, digest)?
            .ok_or_else(|| Error::BlobUnknown(digest.clone()))?;
        e.refs = apply_delta(digest, e.refs, *delta)?;
        blobs.push((digest.clone(), Some(e)));
    }
    for op in &txn.ops {
        index.extra_cf(&op.cf)?;
    }
    for op in txn.ops {
        let h = index.extra_cf(&op.cf)?;
        match &op.value {
            Some(v) => batch.put_cf(h, &op.key, v),
            None => batch.delete_cf(h, &op.key),
        }
        ov.kv.insert((op.cf, op.key), op.value);
    }
    ov.blobs.extend(blobs);
    Ok(())
}
