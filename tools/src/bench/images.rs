//! The `images` scenario: a corpus of OCI image layouts (benches/corpus.py)
//! pushed as skopeo pushes (a HEAD for each blob, an upload of those the
//! registry lacks, child manifests by digest, then the top manifest by
//! tag) and pulled back as clients pull (manifest by tag, then every blob),
//! every byte checked.

use super::client::{Conn, FileBody};
use super::scenarios::{expect, put_upload, Outcome, Plan, Tally};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Manifest media types a pull accepts.
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// One image of the corpus: its layout and the tag it is pushed under.
struct Layout {
    dir: PathBuf,
    tag: String,
}

fn layouts(corpus: &Path) -> Result<Vec<Layout>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(corpus).with_context(|| format!("reading {}", corpus.display()))? {
        let dir = e?.path();
        if dir.join("index.json").is_file() {
            let tag = dir
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("image")
                .to_string();
            out.push(Layout { dir, tag });
        }
    }
    out.sort_by(|a, b| a.tag.cmp(&b.tag));
    if out.is_empty() {
        bail!(
            "no OCI layouts under {} (run benches/corpus.py)",
            corpus.display()
        );
    }
    Ok(out)
}

fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf> {
    let (alg, hex) = digest.split_once(':').context("bad digest")?;
    Ok(layout.join("blobs").join(alg).join(hex))
}

fn read_json(layout: &Path, digest: &str) -> Result<(Vec<u8>, Value)> {
    let bytes = std::fs::read(blob_path(layout, digest)?)?;
    let v = serde_json::from_slice(&bytes)?;
    Ok((bytes, v))
}

/// The top manifest descriptor of a layout (its index's first entry).
fn top(layout: &Path) -> Result<(String, String)> {
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let m = &index["manifests"][0];
    Ok((
        m["digest"]
            .as_str()
            .context("no manifest in index.json")?
            .to_string(),
        m["mediaType"]
            .as_str()
            .unwrap_or("application/vnd.oci.image.manifest.v1+json")
            .to_string(),
    ))
}

/// Blobs a manifest (or, through its children, an index) names.
fn blobs_of(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(d) = v["config"]["digest"].as_str() {
        out.push(d.to_string());
    }
    for l in v["layers"].as_array().into_iter().flatten() {
        if let Some(d) = l["digest"].as_str() {
            out.push(d.to_string());
        }
    }
    out
}

/// Pushes one blob unless the repository has it; returns bytes uploaded.
async fn push_blob(c: &mut Conn, repo: &str, layout: &Path, digest: &str) -> Result<u64> {
    let head = c
        .call(
            "HEAD",
            &format!("/v2/{repo}/blobs/{digest}"),
            &[],
            Bytes::new(),
        )
        .await?;
    if head.status == 200 {
        return Ok(0);
    }
    let body = FileBody::open(&blob_path(layout, digest)?)?;
    let len = body.len();
    put_upload(c, repo, digest, len, body).await?;
    Ok(len)
}

/// Pushes a manifest (after its blobs, or its children for an index).
async fn push_manifest(
    c: &mut Conn,
    repo: &str,
    layout: &Path,
    digest: &str,
    media_type: &str,
    reference: &str,
) -> Result<u64> {
    let (bytes, v) = read_json(layout, digest)?;
    let mut sent = 0u64;
    for child in v["manifests"].as_array().into_iter().flatten() {
        let (Some(d), mt) = (child["digest"].as_str(), child["mediaType"].as_str()) else {
            continue;
        };
        let mt = mt.unwrap_or("application/vnd.oci.image.manifest.v1+json");
        sent += Box::pin(push_manifest(c, repo, layout, d, mt, d)).await?;
    }
    for b in blobs_of(&v) {
        sent += push_blob(c, repo, layout, &b).await?;
    }
    let r = c
        .call(
            "PUT",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("content-type", media_type)],
            Bytes::from(bytes.clone()),
        )
        .await?;
    expect(r.status, 201, "PUT manifest", &r.body)?;
    Ok(sent + bytes.len() as u64)
}

/// Pulls a manifest and everything it names, checking every digest.
async fn pull(c: &mut Conn, repo: &str, reference: &str, want: &str) -> Result<u64> {
    let r = c
        .call(
            "GET",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("accept", ACCEPT)],
            Bytes::new(),
        )
        .await?;
    expect(r.status, 200, "GET manifest", &r.body)?;
    let got = {
        use sha2::Digest as _;
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&r.body)))
    };
    if got != want {
        bail!("manifest {repo}:{reference} hashes to {got}, not {want}");
    }
    let v: Value = serde_json::from_slice(&r.body)?;
    let mut read = r.body.len() as u64;
    for child in v["manifests"].as_array().into_iter().flatten() {
        if let Some(d) = child["digest"].as_str() {
            read += Box::pin(pull(c, repo, d, d)).await?;
        }
    }
    for b in blobs_of(&v) {
        read += c.get_verified(&format!("/v2/{repo}/blobs/{b}"), &b).await?;
    }
    Ok(read)
}

/// Every image of the corpus pushed, then pulled, one client at a time
/// (as one skopeo or docker does).
pub async fn images(p: &Plan, corpus: &Path) -> Result<Vec<Outcome>> {
    let images = layouts(corpus)?;
    let repo = format!("{}/corpus", p.repo);
    let mut c = Conn::open(&p.host).await?;
    let push = Tally::default();
    let t = Instant::now();
    let mut tops = Vec::new();
    for img in &images {
        let started = Instant::now();
        let (digest, media_type) = top(&img.dir)?;
        match push_manifest(&mut c, &repo, &img.dir, &digest, &media_type, &img.tag).await {
            Ok(n) => push.ok(n, started),
            Err(e) => push.fail(e),
        }
        tops.push(digest);
    }
    let mut out = vec![push.outcome("images-push", t.elapsed().as_secs_f64())];
    let pulled = Tally::default();
    let t = Instant::now();
    for (img, digest) in images.iter().zip(&tops) {
        let started = Instant::now();
        match pull(&mut c, &repo, &img.tag, digest).await {
            Ok(n) => pulled.ok(n, started),
            Err(e) => pulled.fail(e),
        }
    }
    out.push(pulled.outcome("images-pull", t.elapsed().as_secs_f64()));
    Ok(out)
}
