//! The committer's half of the metadata journal (`crate::journal`): the
//! records of a group appended before its segment fsync, and the epochs of
//! transaction numbers.

use super::*;

/// Appends the journal records of the blobs a group commits and of its
/// transactions (numbered from `next_seq`; the next number goes into the
/// batch). True when anything was appended.
pub(super) fn append_journal(
    inner: &Inner,
    blob_records: Vec<(u8, Vec<u8>)>,
    journal: Vec<Vec<KvChange>>,
    seqs: &mut Seqs,
    batch: &mut WriteBatch,
) -> Result<bool> {
    for (kind, payload) in &blob_records {
        inner.append_meta(*kind, payload)?;
    }
    if journal.is_empty() {
        return Ok(!blob_records.is_empty());
    }
    if let Some(v) = seqs.void.take() {
        inner.append_meta(KIND_VOID, &v.encode())?;
    }
    for changes in journal {
        let seq = seqs.next;
        seqs.next += 1;
        let max = inner.cfg.journal_record_bytes_max();
        for rec in TxnRecord::split(seq, changes, max)? {
            inner.append_meta(KIND_TXN, &rec.encode())?;
        }
    }
    batch.put_cf(
        inner.index.cf(CF_META)?,
        META_NEXT_TXN_SEQ,
        seqs.next.to_le_bytes(),
    );
    Ok(true)
}

/// The committer's transaction numbering: the next number, and the void
/// record of this epoch's start, which goes into the log with the epoch's
/// first journal write.
pub(crate) struct Seqs {
    next: u64,
    void: Option<VoidRecord>,
}

/// Starts a new epoch of transaction numbers at a writable open (see
/// `VoidRecord`): records, durably in the index, the new epoch's first
/// number and the void range of numbers the last epoch may have journaled
/// without applying (past the index's next number). The log gets the void
/// record with the epoch's first journal write.
pub(crate) fn start_epoch(inner: &Inner) -> Result<Seqs> {
    let index_next = inner.index.meta_u64(META_NEXT_TXN_SEQ)?;
    let next = VoidRecord::next_epoch(index_next.unwrap_or(0));
    let void = index_next.map(|from| VoidRecord { from, to: next });
    let meta = inner.index.cf(CF_META)?;
    let mut b = WriteBatch::default();
    b.put_cf(meta, META_NEXT_TXN_SEQ, next.to_le_bytes());
    if let Some(v) = void {
        b.put_cf(meta, void_key(v.from), v.to.to_le_bytes());
    }
    inner.index.write_synced(b)?;
    Ok(Seqs { next, void })
}

/// The `meta` key of a void range starting at `from`.
pub(crate) fn void_key(from: u64) -> Vec<u8> {
    let mut k = META_TXN_VOID_PREFIX.to_vec();
    k.extend_from_slice(&from.to_be_bytes());
    k
}
