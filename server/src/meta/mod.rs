//! The registry's metadata: repositories, blob links, manifests, tags and
//! referrers, kept in the server's own column families through the engine's
//! kv API. Every change is one engine [`Txn`] whose preconditions re-check
//! what the change was decided on, so that concurrent clients cannot make
//! rows and blob reference counts disagree.
//!
//! Reference rule (docs/ARCHITECTURE.md): a link holds one reference on its
//! blob; a manifest row holds one on the manifest itself, one on each
//! distinct blob and one on each distinct child manifest it names; a tag
//! holds one on its manifest. A subject holds none.

mod audit;
pub mod codec;
mod sweep;
#[cfg(test)]
mod tests;

pub use audit::BlobUse;
pub use sweep::SweepReport;

use crate::error::{ApiError, ApiResult};
use crate::names::{RepoName, Tag};
pub use codec::ManifestMeta;
use codec::{decode_time, encode_time};
use orlop_engine::{Digest, Error as EngineError, Store, Txn};
use std::collections::BTreeMap;
use std::sync::Arc;

pub const CF_REPOS: &str = "reg_repos";
pub const CF_LINKS: &str = "reg_links";
pub const CF_MANIFESTS: &str = "reg_manifests";
pub const CF_TAGS: &str = "reg_tags";
pub const CF_REFERRERS: &str = "reg_referrers";
pub const CF_CHILDREN: &str = "reg_children";
pub const REGISTRY_CFS: [&str; 6] = [
    CF_REPOS,
    CF_LINKS,
    CF_MANIFESTS,
    CF_TAGS,
    CF_REFERRERS,
    CF_CHILDREN,
];

/// Retries of a transaction whose precondition lost a race.
const CONFLICT_RETRIES_MAX: usize = 32;

/// `repo 0x00 suffix`: names cannot contain 0x00, so one repository's rows
/// never share a prefix with another's.
fn rkey(repo: &RepoName, suffix: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(repo.as_str().len() + 1 + suffix.len());
    k.extend_from_slice(repo.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(suffix);
    k
}

fn cat(a: &[u8], b: &[u8]) -> Vec<u8> {
    [a, b].concat()
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A manifest about to be recorded: its row plus what the checks need.
pub struct NewManifest {
    pub digest: Digest,
    pub meta: ManifestMeta,
    /// (digest, size) of each distinct blob, checked against the store
    /// (schema 1 manifests give no sizes).
    pub blob_sizes: Vec<(Digest, Option<u64>)>,
    /// (digest, size) of each distinct child manifest.
    pub child_sizes: Vec<(Digest, u64)>,
    /// The referrer descriptor (JSON) stored under the subject, if any.
    pub referrer: Option<Vec<u8>>,
}

#[derive(Clone)]
pub struct Registry {
    store: Arc<Store>,
    /// A link is renewed (its time rewritten) only once it is this old:
    /// half the collection's grace, so that pushes naming shared layers do
    /// not all rewrite (and contend on) the same rows. 0: always.
    link_touch_after_ms: u64,
}

impl Registry {
    pub fn new(store: Arc<Store>) -> Self {
        Registry {
            store,
            link_touch_after_ms: 0,
        }
    }

    /// Renews links only once they are `ms` old (see the field). The link
    /// sweep removes a link only after 1.5 x the grace, so with `ms` at
    /// most half the grace a link younger than `ms` cannot be swept
    /// before the request that found it completes.
    pub fn with_link_touch_after_ms(mut self, ms: u64) -> Self {
        self.link_touch_after_ms = ms;
        self
    }

    pub fn link_touch_after_ms(&self) -> u64 {
        self.link_touch_after_ms
    }

    /// Whether a link's time value is old enough to be renewed.
    fn link_is_old(&self, cur: &[u8]) -> bool {
        decode_time(cur).is_none_or(|t| now_unix_ms().saturating_sub(t) >= self.link_touch_after_ms)
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn get(&self, cf: &str, key: &[u8]) -> ApiResult<Option<Vec<u8>>> {
        Ok(self.store.kv_get(cf, key)?)
    }

    /// Runs `build` until its transaction applies without a conflict.
    fn retry(&self, mut build: impl FnMut() -> ApiResult<Option<Txn>>) -> ApiResult<()> {
        for _ in 0..CONFLICT_RETRIES_MAX {
            let Some(txn) = build()? else { return Ok(()) };
            match self.store.apply(txn) {
                Ok(()) => return Ok(()),
                Err(EngineError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::TooManyRequests(
            "too many concurrent changes to the same rows; retry".into(),
        ))
    }

    fn ensure_repo(&self, txn: &mut Txn, repo: &RepoName) -> ApiResult<()> {
        if self.get(CF_REPOS, repo.as_str().as_bytes())?.is_none() {
            txn.put(CF_REPOS, repo.as_str(), encode_time(now_unix_ms()));
        }
        Ok(())
    }

    pub fn repo_exists(&self, repo: &RepoName) -> ApiResult<bool> {
        Ok(self.get(CF_REPOS, repo.as_str().as_bytes())?.is_some())
    }

    pub fn blob_linked(&self, repo: &RepoName, d: &Digest) -> ApiResult<bool> {
        Ok(self.get(CF_LINKS, &rkey(repo, &d.to_key()))?.is_some())
    }

    /// Whether `repo` links the blob; a link found is also *touched* (its
    /// time renewed) when older than `touch_after_ms`, because the client
    /// has just been told the blob exists and may name it in a manifest
    /// next: the link sweep spares links touched within its grace period.
    pub fn blob_linked_touch(
        &self,
        repo: &RepoName,
        d: &Digest,
        touch_after_ms: u64,
    ) -> ApiResult<bool> {
        let key = rkey(repo, &d.to_key());
        let Some(cur) = self.get(CF_LINKS, &key)? else {
            return Ok(false);
        };
        let now = now_unix_ms();
        let old = decode_time(&cur).is_some_and(|t| now.saturating_sub(t) >= touch_after_ms);
        if old {
            let mut t = Txn::new();
            Self::touch_link(&mut t, key, cur);
            match self.store.apply(t) {
                // A concurrent touch or unlink won; either way the answer
                // below is read again.
                Ok(()) | Err(EngineError::Conflict { .. }) => {}
                // Best effort: a store that refuses writes still serves reads.
                Err(e) => tracing::warn!(error = %e, "could not renew a blob link"),
            }
            return self.blob_linked(repo, d);
        }
        Ok(true)
    }

    /// Links a stored blob into a repository (idempotent; an existing link
    /// is touched); the link holds a reference.
    pub fn link_blob(&self, repo: &RepoName, d: &Digest) -> ApiResult<()> {
        let key = rkey(repo, &d.to_key());
        self.retry(|| {
            if let Some(cur) = self.get(CF_LINKS, &key)? {
                // Young links stay as they are (see `link_touch_after_ms`).
                if !self.link_is_old(&cur) {
                    return Ok(None);
                }
                let mut t = Txn::new();
                Self::touch_link(&mut t, key.clone(), cur);
                return Ok(Some(t));
            }
            let mut t = Txn::new();
            t.expect(CF_LINKS, key.clone(), None);
            t.put(CF_LINKS, key.clone(), encode_time(now_unix_ms()));
            t.add_ref(d);
            self.ensure_repo(&mut t, repo)?;
            Ok(Some(t))
        })
    }

    /// Removes a blob's link; false when it was not linked.
    pub fn unlink_blob(&self, repo: &RepoName, d: &Digest) -> ApiResult<bool> {
        let key = rkey(repo, &d.to_key());
        let mut found = false;
        self.retry(|| {
            let Some(cur) = self.get(CF_LINKS, &key)? else {
                found = false;
                return Ok(None);
            };
            found = true;
            let mut t = Txn::new();
            t.expect(CF_LINKS, key.clone(), Some(cur));
            t.delete(CF_LINKS, key.clone());
            t.drop_ref(d);
            Ok(Some(t))
        })?;
        Ok(found)
    }

    pub fn manifest(&self, repo: &RepoName, d: &Digest) -> ApiResult<Option<ManifestMeta>> {
        match self.get(CF_MANIFESTS, &rkey(repo, &d.to_key()))? {
            None => Ok(None),
            Some(v) => ManifestMeta::decode(&v)
                .map(Some)
                .ok_or_else(|| ApiError::Damaged(format!("manifest row of {repo}@{d}"))),
        }
    }

    pub fn tag(&self, repo: &RepoName, tag: &Tag) -> ApiResult<Option<Digest>> {
        match self.get(CF_TAGS, &rkey(repo, tag.as_str().as_bytes()))? {
            None => Ok(None),
            Some(v) => Digest::from_key(&v)
                .map(Some)
                .map_err(|_| ApiError::Damaged(format!("tag row {repo}:{tag}"))),
        }
    }

    /// Records a manifest (if new) and points `tag` at it (if given).
    pub fn put_manifest(
        &self,
        repo: &RepoName,
        m: &NewManifest,
        tag: Option<&Tag>,
    ) -> ApiResult<()> {
        self.retry(|| {
            let mut t = Txn::new();
            let mut rows = Rows::new(self, repo);
            match rows.get(&m.digest)? {
                None => self.add_manifest_rows(&mut t, &mut rows, repo, m)?,
                // Pushed again: untagged expiry's age counts from now, and an
                // expiry that read the old row conflicts.
                Some(row) => {
                    row.created_unix_ms = now_unix_ms().max(row.created_unix_ms.saturating_add(1))
                }
            }
            if let Some(tag) = tag {
                let tkey = rkey(repo, tag.as_str().as_bytes());
                let tcur = self.get(CF_TAGS, &tkey)?;
                let old = tcur.as_deref().and_then(|v| Digest::from_key(v).ok());
                if old.as_ref() != Some(&m.digest) {
                    t.expect(CF_TAGS, tkey.clone(), tcur);
                    t.put(CF_TAGS, tkey, m.digest.to_key());
                    t.add_ref(&m.digest);
                    if let Some(row) = rows.get(&m.digest)? {
                        row.tags = row.tags.saturating_add(1);
                    }
                    if let Some(old) = old {
                        t.drop_ref(&old);
                        if let Some(row) = rows.get(&old)? {
                            row.tags = row.tags.saturating_sub(1);
                        }
                    }
                }
            }
            rows.write(&mut t);
            self.ensure_repo(&mut t, repo)?;
            Ok(Some(t))
        })
        .map_err(|e| match e {
            // A blob the checks found, collected before the transaction
            // applied (it had no references left): the manifest names
            // missing content.
            ApiError::BlobUnknown(d) if d != m.digest => ApiError::ManifestBlobUnknown(d),
            e => e,
        })
    }

    fn decode_manifest(&self, repo: &RepoName, d: &Digest, v: &[u8]) -> ApiResult<ManifestMeta> {
        ManifestMeta::decode(v)
            .ok_or_else(|| ApiError::Damaged(format!("manifest row of {repo}@{d}")))
    }

    /// A blob a manifest names must be stored, with the size its
    /// descriptor gives (schema 1 gives none).
    pub fn check_blob(&self, d: &Digest, size: Option<u64>) -> ApiResult<()> {
        let stored = self
            .store
            .stat(d)?
            .ok_or_else(|| ApiError::ManifestBlobUnknown(d.clone()))?;
        match size.filter(|s| *s != stored.size) {
            Some(size) => Err(ApiError::ManifestInvalid(format!(
                "descriptor of {d} says {size} bytes, the blob has {}",
                stored.size
            ))),
            None => Ok(()),
        }
    }

    /// The references and rows a new manifest adds.
    fn add_manifest_rows(
        &self,
        t: &mut Txn,
        rows: &mut Rows<'_>,
        repo: &RepoName,
        m: &NewManifest,
    ) -> ApiResult<()> {
        rows.create(&m.digest, m.meta.clone());
        t.add_ref(&m.digest);
        for (d, size) in &m.blob_sizes {
            self.check_blob(d, *size)?;
            let lkey = rkey(repo, &d.to_key());
            match self.get(CF_LINKS, &lkey)? {
                // Keep the link in place until this manifest holds its own
                // reference, and touch it: a link sweep that read the old
                // value (before this manifest existed) then conflicts.
                Some(cur) if self.link_is_old(&cur) => Self::touch_link(t, lkey, cur),
                // Young: no sweep can take it before this transaction
                // applies, and concurrent pushes of images that share the
                // layer do not contend on its row.
                Some(_) => {}
                // A blob the registry holds in another repository: link it here too.
                None => {
                    t.expect(CF_LINKS, lkey.clone(), None);
                    t.put(CF_LINKS, lkey, encode_time(now_unix_ms()));
                    t.add_ref(d);
                }
            }
            t.add_ref(d);
        }
        for (d, size) in &m.child_sizes {
            let child = rows.get(d)?;
            let child = check_child(child, d, *size)?;
            child.parents = child.parents.saturating_add(1);
            t.put(
                CF_CHILDREN,
                rkey(repo, &cat(&d.to_key(), &m.digest.to_key())),
                Vec::new(),
            );
            t.add_ref(d);
        }
        if let (Some(subject), Some(desc)) = (&m.meta.subject, &m.referrer) {
            t.put(
                CF_REFERRERS,
                rkey(repo, &cat(&subject.to_key(), &m.digest.to_key())),
                desc.clone(),
            );
        }
        Ok(())
    }

    /// Deletes a manifest, every tag that points at it, and its referrer row.
    pub fn delete_manifest(&self, repo: &RepoName, d: &Digest) -> ApiResult<()> {
        self.delete_manifest_if(repo, d, |_| true).map(|_| ())
    }

    /// Deletes a manifest as [`Registry::delete_manifest`] does, but only if
    /// `keep_going` holds for its row as read; the transaction expects that
    /// row, so a tag added meanwhile (the row counts its tags) stops it.
    /// Returns whether it deleted.
    pub fn delete_manifest_if(
        &self,
        repo: &RepoName,
        d: &Digest,
        keep_going: impl Fn(&ManifestMeta) -> bool,
    ) -> ApiResult<bool> {
        let mkey = rkey(repo, &d.to_key());
        let dkey = d.to_key();
        let mut deleted = false;
        self.retry(|| {
            deleted = false;
            let cur = self
                .get(CF_MANIFESTS, &mkey)?
                .ok_or_else(|| ApiError::ManifestUnknown(d.to_string()))?;
            let meta = ManifestMeta::decode(&cur)
                .ok_or_else(|| ApiError::Damaged(format!("manifest row of {repo}@{d}")))?;
            if !keep_going(&meta) {
                return Ok(None);
            }
            if meta.parents > 0 {
                let parent = self
                    .store
                    .kv_scan(CF_CHILDREN, &rkey(repo, &dkey), None, 1)?
                    .first()
                    .and_then(|(k, _)| Digest::from_key(&k[mkey.len()..]).ok())
                    .unwrap_or_else(|| d.clone());
                return Err(ApiError::ManifestReferenced { parent });
            }
            let mut t = Txn::new();
            t.expect(CF_MANIFESTS, mkey.clone(), Some(cur));
            t.delete(CF_MANIFESTS, mkey.clone());
            for held in meta.held_refs(d) {
                t.drop_ref(held);
            }
            for child in &meta.manifests {
                self.release_child(&mut t, repo, child, d)?;
            }
            if let Some(subject) = &meta.subject {
                t.delete(CF_REFERRERS, rkey(repo, &cat(&subject.to_key(), &dkey)));
            }
            for (tkey, value) in self.tags_pointing_at(repo, d)? {
                t.expect(CF_TAGS, tkey.clone(), Some(value));
                t.delete(CF_TAGS, tkey);
                t.drop_ref(d);
            }
            deleted = true;
            Ok(Some(t))
        })?;
        Ok(deleted)
    }

    fn release_child(
        &self,
        t: &mut Txn,
        repo: &RepoName,
        child: &Digest,
        parent: &Digest,
    ) -> ApiResult<()> {
        let ckey = rkey(repo, &child.to_key());
        t.delete(
            CF_CHILDREN,
            rkey(repo, &cat(&child.to_key(), &parent.to_key())),
        );
        let Some(cur) = self.get(CF_MANIFESTS, &ckey)? else {
            return Ok(());
        };
        let mut meta = ManifestMeta::decode(&cur)
            .ok_or_else(|| ApiError::Damaged(format!("manifest row of {repo}@{child}")))?;
        meta.parents = meta.parents.saturating_sub(1);
        t.expect(CF_MANIFESTS, ckey.clone(), Some(cur));
        t.put(CF_MANIFESTS, ckey, meta.encode());
        Ok(())
    }

    fn tags_pointing_at(&self, repo: &RepoName, d: &Digest) -> ApiResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let want = d.to_key();
        let mut out = Vec::new();
        self.scan_prefix(CF_TAGS, &rkey(repo, b""), |k, v| {
            if *v == want {
                out.push((k.to_vec(), v.to_vec()));
            }
        })?;
        Ok(out)
    }

    /// Calls `f` on every row of `cf` whose key starts with `prefix`, in
    /// key order, reading pages of bounded size.
    fn scan_prefix(
        &self,
        cf: &str,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]),
    ) -> ApiResult<()> {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.store.kv_scan(cf, prefix, after.as_deref(), 4096)?;
            let Some((last, _)) = page.last() else {
                return Ok(());
            };
            after = Some(last.clone());
            for (k, v) in &page {
                f(k, v);
            }
        }
    }

    /// Renews a link's time in `t`, expecting the value `cur` it was read with.
    fn touch_link(t: &mut Txn, key: Vec<u8>, cur: Vec<u8>) {
        t.expect(CF_LINKS, key.clone(), Some(cur));
        t.put(CF_LINKS, key, encode_time(now_unix_ms()));
    }

    /// Removes one tag; false when the tag did not exist.
    pub fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> ApiResult<bool> {
        let tkey = rkey(repo, tag.as_str().as_bytes());
        let mut found = false;
        self.retry(|| {
            let Some(cur) = self.get(CF_TAGS, &tkey)? else {
                found = false;
                return Ok(None);
            };
            found = true;
            let d = Digest::from_key(&cur)
                .map_err(|_| ApiError::Damaged(format!("tag row {repo}:{tag}")))?;
            let mut t = Txn::new();
            t.expect(CF_TAGS, tkey.clone(), Some(cur));
            t.delete(CF_TAGS, tkey.clone());
            t.drop_ref(&d);
            let mut rows = Rows::new(self, repo);
            if let Some(row) = rows.get(&d)? {
                row.tags = row.tags.saturating_sub(1);
            }
            rows.write(&mut t);
            Ok(Some(t))
        })?;
        Ok(found)
    }

    /// Up to `n` tags of a repository after `last`, and whether more follow.
    pub fn tags(
        &self,
        repo: &RepoName,
        last: Option<&str>,
        n: usize,
    ) -> ApiResult<(Vec<String>, bool)> {
        let prefix = rkey(repo, b"");
        let after = last.map(|l| rkey(repo, l.as_bytes()));
        let mut rows = self
            .store
            .kv_scan(CF_TAGS, &prefix, after.as_deref(), n + 1)?;
        let more = rows.len() > n;
        rows.truncate(n);
        let tags = rows
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
            .collect();
        Ok((tags, more))
    }

    /// Up to `n` repository names after `last`, and whether more follow.
    pub fn repos(&self, last: Option<&str>, n: usize) -> ApiResult<(Vec<String>, bool)> {
        let mut rows = self
            .store
            .kv_scan(CF_REPOS, b"", last.map(str::as_bytes), n + 1)?;
        let more = rows.len() > n;
        rows.truncate(n);
        Ok((
            rows.into_iter()
                .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
                .collect(),
            more,
        ))
    }

    /// Referrer rows of `subject` after the referrer `after`, in pages:
    /// (referrer digest, descriptor JSON).
    pub fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        after: Option<&Digest>,
        n: usize,
    ) -> ApiResult<Vec<(Digest, Vec<u8>)>> {
        let prefix = rkey(repo, &subject.to_key());
        let after = after.map(|a| cat(&prefix, &a.to_key()));
        let rows = self
            .store
            .kv_scan(CF_REFERRERS, &prefix, after.as_deref(), n)?;
        rows.into_iter()
            .map(|(k, v)| {
                Digest::from_key(&k[prefix.len()..])
                    .map(|d| (d, v))
                    .map_err(|_| ApiError::Damaged(format!("referrer row of {repo}@{subject}")))
            })
            .collect()
    }
}

/// A child manifest an index names must be in the repository, with the size
/// its descriptor gives.
pub fn check_child<'m>(
    child: Option<&'m mut ManifestMeta>,
    d: &Digest,
    size: u64,
) -> ApiResult<&'m mut ManifestMeta> {
    let child = child.ok_or_else(|| ApiError::ManifestBlobUnknown(d.clone()))?;
    if child.size != size {
        return Err(ApiError::ManifestInvalid(format!(
            "descriptor of child manifest {d} says {size} bytes, it has {}",
            child.size
        )));
    }
    Ok(child)
}

/// The manifest rows one transaction changes. Each is read once, changed in
/// memory however many times, and written once with a precondition on the
/// value it was read with, so two changes to one row (a tag moving from a
/// manifest to an index that lists it) both land.
struct Rows<'a> {
    reg: &'a Registry,
    repo: &'a RepoName,
    /// digest -> (value read, row now; `None` when the row does not exist).
    rows: BTreeMap<Digest, (Option<Vec<u8>>, Option<ManifestMeta>)>,
}

impl<'a> Rows<'a> {
    fn new(reg: &'a Registry, repo: &'a RepoName) -> Self {
        Rows {
            reg,
            repo,
            rows: BTreeMap::new(),
        }
    }

    fn get(&mut self, d: &Digest) -> ApiResult<Option<&mut ManifestMeta>> {
        if !self.rows.contains_key(d) {
            let cur = self.reg.get(CF_MANIFESTS, &rkey(self.repo, &d.to_key()))?;
            let row = cur
                .as_deref()
                .map(|v| self.reg.decode_manifest(self.repo, d, v))
                .transpose()?;
            self.rows.insert(d.clone(), (cur, row));
        }
        Ok(self.rows.get_mut(d).and_then(|(_, row)| row.as_mut()))
    }

    /// A row that does not exist yet (the caller found it absent).
    fn create(&mut self, d: &Digest, row: ManifestMeta) {
        let read = self.rows.remove(d).and_then(|(v, _)| v);
        self.rows.insert(d.clone(), (read, Some(row)));
    }

    fn write(self, t: &mut Txn) {
        for (d, (read, row)) in self.rows {
            let key = rkey(self.repo, &d.to_key());
            t.expect(CF_MANIFESTS, key.clone(), read);
            if let Some(row) = row {
                t.put(CF_MANIFESTS, key, row.encode());
            }
        }
    }
}

/// The digest at the end of a `repo 0x00 digest_key` row key.
fn split_digest_suffix(k: &[u8]) -> Option<Digest> {
    let pos = k.iter().position(|b| *b == 0)?;
    Digest::from_key(&k[pos + 1..]).ok()
}
