//! The writer's pipeline after hashing. Four stages, each on its own thread
//! except the third, which fans out over the rayon pool:
//!
//! ```text
//! caller (SHA-256) ─pieces─► cut (FastCDC) ─batches─► name (BLAKE3 ids and
//!   probes on the pool, index lookups, compression or a record copy on the
//!   pool, recipe spilling) ─prepared chunks─► append (AES-GCM, CRC32C, pwrite)
//! ```
//!
//! Only FastCDC, which cannot be split within a blob, runs serially beside
//! the caller's SHA-256; per-chunk work spreads over both cores.

use crate::chunker::Chunker;
use crate::compress::{looks_compressible, Compressor};
use crate::error::{Error, Result};
use crate::ids::{ChunkId, RecipeId};
use crate::index::codec::{recipe_key, staged_key, RecipeEntry, RecipePart, RECIPE_PART_ENTRIES};
use crate::index::{CF_RECIPES, CF_STAGED};
use crate::segment::format::{FLAG_ZSTD, RECORD_HEADER_BYTES};
use crate::segment::PreparedChunk;
use crate::store::{Inner, INFLIGHT_CHUNKS_MAX};
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use rayon::prelude::*;
use rocksdb::WriteBatch;
use std::collections::HashSet;
use std::sync::Arc;

/// Counters from the pipeline.
#[derive(Default, Debug, Clone, Copy)]
pub(super) struct WorkerSummary {
    pub chunks: u64,
    pub bytes: u64,
    /// Recipe parts written so far.
    pub parts: u32,
}

/// What flows from the caller into the cutting stage.
pub(super) enum Input {
    Piece(Bytes),
    /// Cut what is buffered (a forced boundary), drain the pipeline, and
    /// report the counters once every chunk so far is appended and staged.
    Flush(Sender<Result<WorkerSummary>>),
    /// Stop at once, dropping what is buffered (the write is being detached).
    Stop,
}

/// What flows from the cutting stage into the naming stage.
enum NameMsg {
    Batch(Vec<Bytes>),
    Flush(Sender<Result<WorkerSummary>>),
    Stop,
}

/// What flows from the naming stage into the appending stage.
enum AppendMsg {
    Chunk(PreparedChunk),
    /// Replies once every earlier chunk is appended and its placement staged.
    Barrier(Sender<Result<()>>),
}

/// Where a writer's pipeline starts: a new write, or a resumed held one.
#[derive(Clone, Copy, Default)]
pub(super) struct Start {
    pub size: u64,
    pub chunks: u64,
    pub parts: u32,
}

/// Prepared chunks queued between the naming and the appending stage.
const APPEND_QUEUE_CHUNKS: usize = 8;
/// Batches queued between the cutting and the naming stage. A batch's chunks
/// share the chunker's window buffers, so each queued batch can hold one or
/// two windows (1-2 MiB) alive.
const NAME_QUEUE_BATCHES: usize = 1;
/// Chunk ids of this blob already sent to the appender, so that a chunk
/// repeated inside a blob is stored once. Past this bound a repeat may be
/// stored twice (an orphan record, reclaimable), never miscounted.
const SENT_IDS_MAX: usize = 1 << 16;
/// Staged placements written to the index per unsynced batch.
const STAGED_BATCH_ENTRIES: usize = 256;
/// Chunks named and prepared together on the rayon pool.
const CUT_BATCH_CHUNKS: usize = 16;

/// Runs the pipeline on the calling thread (the cut stage) and two scoped
/// threads (naming, appending) until the input ends or stops.
pub(super) fn run(
    inner: Arc<Inner>,
    recipe: RecipeId,
    rx: Receiver<Input>,
    from: Start,
) -> Result<WorkerSummary> {
    let (atx, arx) = crossbeam_channel::bounded::<AppendMsg>(APPEND_QUEUE_CHUNKS);
    let (ntx, nrx) = crossbeam_channel::bounded::<NameMsg>(NAME_QUEUE_BATCHES);
    let inner = &*inner;
    std::thread::scope(|scope| {
        let appender = std::thread::Builder::new()
            .name("orlop-append".into())
            .spawn_scoped(scope, move || append_stage(inner, recipe, arx))
            .map_err(|e| Error::io("append thread", e))?;
        let namer = std::thread::Builder::new()
            .name("orlop-name".into())
            .spawn_scoped(scope, move || {
                NameStage::new(inner, recipe, atx, from).and_then(|stage| stage.run(nrx))
            });
        let namer = match namer {
            Ok(h) => h,
            Err(e) => return Err(Error::io("naming thread", e)),
        };
        let cut = cut_stage(inner, rx, ntx);
        let named = namer
            .join()
            .map_err(|_| Error::Config("naming thread panicked".into()))?;
        let appended = appender
            .join()
            .map_err(|_| Error::Config("append thread panicked".into()))?;
        // The earliest failure downstream is the cause of the others.
        appended?;
        let sum = named?;
        cut?;
        Ok(sum)
    })
}

/// Cuts pieces into content-defined chunks and hands them on in batches.
/// A closed downstream queue means a later stage failed; its error wins.
fn cut_stage(inner: &Inner, rx: Receiver<Input>, ntx: Sender<NameMsg>) -> Result<()> {
    let mut cut = CutStage {
        chunker: Chunker::new(inner.cfg.chunk),
        batch: Vec::with_capacity(CUT_BATCH_CHUNKS),
        ntx,
    };
    while let Ok(msg) = rx.recv() {
        match msg {
            Input::Piece(piece) => {
                let CutStage {
                    chunker,
                    batch,
                    ntx,
                } = &mut cut;
                chunker.push(&piece, &mut |c| emit(ntx, batch, c))?
            }
            Input::Flush(reply) => {
                cut.drain()?;
                cut.send(NameMsg::Flush(reply))?;
            }
            Input::Stop => return cut.send(NameMsg::Stop),
        }
    }
    cut.drain()
}

struct CutStage {
    chunker: Chunker,
    batch: Vec<Bytes>,
    ntx: Sender<NameMsg>,
}

impl CutStage {
    fn send(&self, m: NameMsg) -> Result<()> {
        self.ntx.send(m).map_err(|_| Error::ShuttingDown)
    }

    /// Cuts what is buffered (end of stream or a forced boundary) and sends
    /// every chunk so far.
    fn drain(&mut self) -> Result<()> {
        let CutStage {
            chunker,
            batch,
            ntx,
        } = self;
        chunker.finish(&mut |c| emit(ntx, batch, c))?;
        if !batch.is_empty() {
            let rest = std::mem::take(batch);
            ntx.send(NameMsg::Batch(rest))
                .map_err(|_| Error::ShuttingDown)?;
        }
        Ok(())
    }
}

/// Adds a chunk to the batch, sending the batch when it is full.
fn emit(ntx: &Sender<NameMsg>, batch: &mut Vec<Bytes>, chunk: Bytes) -> Result<()> {
    batch.push(chunk);
    if batch.len() >= CUT_BATCH_CHUNKS {
        let full = std::mem::replace(batch, Vec::with_capacity(CUT_BATCH_CHUNKS));
        ntx.send(NameMsg::Batch(full))
            .map_err(|_| Error::ShuttingDown)?;
    }
    Ok(())
}

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
        Ok(slot
            .as_mut()
            .and_then(|c| c.compress_if_smaller(chunk, RECORD_HEADER_BYTES)))
    })
}

/// The record body for a new chunk: compressed when the probe says so and
/// it saves space, else a copy of the plaintext. Either way behind
/// `RECORD_HEADER_BYTES` of headroom.
fn prepare(level: i32, chunk: &[u8], compressible: bool) -> Result<(u8, Vec<u8>)> {
    if compressible {
        if let Some(z) = compress_here(level, chunk)? {
            return Ok((FLAG_ZSTD, z));
        }
    }
    Ok((0, PreparedChunk::buffer(chunk)))
}

/// The naming stage's state.
struct NameStage<'a> {
    inner: &'a Inner,
    recipe: RecipeId,
    spill: RecipeSpill,
    sum: WorkerSummary,
    sent: HashSet<ChunkId>,
    staged_cf: &'a rocksdb::ColumnFamily,
    level: i32,
    atx: Sender<AppendMsg>,
    /// Some of this write's staged placements were made durable (by a
    /// checkpoint, now or before a restart). Such a placement must never be
    /// replaced by one that is not yet durable, so from then on a chunk
    /// already staged for this write is not staged again.
    held: bool,
}

impl<'a> NameStage<'a> {
    fn new(
        inner: &'a Inner,
        recipe: RecipeId,
        atx: Sender<AppendMsg>,
        from: Start,
    ) -> Result<Self> {
        Ok(NameStage {
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
            atx,
            held: from.parts > 0,
        })
    }

    fn run(mut self, rx: Receiver<NameMsg>) -> Result<WorkerSummary> {
        while let Ok(msg) = rx.recv() {
            match msg {
                NameMsg::Batch(batch) => self.process(batch)?,
                NameMsg::Flush(reply) => {
                    let r = self.flush();
                    let failed = r.is_err();
                    let _ = reply.send(r);
                    if failed {
                        return Err(Error::ShuttingDown);
                    }
                }
                NameMsg::Stop => return Ok(self.sum),
            }
        }
        self.spill.flush(self.inner)?;
        self.sum.parts = self.spill.part_no;
        Ok(self.sum)
    }

    /// Writes every recipe entry so far, then waits until every chunk so far
    /// is appended and staged (the cut stage has sent everything before this).
    fn flush(&mut self) -> Result<WorkerSummary> {
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

    /// Whether `id` must be stored by this write: not in the index, not
    /// already sent by it, not already staged by it after a checkpoint.
    fn is_new(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.inner.index.chunk(id)?.is_none()
            && !self.sent.contains(id)
            && !(self.held && self.staged_here(id)?))
    }

    /// Names a batch (BLAKE3 and the probe on the pool), looks each chunk up,
    /// prepares the new ones (compression or a record copy, on the pool),
    /// then queues them for appending in order and records the recipe.
    fn process(&mut self, batch: Vec<Bytes>) -> Result<()> {
        let inner = self.inner;
        let named: Vec<(Bytes, ChunkId)> = batch
            .into_par_iter()
            .map(|chunk| {
                let id = inner.chunk_id(&chunk);
                (chunk, id)
            })
            .collect();
        let mut looked = Vec::with_capacity(named.len());
        for (chunk, id) in named {
            let new = self.is_new(&id)?;
            looked.push((chunk, id, new));
        }
        let level = self.level;
        let prepared: Vec<Result<Option<(u8, Vec<u8>)>>> = looked
            .par_iter()
            .map(|(chunk, _, new)| {
                if !*new {
                    return Ok(None);
                }
                prepare(level, chunk, looks_compressible(chunk)).map(Some)
            })
            .collect();
        for ((chunk, id, _), prepared) in looked.into_iter().zip(prepared) {
            let raw_len = chunk.len() as u32;
            drop(chunk);
            // Checked again here: the same new chunk may occur twice in one batch.
            if let (Some((flags, record)), false) = (prepared?, self.sent.contains(&id)) {
                self.queue(id, flags, raw_len, record)?;
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
        Ok(())
    }

    /// Sends a new chunk to the appender, unless another writer appended it
    /// and has not committed yet: then this write shares that placement.
    fn queue(&mut self, id: ChunkId, flags: u8, raw_len: u32, record: Vec<u8>) -> Result<()> {
        let shared = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .map(|v| v.0);
        if let Some(loc) = shared {
            self.spill
                .batch
                .put_cf(self.staged_cf, staged_key(self.recipe, &id), loc.encode());
            return Ok(());
        }
        if self.sent.len() < SENT_IDS_MAX {
            self.sent.insert(id);
        }
        // A closed queue means the appender failed; its error is reported.
        self.atx
            .send(AppendMsg::Chunk(PreparedChunk {
                id,
                flags,
                raw_len,
                record,
            }))
            .map_err(|_| Error::ShuttingDown)
    }
}

/// Encrypts and appends chunks in order, recording their staged placements.
fn append_stage(inner: &Inner, recipe: RecipeId, rx: Receiver<AppendMsg>) -> Result<()> {
    let staged_cf = inner.index.cf(CF_STAGED)?;
    let mut batch = WriteBatch::default();
    for msg in rx {
        let chunk = match msg {
            AppendMsg::Chunk(c) => c,
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
        let id = chunk.id;
        let loc = inner.segments.append(&inner.cipher, chunk)?;
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
    if !batch.is_empty() {
        inner.index.write_unsynced(batch)?;
    }
    Ok(())
}
