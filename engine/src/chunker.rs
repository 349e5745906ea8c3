//! Streaming content-defined chunking (FastCDC 2020, normalization level 1).
//!
//! Data is fed in pieces of any size; chunks come out exactly as a single pass
//! of FastCDC over the whole stream would cut them, with at most
//! `window + max_bytes` buffered.

use crate::config::ChunkParams;
use bytes::{Bytes, BytesMut};
use fastcdc::v2020::{cut, logarithm2, MASKS};

pub(crate) struct Chunker {
    p: ChunkParams,
    mask_s: u64,
    mask_l: u64,
    buf: BytesMut,
    window_bytes: usize,
}

impl Chunker {
    pub fn new(p: ChunkParams) -> Self {
        let bits = logarithm2(p.avg_bytes) as usize;
        Chunker {
            p,
            mask_s: MASKS[bits + 1],
            mask_l: MASKS[bits - 1],
            buf: BytesMut::new(),
            window_bytes: (p.max_bytes as usize * 4).max(1 << 20),
        }
    }

    /// A fresh window holding `tail`, with room for a whole window and one
    /// more piece, so that filling it never reallocates (and copies) it.
    fn window_with(&self, tail: &[u8], piece_len: usize) -> BytesMut {
        let mut b = BytesMut::with_capacity(self.window_bytes + piece_len.max(1 << 16));
        b.extend_from_slice(tail);
        b
    }

    /// Feeds a piece; calls `emit` for every chunk that is now final.
    pub fn push(
        &mut self,
        piece: &[u8],
        emit: &mut dyn FnMut(Bytes) -> crate::Result<()>,
    ) -> crate::Result<()> {
        if self.buf.capacity() - self.buf.len() < piece.len() {
            let tail = std::mem::take(&mut self.buf);
            self.buf = self.window_with(&tail, piece.len());
        }
        self.buf.extend_from_slice(piece);
        if self.buf.len() >= self.window_bytes {
            self.drain(false, emit)?;
        }
        Ok(())
    }

    /// Ends the stream, emitting what is left.
    pub fn finish(
        &mut self,
        emit: &mut dyn FnMut(Bytes) -> crate::Result<()>,
    ) -> crate::Result<()> {
        self.drain(true, emit)
    }

    fn drain(
        &mut self,
        eof: bool,
        emit: &mut dyn FnMut(Bytes) -> crate::Result<()>,
    ) -> crate::Result<()> {
        let max = self.p.max_bytes as usize;
        let mut frozen = std::mem::take(&mut self.buf).freeze();
        let mut start = 0;
        while start < frozen.len() {
            let remaining = frozen.len() - start;
            if !eof && remaining < max {
                break;
            }
            let (_, len) = cut(
                &frozen[start..],
                self.p.min_bytes as usize,
                self.p.avg_bytes as usize,
                max,
                self.mask_s,
                self.mask_l,
                self.mask_s << 1,
                self.mask_l << 1,
            );
            let len = len.max(1).min(remaining);
            emit(frozen.slice(start..start + len))?;
            start += len;
        }
        let tail = frozen.split_off(start);
        // The emitted chunks keep the old window alive; the tail starts a
        // new one (at most `max_bytes` copied).
        self.buf = BytesMut::new();
        if !tail.is_empty() {
            self.buf = self.window_with(&tail, 0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    fn chunks_of(data: &[u8], piece: usize, p: ChunkParams) -> Vec<Bytes> {
        let mut c = Chunker::new(p);
        let mut out = Vec::new();
        for part in data.chunks(piece.max(1)) {
            c.push(part, &mut |b| {
                out.push(b);
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{e}"));
        }
        c.finish(&mut |b| {
            out.push(b);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
        out
    }

    #[test]
    fn cuts_do_not_depend_on_piece_sizes() {
        let p = ChunkParams {
            min_bytes: 1024,
            avg_bytes: 4096,
            max_bytes: 16384,
        };
        let mut data = vec![0u8; 3 << 20];
        rand::rngs::SmallRng::seed_from_u64(5).fill_bytes(&mut data);
        let a = chunks_of(&data, 1 << 30, p);
        let b = chunks_of(&data, 777, p);
        let c = chunks_of(&data, 65536, p);
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(a.concat(), data);
        assert!(a.iter().all(|c| c.len() <= 16384));
        assert!(a.len() > 100);
    }
}
