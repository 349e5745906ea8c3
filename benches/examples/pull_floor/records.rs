//! The pull floor's blobs on disk: the bytes cut into records of 64 KiB of
//! plaintext (FastCDC's average in Orlop), each sealed with AES-256-GCM and
//! stored back to back in one file per blob, written with O_DIRECT as
//! Orlop's appends are (through the push floor's `keep::Sink`). Record
//! layout: plaintext length (u32 LE), nonce (12 bytes), ciphertext, tag
//! (16 bytes).

use crate::keep::Sink;
use orlop_engine::io::{AlignedBuf, BLOCK_BYTES};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use sha2::Digest as _;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Plaintext per record (the last of a blob is shorter).
pub(crate) const RECORD_PLAIN_BYTES: usize = 64 << 10;
const HEAD_BYTES: usize = 16;
const TAG_BYTES: usize = 16;
/// A whole record on disk.
pub(crate) const RECORD_BYTES: usize = HEAD_BYTES + RECORD_PLAIN_BYTES + TAG_BYTES;
/// Bytes written at a time (Orlop's append buffer).
const WRITE_BYTES: usize = 2 << 20;

pub(crate) fn cipher() -> io::Result<LessSafeKey> {
    let key = blake3::derive_key("orlop pull floor encryption key", &[7u8; 32]);
    let unbound = UnboundKey::new(&AES_256_GCM, &key).map_err(|_| io::Error::other("aes key"))?;
    Ok(LessSafeKey::new(unbound))
}

/// A blob being pushed: hashed, sealed record by record, written behind.
pub(crate) struct Writer {
    sink: Sink,
    path: PathBuf,
    plain: Vec<u8>,
    sha: sha2::Sha256,
    pub(crate) bytes: u64,
}

static NONCES: AtomicU64 = AtomicU64::new(0);

/// A stored blob.
pub(crate) struct Stored {
    pub(crate) path: PathBuf,
    pub(crate) len: u64,
}

impl Writer {
    pub(crate) fn create(path: PathBuf) -> io::Result<Writer> {
        Ok(Writer {
            sink: Sink::create(&path, WRITE_BYTES, false)?,
            path,
            plain: Vec::with_capacity(RECORD_PLAIN_BYTES),
            sha: sha2::Sha256::new(),
            bytes: 0,
        })
    }

    pub(crate) fn push(&mut self, cipher: &LessSafeKey, mut data: &[u8]) -> io::Result<()> {
        self.sha.update(data);
        self.bytes += data.len() as u64;
        while !data.is_empty() {
            let n = (RECORD_PLAIN_BYTES - self.plain.len()).min(data.len());
            self.plain.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.plain.len() == RECORD_PLAIN_BYTES {
                self.seal(cipher)?;
            }
        }
        Ok(())
    }

    fn seal(&mut self, cipher: &LessSafeKey) -> io::Result<()> {
        let n = self.plain.len();
        // Unique per record across blobs (one key for all).
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&NONCES.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        let rec = self.sink.room(HEAD_BYTES + n + TAG_BYTES)?;
        rec[..4].copy_from_slice(&(n as u32).to_le_bytes());
        rec[4..HEAD_BYTES].copy_from_slice(&nonce);
        rec[HEAD_BYTES..HEAD_BYTES + n].copy_from_slice(&self.plain);
        let (body, tag) = rec[HEAD_BYTES..].split_at_mut(n);
        let t = cipher
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), body)
            .map_err(|_| io::Error::other("seal"))?;
        tag.copy_from_slice(t.as_ref());
        self.plain.clear();
        self.sink.appended(HEAD_BYTES + n + TAG_BYTES)
    }

    /// Seals the last record, writes and syncs the rest; the digest and
    /// the stored blob.
    pub(crate) fn finish(mut self, cipher: &LessSafeKey) -> io::Result<(String, Stored)> {
        if !self.plain.is_empty() {
            self.seal(cipher)?;
        }
        self.sink.sync()?;
        let digest = format!("sha256:{}", hex::encode(self.sha.finalize()));
        let stored = Stored {
            path: self.path,
            len: self.bytes,
        };
        Ok((digest, stored))
    }
}

/// A span of a blob's records, read and opened: its buffer and where each
/// record's plaintext is in it.
pub(crate) struct Opened {
    pub(crate) buf: AlignedBuf,
    pub(crate) plain: Vec<std::ops::Range<usize>>,
}

/// Records per span read (4 MiB of plaintext).
pub(crate) const SPAN_RECORDS: u64 = 64;

/// The records of a blob of `len` bytes.
pub(crate) fn records_of(len: u64) -> u64 {
    len.div_ceil(RECORD_PLAIN_BYTES as u64)
}

/// A buffer for any span.
pub(crate) fn span_buf() -> AlignedBuf {
    AlignedBuf::new(SPAN_RECORDS as usize * RECORD_BYTES + 2 * BLOCK_BYTES)
}

/// Opens the blob's file for reads: direct (the page cache bypassed) or
/// through the page cache.
pub(crate) fn open_for_reads(path: &Path, direct: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

/// Reads span `span` (records `span * SPAN_RECORDS ..`) of a blob of `len`
/// bytes into `buf` with one read of whole blocks, and opens its records in
/// place.
pub(crate) fn read_span(
    file: &File,
    cipher: &LessSafeKey,
    len: u64,
    span: u64,
    mut buf: AlignedBuf,
) -> io::Result<Opened> {
    let first = span * SPAN_RECORDS;
    let last = (first + SPAN_RECORDS).min(records_of(len));
    let start = first * RECORD_BYTES as u64;
    let last_plain = (len - (last - 1) * RECORD_PLAIN_BYTES as u64).min(RECORD_PLAIN_BYTES as u64);
    let end = (last - 1) * RECORD_BYTES as u64 + (HEAD_BYTES + TAG_BYTES) as u64 + last_plain;
    let block = BLOCK_BYTES as u64;
    let (a, b) = (start / block * block, end.div_ceil(block) * block);
    let want = (b - a) as usize;
    file.read_exact_at(&mut buf.as_mut_slice()[..want], a)?;
    let mut plain = Vec::with_capacity((last - first) as usize);
    let mut at = (start - a) as usize;
    let s = buf.as_mut_slice();
    for _ in first..last {
        let n = u32::from_le_bytes([s[at], s[at + 1], s[at + 2], s[at + 3]]) as usize;
        if n > RECORD_PLAIN_BYTES || at + HEAD_BYTES + n + TAG_BYTES > want {
            return Err(io::Error::other("corrupt record length"));
        }
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&s[at + 4..at + HEAD_BYTES]);
        let body = &mut s[at + HEAD_BYTES..at + HEAD_BYTES + n + TAG_BYTES];
        cipher
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::empty(), body)
            .map_err(|_| io::Error::other("record fails its tag"))?;
        plain.push(at + HEAD_BYTES..at + HEAD_BYTES + n);
        at += HEAD_BYTES + n + TAG_BYTES;
    }
    Ok(Opened { buf, plain })
}
