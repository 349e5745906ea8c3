#![allow(dead_code)]
use orlop_engine::io::{FaultIo, OpenMode, PreadIo, SegmentIo};
use orlop_engine::segment::scan_segment;
use orlop_engine::{ChunkParams, IoBackend, KeySource, Store, StoreConfig};
use rand::{RngCore, SeedableRng};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const KEY: [u8; 32] = [7; 32];

/// Small chunks and segments so that tests cross every boundary.
pub fn small_config(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.key = KeySource::Bytes(KEY);
    c.chunk = ChunkParams {
        min_bytes: 512,
        avg_bytes: 2048,
        max_bytes: 8192,
    };
    c.segment_bytes = 64 * 1024;
    c.io = IoBackend::Pread;
    c
}

/// Writers cut and append on their caller's thread for even seeds, on
/// threads of their own for odd ones, so that seeded runs cover both.
pub fn inline_by_seed(c: &mut StoreConfig, seed: u64) {
    c.write_inline_from_writers = if seed.is_multiple_of(2) {
        1
    } else {
        usize::MAX
    };
}

pub fn fault_config(dir: &Path, io: &FaultIo) -> StoreConfig {
    let mut c = small_config(dir);
    c.io = IoBackend::Custom(Arc::new(io.clone()));
    c
}

pub fn open(c: &StoreConfig) -> Store {
    Store::open(c.clone()).unwrap_or_else(|e| panic!("open: {e}"))
}

/// Deterministic pseudo-random bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Compressible, text-like bytes.
pub fn text(seed: u64, len: usize) -> Vec<u8> {
    let words = [
        "layer ", "usr/lib ", "debian ", "orlop ", "\n", "chunk ", "0000 ", "config ",
    ];
    let mut r = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        v.extend_from_slice(words[(r.next_u32() % 8) as usize].as_bytes());
    }
    v.truncate(len);
    v
}

pub fn assert_clean(s: &Store) {
    let r = s.verify().unwrap_or_else(|e| panic!("verify: {e}"));
    assert!(r.is_clean(), "verify found problems: {:#?}", r.problems);
}

pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("segments"))
        .unwrap_or_else(|e| panic!("{e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    v
}

/// (offset, payload_len) of every record in a segment file.
pub fn records(path: &Path) -> Vec<(u64, u64)> {
    let f = PreadIo
        .open(path, OpenMode::ReadOnly)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    scan_segment(&*f, |off, h| out.push((off, h.payload_len as u64)))
        .unwrap_or_else(|e| panic!("{e}"));
    out
}

pub fn flip(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at)
        .unwrap_or_else(|e| panic!("{e}"));
    b[0] ^= 0x20;
    f.write_all_at(&b, at).unwrap_or_else(|e| panic!("{e}"));
}
