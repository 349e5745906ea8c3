//! The read path: whole and ranged streaming reads. Every chunk is checked
//! before a byte of it is returned: a single read checks the record's
//! checksum, its AEAD tag, then its keyed BLAKE3 name; the bulk path
//! ([`crate::span`]) the tag (see [`Check`]).

use crate::compress::decompress;
use crate::error::{Error, Result};
use crate::ids::{ChunkId, Digest};
use crate::index::codec::{recipe_key, BlobEntry, ChunkEntry, Location, RecipeEntry, RecipePart};
use crate::index::CF_RECIPES;
use crate::segment::format::{RecordHeader, FLAG_ZSTD, KIND_CHUNK, RECORD_HEADER_BYTES};
use crate::store::Inner;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::Arc;

/// Loads, authenticates, decompresses and checks one chunk.
pub(crate) fn load_chunk(inner: &Inner, id: &ChunkId, entry: &ChunkEntry) -> Result<Bytes> {
    let rec = inner.segments.read_record(&entry.loc)?;
    open_record(inner, id, &entry.loc, rec)
}

/// Authenticates, decompresses and checks a chunk's record (its CRC already
/// checked), read from `loc`.
pub(crate) fn open_record(
    inner: &Inner,
    id: &ChunkId,
    loc: &Location,
    rec: Vec<u8>,
) -> Result<Bytes> {
    let (h, plain) = open_any(inner, loc, rec)?;
    check_chunk_header(&h, id, loc)?;
    Ok(plain)
}

/// A chunk record's header must say what the index says of it.
pub(crate) fn check_chunk_header(h: &RecordHeader, id: &ChunkId, loc: &Location) -> Result<()> {
    if h.kind != KIND_CHUNK
        || h.chunk != *id
        || h.raw_len != loc.raw_len
        || h.flags != loc.flags
        || h.payload_len != loc.payload_len
    {
        return Err(Error::CorruptChunk {
            segment: loc.segment,
            offset: loc.offset as u64,
            reason: "record header does not match the index",
        });
    }
    Ok(())
}

/// Authenticates and decompresses any record (chunk or journal) and checks
/// that its plaintext has the record's name. `loc` names it in errors.
pub(crate) fn open_any(
    inner: &Inner,
    loc: &Location,
    rec: Vec<u8>,
) -> Result<(RecordHeader, Bytes)> {
    open_with(&inner.cipher, &inner.naming_key, loc, rec)
}

/// [`open_any`] with the store's keys given (a rebuild has no store open).
pub(crate) fn open_with(
    cipher: &crate::crypto::ChunkCipher,
    naming_key: &[u8; 32],
    loc: &Location,
    mut rec: Vec<u8>,
) -> Result<(RecordHeader, Bytes)> {
    let (h, plain) = open_in_place(cipher, naming_key, loc, &mut rec, Check::Full)?;
    let plain = match plain {
        Plain::At(r) => Bytes::from(rec).slice(r),
        Plain::Owned(v) => Bytes::from(v),
    };
    Ok((h, plain))
}

/// Where a record's plaintext is after [`open_in_place`].
pub(crate) enum Plain {
    /// In the record's own buffer (it was stored uncompressed).
    At(std::ops::Range<usize>),
    /// Decompressed into a buffer of its own.
    Owned(Vec<u8>),
}

/// What [`open_in_place`] checks beyond the AEAD tag.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// The plaintext's keyed BLAKE3 name too, always (single reads, fsck,
    /// rebuild: wherever a failure must be told apart precisely).
    Full,
    /// The name only of a decompressed plaintext. The tag authenticates the
    /// ciphertext together with the chunk id, kind, flags and raw length
    /// (the associated data) under the store's key: a stored plaintext that
    /// passes it is the one sealed under that name, but for a chance of
    /// about one in 2^110 per record (GCM's bound for records of up to a
    /// few MiB), against one in 2^32 for the CRC32C. Decompression is
    /// code, not storage, so its output is still named. The bulk path
    /// ([`crate::span`]) opens records this way and sends any that fail to
    /// the `Full` path, which reports the failure exactly.
    Tag,
}

/// Authenticates and decrypts a record (header ‖ payload, its CRC already
/// checked where the caller asks for it) in place, decompresses it if it
/// was compressed, and checks the plaintext's length and (per `check`) its
/// name.
pub(crate) fn open_in_place(
    cipher: &crate::crypto::ChunkCipher,
    naming_key: &[u8; 32],
    loc: &Location,
    rec: &mut [u8],
    check: Check,
) -> Result<(RecordHeader, Plain)> {
    let corrupt = |reason| Error::CorruptChunk {
        segment: loc.segment,
        offset: loc.offset as u64,
        reason,
    };
    let h = RecordHeader::decode(rec).ok_or_else(|| corrupt("no record header"))?;
    let n = cipher
        .open(
            h.nonce,
            h.kind,
            h.flags,
            h.raw_len,
            &h.chunk,
            &mut rec[RECORD_HEADER_BYTES..],
        )
        .map_err(|_| corrupt("authentication (AEAD tag) failed"))?;
    let body = RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + n;
    let plain = if h.flags & FLAG_ZSTD != 0 {
        Plain::Owned(
            decompress(&rec[body], h.raw_len as usize)
                .ok_or_else(|| corrupt("zstd data does not decompress to its length"))?,
        )
    } else {
        Plain::At(body)
    };
    let bytes: &[u8] = match &plain {
        Plain::At(r) => &rec[r.clone()],
        Plain::Owned(v) => v,
    };
    if bytes.len() != h.raw_len as usize {
        return Err(corrupt("content does not match the chunk name"));
    }
    if check == Check::Full || matches!(plain, Plain::Owned(_)) {
        let name = ChunkId(*blake3::keyed_hash(naming_key, bytes).as_bytes());
        if name != h.chunk {
            return Err(corrupt("content does not match the chunk name"));
        }
    }
    Ok((h, plain))
}

/// Looks up and loads a chunk named by a recipe.
pub(crate) fn fetch_chunk(inner: &Inner, e: &RecipeEntry) -> Result<Bytes> {
    let entry = inner
        .index
        .chunk(&e.chunk)?
        .ok_or_else(|| Error::CorruptIndex {
            cf: "chunks",
            reason: format!("recipe names missing chunk {}", e.chunk),
        })?;
    if entry.loc.raw_len != e.raw_len {
        return Err(Error::CorruptIndex {
            cf: "chunks",
            reason: format!("chunk {} length differs from its recipe", e.chunk),
        });
    }
    if entry.is_quarantined() {
        return Err(Error::ChunkQuarantined { chunk: e.chunk });
    }
    match load_chunk(inner, &e.chunk, &entry) {
        // Compaction moved the chunk and removed its old segment between
        // the lookup and the read: read it where it is now.
        Err(Error::SegmentMissing(seg)) => match inner.index.chunk(&e.chunk)? {
            Some(now) if now.loc != entry.loc => load_chunk(inner, &e.chunk, &now),
            _ => Err(Error::SegmentMissing(seg)),
        },
        r => r,
    }
}

/// Loads a chunk of an uncommitted (held) write: from the index if it is
/// stored, else from the write's own staged placement.
pub(crate) fn fetch_staged_or_stored(
    inner: &Inner,
    recipe: crate::ids::RecipeId,
    e: &RecipeEntry,
) -> Result<Bytes> {
    // A quarantined chunk is read from the write's own staged copy.
    if inner
        .index
        .chunk(&e.chunk)?
        .is_some_and(|c| !c.is_quarantined())
    {
        return fetch_chunk(inner, e);
    }
    let staged = inner
        .index
        .get(
            crate::index::CF_STAGED,
            &crate::index::codec::staged_key(recipe, &e.chunk),
        )?
        .ok_or_else(|| Error::CorruptIndex {
            cf: "staged",
            reason: format!("held write {} lacks chunk {}", recipe.0, e.chunk),
        })?;
    let loc = Location::decode(&staged, crate::index::CF_STAGED)?;
    if loc.raw_len != e.raw_len {
        return Err(Error::CorruptIndex {
            cf: "staged",
            reason: format!("chunk {} length differs from its recipe", e.chunk),
        });
    }
    load_chunk(inner, &e.chunk, &ChunkEntry { loc, refs: 0 })
}

/// Iterates a blob's recipe parts in order.
pub(crate) fn recipe_parts<'a>(
    inner: &'a Inner,
    entry: &BlobEntry,
) -> impl Iterator<Item = Result<RecipePart>> + 'a {
    let recipe = entry.recipe;
    let mut part_no = 0u32;
    std::iter::from_fn(move || {
        let r = inner.index.get(CF_RECIPES, &recipe_key(recipe, part_no));
        part_no += 1;
        match r {
            Ok(Some(v)) => Some(RecipePart::decode(&v)),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    })
}

/// How many of a blob's recipe entries name a quarantined (or missing) chunk.
pub(crate) fn quarantined_chunks(inner: &Inner, entry: &BlobEntry) -> Result<u64> {
    count_quarantined(inner, entry, |id| inner.index.chunk(id))
}

/// [`quarantined_chunks`] with chunk entries from `lookup` (the committer's
/// overlay, a repair's plan).
pub(crate) fn count_quarantined(
    inner: &Inner,
    entry: &BlobEntry,
    lookup: impl Fn(&ChunkId) -> Result<Option<ChunkEntry>>,
) -> Result<u64> {
    let mut n = 0u64;
    for part in recipe_parts(inner, entry) {
        for e in part?.entries {
            if lookup(&e.chunk)?.is_none_or(|c| c.is_quarantined()) {
                n += 1;
            }
        }
    }
    Ok(n)
}

/// Recipe entries read together, and the blob offset of each.
#[derive(Default)]
struct Batch {
    starts: Vec<u64>,
    entries: Vec<RecipeEntry>,
}

/// A streaming reader over a byte range of one blob.
pub struct BlobReader {
    inner: Arc<Inner>,
    entry: BlobEntry,
    /// Blob offset of the next recipe entry in `queue`.
    queue_pos: u64,
    queue: VecDeque<RecipeEntry>,
    next_part: u32,
    /// Absolute range still to return.
    pos: u64,
    end: u64,
    ready: VecDeque<Bytes>,
    current: Bytes,
    /// The next batch, its span reads already queued (see [`crate::span`]).
    ahead: Option<(Batch, crate::span::Pending)>,
    /// A batch failed: the reader's position is no longer known, so every
    /// later call fails too (rather than return bytes from the wrong place).
    failed: bool,
}

impl BlobReader {
    pub(crate) fn new(
        inner: Arc<Inner>,
        digest: &Digest,
        offset: u64,
        len: Option<u64>,
    ) -> Result<Self> {
        let entry = inner
            .index
            .blob(digest)?
            .ok_or_else(|| Error::BlobUnknown(digest.clone()))?;
        if inner.index.broken(digest)? {
            // Marked by fsck --repair: fail before any byte is served,
            // unless a later write has restored every chunk.
            let chunks = quarantined_chunks(&inner, &entry)?;
            if chunks > 0 {
                return Err(Error::BlobBroken {
                    digest: digest.clone(),
                    chunks,
                });
            }
        }
        let len = len.unwrap_or(entry.size.saturating_sub(offset));
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= entry.size && offset <= entry.size);
        let Some(end) = end else {
            return Err(Error::RangeInvalid {
                offset,
                len,
                size: entry.size,
            });
        };
        let mut r = BlobReader {
            inner,
            entry,
            queue_pos: 0,
            queue: VecDeque::new(),
            next_part: 0,
            pos: offset,
            end,
            ready: VecDeque::new(),
            current: Bytes::new(),
            ahead: None,
            failed: false,
        };
        r.seek_part()?;
        Ok(r)
    }

    /// Blob size.
    pub fn blob_size(&self) -> u64 {
        self.entry.size
    }

    /// Bytes left to return.
    pub fn remaining(&self) -> u64 {
        self.end - self.pos
    }

    /// Loads recipe parts until the one holding `pos`.
    fn seek_part(&mut self) -> Result<()> {
        loop {
            let Some(part) = self.load_part()? else {
                return Ok(());
            };
            if part.start != self.queue_pos {
                return Err(self.gap(part.start));
            }
            self.queue_pos = part.end();
            if part.end() > self.pos || part.entries.is_empty() {
                self.queue_pos = part.start;
                self.queue = part.entries.into();
                return Ok(());
            }
        }
    }

    fn gap(&self, start: u64) -> Error {
        Error::CorruptIndex {
            cf: CF_RECIPES,
            reason: format!(
                "recipe {} part {} starts at {start}, expected {}",
                self.entry.recipe.0,
                self.next_part - 1,
                self.queue_pos
            ),
        }
    }

    fn load_part(&mut self) -> Result<Option<RecipePart>> {
        let v = self
            .inner
            .index
            .get(CF_RECIPES, &recipe_key(self.entry.recipe, self.next_part))?;
        self.next_part += 1;
        v.map(|v| RecipePart::decode(&v)).transpose()
    }

    /// The next batch of recipe entries that overlap the range, up to the
    /// read-ahead bounds; empty at the end.
    fn collect(&mut self) -> Result<Batch> {
        let mut batch = Batch::default();
        let mut batch_bytes = 0usize;
        while batch.entries.len() < self.inner.cfg.read_ahead_chunks
            && batch_bytes < self.inner.cfg.read_ahead_bytes
            && self.queue_pos < self.end
        {
            let Some(e) = self.queue.pop_front() else {
                match self.load_part()? {
                    Some(p) => {
                        if p.start != self.queue_pos {
                            return Err(self.gap(p.start));
                        }
                        self.queue = p.entries.into();
                        continue;
                    }
                    None => {
                        return Err(Error::CorruptIndex {
                            cf: CF_RECIPES,
                            reason: format!(
                                "recipe {} ends before the blob's size",
                                self.entry.recipe.0
                            ),
                        })
                    }
                }
            };
            let start = self.queue_pos;
            self.queue_pos += e.raw_len as u64;
            if self.queue_pos > self.pos {
                batch_bytes += e.raw_len as usize;
                batch.starts.push(start);
                batch.entries.push(e);
            }
        }
        Ok(batch)
    }

    /// Decodes the next batch of chunks that overlap the range, having
    /// first queued the reads of the batch after it.
    fn fill(&mut self) -> Result<()> {
        let (batch, pending) = match self.ahead.take() {
            Some(a) => a,
            None => {
                let b = self.collect()?;
                let p = crate::span::start(&self.inner, &b.entries, false);
                (b, p)
            }
        };
        if self.queue_pos < self.end {
            let next = self.collect()?;
            let p = crate::span::start(&self.inner, &next.entries, true);
            self.ahead = Some((next, p));
        }
        let decoded = crate::span::finish(&self.inner, &batch.entries, pending);
        for (start, d) in batch.starts.iter().zip(decoded) {
            let d = d?;
            let from = self.pos.saturating_sub(*start).min(d.len() as u64) as usize;
            let to = (self.end - start).min(d.len() as u64) as usize;
            if from < to {
                self.ready.push_back(d.slice(from..to));
            }
        }
        Ok(())
    }

    /// Every piece of the next read-ahead batch (up to `read_ahead_bytes`),
    /// or None at the range's end. Zero-copy; for a streaming server, which
    /// then hands them on in one message.
    pub fn next_batch(&mut self) -> Result<Option<Vec<Bytes>>> {
        let Some(first) = self.next_piece()? else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(self.ready.len() + 1);
        out.push(first);
        while let Some(b) = self.ready.pop_front() {
            self.pos += b.len() as u64;
            out.push(b);
        }
        Ok(Some(out))
    }

    /// The next piece of the range, or None at its end. Zero-copy.
    pub fn next_piece(&mut self) -> Result<Option<Bytes>> {
        if !self.current.is_empty() {
            let c = std::mem::take(&mut self.current);
            self.pos += c.len() as u64;
            return Ok(Some(c));
        }
        if self.ready.is_empty() {
            if self.pos >= self.end {
                return Ok(None);
            }
            if self.failed {
                return Err(Error::io(
                    "blob reader",
                    std::io::Error::other("an earlier read of this range failed"),
                ));
            }
            if let Err(e) = self.fill() {
                self.failed = true;
                return Err(e);
            }
        }
        match self.ready.pop_front() {
            Some(b) => {
                self.pos += b.len() as u64;
                Ok(Some(b))
            }
            None if self.pos >= self.end => Ok(None),
            None => Err(Error::CorruptIndex {
                cf: CF_RECIPES,
                reason: "recipe shorter than blob".into(),
            }),
        }
    }
}

impl std::io::Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.current.is_empty() {
            match self.next_piece() {
                Ok(Some(b)) => {
                    self.pos -= b.len() as u64;
                    self.current = b;
                }
                Ok(None) => return Ok(0),
                Err(e) => return Err(std::io::Error::other(e)),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
#[path = "read_tests.rs"]
mod tests;
