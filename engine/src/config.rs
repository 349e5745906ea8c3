//! Store configuration. Every bound carries its unit last in its name.

use crate::error::{Error, Result};
use crate::io::SegmentIo;
use std::path::PathBuf;
use std::sync::Arc;

/// FastCDC parameters. The average is chosen by measurement (docs/benchmarks.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkParams {
    pub min_bytes: u32,
    pub avg_bytes: u32,
    pub max_bytes: u32,
}

impl Default for ChunkParams {
    fn default() -> Self {
        ChunkParams {
            min_bytes: 16 * 1024,
            avg_bytes: 64 * 1024,
            max_bytes: 256 * 1024,
        }
    }
}

impl ChunkParams {
    pub fn validate(&self) -> Result<()> {
        let ok = self.min_bytes >= fastcdc::v2020::MINIMUM_MIN
            && self.min_bytes <= fastcdc::v2020::MINIMUM_MAX
            && self.avg_bytes >= fastcdc::v2020::AVERAGE_MIN
            && self.avg_bytes <= fastcdc::v2020::AVERAGE_MAX
            && self.max_bytes >= fastcdc::v2020::MAXIMUM_MIN
            && self.max_bytes <= 4 * 1024 * 1024
            && self.min_bytes <= self.avg_bytes
            && self.avg_bytes <= self.max_bytes
            && self.avg_bytes.is_power_of_two();
        if ok {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "chunk sizes must satisfy 64 <= min <= avg <= max <= 4 MiB, avg a power of two >= 256: {self:?}"
            )))
        }
    }
}

/// Where the store's master key comes from.
#[derive(Clone, Debug)]
pub enum KeySource {
    /// `<data>/store.key`, created with mode 0600 on first open.
    Default,
    /// A key file the operator names (created on first open if absent).
    File(PathBuf),
    /// A hex key in the named environment variable.
    Env(String),
    /// A key held by the caller (tests, embedding).
    Bytes([u8; 32]),
}

/// Which segment I/O implementation to use.
#[derive(Clone)]
pub enum IoBackend {
    /// io_uring when the kernel allows it, else pread/pwrite (with a log line).
    Auto,
    Pread,
    Uring,
    /// A caller-supplied implementation (the fault injector in tests).
    Custom(Arc<dyn SegmentIo>),
}

impl std::fmt::Debug for IoBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IoBackend::Auto => f.write_str("Auto"),
            IoBackend::Pread => f.write_str("Pread"),
            IoBackend::Uring => f.write_str("Uring"),
            IoBackend::Custom(io) => write!(f, "Custom({})", io.name()),
        }
    }
}

/// Where a bulk read of a span (`crate::span`) found its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanSource {
    /// Read from disk with O_DIRECT, past the page cache (a first read).
    Direct,
    /// Read through the page cache, which held all of it.
    PageCache,
    /// Read through the page cache, which keeps it: the span was read
    /// twice recently before (admission on the third read).
    Admitted,
    /// Read through the page cache because the store does not read direct.
    Buffered,
}

impl SpanSource {
    pub fn as_str(self) -> &'static str {
        match self {
            SpanSource::Direct => "direct",
            SpanSource::PageCache => "page_cache",
            SpanSource::Admitted => "admitted",
            SpanSource::Buffered => "buffered",
        }
    }
}

/// Receives timings from the engine's commit path and counts from its read
/// path (for metrics). Calls are made on the committer's and the readers'
/// threads and must return quickly.
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// The active segment was fsynced before an index commit.
    fn segment_synced(&self, _elapsed: std::time::Duration) {}
    /// One synced RocksDB write batch of a group commit was written.
    fn index_written(&self, _elapsed: std::time::Duration) {}
    /// A group commit gathered this many requests.
    fn group_committed(&self, _requests: usize) {}
    /// A span of `bytes` was read for a blob reader, from `source`.
    fn span_read(&self, _source: SpanSource, _bytes: usize) {}
}

#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    pub key: KeySource,
    pub chunk: ChunkParams,
    /// Size at which a segment is sealed; sealed segment files are exactly this long.
    pub segment_bytes: u64,
    /// zstd level for compressible chunks.
    pub zstd_level: i32,
    pub io: IoBackend,
    /// How appends reach segment files: whole blocks with O_DIRECT (the
    /// default) or through the page cache.
    pub append_mode: crate::segment::AppendMode,
    /// Open without modifying anything (fsck, stats on a store in use elsewhere).
    pub read_only: bool,
    /// Pieces buffered between a writer and its chunking thread.
    pub write_pipeline_pieces_max: usize,
    /// A writer that starts while this many writers are busy (itself
    /// included; live and not parked at a checkpoint) cuts and appends on
    /// its caller's thread rather than on two threads of its own:
    /// concurrent writers keep the cores busy between them, and hand-offs
    /// between threads are dear. Defaults to the number of cores;
    /// `usize::MAX` always starts the threads, 1 never does.
    pub write_inline_from_writers: usize,
    /// Commit requests gathered into one group commit.
    pub group_commit_requests_max: usize,
    /// Chunks read and decoded at once ahead of a reader, at most...
    pub read_ahead_chunks: usize,
    /// ...and bytes (of plaintext): one batch is read with one read per
    /// run of records that are back to back in a segment.
    pub read_ahead_bytes: usize,
    /// Bulk reads (a blob's spans) bypass the page cache (O_DIRECT), as
    /// direct appends do; false reads through it.
    pub read_direct: bool,
    /// Threads that read a blob reader's next batch while it opens the
    /// current one.
    pub read_threads: usize,
    /// Extra RocksDB column families owned by layers above the engine.
    pub extra_column_families: Vec<String>,
    /// Commit-path timings, for the server's metrics.
    pub observer: Option<Arc<dyn Observer>>,
}

impl StoreConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        StoreConfig {
            data_dir: data_dir.into(),
            key: KeySource::Default,
            chunk: ChunkParams::default(),
            segment_bytes: 256 * 1024 * 1024,
            zstd_level: 1,
            io: IoBackend::Auto,
            append_mode: crate::segment::AppendMode::Direct,
            read_only: false,
            write_pipeline_pieces_max: 8,
            write_inline_from_writers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            group_commit_requests_max: 256,
            read_ahead_chunks: 256,
            read_ahead_bytes: 2 << 20,
            read_direct: true,
            read_threads: 4,
            extra_column_families: Vec::new(),
            observer: None,
        }
    }

    /// The largest metadata journal record (`crate::journal`).
    pub fn journal_record_bytes_max(&self) -> usize {
        (self.chunk.max_bytes as usize).max(crate::journal::JOURNAL_RECORD_BYTES_MIN)
    }

    pub fn validate(&self) -> Result<()> {
        self.chunk.validate()?;
        // Room for four of the largest chunks, and for the largest journal
        // record in an empty segment.
        let min_seg = (4 * (self.chunk.max_bytes as u64 + 1024))
            .max(self.journal_record_bytes_max() as u64 + 1024);
        if self.segment_bytes < min_seg || self.segment_bytes > u32::MAX as u64 {
            return Err(Error::Config(format!(
                "segment_bytes must be between {min_seg} and {} (4 GiB)",
                u32::MAX
            )));
        }
        if !(1..=19).contains(&self.zstd_level) {
            return Err(Error::Config("zstd_level must be 1..=19".into()));
        }
        if self.write_pipeline_pieces_max == 0
            || self.write_inline_from_writers == 0
            || self.group_commit_requests_max == 0
            || self.read_ahead_chunks == 0
            || self.read_ahead_bytes == 0
            || self.read_threads == 0
        {
            return Err(Error::Config("queue bounds must be at least 1".into()));
        }
        Ok(())
    }
}
