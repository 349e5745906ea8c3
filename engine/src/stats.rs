//! Space accounting for `orlop stats`.

use crate::error::Result;
use crate::ids::SegmentId;
use crate::index::codec::{BlobEntry, ChunkEntry, SegmentEntry};
use crate::index::{codec, CF_BLOBS, CF_CHUNKS, CF_SEGMENTS};
use crate::store::Store;
use std::collections::BTreeMap;

#[derive(Clone, Debug, Default)]
pub struct SegmentStats {
    pub id: SegmentId,
    pub sealed: bool,
    /// Record bytes written to the segment.
    pub data_bytes: u64,
    /// Record bytes the index still points at.
    pub live_bytes: u64,
}

impl SegmentStats {
    pub fn live_ratio(&self) -> f64 {
        let data = self
            .data_bytes
            .saturating_sub(crate::segment::format::HEADER_BYTES);
        if data == 0 {
            1.0
        } else {
            self.live_bytes as f64 / data as f64
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct StoreStats {
    pub blobs: u64,
    pub unreferenced_blobs: u64,
    pub chunks: u64,
    /// Sum of blob sizes (what clients pushed).
    pub logical_bytes: u64,
    /// Sum of distinct chunk sizes (after deduplication).
    pub unique_bytes: u64,
    /// Record bytes of distinct chunks in segments (after compression and encryption).
    pub stored_bytes: u64,
    pub compressed_chunks: u64,
    pub segments: Vec<SegmentStats>,
}

impl StoreStats {
    pub fn dedupe_ratio(&self) -> f64 {
        ratio(self.logical_bytes, self.unique_bytes)
    }
    pub fn compression_ratio(&self) -> f64 {
        ratio(self.unique_bytes, self.stored_bytes)
    }
    pub fn segment_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.data_bytes).sum()
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

impl Store {
    pub fn stats(&self) -> Result<StoreStats> {
        let index = &*self.inner().index;
        let mut st = StoreStats::default();
        for kv in index.scan(CF_BLOBS)? {
            let (_, v) = kv?;
            let e = BlobEntry::decode(&v)?;
            st.blobs += 1;
            st.logical_bytes += e.size;
            st.unreferenced_blobs += (e.refs == 0) as u64;
        }
        let mut segs: BTreeMap<SegmentId, SegmentStats> = BTreeMap::new();
        for kv in index.scan(CF_SEGMENTS)? {
            let (k, v) = kv?;
            let (Some(id), Ok(e)) = (codec::u64_be(&k), SegmentEntry::decode(&v)) else {
                continue;
            };
            let id = SegmentId(id);
            segs.insert(
                id,
                SegmentStats {
                    id,
                    sealed: e.sealed,
                    data_bytes: e.durable_len,
                    live_bytes: 0,
                },
            );
        }
        for kv in index.scan(CF_CHUNKS)? {
            let (_, v) = kv?;
            let e = ChunkEntry::decode(&v)?;
            st.chunks += 1;
            st.unique_bytes += e.loc.raw_len as u64;
            // A quarantined chunk has no record (fsck --repair).
            if e.is_quarantined() {
                continue;
            }
            st.stored_bytes += e.loc.record_len();
            st.compressed_chunks += (e.loc.flags & crate::segment::format::FLAG_ZSTD != 0) as u64;
            let s = segs.entry(e.loc.segment).or_insert(SegmentStats {
                id: e.loc.segment,
                ..Default::default()
            });
            s.live_bytes += e.loc.record_len();
        }
        st.segments = segs.into_values().collect();
        Ok(st)
    }
}
