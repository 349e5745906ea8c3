//! Byte encodings of the registry's rows (docs/format.md, "Registry column
//! families"). Integers are fixed width, little-endian; every value starts
//! with a version byte.

use orlop_engine::Digest;

/// What the registry records about a manifest held in a repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestMeta {
    pub media_type: String,
    pub size: u64,
    pub created_unix_ms: u64,
    /// Indexes of this repository that name this manifest as a child.
    pub parents: u32,
    /// Tags of this repository that point at this manifest. Changed in the
    /// same transaction as the tag, so that a delete deciding which tags to
    /// remove conflicts with a concurrent tagging.
    pub tags: u32,
    /// Distinct blobs (config, layers) the manifest references.
    pub blobs: Vec<Digest>,
    /// Distinct child manifests (for an index or manifest list).
    pub manifests: Vec<Digest>,
    pub subject: Option<Digest>,
    pub artifact_type: Option<String>,
}

const MANIFEST_V1: u8 = 1;

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v)
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn digest(&mut self, d: &Digest) {
        self.bytes(&d.to_key())
    }
    fn opt_bytes(&mut self, b: Option<&[u8]>) {
        match b {
            Some(b) => {
                self.u8(1);
                self.bytes(b)
            }
            None => self.u8(0),
        }
    }
}

struct R<'a>(&'a [u8]);

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
    fn digest(&mut self) -> Option<Digest> {
        Digest::from_key(self.bytes()?).ok()
    }
    fn digests(&mut self) -> Option<Vec<Digest>> {
        let n = self.u32()? as usize;
        if n > self.0.len() {
            return None;
        }
        (0..n).map(|_| self.digest()).collect()
    }
    fn opt<T>(&mut self, f: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        match self.u8()? {
            0 => Some(None),
            1 => f(self).map(Some),
            _ => None,
        }
    }
}

impl ManifestMeta {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = W(Vec::with_capacity(
            64 + 70 * (self.blobs.len() + self.manifests.len()),
        ));
        w.u8(MANIFEST_V1);
        w.bytes(self.media_type.as_bytes());
        w.u64(self.size);
        w.u64(self.created_unix_ms);
        w.u32(self.parents);
        w.u32(self.tags);
        for list in [&self.blobs, &self.manifests] {
            w.u32(list.len() as u32);
            for d in list {
                w.digest(d);
            }
        }
        w.opt_bytes(self.subject.as_ref().map(|d| d.to_key()).as_deref());
        w.opt_bytes(self.artifact_type.as_deref().map(str::as_bytes));
        w.0
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        let mut r = R(b);
        if r.u8()? != MANIFEST_V1 {
            return None;
        }
        let m = ManifestMeta {
            media_type: r.string()?,
            size: r.u64()?,
            created_unix_ms: r.u64()?,
            parents: r.u32()?,
            tags: r.u32()?,
            blobs: r.digests()?,
            manifests: r.digests()?,
            subject: r.opt(|r| r.digest())?,
            artifact_type: r.opt(|r| r.string())?,
        };
        r.0.is_empty().then_some(m)
    }

    /// Every blob reference this manifest row holds: itself, its blobs and
    /// its child manifests (each once).
    pub fn held_refs<'a>(&'a self, own: &'a Digest) -> impl Iterator<Item = &'a Digest> {
        std::iter::once(own)
            .chain(self.blobs.iter())
            .chain(self.manifests.iter())
    }
}

/// A timestamp row value (links, repositories).
pub fn encode_time(unix_ms: u64) -> Vec<u8> {
    let mut v = vec![1u8];
    v.extend_from_slice(&unix_ms.to_le_bytes());
    v
}

/// The time in a timestamp row value.
pub fn decode_time(v: &[u8]) -> Option<u64> {
    match v {
        [1, rest @ ..] if rest.len() == 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(rest);
            Some(u64::from_le_bytes(b))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(i: u8) -> Digest {
        Digest::sha256_of(&[i])
    }

    #[test]
    fn manifest_meta_roundtrip() {
        let m = ManifestMeta {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: 1234,
            created_unix_ms: 99,
            parents: 2,
            tags: 5,
            blobs: vec![d(1), d(2)],
            manifests: vec![d(3)],
            subject: Some(d(4)),
            artifact_type: Some("application/vnd.example+type".into()),
        };
        assert_eq!(ManifestMeta::decode(&m.encode()), Some(m.clone()));
        let plain = ManifestMeta {
            subject: None,
            artifact_type: None,
            ..m
        };
        assert_eq!(ManifestMeta::decode(&plain.encode()), Some(plain));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = ManifestMeta::decode(&bytes);
        }
    }
}
