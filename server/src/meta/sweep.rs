//! The link sweep of garbage collection (docs/ARCHITECTURE.md, "A link
//! lives while a manifest of its repository names it, or while clients use
//! it").

use super::codec::{decode_time, ManifestMeta};
use super::{now_unix_ms, rkey, Registry, CF_LINKS, CF_MANIFESTS, CF_REPOS};
use crate::error::ApiResult;
use crate::names::RepoName;
use orlop_engine::{Digest, Error as EngineError, Txn};

/// What one link sweep did.
#[derive(Clone, Debug, Default)]
pub struct SweepReport {
    /// Links scanned.
    pub links: u64,
    /// Links removed (each dropped its blob reference).
    pub removed: u64,
    /// Unused links kept: created, touched or changed within the grace period.
    pub kept_young: u64,
    /// Rows that could not be read; a repository with any is left alone.
    pub damaged: u64,
}

impl Registry {
    /// The link sweep: removes each link that no manifest of its repository
    /// names and that was not created or touched within `unused_ms`, dropping
    /// the link's reference (the engine's collector then frees the blob if
    /// that was the last). A link changed since it was read is kept.
    pub fn sweep_links(
        &self,
        unused_ms: u64,
        cancel: &std::sync::atomic::AtomicBool,
    ) -> ApiResult<SweepReport> {
        let mut rep = SweepReport::default();
        let now = now_unix_ms();
        let (repos, bad) = self.repo_names()?;
        rep.damaged += bad;
        for name in repos {
            if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            let prefix = rkey(&name, b"");
            let mut used = std::collections::HashSet::new();
            let damaged_before = rep.damaged;
            self.scan_prefix(CF_MANIFESTS, &prefix, |_, v| {
                if let Some(m) = ManifestMeta::decode(v) {
                    used.extend(m.blobs);
                } else {
                    rep.damaged += 1;
                }
            })?;
            let mut unused = Vec::new();
            self.scan_prefix(CF_LINKS, &prefix, |k, v| {
                rep.links += 1;
                let Some(d) = Digest::from_key(&k[prefix.len()..]).ok() else {
                    rep.damaged += 1;
                    return;
                };
                if used.contains(&d) {
                    return;
                }
                match decode_time(v) {
                    Some(t) if now.saturating_sub(t) >= unused_ms => {
                        unused.push((k.to_vec(), v.to_vec(), d))
                    }
                    Some(_) => rep.kept_young += 1,
                    None => rep.damaged += 1,
                }
            })?;
            if rep.damaged > damaged_before {
                // A row that cannot be read (a manifest row may name any
                // link): leave the repository alone; fsck names the row.
                continue;
            }
            for (key, cur, d) in unused {
                if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let mut t = Txn::new();
                t.expect(CF_LINKS, key.clone(), Some(cur));
                t.delete(CF_LINKS, key);
                t.drop_ref(&d);
                match self.store.apply(t) {
                    Ok(()) => rep.removed += 1,
                    Err(EngineError::Conflict { .. }) => rep.kept_young += 1,
                    // A link to a blob that is gone or already at zero
                    // references: counts disagree; fsck names it.
                    Err(e @ (EngineError::BlobUnknown(_) | EngineError::RefUnderflow(_))) => {
                        tracing::warn!(error = %e, digest = %d, "link sweep: skipping a damaged link");
                        rep.damaged += 1;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(rep)
    }

    /// Every repository's name, and how many rows held no valid name.
    fn repo_names(&self) -> ApiResult<(Vec<RepoName>, u64)> {
        let (mut names, mut bad) = (Vec::new(), 0);
        self.scan_all(CF_REPOS, |k, _| {
            match RepoName::parse(&String::from_utf8_lossy(k)) {
                Ok(n) => names.push(n),
                Err(_) => bad += 1,
            }
        })?;
        Ok((names, bad))
    }

    /// Deletes manifests that no tag and no index of their repository names
    /// and that are older than `age_ms`, except referrers (signatures,
    /// SBOMs: manifests with a subject), which stay with their subject.
    /// Children of a deleted index become candidates of a later run.
    /// Returns how many it deleted.
    pub fn expire_untagged(
        &self,
        age_ms: u64,
        cancel: &std::sync::atomic::AtomicBool,
    ) -> ApiResult<u64> {
        let now = now_unix_ms();
        let expired = |m: &ManifestMeta| {
            m.tags == 0
                && m.parents == 0
                && m.subject.is_none()
                && now.saturating_sub(m.created_unix_ms) >= age_ms
        };
        let mut deleted = 0;
        for name in self.repo_names()?.0 {
            let prefix = rkey(&name, b"");
            let mut found = Vec::new();
            self.scan_prefix(CF_MANIFESTS, &prefix, |k, v| {
                let m = ManifestMeta::decode(v);
                if let (Some(m), Ok(d)) = (m, Digest::from_key(&k[prefix.len()..])) {
                    if expired(&m) {
                        found.push(d);
                    }
                }
            })?;
            for d in found {
                if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok(deleted);
                }
                match self.delete_manifest_if(&name, &d, expired) {
                    Ok(true) => deleted += 1,
                    // Tagged, named by an index or deleted meanwhile.
                    Ok(false)
                    | Err(crate::error::ApiError::ManifestReferenced { .. })
                    | Err(crate::error::ApiError::ManifestUnknown(_)) => {}
                    // A damaged row or a hot one: the others go on.
                    Err(
                        e @ (crate::error::ApiError::Damaged(_)
                        | crate::error::ApiError::TooManyRequests(_)),
                    ) => {
                        tracing::warn!(repo = %name, digest = %d, error = %e, "untagged expiry: skipping a manifest");
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(deleted)
    }
}
