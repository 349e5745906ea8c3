//! Blob uploads: POST (start a session, single-request upload with
//! `digest`, or a cross-repository mount), PATCH (chunked with
//! `Content-Range`, or streamed), PUT (finish), GET (status) and DELETE
//! (cancel).

use crate::app::{blocking, App, Req};
use crate::error::{ApiError, ApiResult};
use crate::http::{header, next_data, parse_content_range, query_get, respond, upload_range, Resp};
use crate::names::{parse_digest, RepoName};
use crate::upload::{CutOffGuard, Origin, Session, State, WriterTask};
use bytes::Bytes;
use hyper::body::Incoming;
use orlop_engine::Digest;
use std::sync::Arc;
use std::time::Instant;

fn session_location(repo: &RepoName, id: &str) -> String {
    format!("/v2/{repo}/blobs/uploads/{id}")
}

fn session_headers(repo: &RepoName, id: &str, offset: u64) -> Vec<(&'static str, String)> {
    vec![
        ("Location", session_location(repo, id)),
        ("Range", upload_range(offset)),
        ("Docker-Upload-UUID", id.to_string()),
    ]
}

fn created(repo: &RepoName, d: &Digest) -> Resp {
    respond(
        201,
        &[
            ("Location", format!("/v2/{repo}/blobs/{d}")),
            ("Docker-Content-Digest", d.to_string()),
        ],
        Bytes::new(),
    )
}

/// Waits for a slot among the bodies streaming into the engine.
async fn stream_permit(app: &App) -> ApiResult<tokio::sync::SemaphorePermit<'_>> {
    app.streaming
        .acquire()
        .await
        .map_err(|_| ApiError::Unavailable("shutting down".into()))
}

/// Bytes of a body's frames (at most 64 KiB each: hyper's read buffer,
/// which also bounds a request head) gathered, uncopied, before they go to
/// the writer together: fewer, larger steps mean fewer thread hand-offs
/// down the write pipeline. The pipeline's memory bound scales with it, so
/// only a body streaming with at most [`FEW_STREAMS`] in all (its writer
/// then runs its pipeline on threads of its own) gathers
/// [`PIECE_BYTES_FEW`]; among more, each gathers [`PIECE_BYTES`].
const PIECE_BYTES: usize = 256 * 1024;
const PIECE_BYTES_FEW: usize = 1024 * 1024;
const FEW_STREAMS: usize = 2;

/// Frames smaller than this are copied into one piece rather than handed on
/// one by one: a body of tiny chunks (1-byte chunked encoding, say) must
/// not turn into hundreds of thousands of `Bytes` per group, each holding
/// a slice of hyper's read buffer.
const SMALL_FRAME_BYTES: usize = 16 * 1024;
/// Frames in one group, at most (with the small ones copied together).
const GROUP_FRAMES_MAX: usize = 64;

/// Body frames gathered for one hand-off to the writer.
#[derive(Default)]
struct Group {
    frames: Vec<bytes::Bytes>,
    /// Small frames, copied together.
    small: bytes::BytesMut,
    bytes: usize,
}

impl Group {
    fn add(&mut self, piece: bytes::Bytes) {
        self.bytes += piece.len();
        if piece.len() < SMALL_FRAME_BYTES {
            self.small.extend_from_slice(&piece);
            if self.small.len() >= SMALL_FRAME_BYTES {
                self.frames.push(self.small.split().freeze());
            }
            return;
        }
        if !self.small.is_empty() {
            self.frames.push(self.small.split().freeze());
        }
        self.frames.push(piece);
    }

    /// The frames so far, in order; the group starts again empty.
    fn take(&mut self) -> Vec<bytes::Bytes> {
        if !self.small.is_empty() {
            self.frames.push(self.small.split().freeze());
        }
        self.bytes = 0;
        std::mem::take(&mut self.frames)
    }
}

/// Streams a request body into a writer; returns the bytes it carried.
/// `before` is what the upload already holds (the size bound is per blob).
/// The caller holds a streaming permit.
async fn pump(app: &App, body: &mut Incoming, w: &WriterTask, before: u64) -> ApiResult<u64> {
    let limit = app.cfg.blob_bytes_max;
    let mut n = 0u64;
    let mut group = Group::default();
    let streams = app
        .cfg
        .uploads_streaming_max
        .saturating_sub(app.streaming.available_permits());
    let piece_bytes = match streams <= FEW_STREAMS {
        true => PIECE_BYTES_FEW,
        false => PIECE_BYTES,
    };
    while let Some(piece) = next_data(body, app.body_idle()).await? {
        n += piece.len() as u64;
        if before.saturating_add(n) > limit {
            return Err(ApiError::TooLarge {
                size: before.saturating_add(n),
                limit,
            });
        }
        app.metrics.received_bytes.inc_by(piece.len() as u64);
        group.add(piece);
        if group.bytes >= piece_bytes || group.frames.len() >= GROUP_FRAMES_MAX {
            w.write(group.take()).await?;
        }
    }
    let last = group.take();
    if !last.is_empty() {
        w.write(last).await?;
    }
    Ok(n)
}

async fn link(app: &App, repo: &RepoName, d: &Digest) -> ApiResult<()> {
    let reg = app.registry.clone();
    let (repo, d) = (repo.clone(), d.clone());
    blocking(move || reg.link_blob(&repo, &d)).await
}

/// Commits a writer, timing it, then links the blob into the repository.
async fn commit_and_link(app: &App, repo: &RepoName, w: WriterTask, d: Digest) -> ApiResult<()> {
    let t = Instant::now();
    let info = w.commit(Some(d)).await?;
    app.metrics
        .blob_commit_seconds
        .observe(t.elapsed().as_secs_f64());
    link(app, repo, &info.digest).await
}

/// Aborts held writes from before a restart (sessions that ended unused).
pub async fn abort_held(app: &App, held: Vec<orlop_engine::RecipeId>) {
    if held.is_empty() {
        return;
    }
    let store = app.store().clone();
    let r = blocking(move || {
        for r in held {
            store.abort_held(r)?;
        }
        Ok(())
    })
    .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "could not abort held uploads");
    }
}

pub async fn start(
    app: &Arc<App>,
    repo: RepoName,
    q: &[(String, String)],
    req: Req,
) -> ApiResult<Resp> {
    if let Some(m) = query_get(q, "mount") {
        let d = parse_digest(m)?;
        let from = query_get(q, "from").map(RepoName::parse).transpose()?;
        if try_mount(app, &repo, &d, from).await? {
            return Ok(created(&repo, &d));
        }
        // Not mountable: the client gets a session and uploads the blob.
    } else if let Some(dg) = query_get(q, "digest") {
        let d = parse_digest(dg)?;
        let _permit = stream_permit(app).await?;
        let w = WriterTask::spawn(
            app.store().clone(),
            Origin::New(Some(d.clone())),
            Vec::new(),
        )?;
        let mut body = req.into_body();
        pump(app, &mut body, &w, 0).await?;
        commit_and_link(app, &repo, w, d.clone()).await?;
        return Ok(created(&repo, &d));
    }
    let s = app.uploads.create(&repo)?;
    let mut hs = session_headers(&repo, &s.id, 0);
    hs.push(("Content-Length", "0".into()));
    Ok(respond(202, &hs, Bytes::new()))
}

/// Links `d` into `repo` from `from` (or, without `from`, from anywhere
/// the registry holds it). False when it cannot be mounted.
async fn try_mount(
    app: &App,
    repo: &RepoName,
    d: &Digest,
    from: Option<RepoName>,
) -> ApiResult<bool> {
    let reg = app.registry.clone();
    let (repo, d) = (repo.clone(), d.clone());
    blocking(move || {
        let available = match &from {
            // A blob fsck --repair found broken is not mounted: the
            // client uploads it, which restores it.
            Some(from) => reg.blob_linked(from, &d)? && reg.store().stat(&d)?.is_some(),
            None => reg.store().stat(&d)?.is_some(),
        };
        if !available {
            return Ok(false);
        }
        match reg.link_blob(&repo, &d) {
            Ok(()) => Ok(true),
            // Gone between the check and the link: upload it instead.
            Err(ApiError::BlobUnknown(_)) => Ok(false),
            Err(e) => Err(e),
        }
    })
    .await
}

/// Locks a session for one request, refusing closed ones.
async fn lock<'a>(s: &'a Session) -> ApiResult<tokio::sync::MutexGuard<'a, State>> {
    let st = s.state.lock().await;
    if st.closed || s.is_broken() {
        return Err(ApiError::BlobUploadUnknown);
    }
    Ok(st)
}

/// Ends a session and aborts its write.
async fn close(app: &App, s: &Session, st: &mut State) {
    let held = st.discard();
    app.uploads.remove(&s.id);
    abort_held(app, held.into_iter().collect()).await;
}

/// What to do with the bytes once a body is in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum After {
    /// Make them durable (a PATCH: its 202 promises they survive a restart).
    Checkpoint,
    /// Nothing: a commit follows at once.
    Commit,
}

/// Appends one request body to the session at its current offset, checking
/// `Content-Range` (out of order: 416) and `Content-Length` against it.
/// A request refused before its body is read leaves the session as it was;
/// a failure once the body streams ends the session (its byte count is no
/// longer known).
async fn append(
    app: &App,
    s: &Session,
    st: &mut State,
    req: Req,
    after: After,
    digest: Option<&Digest>,
) -> ApiResult<()> {
    let Some(want) = check_range(s, st, &req)? else {
        return Ok(());
    };
    let r = stream_into(app, s, st, req, after, digest, want).await;
    if r.is_err() {
        close(app, s, st).await;
    }
    r
}

/// The body length the headers promise (`Some(None)`: unknown), or `None`
/// when there is no body to read.
fn check_range(s: &Session, st: &State, req: &Req) -> ApiResult<Option<Option<u64>>> {
    let range = header(req.headers(), "content-range")
        .map(parse_content_range)
        .transpose()?;
    let declared = header(req.headers(), "content-length").and_then(|v| v.parse::<u64>().ok());
    let Some((start, end)) = range else {
        return Ok((declared != Some(0)).then_some(None));
    };
    if start != st.offset {
        return Err(ApiError::UploadOutOfOrder {
            offset: st.offset,
            location: session_location(&s.repo, &s.id),
        });
    }
    let n = end
        .checked_sub(start)
        .and_then(|n| n.checked_add(1))
        .ok_or_else(|| ApiError::BlobUploadInvalid("bad Content-Range".into()))?;
    if let Some(c) = declared.filter(|c| *c != n) {
        return Err(ApiError::SizeInvalid(format!(
            "Content-Range covers {n} bytes, Content-Length says {c}"
        )));
    }
    Ok(Some(Some(n)))
}

async fn stream_into(
    app: &App,
    s: &Session,
    st: &mut State,
    req: Req,
    after: After,
    digest: Option<&Digest>,
    want: Option<u64>,
) -> ApiResult<()> {
    let _permit = stream_permit(app).await?;
    if st.writer.is_none() {
        let origin = match st.resume {
            Some(r) => Origin::Resume(r),
            // Hash with the final digest's algorithm when it is known up front.
            None => Origin::New(digest.filter(|_| st.offset == 0).cloned()),
        };
        st.writer = Some(WriterTask::spawn(app.store().clone(), origin, s.tag())?);
        st.resume = None;
    }
    let Some(w) = st.writer.as_ref() else {
        return Err(ApiError::Internal("upload writer missing".into()));
    };
    let guard = CutOffGuard::new(&app.uploads, s, w);
    let mut body = req.into_body();
    let n = pump(app, &mut body, w, st.offset).await?;
    if let Some(want) = want.filter(|w| *w != n) {
        return Err(ApiError::SizeInvalid(format!(
            "Content-Range promised {want} bytes, the body had {n}"
        )));
    }
    st.offset = match after {
        After::Checkpoint => w.checkpoint().await?,
        After::Commit => st.offset + n,
    };
    guard.disarm();
    s.touch(app.uploads.epoch());
    Ok(())
}

pub async fn patch(app: &Arc<App>, repo: RepoName, id: String, req: Req) -> ApiResult<Resp> {
    let s = app.uploads.get(&repo, &id)?;
    let mut st = lock(&s).await?;
    append(app, &s, &mut st, req, After::Checkpoint, None).await?;
    let mut hs = session_headers(&repo, &id, st.offset);
    hs.push(("Content-Length", "0".into()));
    Ok(respond(202, &hs, Bytes::new()))
}

pub async fn finish(
    app: &Arc<App>,
    repo: RepoName,
    id: String,
    q: &[(String, String)],
    req: Req,
) -> ApiResult<Resp> {
    let s = app.uploads.get(&repo, &id)?;
    let d = parse_digest(query_get(q, "digest").ok_or_else(|| {
        ApiError::DigestInvalid("the digest query parameter is required".into())
    })?)?;
    let mut st = lock(&s).await?;
    append(app, &s, &mut st, req, After::Commit, Some(&d)).await?;
    let w = match st.writer.take() {
        Some(w) => w,
        None => {
            let origin = match st.resume {
                Some(r) => Origin::Resume(r),
                None => Origin::New(Some(d.clone())),
            };
            let w = WriterTask::spawn(app.store().clone(), origin, s.tag())?;
            st.resume = None;
            w
        }
    };
    st.closed = true;
    app.uploads.remove(&s.id);
    drop(st);
    commit_and_link(app, &repo, w, d.clone()).await?;
    Ok(created(&repo, &d))
}

pub async fn status(app: &Arc<App>, repo: RepoName, id: String) -> ApiResult<Resp> {
    let s = app.uploads.get(&repo, &id)?;
    let st = lock(&s).await?;
    let mut hs = session_headers(&repo, &id, st.offset);
    hs.push(("Content-Length", "0".into()));
    Ok(respond(204, &hs, Bytes::new()))
}

pub async fn cancel(app: &Arc<App>, repo: RepoName, id: String) -> ApiResult<Resp> {
    let s = app.uploads.get(&repo, &id)?;
    let mut st = lock(&s).await?;
    close(app, &s, &mut st).await;
    Ok(respond(
        204,
        &[("Content-Length", "0".into())],
        Bytes::new(),
    ))
}
