//! Every decoder of bytes from disk must return an error, never panic.
//! Run: cargo +nightly fuzz run decode (from fuzz/).
#![no_main]

use libfuzzer_sys::fuzz_target;
use orlop_engine::index::codec::{BlobEntry, ChunkEntry, Location, RecipePart, SegmentEntry};
use orlop_engine::segment::format::{RecordHeader, SegmentFooter, SegmentHeader};

fuzz_target!(|data: &[u8]| {
    let _ = SegmentHeader::decode(data);
    let _ = SegmentFooter::decode(data);
    let _ = RecordHeader::decode(data);
    let _ = RecordHeader::checksum_ok(data);
    let _ = ChunkEntry::decode(data);
    let _ = BlobEntry::decode(data);
    let _ = RecipePart::decode(data);
    let _ = SegmentEntry::decode(data);
    let _ = Location::decode(data, "fuzz");
    let _ = orlop_engine::Digest::from_key(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = s.parse::<orlop_engine::Digest>();
    }
});
