//! The metadata journal: what the index holds, written into the log as well,
//! so that `orlop rebuild-index` can recreate a lost or corrupt RocksDB index
//! from the segments alone (docs/format.md, "Metadata records").
//!
//! - A *recipe part* record (kind 2) and a *blob* record (kind 3) are
//!   appended by a writer when it commits, after its digest check: the
//!   blob's whole recipe, then its digest, size and recipe id. The
//!   committer's segment fsync makes them durable before the index batch
//!   that makes the blob visible.
//! - A *transaction* record (kind 4) holds the puts and deletes of one
//!   [`crate::Txn`] in a layer's column families, with a sequence number
//!   the committer assigns (`meta` key `next_txn_seq`). The committer appends
//!   it before the group's segment fsync and index batch. A transaction too
//!   large for one record is split into parts; a rebuild replays it only
//!   when every part is there.
//!
//! Payloads are encrypted like chunks (the record's id is the keyed BLAKE3
//! of the plaintext). All integers little-endian.

use crate::error::{Error, Result};
use crate::ids::{Digest, RecipeId};
use crate::index::codec::{recipe_key, BlobEntry, RecipePart};
use crate::index::CF_RECIPES;
use crate::segment::format::{le_u32, le_u64, KIND_BLOB, KIND_RECIPE, KIND_TXN, KIND_VOID};
use crate::store::Inner;
use std::collections::BTreeMap;

/// Journal records are at most this large, or the largest chunk if that
/// is larger (`StoreConfig::journal_record_bytes_max`), so that every
/// record fits a segment (`StoreConfig::validate`); a larger transaction
/// is split.
pub const JOURNAL_RECORD_BYTES_MIN: usize = 40 * 1024;

/// Bytes of a transaction record besides its changes.
const TXN_RECORD_OVERHEAD: usize = 16;

/// The journal bytes of one change, as [`TxnRecord::split`] counts them.
pub(crate) fn change_bytes(cf: &str, key: &[u8], value: Option<&[u8]>) -> usize {
    TXN_RECORD_OVERHEAD + 1 + cf.len() + 4 + key.len() + 1 + value.map_or(0, |v| 4 + v.len())
}

fn bad(what: &str) -> Error {
    Error::CorruptIndex {
        cf: "journal",
        reason: format!("malformed {what} record"),
    }
}

/// A committed blob's recipe part, as the index holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RecipeRecord {
    pub recipe: RecipeId,
    pub part_no: u32,
    pub part: RecipePart,
}

impl RecipeRecord {
    pub fn encode(&self) -> Vec<u8> {
        let part = self.part.encode();
        let mut v = Vec::with_capacity(12 + part.len());
        v.extend_from_slice(&self.recipe.0.to_le_bytes());
        v.extend_from_slice(&self.part_no.to_le_bytes());
        v.extend_from_slice(&part);
        v
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() < 12 {
            return Err(bad("recipe"));
        }
        Ok(RecipeRecord {
            recipe: RecipeId(le_u64(b, 0)),
            part_no: le_u32(b, 8),
            part: RecipePart::decode(&b[12..])?,
        })
    }
}

/// A committed blob: its digest and the recipe that holds its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BlobRecord {
    pub digest: Digest,
    pub size: u64,
    pub recipe: RecipeId,
    pub chunk_count: u64,
    pub parts: u32,
    pub created_unix_ms: u64,
}

impl BlobRecord {
    pub fn encode(&self) -> Vec<u8> {
        let key = self.digest.to_key();
        let mut v = Vec::with_capacity(1 + key.len() + 36);
        v.push(key.len() as u8);
        v.extend_from_slice(&key);
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&self.recipe.0.to_le_bytes());
        v.extend_from_slice(&self.chunk_count.to_le_bytes());
        v.extend_from_slice(&self.parts.to_le_bytes());
        v.extend_from_slice(&self.created_unix_ms.to_le_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let n = *b.first().ok_or_else(|| bad("blob"))? as usize;
        if b.len() != 1 + n + 36 {
            return Err(bad("blob"));
        }
        let digest = Digest::from_key(&b[1..1 + n])?;
        let r = &b[1 + n..];
        Ok(BlobRecord {
            digest,
            size: le_u64(r, 0),
            recipe: RecipeId(le_u64(r, 8)),
            chunk_count: le_u64(r, 16),
            parts: le_u32(r, 24),
            created_unix_ms: le_u64(r, 28),
        })
    }
}

/// Transaction numbers `from..to` that were never applied. The committer
/// numbers transactions in *epochs*: each writable open starts a new one
/// (the number's high 32 bits). At open, before any transaction, a void
/// record from the index's next number to the new epoch's first is made
/// durable, then the new epoch's first number is recorded in the index: a
/// transaction journaled just before a crash or a failed index write (its
/// record is in the log, its change never reached the index) is voided and
/// its number never used again. Within an epoch the index's next number
/// marks where the unapplied ones begin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct VoidRecord {
    pub from: u64,
    pub to: u64,
}

impl VoidRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(&self.from.to_le_bytes());
        v.extend_from_slice(&self.to.to_le_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != 16 {
            return Err(bad("void"));
        }
        Ok(VoidRecord {
            from: le_u64(b, 0),
            to: le_u64(b, 8),
        })
    }

    /// The first number of the epoch after the one `next` is in.
    pub fn next_epoch(next: u64) -> u64 {
        ((next >> 32) + 1) << 32
    }
}

/// Transactions gathered from the journal, replayable in order.
#[derive(Default)]
pub(crate) struct Replay {
    txns: BTreeMap<u64, Vec<Option<Vec<KvChange>>>>,
    voids: Vec<VoidRecord>,
}

impl Replay {
    pub fn add_txn(&mut self, t: TxnRecord) {
        let slots = self
            .txns
            .entry(t.seq)
            .or_insert_with(|| vec![None; t.parts as usize]);
        if let Some(s) = slots.get_mut(t.part as usize) {
            *s = Some(t.ops);
        }
    }

    pub fn add_void(&mut self, v: VoidRecord) {
        self.voids.push(v);
    }

    /// The highest transaction number seen (voided ones included).
    pub fn max_seq(&self) -> u64 {
        let t = self.txns.keys().next_back().copied().unwrap_or(0);
        let v = self
            .voids
            .iter()
            .map(|v| v.to.saturating_sub(1))
            .max()
            .unwrap_or(0);
        t.max(v)
    }

    /// The changes of every transaction that was applied (not voided), in
    /// order; the transactions replayed, and how many of them had parts
    /// that compaction dropped (their changes were all overwritten later,
    /// so the parts that remain are replayed alone).
    pub fn changes(&self) -> (Vec<&KvChange>, u64, u64) {
        let (mut out, mut applied, mut partial) = (Vec::new(), 0u64, 0u64);
        for (seq, parts) in &self.txns {
            if self.voids.iter().any(|v| (v.from..v.to).contains(seq)) {
                continue;
            }
            if parts.iter().any(Option::is_none) {
                partial += 1;
            }
            applied += 1;
            out.extend(parts.iter().flatten().flatten());
        }
        (out, applied, partial)
    }
}

/// One put (`Some`) or delete (`None`).
pub(crate) type KvChange = (String, Vec<u8>, Option<Vec<u8>>);

/// Part `part` of `parts` of the transaction numbered `seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TxnRecord {
    pub seq: u64,
    pub part: u16,
    pub parts: u16,
    pub ops: Vec<KvChange>,
}

fn op_bytes((cf, key, value): &KvChange) -> usize {
    change_bytes(cf, key, value.as_deref()) - TXN_RECORD_OVERHEAD
}

impl TxnRecord {
    /// Splits a transaction's changes into records of at most
    /// `record_bytes_max` (a single larger change gets a record of its own:
    /// `Store::apply` refuses those first). At most 65,535 parts.
    pub fn split(seq: u64, ops: Vec<KvChange>, record_bytes_max: usize) -> Result<Vec<TxnRecord>> {
        let room = record_bytes_max.saturating_sub(TXN_RECORD_OVERHEAD);
        let mut out: Vec<Vec<KvChange>> = vec![Vec::new()];
        let mut bytes = 0usize;
        for op in ops {
            let n = op_bytes(&op);
            if bytes + n > room && out.last().is_some_and(|l| !l.is_empty()) {
                out.push(Vec::new());
                bytes = 0;
            }
            bytes += n;
            if let Some(l) = out.last_mut() {
                l.push(op);
            }
        }
        let parts = u16::try_from(out.len())
            .map_err(|_| Error::Config("a transaction is too large for the journal".into()))?;
        Ok(out
            .into_iter()
            .enumerate()
            .map(|(i, ops)| TxnRecord {
                seq,
                part: i as u16,
                parts,
                ops,
            })
            .collect())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + self.ops.iter().map(op_bytes).sum::<usize>());
        v.extend_from_slice(&self.seq.to_le_bytes());
        v.extend_from_slice(&self.part.to_le_bytes());
        v.extend_from_slice(&self.parts.to_le_bytes());
        v.extend_from_slice(&(self.ops.len() as u32).to_le_bytes());
        for (cf, key, value) in &self.ops {
            v.push(cf.len() as u8);
            v.extend_from_slice(cf.as_bytes());
            v.extend_from_slice(&(key.len() as u32).to_le_bytes());
            v.extend_from_slice(key);
            match value {
                Some(val) => {
                    v.push(1);
                    v.extend_from_slice(&(val.len() as u32).to_le_bytes());
                    v.extend_from_slice(val);
                }
                None => v.push(0),
            }
        }
        v
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let mut r = Reader { b, at: 0 };
        let seq = r.u64()?;
        let part = r.u16()?;
        let parts = r.u16()?;
        let n = r.u32()? as usize;
        if part >= parts {
            return Err(bad("transaction"));
        }
        let mut ops = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            let cf_len = r.take(1)?[0] as usize;
            let cf = String::from_utf8(r.take(cf_len)?.to_vec()).map_err(|_| bad("transaction"))?;
            let key_len = r.u32()? as usize;
            let key = r.take(key_len)?.to_vec();
            let value = match r.take(1)?[0] {
                0 => None,
                1 => {
                    let n = r.u32()? as usize;
                    Some(r.take(n)?.to_vec())
                }
                _ => return Err(bad("transaction")),
            };
            ops.push((cf, key, value));
        }
        if r.at != b.len() {
            return Err(bad("transaction"));
        }
        Ok(TxnRecord {
            seq,
            part,
            parts,
            ops,
        })
    }
}

/// The journal records of a committed blob, made again from the index
/// (a repair writes them for a blob whose records were lost to damage).
pub(crate) fn blob_records(
    inner: &Inner,
    digest: &Digest,
    entry: &BlobEntry,
) -> Result<Vec<(u8, Vec<u8>)>> {
    let mut out = Vec::new();
    for part in crate::read::recipe_parts(inner, entry) {
        let rec = RecipeRecord {
            recipe: entry.recipe,
            part_no: out.len() as u32,
            part: part?,
        };
        out.push((KIND_RECIPE, rec.encode()));
    }
    let blob = BlobRecord {
        digest: digest.clone(),
        size: entry.size,
        recipe: entry.recipe,
        chunk_count: entry.chunk_count,
        parts: out.len() as u32,
        created_unix_ms: entry.created_unix_ms,
    };
    out.push((KIND_BLOB, blob.encode()));
    Ok(out)
}

/// Whether a journal record still describes the index, so that compaction
/// must keep it: a recipe part the index holds as it is, the blob record of
/// the recipe its blob entry names, a transaction with a change that is the
/// key's current state (a put of the value it holds, a delete of a key that
/// is absent). A transaction none of whose changes is current was
/// overwritten, key by key, by later transactions, which are kept (each
/// key's latest change is always current), so replaying what is kept in
/// sequence order still yields every key's current state.
pub(crate) fn is_live(inner: &Inner, kind: u8, plain: &[u8]) -> Result<bool> {
    let index = &*inner.index;
    match kind {
        KIND_RECIPE => {
            let r = RecipeRecord::decode(plain)?;
            let cur = index.get(CF_RECIPES, &recipe_key(r.recipe, r.part_no))?;
            Ok(cur.as_deref() == Some(&r.part.encode()[..]))
        }
        KIND_BLOB => {
            let b = BlobRecord::decode(plain)?;
            Ok(index.blob(&b.digest)?.is_some_and(|e| e.recipe == b.recipe))
        }
        // Kept for as long as the store: one small record per epoch.
        KIND_VOID => Ok(true),
        KIND_TXN => {
            let t = TxnRecord::decode(plain)?;
            for (cf, key, value) in &t.ops {
                let cur = match index.extra_cf(cf) {
                    Ok(h) => index.db().get_cf(h, key)?,
                    // A family the layers above no longer open.
                    Err(_) => continue,
                };
                if cur == *value {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        _ => Ok(false),
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or_else(|| bad("transaction"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(le_u32(self.take(4)?, 0))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(le_u64(self.take(8)?, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ChunkId;
    use crate::index::codec::RecipeEntry;

    #[test]
    fn records_roundtrip_and_refuse_garbage() {
        let r = RecipeRecord {
            recipe: RecipeId(42),
            part_no: 3,
            part: RecipePart {
                start: 1000,
                entries: vec![RecipeEntry {
                    chunk: ChunkId([9; 32]),
                    raw_len: 77,
                }],
            },
        };
        assert_eq!(RecipeRecord::decode(&r.encode()).ok(), Some(r));
        let d: Digest = format!("sha256:{}", "ab".repeat(32))
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let b = BlobRecord {
            digest: d,
            size: 5,
            recipe: RecipeId(42),
            chunk_count: 1,
            parts: 1,
            created_unix_ms: 123,
        };
        assert_eq!(BlobRecord::decode(&b.encode()).ok(), Some(b.clone()));
        assert!(BlobRecord::decode(&b.encode()[..10]).is_err());
        let ops = vec![
            (
                "reg_tags".to_string(),
                b"a\0v1".to_vec(),
                Some(vec![1, 2, 3]),
            ),
            ("reg_links".to_string(), b"a\0x".to_vec(), None),
        ];
        let recs = TxnRecord::split(7, ops.clone(), JOURNAL_RECORD_BYTES_MIN)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(recs.len(), 1);
        let enc = recs[0].encode();
        let dec = TxnRecord::decode(&enc).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((dec.seq, dec.part, dec.parts), (7, 0, 1));
        assert_eq!(dec.ops, ops);
        assert!(TxnRecord::decode(&enc[..enc.len() - 1]).is_err());
        let big: Vec<KvChange> = (0..100u32)
            .map(|i| {
                (
                    "cf".to_string(),
                    i.to_le_bytes().to_vec(),
                    Some(vec![0; 4000]),
                )
            })
            .collect();
        let recs =
            TxnRecord::split(8, big, JOURNAL_RECORD_BYTES_MIN).unwrap_or_else(|e| panic!("{e}"));
        assert!(recs.len() >= 10);
        assert!(recs
            .iter()
            .all(|r| r.encode().len() <= JOURNAL_RECORD_BYTES_MIN));
        assert_eq!(recs.iter().map(|r| r.ops.len()).sum::<usize>(), 100);
    }
}
