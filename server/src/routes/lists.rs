//! Listings: tags of a repository, the catalog of repositories (both with
//! `n` and `last` pagination and `Link` headers), and referrers.

use crate::app::{blocking, App};
use crate::error::{ApiError, ApiResult};
use crate::http::{query_get, respond, Resp};
use crate::manifest::OCI_INDEX;
use crate::names::{parse_digest, RepoName};
use orlop_engine::Digest;
use serde_json::{json, Value};
use std::sync::Arc;

/// The page size asked for with `n`, capped at `list_page_max`.
fn page_size(app: &App, q: &[(String, String)]) -> ApiResult<usize> {
    match query_get(q, "n") {
        None => Ok(app.cfg.list_page_max),
        Some(n) => n
            .parse::<usize>()
            .map(|n| n.min(app.cfg.list_page_max))
            .map_err(|_| ApiError::PaginationNumberInvalid(n.chars().take(40).collect())),
    }
}

fn next_link(path: &str, n: usize, last: &str) -> String {
    let last: String = form_urlencoded::byte_serialize(last.as_bytes()).collect();
    format!("<{path}?n={n}&last={last}>; rel=\"next\"")
}

fn json_page(body: Value, link: Option<String>) -> Resp {
    let mut hs = vec![("Content-Type", "application/json".to_string())];
    if let Some(l) = link {
        hs.push(("Link", l));
    }
    respond(200, &hs, serde_json::to_vec(&body).unwrap_or_default())
}

pub async fn tags(app: &Arc<App>, repo: RepoName, q: &[(String, String)]) -> ApiResult<Resp> {
    let n = page_size(app, q)?;
    let last = query_get(q, "last").map(str::to_string);
    let reg = app.registry.clone();
    let r2 = repo.clone();
    let (tags, more) = blocking(move || {
        if !reg.repo_exists(&r2)? {
            return Err(ApiError::NameUnknown(r2.to_string()));
        }
        reg.tags(&r2, last.as_deref(), n)
    })
    .await?;
    let link = match tags.last() {
        Some(l) if more => Some(next_link(&format!("/v2/{repo}/tags/list"), n, l)),
        _ => None,
    };
    Ok(json_page(
        json!({ "name": repo.as_str(), "tags": tags }),
        link,
    ))
}

pub async fn catalog(app: &Arc<App>, q: &[(String, String)]) -> ApiResult<Resp> {
    let n = page_size(app, q)?;
    let last = query_get(q, "last").map(str::to_string);
    let reg = app.registry.clone();
    let (repos, more) = blocking(move || reg.repos(last.as_deref(), n)).await?;
    let link = match repos.last() {
        Some(l) if more => Some(next_link("/v2/_catalog", n, l)),
        _ => None,
    };
    Ok(json_page(json!({ "repositories": repos }), link))
}

/// Referrer rows read per scan while filtering.
const REFERRERS_SCAN_PAGE: usize = 1024;

pub async fn referrers(
    app: &Arc<App>,
    repo: RepoName,
    subject: Digest,
    q: &[(String, String)],
) -> ApiResult<Resp> {
    let filter = query_get(q, "artifactType").map(str::to_string);
    let after = query_get(q, "last").map(parse_digest).transpose()?;
    let page = page_size(app, q)?;
    let reg = app.registry.clone();
    let (f2, r2, s2) = (filter.clone(), repo.clone(), subject.clone());
    let (manifests, last) = blocking(move || {
        let mut out = Vec::new();
        let mut cursor = after;
        loop {
            let rows = reg.referrers(&r2, &s2, cursor.as_ref(), REFERRERS_SCAN_PAGE)?;
            let Some((last, _)) = rows.last() else {
                return Ok((out, None));
            };
            cursor = Some(last.clone());
            for (d, row) in rows {
                let Ok(v) = serde_json::from_slice::<Value>(&row) else {
                    continue;
                };
                let matches = match &f2 {
                    Some(t) => v.get("artifactType").and_then(Value::as_str) == Some(t.as_str()),
                    None => true,
                };
                if !matches {
                    continue;
                }
                if out.len() == page {
                    // One more match exists: the page ends before it.
                    let last_listed = out.last().map(|(d, _): &(Digest, Value)| d.clone());
                    return Ok((out, last_listed));
                }
                out.push((d, v));
            }
        }
    })
    .await?;
    let body = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
    });
    let mut hs = vec![("Content-Type", OCI_INDEX.to_string())];
    if filter.is_some() {
        hs.push(("OCI-Filters-Applied", "artifactType".to_string()));
    }
    if let Some(last) = last {
        let mut link = format!("/v2/{repo}/referrers/{subject}?n={page}&last={last}");
        if let Some(f) = &filter {
            let f: String = form_urlencoded::byte_serialize(f.as_bytes()).collect();
            link.push_str(&format!("&artifactType={f}"));
        }
        hs.push(("Link", format!("<{link}>; rel=\"next\"")));
    }
    Ok(respond(
        200,
        &hs,
        serde_json::to_vec(&body).unwrap_or_default(),
    ))
}
