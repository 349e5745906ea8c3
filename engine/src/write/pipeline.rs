//! The writer's pipeline after hashing: the cutting stage (FastCDC, BLAKE3
//! names, dedupe lookups, compression) and the appending stage
//! (encryption, record checksums, appends), each on its own thread for a
//! lone writer, or both on the caller's thread among many (`Pipeline`).

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
use std::thread::JoinHandle;

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
/// stage (each at most `CUT_BATCH_CHUNKS` chunks, so at most 8 MiB of
/// chunks of the largest size): enough that the cutting goes on while the
/// appender waits on a full buffer's O_DIRECT write.
const APPEND_QUEUE_BATCHES: usize = 4;
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
/// checksum, pwrite). A lone writer runs them on two threads of their own,
/// so that with the caller's SHA-256 its work spreads over three; when
/// writers are many (as many as `write_inline_from_writers`), each runs
/// them on its caller's thread instead: the writers keep the cores busy
/// between them, and a blob costs no hand-offs between threads.
pub(super) enum Pipeline {
    Threaded {
        tx: Sender<Input>,
        worker: JoinHandle<Result<WorkerSummary>>,
    },
    Inline(Box<Cutter>),
}

impl Pipeline {
    /// Starts the pipeline of a writer already registered by `ticket`.
    pub fn start(
        inner: &Arc<Inner>,
        recipe: RecipeId,
        from: Start,
        ticket: Arc<WriterTicket>,
    ) -> Result<Self> {
        if ticket.busy_at_start >= inner.cfg.write_inline_from_writers {
            let sink = Sink::Inline(Appender::new(recipe));
            let stage = CutStage::new(inner.clone(), recipe, sink, from, ticket);
            return Ok(Pipeline::Inline(Box::new(Cutter::new(stage))));
        }
        let (tx, rx) = crossbeam_channel::bounded(inner.cfg.write_pipeline_pieces_max);
        let i2 = inner.clone();
        let worker = std::thread::Builder::new()
            .name("orlop-chunker".into())
            .spawn(move || chunk_worker(i2, recipe, rx, from, ticket))
            .map_err(|e| Error::io("chunker thread", e))?;
        Ok(Pipeline::Threaded { tx, worker })
    }

    /// Whether the stages run on the caller's thread.
    pub fn is_inline(&self) -> bool {
        matches!(self, Pipeline::Inline(_))
    }

    /// Hands consecutive pieces of the blob on (inline: cuts them, and
    /// appends the chunks that are final). Blocks when the pipeline is full.
    pub fn pieces(&mut self, pieces: Vec<Bytes>) -> Result<()> {
        match self {
            Pipeline::Threaded { tx, .. } => tx
                .send(Input::Pieces(pieces))
                .map_err(|_| Error::ShuttingDown),
            Pipeline::Inline(c) => c.pieces(pieces),
        }
    }

    /// Cuts what is buffered (a forced boundary) and waits until every
    /// chunk so far is appended and staged and its recipe entry written.
    pub fn flush(&mut self) -> Result<WorkerSummary> {
        match self {
            Pipeline::Threaded { tx, .. } => {
                let (rtx, rrx) = crossbeam_channel::bounded(1);
                tx.send(Input::Flush(rtx))
                    .map_err(|_| Error::ShuttingDown)?;
                rrx.recv().map_err(|_| Error::ShuttingDown)?
            }
            Pipeline::Inline(c) => c.flush(),
        }
    }

    /// Ends the blob: cuts and appends what is left, and returns the
    /// counters once every chunk is appended and staged.
    pub fn finish(self) -> Result<WorkerSummary> {
        match self {
            Pipeline::Threaded { tx, worker } => {
                drop(tx);
                join(worker)
            }
            Pipeline::Inline(c) => c.finish(),
        }
    }

    /// Stops: pieces already queued to a threaded pipeline are still cut,
    /// what is buffered after them is dropped; returns once no append of
    /// this write is in flight.
    pub fn stop(self) {
        match self {
            Pipeline::Threaded { tx, worker } => {
                let _ = tx.send(Input::Stop);
                drop(tx);
                let _ = worker.join();
            }
            Pipeline::Inline(_) => {}
        }
    }

    /// After a step failed with `e`: the error to report, the worker's own
    /// when `e` only says that it stopped.
    pub fn failed(self, e: Error) -> Error {
        match self {
            Pipeline::Threaded { tx, worker } => {
                drop(tx);
                match (join(worker), e) {
                    (Err(own), Error::ShuttingDown) => own,
                    (_, e) => e,
                }
            }
            Pipeline::Inline(_) => e,
        }
    }
}

/// Waits for the threaded pipeline's cutting thread; a panic is an error.
fn join(worker: JoinHandle<Result<WorkerSummary>>) -> Result<WorkerSummary> {
    worker
        .join()
        .map_err(|_| Error::Config("chunker thread panicked".into()))?
}

/// The threaded pipeline's cutting thread: starts the appending thread,
/// cuts what arrives, and returns once both are done.
fn chunk_worker(
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
        // The cutter (and with it the appender's queue) is dropped before
        // the appender is joined.
        let stage = CutStage::new(inner.clone(), recipe, Sink::Thread(atx), from, ticket);
        let cut = Cutter::new(stage).run(rx);
        let appended = appender
            .join()
            .map_err(|_| Error::Config("append thread panicked".into()))?;
        appended?;
        cut
    })
}

/// The chunker and the cutting stage that takes its chunks.
pub(super) struct Cutter {
    chunker: Chunker,
    stage: CutStage,
}

impl Cutter {
    fn new(stage: CutStage) -> Self {
        Cutter {
            chunker: Chunker::new(stage.inner.cfg.chunk),
            stage,
        }
    }

    fn pieces(&mut self, pieces: Vec<Bytes>) -> Result<()> {
        let stage = &mut self.stage;
        for piece in pieces {
            self.chunker.push(&piece, &mut |c| stage.push(c))?;
        }
        Ok(())
    }

    /// Cuts what is buffered, then waits until every chunk so far is
    /// appended and staged and every recipe entry is written.
    fn flush(&mut self) -> Result<WorkerSummary> {
        self.cut_rest()?;
        let stage = &mut self.stage;
        stage.sink.barrier(&stage.inner)?;
        stage.held = true;
        Ok(stage.sum)
    }

    fn finish(mut self) -> Result<WorkerSummary> {
        self.cut_rest()?;
        let stage = &mut self.stage;
        // Inline, the staged placements are written here; threaded, the
        // appender writes them once its queue closes.
        if let Sink::Inline(a) = &mut stage.sink {
            a.write_staged(&stage.inner)?;
        }
        Ok(stage.sum)
    }

    /// Cuts what is buffered (a boundary, forced unless at the end),
    /// prepares and sends every chunk, and writes the recipe so far.
    fn cut_rest(&mut self) -> Result<()> {
        let stage = &mut self.stage;
        self.chunker.finish(&mut |c| stage.push(c))?;
        stage.process()?;
        stage.spill.flush(&stage.inner)?;
        stage.sum.parts = stage.spill.part_no;
        Ok(())
    }

    /// The threaded pipeline's loop.
    fn run(mut self, rx: Receiver<Input>) -> Result<WorkerSummary> {
        while let Ok(msg) = rx.recv() {
            match msg {
                Input::Pieces(pieces) => self.pieces(pieces)?,
                Input::Flush(reply) => {
                    let r = self.flush();
                    let failed = r.is_err();
                    let _ = reply.send(r);
                    if failed {
                        return Err(Error::ShuttingDown);
                    }
                }
                Input::Stop => return Ok(self.stage.sum),
            }
        }
        self.finish()
    }
}

/// Where the cutting stage sends the chunks it prepared.
enum Sink {
    /// To the appending stage, on its own thread.
    Thread(Sender<AppendMsg>),
    /// Appended on the cutting stage's thread.
    Inline(Appender),
}

impl Sink {
    fn chunks(&mut self, inner: &Inner, chunks: Vec<PreparedChunk>) -> Result<()> {
        match self {
            // A closed queue means the appender failed; its error is reported.
            Sink::Thread(tx) => tx
                .send(AppendMsg::Chunks(chunks))
                .map_err(|_| Error::ShuttingDown),
            Sink::Inline(a) => a.append(inner, chunks),
        }
    }

    /// Returns once every chunk sent is appended and its placement staged.
    fn barrier(&mut self, inner: &Inner) -> Result<()> {
        match self {
            Sink::Thread(tx) => {
                let (btx, brx) = crossbeam_channel::bounded(1);
                tx.send(AppendMsg::Barrier(btx))
                    .map_err(|_| Error::ShuttingDown)?;
                brx.recv().map_err(|_| Error::ShuttingDown)?
            }
            Sink::Inline(a) => a.write_staged(inner),
        }
    }
}

/// The cutting stage's state.
struct CutStage {
    inner: Arc<Inner>,
    recipe: RecipeId,
    spill: RecipeSpill,
    sum: WorkerSummary,
    sent: HashSet<ChunkId>,
    level: i32,
    batch: Vec<Bytes>,
    sink: Sink,
    /// Some of this write's staged placements were made durable (by a
    /// checkpoint, now or before a restart). Such a placement must never be
    /// replaced by one that is not yet durable, so from then on a chunk
    /// already staged for this write is not staged again.
    held: bool,
    ticket: Arc<WriterTicket>,
}

impl CutStage {
    fn new(
        inner: Arc<Inner>,
        recipe: RecipeId,
        sink: Sink,
        from: Start,
        ticket: Arc<WriterTicket>,
    ) -> Self {
        CutStage {
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
            level: inner.cfg.zstd_level,
            batch: Vec::with_capacity(CUT_BATCH_CHUNKS),
            sink,
            held: from.parts > 0,
            ticket,
            inner,
        }
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
        let inner = &*self.inner;
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
                !stored && !self.sent.contains(&id) && (!self.held || !self.staged_here(&id)?);
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
            // Stored as it came (a slice of the piece it was cut from, no copy)
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
                        inner.index.cf(CF_STAGED)?,
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
            self.sink.chunks(inner, to_append)?;
        }
        Ok(())
    }
}

/// Encrypts and appends chunks in order, recording their staged placements.
struct Appender {
    recipe: RecipeId,
    /// Staged placements not yet written to the index.
    batch: WriteBatch,
}

impl Appender {
    fn new(recipe: RecipeId) -> Self {
        Appender {
            recipe,
            batch: WriteBatch::default(),
        }
    }

    /// Appends a batch under as few acquisitions of the append lock (and
    /// one of the in-flight map's) as it can, rather than one of each per
    /// chunk of every writer.
    fn append(&mut self, inner: &Inner, chunks: Vec<PreparedChunk>) -> Result<()> {
        let staged_cf = inner.index.cf(CF_STAGED)?;
        let mut locs = Vec::with_capacity(chunks.len());
        let appended = inner
            .segments
            .append_batch(&inner.cipher, &chunks, &mut locs);
        // What was appended before a failure is recorded all the same (the
        // staged placements let an abort release it).
        {
            let mut fl = inner.inflight.lock().unwrap_or_else(|p| p.into_inner());
            for (chunk, loc) in chunks.iter().zip(&locs) {
                if fl.len() < INFLIGHT_CHUNKS_MAX {
                    fl.entry(chunk.id).or_insert((*loc, self.recipe));
                }
            }
        }
        for (chunk, loc) in chunks.iter().zip(&locs) {
            self.batch
                .put_cf(staged_cf, staged_key(self.recipe, &chunk.id), loc.encode());
        }
        if self.batch.len() >= STAGED_BATCH_ENTRIES {
            self.write_staged(inner)?;
        }
        appended
    }

    /// Writes the staged placements gathered so far (unsynced).
    fn write_staged(&mut self, inner: &Inner) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        inner.index.write_unsynced(std::mem::take(&mut self.batch))
    }
}

/// The threaded pipeline's appending thread.
fn append_stage(inner: &Inner, recipe: RecipeId, rx: Receiver<AppendMsg>) -> Result<()> {
    let mut appender = Appender::new(recipe);
    for msg in rx {
        match msg {
            AppendMsg::Chunks(chunks) => appender.append(inner, chunks)?,
            AppendMsg::Barrier(reply) => {
                let r = appender.write_staged(inner);
                let failed = r.is_err();
                let _ = reply.send(r);
                if failed {
                    return Err(Error::ShuttingDown);
                }
            }
        }
    }
    appender.write_staged(inner)
}
