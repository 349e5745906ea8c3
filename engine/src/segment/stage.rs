//! The active segment's append buffer.
//!
//! Records are gathered in a block-aligned buffer and written to the file
//! in whole blocks, with O_DIRECT where the file system allows it: no copy
//! into the page cache, no dirty pages for the kernel to track and write
//! back, and one write per buffer rather than one per record. A sync
//! writes the partial last block too, padded with zeros after the data's
//! end; the next write rewrites that block with the same leading bytes, so
//! a torn rewrite cannot damage what was already durable, and the zeros
//! after the data's end read as the end of the log (as a torn tail does).
//!
//! Nothing reads the active segment beyond the length its last sync made
//! durable (readers follow committed locations), and a sync writes the
//! whole buffer first, so readers never miss bytes still held here.

use super::behind::Detached;
use crate::io::{AlignedBuf, SegmentFile, BLOCK_BYTES};

/// Writes whole blocks at `offset`: with O_DIRECT, or through the page
/// cache with writeback started at once.
pub(crate) fn write_blocks(
    file: &dyn SegmentFile,
    bytes: &[u8],
    offset: u64,
    direct: bool,
) -> std::io::Result<()> {
    if direct {
        file.write_direct(bytes, offset)
    } else {
        file.write_at(bytes, offset)?;
        file.start_writeback(offset, bytes.len() as u64);
        Ok(())
    }
}

/// The tail of the active segment not yet written (and the partial block
/// before it, already written, which the next write repeats).
pub(crate) struct Stage {
    buf: AlignedBuf,
    /// Bytes held, from `file_offset`.
    len: usize,
    /// Of those, the leading bytes already in the file.
    written: usize,
    /// File offset of `buf[0]`, a multiple of `BLOCK_BYTES`.
    file_offset: u64,
    /// Write with O_DIRECT (`SegmentFile::write_direct`) or buffered.
    direct: bool,
}

impl Stage {
    /// An empty stage for a new file; `bytes` is rounded up to whole blocks
    /// (at least two, so a full buffer always holds a whole block to write).
    pub fn new(bytes: usize, direct: bool) -> Stage {
        Stage {
            buf: AlignedBuf::new(bytes.max(2 * BLOCK_BYTES)),
            len: 0,
            written: 0,
            file_offset: 0,
            direct,
        }
    }

    /// Adds `bytes` at the end, writing whole blocks whenever the buffer fills.
    pub fn push(&mut self, file: &dyn SegmentFile, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let cap = self.buf.len();
            if self.len == cap {
                self.write_whole_blocks(file)?;
            }
            let n = (cap - self.len).min(bytes.len());
            self.buf.as_mut_slice()[self.len..self.len + n].copy_from_slice(&bytes[..n]);
            self.len += n;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// Room for `n` more bytes in one piece at the end, writing whole
    /// blocks first when the buffer lacks it; None when even then it cannot
    /// hold them (the caller pushes them instead). [`Stage::advance`] keeps
    /// what the caller wrote there.
    pub fn room(&mut self, file: &dyn SegmentFile, n: usize) -> std::io::Result<Option<&mut [u8]>> {
        if self.buf.len() - self.len < n {
            self.write_whole_blocks(file)?;
        }
        if self.buf.len() - self.len < n {
            return Ok(None);
        }
        Ok(Some(&mut self.buf.as_mut_slice()[self.len..self.len + n]))
    }

    /// Keeps `n` bytes written at the end by way of [`Stage::room`].
    pub fn advance(&mut self, n: usize) {
        debug_assert!(
            self.len + n <= self.buf.len(),
            "advance past the room given"
        );
        self.len = (self.len + n).min(self.buf.len());
    }

    /// Writes everything held, the partial last block padded with zeros;
    /// keeps that block for the next write to repeat and extend.
    pub fn write_all(&mut self, file: &dyn SegmentFile) -> std::io::Result<()> {
        if self.written == self.len {
            return Ok(());
        }
        let padded = self.len.div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
        self.buf.as_mut_slice()[self.len..padded].fill(0);
        self.write(file, padded)?;
        self.written = self.len;
        self.drop_whole_blocks();
        Ok(())
    }

    /// Bytes held in whole blocks, from the start of the buffer.
    fn whole_bytes(&self) -> usize {
        self.len / BLOCK_BYTES * BLOCK_BYTES
    }

    fn write_whole_blocks(&mut self, file: &dyn SegmentFile) -> std::io::Result<()> {
        let whole = self.whole_bytes();
        if whole > 0 {
            self.write(file, whole)?;
            self.written = self.written.max(whole);
            self.drop_whole_blocks();
        }
        Ok(())
    }

    /// Moves the partial last block (if any) to the front.
    fn drop_whole_blocks(&mut self) {
        let whole = self.whole_bytes();
        if whole == 0 {
            return;
        }
        self.buf.as_mut_slice().copy_within(whole..self.len, 0);
        self.advance_past(whole);
    }

    /// Counts the first `whole` bytes as gone to the file, once the partial
    /// block after them is at the front of the buffer.
    fn advance_past(&mut self, whole: usize) {
        self.file_offset += whole as u64;
        self.len -= whole;
        self.written = self.written.saturating_sub(whole);
    }

    fn write(&self, file: &dyn SegmentFile, n: usize) -> std::io::Result<()> {
        write_blocks(
            file,
            &self.buf.as_slice()[..n],
            self.file_offset,
            self.direct,
        )
    }

    /// The buffer's size (a spare swapped in must have it).
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Whether `n` more bytes need whole blocks written first.
    pub fn is_full_for(&self, n: usize) -> bool {
        self.buf.len() - self.len < n && self.whole_bytes() > 0
    }

    /// Takes the whole blocks out for the caller to write
    /// ([`Detached::write`]), leaving `spare` (of [`Stage::capacity`]
    /// bytes) in their place, holding the partial last block.
    pub fn detach_whole_blocks(&mut self, mut spare: AlignedBuf) -> Detached {
        let whole = self.whole_bytes();
        spare.as_mut_slice()[..self.len - whole]
            .copy_from_slice(&self.buf.as_slice()[whole..self.len]);
        std::mem::swap(&mut self.buf, &mut spare);
        let detached = Detached {
            buf: spare,
            len: whole,
            file_offset: self.file_offset,
            direct: self.direct,
        };
        self.advance_past(whole);
        detached
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{OpenMode, PreadIo, SegmentIo};
    use std::path::PathBuf;
    use std::sync::Arc;

    /// A new segment file in a directory of its own (kept while the
    /// returned guard lives).
    fn new_file() -> (tempfile::TempDir, PathBuf, Arc<dyn SegmentFile>) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("seg");
        let file = PreadIo
            .open(&path, OpenMode::Create)
            .unwrap_or_else(|e| panic!("{e}"));
        (dir, path, file)
    }

    /// Whatever the push sizes, the file holds exactly the bytes pushed
    /// (then zeros to the block boundary) after `write_all`, and every
    /// write was block-aligned.
    #[test]
    fn writes_whole_blocks_and_pads_the_last() {
        let (_dir, path, file) = new_file();
        let mut stage = Stage::new(3 * BLOCK_BYTES, true);
        let mut want = Vec::new();
        for (i, n) in [10usize, 5000, 1, 8191, 20000, 3, 4096, 70000]
            .into_iter()
            .enumerate()
        {
            let piece: Vec<u8> = (0..n).map(|j| (i * 31 + j) as u8 | 1).collect();
            stage.push(&*file, &piece).unwrap_or_else(|e| panic!("{e}"));
            want.extend_from_slice(&piece);
            if i % 3 == 2 {
                stage.write_all(&*file).unwrap_or_else(|e| panic!("{e}"));
                let got = std::fs::read(&path).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(got.len(), want.len().div_ceil(BLOCK_BYTES) * BLOCK_BYTES);
                assert_eq!(&got[..want.len()], &want[..]);
                assert!(got[want.len()..].iter().all(|b| *b == 0));
            }
        }
        stage.write_all(&*file).unwrap_or_else(|e| panic!("{e}"));
        stage.write_all(&*file).unwrap_or_else(|e| panic!("{e}"));
        let got = std::fs::read(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&got[..want.len()], &want[..]);
        assert_eq!(got.len() % BLOCK_BYTES, 0);
    }

    /// Bytes written in place through `room` land where pushed ones would;
    /// a piece larger than the buffer gets no room (and is pushed instead).
    #[test]
    fn room_and_push_build_the_same_file() {
        let (_dir, path, file) = new_file();
        let mut stage = Stage::new(3 * BLOCK_BYTES, true);
        let mut want = Vec::new();
        for (i, n) in [100usize, 9000, 4096, 1, 12288, 7000, 12289, 3, 20000]
            .into_iter()
            .enumerate()
        {
            let piece: Vec<u8> = (0..n).map(|j| (i * 17 + j) as u8 | 1).collect();
            match stage.room(&*file, n).unwrap_or_else(|e| panic!("{e}")) {
                Some(buf) => {
                    assert_eq!(buf.len(), n);
                    buf.copy_from_slice(&piece);
                    stage.advance(n);
                }
                None => {
                    assert!(n > 2 * BLOCK_BYTES, "no room for {n} bytes");
                    stage.push(&*file, &piece).unwrap_or_else(|e| panic!("{e}"));
                }
            }
            want.extend_from_slice(&piece);
        }
        stage.write_all(&*file).unwrap_or_else(|e| panic!("{e}"));
        let got = std::fs::read(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&got[..want.len()], &want[..]);
        assert!(got[want.len()..].iter().all(|b| *b == 0));
    }

    /// Whole blocks detached and written by the caller (as the append path
    /// does outside its lock) build the same file as writes from the stage.
    #[test]
    fn detached_blocks_build_the_same_file() {
        let (_dir, path, file) = new_file();
        let mut stage = Stage::new(3 * BLOCK_BYTES, true);
        let mut want = Vec::new();
        let mut detached = 0;
        for (i, n) in [5000usize, 4000, 3000, 1, 6000, 4096, 2500, 9000, 7]
            .into_iter()
            .enumerate()
        {
            let piece: Vec<u8> = (0..n).map(|j| (i * 13 + j) as u8 | 1).collect();
            if stage.is_full_for(n) {
                let spare = AlignedBuf::new(stage.capacity());
                let d = stage.detach_whole_blocks(spare);
                assert_eq!(d.len % BLOCK_BYTES, 0);
                d.write(&*file).unwrap_or_else(|e| panic!("{e}"));
                detached += 1;
            }
            if i == 4 {
                // A sync between: its padded block is rewritten later.
                stage.write_all(&*file).unwrap_or_else(|e| panic!("{e}"));
            }
            let buf = stage
                .room(&*file, n)
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|| panic!("no room for {n} bytes"));
            buf.copy_from_slice(&piece);
            stage.advance(n);
            want.extend_from_slice(&piece);
        }
        stage.write_all(&*file).unwrap_or_else(|e| panic!("{e}"));
        assert!(detached >= 2, "the stage filled {detached} times");
        let got = std::fs::read(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&got[..want.len()], &want[..]);
        assert!(got[want.len()..].iter().all(|b| *b == 0));
    }
}
