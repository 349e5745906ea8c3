//! Shared pieces of Orlop's cross-crate tests: deterministic blob contents and
//! the store configuration used by the crash test's writer and checker.

pub mod oci;
pub mod registry;

use orlop_engine::{ChunkParams, IoBackend, KeySource, StoreConfig};
use rand::{Rng, RngCore, SeedableRng};
use std::path::{Path, PathBuf};

/// Store configuration shared by the crash writer (child) and the checker (parent).
pub fn crash_store_config(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.key = KeySource::File(dir.join("test.key"));
    c.chunk = ChunkParams {
        min_bytes: 1024,
        avg_bytes: 4096,
        max_bytes: 16384,
    };
    c.segment_bytes = 1 << 20;
    c.io = IoBackend::Auto;
    c
}

/// The content of blob number `i` of run `seed`: shared blocks (dedupe) plus unique bytes.
pub fn blob_content(seed: u64, i: u64) -> Vec<u8> {
    let mut r = rand::rngs::SmallRng::seed_from_u64(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut out = Vec::new();
    for _ in 0..r.gen_range(0..4) {
        let block = r.gen_range(0..16u64);
        let mut b = vec![0u8; 16 * 1024];
        rand::rngs::SmallRng::seed_from_u64(block).fill_bytes(&mut b);
        out.extend_from_slice(&b);
    }
    let mut unique = vec![0u8; r.gen_range(0..24 * 1024)];
    r.fill_bytes(&mut unique);
    out.extend_from_slice(&unique);
    out
}

/// The `orlop` binary built beside this test (target/<profile>/orlop).
pub fn orlop_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .unwrap_or_else(|| panic!("no target dir"));
    dir.join("orlop")
}

/// The store's oldest segment file (the first one written).
pub fn first_segment(data: &Path) -> PathBuf {
    std::fs::read_dir(data.join("segments"))
        .unwrap_or_else(|e| panic!("{e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .min()
        .unwrap_or_else(|| panic!("no segment under {}", data.display()))
}

/// Damages a file in place: the byte at `at` XOR `mask`.
pub fn flip_byte(path: &Path, at: u64, mask: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at)
        .unwrap_or_else(|e| panic!("{e}"));
    f.write_all_at(&[b[0] ^ mask], at)
        .unwrap_or_else(|e| panic!("{e}"));
}
