//! The engine's one error type. Variants are structured so that callers (the
//! server's OCI error table, `orlop fsck`) can act on them without parsing text.

use crate::ids::{ChunkId, Digest, SegmentId};
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("index (RocksDB) error: {0}")]
    Index(#[from] rocksdb::Error),
    #[error("checksum mismatch in segment {segment} at offset {offset}")]
    ChecksumMismatch { segment: SegmentId, offset: u64 },
    #[error("corrupt chunk in segment {segment} at offset {offset}: {reason}")]
    CorruptChunk {
        segment: SegmentId,
        offset: u64,
        reason: &'static str,
    },
    #[error("corrupt segment {segment}: {reason}")]
    CorruptSegment { segment: SegmentId, reason: String },
    #[error("corrupt index entry in column family {cf}: {reason}")]
    CorruptIndex { cf: &'static str, reason: String },
    #[error("segment {segment} lost acknowledged data: durable length {durable} but only {found} valid bytes found")]
    DurableDataLost {
        segment: SegmentId,
        durable: u64,
        found: u64,
    },
    #[error("chunk {chunk} is quarantined (found damaged by fsck --repair); push the content again to restore it")]
    ChunkQuarantined { chunk: ChunkId },
    #[error("blob {digest} is damaged: {chunks} of its chunks are quarantined (fsck --repair); push it again to restore it")]
    BlobBroken { digest: Digest, chunks: u64 },
    #[error("segment {0} is referenced by the index but its file is missing")]
    SegmentMissing(SegmentId),
    /// Boxed: two digests inline (65 bytes each) would make every
    /// `Result` of the crate carry 136 bytes of error.
    #[error("digest mismatch: expected {expected}, computed {actual}")]
    DigestMismatch {
        expected: Box<Digest>,
        actual: Box<Digest>,
    },
    #[error("size mismatch: expected {expected} bytes, received {actual}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("invalid digest {input:?}: {reason}")]
    InvalidDigest { input: String, reason: &'static str },
    #[error("blob {0} is not in the store")]
    BlobUnknown(Digest),
    #[error("range {offset}+{len} is outside blob of {size} bytes")]
    RangeInvalid { offset: u64, len: u64, size: u64 },
    #[error("blob {0} has no references to drop")]
    RefUnderflow(Digest),
    #[error("the store key does not match this store (wrong key)")]
    WrongKey,
    #[error("invalid store key: {0}")]
    InvalidKey(String),
    #[error("unsupported on-disk format version {found} (this build reads {supported})")]
    FormatVersion { found: u32, supported: u32 },
    #[error("the store refuses writes after an earlier write or fsync failure; reopen it")]
    Poisoned,
    #[error("the store is open read-only")]
    ReadOnly,
    #[error("the store is shutting down")]
    ShuttingDown,
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("no held write {0}")]
    HeldWriteUnknown(u64),
    #[error("a change of {bytes} bytes to {cf} is larger than a journal record ({max} bytes)")]
    ChangeTooLarge {
        cf: String,
        bytes: usize,
        max: usize,
    },
    #[error("transaction precondition failed on {cf}/{key}")]
    Conflict { cf: String, key: String },
    #[error("unknown column family {0:?}")]
    UnknownColumnFamily(String),
}

// Every `Result` of the crate carries room for an `Error`: keep it small
// (clippy's `result_large_err` draws the line at 128 bytes). The largest
// variant is `BlobBroken` (a digest inline and a count).
const _: () = assert!(std::mem::size_of::<Error>() <= 88);

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// True for errors that mean stored bytes are damaged (as opposed to bad
    /// input or an unavailable resource).
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            Error::ChecksumMismatch { .. }
                | Error::CorruptChunk { .. }
                | Error::CorruptSegment { .. }
                | Error::CorruptIndex { .. }
                | Error::DurableDataLost { .. }
                | Error::SegmentMissing(_)
                | Error::ChunkQuarantined { .. }
                | Error::BlobBroken { .. }
        )
    }
}
