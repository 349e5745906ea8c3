//! Writes of the append buffer behind the append lock.
//!
//! When the active segment's buffer fills, its whole blocks are swapped out
//! for a spare buffer under the append lock and written to the file after
//! the lock is released, so other writers keep appending while the disk
//! takes the bytes (with O_DIRECT a 1 MiB write waits on the device). A
//! bounded pool of spares bounds the writes in flight; with none spare, the
//! appender writes under the lock as before, which is the backpressure.
//!
//! Every write gets a sequence number when it is taken out of the buffer.
//! A sync (or a seal) notes the next number under the append lock and waits
//! until every write numbered below it is done before its fsync, so a sync
//! still covers every append that completed before it. A crash may now
//! leave a gap (a later write landed, an earlier one did not), but only
//! past the last sync: recovery ends the log at the first bad record, as
//! for a torn tail, and never below the durable length.

use crate::io::{AlignedBuf, SegmentFile};
use std::sync::{Condvar, Mutex, MutexGuard};

/// Writes in flight at most (each holds one append buffer).
pub(crate) const WRITES_BEHIND_MAX: usize = 2;

/// Whole blocks taken out of the append buffer, to write without the lock.
pub(crate) struct Detached {
    pub buf: AlignedBuf,
    /// Bytes to write from the start of `buf` (whole blocks).
    pub len: usize,
    pub file_offset: u64,
    pub direct: bool,
}

impl Detached {
    pub fn write(&self, file: &dyn SegmentFile) -> std::io::Result<()> {
        let bytes = &self.buf.as_slice()[..self.len];
        super::stage::write_blocks(file, bytes, self.file_offset, self.direct)
    }
}

#[derive(Default)]
struct State {
    spares: Vec<AlignedBuf>,
    /// Buffers made so far (spare or in flight).
    made: usize,
    next_seq: u64,
    /// Sequence numbers of the writes in flight.
    in_flight: Vec<u64>,
}

#[derive(Default)]
pub(crate) struct WriteBehind {
    state: Mutex<State>,
    done: Condvar,
}

impl WriteBehind {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A spare buffer of `bytes` and the sequence number of the write it
    /// will carry, or `None` when every buffer is in flight. The caller
    /// holds the append lock, and must call [`WriteBehind::end`].
    pub fn begin(&self, bytes: usize) -> Option<(AlignedBuf, u64)> {
        let mut s = self.lock();
        let buf = match s.spares.pop() {
            Some(b) if b.len() == bytes => b,
            // A buffer of another size (never, while the stage size is
            // fixed) is dropped and made again.
            Some(_) => AlignedBuf::new(bytes),
            None if s.made < WRITES_BEHIND_MAX => {
                s.made += 1;
                AlignedBuf::new(bytes)
            }
            None => return None,
        };
        let seq = s.next_seq;
        s.next_seq += 1;
        s.in_flight.push(seq);
        Some((buf, seq))
    }

    /// The write `seq` is done (or failed); its buffer is spare again.
    pub fn end(&self, seq: u64, buf: AlignedBuf) {
        let mut s = self.lock();
        s.in_flight.retain(|q| *q != seq);
        s.spares.push(buf);
        drop(s);
        self.done.notify_all();
    }

    /// The sequence number the next write will get: the writes a sync
    /// must wait for are those below it. Taken under the append lock.
    pub fn mark(&self) -> u64 {
        self.lock().next_seq
    }

    /// Waits until every write numbered below `mark` is done.
    pub fn wait_before(&self, mark: u64) {
        let mut s = self.lock();
        while s.in_flight.iter().any(|q| *q < mark) {
            s = self.done.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn bounded_and_waits_only_for_earlier_writes() {
        let wb = Arc::new(WriteBehind::default());
        let (a, sa) = wb.begin(4096).unwrap_or_else(|| panic!("first spare"));
        let (b, sb) = wb.begin(4096).unwrap_or_else(|| panic!("second spare"));
        assert!(
            wb.begin(4096).is_none(),
            "at most {WRITES_BEHIND_MAX} in flight"
        );
        let mark = wb.mark();
        assert!(sa < mark && sb < mark);
        wb.end(sa, a);
        let (c, sc) = wb
            .begin(4096)
            .unwrap_or_else(|| panic!("a buffer came back"));
        assert!(sc >= mark);
        let wb2 = wb.clone();
        let waiter = std::thread::spawn(move || wb2.wait_before(mark));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "write {sb} is still in flight");
        wb.end(sb, b);
        waiter.join().unwrap_or_else(|_| panic!("waiter panicked"));
        // A write begun after the mark is not waited for.
        wb.wait_before(mark);
        wb.end(sc, c);
    }
}
