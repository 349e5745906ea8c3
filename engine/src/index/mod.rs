//! The RocksDB index: chunks, blobs, recipes and segment bookkeeping.
//!
//! Only the engine opens RocksDB. Layers above add their own column families
//! through [`crate::StoreConfig::extra_column_families`] and reach them with
//! [`crate::Store::kv_get`] and friends.

pub mod codec;

use crate::error::{Error, Result};
use crate::ids::RecipeId;
use crate::ids::{ChunkId, Digest, SegmentId};
use codec::{BlobEntry, ChunkEntry, HeldEntry, SegmentEntry};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, Options, WriteBatch,
    WriteOptions, DB,
};
use std::path::Path;

pub const INDEX_FORMAT_VERSION: u32 = 1;

pub const CF_META: &str = "meta";
pub const CF_CHUNKS: &str = "chunks";
pub const CF_BLOBS: &str = "blobs";
pub const CF_RECIPES: &str = "recipes";
pub const CF_STAGED: &str = "staged";
pub const CF_PENDING: &str = "pending";
pub const CF_SEGMENTS: &str = "segments";
pub const CF_HELD: &str = "held";
pub const CF_BROKEN: &str = "broken";
const ENGINE_CFS: [&str; 9] = [
    CF_META,
    CF_CHUNKS,
    CF_BLOBS,
    CF_RECIPES,
    CF_STAGED,
    CF_PENDING,
    CF_SEGMENTS,
    CF_HELD,
    CF_BROKEN,
];

pub const META_FORMAT_VERSION: &[u8] = b"format_version";
pub const META_STORE_ID: &[u8] = b"store_id";
pub const META_KEY_CHECK: &[u8] = b"key_check";
pub const META_NEXT_SEGMENT: &[u8] = b"next_segment_id";
pub const META_NEXT_RECIPE: &[u8] = b"next_recipe_id";
pub const META_NEXT_TXN_SEQ: &[u8] = b"next_txn_seq";
/// `txn_void` ‖ from (u64 BE) → to (u64): journal numbers never applied.
pub const META_TXN_VOID_PREFIX: &[u8] = b"txn_void";

/// The write-ahead logs' total size, and so their preallocation.
const WAL_BYTES_MAX: u64 = 16 << 20;
/// RocksDB's shared block cache.
const BLOCK_CACHE_BYTES: usize = 64 << 20;
/// All column families' memtables together (RocksDB's default is 64 MiB
/// per column family, which long pushes into many families would reach).
const MEMTABLES_BYTES_MAX: usize = 64 << 20;

/// One entry of a column family, as a scan yields it: key and value.
pub type Row = (Box<[u8]>, Box<[u8]>);

pub struct Index {
    db: DB,
    read_only: bool,
    extra: Vec<String>,
    /// Whether any blob may carry a broken mark (most stores never have
    /// one, and then `broken` costs no lookup on the read path).
    broken_any: std::sync::atomic::AtomicBool,
}

fn cf_options(cache: &Cache, point_lookups: bool) -> Options {
    let mut bo = BlockBasedOptions::default();
    bo.set_block_cache(cache);
    if point_lookups {
        bo.set_bloom_filter(10.0, false);
    }
    let mut o = Options::default();
    o.set_block_based_table_factory(&bo);
    o.set_compression_type(rocksdb::DBCompressionType::None);
    o
}

impl Index {
    pub fn open(path: &Path, read_only: bool, extra: &[String]) -> Result<Self> {
        for e in extra {
            if ENGINE_CFS.contains(&e.as_str()) || e == "default" {
                return Err(Error::Config(format!(
                    "column family {e:?} is reserved by the engine"
                )));
            }
        }
        let cache = Cache::new_lru_cache(BLOCK_CACHE_BYTES);
        // No fallocate: RocksDB otherwise preallocates each WAL file to
        // 1.1 x a memtable (16 MiB on disk for a WAL holding 0.3 MiB after
        // the image corpus) and the MANIFEST to 4 MiB, disk that operators
        // see in use. Appends extend the files instead. (`allow_fallocate`
        // has no setter in the `rocksdb` crate; its options string has it.
        // This must stay the first call: it copies only RocksDB's own state
        // into new Options, so setters called before it would be lost.)
        let mut opts = Options::default().get_options_from_string("allow_fallocate=false")?;
        opts.set_manifest_preallocation_size(64 << 10);
        opts.create_if_missing(!read_only);
        opts.create_missing_column_families(!read_only);
        opts.set_max_background_jobs(2);
        opts.set_keep_log_file_num(4);
        opts.set_db_write_buffer_size(MEMTABLES_BYTES_MAX);
        // WAL files in all, at most this (they were also preallocated to
        // 1.1 x a memtable before fallocate was turned off above). Past
        // it, the oldest memtables are flushed, every ~13 GB of ingest at
        // ~80 index bytes per chunk.
        opts.set_max_total_wal_size(WAL_BYTES_MAX);
        let descs = ENGINE_CFS
            .iter()
            .map(|n| {
                ColumnFamilyDescriptor::new(
                    *n,
                    cf_options(&cache, matches!(*n, CF_CHUNKS | CF_BLOBS | CF_BROKEN)),
                )
            })
            .chain(
                extra
                    .iter()
                    .map(|n| ColumnFamilyDescriptor::new(n, cf_options(&cache, true))),
            );
        let mut extra = extra.to_vec();
        let db = if read_only {
            // A read-only open cannot create column families: skip the
            // layers' families this store never had.
            // (Stores made before `held` existed lack it too.)
            let existing = DB::list_cf(&opts, path)?;
            extra.retain(|e| existing.contains(e));
            let names: Vec<String> = ENGINE_CFS
                .iter()
                .map(|s| s.to_string())
                .filter(|s| existing.contains(s))
                .chain(extra.iter().cloned())
                .collect();
            DB::open_cf_for_read_only(&opts, path, names, false)?
        } else {
            DB::open_cf_descriptors(&opts, path, descs)?
        };
        let index = Index {
            db,
            read_only,
            extra,
            broken_any: std::sync::atomic::AtomicBool::new(true),
        };
        let any = match index.db.cf_handle(CF_BROKEN) {
            Some(cf) => index
                .db
                .iterator_cf(cf, rocksdb::IteratorMode::Start)
                .next()
                .is_some(),
            None => false,
        };
        index
            .broken_any
            .store(any, std::sync::atomic::Ordering::SeqCst);
        Ok(index)
    }

    /// Whether no column family holds an entry: a store whose creation was
    /// cut short before its first write (the meta batch) is like this.
    pub fn is_empty(&self) -> Result<bool> {
        for name in ENGINE_CFS
            .iter()
            .copied()
            .chain(self.extra.iter().map(|e| e.as_str()))
        {
            if self.scan(name)?.next().is_some() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn cf(&self, name: &str) -> Result<&ColumnFamily> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| Error::UnknownColumnFamily(name.to_string()))
    }

    /// A column family registered by a layer above the engine.
    pub fn extra_cf(&self, name: &str) -> Result<&ColumnFamily> {
        if !self.extra.iter().any(|e| e == name) {
            return Err(Error::UnknownColumnFamily(name.to_string()));
        }
        self.cf(name)
    }

    pub fn db(&self) -> &DB {
        &self.db
    }

    pub fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(cf)?, key)?)
    }

    /// Writes a batch durably (WAL synced) before returning.
    pub fn write_synced(&self, batch: WriteBatch) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        Ok(self.db.write_opt(batch, &wo)?)
    }

    /// Writes a batch without waiting for the WAL to reach disk (used for
    /// staging data that a later synced commit makes durable).
    pub fn write_unsynced(&self, batch: WriteBatch) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        Ok(self.db.write(batch)?)
    }

    pub fn meta_u64(&self, key: &[u8]) -> Result<Option<u64>> {
        match self.get(CF_META, key)? {
            None => Ok(None),
            Some(v) => <[u8; 8]>::try_from(v.as_slice())
                .map(|a| Some(u64::from_le_bytes(a)))
                .map_err(|_| Error::CorruptIndex {
                    cf: CF_META,
                    reason: format!("{} is not a u64", String::from_utf8_lossy(key)),
                }),
        }
    }

    pub fn chunk(&self, id: &ChunkId) -> Result<Option<ChunkEntry>> {
        self.get(CF_CHUNKS, &id.0)?
            .map(|v| ChunkEntry::decode(&v))
            .transpose()
    }

    pub fn blob(&self, d: &Digest) -> Result<Option<BlobEntry>> {
        self.get(CF_BLOBS, &d.to_key())?
            .map(|v| BlobEntry::decode(&v))
            .transpose()
    }

    /// Every held write (none when the store predates held writes and is
    /// open read-only).
    pub fn held(&self) -> Result<Vec<(RecipeId, HeldEntry)>> {
        if self.db.cf_handle(CF_HELD).is_none() && self.read_only {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for kv in self.scan(CF_HELD)? {
            let (k, v) = kv?;
            let id = codec::u64_be(&k).ok_or(Error::CorruptIndex {
                cf: CF_HELD,
                reason: "bad key".into(),
            })?;
            match HeldEntry::decode(&v) {
                Ok(h) => out.push((RecipeId(id), h)),
                // Damage to one entry must not block the store: the write
                // it named cannot be resumed and is discarded at open.
                Err(e) => tracing::error!(recipe = id, error = %e, "ignoring a damaged held entry"),
            }
        }
        Ok(out)
    }

    /// Whether `Store::repair` marked the blob broken (a store that
    /// predates the `broken` family, open read-only, has none).
    pub fn broken(&self, d: &Digest) -> Result<bool> {
        if !self.broken_any.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(false);
        }
        Ok(self.get(CF_BROKEN, &d.to_key())?.is_some())
    }

    /// A broken mark is about to be written (`Store::repair`).
    pub fn note_broken(&self) {
        self.broken_any
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn segment(&self, id: SegmentId) -> Result<Option<SegmentEntry>> {
        self.get(CF_SEGMENTS, &id.0.to_be_bytes())?
            .map(|v| SegmentEntry::decode(&v))
            .transpose()
    }

    /// Every entry of a column family, in key order.
    pub fn scan(&self, cf: &str) -> Result<impl Iterator<Item = Result<Row>> + '_> {
        Ok(self
            .db
            .iterator_cf(self.cf(cf)?, rocksdb::IteratorMode::Start)
            .map(|r| r.map_err(Error::from)))
    }

    /// Entries whose key starts with `prefix`, in key order.
    pub fn scan_prefix<'a>(
        &'a self,
        cf: &str,
        prefix: &'a [u8],
    ) -> Result<impl Iterator<Item = Result<Row>> + 'a> {
        Ok(self
            .db
            .iterator_cf(
                self.cf(cf)?,
                rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward),
            )
            .take_while(move |r| {
                r.as_ref()
                    .map(|(k, _)| k.starts_with(prefix))
                    .unwrap_or(true)
            })
            .map(|r| r.map_err(Error::from)))
    }
}
