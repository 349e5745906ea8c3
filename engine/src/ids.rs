//! Typed identifiers, parsed and validated once at the edge.

use crate::error::{Error, Result};
use sha2::Digest as _;
use std::fmt;
use std::str::FromStr;

/// Digest algorithms accepted for blob names (OCI: sha256 required, sha512 allowed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DigestAlgorithm {
    Sha256,
    Sha512,
}

impl DigestAlgorithm {
    pub fn name(self) -> &'static str {
        match self {
            DigestAlgorithm::Sha256 => "sha256",
            DigestAlgorithm::Sha512 => "sha512",
        }
    }
    /// The hash's length in bytes.
    pub fn hash_bytes(self) -> usize {
        match self {
            DigestAlgorithm::Sha256 => 32,
            DigestAlgorithm::Sha512 => 64,
        }
    }
    pub(crate) fn tag(self) -> u8 {
        match self {
            DigestAlgorithm::Sha256 => 1,
            DigestAlgorithm::Sha512 => 2,
        }
    }
    pub(crate) fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            1 => Some(DigestAlgorithm::Sha256),
            2 => Some(DigestAlgorithm::Sha512),
            _ => None,
        }
    }
}

/// A content digest such as `sha256:e3b0…`. The bytes are the raw hash.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest {
    alg: DigestAlgorithm,
    bytes: [u8; 64],
}

impl Digest {
    pub fn new(alg: DigestAlgorithm, hash: &[u8]) -> Result<Self> {
        if hash.len() != alg.hash_bytes() {
            return Err(Error::InvalidDigest {
                input: hex::encode(hash),
                reason: "hash length does not match algorithm",
            });
        }
        let mut bytes = [0u8; 64];
        bytes[..hash.len()].copy_from_slice(hash);
        Ok(Digest { alg, bytes })
    }

    pub fn sha256_of(data: &[u8]) -> Self {
        let h = sha2::Sha256::digest(data);
        let mut bytes = [0u8; 64];
        bytes[..32].copy_from_slice(&h);
        Digest {
            alg: DigestAlgorithm::Sha256,
            bytes,
        }
    }

    pub fn algorithm(&self) -> DigestAlgorithm {
        self.alg
    }

    pub fn hash(&self) -> &[u8] {
        &self.bytes[..self.alg.hash_bytes()]
    }

    pub fn hex(&self) -> String {
        hex::encode(self.hash())
    }

    /// Index key encoding: one algorithm tag byte, then the raw hash.
    pub fn to_key(&self) -> Vec<u8> {
        let mut k = Vec::with_capacity(1 + self.alg.hash_bytes());
        k.push(self.alg.tag());
        k.extend_from_slice(self.hash());
        k
    }

    pub fn from_key(key: &[u8]) -> Result<Self> {
        let bad = || Error::CorruptIndex {
            cf: "blobs",
            reason: format!("bad digest key {}", hex::encode(key)),
        };
        let (&tag, hash) = key.split_first().ok_or_else(bad)?;
        let alg = DigestAlgorithm::from_tag(tag).ok_or_else(bad)?;
        Digest::new(alg, hash).map_err(|_| bad())
    }
}

impl FromStr for Digest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let err = |reason| Error::InvalidDigest {
            input: s.chars().take(200).collect(),
            reason,
        };
        let (alg, hex_part) = s.split_once(':').ok_or_else(|| err("missing ':'"))?;
        let alg = match alg {
            "sha256" => DigestAlgorithm::Sha256,
            "sha512" => DigestAlgorithm::Sha512,
            _ => return Err(err("unsupported algorithm")),
        };
        if hex_part.len() != alg.hash_bytes() * 2 {
            return Err(err("wrong hash length"));
        }
        if !hex_part
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(err("hash must be lowercase hex"));
        }
        let raw = hex::decode(hex_part).map_err(|_| err("hash must be lowercase hex"))?;
        Digest::new(alg, &raw)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.alg.name(), self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The name of a chunk: keyed BLAKE3 of its plaintext under the store's naming key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(b).ok().map(ChunkId)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0[..8]))
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", hex::encode(self.0))
    }
}

/// A segment file's number; never reused within a store.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct SegmentId(pub u64);

impl SegmentId {
    pub fn file_name(self) -> String {
        format!("seg-{:016x}.orl", self.0)
    }
    pub fn parse_file_name(name: &str) -> Option<Self> {
        let hex_part = name.strip_prefix("seg-")?.strip_suffix(".orl")?;
        if hex_part.len() != 16 {
            return None;
        }
        u64::from_str_radix(hex_part, 16).ok().map(SegmentId)
    }
}

impl fmt::Display for SegmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Names one blob's chunk list (recipe) in the index; allocated per write.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct RecipeId(pub u64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_parse_roundtrip() {
        let d = Digest::sha256_of(b"");
        let s = d.to_string();
        assert_eq!(
            s,
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let p: Digest = s.parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p, d);
        assert_eq!(Digest::from_key(&d.to_key()).ok(), Some(d));
    }

    #[test]
    fn digest_rejects_bad_input() {
        for bad in [
            "sha256:abc",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:zzb0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
    }

    #[test]
    fn segment_file_names() {
        let s = SegmentId(0x1234);
        assert_eq!(SegmentId::parse_file_name(&s.file_name()), Some(s));
        assert_eq!(SegmentId::parse_file_name("seg-12.orl"), None);
    }
}
