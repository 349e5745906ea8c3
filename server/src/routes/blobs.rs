//! Blobs: HEAD and GET (whole or one range, streamed and verified by the
//! engine chunk by chunk) and DELETE of a repository's link.

use crate::app::{blocking, App};
use crate::error::{ApiError, ApiResult};
use crate::http::{header, parse_range, respond, ChannelBody, Resp};
use crate::names::RepoName;
use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use orlop_engine::{BlobInfo, Digest};
use std::sync::Arc;

/// Verified batches (each up to the engine's read-ahead, 2 MiB) queued
/// between the engine reader and the connection, besides the one being
/// sent and the one being read.
const READ_QUEUE_BATCHES: usize = 1;

/// The blob, if `repo` links it.
pub async fn linked_blob(app: &App, repo: &RepoName, d: &Digest) -> ApiResult<BlobInfo> {
    let reg = app.registry.clone();
    let (repo, d) = (repo.clone(), d.clone());
    // A link found older than half the grace is renewed (at most one write
    // per link that often); the sweep spares links used within 1.5 x grace,
    // so a client told "exists" has at least the grace to push its manifest.
    // Also with periodic collection off: a run can be asked for (SIGUSR1).
    let touch_ms = reg.link_touch_after_ms();
    blocking(move || {
        if !reg.blob_linked_touch(&repo, &d, touch_ms)? {
            return Err(ApiError::BlobUnknown(d));
        }
        reg.store().stat(&d)?.ok_or(ApiError::BlobUnknown(d))
    })
    .await
}

pub async fn get(
    app: &Arc<App>,
    repo: RepoName,
    d: Digest,
    head: bool,
    headers: &HeaderMap,
) -> ApiResult<Resp> {
    let info = linked_blob(app, &repo, &d).await?;
    let range = parse_range(header(headers, "range"), info.size)?;
    let (status, offset, len) = match range {
        Some((o, l)) => (206, o, l),
        None => (200, 0, info.size),
    };
    let mut hs = vec![
        ("Content-Type", "application/octet-stream".to_string()),
        ("Docker-Content-Digest", d.to_string()),
        ("Accept-Ranges", "bytes".to_string()),
        ("ETag", format!("\"{d}\"")),
        ("Content-Length", len.to_string()),
    ];
    if status == 206 {
        hs.push((
            "Content-Range",
            format!("bytes {offset}-{}/{}", offset + len - 1, info.size),
        ));
    }
    if head {
        return Ok(respond(status, &hs, Bytes::new()));
    }
    let body = stream_blob(app, d, offset, len).await?;
    let mut r = respond(status, &hs, Bytes::new());
    *r.body_mut() = body.boxed_unsync();
    Ok(r)
}

/// Starts streaming `len` bytes of a blob from `offset`. The first piece is
/// read and verified before the response head goes out, so a damaged blob
/// gets an error status; damage found later cuts the connection.
pub async fn stream_blob(app: &App, d: Digest, offset: u64, len: u64) -> ApiResult<ChannelBody> {
    let store = app.store().clone();
    let permit = app
        .downloads
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::Unavailable("shutting down".into()))?;
    let idle = app.body_idle();
    let rt = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::mpsc::channel(READ_QUEUE_BATCHES);
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<ApiResult<()>>();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let mut reader = match store.range_reader(&d, offset, len) {
            Ok(r) => r,
            Err(e) => {
                let _ = first_tx.send(Err(e.into()));
                return;
            }
        };
        let first = match reader.next_batch() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(blob = %d, error = %e, "blob read failed");
                let _ = first_tx.send(Err(e.into()));
                return;
            }
        };
        let _ = first_tx.send(Ok(()));
        let mut next = first;
        while let Some(piece) = next {
            // A client that stops reading for `idle` loses the response.
            match rt.block_on(tokio::time::timeout(idle, tx.send(Ok(piece)))) {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return, // the client went away
                Err(_) => {
                    tracing::warn!(blob = %d, "client stalled; cutting the response");
                    return;
                }
            }
            next = match reader.next_batch() {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(blob = %d, error = %e, "blob read failed mid-stream; cutting the response");
                    let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                    return;
                }
            };
        }
    });
    first_rx
        .await
        .map_err(|_| ApiError::Internal("blob reader stopped".into()))??;
    Ok(ChannelBody::new(rx, len))
}

pub async fn delete(app: &Arc<App>, repo: RepoName, d: Digest) -> ApiResult<Resp> {
    if !app.cfg.delete_enabled {
        return Err(ApiError::Unsupported(
            "deletes are disabled on this registry".into(),
        ));
    }
    let reg = app.registry.clone();
    let d2 = d.clone();
    let found = blocking(move || reg.unlink_blob(&repo, &d2)).await?;
    if !found {
        return Err(ApiError::BlobUnknown(d));
    }
    Ok(respond(
        202,
        &[("Docker-Content-Digest", d.to_string())],
        Bytes::new(),
    ))
}
