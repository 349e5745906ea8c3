//! The work a chunk gets on its way to a segment: FastCDC cut points, a
//! keyed BLAKE3 name, a copy into a record buffer, AES-256-GCM and CRC32C;
//! with a [`Sink`], the record buffer is the upload's append buffer and
//! the records are written and synced.

use crate::keep::Sink;
use orlop_engine::ChunkParams;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use std::io;
use std::sync::Arc;

/// A kept record's header, as the engine's (magic, kind, lengths, chunk
/// id, nonce, CRC32C).
const HEAD_BYTES: usize = 64;

/// The naming key and the cipher, as the engine derives them from a key.
pub(crate) struct Keys {
    naming: [u8; 32],
    cipher: LessSafeKey,
}

impl Keys {
    pub(crate) fn new() -> io::Result<Self> {
        let master = [7u8; 32];
        let enc = blake3::derive_key("orlop push floor encryption key", &master);
        let unbound =
            UnboundKey::new(&AES_256_GCM, &enc).map_err(|_| io::Error::other("aes key"))?;
        Ok(Keys {
            naming: blake3::derive_key("orlop push floor naming key", &master),
            cipher: LessSafeKey::new(unbound),
        })
    }
}

/// FastCDC over a stream fed in blocks, then per chunk what the engine's
/// cutting and appending stages do to it on the way to a segment.
pub(crate) struct Cutter {
    keys: Arc<Keys>,
    p: ChunkParams,
    mask_s: u64,
    mask_l: u64,
    /// Bytes of the stream not yet cut (less than one largest chunk, plus
    /// the head of the next block while the carry is cut).
    carry: Vec<u8>,
    record: Vec<u8>,
    sealed: u64,
    /// Where the records go, with `--keep`.
    sink: Option<Sink>,
}

impl Cutter {
    pub(crate) fn new(keys: Arc<Keys>, sink: Option<Sink>) -> Self {
        let p = ChunkParams::default();
        let bits = fastcdc::v2020::logarithm2(p.avg_bytes) as usize;
        Cutter {
            keys,
            p,
            mask_s: fastcdc::v2020::MASKS[bits + 1],
            mask_l: fastcdc::v2020::MASKS[bits - 1],
            carry: Vec::with_capacity(2 * p.max_bytes as usize),
            record: Vec::with_capacity(p.max_bytes as usize + 16),
            sealed: 0,
            sink,
        }
    }

    fn max(&self) -> usize {
        self.p.max_bytes as usize
    }

    /// The length of the chunk at the start of `src`.
    fn cut(&self, src: &[u8]) -> usize {
        let (_, len) = fastcdc::v2020::cut(
            src,
            self.p.min_bytes as usize,
            self.p.avg_bytes as usize,
            self.p.max_bytes as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        len.clamp(1, src.len())
    }

    /// Names, copies, seals and checksums one chunk; appends the record to
    /// the sink if there is one, else keeps nothing.
    fn chunk(&mut self, c: &[u8]) -> io::Result<()> {
        let id = blake3::keyed_hash(&self.keys.naming, c);
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&self.sealed.to_le_bytes());
        self.sealed += 1;
        let seal = |body: &mut [u8]| {
            self.keys
                .cipher
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(id.as_bytes()),
                    body,
                )
                .map_err(|_| io::Error::other("seal"))
        };
        let Some(sink) = self.sink.as_mut() else {
            self.record.clear();
            self.record.extend_from_slice(c);
            let tag = seal(&mut self.record)?;
            let crc = crc32c::crc32c_append(crc32c::crc32c(&self.record), tag.as_ref());
            // Kept from the optimiser: the floor must do the work it measures.
            std::hint::black_box((id, crc));
            return Ok(());
        };
        let bytes = HEAD_BYTES + c.len() + 16;
        let rec = sink.room(bytes)?;
        let (head, rest) = rec.split_at_mut(HEAD_BYTES);
        let (body, tag_at) = rest.split_at_mut(c.len());
        body.copy_from_slice(c);
        let tag = seal(body)?;
        tag_at.copy_from_slice(tag.as_ref());
        let crc = crc32c::crc32c(rest);
        head[..4].copy_from_slice(b"CHNK");
        head[4] = 1;
        head[8..12].copy_from_slice(&((c.len() + 16) as u32).to_le_bytes());
        head[12..16].copy_from_slice(&(c.len() as u32).to_le_bytes());
        head[16..48].copy_from_slice(id.as_bytes());
        head[48..60].copy_from_slice(&nonce);
        head[60..64].copy_from_slice(&crc.to_le_bytes());
        sink.appended(bytes)
    }

    /// Cuts, names and seals the chunks of `src` starting at `at`, while
    /// `more(at)`; returns where it stopped.
    fn cut_from(
        &mut self,
        src: &[u8],
        mut at: usize,
        more: impl Fn(usize) -> bool,
    ) -> io::Result<usize> {
        while more(at) {
            let len = self.cut(&src[at..]);
            self.chunk(&src[at..at + len])?;
            at += len;
        }
        Ok(at)
    }

    /// Cuts every chunk of the stream so far that is final (one largest
    /// chunk of bytes follows its start).
    pub(crate) fn feed(&mut self, block: &[u8]) -> io::Result<()> {
        let max = self.max();
        let mut at = 0;
        if !self.carry.is_empty() {
            let old = self.carry.len();
            let take = block.len().min(max);
            let mut carry = std::mem::take(&mut self.carry);
            carry.extend_from_slice(&block[..take]);
            let s = self.cut_from(&carry, 0, |s| s < old && carry.len() - s >= max)?;
            if s < old {
                // The block was short: all of it is in the carry now.
                carry.drain(..s);
                self.carry = carry;
                return Ok(());
            }
            at = s - old;
            carry.clear();
            self.carry = carry;
        }
        let at = self.cut_from(block, at, |a| block.len() - a >= max)?;
        self.carry.extend_from_slice(&block[at..]);
        Ok(())
    }

    /// Cuts what is left at the end of the stream (or of a PATCH); with a
    /// sink, writes and syncs every record so far.
    pub(crate) fn finish(&mut self) -> io::Result<()> {
        let carry = std::mem::take(&mut self.carry);
        self.cut_from(&carry, 0, |s| s < carry.len())?;
        match self.sink.as_mut() {
            Some(sink) => sink.sync(),
            None => Ok(()),
        }
    }
}
