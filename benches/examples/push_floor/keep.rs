//! With `--keep DIR`: the disk work a durable push cannot skip. Each
//! upload's sealed records go, back to back, into a file of its own,
//! written with O_DIRECT in 1 MiB writes (Orlop's append buffer) and
//! synced with fdatasync before a PATCH or PUT is answered (Orlop's
//! checkpoint and commit). Nothing indexes them: they are written, not
//! read back.

use orlop_engine::io::{AlignedBuf, BLOCK_BYTES};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// A record's header, as the engine's (magic, kind, lengths, chunk id,
/// nonce, CRC32C).
pub(crate) const HEAD_BYTES: usize = 64;
/// Bytes written at a time (Orlop's append buffer).
const WRITE_BYTES: usize = 1 << 20;
/// Room for a full write plus the largest record that may overhang it.
const BUF_BYTES: usize = WRITE_BYTES + (4 << 20) + 2 * BLOCK_BYTES;

/// One upload's file and its append buffer.
pub(crate) struct Sink {
    file: File,
    buf: AlignedBuf,
    fill: usize,
    /// Bytes of the file written for good (whole writes).
    written: u64,
}

impl Sink {
    pub(crate) fn create(dir: &Path, id: u64) -> io::Result<Sink> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(dir.join(format!("upload-{id}")))?;
        Ok(Sink {
            file,
            buf: AlignedBuf::new(BUF_BYTES),
            fill: 0,
            written: 0,
        })
    }

    /// Room for the next record of `bytes` (header, payload, tag); call
    /// [`Sink::appended`] once it is filled in.
    pub(crate) fn room(&mut self, bytes: usize) -> io::Result<&mut [u8]> {
        if self.fill + bytes > self.buf.len() {
            return Err(io::Error::other("record larger than the append buffer"));
        }
        Ok(&mut self.buf.as_mut_slice()[self.fill..self.fill + bytes])
    }

    /// The record in [`Sink::room`] is complete: a full buffer is written.
    pub(crate) fn appended(&mut self, bytes: usize) -> io::Result<()> {
        self.fill += bytes;
        if self.fill >= WRITE_BYTES {
            self.file
                .write_all_at(&self.buf.as_slice()[..WRITE_BYTES], self.written)?;
            self.written += WRITE_BYTES as u64;
            self.buf
                .as_mut_slice()
                .copy_within(WRITE_BYTES..self.fill, 0);
            self.fill -= WRITE_BYTES;
        }
        Ok(())
    }

    /// Writes what is buffered (padded to a block; the next write starts
    /// over it, as a checkpointed append buffer does) and syncs the file.
    pub(crate) fn sync(&mut self) -> io::Result<()> {
        if self.fill > 0 {
            let padded = self.fill.div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
            self.buf.as_mut_slice()[self.fill..padded].fill(0);
            self.file
                .write_all_at(&self.buf.as_slice()[..padded], self.written)?;
        }
        self.file.sync_data()
    }
}
