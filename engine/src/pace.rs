//! A bound on the bytes per second a background job (compaction's copies,
//! the scrub's reads) moves, so that pushes and pulls keep their speed.

use std::time::{Duration, Instant};

pub(crate) struct Pacer {
    /// Bytes per second at most; 0 is unbounded.
    rate: u64,
    started: Instant,
}

impl Pacer {
    pub fn new(rate: u64) -> Self {
        Pacer {
            rate,
            started: Instant::now(),
        }
    }

    /// Sleeps until `done` bytes are within the rate since the start.
    pub fn wait(&self, done: u64) {
        if self.rate == 0 {
            return;
        }
        let due = Duration::from_secs_f64(done as f64 / self.rate as f64);
        if let Some(wait) = due.checked_sub(self.started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}
