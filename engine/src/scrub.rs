//! The scrub: sealed segments re-read at a bounded rate while the store
//! serves, so that damage on disk (bit rot, a failing drive, a stray write)
//! is found before a pull needs the bytes. Every record's CRC is checked;
//! every record the index points at is also authenticated, decompressed and
//! re-named, as a read would. Damage is reported, not changed: `orlop fsck
//! --repair` (on a stopped store) quarantines it.

use crate::error::{Error, Result};
use crate::ids::{ChunkId, SegmentId};
use crate::pace::Pacer;
use crate::read::open_record;
use crate::segment::{footer_mismatch, scan_segment_records};
use crate::store::{Inner, Store};
use crate::verify::Progress;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a scrub pass may do.
#[derive(Clone, Debug, Default)]
pub struct ScrubOptions {
    /// Bytes read per second at most; 0 is unbounded.
    pub bytes_per_sec_max: u64,
    /// Set to end the pass early (a server shutting down).
    pub cancel: Arc<AtomicBool>,
}

/// One piece of damage a scrub found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScrubDamage {
    pub segment: SegmentId,
    /// The record's offset, when the damage is a record's.
    pub offset: Option<u64>,
    /// The chunk the index keeps there, when it is a live record.
    pub chunk: Option<ChunkId>,
    pub detail: String,
}

impl std::fmt::Display for ScrubDamage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "segment {}", self.segment)?;
        if let Some(o) = self.offset {
            write!(f, " offset {o}")?;
        }
        if let Some(c) = &self.chunk {
            write!(f, " (chunk {c})")?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// What one pass read and found.
#[derive(Clone, Debug, Default)]
pub struct ScrubReport {
    pub segments: u64,
    pub records: u64,
    /// Records the index points at (fully checked).
    pub live_records: u64,
    pub bytes: u64,
    pub damaged: Vec<ScrubDamage>,
    /// Cancelled before the last segment.
    pub incomplete: bool,
    pub elapsed: Duration,
}

impl Store {
    /// One pass over every sealed segment (the active one is still being
    /// written, and recovery checks it at the next open). `on_damage` hears
    /// of each piece of damage as it is found.
    pub fn scrub(
        &self,
        opts: &ScrubOptions,
        on_damage: &mut dyn FnMut(&ScrubDamage),
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ScrubReport> {
        let started = Instant::now();
        let inner = self.inner();
        let pace = Pacer::new(opts.bytes_per_sec_max);
        let mut rep = ScrubReport::default();
        let ids = inner.segments.ids();
        let total = ids.len() as u64;
        for (n, id) in ids.into_iter().enumerate() {
            if opts.cancel.load(Ordering::Relaxed) {
                rep.incomplete = true;
                break;
            }
            if inner.index.segment(id)?.is_some_and(|e| e.sealed) {
                scrub_segment(inner, id, opts, &pace, &mut rep, on_damage)?;
            }
            progress(Progress {
                phase: "scrub",
                done: n as u64 + 1,
                total,
            });
        }
        rep.elapsed = started.elapsed();
        Ok(rep)
    }
}

fn scrub_segment(
    inner: &Inner,
    id: SegmentId,
    opts: &ScrubOptions,
    pace: &Pacer,
    rep: &mut ScrubReport,
    on_damage: &mut dyn FnMut(&ScrubDamage),
) -> Result<()> {
    let file = match inner.segments.file(id) {
        Ok(f) => f,
        // Removed by a compaction since the listing.
        Err(Error::SegmentMissing(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    let mut lookup_failed = None;
    let scan = scan_segment_records(&*file, |off, h, rec| {
        rep.records += 1;
        rep.bytes += rec.len() as u64;
        let entry = match inner.index.chunk(&h.chunk) {
            Ok(e) => e,
            Err(e) => {
                lookup_failed = Some(e);
                return false;
            }
        };
        if let Some(e) = entry.filter(|e| e.loc.segment == id && u64::from(e.loc.offset) == off) {
            rep.live_records += 1;
            if let Err(err) = open_record(inner, &h.chunk, &e.loc, rec) {
                found.push(ScrubDamage {
                    segment: id,
                    offset: Some(off),
                    chunk: Some(h.chunk),
                    detail: err.to_string(),
                });
            }
        }
        pace.wait(rep.bytes);
        !opts.cancel.load(Ordering::Relaxed)
    });
    if let Some(e) = lookup_failed {
        return Err(e);
    }
    match scan {
        Err(e) => found.push(ScrubDamage {
            segment: id,
            offset: None,
            chunk: None,
            detail: format!("read failed: {e}"),
        }),
        Ok(s) if !opts.cancel.load(Ordering::Relaxed) => {
            for (offset, skipped, why) in &s.damaged {
                found.push(ScrubDamage {
                    segment: id,
                    offset: Some(*offset),
                    chunk: None,
                    detail: format!("{why} ({skipped} bytes skipped to the next valid record)"),
                });
            }
            let why = match (&s.header, &s.footer) {
                (Err(e), _) => Some(e.clone()),
                (Ok(_), None) => Some("sealed, but its footer is missing or damaged".into()),
                (Ok(_), Some(_)) if s.damaged.is_empty() => footer_mismatch(&s),
                (Ok(_), Some(_)) => None,
            };
            if let Some(detail) = why {
                let offset = s.stopped.is_some().then_some(s.data_end);
                found.push(ScrubDamage {
                    segment: id,
                    offset,
                    chunk: None,
                    detail,
                });
            }
        }
        Ok(_) => rep.incomplete = true,
    }
    rep.segments += 1;
    for d in &found {
        on_damage(d);
    }
    rep.damaged.extend(found);
    Ok(())
}
