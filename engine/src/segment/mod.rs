//! Segment files: append-only logs of encrypted chunk records, sealed at a
//! fixed size. The active segment takes appends under one lock (which also
//! fixes each record's nonce), and its full append buffers are written
//! after the lock is released (`behind`); sealed segments are immutable.

mod append;
mod behind;
pub mod format;
mod recovery;
mod stage;

pub use recovery::{
    footer_mismatch, scan_segment, scan_segment_records, scan_unsealed, walk_headers, ScanResult,
};

use crate::error::{Error, Result};
use crate::ids::{ChunkId, SegmentId};
use crate::index::codec::{Location, SegmentEntry};
use crate::index::{Index, CF_META, CF_SEGMENTS, META_NEXT_SEGMENT};
use crate::io::{OpenMode, SegmentFile, SegmentIo};
#[cfg(test)]
pub(crate) use append::seal_record;
use behind::WriteBehind;
use format::{RecordHeader, SegmentFooter, SegmentHeader, FOOTER_BYTES, HEADER_BYTES};
use stage::Stage;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

struct Active {
    id: SegmentId,
    file: Arc<dyn SegmentFile>,
    /// End of the data appended (some of it may still be in `stage`).
    offset: u64,
    record_count: u64,
    data_crc: u32,
    stage: Stage,
}

impl Active {
    /// Counts a record just added to `stage` (its header's CRC joins the
    /// footer's chain).
    fn count(&mut self, header: &[u8], record_len: usize) {
        self.offset += record_len as u64;
        self.record_count += 1;
        self.data_crc = format::chain_record_crc(self.data_crc, header);
    }
}

/// The active segment's append buffer (`stage`): appends reach the file in
/// writes of about this size, and at each sync.
const STAGE_BYTES: usize = 1 << 20;

/// How segment appends reach the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendMode {
    /// Whole blocks from an aligned buffer with O_DIRECT, where the file
    /// system allows it (the default).
    Direct,
    /// The same blocks through the page cache.
    Buffered,
}

pub(crate) struct Segments {
    dir: PathBuf,
    io: Arc<dyn SegmentIo>,
    index: Arc<Index>,
    store_id: [u8; 16],
    segment_bytes: u64,
    append_mode: AppendMode,
    files: RwLock<HashMap<SegmentId, Arc<dyn SegmentFile>>>,
    active: Mutex<Option<Active>>,
    /// Full append buffers being written after the lock was released.
    behind: WriteBehind,
    poisoned: AtomicBool,
    /// Serialises writes of `segments` entries (sealing vs the committer's
    /// durable-length updates). Lock order: `active`, then this.
    pub meta_lock: Mutex<()>,
}

/// A chunk ready to append: its plaintext or compressed bytes, not yet
/// encrypted (the appender copies them into the segment's append buffer and
/// encrypts them there).
pub(crate) struct PreparedChunk {
    /// Record kind: a data chunk, or a metadata record (`journal`).
    pub kind: u8,
    pub id: ChunkId,
    pub flags: u8,
    pub raw_len: u32,
    pub body: bytes::Bytes,
}

impl Segments {
    pub fn new(
        dir: PathBuf,
        io: Arc<dyn SegmentIo>,
        index: Arc<Index>,
        store_id: [u8; 16],
        segment_bytes: u64,
        append_mode: AppendMode,
    ) -> Self {
        Segments {
            dir,
            io,
            index,
            store_id,
            segment_bytes,
            append_mode,
            files: RwLock::new(HashMap::new()),
            active: Mutex::new(None),
            behind: WriteBehind::default(),
            poisoned: AtomicBool::new(false),
            meta_lock: Mutex::new(()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn io(&self) -> &Arc<dyn SegmentIo> {
        &self.io
    }

    pub fn path_of(&self, id: SegmentId) -> PathBuf {
        self.dir.join(id.file_name())
    }

    pub fn poison(&self, why: &dyn std::fmt::Display) {
        if !self.poisoned.swap(true, Ordering::SeqCst) {
            tracing::error!(error = %why, "segment write failed; the store refuses writes until reopened");
        }
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    pub fn check_writable(&self) -> Result<()> {
        if self.index.is_read_only() {
            return Err(Error::ReadOnly);
        }
        if self.is_poisoned() {
            return Err(Error::Poisoned);
        }
        Ok(())
    }

    /// Registers an existing (recovered or sealed) segment for reading.
    pub fn register(&self, id: SegmentId, file: Arc<dyn SegmentFile>) {
        self.files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, file);
    }

    pub fn ids(&self) -> Vec<SegmentId> {
        let mut v: Vec<_> = self
            .files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        v.sort();
        v
    }

    pub fn file(&self, id: SegmentId) -> Result<Arc<dyn SegmentFile>> {
        self.files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
            .ok_or(Error::SegmentMissing(id))
    }

    /// Waits for the writes behind the lock that began before now; after
    /// it, a store they failed in is poisoned. The caller holds the append
    /// lock (or took `mark` under it).
    fn wait_behind(&self, mark: u64) -> Result<()> {
        self.behind.wait_before(mark);
        match self.is_poisoned() {
            true => Err(Error::Poisoned),
            false => Ok(()),
        }
    }

    /// The lowest segment id an append made from now on can land in: the
    /// active segment, or the next one to be created.
    pub fn append_floor(&self) -> Result<SegmentId> {
        let g = self.active.lock().unwrap_or_else(|p| p.into_inner());
        match g.as_ref() {
            Some(a) => Ok(a.id),
            None => Ok(SegmentId(
                self.index.meta_u64(META_NEXT_SEGMENT)?.unwrap_or(1),
            )),
        }
    }

    /// Forgets a sealed segment and deletes its file. Readers that already
    /// hold the file keep reading it (an unlinked file stays readable); new
    /// lookups find it missing and re-read the chunk's (moved) location.
    pub fn remove_sealed(&self, id: SegmentId) -> Result<()> {
        let is_active = self
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|a| a.id == id);
        if is_active {
            return Err(Error::Config(format!("segment {id} is the active segment")));
        }
        self.files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let path = self.path_of(id);
        match self.io.remove(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&path, e)),
        }
        Ok(())
    }

    /// Deletes segments' index entries (before their files go: a crash in
    /// between leaves a file the index does not know, which the next
    /// compaction removes, never an entry whose file is missing).
    pub fn forget(&self, ids: &[SegmentId]) -> Result<()> {
        let mut batch = rocksdb::WriteBatch::default();
        for id in ids {
            batch.delete_cf(self.index.cf(CF_SEGMENTS)?, id.0.to_be_bytes());
        }
        let _meta = self.meta_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.index.write_synced(batch)
    }

    pub fn sync_dir(&self) -> Result<()> {
        self.io
            .sync_dir(&self.dir)
            .map_err(|e| Error::io(&self.dir, e))
    }

    /// Allocates a segment id durably, creates the file and writes its header.
    fn create(&self) -> Result<Active> {
        let next = self.index.meta_u64(META_NEXT_SEGMENT)?.unwrap_or(1);
        let id = SegmentId(next);
        let mut batch = rocksdb::WriteBatch::default();
        batch.put_cf(
            self.index.cf(CF_META)?,
            META_NEXT_SEGMENT,
            (next + 1).to_le_bytes(),
        );
        batch.put_cf(
            self.index.cf(CF_SEGMENTS)?,
            id.0.to_be_bytes(),
            SegmentEntry {
                sealed: false,
                durable_len: 0,
            }
            .encode(),
        );
        self.index.write_synced(batch)?;
        let path = self.path_of(id);
        let fail = |e: std::io::Error| {
            self.poison(&e);
            Error::io(&path, e)
        };
        let file = self.io.open(&path, OpenMode::Create).map_err(fail)?;
        let header = SegmentHeader {
            segment: id,
            store_id: self.store_id,
            segment_bytes: self.segment_bytes,
        };
        let mut stage = Stage::new(STAGE_BYTES, self.append_mode == AppendMode::Direct);
        stage
            .push(&*file, &header.encode())
            .and_then(|_| stage.write_all(&*file))
            .and_then(|_| file.sync())
            .map_err(fail)?;
        self.io.sync_dir(&self.dir).map_err(fail)?;
        self.register(id, file.clone());
        tracing::debug!(segment = %id, "opened a new segment");
        Ok(Active {
            id,
            file,
            offset: HEADER_BYTES,
            record_count: 0,
            data_crc: 0,
            stage,
        })
    }

    fn seal(&self, mut a: Active) -> Result<()> {
        // Called under the append lock: no write can begin meanwhile.
        self.wait_behind(self.behind.mark())?;
        let footer = SegmentFooter {
            segment: a.id,
            data_end: a.offset,
            record_count: a.record_count,
            data_crc: a.data_crc,
        };
        let file = a.file.clone();
        a.stage
            .write_all(&*file)
            .and_then(|_| seal_file(&*file, self.segment_bytes, &footer))
            .map_err(|e| {
                self.poison(&e);
                Error::io(self.path_of(a.id), e)
            })?;
        let mut batch = rocksdb::WriteBatch::default();
        batch.put_cf(
            self.index.cf(CF_SEGMENTS)?,
            a.id.0.to_be_bytes(),
            SegmentEntry {
                sealed: true,
                durable_len: a.offset,
            }
            .encode(),
        );
        let _meta = self.meta_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.index.write_synced(batch)?;
        tracing::debug!(segment = %a.id, bytes = a.offset, records = a.record_count, "sealed segment");
        Ok(())
    }

    /// Makes every completed append durable. Returns the active segment and
    /// the length now durable, for the commit to record.
    pub fn sync_active(&self) -> Result<Option<(SegmentId, u64)>> {
        self.check_writable()?;
        let (id, file, len, mark) = {
            let mut g = self.active.lock().unwrap_or_else(|p| p.into_inner());
            // Under the lock: a failed seal or write leaves no active segment
            // and a poisoned store; that must not read as "nothing to sync".
            self.check_writable()?;
            let Some(a) = g.as_mut() else {
                return Ok(None);
            };
            let (id, file, len) = (a.id, a.file.clone(), a.offset);
            // Everything appended so far reaches the file before the sync.
            if let Err(e) = a.stage.write_all(&*file) {
                return Err(self.retire_active(&mut g, id, e));
            }
            (id, file, len, self.behind.mark())
        };
        self.wait_behind(mark)?;
        if let Err(e) = file.sync() {
            self.poison(&e);
            return Err(Error::io(self.path_of(id), e));
        }
        Ok(Some((id, len)))
    }

    /// Seals the active segment (clean shutdown).
    pub fn seal_active(&self) -> Result<()> {
        let mut g = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = g.take() {
            if self.is_poisoned() {
                return Err(Error::Poisoned);
            }
            self.seal(a)?;
        }
        Ok(())
    }

    /// Reads one whole record (header ‖ payload) and checks its checksum.
    pub fn read_record(&self, loc: &Location) -> Result<Vec<u8>> {
        let buf = self.read_raw(loc)?;
        if !RecordHeader::checksum_ok(&buf) {
            return Err(Error::ChecksumMismatch {
                segment: loc.segment,
                offset: loc.offset as u64,
            });
        }
        Ok(buf)
    }

    /// A record's bytes as they are on disk, unchecked (for quarantine).
    pub fn read_raw(&self, loc: &Location) -> Result<Vec<u8>> {
        let file = self.file(loc.segment)?;
        let mut buf = vec![0u8; loc.record_len() as usize];
        file.read_at(&mut buf, loc.offset as u64).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::CorruptChunk {
                    segment: loc.segment,
                    offset: loc.offset as u64,
                    reason: "segment file ends before the record",
                }
            } else {
                Error::io(self.path_of(loc.segment), e)
            }
        })?;
        Ok(buf)
    }
}

/// Writes the footer at the fixed end of the file and syncs it.
pub(crate) fn seal_file(
    file: &dyn SegmentFile,
    segment_bytes: u64,
    footer: &SegmentFooter,
) -> std::io::Result<()> {
    file.set_len(footer.data_end)?;
    file.write_at(&footer.encode(), segment_bytes - FOOTER_BYTES)?;
    file.sync()
}
