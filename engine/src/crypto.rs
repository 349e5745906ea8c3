//! Chunk encryption: AES-256-GCM (ring) with deterministic, never-repeating nonces.
//!
//! Nonce = segment id (8 bytes LE) ‖ record offset in that segment (4 bytes LE).
//! A (segment, offset) pair is written at most once: segment ids are never
//! reused, a segment is only appended to by the process that created it, and
//! the store refuses writes after any failed write. The nonce is also stored in
//! the record so that compaction can move ciphertext without re-encrypting.
//! The associated data binds the record kind, flags, plaintext length and
//! chunk ID, so a record cannot be passed off as another chunk.

use crate::ids::{ChunkId, SegmentId};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

pub const NONCE_BYTES: usize = 12;
pub const TAG_BYTES: usize = 16;

pub(crate) struct ChunkCipher {
    key: LessSafeKey,
}

pub(crate) fn nonce_for(segment: SegmentId, offset: u32) -> [u8; NONCE_BYTES] {
    let mut n = [0u8; NONCE_BYTES];
    n[..8].copy_from_slice(&segment.0.to_le_bytes());
    n[8..].copy_from_slice(&offset.to_le_bytes());
    n
}

fn aad(kind: u8, flags: u8, raw_len: u32, id: &ChunkId) -> [u8; 38] {
    let mut a = [0u8; 38];
    a[0] = kind;
    a[1] = flags;
    a[2..6].copy_from_slice(&raw_len.to_le_bytes());
    a[6..].copy_from_slice(&id.0);
    a
}

impl ChunkCipher {
    pub fn new(key: &[u8; 32]) -> Self {
        // AES_256_GCM accepts exactly 32 bytes, so this cannot fail.
        #[allow(clippy::expect_used)]
        let unbound = UnboundKey::new(&AES_256_GCM, key).expect("32-byte AES-256 key");
        ChunkCipher {
            key: LessSafeKey::new(unbound),
        }
    }

    /// Encrypts `buf` in place and returns the 16-byte tag.
    pub fn seal_detached(
        &self,
        nonce: [u8; NONCE_BYTES],
        kind: u8,
        flags: u8,
        raw_len: u32,
        id: &ChunkId,
        buf: &mut [u8],
    ) -> Result<[u8; TAG_BYTES], ()> {
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(kind, flags, raw_len, id)),
                buf,
            )
            .map_err(|_| ())?;
        let mut t = [0u8; TAG_BYTES];
        t.copy_from_slice(tag.as_ref());
        Ok(t)
    }

    /// Authenticates and decrypts `buf` (ciphertext ‖ tag) in place; returns the plaintext length.
    pub fn open(
        &self,
        nonce: [u8; NONCE_BYTES],
        kind: u8,
        flags: u8,
        raw_len: u32,
        id: &ChunkId,
        buf: &mut [u8],
    ) -> Result<usize, ()> {
        self.key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(kind, flags, raw_len, id)),
                buf,
            )
            .map(|p| p.len())
            .map_err(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_tamper() {
        let c = ChunkCipher::new(&[1; 32]);
        let id = ChunkId([9; 32]);
        let n = nonce_for(SegmentId(3), 64);
        let mut buf = b"hello chunk".to_vec();
        let tag = c
            .seal_detached(n, 1, 0, 11, &id, &mut buf)
            .unwrap_or_else(|_| panic!("seal"));
        buf.extend_from_slice(&tag);
        assert_eq!(buf.len(), 11 + TAG_BYTES);
        let mut copy = buf.clone();
        let len = c
            .open(n, 1, 0, 11, &id, &mut copy)
            .unwrap_or_else(|_| panic!("open"));
        assert_eq!(&copy[..len], b"hello chunk");
        // Wrong chunk id in the associated data fails.
        let mut copy = buf.clone();
        assert!(c.open(n, 1, 0, 11, &ChunkId([8; 32]), &mut copy).is_err());
        // A flipped bit fails.
        let mut copy = buf.clone();
        copy[3] ^= 1;
        assert!(c.open(n, 1, 0, 11, &id, &mut copy).is_err());
    }
}
