//! The writer's pipeline after hashing: the cutting stage (FastCDC, BLAKE3
//! names, dedupe lookups, compression) and the appending stage
//! (encryption, record checksums, appends), each on its own thread.

use super::{AppendMsg, Input, Start, WorkerSummary};
use crate::chunker::Chunker;
use crate::compress::{looks_compressible, Compressor};
use crate::error::{Error, Result};
use crate::ids::{ChunkId, RecipeId};
use crate::index::codec::{recipe_key, staged_key, RecipeEntry, RecipePart, RECIPE_PART_ENTRIES};
use crate::index::{CF_RECIPES, CF_STAGED};
use crate::segment::format::{FLAG_ZSTD, KIND_CHUNK};
use crate::segment::PreparedChunk;
use crate::store::{Inner, WriterTicket, INFLIGHT_CHUNKS_MAX};
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use rayon::prelude::*;
use rocksdb::WriteBatch;
use std::collections::HashSet;
use std::sync::Arc;

struct RecipeSpill {
    recipe: RecipeId,
    part_no: u32,
    part: RecipePart,
    batch: WriteBatch,
}

impl RecipeSpill {
    fn flush(&mut self, inner: &Inner) -> Result<()> {
        if self.part.entries.is_empty() {
            return Ok(());
        }
        let mut batch = std::mem::take(&mut self.batch);
        batch.put_cf(
            inner.index.cf(CF_RECIPES)?,
            recipe_key(self.recipe, self.part_no),
            self.part.encode(),
        );
        inner.index.write_unsynced(batch)?;
        self.part_no += 1;
        let end = self.part.end();
        self.part = RecipePart {
            start: end,
            entries: Vec::with_capacity(RECIPE_PART_ENTRIES),
        };
        Ok(())
    }
}

/// Batches of prepared chunks queued between the cutting and the appending
/// stage (each at most `CUT_BATCH_CHUNKS` chunks).
const APPEND_QUEUE_BATCHES: usize = 1;
/// Chunk ids of this blob already sent to the appender, so that a chunk
/// repeated inside a blob is stored once. Past this bound a repeat may be
/// stored twice (an orphan record, reclaimable), never miscounted.
const SENT_IDS_MAX: usize = 1 << 16;
/// Staged placements written to the index per unsynced batch.
const STAGED_BATCH_ENTRIES: usize = 256;

/// Chunks named and compressed together on the rayon pool.
const CUT_BATCH_CHUNKS: usize = 8;

/// A cut chunk after naming and (when new and worth it) compression.
struct Named {
    chunk: Bytes,
    id: ChunkId,
    /// `Some` when the chunk is not yet in the index.
    prepared: Option<(u8, Bytes)>,
}

thread_local! {
    /// One zstd context per thread of the pool, made on first use.
    static COMPRESSOR: std::cell::RefCell<Option<Compressor>> = const { std::cell::RefCell::new(None) };
}

/// Compresses a chunk that passed the probe, on the current thread's cached
/// context (see [`Compressor`]).
fn compress_here(level: i32, chunk: &[u8]) -> Result<Option<Vec<u8>>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().map(|c| c.level()) != Some(level) {
            *slot = Some(Compressor::new(level).map_err(|e| Error::io("zstd", e))?);
        }
        Ok(slot.as_mut().and_then(|c| c.compress_if_smaller(chunk)))
    })
}

/// The writer's pipeline after hashing: a cutting stage (FastCDC, BLAKE3,
/// dedupe lookup, compression) and an appending stage (encryption, record
/// checksum, pwrite), on two threads so that with the caller's SHA-256 the
/// work spreads over three.
pub(super) fn chunk_worker(
    inner: Arc<Inner>,
    recipe: RecipeId,
    rx: Receiver<Input>,
    from: Start,
    ticket: Arc<WriterTicket>,
) -> Result<WorkerSummary> {
    let (atx, arx) = crossbeam_channel::bounded::<AppendMsg>(APPEND_QUEUE_BATCHES);
    std::thread::scope(|scope| {
        let appender = std::thread::Builder::new()
            .name("orlop-append".into())
            .spawn_scoped(scope, || append_stage(&inner, recipe, arx))
            .map_err(|e| Error::io("append thread", e))?;
        let cut = CutStage::new(&inner, recipe, atx, from, ticket).and_then(|stage| stage.run(rx));
        let appended = appender
            .join()
            .map_err(|_| Error::Config("append thread panicked".into()))?;
        appended?;
        cut
    })
}

/// The cutting stage's state.
struct CutStage<'a> {
    inner: &'a Inner,
    recipe: RecipeId,
    spill: RecipeSpill,
    sum: WorkerSummary,
    sent: HashSet<ChunkId>,
    staged_cf: &'a rocksdb::ColumnFamily,
    level: i32,
    batch: Vec<Bytes>,
    atx: Sender<AppendMsg>,
    /// Some of this write's staged placements were made durable (by a
    /// checkpoint, now or before a restart). Such a placement must never be
    /// replaced by one that is not yet durable, so from then on a chunk
    /// already staged for this write is not staged again.
    held: bool,
    ticket: Arc<WriterTicket>,
}

impl<'a> CutStage<'a> {
    fn new(
        inner: &'a Inner,
        recipe: RecipeId,
        atx: Sender<AppendMsg>,
        from: Start,
        ticket: Arc<WriterTicket>,
    ) -> Result<Self> {
        Ok(CutStage {
            inner,
            recipe,
            spill: RecipeSpill {
                recipe,
                part_no: from.parts,
                part: RecipePart {
                    start: from.size,
                    entries: Vec::new(),
                },
                batch: WriteBatch::default(),
            },
            sum: WorkerSummary {
                chunks: from.chunks,
                bytes: from.size,
                parts: from.parts,
            },
            sent: HashSet::new(),
            staged_cf: inner.index.cf(CF_STAGED)?,
            level: inner.cfg.zstd_level,
            batch: Vec::with_capacity(CUT_BATCH_CHUNKS),
            atx,
            held: from.parts > 0,
            ticket,
        })
    }

    fn run(mut self, rx: Receiver<Input>) -> Result<WorkerSummary> {
        let mut chunker = Chunker::new(self.inner.cfg.chunk);
        while let Ok(msg) = rx.recv() {
            match msg {
                Input::Pieces(pieces) => {
                    for piece in pieces {
                        chunker.push(&piece, &mut |c| self.push(c))?;
                    }
                }
                Input::Flush(reply) => {
                    let r = self.flush(&mut chunker);
                    let failed = r.is_err();
                    let _ = reply.send(r);
                    if failed {
                        return Err(Error::ShuttingDown);
                    }
                }
                Input::Stop => return Ok(self.sum),
            }
        }
        chunker.finish(&mut |c| self.push(c))?;
        self.process()?;
        self.spill.flush(self.inner)?;
        self.sum.parts = self.spill.part_no;
        Ok(self.sum)
    }

    /// Cuts what is buffered, then waits until every chunk so far is
    /// appended and staged and every recipe entry is written.
    fn flush(&mut self, chunker: &mut Chunker) -> Result<WorkerSummary> {
        chunker.finish(&mut |c| self.push(c))?;
        self.process()?;
        self.spill.flush(self.inner)?;
        self.sum.parts = self.spill.part_no;
        let (btx, brx) = crossbeam_channel::bounded(1);
        self.atx
            .send(AppendMsg::Barrier(btx))
            .map_err(|_| Error::ShuttingDown)?;
        brx.recv().map_err(|_| Error::ShuttingDown)??;
        self.held = true;
        Ok(self.sum)
    }

    /// Whether this write already has a placement staged for `id`.
    fn staged_here(&self, id: &ChunkId) -> Result<bool> {
        Ok(self
            .inner
            .index
            .get(CF_STAGED, &staged_key(self.recipe, id))?
            .is_some())
    }

    fn push(&mut self, chunk: Bytes) -> Result<()> {
        self.batch.push(chunk);
        if self.batch.len() >= CUT_BATCH_CHUNKS {
            self.process()?;
        }
        Ok(())
    }

    /// Names the batch and looks each chunk up; compression of the chunks
    /// that the probe finds compressible runs in parallel on the pool.
    fn process(&mut self) -> Result<()> {
        let inner = self.inner;
        let mut named = Vec::with_capacity(self.batch.len());
        for chunk in std::mem::take(&mut self.batch) {
            let id = inner.chunk_id(&chunk);
            // A chunk stored in a segment a compaction is emptying is
            // written afresh: compaction may drop it once it has no
            // references. So is a quarantined one: this copy restores it.
            let stored = inner
                .index
                .chunk(&id)?
                .is_some_and(|e| !e.is_quarantined() && !inner.is_retiring(e.loc.segment));
            let is_new =
                !stored && !self.sent.contains(&id) && !(self.held && self.staged_here(&id)?);
            let compress = is_new && looks_compressible(&chunk);
            named.push((chunk, id, is_new, compress));
        }
        let level = self.level;
        let name = |(chunk, id, is_new, compress): (Bytes, ChunkId, bool, bool)| {
            let z = if compress {
                compress_here(level, &chunk)?
            } else {
                None
            };
            // Stored as it came (a slice of the chunker's window, no copy)
            // unless compression saved enough.
            let prepared = is_new.then(|| match z {
                Some(z) => (FLAG_ZSTD, Bytes::from(z)),
                None => (0, chunk.clone()),
            });
            Ok(Named {
                chunk,
                id,
                prepared,
            })
        };
        // Compression runs on the pool; a batch with nothing to compress
        // (gzip layers, say) stays on this thread rather than pay for
        // waking the pool.
        let named: Vec<Result<Named>> = if named.iter().filter(|n| n.3).count() > 1 {
            named.into_par_iter().map(name).collect()
        } else {
            named.into_iter().map(name).collect()
        };
        let mut to_append = Vec::new();
        for n in named {
            let Named {
                chunk,
                id,
                prepared,
            } = n?;
            let raw_len = chunk.len() as u32;
            // Checked again here: the same new chunk may occur twice in one batch.
            if let (Some((flags, body)), false) = (prepared, self.sent.contains(&id)) {
                // Looked up under the writer registry's lock: if another
                // writer's placement is shared, its segment becomes this
                // write's floor before a compaction can choose it.
                let shared = self.ticket.share_inflight(&id);
                match shared {
                    // Appended by another writer, not yet committed: share its placement.
                    Some(loc) => self.spill.batch.put_cf(
                        self.staged_cf,
                        staged_key(self.recipe, &id),
                        loc.encode(),
                    ),
                    None => {
                        if self.sent.len() < SENT_IDS_MAX {
                            self.sent.insert(id);
                        }
                        to_append.push(PreparedChunk {
                            kind: KIND_CHUNK,
                            id,
                            flags,
                            raw_len,
                            body,
                        });
                    }
                }
            }
            self.spill
                .part
                .entries
                .push(RecipeEntry { chunk: id, raw_len });
            self.sum.chunks += 1;
            self.sum.bytes += raw_len as u64;
            if self.spill.part.entries.len() >= RECIPE_PART_ENTRIES {
                self.spill.flush(inner)?;
            }
        }
        if !to_append.is_empty() {
            // A closed queue means the appender failed; its error is reported.
            self.atx
                .send(AppendMsg::Chunks(to_append))
                .map_err(|_| Error::ShuttingDown)?;
        }
        Ok(())
    }
}

/// Encrypts and appends chunks in order, recording their staged placements.
fn append_stage(inner: &Inner, recipe: RecipeId, rx: Receiver<AppendMsg>) -> Result<()> {
    let staged_cf = inner.index.cf(CF_STAGED)?;
    let mut batch = WriteBatch::default();
    for msg in rx {
        let chunks = match msg {
            AppendMsg::Chunks(c) => c,
            AppendMsg::Barrier(reply) => {
                let r = if batch.is_empty() {
                    Ok(())
                } else {
                    inner.index.write_unsynced(std::mem::take(&mut batch))
                };
                let failed = r.is_err();
                let _ = reply.send(r);
                if failed {
                    return Err(Error::ShuttingDown);
                }
                continue;
            }
        };
        for chunk in chunks {
            let id = chunk.id;
            let loc = inner.segments.append(&inner.cipher, &chunk)?;
            {
                let mut fl = inner.inflight.lock().unwrap_or_else(|p| p.into_inner());
                if fl.len() < INFLIGHT_CHUNKS_MAX {
                    fl.entry(id).or_insert((loc, recipe));
                }
            }
            batch.put_cf(staged_cf, staged_key(recipe, &id), loc.encode());
            if batch.len() >= STAGED_BATCH_ENTRIES {
                inner.index.write_unsynced(std::mem::take(&mut batch))?;
            }
        }
    }
    if !batch.is_empty() {
        inner.index.write_unsynced(batch)?;
    }
    Ok(())
}
