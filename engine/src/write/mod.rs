//! The write path: a blob arrives as pieces; the caller's thread computes its
//! SHA-256, and the pipeline after it (two threads of the writer's own, or
//! the caller's thread when many writers are live) cuts chunks, names them,
//! deduplicates, compresses, encrypts and appends them, spilling the recipe
//! to the index in parts. Memory is bounded by the pipeline depth, the chunk
//! the chunker is gathering across pieces and one recipe part, whatever the
//! blob's size.
//!
//! A write can be *checkpointed* (everything so far made durable and kept
//! across restarts as a held write) and, after a restart, *resumed*.
//!
//! This module holds the writer and its hashing; `pipeline` the stages
//! after it.

use crate::commit::Request;
use crate::error::{Error, Result};
use crate::ids::{ChunkId, Digest, DigestAlgorithm, RecipeId};
use crate::index::codec::{recipe_key, recipe_prefix, HeldEntry, RecipePart, HELD_TAG_BYTES_MAX};
use crate::index::{CF_PENDING, CF_RECIPES, CF_STAGED};
use crate::segment::PreparedChunk;
use crate::store::{now_unix_ms, BlobInfo, Inner, WriterTicket};
use bytes::Bytes;
use crossbeam_channel::Sender;
use rocksdb::WriteBatch;
use sha2::Digest as _;
use std::sync::Arc;

mod pipeline;
use pipeline::Pipeline;

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

/// Counters from the cutting stage.
#[derive(Default, Debug, Clone, Copy)]
struct WorkerSummary {
    chunks: u64,
    bytes: u64,
    /// Recipe parts written so far.
    parts: u32,
}

/// What flows from the caller into the cutting stage.
enum Input {
    /// Consecutive pieces of the blob, handed on together (one hand-off
    /// for many small pieces, without copying them into one).
    Pieces(Vec<Bytes>),
    /// Cut what is buffered (a forced boundary), drain the pipeline, and
    /// report the counters once every chunk so far is appended and staged.
    Flush(Sender<Result<WorkerSummary>>),
    /// Stop, dropping what is buffered (the write is being detached,
    /// aborted or dropped); pieces queued before it are still cut.
    Stop,
}

/// What flows from the cutting stage into the appending stage.
enum AppendMsg {
    /// A batch's new chunks, in order (one message per batch: a hand-off
    /// between threads costs more than appending a chunk).
    Chunks(Vec<PreparedChunk>),
    /// Replies once every earlier chunk is appended and its placement staged.
    Barrier(Sender<Result<()>>),
}

/// Where a writer's pipeline starts: a new write, or a resumed held one.
#[derive(Clone, Copy, Default)]
struct Start {
    size: u64,
    chunks: u64,
    parts: u32,
}

/// Deletes a held write's staged placements of chunks its held parts do
/// not name: they were staged after the checkpoint, never made durable, and
/// a crash may have lost their records while the index kept them. The
/// resumed write stores such chunks again.
fn drop_unheld_placements(
    inner: &Inner,
    recipe: RecipeId,
    named: &std::collections::HashSet<ChunkId>,
) -> Result<()> {
    let cf = inner.index.cf(CF_STAGED)?;
    let prefix = recipe_prefix(recipe);
    let mut b = WriteBatch::default();
    for kv in inner.index.scan_prefix(CF_STAGED, &prefix)? {
        let (k, _) = kv?;
        let id = k.get(8..).and_then(ChunkId::from_slice);
        if !id.is_some_and(|id| named.contains(&id)) {
            b.delete_cf(cf, &k);
        }
    }
    if !b.is_empty() {
        tracing::debug!(
            recipe = recipe.0,
            placements = b.len(),
            "dropping placements staged after the checkpoint"
        );
        inner.index.write_unsynced(b)?;
    }
    Ok(())
}

/// A blob being written. Call [`BlobWriter::commit`] to make it durable and
/// visible; dropping it (or [`BlobWriter::abort`]) discards it, unless it was
/// checkpointed and then [detached](BlobWriter::detach).
pub struct BlobWriter {
    inner: Arc<Inner>,
    recipe: RecipeId,
    hasher: Option<Hasher>,
    expected: Option<Digest>,
    size: u64,
    /// `None` once the pipeline has finished, stopped or failed.
    pipe: Option<Pipeline>,
    finished: bool,
    /// Parked at a checkpoint (see [`WriterTicket::set_parked`]) until the
    /// next write.
    parked: bool,
    /// Registration among live writers (compaction spares what it may use);
    /// dropped last, after the commit or abort.
    ticket: Arc<WriterTicket>,
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
        Self::start(inner, recipe, Hasher::new(alg), expected, Start::default())
    }

    fn start(
        inner: Arc<Inner>,
        recipe: RecipeId,
        hasher: Hasher,
        expected: Option<Digest>,
        from: Start,
    ) -> Result<Self> {
        let ticket = Arc::new(inner.register_writer()?);
        let pipe = Pipeline::start(&inner, recipe, from, ticket.clone())?;
        Ok(BlobWriter {
            inner,
            recipe,
            hasher: Some(hasher),
            expected,
            size: from.size,
            pipe: Some(pipe),
            finished: false,
            parked: false,
            ticket,
        })
    }

    /// Continues a held write after a restart: re-reads (and verifies) the
    /// bytes it holds to rebuild the digest state, then accepts more pieces.
    /// Resume a held write at most once at a time.
    pub(crate) fn resume(inner: Arc<Inner>, recipe: RecipeId) -> Result<Self> {
        inner.segments.check_writable()?;
        let held = inner
            .index
            .held()?
            .into_iter()
            .find(|(r, _)| *r == recipe)
            .map(|(_, h)| h)
            .ok_or(Error::HeldWriteUnknown(recipe.0))?;
        // Parts written after the checkpoint (a crash or a detach cut them
        // off) are not part of the held state.
        let mut b = WriteBatch::default();
        let from = recipe_key(recipe, held.parts);
        let to = recipe_key(RecipeId(recipe.0.saturating_add(1)), 0);
        b.delete_range_cf(inner.index.cf(CF_RECIPES)?, from, to);
        inner.index.write_unsynced(b)?;
        tracing::debug!(
            recipe = recipe.0,
            parts = held.parts,
            size = held.size,
            "resuming a held write"
        );
        let mut hasher = Hasher::new(held.algorithm);
        let (mut size, mut chunks) = (0u64, 0u64);
        let mut named = std::collections::HashSet::new();
        for part_no in 0..held.parts {
            let v = inner
                .index
                .get(CF_RECIPES, &recipe_key(recipe, part_no))?
                .ok_or_else(|| Error::CorruptIndex {
                    cf: CF_RECIPES,
                    reason: format!("held write {} lacks recipe part {part_no}", recipe.0),
                })?;
            for e in RecipePart::decode(&v)?.entries {
                named.insert(e.chunk);
                let data = crate::read::fetch_staged_or_stored(&inner, recipe, &e)?;
                hasher.update(&data);
                size += data.len() as u64;
                chunks += 1;
            }
        }
        if size != held.size || chunks != held.chunk_count {
            return Err(Error::CorruptIndex {
                cf: CF_RECIPES,
                reason: format!(
                    "held write {} holds {size} bytes in {chunks} chunks, its entry says {} in {}",
                    recipe.0, held.size, held.chunk_count
                ),
            });
        }
        drop_unheld_placements(&inner, recipe, &named)?;
        let from = Start {
            size,
            chunks,
            parts: held.parts,
        };
        Self::start(inner, recipe, hasher, None, from)
    }

    /// The write's recipe id (names a held write).
    pub fn recipe(&self) -> RecipeId {
        self.recipe
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

    /// Whether this writer cuts and appends on the caller's thread (see
    /// `StoreConfig::write_inline_from_writers`).
    pub fn is_inline(&self) -> bool {
        self.pipe.as_ref().is_some_and(Pipeline::is_inline)
    }

    /// Runs one step of the pipeline; after a failure the pipeline is gone
    /// and the error reported is its own.
    fn step<T>(&mut self, f: impl FnOnce(&mut Pipeline) -> Result<T>) -> Result<T> {
        let Some(pipe) = self.pipe.as_mut() else {
            return Err(Error::ShuttingDown);
        };
        match f(pipe) {
            Ok(v) => Ok(v),
            Err(e) => Err(match self.pipe.take() {
                Some(p) => p.failed(e),
                None => e,
            }),
        }
    }

    /// Appends a piece. Blocks when the pipeline is full (backpressure).
    pub fn write(&mut self, piece: Bytes) -> Result<()> {
        self.write_pieces(vec![piece])
    }

    /// Appends consecutive pieces as one step of the pipeline (a request
    /// body's frames, say): one hand-off to the cutting thread (or, inline,
    /// one pass of the chunker, which cuts them in place), instead of one per
    /// piece or a copy into one piece first. Blocks when the
    /// pipeline is full.
    pub fn write_pieces(&mut self, mut pieces: Vec<Bytes>) -> Result<()> {
        pieces.retain(|p| !p.is_empty());
        if pieces.is_empty() {
            return Ok(());
        }
        if self.parked {
            self.ticket.set_parked(false);
            self.parked = false;
        }
        for p in &pieces {
            if let Some(h) = self.hasher.as_mut() {
                h.update(p);
            }
            self.size += p.len() as u64;
        }
        self.step(|p| p.pieces(pieces))
    }

    /// Makes every byte written so far durable and keeps the write across
    /// restarts as a *held* write named by `tag` (see [`crate::Store::held_writes`]).
    /// The chunk boundary at this point is forced, not content-defined.
    /// Returns the bytes held.
    pub fn checkpoint(&mut self, tag: &[u8]) -> Result<u64> {
        if tag.len() > HELD_TAG_BYTES_MAX {
            return Err(Error::Config(format!(
                "a held write's tag is at most {HELD_TAG_BYTES_MAX} bytes"
            )));
        }
        let sum = self.step(Pipeline::flush)?;
        if sum.bytes != self.size {
            return Err(Error::SizeMismatch {
                expected: self.size,
                actual: sum.bytes,
            });
        }
        let held = HeldEntry {
            size: self.size,
            chunk_count: sum.chunks,
            parts: sum.parts,
            algorithm: self
                .hasher
                .as_ref()
                .map(Hasher::algorithm)
                .unwrap_or(DigestAlgorithm::Sha256),
            updated_unix_ms: now_unix_ms(),
            tag: tag.to_vec(),
        };
        let recipe = self.recipe;
        self.inner.request(|reply| Request::Hold {
            recipe,
            held,
            reply,
        })?;
        // Held: an upload session between requests, which may not write
        // again for minutes, so it does not count among the busy writers
        // that make new ones cut inline.
        self.ticket.set_parked(true);
        self.parked = true;
        Ok(self.size)
    }

    /// Stops the pipeline without discarding the write: what the last
    /// [`checkpoint`](BlobWriter::checkpoint) held stays for a later
    /// [`crate::Store::resume_writer`] (or an abort); bytes after it are dropped.
    pub fn detach(mut self) {
        self.finished = true;
        if let Some(p) = self.pipe.take() {
            p.stop();
        }
        // What was appended after the checkpoint is dead (a resume cuts it
        // again), and an inline writer may not have staged it: once this
        // writer's floor is gone, compaction may delete it, so no other
        // writer may share it.
        self.inner.forget_inflight(self.recipe);
    }

    /// Ends the pipeline: every chunk appended and staged.
    fn finish_pipeline(&mut self) -> Result<WorkerSummary> {
        match self.pipe.take() {
            Some(p) => p.finish(),
            None => Err(Error::ShuttingDown),
        }
    }

    /// Finishes the blob: checks the digest, then commits it durably.
    pub fn commit(mut self) -> Result<BlobInfo> {
        self.finished = true;
        let summary = match self.finish_pipeline() {
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
                    expected: Box::new(expected.clone()),
                    actual: Box::new(actual),
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
        let created_unix_ms = now_unix_ms();
        let e = match self.inner.request(|reply| Request::Commit {
            recipe,
            digest,
            size,
            chunk_count,
            created_unix_ms,
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
        if let Some(p) = self.pipe.take() {
            p.stop();
        }
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
            if let Some(p) = self.pipe.take() {
                p.stop();
            }
            self.discard();
        }
    }
}
