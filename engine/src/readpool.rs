//! A few threads that read spans ahead of the blob readers, so that the
//! disk works on a reader's next batch while the reader opens (checks and
//! decrypts) the current one. Reads bypass the page cache (O_DIRECT) when
//! the store's appends do: a span written by a direct append is not in the
//! cache, and copying it through the cache costs this kind of machine more
//! CPU than the read itself.
//!
//! Bounded: at most `READ_QUEUE_JOBS` reads wait for a thread; a reader
//! that finds the queue full reads its span itself, when it needs it.

use crate::io::{AlignedBuf, SegmentFile};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::sync::Arc;

/// Reads waiting for a pool thread, at most.
const READ_QUEUE_JOBS: usize = 64;

/// One span to read: `[start, start + len)` of `file`, block-aligned.
pub(crate) struct ReadJob {
    pub file: Arc<dyn SegmentFile>,
    pub start: u64,
    pub len: usize,
    /// The span's exact bytes, for a file that ends inside the last block.
    pub exact: (u64, u64),
    pub direct: bool,
}

pub(crate) type ReadResult = std::io::Result<AlignedBuf>;

impl ReadJob {
    /// Reads the span into a fresh block-aligned buffer.
    pub fn run(&self) -> ReadResult {
        let mut buf = AlignedBuf::new(self.len);
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
    Later(ReadJob),
}

impl Ahead {
    /// The span's bytes (waits for a queued read).
    pub fn wait(self) -> ReadResult {
        match self {
            Ahead::Queued(rx) => rx
                .recv()
                .unwrap_or_else(|_| Err(std::io::Error::other("read pool stopped"))),
            Ahead::Later(job) => job.run(),
        }
    }
}

pub(crate) struct ReadPool {
    tx: Sender<(ReadJob, Sender<ReadResult>)>,
}

impl ReadPool {
    /// Starts `threads` readers; they end when the pool is dropped.
    pub fn new(threads: usize) -> std::io::Result<ReadPool> {
        let (tx, rx) = crossbeam_channel::bounded::<(ReadJob, Sender<ReadResult>)>(READ_QUEUE_JOBS);
        for n in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("orlop-read-{n}"))
                .spawn(move || {
                    for (job, reply) in rx.iter() {
                        // The reader may have gone (an aborted request).
                        let _ = reply.send(job.run());
                    }
                })?;
        }
        Ok(ReadPool { tx })
    }

    /// Queues `job`, or hands it back to be run when needed if the queue
    /// is full.
    pub fn submit(&self, job: ReadJob) -> Ahead {
        let (reply, rx) = crossbeam_channel::bounded(1);
        match self.tx.try_send((job, reply)) {
            Ok(()) => Ahead::Queued(rx),
            Err(TrySendError::Full((job, _)) | TrySendError::Disconnected((job, _))) => {
                Ahead::Later(job)
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
        let data: Vec<u8> = (0..(2 * BLOCK_BYTES + 100)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap_or_else(|e| panic!("{e}"));
        let file = PreadIo.open(&path, OpenMode::ReadOnly).unwrap_or_else(|e| panic!("{e}"));
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
            for ahead in [pool.submit(job(BLOCK_BYTES as u64, exact)), Ahead::Later(job(BLOCK_BYTES as u64, exact))] {
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
}
