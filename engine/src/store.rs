//! Opening, recovering and closing a store, and its public API.

use crate::commit::{self, Request};
use crate::config::{IoBackend, StoreConfig};
use crate::crypto::ChunkCipher;
use crate::error::{Error, Result};
use crate::ids::{ChunkId, Digest, RecipeId, SegmentId};
use crate::index::codec::Location;
use crate::index::*;
use crate::io::{self, PreadIo, SegmentIo, UringIo};
use crate::keys::MasterKey;
use crate::read::BlobReader;
use crate::segment::Segments;
use crate::txn::Txn;
use crate::write::BlobWriter;
use crossbeam_channel::Sender;
use rocksdb::WriteBatch;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

mod open;
use open::{check_meta, drop_pending, recover_segments};

/// Recipe ids are reserved durably in blocks of this many.
const RECIPE_ID_BLOCK: u64 = 4096;
/// At most this many uncommitted chunk placements are shared between writers.
pub(crate) const INFLIGHT_CHUNKS_MAX: usize = 1 << 16;

/// A checkpointed write kept across restarts (see [`BlobWriter::checkpoint`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldWrite {
    pub recipe: RecipeId,
    /// Bytes held.
    pub size: u64,
    pub updated_unix_ms: u64,
    /// The name the writer gave it.
    pub tag: Vec<u8>,
}

/// What the store knows about a committed blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    pub digest: Digest,
    pub size: u64,
    pub chunk_count: u64,
    pub refs: u64,
    pub created_unix_ms: u64,
}

pub(crate) struct Inner {
    pub cfg: StoreConfig,
    pub index: Arc<Index>,
    pub segments: Segments,
    pub cipher: ChunkCipher,
    pub naming_key: [u8; 32],
    /// Chunks appended but not yet committed: id -> (location, owning recipe).
    pub inflight: Mutex<HashMap<ChunkId, (Location, RecipeId)>>,
    pub commit_tx: Sender<Request>,
    recipe_ids: Mutex<(u64, u64)>,
    /// Live writers, for compaction (see [`crate::compact`]).
    pub writers: Mutex<Writers>,
    /// Segments a compaction is emptying: a writer's lookup that finds a
    /// chunk in one of them stores a fresh copy instead of deduplicating.
    pub retiring: RwLock<HashSet<SegmentId>>,
    retiring_any: AtomicBool,
    /// Held by the committer from appending journal records until its index
    /// batch is written (see `journal::is_live`).
    pub journal_lock: Mutex<()>,
    /// Reads spans ahead of the blob readers (see [`crate::readpool`]).
    pub read_pool: crate::readpool::ReadPool,
}

/// The live writers: each one's *floor* (the lowest segment its appends,
/// or placements it shares from another writer, can be in), the
/// compaction generation it started in, and whether it is parked.
#[derive(Default)]
pub(crate) struct Writers {
    next: u64,
    pub generation: u64,
    pub live: BTreeMap<u64, (Arc<AtomicU64>, u64)>,
    /// Writers parked at a checkpoint (an upload session between two
    /// requests, or one its client left): live, but not writing.
    parked: HashSet<u64>,
}

/// A writer's registration; dropping it ends it.
pub(crate) struct WriterTicket {
    inner: Arc<Inner>,
    id: u64,
    pub floor: Arc<AtomicU64>,
    /// Busy writers when this one registered, itself included (see
    /// `StoreConfig::write_inline_from_writers`).
    pub busy_at_start: usize,
}

impl WriterTicket {
    /// Another live writer's uncommitted placement of `id`, if any; the
    /// floor drops to its segment under the registry lock, so a compaction
    /// choosing segments either sees the lowered floor or the owner's.
    pub fn share_inflight(&self, id: &ChunkId) -> Option<Location> {
        // Most chunks are in no other writer's flight: say so without the
        // registry lock, which every writer's every chunk would contend on.
        if !self.inner.is_inflight(id) {
            return None;
        }
        let _g = self.inner.writers.lock().unwrap_or_else(|p| p.into_inner());
        let loc = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|v| v.0)?;
        self.floor.fetch_min(loc.segment.0, Ordering::SeqCst);
        Some(loc)
    }

    /// Marks the writer parked (after a checkpoint: it may not write again
    /// for a long while) or busy (it writes). Parked writers do not count
    /// in a new writer's `busy_at_start`.
    pub fn set_parked(&self, parked: bool) {
        let mut g = self.inner.writers.lock().unwrap_or_else(|p| p.into_inner());
        if parked {
            g.parked.insert(self.id);
        } else {
            g.parked.remove(&self.id);
        }
    }
}

impl Drop for WriterTicket {
    fn drop(&mut self) {
        let mut g = self.inner.writers.lock().unwrap_or_else(|p| p.into_inner());
        g.live.remove(&self.id);
        g.parked.remove(&self.id);
    }
}

/// An open store. Cheap to share behind an `Arc`; dropping it shuts down cleanly.
pub struct Store {
    inner: Arc<Inner>,
    committer: Option<JoinHandle<()>>,
}

pub(crate) fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Inner {
    /// Registers a writer before its first lookup or append.
    pub fn register_writer(self: &Arc<Self>) -> Result<WriterTicket> {
        // Read before the registry lock, not under it (the append lock may be
        // busy, and every writer's chunks look up the registry): the active
        // segment can only move up meanwhile, so this floor is at or below
        // the one read under the lock, which keeps as much or more.
        let floor = Arc::new(AtomicU64::new(self.segments.append_floor()?.0));
        let mut g = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        g.next += 1;
        let id = g.next;
        let generation = g.generation;
        g.live.insert(id, (floor.clone(), generation));
        let busy_at_start = g.live.len().saturating_sub(g.parked.len());
        Ok(WriterTicket {
            inner: self.clone(),
            id,
            floor,
            busy_at_start,
        })
    }

    /// Whether some live writer holds an uncommitted placement of `id`.
    fn is_inflight(&self, id: &ChunkId) -> bool {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
    }

    /// Drops a write's uncommitted placements from the shared map (a
    /// detached write: nobody may dedupe against them any more).
    pub fn forget_inflight(&self, recipe: RecipeId) {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (_, owner)| *owner != recipe);
    }

    pub fn is_retiring(&self, seg: SegmentId) -> bool {
        self.retiring_any.load(Ordering::SeqCst)
            && self
                .retiring
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&seg)
    }

    /// Replaces the retiring set (compaction only).
    pub fn set_retiring(&self, segs: HashSet<SegmentId>) {
        let mut g = self.retiring.write().unwrap_or_else(|p| p.into_inner());
        self.retiring_any.store(!segs.is_empty(), Ordering::SeqCst);
        *g = segs;
    }

    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.naming_key, data).as_bytes())
    }

    /// Appends a metadata journal record (`crate::journal`), encrypted and
    /// named like a chunk. Durable with the next segment fsync.
    pub fn append_meta(&self, kind: u8, payload: &[u8]) -> Result<Location> {
        self.segments.append(
            &self.cipher,
            &crate::segment::PreparedChunk {
                kind,
                id: self.chunk_id(payload),
                flags: 0,
                raw_len: payload.len() as u32,
                body: bytes::Bytes::copy_from_slice(payload),
            },
        )
    }

    pub fn next_recipe_id(&self) -> Result<RecipeId> {
        let mut g = self.recipe_ids.lock().unwrap_or_else(|p| p.into_inner());
        if g.0 >= g.1 {
            let until = g.1 + RECIPE_ID_BLOCK;
            let mut b = WriteBatch::default();
            b.put_cf(
                self.index.cf(CF_META)?,
                META_NEXT_RECIPE,
                until.to_le_bytes(),
            );
            self.index.write_synced(b)?;
            g.1 = until;
        }
        g.0 += 1;
        Ok(RecipeId(g.0 - 1))
    }

    pub fn request<T>(&self, make: impl FnOnce(Sender<Result<T>>) -> Request) -> Result<T> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.commit_tx
            .send(make(tx))
            .map_err(|_| Error::ShuttingDown)?;
        rx.recv().map_err(|_| Error::ShuttingDown)?
    }
}

pub(crate) fn pick_io(b: &IoBackend) -> Result<Arc<dyn SegmentIo>> {
    Ok(match b {
        IoBackend::Auto => io::auto(),
        IoBackend::Pread => Arc::new(PreadIo),
        IoBackend::Uring => Arc::new(UringIo::new().map_err(|e| Error::io("io_uring", e))?),
        IoBackend::Custom(io) => io.clone(),
    })
}

impl Store {
    /// Opens (creating on first use) the store under `cfg.data_dir`.
    pub fn open(cfg: StoreConfig) -> Result<Store> {
        cfg.validate()?;
        let dir = cfg.data_dir.clone();
        let index_dir = dir.join("index");
        let seg_dir = dir.join("segments");
        let is_new = !index_dir.join("CURRENT").exists();
        if cfg.read_only && is_new {
            return Err(Error::Config(format!("no store at {}", dir.display())));
        }
        if !cfg.read_only {
            for d in [&dir, &seg_dir] {
                std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
            }
        }
        let key = MasterKey::load(&cfg.key, &dir, is_new && !cfg.read_only)?;
        let sub = key.subkeys();
        let index = Arc::new(Index::open(
            &index_dir,
            cfg.read_only,
            &cfg.extra_column_families,
        )?);
        let store_id = check_meta(&index, &sub.check, is_new)?;
        let io = pick_io(&cfg.io)?;
        tracing::info!(io = io.name(), data = %dir.display(), "opening store");
        let segments = Segments::new(
            seg_dir,
            io,
            index.clone(),
            store_id,
            cfg.segment_bytes,
            cfg.append_mode,
        );
        recover_segments(&index, &segments, store_id)?;
        if !cfg.read_only {
            drop_pending(&index)?;
        }
        let next_recipe = index.meta_u64(META_NEXT_RECIPE)?.unwrap_or(1);
        let (tx, rx) = crossbeam_channel::bounded(cfg.group_commit_requests_max * 4);
        let read_pool = crate::readpool::ReadPool::new(cfg.read_threads, cfg.observer.clone())
            .map_err(|e| Error::io(&dir, e))?;
        let inner = Arc::new(Inner {
            cipher: ChunkCipher::new(&key.encryption_key(&store_id)),
            naming_key: sub.naming,
            cfg,
            index,
            segments,
            inflight: Mutex::new(HashMap::new()),
            commit_tx: tx,
            recipe_ids: Mutex::new((next_recipe, next_recipe)),
            writers: Mutex::new(Writers::default()),
            retiring: RwLock::new(HashSet::new()),
            retiring_any: AtomicBool::new(false),
            journal_lock: Mutex::new(()),
            read_pool,
        });
        let committer = if inner.cfg.read_only {
            None
        } else {
            let seqs = commit::start_epoch(&inner)?;
            let i2 = inner.clone();
            Some(
                std::thread::Builder::new()
                    .name("orlop-commit".into())
                    .spawn(move || commit::run(i2, rx, seqs))
                    .map_err(|e| Error::io("committer thread", e))?,
            )
        };
        Ok(Store { inner, committer })
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.cfg
    }

    pub fn io_backend(&self) -> &'static str {
        self.inner.segments.io().name()
    }

    /// Starts a streaming write. With `expected`, the commit refuses a mismatch.
    pub fn writer(&self, expected: Option<Digest>) -> Result<BlobWriter> {
        BlobWriter::new(self.inner.clone(), expected)
    }

    /// Stores a whole in-memory blob (convenience over [`Store::writer`]).
    pub fn put(&self, data: &[u8], expected: Option<Digest>) -> Result<BlobInfo> {
        let mut w = self.writer(expected)?;
        for piece in data.chunks(1 << 20) {
            w.write(bytes::Bytes::copy_from_slice(piece))?;
        }
        w.commit()
    }

    /// A committed blob, if it is stored and whole: a blob that fsck
    /// --repair found broken (naming quarantined chunks) is reported absent,
    /// so that clients push it again, which restores it.
    pub fn stat(&self, digest: &Digest) -> Result<Option<BlobInfo>> {
        let inner = &*self.inner;
        let entry = inner.index.blob(digest)?;
        if let Some(e) = &entry {
            if inner.index.broken(digest)? && crate::read::quarantined_chunks(inner, e)? > 0 {
                return Ok(None);
            }
        }
        Ok(entry.map(|e| BlobInfo {
            digest: digest.clone(),
            size: e.size,
            chunk_count: e.chunk_count,
            refs: e.refs,
            created_unix_ms: e.created_unix_ms,
        }))
    }

    /// Calls `f` with every committed blob, in digest-key order.
    pub fn for_each_blob(&self, mut f: impl FnMut(BlobInfo) -> Result<()>) -> Result<()> {
        for kv in self.inner.index.scan(CF_BLOBS)? {
            let (k, v) = kv?;
            let e = codec::BlobEntry::decode(&v)?;
            f(BlobInfo {
                digest: Digest::from_key(&k)?,
                size: e.size,
                chunk_count: e.chunk_count,
                refs: e.refs,
                created_unix_ms: e.created_unix_ms,
            })?;
        }
        Ok(())
    }

    /// Whether a layer's column family exists in this store (a read-only
    /// open skips the ones that were never created).
    pub fn has_column_family(&self, cf: &str) -> bool {
        self.inner.index.extra_cf(cf).is_ok()
    }

    /// A streaming reader over the whole blob.
    pub fn reader(&self, digest: &Digest) -> Result<BlobReader> {
        BlobReader::new(self.inner.clone(), digest, 0, None)
    }

    /// A streaming reader over `len` bytes from `offset` (HTTP Range).
    pub fn range_reader(&self, digest: &Digest, offset: u64, len: u64) -> Result<BlobReader> {
        BlobReader::new(self.inner.clone(), digest, offset, Some(len))
    }

    /// Reads a whole blob into memory (convenience).
    pub fn get(&self, digest: &Digest) -> Result<Vec<u8>> {
        let mut r = self.reader(digest)?;
        let mut out = Vec::with_capacity(r.remaining().min(64 << 20) as usize);
        while let Some(piece) = r.next_piece()? {
            out.extend_from_slice(&piece);
        }
        Ok(out)
    }

    /// Adds one reference to a blob; returns the new count.
    pub fn add_ref(&self, digest: &Digest) -> Result<u64> {
        self.inner.segments.check_writable()?;
        self.inner.request(|reply| Request::Ref {
            digest: digest.clone(),
            add: true,
            reply,
        })
    }

    /// Drops one reference; at zero the blob becomes reclaimable.
    pub fn drop_ref(&self, digest: &Digest) -> Result<u64> {
        self.inner.segments.check_writable()?;
        self.inner.request(|reply| Request::Ref {
            digest: digest.clone(),
            add: false,
            reply,
        })
    }

    /// Every held write (a checkpointed write kept across restarts).
    pub fn held_writes(&self) -> Result<Vec<HeldWrite>> {
        Ok(self
            .inner
            .index
            .held()?
            .into_iter()
            .map(|(recipe, h)| HeldWrite {
                recipe,
                size: h.size,
                updated_unix_ms: h.updated_unix_ms,
                tag: h.tag,
            })
            .collect())
    }

    /// Continues a held write (after a restart): its bytes are re-read and
    /// verified to rebuild the digest state. Resume each at most once at a time.
    pub fn resume_writer(&self, recipe: RecipeId) -> Result<BlobWriter> {
        BlobWriter::resume(self.inner.clone(), recipe)
    }

    /// Discards a held write; its data becomes reclaimable.
    pub fn abort_held(&self, recipe: RecipeId) -> Result<()> {
        self.inner.segments.check_writable()?;
        self.inner.request(|reply| Request::Abort { recipe, reply })
    }

    /// Reads a key from a column family registered in `extra_column_families`.
    pub fn kv_get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let h = self.inner.index.extra_cf(cf)?;
        Ok(self.inner.index.db().get_cf(h, key)?)
    }

    /// Up to `limit` entries of a layer's column family whose keys start
    /// with `prefix` and sort strictly after `after` (when given), in key order.
    pub fn kv_scan(
        &self,
        cf: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let h = self.inner.index.extra_cf(cf)?;
        let start = match after {
            Some(a) if a > prefix => a,
            _ => prefix,
        };
        let mut out = Vec::new();
        let it = self.inner.index.db().iterator_cf(
            h,
            rocksdb::IteratorMode::From(start, rocksdb::Direction::Forward),
        );
        for kv in it {
            let (k, v) = kv?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            if after.is_some_and(|a| &*k <= a) {
                continue;
            }
            out.push((k.into_vec(), v.into_vec()));
        }
        Ok(out)
    }

    /// Applies a [`Txn`] atomically and durably (one synced write batch,
    /// shared with the other requests of its group commit).
    pub fn apply(&self, txn: Txn) -> Result<()> {
        self.inner.segments.check_writable()?;
        if txn.checks.is_empty() && txn.is_empty() {
            return Ok(());
        }
        // Each change must fit one journal record.
        let max = self.inner.cfg.journal_record_bytes_max();
        for op in &txn.ops {
            let n = crate::journal::change_bytes(&op.cf, &op.key, op.value.as_deref());
            if n > max {
                return Err(Error::ChangeTooLarge {
                    cf: op.cf.clone(),
                    bytes: n,
                    max,
                });
            }
        }
        self.inner.request(|reply| Request::Txn { txn, reply })
    }

    /// Applies puts (`Some`) and deletes (`None`) atomically and durably.
    pub fn kv_write(&self, cf: &str, ops: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<()> {
        let mut txn = Txn::new();
        for (k, v) in ops {
            match v {
                Some(v) => txn.put(cf, k, v),
                None => txn.delete(cf, k),
            }
        }
        self.apply(txn)
    }

    /// Shuts down cleanly: drains the committer and seals the active segment.
    pub fn close(mut self) -> Result<()> {
        self.shutdown(true)
    }

    /// Stops without sealing or syncing anything more (for crash simulation).
    pub fn abandon(mut self) {
        let _ = self.shutdown(false);
    }

    fn shutdown(&mut self, seal: bool) -> Result<()> {
        if let Some(h) = self.committer.take() {
            let _ = self.inner.commit_tx.send(Request::Shutdown);
            let _ = h.join();
            if seal {
                return self.inner.segments.seal_active();
            }
        }
        Ok(())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown(true) {
            tracing::warn!(error = %e, "store did not close cleanly");
        }
    }
}
