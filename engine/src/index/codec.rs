//! Fixed-width little-endian encodings of index values (docs/format.md).

use crate::error::{Error, Result};
use crate::ids::{ChunkId, DigestAlgorithm, RecipeId, SegmentId};

use crate::segment::format::{le_u32 as u32_at, le_u64 as u64_at};

fn bad(cf: &'static str, what: &str, len: usize) -> Error {
    Error::CorruptIndex {
        cf,
        reason: format!("{what} value has {len} bytes"),
    }
}

/// Where a chunk's record lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub segment: SegmentId,
    /// Offset of the record header within the segment.
    pub offset: u32,
    /// Ciphertext length including the AEAD tag.
    pub payload_len: u32,
    pub raw_len: u32,
    pub flags: u8,
}

impl Location {
    pub const BYTES: usize = 24;
    pub fn record_len(&self) -> u64 {
        crate::segment::format::RECORD_HEADER_BYTES as u64 + self.payload_len as u64
    }
    pub fn encode(&self) -> [u8; Self::BYTES] {
        let mut b = [0u8; Self::BYTES];
        b[..8].copy_from_slice(&self.segment.0.to_le_bytes());
        b[8..12].copy_from_slice(&self.offset.to_le_bytes());
        b[12..16].copy_from_slice(&self.payload_len.to_le_bytes());
        b[16..20].copy_from_slice(&self.raw_len.to_le_bytes());
        b[20] = self.flags;
        b
    }
    pub fn decode(b: &[u8], cf: &'static str) -> Result<Self> {
        if b.len() < Self::BYTES {
            return Err(bad(cf, "location", b.len()));
        }
        Ok(Location {
            segment: SegmentId(u64_at(b, 0)),
            offset: u32_at(b, 8),
            payload_len: u32_at(b, 12),
            raw_len: u32_at(b, 16),
            flags: b[20],
        })
    }
}

/// `chunks` CF value: location, then the reference count (recipe entries naming it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkEntry {
    pub loc: Location,
    pub refs: u64,
}

impl ChunkEntry {
    /// The entry of a chunk that `Store::repair` found damaged (or missing)
    /// while recipes still name it: no location (segment 0, which is never
    /// allocated), its length and count kept. Readers refuse it; the next
    /// writer that stores the same content gives it a home again.
    pub fn quarantined(raw_len: u32, refs: u64) -> Self {
        ChunkEntry {
            loc: Location {
                segment: SegmentId(0),
                offset: 0,
                payload_len: 0,
                raw_len,
                flags: 0,
            },
            refs,
        }
    }

    pub fn is_quarantined(&self) -> bool {
        self.loc.segment.0 == 0
    }

    pub fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[..24].copy_from_slice(&self.loc.encode());
        b[24..].copy_from_slice(&self.refs.to_le_bytes());
        b
    }
    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != 32 {
            return Err(bad("chunks", "chunk", b.len()));
        }
        Ok(ChunkEntry {
            loc: Location::decode(&b[..24], "chunks")?,
            refs: u64_at(b, 24),
        })
    }
}

/// `blobs` CF value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobEntry {
    pub size: u64,
    pub recipe: RecipeId,
    pub chunk_count: u64,
    /// References held by layers above (repositories, manifests).
    pub refs: u64,
    pub created_unix_ms: u64,
}

impl BlobEntry {
    pub fn encode(&self) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..16].copy_from_slice(&self.recipe.0.to_le_bytes());
        b[16..24].copy_from_slice(&self.chunk_count.to_le_bytes());
        b[24..32].copy_from_slice(&self.refs.to_le_bytes());
        b[32..40].copy_from_slice(&self.created_unix_ms.to_le_bytes());
        b
    }
    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != 48 {
            return Err(bad("blobs", "blob", b.len()));
        }
        Ok(BlobEntry {
            size: u64_at(b, 0),
            recipe: RecipeId(u64_at(b, 8)),
            chunk_count: u64_at(b, 16),
            refs: u64_at(b, 24),
            created_unix_ms: u64_at(b, 32),
        })
    }
}

/// One entry of a recipe: a chunk and its plaintext length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecipeEntry {
    pub chunk: ChunkId,
    pub raw_len: u32,
}

/// A recipe part: up to `RECIPE_PART_ENTRIES` consecutive chunks of a blob.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecipePart {
    /// Blob offset of the first byte of the first entry.
    pub start: u64,
    pub entries: Vec<RecipeEntry>,
}

pub const RECIPE_PART_ENTRIES: usize = 1024;
const RECIPE_ENTRY_BYTES: usize = 36;

impl RecipePart {
    /// Blob offset just past the part (saturating: corrupt values must not panic).
    pub fn end(&self) -> u64 {
        self.entries
            .iter()
            .fold(self.start, |a, e| a.saturating_add(e.raw_len as u64))
    }
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(12 + self.entries.len() * RECIPE_ENTRY_BYTES);
        b.extend_from_slice(&self.start.to_le_bytes());
        b.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            b.extend_from_slice(&e.chunk.0);
            b.extend_from_slice(&e.raw_len.to_le_bytes());
        }
        b
    }
    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() < 12 {
            return Err(bad("recipes", "recipe part", b.len()));
        }
        let n = u32_at(b, 8) as usize;
        if b.len() != 12 + n * RECIPE_ENTRY_BYTES {
            return Err(bad("recipes", "recipe part", b.len()));
        }
        let entries = b[12..]
            .chunks_exact(RECIPE_ENTRY_BYTES)
            .map(|e| {
                let mut id = [0u8; 32];
                id.copy_from_slice(&e[..32]);
                RecipeEntry {
                    chunk: ChunkId(id),
                    raw_len: u32_at(e, 32),
                }
            })
            .collect();
        Ok(RecipePart {
            start: u64_at(b, 0),
            entries,
        })
    }
}

pub fn recipe_key(recipe: RecipeId, part: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&recipe.0.to_be_bytes());
    k[8..].copy_from_slice(&part.to_be_bytes());
    k
}

pub fn staged_key(recipe: RecipeId, chunk: &ChunkId) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..8].copy_from_slice(&recipe.0.to_be_bytes());
    k[8..].copy_from_slice(&chunk.0);
    k
}

pub fn recipe_prefix(recipe: RecipeId) -> [u8; 8] {
    recipe.0.to_be_bytes()
}

/// The key range `[from, to)` holding every row of one recipe (its parts,
/// staged placements, pending and held markers) in the column families
/// keyed by recipe id first.
pub fn recipe_range(recipe: RecipeId) -> ([u8; 8], [u8; 8]) {
    let to = recipe
        .0
        .checked_add(1)
        .map(|n| n.to_be_bytes())
        .unwrap_or([0xff; 8]);
    (recipe_prefix(recipe), to)
}

/// A write held across restarts: the state of its last checkpoint (a
/// resumable upload). Its recipe parts `0..parts` and the staged placements
/// they need were made durable together with this entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldEntry {
    pub size: u64,
    pub chunk_count: u64,
    pub parts: u32,
    pub algorithm: DigestAlgorithm,
    pub updated_unix_ms: u64,
    /// The caller's name for the write (the server's upload session).
    pub tag: Vec<u8>,
}

const HELD_V1: u8 = 1;
/// Longest caller tag kept with a held write.
pub const HELD_TAG_BYTES_MAX: usize = 1024;

impl HeldEntry {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(34 + self.tag.len());
        b.push(HELD_V1);
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&self.chunk_count.to_le_bytes());
        b.extend_from_slice(&self.parts.to_le_bytes());
        b.push(self.algorithm.tag());
        b.extend_from_slice(&self.updated_unix_ms.to_le_bytes());
        b.extend_from_slice(&(self.tag.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.tag);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let bad = |reason: &str| Error::CorruptIndex {
            cf: "held",
            reason: reason.to_string(),
        };
        if b.len() < 34 || b[0] != HELD_V1 {
            return Err(bad("bad held entry header"));
        }
        let tag_len = u32_at(b, 30) as usize;
        if b.len() != 34 + tag_len {
            return Err(bad("held entry length does not match its tag"));
        }
        Ok(HeldEntry {
            size: u64_at(b, 1),
            chunk_count: u64_at(b, 9),
            parts: u32_at(b, 17),
            algorithm: DigestAlgorithm::from_tag(b[21]).ok_or_else(|| bad("bad algorithm"))?,
            updated_unix_ms: u64_at(b, 22),
            tag: b[34..].to_vec(),
        })
    }
}

pub fn u64_be(b: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(b.get(..8)?)
        .ok()
        .map(u64::from_be_bytes)
}

/// `segments` CF value: what the index knows about a segment file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentEntry {
    pub sealed: bool,
    /// Bytes known durable (fsynced) from the start of the file; for a sealed
    /// segment, the end of its record data.
    pub durable_len: u64,
}

impl SegmentEntry {
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0] = self.sealed as u8;
        b[8..].copy_from_slice(&self.durable_len.to_le_bytes());
        b
    }
    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != 16 || b[0] > 1 {
            return Err(bad("segments", "segment", b.len()));
        }
        Ok(SegmentEntry {
            sealed: b[0] == 1,
            durable_len: u64_at(b, 8),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_entry_roundtrips_and_rejects_damage() {
        let h = HeldEntry {
            size: 1 << 40,
            chunk_count: 77,
            parts: 3,
            algorithm: DigestAlgorithm::Sha512,
            updated_unix_ms: 12345,
            tag: b"repo\0session".to_vec(),
        };
        let e = h.encode();
        assert_eq!(HeldEntry::decode(&e).ok(), Some(h));
        for n in 0..e.len() {
            assert!(HeldEntry::decode(&e[..n]).is_err());
        }
        let mut bad = e.clone();
        bad[21] = 9;
        assert!(HeldEntry::decode(&bad).is_err());
    }

    #[test]
    fn roundtrips() {
        let loc = Location {
            segment: SegmentId(5),
            offset: 64,
            payload_len: 100,
            raw_len: 90,
            flags: 1,
        };
        let c = ChunkEntry { loc, refs: 3 };
        assert_eq!(ChunkEntry::decode(&c.encode()).ok(), Some(c));
        let b = BlobEntry {
            size: 9,
            recipe: RecipeId(2),
            chunk_count: 1,
            refs: 0,
            created_unix_ms: 5,
        };
        assert_eq!(BlobEntry::decode(&b.encode()).ok(), Some(b));
        let p = RecipePart {
            start: 7,
            entries: vec![RecipeEntry {
                chunk: ChunkId([1; 32]),
                raw_len: 5,
            }],
        };
        assert_eq!(RecipePart::decode(&p.encode()).ok(), Some(p.clone()));
        assert_eq!(p.end(), 12);
        assert!(RecipePart::decode(&p.encode()[..20]).is_err());
        let s = SegmentEntry {
            sealed: true,
            durable_len: 77,
        };
        assert_eq!(SegmentEntry::decode(&s.encode()).ok(), Some(s));
    }
}
