//! verify(): the one consistency check shared by tests, the simulator and
//! `orlop fsck`. It reads everything and changes nothing.

use crate::error::Result;
use crate::ids::{ChunkId, Digest, SegmentId};
use crate::index::codec::{BlobEntry, ChunkEntry};
use crate::index::{CF_BLOBS, CF_CHUNKS, CF_PENDING, CF_STAGED};
use crate::read::BlobReader;
use crate::read::{load_chunk, recipe_parts};
use crate::segment::format::KIND_CHUNK;
use crate::segment::{footer_mismatch, scan_segment_records};
use crate::store::{Inner, Store};
use crate::write::Hasher;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

mod journal;

/// Progress of a long verify, for progress bars.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub phase: &'static str,
    pub done: u64,
    pub total: u64,
}

/// One inconsistency or damage found by verify().
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// Reading the blob failed; `error` names segment and offset when it is damage.
    BlobUnreadable {
        digest: Digest,
        error: String,
    },
    BlobDigestMismatch {
        digest: Digest,
        actual: Digest,
    },
    BlobSizeMismatch {
        digest: Digest,
        recorded: u64,
        actual: u64,
    },
    /// A recipe names a chunk that the index does not have.
    DanglingChunk {
        digest: Digest,
        chunk: ChunkId,
    },
    /// A chunk in the index fails its checks.
    ChunkCorrupt {
        chunk: ChunkId,
        error: String,
    },
    RefcountMismatch {
        chunk: ChunkId,
        recorded: u64,
        actual: u64,
    },
    /// The metadata journal in the log does not describe the index (a
    /// rebuild would not recreate it).
    JournalIncomplete {
        detail: String,
    },
    /// Recipes name a chunk `references` times that the index does not have.
    ChunkMissing {
        chunk: ChunkId,
        references: u64,
        raw_len: u32,
    },
    SegmentDamaged {
        segment: SegmentId,
        detail: String,
    },
    IndexCorrupt {
        detail: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::BlobUnreadable { digest, error } => {
                write!(f, "blob {digest} unreadable: {error}")
            }
            Problem::BlobDigestMismatch { digest, actual } => {
                write!(f, "blob {digest} re-hashes to {actual}")
            }
            Problem::BlobSizeMismatch {
                digest,
                recorded,
                actual,
            } => {
                write!(
                    f,
                    "blob {digest} records {recorded} bytes but its recipe holds {actual}"
                )
            }
            Problem::DanglingChunk { digest, chunk } => {
                write!(f, "blob {digest} names missing chunk {chunk:?}")
            }
            Problem::ChunkCorrupt { chunk, error } => write!(f, "chunk {chunk:?}: {error}"),
            Problem::RefcountMismatch {
                chunk,
                recorded,
                actual,
            } => {
                write!(
                    f,
                    "chunk {chunk:?} records {recorded} references, recount finds {actual}"
                )
            }
            Problem::JournalIncomplete { detail } => write!(f, "journal: {detail}"),
            Problem::ChunkMissing {
                chunk, references, ..
            } => write!(
                f,
                "chunk {chunk:?} is named {references} times by recipes but missing"
            ),
            Problem::SegmentDamaged { segment, detail } => write!(f, "segment {segment}: {detail}"),
            Problem::IndexCorrupt { detail } => write!(f, "index: {detail}"),
        }
    }
}

/// What verify() found.
#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    pub blobs: u64,
    pub chunks: u64,
    pub segments: u64,
    pub bytes_verified: u64,
    pub problems: Vec<Problem>,
    /// Chunks in the index that no recipe names (reclaimable).
    pub unreferenced_chunks: u64,
    pub unreferenced_chunk_bytes: u64,
    /// Valid records in segments that the index does not point at (reclaimable by compaction).
    pub dead_records: u64,
    pub dead_record_bytes: u64,
    /// Blobs with no references (reclaimable by GC).
    pub unreferenced_blobs: u64,
    /// Uncommitted writes (in progress, or left by a crash until the next open).
    pub pending_writes: u64,
    pub staged_chunks: u64,
    /// Metadata journal records in the segments.
    pub journal_records: u64,
    /// What the journal lacks (`Problem::JournalIncomplete`), for a repair.
    pub(crate) journal_gaps: journal::JournalGaps,
    /// Chunks `Store::repair` quarantined that no write has restored yet.
    pub quarantined_chunks: u64,
    /// Blobs whose recipes name a quarantined chunk: known damage, which
    /// reads refuse (`Error::BlobBroken`) until the content is pushed again.
    pub broken_blobs: Vec<Digest>,
}

impl VerifyReport {
    /// No inconsistency and no damage that `Store::repair` has not dealt
    /// with (broken blobs are reported apart: see [`Self::is_whole`]).
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// Clean, and every blob reads back whole.
    pub fn is_whole(&self) -> bool {
        self.is_clean() && self.broken_blobs.is_empty()
    }
}

impl Store {
    /// Checks everything; see [`VerifyReport`].
    pub fn verify(&self) -> Result<VerifyReport> {
        self.verify_with_progress(&mut |_| {})
    }

    pub fn verify_with_progress(&self, progress: &mut dyn FnMut(Progress)) -> Result<VerifyReport> {
        verify(self.inner(), progress)
    }
}

fn verify(inner: &Arc<Inner>, progress: &mut dyn FnMut(Progress)) -> Result<VerifyReport> {
    let index = &*inner.index;
    let mut rep = VerifyReport::default();
    let mut blobs = Vec::new();
    for kv in index.scan(CF_BLOBS)? {
        let (k, v) = kv?;
        match (Digest::from_key(&k), BlobEntry::decode(&v)) {
            (Ok(d), Ok(e)) => blobs.push((d, e)),
            (Err(e), _) | (_, Err(e)) => rep.problems.push(Problem::IndexCorrupt {
                detail: e.to_string(),
            }),
        }
    }
    let total: u64 = blobs
        .iter()
        .fold(0u64, |a, (_, e)| a.saturating_add(e.size));
    let mut done = 0u64;
    let mut recount: HashMap<ChunkId, (u64, u32)> = HashMap::new();
    let mut damaged: HashSet<ChunkId> = HashSet::new();
    for (digest, entry) in &blobs {
        rep.blobs += 1;
        if entry.refs == 0 {
            rep.unreferenced_blobs += 1;
        }
        verify_blob(inner, digest, entry, &mut recount, &mut damaged, &mut rep);
        done = done.saturating_add(entry.size);
        progress(Progress {
            phase: "blobs",
            done,
            total,
        });
    }
    let mut live: HashSet<(SegmentId, u32)> = HashSet::new();
    let chunk_total = recount.len() as u64;
    for kv in index.scan(CF_CHUNKS)? {
        let (k, v) = kv?;
        let (Some(id), Ok(entry)) = (ChunkId::from_slice(&k), ChunkEntry::decode(&v)) else {
            rep.problems.push(Problem::IndexCorrupt {
                detail: format!("bad chunk entry {}", hex::encode(&k)),
            });
            continue;
        };
        rep.chunks += 1;
        let actual = recount.remove(&id).map_or(0, |(n, _)| n);
        if entry.is_quarantined() {
            rep.quarantined_chunks += 1;
        } else {
            live.insert((entry.loc.segment, entry.loc.offset));
        }
        if actual != entry.refs {
            rep.problems.push(Problem::RefcountMismatch {
                chunk: id,
                recorded: entry.refs,
                actual,
            });
        }
        if actual == 0 && !entry.is_quarantined() {
            // Not read through any blob above: check it on its own.
            rep.unreferenced_chunks += 1;
            rep.unreferenced_chunk_bytes += entry.loc.record_len();
            if let Err(e) = load_chunk(inner, &id, &entry) {
                rep.problems.push(Problem::ChunkCorrupt {
                    chunk: id,
                    error: e.to_string(),
                });
            }
        }
        if rep.chunks % 4096 == 0 {
            progress(Progress {
                phase: "chunks",
                done: rep.chunks,
                total: chunk_total.max(rep.chunks),
            });
        }
    }
    for (chunk, (references, raw_len)) in recount {
        rep.problems.push(Problem::ChunkMissing {
            chunk,
            references,
            raw_len,
        });
    }
    let mut journal = journal::JournalSeen::default();
    verify_segments(inner, &live, &mut journal, &mut rep, progress)?;
    rep.journal_records = journal.records;
    journal.check(inner, &blobs, &mut rep)?;
    rep.pending_writes = index.scan(CF_PENDING)?.count() as u64;
    rep.staged_chunks = index.scan(CF_STAGED)?.count() as u64;
    Ok(rep)
}

fn verify_blob(
    inner: &Arc<Inner>,
    digest: &Digest,
    entry: &BlobEntry,
    recount: &mut HashMap<ChunkId, (u64, u32)>,
    damaged: &mut HashSet<ChunkId>,
    rep: &mut VerifyReport,
) {
    let mut size = 0u64;
    let mut chunks = 0u64;
    let mut dangling = false;
    let mut broken = false;
    for part in recipe_parts(inner, entry) {
        let part = match part {
            Ok(p) => p,
            Err(e) => {
                rep.problems.push(Problem::BlobUnreadable {
                    digest: digest.clone(),
                    error: e.to_string(),
                });
                return;
            }
        };
        if part.start != size {
            rep.problems.push(Problem::IndexCorrupt {
                detail: format!(
                    "blob {digest}: recipe part starts at {} not {size}",
                    part.start
                ),
            });
        }
        for e in &part.entries {
            size = size.saturating_add(e.raw_len as u64);
            chunks += 1;
            recount.entry(e.chunk).or_insert((0, e.raw_len)).0 += 1;
            match inner.index.chunk(&e.chunk) {
                Ok(None) if !dangling => {
                    dangling = true;
                    rep.problems.push(Problem::DanglingChunk {
                        digest: digest.clone(),
                        chunk: e.chunk,
                    });
                }
                Ok(Some(c)) if c.is_quarantined() => broken = true,
                _ => {}
            }
        }
    }
    if broken && !dangling {
        rep.broken_blobs.push(digest.clone());
    }
    if size != entry.size || chunks != entry.chunk_count {
        rep.problems.push(Problem::BlobSizeMismatch {
            digest: digest.clone(),
            recorded: entry.size,
            actual: size,
        });
        return;
    }
    if dangling || broken {
        return;
    }
    let mut hasher = Hasher::new(digest.algorithm());
    let mut r = match BlobReader::new(inner.clone(), digest, 0, None) {
        Ok(r) => r,
        Err(e) => {
            rep.problems.push(Problem::BlobUnreadable {
                digest: digest.clone(),
                error: e.to_string(),
            });
            return;
        }
    };
    loop {
        match r.next_piece() {
            Ok(Some(p)) => {
                rep.bytes_verified += p.len() as u64;
                hasher.update(&p);
            }
            Ok(None) => break,
            Err(e) => {
                rep.problems.push(Problem::BlobUnreadable {
                    digest: digest.clone(),
                    error: e.to_string(),
                });
                // Damaged bytes, or bytes the disk cannot read.
                if e.is_corruption() || matches!(e, crate::error::Error::Io { .. }) {
                    find_damaged_chunks(inner, entry, damaged, rep);
                }
                return;
            }
        }
    }
    match hasher.finish() {
        Ok(a) if a == *digest => {}
        Ok(a) => rep.problems.push(Problem::BlobDigestMismatch {
            digest: digest.clone(),
            actual: a,
        }),
        Err(e) => rep.problems.push(Problem::IndexCorrupt {
            detail: e.to_string(),
        }),
    }
}

/// Checks each distinct chunk of a blob that failed to read on its own and
/// reports every damaged one (once, however many blobs share it), so that
/// repair knows which chunks to quarantine.
fn find_damaged_chunks(
    inner: &Inner,
    entry: &BlobEntry,
    damaged: &mut HashSet<ChunkId>,
    rep: &mut VerifyReport,
) {
    let mut seen: HashSet<ChunkId> = HashSet::new();
    for part in recipe_parts(inner, entry).map_while(|p| p.ok()) {
        for e in part.entries {
            if !seen.insert(e.chunk) || damaged.contains(&e.chunk) {
                continue;
            }
            let Ok(Some(c)) = inner.index.chunk(&e.chunk) else {
                continue;
            };
            if c.is_quarantined() {
                continue;
            }
            if let Err(err) = load_chunk(inner, &e.chunk, &c) {
                damaged.insert(e.chunk);
                rep.problems.push(Problem::ChunkCorrupt {
                    chunk: e.chunk,
                    error: err.to_string(),
                });
            }
        }
    }
}

fn verify_segments(
    inner: &Inner,
    live: &HashSet<(SegmentId, u32)>,
    journal: &mut journal::JournalSeen,
    rep: &mut VerifyReport,
    progress: &mut dyn FnMut(Progress),
) -> Result<()> {
    let ids = inner.segments.ids();
    let total = ids.len() as u64;
    for id in ids {
        rep.segments += 1;
        let file = inner.segments.file(id)?;
        let mut dead = (0u64, 0u64);
        let mut journal_problems = VerifyReport::default();
        let scan = scan_segment_records(&*file, |off, h, rec| {
            if h.kind != KIND_CHUNK {
                journal.add(inner, id, off, h, rec, &mut journal_problems);
            } else if !live.contains(&(id, off as u32)) {
                dead.0 += 1;
                dead.1 += h.total_len();
            }
            true
        });
        rep.problems.append(&mut journal_problems.problems);
        let damaged = |detail: String| Problem::SegmentDamaged {
            segment: id,
            detail,
        };
        match scan {
            Err(e) => rep.problems.push(damaged(format!("read failed: {e}"))),
            Ok(s) => {
                rep.dead_records += dead.0;
                rep.dead_record_bytes += dead.1;
                if let Err(e) = &s.header {
                    rep.problems.push(damaged(e.clone()));
                }
                let known = inner.index.segment(id)?;
                match (&s.footer, known) {
                    (Some(_), _) => {
                        if let Some(why) = footer_mismatch(&s) {
                            rep.problems.push(damaged(why));
                        }
                    }
                    (None, Some(k)) if k.sealed || s.data_end < k.durable_len => {
                        rep.problems.push(damaged(format!(
                            "{} valid bytes but {} are recorded durable{}",
                            s.data_end,
                            k.durable_len,
                            s.stopped
                                .as_deref()
                                .map(|w| format!(" ({w})"))
                                .unwrap_or_default()
                        )));
                    }
                    _ => {}
                }
            }
        }
        progress(Progress {
            phase: "segments",
            done: rep.segments,
            total,
        });
    }
    Ok(())
}
