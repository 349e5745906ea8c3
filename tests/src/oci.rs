//! Building and pushing OCI content through the Registry V2 API, and
//! writing OCI image layouts for real clients (skopeo, podman).

use crate::registry::{Client, Resp};
use serde_json::{json, Value};
use sha2::Digest as _;
use std::path::Path;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

pub fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

pub fn descriptor(media_type: &str, b: &[u8]) -> Value {
    json!({ "mediaType": media_type, "digest": digest(b), "size": b.len() })
}

/// An image: config, layers, and the manifest naming them.
#[derive(Clone, Debug)]
pub struct Image {
    pub config: Vec<u8>,
    pub layers: Vec<Vec<u8>>,
    pub manifest: Vec<u8>,
}

impl Image {
    pub fn new(config: Vec<u8>, layers: Vec<Vec<u8>>) -> Image {
        let m = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, &config),
            "layers": layers.iter().map(|l| descriptor(OCI_LAYER, l)).collect::<Vec<_>>(),
        });
        Image {
            config,
            layers,
            manifest: serde_json::to_vec_pretty(&m).unwrap_or_default(),
        }
    }

    /// An image with a config unique to `name` over the given layers.
    pub fn with_layers(name: &str, layers: Vec<Vec<u8>>) -> Image {
        let config = json!({
            "architecture": "amd64", "os": "linux",
            "config": { "Labels": { "name": name } },
            "rootfs": { "type": "layers", "diff_ids": layers.iter().map(|l| diff_id(l)).collect::<Vec<_>>() },
            "history": (0..layers.len()).map(|i| json!({ "created_by": format!("layer {i}") })).collect::<Vec<_>>(),
        });
        Image::new(serde_json::to_vec(&config).unwrap_or_default(), layers)
    }

    pub fn digest(&self) -> String {
        digest(&self.manifest)
    }

    pub fn blobs(&self) -> impl Iterator<Item = &Vec<u8>> {
        std::iter::once(&self.config).chain(self.layers.iter())
    }
}

/// The digest of a layer's uncompressed content (gzip layers are
/// decompressed with gzip(1)); clients that unpack layers check it.
pub fn diff_id(layer: &[u8]) -> String {
    if !layer.starts_with(&[0x1f, 0x8b]) {
        return digest(layer);
    }
    use std::io::Write;
    let mut child = std::process::Command::new("gzip")
        .arg("-dc")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("gzip: {e}"));
    let mut stdin = child.stdin.take().unwrap_or_else(|| panic!("gzip stdin"));
    let input = layer.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("gzip: {e}"));
    let _ = feeder.join();
    assert!(out.status.success(), "gzip -dc failed");
    digest(&out.stdout)
}

/// Uploads a blob in one request (`POST ?digest=`); asserts 201.
pub fn push_blob(c: &Client, repo: &str, b: &[u8]) -> String {
    let d = digest(b);
    let r = c.req(
        "POST",
        &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
        &[("content-type", "application/octet-stream")],
        b,
    );
    assert_eq!(
        r.status,
        201,
        "push blob: {}",
        String::from_utf8_lossy(&r.body)
    );
    d
}

pub fn put_manifest(
    c: &Client,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) -> Resp {
    c.req(
        "PUT",
        &format!("/v2/{repo}/manifests/{reference}"),
        &[("content-type", media_type)],
        body,
    )
}

/// Pushes every blob, then the manifest under `tag`; asserts success.
pub fn push_image(c: &Client, repo: &str, tag: &str, img: &Image) {
    for b in img.blobs() {
        push_blob(c, repo, b);
    }
    let r = put_manifest(c, repo, tag, OCI_MANIFEST, &img.manifest);
    assert_eq!(
        r.status,
        201,
        "push manifest: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.header("docker-content-digest"), Some(img.digest()));
}

/// Pulls an image by tag and checks every byte against `img`.
pub fn assert_pulls(c: &Client, repo: &str, tag: &str, img: &Image) {
    let r = c.req(
        "GET",
        &format!("/v2/{repo}/manifests/{tag}"),
        &[("accept", OCI_MANIFEST)],
        b"",
    );
    assert_eq!(
        r.status,
        200,
        "pull {repo}:{tag}: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.body, img.manifest, "manifest bytes of {repo}:{tag}");
    for b in img.blobs() {
        let r = c.get(&format!("/v2/{repo}/blobs/{}", digest(b)));
        assert_eq!(r.status, 200);
        assert!(r.body == *b, "blob {} of {repo}:{tag} differs", digest(b));
    }
}

/// A real gzipped tar of the given files (made with tar(1) and gzip(1)).
pub fn tar_gz(files: &[(&str, &[u8])]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    for (name, content) in files {
        let p = dir.path().join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("{e}"));
        }
        std::fs::write(&p, content).unwrap_or_else(|e| panic!("{e}"));
        if content.starts_with(b"\x7fELF") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
    let out = std::process::Command::new("tar")
        .args(["--sort=name", "--mtime=@0", "--owner=0", "--group=0", "-C"])
        .arg(dir.path())
        .args(["-czf", "-", "."])
        .env("GZIP", "-n")
        .output()
        .unwrap_or_else(|e| panic!("tar: {e}"));
    assert!(out.status.success(), "tar failed");
    out.stdout
}

/// Writes `img` as an OCI image layout under `dir`, tagged `tag`.
pub fn write_layout(dir: &Path, img: &Image, tag: &str) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap_or_else(|e| panic!("{e}"));
    for b in img.blobs().chain(std::iter::once(&img.manifest)) {
        let d = digest(b);
        std::fs::write(blobs.join(&d["sha256:".len()..]), b).unwrap_or_else(|e| panic!("{e}"));
    }
    let mut m = descriptor(OCI_MANIFEST, &img.manifest);
    m["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
    let index = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [m] });
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).unwrap_or_default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Deterministic bytes for test blobs.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0u8; len];
    rand::rngs::SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}
