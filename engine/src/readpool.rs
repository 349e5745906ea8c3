//! A few threads that read spans ahead of the blob readers, so that the
//! disk works on a reader's next batch while the reader opens (checks and
//! decrypts) the current one. Reads bypass the page cache (O_DIRECT) when
//! the store's appends do: a span written by a direct append is not in the
//! cache, and copying it through the cache costs this kind of machine more
//! CPU than the read itself.
//!
//! Bounded: at most `READ_QUEUE_JOBS` reads wait for a thread; a reader
//! that finds the queue full reads its span itself, when it needs it.
//!
//! Span buffers of common sizes are reused (at most `CACHED_BYTES_MAX` kept
//! idle): a fresh one is zeroed, which took about 7% of a pull's CPU.
//!
//! A hot blob (a base layer a fleet pulls) should come from memory, not
//! from disk each time: a span the page cache holds entirely (cachestat(2))
//! is read through it, and a span read a third time while remembered
//! (`Seen`: admitted after `ADMIT_AFTER_READS` reads) is read through it
//! too, which leaves it there. A span read once or twice (a pull, a
//! rebuild, a replication) stays out of the cache, as appends do: filling
//! the cache costs more than a direct read (1 GiB here: 2.7 s through new
//! page-cache pages against 1.25 s direct), and pays only when the span is
//! read again from memory (0.62 s).

use crate::config::{Observer, SpanSource};
use crate::io::{AlignedBuf, SegmentFile};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Reads waiting for a pool thread, at most.
const READ_QUEUE_JOBS: usize = 64;
/// Buffers from this size up to `CACHED_LEN_MAX` are rounded up to whole
/// `CACHED_CLASS_BYTES` and reused; others are allocated each time.
const CACHED_LEN_MIN: usize = 256 << 10;
const CACHED_LEN_MAX: usize = 4 << 20;
const CACHED_CLASS_BYTES: usize = 1 << 20;
/// Idle buffers kept for reuse, in bytes, at most.
const CACHED_BYTES_MAX: usize = 16 << 20;

/// Idle span buffers.
#[derive(Default)]
pub(crate) struct BufCache {
    free: Mutex<(Vec<AlignedBuf>, usize)>,
}

impl BufCache {
    /// A buffer of at least `len` bytes (its unread bytes are stale or zero).
    fn take(self: &Arc<Self>, len: usize) -> SpanBuf {
        if !(CACHED_LEN_MIN..=CACHED_LEN_MAX).contains(&len) {
            return SpanBuf {
                buf: Some(AlignedBuf::new(len)),
                home: None,
            };
        }
        let class = len.div_ceil(CACHED_CLASS_BYTES) * CACHED_CLASS_BYTES;
        let reused = {
            let mut g = self.free.lock().unwrap_or_else(|p| p.into_inner());
            let found = g.0.iter().position(|b| b.len() == class);
            found.map(|i| {
                let b = g.0.swap_remove(i);
                g.1 -= b.len();
                b
            })
        };
        SpanBuf {
            buf: Some(reused.unwrap_or_else(|| AlignedBuf::new(class))),
            home: Some(self.clone()),
        }
    }

    fn put(&self, b: AlignedBuf) {
        let mut g = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if g.1 + b.len() <= CACHED_BYTES_MAX {
            g.1 += b.len();
            g.0.push(b);
        }
    }
}

/// A span's buffer; returns to its cache when the last slice of it is
/// dropped.
pub(crate) struct SpanBuf {
    buf: Option<AlignedBuf>,
    home: Option<Arc<BufCache>>,
}

impl SpanBuf {
    pub fn as_slice(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], |b| b.as_slice())
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.buf.as_mut().map_or(&mut [], |b| b.as_mut_slice())
    }
}

impl AsRef<[u8]> for SpanBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for SpanBuf {
    fn drop(&mut self) {
        if let (Some(b), Some(home)) = (self.buf.take(), self.home.as_ref()) {
            home.put(b);
        }
    }
}

/// Spans read recently, by segment and first byte, at most this many
/// (then all are forgotten at once).
const SEEN_SPANS_MAX: usize = 1 << 16;

/// Reads of a span remembered before it is admitted to the page cache.
const ADMIT_AFTER_READS: u8 = 2;

/// Spans read recently and how often, for admission to the page cache.
#[derive(Default)]
struct Seen(Mutex<HashMap<(u64, u64), u8>>);

impl Seen {
    /// Counts a read of the span; true when it was read at least
    /// `ADMIT_AFTER_READS` times before (since the set was last cleared).
    fn admit(&self, key: (u64, u64)) -> bool {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if g.len() >= SEEN_SPANS_MAX && !g.contains_key(&key) {
            g.clear();
        }
        let n = g.entry(key).or_insert(0);
        let before = *n;
        *n = n.saturating_add(1);
        before >= ADMIT_AFTER_READS
    }
}

/// What the pool's threads and the readers running their own reads share.
pub(crate) struct Shared {
    bufs: Arc<BufCache>,
    seen: Seen,
    observer: Option<Arc<dyn Observer>>,
}

/// One span to read: `[start, start + len)` of `file`, block-aligned.
pub(crate) struct ReadJob {
    pub file: Arc<dyn SegmentFile>,
    /// The file's segment (with `start`, the span's key for admission).
    pub segment: u64,
    pub start: u64,
    pub len: usize,
    /// The span's exact bytes, for a file that ends inside the last block.
    pub exact: (u64, u64),
    pub direct: bool,
}

pub(crate) type ReadResult = std::io::Result<SpanBuf>;

impl ReadJob {
    /// Where to read the span from (see the module's comment).
    fn source(&self, shared: &Shared) -> SpanSource {
        if !self.direct {
            SpanSource::Buffered
        } else if self.file.cached(self.start, self.len as u64) {
            SpanSource::PageCache
        } else if shared.seen.admit((self.segment, self.start)) {
            SpanSource::Admitted
        } else {
            SpanSource::Direct
        }
    }

    /// Reads the span into a fresh block-aligned buffer.
    pub fn run(&self, shared: &Shared) -> ReadResult {
        let mut buf = shared.bufs.take(self.len);
        let source = self.source(shared);
        if let Some(o) = &shared.observer {
            o.span_read(source, self.len);
        }
        let whole = &mut buf.as_mut_slice()[..self.len];
        let r = if source == SpanSource::Direct {
            self.file.read_direct(whole, self.start)
        } else {
            self.file.read_at(whole, self.start)
        };
        match r {
            Ok(()) => Ok(buf),
            // The file ends inside the last block (a segment sealed or
            // truncated at its data end): read exactly the span instead.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                let (from, to) = self.exact;
                let a = (from - self.start) as usize;
                let b = (to - self.start) as usize;
                self.file.read_at(&mut buf.as_mut_slice()[a..b], from)?;
                Ok(buf)
            }
            Err(e) => Err(e),
        }
    }
}

/// A read in flight, or one left to do when it is needed.
pub(crate) enum Ahead {
    Queued(Receiver<ReadResult>),
    Later(ReadJob, Arc<Shared>),
}

impl Ahead {
    /// The span's bytes (waits for a queued read).
    pub fn wait(self) -> ReadResult {
        match self {
            Ahead::Queued(rx) => rx
                .recv()
                .unwrap_or_else(|_| Err(std::io::Error::other("read pool stopped"))),
            Ahead::Later(job, shared) => job.run(&shared),
        }
    }
}

pub(crate) struct ReadPool {
    tx: Sender<(ReadJob, Sender<ReadResult>)>,
    shared: Arc<Shared>,
}

impl ReadPool {
    /// Starts `threads` readers; they end when the pool is dropped.
    /// `observer` hears where each span was read from.
    pub fn new(threads: usize, observer: Option<Arc<dyn Observer>>) -> std::io::Result<ReadPool> {
        let (tx, rx) = crossbeam_channel::bounded::<(ReadJob, Sender<ReadResult>)>(READ_QUEUE_JOBS);
        let shared = Arc::new(Shared {
            bufs: Arc::new(BufCache::default()),
            seen: Seen::default(),
            observer,
        });
        for n in 0..threads.max(1) {
            let rx = rx.clone();
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("orlop-read-{n}"))
                .spawn(move || {
                    for (job, reply) in rx.iter() {
                        // The reader may have gone (an aborted request).
                        let _ = reply.send(job.run(&shared));
                    }
                })?;
        }
        Ok(ReadPool { tx, shared })
    }

    /// A read to run when it is needed, on the caller's thread.
    pub fn later(&self, job: ReadJob) -> Ahead {
        Ahead::Later(job, self.shared.clone())
    }

    /// Queues `job`, or hands it back to be run when needed if the queue
    /// is full.
    pub fn submit(&self, job: ReadJob) -> Ahead {
        let (reply, rx) = crossbeam_channel::bounded(1);
        match self.tx.try_send((job, reply)) {
            Ok(()) => Ahead::Queued(rx),
            Err(TrySendError::Full((job, _)) | TrySendError::Disconnected((job, _))) => {
                self.later(job)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{OpenMode, PreadIo, SegmentIo, BLOCK_BYTES};

    #[test]
    fn reads_queued_and_later_alike_and_short_files_exactly() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("f");
        // Two whole blocks and a partial third.
        let data: Vec<u8> = (0..(2 * BLOCK_BYTES + 100))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap_or_else(|e| panic!("{e}"));
        let file = PreadIo
            .open(&path, OpenMode::ReadOnly)
            .unwrap_or_else(|e| panic!("{e}"));
        let pool = ReadPool::new(2, None).unwrap_or_else(|e| panic!("{e}"));
        for direct in [true, false] {
            let job = |start: u64, exact: (u64, u64)| ReadJob {
                file: file.clone(),
                segment: 1,
                start,
                len: 3 * BLOCK_BYTES - start as usize,
                exact,
                direct,
            };
            // The last block is short: the exact bytes come back.
            let exact = (BLOCK_BYTES as u64 + 10, data.len() as u64);
            for ahead in [
                pool.submit(job(BLOCK_BYTES as u64, exact)),
                pool.later(job(BLOCK_BYTES as u64, exact)),
            ] {
                let buf = ahead.wait().unwrap_or_else(|e| panic!("{e}"));
                let got = &buf.as_slice()[10..data.len() - BLOCK_BYTES];
                assert_eq!(got, &data[BLOCK_BYTES + 10..]);
            }
            // Whole blocks come back whole.
            let whole = ReadJob {
                file: file.clone(),
                segment: 1,
                start: 0,
                len: 2 * BLOCK_BYTES,
                exact: (0, 2 * BLOCK_BYTES as u64),
                direct,
            };
            let buf = pool.submit(whole).wait().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(&buf.as_slice()[..2 * BLOCK_BYTES], &data[..2 * BLOCK_BYTES]);
        }
    }

    #[test]
    fn buffers_are_reused_within_the_bound() {
        let cache = Arc::new(BufCache::default());
        let a = cache.take(CACHED_LEN_MIN + 1);
        assert_eq!(a.as_slice().len(), CACHED_CLASS_BYTES);
        let ptr = a.as_slice().as_ptr();
        drop(a);
        let b = cache.take(CACHED_CLASS_BYTES);
        assert_eq!(b.as_slice().as_ptr(), ptr, "the idle buffer is reused");
        // Small and large buffers are not kept.
        drop(cache.take(4096));
        drop(cache.take(CACHED_LEN_MAX + 1));
        assert_eq!(cache.free.lock().map(|g| g.0.len()).unwrap_or(9), 0);
        // Idle bytes stay within the bound.
        let many: Vec<SpanBuf> = (0..40).map(|_| cache.take(CACHED_LEN_MAX)).collect();
        drop(many);
        let idle = cache.free.lock().map(|g| g.1).unwrap_or(usize::MAX);
        assert!(idle <= CACHED_BYTES_MAX && idle > 0, "{idle}");
        drop(b);
    }

    #[derive(Debug, Default)]
    struct Sources(Mutex<Vec<SpanSource>>);

    impl Observer for Sources {
        fn span_read(&self, source: SpanSource, _bytes: usize) {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(source);
        }
    }

    /// A span read once or twice goes past the page cache; read a third
    /// time, through it (admitted); then it is served from the cache.
    #[test]
    fn a_span_read_often_is_admitted_to_the_page_cache() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..(64 * BLOCK_BYTES)).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap_or_else(|e| panic!("{e}"));
        let file = PreadIo
            .open(&path, OpenMode::ReadOnly)
            .unwrap_or_else(|e| panic!("{e}"));
        let len = data.len() as u64;
        if !file.cached(0, len) {
            eprintln!("no cachestat(2) here (or the file is not cached): nothing to check");
            return;
        }
        // Drop the file's pages (written back first).
        let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{e}"));
        f.sync_all().unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: a plain advice call on an open descriptor.
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(r, 0);
        if file.cached(0, len) {
            eprintln!("the page cache kept the file (tmpfs?): nothing to check");
            return;
        }
        let sources = Arc::new(Sources::default());
        let pool = ReadPool::new(1, Some(sources.clone())).unwrap_or_else(|e| panic!("{e}"));
        for _ in 0..4 {
            let job = ReadJob {
                file: file.clone(),
                segment: 7,
                start: 0,
                len: data.len(),
                exact: (0, len),
                direct: true,
            };
            let buf = pool.submit(job).wait().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(&buf.as_slice()[..data.len()], &data[..]);
        }
        let got = sources.0.lock().map(|g| g.clone()).unwrap_or_default();
        if file.cached(0, len) && got.get(1) == Some(&SpanSource::PageCache) {
            eprintln!("no O_DIRECT here: the first read filled the cache; nothing to check");
            return;
        }
        assert_eq!(
            got,
            [
                SpanSource::Direct,
                SpanSource::Direct,
                SpanSource::Admitted,
                SpanSource::PageCache
            ]
        );
    }

    #[test]
    fn seen_spans_are_bounded() {
        let seen = Seen::default();
        assert!(!seen.admit((1, 0)));
        assert!(!seen.admit((1, 0)));
        assert!(!seen.admit((2, 0)));
        assert!(seen.admit((1, 0)));
        assert!(seen.admit((1, 0)));
        for i in 0..SEEN_SPANS_MAX as u64 {
            seen.admit((3, i));
        }
        let n = seen.0.lock().map(|g| g.len()).unwrap_or(usize::MAX);
        assert!(n <= SEEN_SPANS_MAX, "{n}");
    }
}
