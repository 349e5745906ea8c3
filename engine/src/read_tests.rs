//! What each [`Check`] catches in a record opened in place.

use super::{open_in_place, Check, Plain};
use crate::compress::Compressor;
use crate::crypto::{nonce_for, ChunkCipher, TAG_BYTES};
use crate::ids::{ChunkId, SegmentId};
use crate::index::codec::Location;
use crate::segment::format::{FLAG_ZSTD, KIND_CHUNK, RECORD_HEADER_BYTES};
use crate::segment::{seal_record, PreparedChunk};

const ENC: [u8; 32] = [7; 32];
const NAMING: [u8; 32] = [9; 32];

fn name(plain: &[u8]) -> ChunkId {
    ChunkId(*blake3::keyed_hash(&NAMING, plain).as_bytes())
}

/// A record at offset 4096 of segment 3 holding `plain` (compressed when
/// `zstd`), sealed under the name `id` as the appender seals records.
fn record(plain: &[u8], id: ChunkId, zstd: bool) -> (Vec<u8>, Location) {
    let (flags, body) = if zstd {
        let mut c = Compressor::new(1).unwrap_or_else(|e| panic!("{e}"));
        let v = c
            .compress_if_smaller(plain)
            .unwrap_or_else(|| panic!("test data compresses"));
        (FLAG_ZSTD, v)
    } else {
        (0, plain.to_vec())
    };
    let (segment, offset) = (SegmentId(3), 4096u32);
    let raw_len = plain.len() as u32;
    let chunk = PreparedChunk {
        kind: KIND_CHUNK,
        id,
        flags,
        raw_len,
        body: body.into(),
    };
    let mut rec = vec![0u8; RECORD_HEADER_BYTES + chunk.body.len() + TAG_BYTES];
    let nonce = nonce_for(segment, offset);
    seal_record(&ChunkCipher::new(&ENC), &chunk, nonce, &mut rec).unwrap_or_else(|e| panic!("{e}"));
    let loc = Location {
        segment,
        offset,
        payload_len: (rec.len() - RECORD_HEADER_BYTES) as u32,
        raw_len,
        flags,
    };
    (rec, loc)
}

fn open(rec: &[u8], loc: &Location, check: Check) -> Option<Vec<u8>> {
    let mut rec = rec.to_vec();
    let (_, plain) = open_in_place(&ChunkCipher::new(&ENC), &NAMING, loc, &mut rec, check).ok()?;
    Some(match plain {
        Plain::At(r) => rec[r].to_vec(),
        Plain::Owned(v) => v,
    })
}

fn text() -> Vec<u8> {
    (0..20_000u32)
        .flat_map(|i| (i % 50).to_le_bytes())
        .collect()
}

#[test]
fn both_checks_open_a_sound_record() {
    for zstd in [false, true] {
        let plain = text();
        let (rec, loc) = record(&plain, name(&plain), zstd);
        for check in [Check::Full, Check::Tag] {
            assert_eq!(open(&rec, &loc, check).as_deref(), Some(&plain[..]));
        }
    }
}

/// A flipped bit anywhere the tag covers (payload, tag, nonce, and the
/// header fields in the associated data) fails both checks.
#[test]
fn the_tag_alone_catches_damage_to_stored_bytes() {
    for zstd in [false, true] {
        let plain = text();
        let (rec, loc) = record(&plain, name(&plain), zstd);
        let covered = [4usize, 5, 12, 13, 16, 40, 47, 48, 55, 59]
            .into_iter()
            .chain([RECORD_HEADER_BYTES, RECORD_HEADER_BYTES + 77, rec.len() - 1]);
        for at in covered {
            for bit in [0u8, 3, 7] {
                let mut bad = rec.clone();
                bad[at] ^= 1 << bit;
                for check in [Check::Full, Check::Tag] {
                    assert!(
                        open(&bad, &loc, check).is_none(),
                        "byte {at} bit {bit} (zstd {zstd}) passed"
                    );
                }
            }
        }
    }
}

/// What `Tag` leaves to fsck: a plaintext stored uncompressed under a name
/// that is not its own (a writer's bug, not damage on disk) opens; `Full`
/// refuses it. A decompressed plaintext is named under both.
#[test]
fn only_full_names_an_uncompressed_plaintext() {
    let plain = text();
    let wrong = name(b"other bytes");
    let (rec, loc) = record(&plain, wrong, false);
    assert_eq!(open(&rec, &loc, Check::Tag).as_deref(), Some(&plain[..]));
    assert!(open(&rec, &loc, Check::Full).is_none());
    let (rec, loc) = record(&plain, wrong, true);
    assert!(open(&rec, &loc, Check::Tag).is_none());
    assert!(open(&rec, &loc, Check::Full).is_none());
}
