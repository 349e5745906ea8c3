//! Bulk reads for streaming a blob. The records a batch of recipe entries
//! names are grouped into *spans*, runs of records that lie back to back in
//! one segment (as a blob's new chunks do where it was written); each span
//! is read with one read (through the page cache, whose readahead keeps
//! the next span coming while this one is opened: measured here, 0.8-1.5
//! GB/s against 0.4-0.5 GB/s for O_DIRECT reads of the same spans, which
//! have nothing in flight while a batch is opened) into a block-aligned
//! buffer, and its records are checked and decrypted
//! in place, on the reader's own thread: opening runs at GB/s on one core
//! (AES-GCM, BLAKE3, CRC32C), and handing work to a pool and back costs
//! more than it saves (the pool's threads spin and yield while they wait). An uncompressed chunk is returned as a slice of
//! that buffer, without a copy.
//!
//! Anything unusual (a chunk the index lacks or has quarantined, a segment
//! compaction removed meanwhile, a record that fails a check) is left to
//! [`fetch_chunk`], chunk by chunk, which retries moved chunks and reports
//! errors exactly as a single read does.

use crate::error::{Error, Result};
use crate::ids::{ChunkId, SegmentId};
use crate::index::codec::{Location, RecipeEntry};
use crate::io::{AlignedBuf, BLOCK_BYTES};
use crate::read::{check_chunk_header, fetch_chunk, open_in_place, Plain};
use crate::segment::format::RecordHeader;
use crate::store::Inner;
use bytes::Bytes;

/// The longest span read at once.
const SPAN_BYTES_MAX: u64 = 8 << 20;

/// Records back to back in one segment, read together.
struct Span {
    segment: SegmentId,
    /// File offsets: the first record's start, the last one's end.
    start: u64,
    end: u64,
    /// Positions in the batch of the records it holds, in file order.
    members: Vec<usize>,
}

/// Loads every chunk of `batch`, in order. Each result is the chunk's
/// plaintext, or the error [`fetch_chunk`] gives for it.
pub(crate) fn load_batch(inner: &Inner, batch: &[RecipeEntry]) -> Vec<Result<Bytes>> {
    let mut out: Vec<Option<Result<Bytes>>> = (0..batch.len()).map(|_| None).collect();
    let (locs, spans) = plan(inner, batch);
    // Spans are read one after another (a blob's chunks are mostly one
    // span), then their records are opened.
    let read: Vec<(Span, Option<(AlignedBuf, u64)>)> = spans
        .into_iter()
        .map(|s| {
            let buf = read_span(inner, &s).ok();
            (s, buf)
        })
        .collect();
    let opened: Vec<Vec<(usize, Option<Bytes>)>> = read
        .into_iter()
        .map(|(span, buf)| match buf {
            Some((buf, aligned_start)) => open_span(inner, batch, &locs, &span, buf, aligned_start),
            None => span.members.iter().map(|&i| (i, None)).collect(),
        })
        .collect();
    for (i, b) in opened.into_iter().flatten() {
        if let Some(b) = b {
            out[i] = Some(Ok(b));
        }
    }
    // The rest, one by one (with fetch_chunk's checks, retries and errors).
    let rest: Vec<usize> = (0..batch.len()).filter(|&i| out[i].is_none()).collect();
    let fetched: Vec<(usize, Result<Bytes>)> = rest
        .into_iter()
        .map(|i| (i, fetch_chunk(inner, &batch[i])))
        .collect();
    for (i, r) in fetched {
        out[i] = Some(r);
    }
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::ShuttingDown)))
        .collect()
}

/// Where each chunk is (None: leave it to `fetch_chunk`), and the spans.
fn plan(inner: &Inner, batch: &[RecipeEntry]) -> (Vec<Option<Location>>, Vec<Span>) {
    let locs: Vec<Option<Location>> = batch
        .iter()
        .map(|e| match inner.index.chunk(&e.chunk) {
            Ok(Some(c)) if !c.is_quarantined() && c.loc.raw_len == e.raw_len => Some(c.loc),
            _ => None,
        })
        .collect();
    let mut spans: Vec<Span> = Vec::new();
    for (i, loc) in locs.iter().enumerate() {
        let Some(loc) = loc else { continue };
        let (start, end) = (loc.offset as u64, loc.offset as u64 + loc.record_len());
        match spans.last_mut() {
            Some(s) if s.segment == loc.segment && s.end == start && end - s.start <= SPAN_BYTES_MAX => {
                s.end = end;
                s.members.push(i);
            }
            _ => spans.push(Span {
                segment: loc.segment,
                start,
                end,
                members: vec![i],
            }),
        }
    }
    (locs, spans)
}

/// Reads a span's blocks; returns the buffer and the file offset of its
/// first byte.
fn read_span(inner: &Inner, s: &Span) -> Result<(AlignedBuf, u64)> {
    let block = BLOCK_BYTES as u64;
    let aligned_start = s.start / block * block;
    let aligned_end = s.end.div_ceil(block) * block;
    let file = inner.segments.file(s.segment)?;
    let mut buf = AlignedBuf::new((aligned_end - aligned_start) as usize);
    let want = (aligned_end - aligned_start) as usize;
    match file.read_at(&mut buf.as_mut_slice()[..want], aligned_start) {
        Ok(()) => {}
        // The file ends inside the last block (a segment sealed or
        // truncated at its data end): read exactly the span instead.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            let from = (s.start - aligned_start) as usize;
            let to = (s.end - aligned_start) as usize;
            file.read_at(&mut buf.as_mut_slice()[from..to], s.start)
                .map_err(|e| Error::io(inner.segments.path_of(s.segment), e))?;
        }
        Err(e) => return Err(Error::io(inner.segments.path_of(s.segment), e)),
    }
    Ok((buf, aligned_start))
}

/// Checks and opens a span's records in its buffer. A record that fails
/// yields None (and goes to `fetch_chunk`).
fn open_span(
    inner: &Inner,
    batch: &[RecipeEntry],
    locs: &[Option<Location>],
    span: &Span,
    mut buf: AlignedBuf,
    aligned_start: u64,
) -> Vec<(usize, Option<Bytes>)> {
    // Split the span into one mutable slice per record (back to back).
    let head = (span.start - aligned_start) as usize;
    let mut rest = &mut buf.as_mut_slice()[head..];
    let mut records: Vec<(usize, usize, &mut [u8])> = Vec::with_capacity(span.members.len());
    let mut at = head;
    for &i in &span.members {
        let len = locs[i].map_or(0, |l| l.record_len() as usize);
        let cur = std::mem::take(&mut rest);
        let n = len.min(cur.len());
        let (rec, tail) = cur.split_at_mut(n);
        records.push((i, at, rec));
        at += len;
        rest = tail;
    }
    let open = |(i, at, rec): (usize, usize, &mut [u8])| {
        let r = locs[i].and_then(|loc| open_checked(inner, &batch[i].chunk, &loc, rec).ok());
        (i, r.map(|p| (at, p)))
    };
    let opened: Vec<(usize, Option<(usize, Plain)>)> = records.into_iter().map(open).collect();
    let shared = Bytes::from_owner(buf);
    opened
        .into_iter()
        .map(|(i, r)| {
            let b = r.map(|(at, p)| match p {
                Plain::At(range) => shared.slice(at + range.start..at + range.end),
                Plain::Owned(v) => Bytes::from(v),
            });
            (i, b)
        })
        .collect()
}

fn open_checked(inner: &Inner, id: &ChunkId, loc: &Location, rec: &mut [u8]) -> Result<Plain> {
    if rec.len() as u64 != loc.record_len() || !RecordHeader::checksum_ok(rec) {
        return Err(Error::ChecksumMismatch {
            segment: loc.segment,
            offset: loc.offset as u64,
        });
    }
    let (h, plain) = open_in_place(&inner.cipher, &inner.naming_key, loc, rec)?;
    check_chunk_header(&h, id, loc)?;
    Ok(plain)
}
