//! Orlop's storage engine: a log-structured, content-addressed, deduplicating,
//! compressed and encrypted blob store over segment files and a RocksDB index.
//!
//! See `docs/ARCHITECTURE.md` for the bird's-eye view and `docs/format.md` for
//! every byte the engine puts on disk.
#![deny(clippy::unwrap_used, clippy::expect_used)]

mod chunker;
mod commit;
mod compact;
mod compress;
mod config;
mod crypto;
mod error;
mod gc;
mod ids;
pub mod index;
pub mod io;
mod journal;
mod keys;
mod pace;
mod read;
mod readpool;
mod rebuild;
mod repair;
mod scrub;
pub mod segment;
mod span;
mod stats;
mod store;
mod txn;
mod verify;
mod write;

pub use compact::{CompactOptions, CompactReport};
pub use config::{ChunkParams, IoBackend, KeySource, Observer, SpanSource, StoreConfig};
pub use error::{Error, Result};
pub use gc::{GcOptions, GcReport};
pub use ids::{ChunkId, Digest, DigestAlgorithm, RecipeId, SegmentId};
pub use keys::{MasterKey, KEY_ENV_VAR};
pub use read::BlobReader;
pub use rebuild::{rebuild_index, RebuildReport};
pub use repair::{BrokenBlob, QuarantinedChunk, RepairReport};
pub use scrub::{ScrubDamage, ScrubOptions, ScrubReport};
pub use segment::AppendMode;
pub use stats::{SegmentStats, StoreStats};
pub use store::{BlobInfo, HeldWrite, Store};
pub use txn::Txn;
pub use verify::{Problem, Progress, VerifyReport};
pub use write::BlobWriter;
