//! `audit_refs`: the registry's rows recounted against the engine's blob
//! reference counts (run by `orlop fsck` and at the end of every server test).

use super::codec::ManifestMeta;
use super::{split_digest_suffix, Registry, CF_LINKS, CF_MANIFESTS, CF_TAGS};
use crate::error::ApiResult;
use orlop_engine::Digest;
use std::collections::BTreeMap;

impl Registry {
    /// Recomputes every blob's expected reference count from the registry's
    /// rows and lists each blob whose stored count differs.
    pub fn audit_refs(&self) -> ApiResult<Vec<String>> {
        let mut expected: BTreeMap<Digest, u64> = BTreeMap::new();
        let mut bump = |d: Digest| *expected.entry(d).or_insert(0) += 1;
        let mut problems = Vec::new();
        self.scan_all(CF_LINKS, |k, _| match split_digest_suffix(k) {
            Some(d) => bump(d),
            None => problems.push(format!("bad link row {}", hex::encode(k))),
        })?;
        self.scan_all(CF_TAGS, |k, v| match Digest::from_key(v) {
            Ok(d) => bump(d),
            Err(_) => problems.push(format!("bad tag row {}", String::from_utf8_lossy(k))),
        })?;
        self.scan_all(CF_MANIFESTS, |k, v| {
            match (split_digest_suffix(k), ManifestMeta::decode(v)) {
                (Some(own), Some(m)) => {
                    for d in m.held_refs(&own) {
                        bump(d.clone());
                    }
                }
                _ => problems.push(format!("bad manifest row {}", hex::encode(k))),
            }
        })?;
        let mut actual: BTreeMap<Digest, u64> = BTreeMap::new();
        self.store.for_each_blob(|b| {
            actual.insert(b.digest, b.refs);
            Ok(())
        })?;
        for (d, want) in &expected {
            match actual.get(d) {
                None => problems.push(format!("{d}: referenced {want} times but not stored")),
                Some(have) if have != want => {
                    problems.push(format!("{d}: refcount {have}, registry rows hold {want}"))
                }
                Some(_) => {}
            }
        }
        for (d, have) in &actual {
            if *have > 0 && !expected.contains_key(d) {
                problems.push(format!("{d}: refcount {have}, registry rows hold 0"));
            }
        }
        Ok(problems)
    }

    pub(super) fn scan_all(&self, cf: &str, f: impl FnMut(&[u8], &[u8])) -> ApiResult<()> {
        self.scan_prefix(cf, b"", f)
    }
}
