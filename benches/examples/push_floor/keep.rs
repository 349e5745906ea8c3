//! With `--keep DIR`: the disk work a durable push cannot skip. Each
//! upload's sealed records go, back to back, into a file of its own,
//! written with O_DIRECT in 1 MiB writes (Orlop's append buffer) and
//! synced with fdatasync before a PATCH or PUT is answered (Orlop's
//! checkpoint and commit). Nothing indexes them: they are written, not
//! read back. A lone upload's full buffers are written by a thread of
//! their own while the next fills (Orlop's lone writer appends on its own
//! thread, at most two writes in flight behind it); among many uploads
//! each writes on its connection's thread, as Orlop's inline writers do.
//!
//! The pull floor keeps its blobs' records with the same [`Sink`]
//! (written on the connection's thread, 2 MiB at a time).

use crossbeam_channel::{bounded, Receiver, Sender};
use orlop_engine::io::{AlignedBuf, BLOCK_BYTES};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

/// Bytes written at a time by the push floor (Orlop's append buffer).
#[allow(dead_code)] // the pull floor, which shares this file, picks its own
pub(crate) const APPEND_WRITE_BYTES: usize = 1 << 20;
/// Room past a full write for the largest record that may overhang it.
const OVERHANG_BYTES: usize = (4 << 20) + 2 * BLOCK_BYTES;

/// Full buffers in flight at most behind a lone upload (Orlop's
/// `WRITES_BEHIND_MAX`).
const WRITES_BEHIND_MAX: usize = 2;

/// A thread writing full buffers behind the upload, in order.
struct Behind {
    tx: Sender<(AlignedBuf, u64)>,
    back: Receiver<io::Result<AlignedBuf>>,
    spares: Vec<AlignedBuf>,
    in_flight: usize,
}

impl Behind {
    fn start(file: Arc<File>, write_bytes: usize) -> io::Result<Behind> {
        let (tx, rx) = bounded::<(AlignedBuf, u64)>(WRITES_BEHIND_MAX);
        let (back_tx, back) = bounded(WRITES_BEHIND_MAX);
        std::thread::Builder::new()
            .name("floor-write".into())
            .spawn(move || {
                for (buf, at) in rx {
                    let r = file
                        .write_all_at(&buf.as_slice()[..write_bytes], at)
                        .map(|()| buf);
                    if back_tx.send(r).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Behind {
            tx,
            back,
            spares: Vec::new(),
            in_flight: 0,
        })
    }

    /// A buffer (of `bytes`) to fill next: a spare, a new one while fewer
    /// than the bound exist, or the first to come back from the disk.
    fn next(&mut self, bytes: usize) -> io::Result<AlignedBuf> {
        if let Some(b) = self.spares.pop() {
            return Ok(b);
        }
        if self.in_flight < WRITES_BEHIND_MAX {
            return Ok(AlignedBuf::new(bytes));
        }
        self.wait_one()
    }

    fn wait_one(&mut self) -> io::Result<AlignedBuf> {
        let b = self
            .back
            .recv()
            .map_err(|_| io::Error::other("writer thread gone"))??;
        self.in_flight -= 1;
        Ok(b)
    }

    fn send(&mut self, buf: AlignedBuf, at: u64) -> io::Result<()> {
        self.tx
            .send((buf, at))
            .map_err(|_| io::Error::other("writer thread gone"))?;
        self.in_flight += 1;
        Ok(())
    }

    /// Returns once no write is in flight.
    fn drain(&mut self) -> io::Result<()> {
        while self.in_flight > 0 {
            let b = self.wait_one()?;
            self.spares.push(b);
        }
        Ok(())
    }
}

/// One upload's file and its append buffer.
pub(crate) struct Sink {
    file: Arc<File>,
    buf: AlignedBuf,
    fill: usize,
    /// Bytes written at a time (whole blocks).
    write_bytes: usize,
    /// Bytes of the file written for good (whole writes).
    written: u64,
    behind: Option<Behind>,
}

impl Sink {
    /// Creates (or truncates) `path` for direct writes of `write_bytes` at
    /// a time; with `behind`, full buffers are written by a thread of
    /// their own.
    pub(crate) fn create(path: &Path, write_bytes: usize, behind: bool) -> io::Result<Sink> {
        let file = Arc::new(
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)?,
        );
        let behind = match behind {
            true => Some(Behind::start(file.clone(), write_bytes)?),
            false => None,
        };
        Ok(Sink {
            file,
            buf: AlignedBuf::new(write_bytes + OVERHANG_BYTES),
            fill: 0,
            write_bytes,
            written: 0,
            behind,
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

    /// The record in [`Sink::room`] is complete: a full buffer is written
    /// (or handed to the writing thread), what overhangs it kept.
    pub(crate) fn appended(&mut self, bytes: usize) -> io::Result<()> {
        self.fill += bytes;
        let w = self.write_bytes;
        if self.fill < w {
            return Ok(());
        }
        let rest = w..self.fill;
        match self.behind.as_mut() {
            None => {
                self.file
                    .write_all_at(&self.buf.as_slice()[..w], self.written)?;
                self.buf.as_mut_slice().copy_within(rest, 0);
            }
            Some(b) => {
                let mut next = b.next(self.buf.len())?;
                next.as_mut_slice()[..rest.len()].copy_from_slice(&self.buf.as_slice()[rest]);
                let full = std::mem::replace(&mut self.buf, next);
                b.send(full, self.written)?;
            }
        }
        self.written += w as u64;
        self.fill -= w;
        Ok(())
    }

    /// Writes what is buffered (padded to a block; the next write starts
    /// over it, as a checkpointed append buffer does) once the write in
    /// flight is done, and syncs the file.
    pub(crate) fn sync(&mut self) -> io::Result<()> {
        if let Some(b) = self.behind.as_mut() {
            b.drain()?;
        }
        if self.fill > 0 {
            let padded = self.fill.div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
            self.buf.as_mut_slice()[self.fill..padded].fill(0);
            self.file
                .write_all_at(&self.buf.as_slice()[..padded], self.written)?;
        }
        self.file.sync_data()
    }
}
