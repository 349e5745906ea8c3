//! What opening a store does before it serves: the format and key checks,
//! recovery of segments past the index's durable lengths, and dropping
//! writes that were pending at a crash.

use crate::commit;
use crate::error::{Error, Result};
use crate::ids::{RecipeId, SegmentId};
use crate::index::codec::SegmentEntry;
use crate::index::*;
use crate::io::OpenMode;
use crate::segment::format::HEADER_BYTES;
use crate::segment::{scan_unsealed, seal_file, Segments};
use rocksdb::WriteBatch;
use std::collections::HashMap;

/// Checks (or, for a new store, writes) format version, store id and key check.
/// A store whose creation was cut short (killed after RocksDB made its files,
/// before the one synced batch below) has an empty index: it is new still.
pub(super) fn check_meta(index: &Index, key_check: &[u8; 32], is_new: bool) -> Result<[u8; 16]> {
    let version = index.get(CF_META, META_FORMAT_VERSION)?;
    if version.is_none() && !index.is_read_only() && (is_new || index.is_empty()?) {
        let mut store_id = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut store_id)
            .map_err(|_| Error::Config("system random generator failed".into()))?;
        let mut b = WriteBatch::default();
        let meta = index.cf(CF_META)?;
        b.put_cf(
            meta,
            META_FORMAT_VERSION,
            INDEX_FORMAT_VERSION.to_le_bytes(),
        );
        b.put_cf(meta, META_STORE_ID, store_id);
        b.put_cf(meta, META_KEY_CHECK, key_check);
        index.write_synced(b)?;
        return Ok(store_id);
    }
    let v = version
        .as_deref()
        .and_then(|v| <[u8; 4]>::try_from(v).ok())
        .map(u32::from_le_bytes)
        .ok_or(Error::CorruptIndex {
            cf: CF_META,
            reason: "missing format version".into(),
        })?;
    if v != INDEX_FORMAT_VERSION {
        return Err(Error::FormatVersion {
            found: v,
            supported: INDEX_FORMAT_VERSION,
        });
    }
    if index.get(CF_META, META_KEY_CHECK)?.as_deref() != Some(&key_check[..]) {
        return Err(Error::WrongKey);
    }
    index
        .get(CF_META, META_STORE_ID)?
        .and_then(|v| <[u8; 16]>::try_from(v.as_slice()).ok())
        .ok_or(Error::CorruptIndex {
            cf: CF_META,
            reason: "missing store id".into(),
        })
}

/// Opens every segment file; in a writable open, truncates torn tails and
/// seals segments left unsealed by a crash (they are never appended to again).
pub(super) fn recover_segments(index: &Index, segs: &Segments, store_id: [u8; 16]) -> Result<()> {
    let ro = index.is_read_only();
    let mut known: HashMap<SegmentId, SegmentEntry> = HashMap::new();
    for kv in index.scan(CF_SEGMENTS)? {
        let (k, v) = kv?;
        let id = SegmentId(codec::u64_be(&k).ok_or(Error::CorruptIndex {
            cf: CF_SEGMENTS,
            reason: "bad key".into(),
        })?);
        known.insert(id, SegmentEntry::decode(&v)?);
    }
    let mut max_id = 0;
    let entries = std::fs::read_dir(segs.dir()).map_err(|e| Error::io(segs.dir(), e))?;
    let mut batch = WriteBatch::default();
    for ent in entries {
        let ent = ent.map_err(|e| Error::io(segs.dir(), e))?;
        let Some(id) = ent
            .file_name()
            .to_str()
            .and_then(SegmentId::parse_file_name)
        else {
            continue;
        };
        max_id = max_id.max(id.0);
        let path = ent.path();
        let mode = if ro {
            OpenMode::ReadOnly
        } else {
            OpenMode::ReadWrite
        };
        let file = segs
            .io()
            .open(&path, mode)
            .map_err(|e| Error::io(&path, e))?;
        let scan = scan_unsealed(&*file).map_err(|e| Error::io(&path, e))?;
        let durable = known.remove(&id).map(|e| e.durable_len).unwrap_or(0);
        let header = match scan.header.clone() {
            Ok(h) => h,
            // A segment created just before a crash, never committed to: nothing
            // can point into it, so a torn header only means it is empty.
            Err(reason) if durable == 0 && !ro => {
                tracing::warn!(segment = %id, %reason, "removing a segment with a torn header and no committed data");
                drop(file);
                segs.io().remove(&path).map_err(|e| Error::io(&path, e))?;
                batch.delete_cf(index.cf(CF_SEGMENTS)?, id.0.to_be_bytes());
                continue;
            }
            Err(reason) if durable == 0 => {
                tracing::warn!(segment = %id, %reason, "skipping a segment with a torn header and no committed data");
                continue;
            }
            Err(reason) => {
                return Err(Error::CorruptSegment {
                    segment: id,
                    reason,
                })
            }
        };
        let min_bytes = crate::segment::format::HEADER_BYTES + crate::segment::format::FOOTER_BYTES;
        if header.segment_bytes < min_bytes || header.segment_bytes > u32::MAX as u64 {
            return Err(Error::CorruptSegment {
                segment: id,
                reason: format!("implausible segment size {}", header.segment_bytes),
            });
        }
        if header.segment != id || header.store_id != store_id {
            return Err(Error::CorruptSegment {
                segment: id,
                reason: "header names another segment or store".into(),
            });
        }
        if scan.data_end < durable {
            if ro {
                tracing::error!(segment = %id, durable, found = scan.data_end, "segment lost acknowledged data");
                segs.register(id, file);
                continue;
            }
            return Err(Error::DurableDataLost {
                segment: id,
                durable,
                found: scan.data_end,
            });
        }
        if ro || scan.footer.is_some() {
            segs.register(id, file);
            continue;
        }
        let cf = index.cf(CF_SEGMENTS)?;
        if scan.data_end <= HEADER_BYTES {
            drop(file);
            segs.io().remove(&path).map_err(|e| Error::io(&path, e))?;
            batch.delete_cf(cf, id.0.to_be_bytes());
            tracing::info!(segment = %id, "removed an empty segment left by a crash");
            continue;
        }
        if scan.file_len > scan.data_end {
            // Up to the next 4 KiB boundary, the last sync's zero padding.
            let padded = scan.data_end.div_ceil(4096) * 4096;
            if scan.file_len > padded {
                tracing::warn!(segment = %id, torn_bytes = scan.file_len - scan.data_end, "truncating a torn segment tail");
            }
        }
        let footer = crate::segment::format::SegmentFooter {
            segment: id,
            data_end: scan.data_end,
            record_count: scan.record_count,
            data_crc: scan.data_crc,
        };
        seal_file(&*file, header.segment_bytes, &footer).map_err(|e| Error::io(&path, e))?;
        batch.put_cf(
            cf,
            id.0.to_be_bytes(),
            SegmentEntry {
                sealed: true,
                durable_len: scan.data_end,
            }
            .encode(),
        );
        segs.register(id, file);
    }
    for (id, e) in known {
        if e.durable_len > HEADER_BYTES {
            if ro {
                tracing::error!(segment = %id, "segment file is missing");
                continue;
            }
            return Err(Error::SegmentMissing(id));
        }
        if !ro {
            batch.delete_cf(index.cf(CF_SEGMENTS)?, id.0.to_be_bytes());
        }
    }
    if !ro {
        let next = index
            .meta_u64(META_NEXT_SEGMENT)?
            .unwrap_or(1)
            .max(max_id + 1);
        batch.put_cf(index.cf(CF_META)?, META_NEXT_SEGMENT, next.to_le_bytes());
        index.write_synced(batch)?;
        segs.io()
            .sync_dir(segs.dir())
            .map_err(|e| Error::io(segs.dir(), e))?;
    }
    Ok(())
}

/// Deletes the recipes and staged placements of writes that never committed,
/// except held ones (checkpointed resumable writes).
pub(super) fn drop_pending(index: &Index) -> Result<()> {
    let mut batch = WriteBatch::default();
    let mut n = 0;
    let held: std::collections::HashSet<RecipeId> =
        index.held()?.into_iter().map(|(r, _)| r).collect();
    for kv in index.scan(CF_PENDING)? {
        let (k, _) = kv?;
        let Some(r) = codec::u64_be(&k) else {
            batch.delete_cf(index.cf(CF_PENDING)?, &k);
            continue;
        };
        if held.contains(&RecipeId(r)) {
            continue;
        }
        commit::delete_staging(&mut batch, index, RecipeId(r), false)?;
        n += 1;
    }
    if n > 0 {
        index.write_synced(batch)?;
        tracing::info!(
            writes = n,
            "discarded uncommitted writes from before a restart"
        );
    }
    Ok(())
}
