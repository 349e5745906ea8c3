//! `audit_refs`: the registry's rows recounted against the engine's blob
//! reference counts (run by `orlop fsck` and at the end of every server test);
//! `repair_refs`, which sets the counts to the recount (`orlop fsck
//! --repair`); and `damage_report`, which names the repositories, manifests
//! and tags that a damaged blob takes with it.

use super::codec::ManifestMeta;
use super::{split_digest_suffix, Registry, CF_LINKS, CF_MANIFESTS, CF_TAGS};
use crate::error::ApiResult;
use orlop_engine::{Digest, Txn};
use std::collections::{BTreeMap, BTreeSet};

/// Reference deltas applied per transaction by `repair_refs`.
const REPAIR_BLOBS_PER_TXN: usize = 256;

/// What the registry's rows say about blob references.
struct Recount {
    expected: BTreeMap<Digest, u64>,
    actual: BTreeMap<Digest, u64>,
    problems: Vec<String>,
}

/// Where a damaged blob is used.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlobUse {
    /// Repositories that link it.
    pub repos: BTreeSet<String>,
    /// Manifests (repository, digest) that are or need it, indexes of
    /// those included.
    pub manifests: BTreeSet<(String, Digest)>,
    /// Tags (repository, tag) on those manifests.
    pub tags: BTreeSet<(String, String)>,
}

fn split_repo(k: &[u8]) -> Option<(String, &[u8])> {
    let pos = k.iter().position(|b| *b == 0)?;
    Some((
        String::from_utf8_lossy(&k[..pos]).into_owned(),
        &k[pos + 1..],
    ))
}

impl Registry {
    fn recount(&self) -> ApiResult<Recount> {
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
        Ok(Recount {
            expected,
            actual,
            problems,
        })
    }

    /// Recomputes every blob's expected reference count from the registry's
    /// rows and lists each blob whose stored count differs.
    pub fn audit_refs(&self) -> ApiResult<Vec<String>> {
        let Recount {
            expected,
            actual,
            mut problems,
        } = self.recount()?;
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

    /// Sets every stored blob's reference count to what the registry's rows
    /// hold. Run on a store no server has open. Returns the blobs changed.
    pub fn repair_refs(&self) -> ApiResult<u64> {
        let Recount {
            expected, actual, ..
        } = self.recount()?;
        let mut fixed = 0u64;
        let mut txn = Txn::new();
        let mut in_txn = 0usize;
        for (d, have) in &actual {
            let want = expected.get(d).copied().unwrap_or(0);
            if want == *have {
                continue;
            }
            for _ in *have..want {
                txn.add_ref(d);
            }
            for _ in want..*have {
                txn.drop_ref(d);
            }
            fixed += 1;
            in_txn += 1;
            if in_txn == REPAIR_BLOBS_PER_TXN {
                self.store.apply(std::mem::take(&mut txn))?;
                in_txn = 0;
            }
        }
        if in_txn > 0 {
            self.store.apply(txn)?;
        }
        Ok(fixed)
    }

    /// For each digest, the repositories, manifests and tags that use it:
    /// links to it, manifests that are it or name it (and the indexes that
    /// name those, up the tree), and the tags on all of them.
    pub fn damage_report(&self, digests: &[Digest]) -> ApiResult<BTreeMap<Digest, BlobUse>> {
        let wanted: BTreeSet<&Digest> = digests.iter().collect();
        let mut out: BTreeMap<Digest, BlobUse> = BTreeMap::new();
        self.scan_all(CF_LINKS, |k, _| {
            if let (Some((repo, _)), Some(d)) = (split_repo(k), split_digest_suffix(k)) {
                if wanted.contains(&d) {
                    out.entry(d).or_default().repos.insert(repo);
                }
            }
        })?;
        // Each manifest row: (repo, own digest) and what it names.
        let mut rows: Vec<(String, Digest, Vec<Digest>)> = Vec::new();
        self.scan_all(CF_MANIFESTS, |k, v| {
            if let (Some((repo, _)), Some(own), Some(m)) = (
                split_repo(k),
                split_digest_suffix(k),
                ManifestMeta::decode(v),
            ) {
                let named = m.blobs.iter().chain(m.manifests.iter()).cloned().collect();
                rows.push((repo, own, named));
            }
        })?;
        for d in digests {
            let mut hit: BTreeSet<(String, Digest)> = BTreeSet::new();
            // Up the tree until nothing new: a manifest is hit when it is
            // the digest, names it, or names a manifest already hit.
            loop {
                let before = hit.len();
                for (repo, own, named) in &rows {
                    let key = (repo.clone(), own.clone());
                    if hit.contains(&key) {
                        continue;
                    }
                    if own == d
                        || named.contains(d)
                        || named
                            .iter()
                            .any(|n| hit.contains(&(repo.clone(), n.clone())))
                    {
                        hit.insert(key);
                    }
                }
                if hit.len() == before {
                    break;
                }
            }
            if !hit.is_empty() {
                out.entry(d.clone()).or_default().manifests = hit;
            }
        }
        self.scan_all(CF_TAGS, |k, v| {
            let (Some((repo, tag)), Ok(target)) = (split_repo(k), Digest::from_key(v)) else {
                return;
            };
            let key = (repo.clone(), target);
            for u in out.values_mut() {
                if u.manifests.contains(&key) {
                    u.tags
                        .insert((repo.clone(), String::from_utf8_lossy(tag).into_owned()));
                }
            }
        })?;
        for d in digests {
            out.entry(d.clone()).or_default();
        }
        Ok(out)
    }

    pub(super) fn scan_all(&self, cf: &str, f: impl FnMut(&[u8], &[u8])) -> ApiResult<()> {
        self.scan_prefix(cf, b"", f)
    }
}
