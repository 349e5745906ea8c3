//! The write path: a blob arrives as pieces; the caller's thread computes its
//! SHA-256 while a worker thread cuts chunks, names them, deduplicates,
//! compresses, encrypts and appends them, spilling the recipe to the index in
//! parts. Memory is bounded by the pipeline depth, the chunker window and one
//! recipe part, whatever the blob's size.

use crate::chunker::Chunker;
use crate::commit::Request;
use crate::compress::{looks_compressible, Compressor};
use crate::error::{Error, Result};
use crate::ids::{ChunkId, Digest, DigestAlgorithm, RecipeId};
use crate::index::codec::{
    recipe_key, recipe_prefix, staged_key, RecipeEntry, RecipePart, RECIPE_PART_ENTRIES,
};
use crate::index::{CF_PENDING, CF_RECIPES, CF_STAGED};
use crate::segment::format::{FLAG_ZSTD, RECORD_HEADER_BYTES};
use crate::segment::PreparedChunk;
use crate::store::{now_unix_ms, BlobInfo, Inner, INFLIGHT_CHUNKS_MAX};
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use rayon::prelude::*;
use rocksdb::WriteBatch;
use sha2::Digest as _;
use std::collections::HashSet;
use std::sync::Arc;
use std::thread::JoinHandle;

pub(crate) enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(alg: DigestAlgorithm) -> Self {
        match alg {
            DigestAlgorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            DigestAlgorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }
    pub fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(b),
            Hasher::Sha512(h) => h.update(b),
        }
    }
    pub fn algorithm(&self) -> DigestAlgorithm {
        match self {
            Hasher::Sha256(_) => DigestAlgorithm::Sha256,
            Hasher::Sha512(_) => DigestAlgorithm::Sha512,
        }
    }
    pub fn finish(self) -> Result<Digest> {
        match self {
            Hasher::Sha256(h) => Digest::new(DigestAlgorithm::Sha256, &h.finalize()),
            Hasher::Sha512(h) => Digest::new(DigestAlgorithm::Sha512, &h.finalize()),
        }
    }
}

/// Counters from the chunking worker.
#[derive(Default, Debug, Clone, Copy)]
struct WorkerSummary {
    chunks: u64,
    bytes: u64,
}

/// A blob being written. Call [`BlobWriter::commit`] to make it durable and
/// visible; dropping it (or [`BlobWriter::abort`]) discards it.
pub struct BlobWriter {
    inner: Arc<Inner>,
    recipe: RecipeId,
    hasher: Option<Hasher>,
    expected: Option<Digest>,
    size: u64,
    tx: Option<Sender<Bytes>>,
    worker: Option<JoinHandle<Result<WorkerSummary>>>,
    finished: bool,
}

impl BlobWriter {
    pub(crate) fn new(inner: Arc<Inner>, expected: Option<Digest>) -> Result<Self> {
        inner.segments.check_writable()?;
        let recipe = inner.next_recipe_id()?;
        let mut b = WriteBatch::default();
        b.put_cf(
            inner.index.cf(CF_PENDING)?,
            recipe_prefix(recipe),
            now_unix_ms().to_le_bytes(),
        );
        inner.index.write_unsynced(b)?;
        let alg = expected
            .as_ref()
            .map(|d| d.algorithm())
            .unwrap_or(DigestAlgorithm::Sha256);
        let hasher = Hasher::new(alg);
        let (tx, rx) = crossbeam_channel::bounded(inner.cfg.write_pipeline_pieces_max);
        let i2 = inner.clone();
        let worker = std::thread::Builder::new()
            .name("orlop-chunker".into())
            .spawn(move || chunk_worker(i2, recipe, rx))
            .map_err(|e| Error::io("chunker thread", e))?;
        Ok(BlobWriter {
            inner,
            recipe,
            hasher: Some(hasher),
            expected,
            size: 0,
            tx: Some(tx),
            worker: Some(worker),
            finished: false,
        })
    }

    /// Names the digest the content must have when it was not known at the
    /// start (a chunked upload learns it at the end). Before the first byte
    /// the algorithm may still change; after it, it must be the one the
    /// writer has been hashing with.
    pub fn expect_digest(&mut self, digest: Digest) -> Result<()> {
        let alg = digest.algorithm();
        if self.size == 0 {
            self.hasher = Some(Hasher::new(alg));
        } else if self.hasher.as_ref().map(Hasher::algorithm) != Some(alg) {
            return Err(Error::InvalidDigest {
                input: digest.to_string(),
                reason: "the upload was hashed with another algorithm",
            });
        }
        self.expected = Some(digest);
        Ok(())
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a piece. Blocks when the pipeline is full (backpressure).
    pub fn write(&mut self, piece: Bytes) -> Result<()> {
        if piece.is_empty() {
            return Ok(());
        }
        if let Some(h) = self.hasher.as_mut() {
            h.update(&piece);
        }
        self.size += piece.len() as u64;
        let sent = self
            .tx
            .as_ref()
            .map(|tx| tx.send(piece).is_ok())
            .unwrap_or(false);
        if !sent {
            // The worker stopped early: report its error.
            self.tx = None;
            return Err(self.join_worker().err().unwrap_or(Error::ShuttingDown));
        }
        Ok(())
    }

    fn join_worker(&mut self) -> Result<WorkerSummary> {
        self.tx = None;
        match self.worker.take() {
            Some(h) => h
                .join()
                .map_err(|_| Error::Config("chunker thread panicked".into()))?,
            None => Err(Error::ShuttingDown),
        }
    }

    /// Finishes the blob: checks the digest, then commits it durably.
    pub fn commit(mut self) -> Result<BlobInfo> {
        self.finished = true;
        let summary = match self.join_worker() {
            Ok(s) => s,
            Err(e) => {
                self.discard();
                return Err(e);
            }
        };
        let actual = match self.hasher.take() {
            Some(h) => h.finish()?,
            None => return Err(Error::ShuttingDown),
        };
        if let Some(expected) = &self.expected {
            if *expected != actual {
                self.discard();
                return Err(Error::DigestMismatch {
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        if summary.bytes != self.size {
            self.discard();
            return Err(Error::SizeMismatch {
                expected: self.size,
                actual: summary.bytes,
            });
        }
        let (recipe, size, chunk_count) = (self.recipe, self.size, summary.chunks);
        let digest = actual.clone();
        let e = match self.inner.request(|reply| Request::Commit {
            recipe,
            digest,
            size,
            chunk_count,
            created_unix_ms: now_unix_ms(),
            reply,
        }) {
            Ok(e) => e,
            Err(err) => {
                if !matches!(err, Error::Poisoned | Error::ShuttingDown) {
                    self.discard();
                }
                return Err(err);
            }
        };
        Ok(BlobInfo {
            digest: actual,
            size: e.size,
            chunk_count: e.chunk_count,
            refs: e.refs,
            created_unix_ms: e.created_unix_ms,
        })
    }

    /// Discards the blob; its staged data becomes reclaimable.
    pub fn abort(mut self) {
        self.finished = true;
        let _ = self.join_worker();
        self.discard();
    }

    fn discard(&self) {
        let recipe = self.recipe;
        if let Err(e) = self.inner.request(|reply| Request::Abort { recipe, reply }) {
            tracing::debug!(error = %e, recipe = recipe.0, "abort not recorded; the next open discards it");
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.finished {
            self.finished = true;
            let _ = self.join_worker();
            self.discard();
        }
    }
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

/// Prepared chunks queued between the cutting and the appending stage.
const APPEND_QUEUE_CHUNKS: usize = 8;
/// Chunk ids of this blob already sent to the appender, so that a chunk
/// repeated inside a blob is stored once. Past this bound a repeat may be
/// stored twice (an orphan record, reclaimable), never miscounted.
const SENT_IDS_MAX: usize = 1 << 16;
/// Staged placements written to the index per unsynced batch.
const STAGED_BATCH_ENTRIES: usize = 256;

/// The writer's pipeline after hashing: a cutting stage (FastCDC, BLAKE3,
/// dedupe lookup, compression) and an appending stage (encryption, record
/// checksum, pwrite), on two threads so that with the caller's SHA-256 the
/// work spreads over three.
fn chunk_worker(inner: Arc<Inner>, recipe: RecipeId, rx: Receiver<Bytes>) -> Result<WorkerSummary> {
    let (atx, arx) = crossbeam_channel::bounded::<PreparedChunk>(APPEND_QUEUE_CHUNKS);
    std::thread::scope(|scope| {
        let appender = std::thread::Builder::new()
            .name("orlop-append".into())
            .spawn_scoped(scope, || append_stage(&inner, recipe, arx))
            .map_err(|e| Error::io("append thread", e))?;
        let cut = cut_stage(&inner, recipe, rx, atx);
        let appended = appender
            .join()
            .map_err(|_| Error::Config("append thread panicked".into()))?;
        appended?;
        cut
    })
}

/// Chunks named and compressed together on the rayon pool.
const CUT_BATCH_CHUNKS: usize = 16;

/// A cut chunk after naming and (when new and worth it) compression.
struct Named {
    chunk: Bytes,
    id: ChunkId,
    /// `Some` when the chunk is not yet in the index.
    prepared: Option<(u8, Vec<u8>)>,
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

fn cut_stage(
    inner: &Inner,
    recipe: RecipeId,
    rx: Receiver<Bytes>,
    atx: Sender<PreparedChunk>,
) -> Result<WorkerSummary> {
    let mut chunker = Chunker::new(inner.cfg.chunk);
    let mut spill = RecipeSpill {
        recipe,
        part_no: 0,
        part: RecipePart::default(),
        batch: WriteBatch::default(),
    };
    let mut sum = WorkerSummary::default();
    let mut sent: HashSet<ChunkId> = HashSet::new();
    let staged_cf = inner.index.cf(CF_STAGED)?;
    let level = inner.cfg.zstd_level;
    let mut batch: Vec<Bytes> = Vec::with_capacity(CUT_BATCH_CHUNKS);
    let mut process = |batch: &mut Vec<Bytes>| -> Result<()> {
        // Naming and the dedupe lookup run here; compression of the chunks
        // that the probe finds compressible runs in parallel on the pool.
        let mut named = Vec::with_capacity(batch.len());
        for chunk in std::mem::take(batch) {
            let id = inner.chunk_id(&chunk);
            let is_new = inner.index.chunk(&id)?.is_none() && !sent.contains(&id);
            let compress = is_new && looks_compressible(&chunk);
            named.push((chunk, id, is_new, compress));
        }
        let named: Vec<Result<Named>> = named
            .into_par_iter()
            .map(|(chunk, id, is_new, compress)| {
                let z = if compress {
                    compress_here(level, &chunk)?
                } else {
                    None
                };
                let prepared = is_new.then(|| match z {
                    Some(z) => (FLAG_ZSTD, z),
                    None => (0, PreparedChunk::buffer(&chunk)),
                });
                Ok(Named {
                    chunk,
                    id,
                    prepared,
                })
            })
            .collect();
        for n in named {
            let Named {
                chunk,
                id,
                prepared,
            } = n?;
            let raw_len = chunk.len() as u32;
            // Checked again here: the same new chunk may occur twice in one batch.
            if let (Some((flags, record)), false) = (prepared, sent.contains(&id)) {
                let shared = inner
                    .inflight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&id)
                    .map(|v| v.0);
                match shared {
                    // Appended by another writer, not yet committed: share its placement.
                    Some(loc) => {
                        spill
                            .batch
                            .put_cf(staged_cf, staged_key(recipe, &id), loc.encode())
                    }
                    None => {
                        if sent.len() < SENT_IDS_MAX {
                            sent.insert(id);
                        }
                        // A closed queue means the appender failed; its error is reported.
                        atx.send(PreparedChunk {
                            id,
                            flags,
                            raw_len,
                            record,
                        })
                        .map_err(|_| Error::ShuttingDown)?;
                    }
                }
            }
            spill.part.entries.push(RecipeEntry { chunk: id, raw_len });
            sum.chunks += 1;
            sum.bytes += raw_len as u64;
            if spill.part.entries.len() >= RECIPE_PART_ENTRIES {
                spill.flush(inner)?;
            }
        }
        Ok(())
    };
    let mut emit = |chunk: Bytes| -> Result<()> {
        batch.push(chunk);
        if batch.len() >= CUT_BATCH_CHUNKS {
            process(&mut batch)?;
        }
        Ok(())
    };
    while let Ok(piece) = rx.recv() {
        chunker.push(&piece, &mut emit)?;
    }
    chunker.finish(&mut emit)?;
    drop(emit);
    process(&mut batch)?;
    drop(process);
    spill.flush(inner)?;
    Ok(sum)
}

/// Encrypts and appends chunks in order, recording their staged placements.
fn append_stage(inner: &Inner, recipe: RecipeId, rx: Receiver<PreparedChunk>) -> Result<()> {
    let staged_cf = inner.index.cf(CF_STAGED)?;
    let mut batch = WriteBatch::default();
    for chunk in rx {
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
