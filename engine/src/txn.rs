//! Transactions for the layers above the engine: puts and deletes in their
//! own column families, preconditions on the current values, and reference
//! deltas on blobs, applied atomically by the committer (the one mutator), so
//! that a registry's rows and the blob reference counts they imply never
//! disagree, whatever races between clients.

use crate::error::{Error, Result};
use crate::ids::Digest;
use std::collections::BTreeMap;

/// One put (`Some`) or delete (`None`) in a layer's column family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KvOp {
    pub cf: String,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// A precondition: the key's current value (after earlier requests of the
/// same group commit) must equal `value` (`None`: the key must be absent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Check {
    pub cf: String,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// An atomic change: all of it is applied, durably, or none of it.
///
/// Checks are evaluated first; a failed check yields [`Error::Conflict`] and
/// changes nothing. Reference deltas on one digest are summed; a blob that is
/// not stored, or a count that would go below zero, fails the whole
/// transaction ([`Error::BlobUnknown`], [`Error::RefUnderflow`]).
#[derive(Clone, Debug, Default)]
pub struct Txn {
    pub(crate) checks: Vec<Check>,
    pub(crate) ops: Vec<KvOp>,
    pub(crate) refs: BTreeMap<Digest, i64>,
}

impl Txn {
    pub fn new() -> Self {
        Txn::default()
    }

    /// Requires `key` to hold `value` now (`None`: to be absent).
    pub fn expect(&mut self, cf: &str, key: impl Into<Vec<u8>>, value: Option<Vec<u8>>) {
        self.checks.push(Check {
            cf: cf.to_string(),
            key: key.into(),
            value,
        });
    }

    pub fn put(&mut self, cf: &str, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(KvOp {
            cf: cf.to_string(),
            key: key.into(),
            value: Some(value.into()),
        });
    }

    pub fn delete(&mut self, cf: &str, key: impl Into<Vec<u8>>) {
        self.ops.push(KvOp {
            cf: cf.to_string(),
            key: key.into(),
            value: None,
        });
    }

    /// Adds one reference to a stored blob.
    pub fn add_ref(&mut self, digest: &Digest) {
        *self.refs.entry(digest.clone()).or_insert(0) += 1;
    }

    /// Drops one reference from a stored blob.
    pub fn drop_ref(&mut self, digest: &Digest) {
        *self.refs.entry(digest.clone()).or_insert(0) -= 1;
    }

    /// The net reference delta this transaction applies to `digest`.
    pub fn ref_delta(&self, digest: &Digest) -> i64 {
        self.refs.get(digest).copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.refs.values().all(|d| *d == 0)
    }
}

/// Applies a signed delta to a reference count.
pub(crate) fn apply_delta(digest: &Digest, refs: u64, delta: i64) -> Result<u64> {
    if delta >= 0 {
        Ok(refs.saturating_add(delta as u64))
    } else {
        refs.checked_sub(delta.unsigned_abs())
            .ok_or_else(|| Error::RefUnderflow(digest.clone()))
    }
}
