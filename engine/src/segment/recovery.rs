//! Scanning a segment file: header, footer, and the run of valid records.
//! Used on open (to find and truncate torn tails) and by verify().

use super::format::{
    RecordHeader, SegmentFooter, SegmentHeader, FOOTER_BYTES, HEADER_BYTES, RECORD_HEADER_BYTES,
    RECORD_MAGIC,
};
use crate::io::SegmentFile;

#[derive(Debug)]
pub struct ScanResult {
    pub header: Result<SegmentHeader, String>,
    /// The footer, when the file is sealed and the footer is intact.
    pub footer: Option<SegmentFooter>,
    /// End of the last valid record (where a torn tail starts).
    pub data_end: u64,
    pub record_count: u64,
    pub data_crc: u32,
    pub file_len: u64,
    /// Why the scan stopped before the footer's data end, if it did (for a
    /// sealed segment: the first damage it skipped).
    pub stopped: Option<String>,
    /// In a sealed segment, each damaged stretch the scan skipped to the
    /// next valid record: (offset, bytes skipped, why).
    pub damaged: Vec<(u64, u64, String)>,
}

/// Scans the file. `visit` sees each valid record's offset and header.
pub fn scan_segment(
    file: &dyn SegmentFile,
    mut visit: impl FnMut(u64, &RecordHeader),
) -> std::io::Result<ScanResult> {
    scan(file, true, |off, h, _| {
        visit(off, h);
        true
    })
}

/// Like [`scan_segment`], and `visit` also sees the whole record (header
/// and payload, its CRC checked), so a caller can check it further without
/// reading it again; it returns false to end the scan there.
pub fn scan_segment_records(
    file: &dyn SegmentFile,
    visit: impl FnMut(u64, &RecordHeader, Vec<u8>) -> bool,
) -> std::io::Result<ScanResult> {
    scan(file, true, visit)
}

/// Like [`scan_segment`], but trusts an intact footer and reads records only
/// of unsealed segments (what opening a store needs).
pub fn scan_unsealed(file: &dyn SegmentFile) -> std::io::Result<ScanResult> {
    scan(file, false, |_, _, _| true)
}

/// Visits the record headers of a segment without reading payloads or
/// checking CRCs (an estimate for compaction's choice), from the first
/// record to the footer's data end (or the end of the file), stopping at
/// the first header that does not decode.
pub fn walk_headers(
    file: &dyn SegmentFile,
    mut visit: impl FnMut(u64, &RecordHeader),
) -> std::io::Result<()> {
    let len = file.len()?;
    let mut hb = [0u8; HEADER_BYTES as usize];
    if len < HEADER_BYTES {
        return Ok(());
    }
    file.read_at(&mut hb, 0)?;
    let Ok(h) = SegmentHeader::decode(&hb) else {
        return Ok(());
    };
    let mut limit = len.min(h.segment_bytes.saturating_sub(FOOTER_BYTES));
    if len == h.segment_bytes {
        let mut fb = [0u8; FOOTER_BYTES as usize];
        file.read_at(&mut fb, h.segment_bytes - FOOTER_BYTES)?;
        if let Some(f) = SegmentFooter::decode(&fb) {
            limit = f.data_end.min(len);
        }
    }
    let mut off = HEADER_BYTES;
    let mut rh = [0u8; RECORD_HEADER_BYTES];
    while off + RECORD_HEADER_BYTES as u64 <= limit {
        file.read_at(&mut rh, off)?;
        let Some(r) = RecordHeader::decode(&rh) else {
            break;
        };
        visit(off, &r);
        off += r.total_len();
    }
    Ok(())
}

/// What is wrong with a segment that has an intact footer, if anything:
/// the scan stopped early, or its records do not match the footer's count
/// and checksum.
pub fn footer_mismatch(s: &ScanResult) -> Option<String> {
    let f = s.footer.as_ref()?;
    if let Some(why) = &s.stopped {
        return Some(match s.damaged.len() {
            0 | 1 => why.clone(),
            n => format!("{n} damaged stretches, the first: {why}"),
        });
    }
    (f.data_crc != s.data_crc || f.record_count != s.record_count)
        .then(|| "footer checksum or record count mismatch".to_string())
}

fn scan(
    file: &dyn SegmentFile,
    records_of_sealed: bool,
    mut visit: impl FnMut(u64, &RecordHeader, Vec<u8>) -> bool,
) -> std::io::Result<ScanResult> {
    let file_len = file.len()?;
    let mut hb = [0u8; HEADER_BYTES as usize];
    let header = if file_len < HEADER_BYTES {
        Err("file shorter than a segment header".to_string())
    } else {
        file.read_at(&mut hb, 0)?;
        SegmentHeader::decode(&hb)
    };
    let mut res = ScanResult {
        header,
        footer: None,
        data_end: HEADER_BYTES.min(file_len),
        record_count: 0,
        data_crc: 0,
        file_len,
        stopped: None,
        damaged: Vec::new(),
    };
    let Ok(h) = &res.header else {
        return Ok(res);
    };
    if file_len == h.segment_bytes {
        let mut fb = [0u8; FOOTER_BYTES as usize];
        file.read_at(&mut fb, h.segment_bytes - FOOTER_BYTES)?;
        res.footer = SegmentFooter::decode(&fb).filter(|f| f.segment == h.segment);
    }
    if let (Some(f), false) = (&res.footer, records_of_sealed) {
        res.data_end = f.data_end;
        res.record_count = f.record_count;
        res.data_crc = f.data_crc;
        return Ok(res);
    }
    let limit = match &res.footer {
        Some(f) => f.data_end.min(file_len),
        None => file_len.min(h.segment_bytes.saturating_sub(FOOTER_BYTES)),
    };
    // A sealed segment's records end at the footer's data end, so damage
    // before it is skipped: the scan looks for the next valid record (its
    // magic, a length within the data, and its CRC). An unsealed segment
    // ends at its first invalid record: that is its torn tail.
    let resync = res.footer.is_some();
    let mut off = HEADER_BYTES;
    while off + RECORD_HEADER_BYTES as u64 <= limit {
        // In a sealed segment an unreadable stretch (EIO from a failing
        // drive) is damage like any other: skipped, reported.
        let read = match read_record_at(file, off, limit) {
            Err(e) if resync => Ok(Err(format!("read error at offset {off}: {e}"))),
            r => r,
        };
        let (r, record) = match read? {
            Ok(x) => x,
            Err(why) => {
                res.stopped.get_or_insert_with(|| why.clone());
                if !resync {
                    break;
                }
                let next = next_valid_record(file, off + 1, limit)?;
                res.damaged.push((off, next - off, why));
                off = next;
                continue;
            }
        };
        let end = off + r.total_len();
        res.data_crc = super::format::chain_record_crc(res.data_crc, &record);
        res.record_count += 1;
        let go_on = visit(off, &r, record);
        off = end;
        if !go_on {
            res.data_end = off;
            return Ok(res);
        }
    }
    res.data_end = off;
    if res.stopped.is_none() && off < limit && res.footer.is_some() {
        res.stopped = Some(format!("trailing bytes at offset {off}"));
    }
    Ok(res)
}

/// The record at `off`, if a valid one (magic, length within `limit`, CRC)
/// starts there; else why not.
fn read_record_at(
    file: &dyn SegmentFile,
    off: u64,
    limit: u64,
) -> std::io::Result<Result<(RecordHeader, Vec<u8>), String>> {
    let mut rh = [0u8; RECORD_HEADER_BYTES];
    file.read_at(&mut rh, off)?;
    let Some(r) = RecordHeader::decode(&rh) else {
        return Ok(Err(format!("no record header at offset {off}")));
    };
    if off + r.total_len() > limit {
        return Ok(Err(format!(
            "record at offset {off} runs past the data end"
        )));
    }
    let mut record = vec![0u8; r.total_len() as usize];
    file.read_at(&mut record, off)?;
    if !RecordHeader::checksum_ok(&record) {
        return Ok(Err(format!("checksum mismatch at offset {off}")));
    }
    Ok(Ok((r, record)))
}

/// Where the next valid record starts at or after `from` (`limit` if none):
/// each occurrence of the record magic is tried in turn.
fn next_valid_record(file: &dyn SegmentFile, from: u64, limit: u64) -> std::io::Result<u64> {
    const WINDOW: u64 = 1 << 20;
    let magic = RECORD_MAGIC.to_le_bytes();
    let mut at = from;
    let mut buf = Vec::new();
    while at + RECORD_HEADER_BYTES as u64 <= limit {
        let n = WINDOW.min(limit - at);
        buf.resize(n as usize, 0);
        // An unreadable window holds nothing to resume at.
        if file.read_at(&mut buf, at).is_ok() {
            for i in 0..buf.len().saturating_sub(3) {
                if buf[i..i + 4] == magic {
                    let cand = at + i as u64;
                    if cand + RECORD_HEADER_BYTES as u64 <= limit
                        && matches!(read_record_at(file, cand, limit), Ok(Ok(_)))
                    {
                        return Ok(cand);
                    }
                }
            }
        }
        // Overlap by three bytes: a magic may straddle two windows.
        at += n.saturating_sub(3).max(1);
    }
    Ok(limit)
}
