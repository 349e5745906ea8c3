//! Appends to the active segment: records built (copied in, encrypted,
//! checksummed) in its append buffer under the append lock, a batch of
//! them per acquisition, and full buffers written after it is released.

use super::behind::Detached;
use super::format::{RecordHeader, FOOTER_BYTES, HEADER_BYTES, RECORD_HEADER_BYTES};
use super::{Active, PreparedChunk, Segments};
use crate::crypto::{nonce_for, ChunkCipher, TAG_BYTES};
use crate::error::{Error, Result};
use crate::ids::SegmentId;
use crate::index::codec::Location;
use crate::io::SegmentFile;
use std::sync::Arc;

/// Whole blocks taken out of the append buffer under the lock, to write
/// after it is released.
struct Behind {
    detached: Detached,
    seq: u64,
    file: Arc<dyn SegmentFile>,
    segment: SegmentId,
}

/// Builds a chunk's record in `buf` (exactly its length): the body copied
/// in and encrypted in place, the tag, then the header with its CRC32C.
/// Returns the header.
pub(crate) fn seal_record(
    cipher: &ChunkCipher,
    chunk: &PreparedChunk,
    nonce: [u8; crate::crypto::NONCE_BYTES],
    buf: &mut [u8],
) -> Result<[u8; RECORD_HEADER_BYTES]> {
    let body_len = chunk.body.len();
    let (head, payload) = buf.split_at_mut(RECORD_HEADER_BYTES);
    let (body, tag_out) = payload.split_at_mut(body_len);
    body.copy_from_slice(&chunk.body);
    let tag = cipher
        .seal_detached(
            nonce,
            chunk.kind,
            chunk.flags,
            chunk.raw_len,
            &chunk.id,
            body,
        )
        .map_err(|_| Error::Config("AEAD seal failed".into()))?;
    tag_out.copy_from_slice(&tag);
    let header = RecordHeader {
        kind: chunk.kind,
        flags: chunk.flags,
        payload_len: (body_len + TAG_BYTES) as u32,
        raw_len: chunk.raw_len,
        chunk: chunk.id,
        nonce,
    }
    .encode(payload);
    head.copy_from_slice(&header);
    Ok(header)
}

impl Segments {
    /// The active segment, sealed and replaced first when `record_len`
    /// more bytes would not fit. The caller holds the append lock.
    fn with_room<'g>(
        &self,
        guard: &'g mut Option<Active>,
        record_len: u64,
    ) -> Result<&'g mut Active> {
        // Again under the lock: a failure by another appender may have
        // poisoned the store since the caller's check.
        self.check_writable()?;
        // A record that no segment can hold would run into the footer.
        if HEADER_BYTES + record_len + FOOTER_BYTES > self.segment_bytes {
            return Err(Error::Config(format!(
                "a record of {record_len} bytes does not fit a segment of {} bytes",
                self.segment_bytes
            )));
        }
        if guard
            .as_ref()
            .is_none_or(|a| self.segment_full(a, record_len))
        {
            if let Some(a) = guard.take() {
                self.seal(a)?;
            }
            *guard = Some(self.create()?);
        }
        guard.as_mut().ok_or(Error::Poisoned)
    }

    /// A failed write to the active segment `id`: the store is poisoned and
    /// the segment retired, so that nothing appends to it (and reuses its
    /// nonces) again. Returns the error to report.
    pub(super) fn retire_active(
        &self,
        guard: &mut Option<Active>,
        id: SegmentId,
        e: std::io::Error,
    ) -> Error {
        self.poison(&e);
        *guard = None;
        Error::io(self.path_of(id), e)
    }

    /// Writes a finished record at the active segment's end and advances it.
    /// A failed write retires the segment: nothing may append (and reuse
    /// its nonces) again.
    fn write_record(&self, guard: &mut Option<Active>, record: &[u8]) -> Result<()> {
        let a = guard.as_mut().ok_or(Error::Poisoned)?;
        if let Err(e) = a.stage.push(&*a.file, record) {
            let id = a.id;
            return Err(self.retire_active(guard, id, e));
        }
        a.count(&record[..RECORD_HEADER_BYTES], record.len());
        Ok(())
    }

    /// Encrypts and appends one chunk record; returns where it landed.
    pub fn append(&self, cipher: &ChunkCipher, chunk: &PreparedChunk) -> Result<Location> {
        let mut out = Vec::with_capacity(1);
        self.append_batch(cipher, std::slice::from_ref(chunk), &mut out)?;
        out.pop().ok_or(Error::Poisoned)
    }

    /// Encrypts and appends chunk records in order, pushing where each
    /// landed onto `out`. Each record is built in the append buffer itself
    /// (one copy of the body), or, when it is larger than that buffer, in a
    /// buffer of its own. The append lock is taken once for as many records
    /// as fit before a second full buffer (a whole batch, usually): a full
    /// buffer is written after the lock is released (`behind`), then the
    /// rest of the batch follows under the lock again. On an error, `out`
    /// holds the records appended before it.
    pub fn append_batch(
        &self,
        cipher: &ChunkCipher,
        chunks: &[PreparedChunk],
        out: &mut Vec<Location>,
    ) -> Result<()> {
        self.check_writable()?;
        let mut rest = chunks;
        while !rest.is_empty() {
            let mut guard = self.active.lock().unwrap_or_else(|p| p.into_inner());
            let mut behind = None;
            let filled = self.fill_locked(&mut guard, cipher, rest, out, &mut behind);
            drop(guard);
            // Written whatever became of the records after it: the buffer
            // holds earlier ones.
            if let Some(b) = behind {
                self.write_behind(b)?;
            }
            rest = rest.get(filled?..).unwrap_or_default();
        }
        Ok(())
    }

    /// Seals `chunks` into the active segment, under the append lock, until
    /// all are in or the next one would need a second full buffer written
    /// (or the segment sealed, which waits for the first) while one is
    /// already taken out into `behind`. Returns how many went in.
    fn fill_locked(
        &self,
        guard: &mut Option<Active>,
        cipher: &ChunkCipher,
        chunks: &[PreparedChunk],
        out: &mut Vec<Location>,
        behind: &mut Option<Behind>,
    ) -> Result<usize> {
        for (i, chunk) in chunks.iter().enumerate() {
            let record_len = RECORD_HEADER_BYTES + chunk.body.len() + TAG_BYTES;
            if behind.is_some() && self.needs_room(guard, record_len) {
                return Ok(i);
            }
            let a = self.with_room(guard, record_len as u64)?;
            let (segment, offset) = (a.id, a.offset as u32);
            if a.stage.is_full_for(record_len) {
                *behind = self
                    .behind
                    .begin(a.stage.capacity())
                    .map(|(spare, seq)| Behind {
                        detached: a.stage.detach_whole_blocks(spare),
                        seq,
                        file: a.file.clone(),
                        segment,
                    });
            }
            self.seal_into_stage(guard, cipher, chunk, segment, offset, record_len)?;
            out.push(Location {
                segment,
                offset,
                payload_len: (record_len - RECORD_HEADER_BYTES) as u32,
                raw_len: chunk.raw_len,
                flags: chunk.flags,
            });
        }
        Ok(chunks.len())
    }

    /// Whether a record of `record_len` bytes would run into the active
    /// segment's footer (the segment is sealed and replaced first).
    fn segment_full(&self, a: &Active, record_len: u64) -> bool {
        a.offset + record_len > self.segment_bytes - FOOTER_BYTES
    }

    /// Whether a record of `record_len` bytes needs the append buffer's
    /// whole blocks written, or the active segment sealed, first.
    fn needs_room(&self, guard: &Option<Active>, record_len: usize) -> bool {
        guard.as_ref().is_none_or(|a| {
            self.segment_full(a, record_len as u64) || a.stage.is_full_for(record_len)
        })
    }

    /// Builds the record at the active segment's end. The nonce depends on
    /// the offset, so encryption happens under the append lock (AES-GCM
    /// runs at GB/s).
    fn seal_into_stage(
        &self,
        guard: &mut Option<Active>,
        cipher: &ChunkCipher,
        chunk: &PreparedChunk,
        segment: SegmentId,
        offset: u32,
        record_len: usize,
    ) -> Result<()> {
        let nonce = nonce_for(segment, offset);
        let a = guard.as_mut().ok_or(Error::Poisoned)?;
        let room = match a.stage.room(&*a.file, record_len) {
            Ok(room) => room,
            Err(e) => return Err(self.retire_active(guard, segment, e)),
        };
        match room {
            Some(buf) => {
                let header = seal_record(cipher, chunk, nonce, buf)?;
                a.stage.advance(record_len);
                a.count(&header, record_len);
            }
            None => {
                let mut buf = vec![0u8; record_len];
                seal_record(cipher, chunk, nonce, &mut buf)?;
                self.write_record(guard, &buf)?;
            }
        }
        Ok(())
    }

    /// Writes blocks taken out of the append buffer; a failure poisons the
    /// store (the log now has a hole nothing may append past).
    fn write_behind(&self, b: Behind) -> Result<()> {
        let r = b.detached.write(&*b.file);
        if let Err(e) = &r {
            self.poison(e);
        }
        self.behind.end(b.seq, b.detached.buf);
        r.map_err(|e| Error::io(self.path_of(b.segment), e))
    }

    /// Appends an already sealed record (header ‖ payload, as read from
    /// another segment) unchanged: compaction moves ciphertext, whose nonce
    /// is in its header, without re-encrypting. Checks the record first.
    pub fn append_raw(&self, record: &[u8]) -> Result<Location> {
        self.check_writable()?;
        let h = RecordHeader::decode(record)
            .filter(|h| h.total_len() == record.len() as u64 && RecordHeader::checksum_ok(record))
            .ok_or_else(|| Error::Config("compaction: a record to move fails its checks".into()))?;
        let mut guard = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let a = self.with_room(&mut guard, record.len() as u64)?;
        let (segment, offset) = (a.id, a.offset as u32);
        self.write_record(&mut guard, record)?;
        Ok(Location {
            segment,
            offset,
            payload_len: h.payload_len,
            raw_len: h.raw_len,
            flags: h.flags,
        })
    }
}
