//! zstd compression with a cheap probe: most container layers are gzip and do
//! not shrink. The probe estimates the Shannon entropy of a 4 KiB sample from
//! a byte histogram (about a microsecond); only chunks whose sample looks
//! compressible are compressed whole, and kept only when that saves space.
//! (A zstd probe of the same sample cost ~10x more on gzip data, where zstd
//! still builds entropy tables for every block: docs/benchmarks.md.)

/// Bytes of each chunk compressed by the probe.
const PROBE_BYTES: usize = 4096;
/// A compressed chunk is kept only if it saves at least 1/32 of the raw size.
const SAVE_MIN_32THS: usize = 1;
/// Samples above this entropy (bits per byte) are taken as incompressible.
/// gzip and zstd output measure about 7.95; text, tar headers and ELF
/// binaries measure well below 7.
const PROBE_ENTROPY_MAX_BITS: f64 = 7.2;

/// The probe: false when a sample from the middle of the chunk looks like
/// compressed or encrypted data.
pub(crate) fn looks_compressible(raw: &[u8]) -> bool {
    if raw.len() < 512 {
        return false;
    }
    if raw.len() <= 2 * PROBE_BYTES {
        return true;
    }
    let mid = raw.len() / 2 - PROBE_BYTES / 2;
    entropy_bits(&raw[mid..mid + PROBE_BYTES]) <= PROBE_ENTROPY_MAX_BITS
}

/// Shannon entropy of `sample`, in bits per byte.
pub(crate) fn entropy_bits(sample: &[u8]) -> f64 {
    let mut hist = [0u32; 256];
    for &b in sample {
        hist[b as usize] += 1;
    }
    let n = sample.len().max(1) as f64;
    hist.iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

pub(crate) struct Compressor {
    level: i32,
    full: zstd::bulk::Compressor<'static>,
    scratch: Vec<u8>,
}

impl Compressor {
    pub fn new(level: i32) -> std::io::Result<Self> {
        Ok(Compressor {
            level,
            full: zstd::bulk::Compressor::new(level)?,
            scratch: Vec::new(),
        })
    }

    pub fn level(&self) -> i32 {
        self.level
    }

    /// Compresses (the caller has run the probe, [`looks_compressible`]) and
    /// returns the compressed form when it saves enough to keep, else None.
    pub fn compress_if_smaller(&mut self, raw: &[u8]) -> Option<Vec<u8>> {
        self.scratch.clear();
        self.scratch
            .reserve(zstd::zstd_safe::compress_bound(raw.len()));
        let n = self.full.compress_to_buffer(raw, &mut self.scratch).ok()?;
        if n + raw.len() * SAVE_MIN_32THS / 32 > raw.len() {
            return None;
        }
        Some(self.scratch[..n].to_vec())
    }
}

/// Decompresses a chunk whose plaintext length is known; a wrong length is corruption.
pub(crate) fn decompress(data: &[u8], raw_len: usize) -> Option<Vec<u8>> {
    thread_local! {
        /// One decompression context per reading thread, made on first use.
        static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
    }
    let mut out = Vec::with_capacity(raw_len);
    let n = DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = zstd::bulk::Decompressor::new().ok();
        }
        slot.as_mut()?.decompress_to_buffer(data, &mut out).ok()
    })?;
    (n == raw_len).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    #[test]
    fn compresses_text_not_noise() {
        let mut c = Compressor::new(1).unwrap_or_else(|e| panic!("{e}"));
        let text: Vec<u8> = b"lorem ipsum dolor sit amet "
            .iter()
            .cycle()
            .take(64 * 1024)
            .copied()
            .collect();
        let z = c
            .compress_if_smaller(&text)
            .unwrap_or_else(|| panic!("text should compress"));
        assert!(z.len() < text.len() / 4);
        assert_eq!(decompress(&z, text.len()).as_deref(), Some(&text[..]));
        assert!(decompress(&z, text.len() + 1).is_none());
        let mut noise = vec![0u8; 64 * 1024];
        rand::rngs::SmallRng::seed_from_u64(1).fill_bytes(&mut noise);
        assert!(looks_compressible(&text));
        assert!(!looks_compressible(&noise));
        assert!(c.compress_if_smaller(&noise).is_none());
        assert!(entropy_bits(&noise[..4096]) > 7.9);
        assert!(entropy_bits(&text[..4096]) < 5.0);
    }
}
