//! Benchmark corpus: realistic container-layer bytes made from this machine's
//! own files, cached outside the repository.
//!
//! - tar: an uncompressed tar stream of /usr (what a layer holds before gzip);
//! - gzip: a gzip stream (level 6, as docker and buildah write layers) of a
//!   different part of /usr, which zstd cannot shrink.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn cache_dir() -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    base.join("orlop-bench-corpus")
}

fn tar_of(dirs: &[&str], limit: usize, mut sink: impl FnMut(&[u8]) -> bool) {
    let mut child = Command::new("tar")
        .arg("-cf")
        .arg("-")
        .arg("--ignore-failed-read")
        .arg("-C")
        .arg("/")
        .args(dirs)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("tar: {e}"));
    let mut out = child.stdout.take().unwrap_or_else(|| panic!("tar stdout"));
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    while total < limit {
        let n = out.read(&mut buf).unwrap_or(0);
        if n == 0 || !sink(&buf[..n]) {
            break;
        }
        total += n;
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn cached(name: &str, make: impl FnOnce() -> Vec<u8>) -> Vec<u8> {
    let path = cache_dir().join(name);
    if let Ok(v) = std::fs::read(&path) {
        return v;
    }
    let v = make();
    let _ = std::fs::create_dir_all(cache_dir());
    let _ = std::fs::write(&path, &v);
    v
}

/// `bytes` of uncompressed tar data.
pub fn tar_corpus(bytes: usize) -> Vec<u8> {
    cached(&format!("tar-{bytes}"), || {
        let mut v = Vec::with_capacity(bytes);
        tar_of(&["usr/lib", "usr/share", "usr/bin"], bytes, |b| {
            v.extend_from_slice(b);
            v.len() < bytes
        });
        assert!(v.len() >= bytes, "/usr holds less than {bytes} bytes");
        v.truncate(bytes);
        v
    })
}

/// `bytes` of a gzip-compressed tar stream.
pub fn gzip_corpus(bytes: usize) -> Vec<u8> {
    cached(&format!("gzip-{bytes}"), || {
        let mut enc = flate2::write::GzEncoder::new(
            Vec::with_capacity(bytes + (1 << 20)),
            flate2::Compression::new(6),
        );
        tar_of(
            &[
                "usr/share",
                "usr/lib",
                "usr/libexec",
                "usr/include",
                "usr/local",
            ],
            usize::MAX,
            |b| {
                enc.write_all(b).unwrap_or_else(|e| panic!("{e}"));
                enc.get_ref().len() < bytes
            },
        );
        let mut v = enc.finish().unwrap_or_else(|e| panic!("{e}"));
        assert!(
            v.len() >= bytes,
            "/usr compresses to less than {bytes} bytes"
        );
        v.truncate(bytes);
        v
    })
}
