//! Byte layout of segment files (docs/format.md). All integers little-endian.
//!
//! ```text
//! segment  = header(64) record* [zero padding] footer(64, at segment_bytes-64, sealed only)
//! header   = "ORLOPSEG" version:u32 header_len:u32 segment_id:u64 store_id:[16]
//!            segment_bytes:u64 reserved:[8] reserved:[4] crc32c:u32
//! record   = magic:u32 kind:u8 flags:u8 reserved:u16 payload_len:u32 raw_len:u32
//!            chunk_id:[32] nonce:[12] crc32c:u32 payload:[payload_len]
//! footer   = "ORLOPEND" version:u32 reserved:u32 segment_id:u64 data_end:u64
//!            record_count:u64 records_crc32c:u32 reserved:[16] crc32c:u32
//! ```

use crate::crypto::NONCE_BYTES;
use crate::ids::{ChunkId, SegmentId};

pub const SEGMENT_FORMAT_VERSION: u32 = 1;
pub const HEADER_BYTES: u64 = 64;
pub const FOOTER_BYTES: u64 = 64;
pub const RECORD_HEADER_BYTES: usize = 64;
const HEADER_MAGIC: &[u8; 8] = b"ORLOPSEG";
const FOOTER_MAGIC: &[u8; 8] = b"ORLOPEND";
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"CHNK");

/// Record kinds: a data chunk, then the metadata journal (`crate::journal`):
/// a committed blob's recipe part, a committed blob, a layer's transaction.
pub const KIND_CHUNK: u8 = 1;
pub const KIND_RECIPE: u8 = 2;
pub const KIND_BLOB: u8 = 3;
pub const KIND_TXN: u8 = 4;
/// Transaction sequence numbers that were never applied (`crate::journal`).
pub const KIND_VOID: u8 = 5;
/// Flag bit: the payload is zstd-compressed before encryption.
pub const FLAG_ZSTD: u8 = 1;

pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub segment: SegmentId,
    pub store_id: [u8; 16],
    pub segment_bytes: u64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; HEADER_BYTES as usize] {
        let mut b = [0u8; HEADER_BYTES as usize];
        b[..8].copy_from_slice(HEADER_MAGIC);
        b[8..12].copy_from_slice(&SEGMENT_FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_BYTES as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.segment.0.to_le_bytes());
        b[24..40].copy_from_slice(&self.store_id);
        b[40..48].copy_from_slice(&self.segment_bytes.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() < HEADER_BYTES as usize {
            return Err("short header".into());
        }
        if &b[..8] != HEADER_MAGIC {
            return Err("bad header magic".into());
        }
        if crc32c::crc32c(&b[..60]) != le_u32(b, 60) {
            return Err("header checksum mismatch".into());
        }
        let v = le_u32(b, 8);
        if v != SEGMENT_FORMAT_VERSION {
            return Err(format!("unsupported segment format version {v}"));
        }
        let mut store_id = [0u8; 16];
        store_id.copy_from_slice(&b[24..40]);
        Ok(SegmentHeader {
            segment: SegmentId(le_u64(b, 16)),
            store_id,
            segment_bytes: le_u64(b, 40),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: u8,
    pub flags: u8,
    pub payload_len: u32,
    pub raw_len: u32,
    pub chunk: ChunkId,
    pub nonce: [u8; NONCE_BYTES],
}

impl RecordHeader {
    pub fn total_len(&self) -> u64 {
        RECORD_HEADER_BYTES as u64 + self.payload_len as u64
    }

    /// Encodes the header; `crc` covers header bytes 0..60 and then the payload.
    pub fn encode(&self, payload: &[u8]) -> [u8; RECORD_HEADER_BYTES] {
        let mut b = [0u8; RECORD_HEADER_BYTES];
        b[..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        b[4] = self.kind;
        b[5] = self.flags;
        b[8..12].copy_from_slice(&self.payload_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.raw_len.to_le_bytes());
        b[16..48].copy_from_slice(&self.chunk.0);
        b[48..60].copy_from_slice(&self.nonce);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..60]), payload);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a header without checking the payload checksum.
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < RECORD_HEADER_BYTES || le_u32(b, 0) != RECORD_MAGIC {
            return None;
        }
        let mut nonce = [0u8; NONCE_BYTES];
        nonce.copy_from_slice(&b[48..60]);
        Some(RecordHeader {
            kind: b[4],
            flags: b[5],
            payload_len: le_u32(b, 8),
            raw_len: le_u32(b, 12),
            chunk: ChunkId::from_slice(&b[16..48])?,
            nonce,
        })
    }

    /// Checks a whole record (header ‖ payload) against its checksum.
    pub fn checksum_ok(record: &[u8]) -> bool {
        record.len() >= RECORD_HEADER_BYTES
            && crc32c::crc32c_append(
                crc32c::crc32c(&record[..60]),
                &record[RECORD_HEADER_BYTES..],
            ) == le_u32(record, 60)
    }
}

/// Folds one record's CRC (header bytes 60..64) into the footer's running
/// checksum: CRC32C over the sequence of record CRCs, each as u32 LE.
pub fn chain_record_crc(acc: u32, record_header: &[u8]) -> u32 {
    crc32c::crc32c_append(acc, &record_header[60..64])
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentFooter {
    pub segment: SegmentId,
    pub data_end: u64,
    pub record_count: u64,
    pub data_crc: u32,
}

impl SegmentFooter {
    pub fn encode(&self) -> [u8; FOOTER_BYTES as usize] {
        let mut b = [0u8; FOOTER_BYTES as usize];
        b[..8].copy_from_slice(FOOTER_MAGIC);
        b[8..12].copy_from_slice(&SEGMENT_FORMAT_VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.segment.0.to_le_bytes());
        b[24..32].copy_from_slice(&self.data_end.to_le_bytes());
        b[32..40].copy_from_slice(&self.record_count.to_le_bytes());
        b[40..44].copy_from_slice(&self.data_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < FOOTER_BYTES as usize
            || &b[..8] != FOOTER_MAGIC
            || crc32c::crc32c(&b[..60]) != le_u32(b, 60)
            || le_u32(b, 8) != SEGMENT_FORMAT_VERSION
        {
            return None;
        }
        Some(SegmentFooter {
            segment: SegmentId(le_u64(b, 16)),
            data_end: le_u64(b, 24),
            record_count: le_u64(b, 32),
            data_crc: le_u32(b, 40),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrips() {
        let h = SegmentHeader {
            segment: SegmentId(7),
            store_id: [3; 16],
            segment_bytes: 1 << 20,
        };
        assert_eq!(SegmentHeader::decode(&h.encode()), Ok(h));
        let r = RecordHeader {
            kind: KIND_CHUNK,
            flags: FLAG_ZSTD,
            payload_len: 5,
            raw_len: 9,
            chunk: ChunkId([4; 32]),
            nonce: [5; 12],
        };
        let payload = b"abcde";
        let mut rec = r.encode(payload).to_vec();
        rec.extend_from_slice(payload);
        assert!(RecordHeader::checksum_ok(&rec));
        assert_eq!(RecordHeader::decode(&rec), Some(r));
        rec[66] ^= 0x10;
        assert!(!RecordHeader::checksum_ok(&rec));
        let f = SegmentFooter {
            segment: SegmentId(7),
            data_end: 100,
            record_count: 2,
            data_crc: 9,
        };
        assert_eq!(SegmentFooter::decode(&f.encode()), Some(f));
    }
}
