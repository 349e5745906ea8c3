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

use crate::io::{AlignedBuf, SegmentFile};
use crossbeam_channel::{Receiver, Sender, TrySendError};
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

/// One span to read: `[start, start + len)` of `file`, block-aligned.
pub(crate) struct ReadJob {
    pub file: Arc<dyn SegmentFile>,
    pub start: u64,
    pub len: usize,
    /// The span's exact bytes, for a file that ends inside the last block.
    pub exact: (u64, u64),
    pub direct: bool,
}

pub(crate) type ReadResult = std::io::Result<SpanBuf>;

impl ReadJob {
    /// Reads the span into a fresh block-aligned buffer.
    pub fn run(&self, cache: &Arc<BufCache>) -> ReadResult {
        let mut buf = cache.take(self.len);
        let whole = &mut buf.as_mut_slice()[..self.len];
        let r = if self.direct {
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
    Later(ReadJob, Arc<BufCache>),
}

impl Ahead {
    /// The span's bytes (waits for a queued read).
    pub fn wait(self) -> ReadResult {
        match self {
            Ahead::Queued(rx) => rx
                .recv()
                .unwrap_or_else(|_| Err(std::io::Error::other("read pool stopped"))),
            Ahead::Later(job, cache) => job.run(&cache),
        }
    }
}

pub(crate) struct ReadPool {
    tx: Sender<(ReadJob, Sender<ReadResult>)>,
    cache: Arc<BufCache>,
}

impl ReadPool {
    /// Starts `threads` readers; they end when the pool is dropped.
    pub fn new(threads: usize) -> std::io::Result<ReadPool> {
        let (tx, rx) = crossbeam_channel::bounded::<(ReadJob, Sender<ReadResult>)>(READ_QUEUE_JOBS);
        let cache = Arc::new(BufCache::default());
        for n in 0..threads.max(1) {
            let rx = rx.clone();
            let cache = cache.clone();
            std::thread::Builder::new()
                .name(format!("orlop-read-{n}"))
                .spawn(move || {
                    for (job, reply) in rx.iter() {
                        // The reader may have gone (an aborted request).
                        let _ = reply.send(job.run(&cache));
                    }
                })?;
        }
        Ok(ReadPool { tx, cache })
    }

    /// A read to run when it is needed, on the caller's thread.
    pub fn later(&self, job: ReadJob) -> Ahead {
        Ahead::Later(job, self.cache.clone())
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
        let pool = ReadPool::new(2).unwrap_or_else(|e| panic!("{e}"));
        for direct in [true, false] {
            let job = |start: u64, exact: (u64, u64)| ReadJob {
                file: file.clone(),
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
}
