//! verify()'s check of the metadata journal (`crate::journal`): what a
//! rebuild of the index would find must be what the index holds. Every
//! blob has its blob record and every recipe part its record in the log,
//! and the transactions, replayed in sequence order, give exactly the rows
//! of the layers' column families.

use super::{Problem, VerifyReport};
use crate::error::Result;
use crate::ids::{Digest, RecipeId, SegmentId};
use crate::index::codec::{recipe_prefix, BlobEntry, Location};
use crate::index::{CF_META, CF_RECIPES, META_NEXT_TXN_SEQ, META_TXN_VOID_PREFIX};
use crate::journal::{BlobRecord, RecipeRecord, Replay, TxnRecord, VoidRecord};
use crate::read::open_any;
use crate::segment::format::{RecordHeader, KIND_BLOB, KIND_RECIPE, KIND_TXN, KIND_VOID};
use crate::store::Inner;
use std::collections::{BTreeMap, HashSet};

/// Gaps kept for a repair, of each kind, at most.
const GAPS_MAX: usize = 1 << 20;

/// What the journal lacks, for `Store::repair` to write again: blobs
/// without their records, and rows whose journaled state differs from the
/// index (the index's value, `None` where the index has no row).
#[derive(Clone, Debug, Default)]
pub(crate) struct JournalGaps {
    pub blobs: Vec<Digest>,
    pub rows: Vec<(String, Vec<u8>, Option<Vec<u8>>)>,
}

/// The journal records found in the segments.
#[derive(Default)]
pub(super) struct JournalSeen {
    blobs: HashSet<(Digest, RecipeId, u32)>,
    parts: HashSet<(RecipeId, u32)>,
    replay: Replay,
    pub records: u64,
}

impl JournalSeen {
    /// Takes one journal record (its CRC already checked).
    pub fn add(
        &mut self,
        inner: &Inner,
        segment: SegmentId,
        off: u64,
        h: &RecordHeader,
        rec: Vec<u8>,
        rep: &mut VerifyReport,
    ) {
        self.records += 1;
        let loc = Location {
            segment,
            offset: off as u32,
            payload_len: h.payload_len,
            raw_len: h.raw_len,
            flags: h.flags,
        };
        let taken = open_any(inner, &loc, rec).and_then(|(h, plain)| self.take(h.kind, &plain));
        if let Err(e) = taken {
            rep.problems.push(Problem::SegmentDamaged {
                segment,
                detail: format!("journal record at offset {off}: {e}"),
            });
        }
    }

    fn take(&mut self, kind: u8, plain: &[u8]) -> Result<()> {
        match kind {
            KIND_RECIPE => {
                let r = RecipeRecord::decode(plain)?;
                self.parts.insert((r.recipe, r.part_no));
            }
            KIND_BLOB => {
                let b = BlobRecord::decode(plain)?;
                self.blobs.insert((b.digest, b.recipe, b.parts));
            }
            KIND_TXN => self.replay.add_txn(TxnRecord::decode(plain)?),
            KIND_VOID => self.replay.add_void(VoidRecord::decode(plain)?),
            _ => {}
        }
        Ok(())
    }

    /// Compares what a rebuild would make of the journal with the index.
    pub fn check(
        mut self,
        inner: &Inner,
        blobs: &[(Digest, BlobEntry)],
        rep: &mut VerifyReport,
    ) -> Result<()> {
        let missing = |detail: String| Problem::JournalIncomplete { detail };
        for (digest, e) in blobs {
            let parts = inner
                .index
                .scan_prefix(CF_RECIPES, &recipe_prefix(e.recipe))?
                .count() as u32;
            let why = if !self.blobs.contains(&(digest.clone(), e.recipe, parts)) {
                Some(format!(
                    "blob {digest} (recipe {}, {parts} parts) has no blob record",
                    e.recipe.0
                ))
            } else {
                (0..parts)
                    .find(|p| !self.parts.contains(&(e.recipe, *p)))
                    .map(|p| {
                        format!(
                            "blob {digest}: recipe {} part {p} has no record",
                            e.recipe.0
                        )
                    })
            };
            if let Some(why) = why {
                rep.problems.push(missing(why));
                if rep.journal_gaps.blobs.len() < GAPS_MAX {
                    rep.journal_gaps.blobs.push(digest.clone());
                }
            }
        }
        // Numbers at or past the index's next one in its epoch were never
        // applied (journaled just before a crash or a failed write); the
        // next journal write voids them in the log too.
        if let Some(next) = inner.index.meta_u64(META_NEXT_TXN_SEQ)? {
            self.replay.add_void(VoidRecord {
                from: next,
                to: VoidRecord::next_epoch(next),
            });
        }
        // Earlier epochs' unapplied numbers, recorded at each open.
        for kv in inner.index.scan_prefix(CF_META, META_TXN_VOID_PREFIX)? {
            let (k, v) = kv?;
            let from = k
                .get(META_TXN_VOID_PREFIX.len()..)
                .and_then(crate::index::codec::u64_be);
            let to = <[u8; 8]>::try_from(&v[..]).ok().map(u64::from_le_bytes);
            if let (Some(from), Some(to)) = (from, to) {
                self.replay.add_void(VoidRecord { from, to });
            }
        }
        // Replay, then compare family by family.
        let mut rows: BTreeMap<(String, Vec<u8>), Vec<u8>> = BTreeMap::new();
        for (cf, key, value) in self.replay.changes().0 {
            match value {
                Some(v) => rows.insert((cf.clone(), key.clone()), v.clone()),
                None => rows.remove(&(cf.clone(), key.clone())),
            };
        }
        for cf in &inner.cfg.extra_column_families {
            let Ok(h) = inner.index.extra_cf(cf) else {
                continue;
            };
            let mut expected = rows
                .range((cf.clone(), Vec::new())..)
                .take_while(|((c, _), _)| c == cf)
                .map(|((_, k), v)| (k.as_slice(), v.as_slice()))
                .peekable();
            let mut diffs = 0u64;
            let gaps = &mut rep.journal_gaps.rows;
            let mut gap = |key: &[u8], value: Option<&[u8]>| {
                diffs += 1;
                if gaps.len() < GAPS_MAX {
                    gaps.push((cf.clone(), key.to_vec(), value.map(<[u8]>::to_vec)));
                }
            };
            for kv in inner
                .index
                .db()
                .iterator_cf(h, rocksdb::IteratorMode::Start)
            {
                let (k, v) = kv?;
                // Journal rows before this key that the family lacks.
                while let Some((ek, _)) = expected.next_if(|(ek, _)| *ek < &k[..]) {
                    gap(ek, None);
                }
                match expected.peek() {
                    Some((ek, ev)) if *ek == &k[..] => {
                        if *ev != &v[..] {
                            gap(&k, Some(&v));
                        }
                        expected.next();
                    }
                    _ => gap(&k, Some(&v)),
                }
            }
            for (ek, _) in expected {
                gap(ek, None);
            }
            if diffs > 0 {
                rep.problems.push(missing(format!(
                    "column family {cf}: {diffs} rows differ from the journal's replay"
                )));
            }
        }
        Ok(())
    }
}
