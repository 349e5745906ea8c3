//! Committing a blob: its recipe's chunks counted, quarantined chunks
//! restored from the write's own copies, a broken blob given the new
//! recipe, and its journal records queued.

use super::*;

#[allow(clippy::too_many_arguments)]
pub(super) fn commit_blob(
    inner: &Inner,
    ov: &mut Overlay,
    batch: &mut WriteBatch,
    recipe: RecipeId,
    digest: &Digest,
    size: u64,
    chunk_count: u64,
    created_unix_ms: u64,
) -> Result<BlobEntry> {
    let index = &*inner.index;
    ov.finished_recipes.insert(recipe);
    // A broken blob written again whose stored recipe still names a
    // quarantined chunk: it takes this write's recipe instead (below).
    let mut replaced: Option<(BlobEntry, HashMap<ChunkId, ChunkEntry>)> = None;
    if let Some(mut existing) = ov.blob(index, digest)? {
        // Already stored: this write's recipe is redundant, but the copies
        // it made of quarantined chunks restore the stored blob.
        restore_quarantined(inner, ov, recipe)?;
        let marked = index.broken(digest)?;
        let still_broken = marked
            && crate::read::count_quarantined(inner, &existing, |id| ov.chunk(index, id))? > 0;
        if still_broken {
            // Chunked differently (an upload's checkpoints force cuts):
            // release the damaged recipe's chunks; this write holds every byte.
            let released =
                crate::gc::release(index, digest, &existing, &mut |id| ov.chunk(index, id))?;
            replaced = Some((existing, released));
        } else {
            if marked {
                batch.delete_cf(index.cf(CF_BROKEN)?, digest.to_key());
            }
            delete_staging(batch, index, recipe, false)?;
            // Written again: garbage collection's grace period counts from now
            // (a layer above may be about to take its first reference, while
            // the references the blob has now may be dropped meanwhile).
            if created_unix_ms > existing.created_unix_ms {
                existing.created_unix_ms = created_unix_ms;
                ov.blobs.insert(digest.clone(), Some(existing));
            }
            return Ok(existing);
        }
    }
    // Chunk counts as the released damaged recipe (if any) leaves them.
    let mut local: HashMap<ChunkId, ChunkEntry> = replaced
        .as_ref()
        .map(|(_, released)| released.clone())
        .unwrap_or_default();
    let mut inserted = Vec::new();
    let (mut entries, mut bytes) = (0u64, 0u64);
    let prefix = recipe_prefix(recipe);
    let mut journal = Vec::new();
    for kv in index.scan_prefix(CF_RECIPES, &prefix)? {
        let (k, v) = kv?;
        let part = RecipePart::decode(&v)?;
        let part_no = journal.len() as u32;
        if k.get(8..) != Some(&part_no.to_be_bytes()[..]) {
            return Err(Error::CorruptIndex {
                cf: CF_RECIPES,
                reason: format!("recipe {} lacks part {part_no}", recipe.0),
            });
        }
        for e in &part.entries {
            entries += 1;
            bytes += e.raw_len as u64;
            let cur = match local.get(&e.chunk) {
                Some(c) => Some(*c),
                None => ov.chunk(index, &e.chunk)?,
            };
            let next = match cur {
                Some(mut c) => {
                    c.refs += 1;
                    // Stored in a segment a compaction is emptying: this
                    // writer stored a fresh copy (see write/pipeline.rs), which
                    // becomes the chunk's home, so compaction may not have
                    // copied it (it had no references when it looked).
                    // A quarantined chunk likewise: the fresh copy restores it.
                    if c.is_quarantined() || inner.is_retiring(c.loc.segment) {
                        if let Some(loc) = fresh_copy(inner, recipe, &e.chunk)? {
                            c.loc = loc;
                        }
                    }
                    c
                }
                None => {
                    let staged = index
                        .get(CF_STAGED, &staged_key(recipe, &e.chunk))?
                        .ok_or_else(|| Error::CorruptIndex {
                            cf: CF_STAGED,
                            reason: format!(
                                "recipe {} names chunk {} that is neither stored nor staged",
                                recipe.0, e.chunk
                            ),
                        })?;
                    inserted.push(e.chunk);
                    ChunkEntry {
                        loc: Location::decode(&staged, CF_STAGED)?,
                        refs: 1,
                    }
                }
            };
            local.insert(e.chunk, next);
        }
        let rec = RecipeRecord {
            recipe,
            part_no,
            part,
        };
        journal.push((KIND_RECIPE, rec.encode()));
    }
    if entries != chunk_count || bytes != size {
        return Err(Error::CorruptIndex {
            cf: CF_RECIPES,
            reason: format!("recipe {} has {entries} chunks / {bytes} bytes, writer reported {chunk_count} / {size}", recipe.0),
        });
    }
    let entry = BlobEntry {
        size,
        recipe,
        chunk_count,
        // A replaced blob keeps the references layers above hold on it.
        refs: replaced.as_ref().map_or(0, |(old, _)| old.refs),
        created_unix_ms,
    };
    if let Some((old, _)) = &replaced {
        let (from, to) = recipe_range(old.recipe);
        batch.delete_range_cf(index.cf(CF_RECIPES)?, from, to);
        batch.delete_cf(index.cf(CF_BROKEN)?, digest.to_key());
    }
    let blob = BlobRecord {
        digest: digest.clone(),
        size,
        recipe,
        chunk_count,
        parts: journal.len() as u32,
        created_unix_ms,
    };
    journal.push((KIND_BLOB, blob.encode()));
    ov.journal.extend(journal);
    crate::repair::settle(ov, local);
    ov.inserted.extend(inserted);
    ov.blobs.insert(digest.clone(), Some(entry));
    delete_staging(batch, index, recipe, true)?;
    Ok(entry)
}

pub(super) fn rejournal(inner: &Inner, ov: &mut Overlay, digests: &[Digest]) -> Result<()> {
    for d in digests {
        if let Some(e) = ov.blob(&inner.index, d)? {
            ov.journal
                .extend(crate::journal::blob_records(inner, d, &e)?);
        }
    }
    Ok(())
}

/// Where this write stored its own copy of `chunk`, unless that copy is in
/// a segment a compaction is emptying.
fn fresh_copy(inner: &Inner, recipe: RecipeId, chunk: &ChunkId) -> Result<Option<Location>> {
    match inner.index.get(CF_STAGED, &staged_key(recipe, chunk))? {
        Some(v) => {
            let loc = Location::decode(&v, CF_STAGED)?;
            Ok((!inner.is_retiring(loc.segment)).then_some(loc))
        }
        None => Ok(None),
    }
}

/// Moves each quarantined chunk that this write stored again to its copy
/// (the write's blob already exists, so its recipe is otherwise dropped).
fn restore_quarantined(inner: &Inner, ov: &mut Overlay, recipe: RecipeId) -> Result<()> {
    let index = &*inner.index;
    for kv in index.scan_prefix(CF_STAGED, &recipe_prefix(recipe))? {
        let (k, v) = kv?;
        let Some(id) = k.get(8..).and_then(ChunkId::from_slice) else {
            continue;
        };
        if let Some(mut c) = ov.chunk(index, &id)? {
            let loc = Location::decode(&v, CF_STAGED)?;
            if c.is_quarantined() && !inner.is_retiring(loc.segment) {
                c.loc = loc;
                ov.chunks.insert(id, c);
            }
        }
    }
    Ok(())
}
