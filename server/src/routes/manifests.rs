//! Manifests: PUT (validate, store the bytes as a blob, record rows and
//! references in one transaction), GET and HEAD by tag or digest with
//! content negotiation, DELETE by digest or by tag.

use crate::app::{blocking, App, Req};
use crate::error::{ApiError, ApiResult};
use crate::http::{header, read_body, respond, Resp};
use crate::manifest::{self, Kind};
use crate::meta::{check_child, now_unix_ms, ManifestMeta, NewManifest, Registry};
use crate::names::{Reference, RepoName};
use bytes::Bytes;
use http::HeaderMap;
use orlop_engine::{Digest, DigestAlgorithm};
use std::sync::Arc;

pub async fn put(
    app: &Arc<App>,
    repo: RepoName,
    reference: Reference,
    req: Req,
) -> ApiResult<Resp> {
    let content_type = header(req.headers(), "content-type").map(str::to_string);
    let limit = app.cfg.manifest_bytes_max;
    if let Some(n) = header(req.headers(), "content-length").and_then(|v| v.parse::<u64>().ok()) {
        if n > limit {
            return Err(ApiError::TooLarge { size: n, limit });
        }
    }
    let mut body = req.into_body();
    let bytes = read_body(&mut body, limit, app.body_idle()).await?;
    app.metrics.received_bytes.inc_by(bytes.len() as u64);
    let parsed = manifest::parse(&bytes, content_type.as_deref())?;
    let alg = match &reference {
        Reference::Digest(d) => d.algorithm(),
        Reference::Tag(_) => DigestAlgorithm::Sha256,
    };
    let digest = manifest::digest_of(&bytes, alg)?;
    if let Reference::Digest(d) = &reference {
        if *d != digest {
            return Err(ApiError::DigestInvalid(format!(
                "the manifest's digest is {digest}, not {d}"
            )));
        }
    }
    let tag = match reference {
        Reference::Tag(t) => Some(t),
        Reference::Digest(_) => None,
    };
    let nm = NewManifest {
        meta: ManifestMeta {
            media_type: parsed.media_type.clone(),
            size: bytes.len() as u64,
            created_unix_ms: now_unix_ms(),
            parents: 0,
            tags: 0,
            blobs: parsed.blobs.iter().map(|(d, _)| d.clone()).collect(),
            manifests: parsed.children.iter().map(|c| c.digest.clone()).collect(),
            subject: parsed.subject.clone(),
            artifact_type: parsed.artifact_type.clone(),
        },
        blob_sizes: parsed.blobs.clone(),
        child_sizes: parsed
            .children
            .iter()
            .map(|c| (c.digest.clone(), c.size))
            .collect(),
        referrer: parsed
            .subject
            .as_ref()
            .map(|_| manifest::referrer_descriptor(&parsed, &digest, bytes.len() as u64)),
        digest: digest.clone(),
    };
    let reg = app.registry.clone();
    let repo2 = repo.clone();
    blocking(move || {
        // Check before storing anything, so a manifest naming missing
        // content leaves the store unchanged; the transaction checks again.
        precheck(&reg, &repo2, &nm)?;
        reg.store().put(&bytes, Some(nm.digest.clone()))?;
        reg.put_manifest(&repo2, &nm, tag.as_ref())
    })
    .await?;
    let mut hs = vec![
        ("Location", format!("/v2/{repo}/manifests/{digest}")),
        ("Docker-Content-Digest", digest.to_string()),
        ("Content-Length", "0".to_string()),
    ];
    if let Some(s) = &parsed.subject {
        hs.push(("OCI-Subject", s.to_string()));
    }
    Ok(respond(201, &hs, Bytes::new()))
}

fn precheck(reg: &Registry, repo: &RepoName, nm: &NewManifest) -> ApiResult<()> {
    if reg.manifest(repo, &nm.digest)?.is_some() {
        return Ok(());
    }
    for (d, size) in &nm.blob_sizes {
        reg.check_blob(d, *size)?;
    }
    for (d, size) in &nm.child_sizes {
        check_child(reg.manifest(repo, d)?.as_mut(), d, *size)?;
    }
    Ok(())
}

/// Media types named by the `Accept` headers (parameters dropped); empty
/// means anything.
fn accepted(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all("accept")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.split(';').next().unwrap_or("").trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

fn resolve(reg: &Registry, repo: &RepoName, r: &Reference) -> ApiResult<(Digest, ManifestMeta)> {
    let d = match r {
        Reference::Digest(d) => d.clone(),
        Reference::Tag(t) => match reg.tag(repo, t)? {
            Some(d) => d,
            None if !reg.repo_exists(repo)? => return Err(ApiError::NameUnknown(repo.to_string())),
            None => return Err(ApiError::ManifestUnknown(format!("{repo}:{t}"))),
        },
    };
    let meta = reg
        .manifest(repo, &d)?
        .ok_or_else(|| ApiError::ManifestUnknown(format!("{repo}@{d}")))?;
    Ok((d, meta))
}

pub async fn get(
    app: &Arc<App>,
    repo: RepoName,
    reference: Reference,
    head: bool,
    headers: &HeaderMap,
) -> ApiResult<Resp> {
    let accept = accepted(headers);
    let reg = app.registry.clone();
    let by_tag = matches!(reference, Reference::Tag(_));
    let (digest, meta, body) = blocking(move || {
        let (mut d, mut meta) = resolve(&reg, &repo, &reference)?;
        let mut body = reg.store().get(&d)?;
        let ok = |t: &str| accept.is_empty() || accept.iter().any(|a| a == t || a == "*/*");
        // A client asking by tag that cannot take an index gets the
        // linux/amd64 image it names, as Docker clients expect.
        if by_tag
            && manifest::kind_of(&meta.media_type) == Some(Kind::Index)
            && !ok(&meta.media_type)
        {
            if let Some(child) = manifest::pick_platform(&body) {
                if let Some(cm) = reg.manifest(&repo, &child)? {
                    if ok(&cm.media_type) {
                        body = reg.store().get(&child)?;
                        d = child;
                        meta = cm;
                    }
                }
            }
        }
        Ok((d, meta, body))
    })
    .await?;
    let hs = [
        ("Content-Type", meta.media_type.clone()),
        ("Docker-Content-Digest", digest.to_string()),
        ("ETag", format!("\"{digest}\"")),
        ("Content-Length", body.len().to_string()),
    ];
    Ok(respond(200, &hs, if head { Vec::new() } else { body }))
}

pub async fn delete(app: &Arc<App>, repo: RepoName, reference: Reference) -> ApiResult<Resp> {
    if !app.cfg.delete_enabled {
        return Err(ApiError::Unsupported(
            "deletes are disabled on this registry".into(),
        ));
    }
    let reg = app.registry.clone();
    blocking(move || match &reference {
        Reference::Digest(d) => reg.delete_manifest(&repo, d),
        Reference::Tag(t) => {
            if reg.delete_tag(&repo, t)? {
                Ok(())
            } else {
                Err(ApiError::ManifestUnknown(format!("{repo}:{t}")))
            }
        }
    })
    .await?;
    Ok(respond(
        202,
        &[("Content-Length", "0".into())],
        Bytes::new(),
    ))
}
