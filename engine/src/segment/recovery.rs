//! Scanning a segment file: header, footer, and the run of valid records.
//! Used on open (to find and truncate torn tails) and by verify().

use super::format::{
    RecordHeader, SegmentFooter, SegmentHeader, FOOTER_BYTES, HEADER_BYTES, RECORD_HEADER_BYTES,
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
    /// Why the scan stopped before the footer's data end, if it did.
    pub stopped: Option<String>,
}

/// Scans the file. `visit` sees each valid record's offset and header.
pub fn scan_segment(
    file: &dyn SegmentFile,
    visit: impl FnMut(u64, &RecordHeader),
) -> std::io::Result<ScanResult> {
    scan(file, true, visit)
}

/// Like [`scan_segment`], but trusts an intact footer and reads records only
/// of unsealed segments (what opening a store needs).
pub fn scan_unsealed(file: &dyn SegmentFile) -> std::io::Result<ScanResult> {
    scan(file, false, |_, _| {})
}

fn scan(
    file: &dyn SegmentFile,
    records_of_sealed: bool,
    mut visit: impl FnMut(u64, &RecordHeader),
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
    let mut off = HEADER_BYTES;
    let mut rh = [0u8; RECORD_HEADER_BYTES];
    let mut record = Vec::new();
    while off + RECORD_HEADER_BYTES as u64 <= limit {
        file.read_at(&mut rh, off)?;
        let Some(r) = RecordHeader::decode(&rh) else {
            res.stopped = Some(format!("no record header at offset {off}"));
            break;
        };
        let end = off + r.total_len();
        if end > limit {
            res.stopped = Some(format!("record at offset {off} runs past the data end"));
            break;
        }
        record.resize(r.total_len() as usize, 0);
        file.read_at(&mut record, off)?;
        if !RecordHeader::checksum_ok(&record) {
            res.stopped = Some(format!("checksum mismatch at offset {off}"));
            break;
        }
        visit(off, &r);
        res.data_crc = super::format::chain_record_crc(res.data_crc, &record);
        res.record_count += 1;
        off = end;
    }
    res.data_end = off;
    if res.stopped.is_none() && off < limit && res.footer.is_some() {
        res.stopped = Some(format!("trailing bytes at offset {off}"));
    }
    Ok(res)
}
