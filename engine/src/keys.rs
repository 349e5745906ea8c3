//! The store's master key and the subkeys derived from it.
//!
//! One 256-bit master key per store. Three independent subkeys are derived
//! from it with BLAKE3's key derivation mode: the chunk naming key (keyed
//! BLAKE3 chunk IDs), the chunk encryption key (AES-256-GCM) and a key check
//! value kept in the index so that opening with the wrong key is a clear error.

use crate::config::KeySource;
use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

/// Environment variable read by `KeySource::Env` when the operator names none.
pub const KEY_ENV_VAR: &str = "ORLOP_STORE_KEY";
const KEY_FILE_PREFIX: &str = "orlop-store-key-v1:";

#[derive(Clone)]
pub struct MasterKey([u8; 32]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

pub(crate) struct Subkeys {
    pub naming: [u8; 32],
    pub check: [u8; 32],
}

impl MasterKey {
    pub fn from_bytes(b: [u8; 32]) -> Self {
        MasterKey(b)
    }

    pub fn generate() -> Result<Self> {
        let mut b = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
            .map_err(|_| Error::InvalidKey("the system random generator failed".into()))?;
        Ok(MasterKey(b))
    }

    /// Parses the text form `orlop-store-key-v1:<64 hex digits>` (the prefix is optional).
    pub fn parse(text: &str) -> Result<Self> {
        let t = text.trim();
        let t = t.strip_prefix(KEY_FILE_PREFIX).unwrap_or(t);
        let raw = hex::decode(t).map_err(|_| Error::InvalidKey("key is not hex".into()))?;
        let b: [u8; 32] = raw
            .try_into()
            .map_err(|_| Error::InvalidKey("key must be 32 bytes (64 hex digits)".into()))?;
        Ok(MasterKey(b))
    }

    pub fn to_text(&self) -> String {
        format!("{KEY_FILE_PREFIX}{}\n", hex::encode(self.0))
    }

    pub(crate) fn subkeys(&self) -> Subkeys {
        Subkeys {
            naming: blake3::derive_key("orlop 2026-11 chunk naming key v1", &self.0),
            check: blake3::derive_key("orlop 2026-11 key check value v1", &self.0),
        }
    }

    /// The chunk encryption key of one store. Mixing in the store id keeps two
    /// stores that share a master key from ever encrypting under the same
    /// (key, nonce) pair, since both number segments from 1.
    pub(crate) fn encryption_key(&self, store_id: &[u8; 16]) -> [u8; 32] {
        let mut material = [0u8; 48];
        material[..32].copy_from_slice(&self.0);
        material[32..].copy_from_slice(store_id);
        blake3::derive_key("orlop 2026-11 chunk encryption key v1", &material)
    }

    /// Resolves a key source, creating a key file when the source is a file
    /// that does not exist yet and `may_create` holds.
    pub fn load(source: &KeySource, data_dir: &Path, may_create: bool) -> Result<Self> {
        match source {
            KeySource::Bytes(b) => Ok(MasterKey(*b)),
            KeySource::Env(var) => {
                let v = std::env::var(var).map_err(|_| {
                    Error::InvalidKey(format!("environment variable {var} is not set"))
                })?;
                MasterKey::parse(&v)
            }
            KeySource::Default => Self::load_file(&data_dir.join("store.key"), may_create),
            KeySource::File(p) => Self::load_file(p, may_create),
        }
    }

    fn load_file(path: &Path, may_create: bool) -> Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => MasterKey::parse(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && may_create => {
                let key = MasterKey::generate()?;
                key.write_file(path)?;
                tracing::info!(path = %path.display(), "created a new store key (mode 0600)");
                Ok(key)
            }
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// Writes the key with mode 0600, refusing to overwrite an existing file.
    /// Atomic: the key goes to a temporary file, synced, then linked to
    /// `path` (which fails if `path` exists), so a crash leaves either no
    /// key file or a whole one.
    pub fn write_file(&self, path: &Path) -> Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        // A bare file name's directory is the current one.
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".new");
        let tmp = std::path::PathBuf::from(tmp_name);
        // A leftover of a write cut short: never linked, so never used.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&tmp, e)),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        f.write_all(self.to_text().as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        let linked = std::fs::hard_link(&tmp, path).map_err(|e| Error::io(path, e));
        let _ = std::fs::remove_file(&tmp);
        linked?;
        crate::io::sync_dir(parent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_text_roundtrip_and_subkeys_differ() {
        let k = MasterKey::from_bytes([7; 32]);
        let p = MasterKey::parse(&k.to_text()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.0, k.0);
        let s = k.subkeys();
        assert_ne!(s.naming, s.check);
        assert_ne!(k.encryption_key(&[1; 16]), k.encryption_key(&[2; 16]));
        assert_ne!(k.encryption_key(&[1; 16]), s.naming);
        assert!(MasterKey::parse("abcd").is_err());
    }

    #[test]
    fn key_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("k");
        let k = MasterKey::load(&KeySource::File(path.clone()), dir.path(), true)
            .unwrap_or_else(|e| panic!("{e}"));
        let mode = std::fs::metadata(&path)
            .map(|m| m.permissions().mode())
            .unwrap_or(0);
        assert_eq!(mode & 0o777, 0o600);
        let again = MasterKey::load(&KeySource::File(path.clone()), dir.path(), false)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again.0, k.0);
        // Never overwritten.
        assert!(MasterKey::generate()
            .and_then(|k2| k2.write_file(&path))
            .is_err());
        let kept = MasterKey::load(&KeySource::File(path), dir.path(), false)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(kept.0, k.0);
    }
}
