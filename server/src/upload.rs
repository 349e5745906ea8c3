//! Blob upload sessions. A session owns at most one engine writer, driven by
//! a dedicated thread fed through a bounded channel, so request bodies stream
//! into the engine piece by piece with backpressure and memory stays bounded
//! whatever the blob's size.
//!
//! Sessions survive restarts: after each PATCH the writer is checkpointed
//! (the engine makes the bytes durable and keeps the write as a *held* write
//! tagged with the session), and at startup the server turns every held
//! write back into a session that resumes where the client left off.
//! Sessions are bounded in number and expire when idle; an expired,
//! cancelled or broken session's write is aborted, which leaves its data
//! reclaimable.

use crate::error::{ApiError, ApiResult};
use crate::names::RepoName;
use bytes::Bytes;
use orlop_engine::{BlobInfo, Digest, RecipeId, Store};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Groups of body frames (about 256 KiB each, `routes::uploads`) queued
/// between a request body and its writer thread.
const WRITER_QUEUE_PIECES: usize = 2;
/// Prefix of the tag the engine keeps with a session's held write.
const TAG_PREFIX: &[u8] = b"orlop-upload-v1\0";

/// The engine tag naming a session's held write.
pub fn session_tag(repo: &RepoName, id: &str) -> Vec<u8> {
    [TAG_PREFIX, repo.as_str().as_bytes(), b"\0", id.as_bytes()].concat()
}

/// The (repository, session id) a held write's tag names, if it is ours.
pub fn parse_tag(tag: &[u8]) -> Option<(RepoName, String)> {
    let rest = tag.strip_prefix(TAG_PREFIX)?;
    let s = std::str::from_utf8(rest).ok()?;
    let (repo, id) = s.split_once('\0')?;
    let valid_id = !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit());
    valid_id.then_some(())?;
    Some((RepoName::parse(repo).ok()?, id.to_string()))
}

enum Cmd {
    Pieces(Vec<Bytes>),
    /// Makes everything so far durable; replies with the bytes held.
    Checkpoint(oneshot::Sender<ApiResult<u64>>),
    Commit(Option<Digest>, oneshot::Sender<ApiResult<BlobInfo>>),
}

/// How a writer starts.
pub enum Origin {
    /// A new write, hashed with the algorithm of the digest if one is known.
    New(Option<Digest>),
    /// A held write from before a restart.
    Resume(RecipeId),
}

/// The async side of one engine writer. Dropping it stops the writer: the
/// write is aborted if [`WriterTask::discard`] was called, and otherwise
/// detached, keeping its last checkpoint (a shutdown keeps sessions).
pub struct WriterTask {
    tx: mpsc::Sender<Cmd>,
    discard: Arc<AtomicBool>,
}

impl WriterTask {
    pub fn spawn(store: Arc<Store>, origin: Origin, tag: Vec<u8>) -> ApiResult<Self> {
        let (tx, rx) = mpsc::channel(WRITER_QUEUE_PIECES);
        let discard = Arc::new(AtomicBool::new(false));
        let d2 = discard.clone();
        std::thread::Builder::new()
            .name("orlop-upload".into())
            .spawn(move || writer_thread(store, origin, tag, rx, d2))
            .map_err(|e| ApiError::Internal(format!("starting an upload thread: {e}")))?;
        Ok(WriterTask { tx, discard })
    }

    fn gone() -> ApiError {
        ApiError::Unavailable("the upload's writer stopped".into())
    }

    /// Marks the write for abortion when this task is dropped.
    pub fn discard(&self) {
        self.discard.store(true, Ordering::Relaxed);
    }

    pub fn discard_flag(&self) -> Arc<AtomicBool> {
        self.discard.clone()
    }

    /// Sends consecutive pieces of the body, to be written as one step.
    pub async fn write(&self, pieces: Vec<Bytes>) -> ApiResult<()> {
        self.tx
            .send(Cmd::Pieces(pieces))
            .await
            .map_err(|_| Self::gone())
    }

    /// Makes every piece sent so far durable; returns the bytes held.
    pub async fn checkpoint(&self) -> ApiResult<u64> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Checkpoint(tx))
            .await
            .map_err(|_| Self::gone())?;
        rx.await.map_err(|_| Self::gone())?
    }

    /// Commits durably; with `expected`, refuses content with another digest.
    pub async fn commit(self, expected: Option<Digest>) -> ApiResult<BlobInfo> {
        let (tx, rx) = oneshot::channel();
        self.discard();
        self.tx
            .send(Cmd::Commit(expected, tx))
            .await
            .map_err(|_| Self::gone())?;
        rx.await.map_err(|_| Self::gone())?
    }
}

fn writer_thread(
    store: Arc<Store>,
    origin: Origin,
    tag: Vec<u8>,
    mut rx: mpsc::Receiver<Cmd>,
    discard: Arc<AtomicBool>,
) {
    let resumed = match &origin {
        Origin::Resume(r) => Some(*r),
        Origin::New(_) => None,
    };
    let opened = match origin {
        Origin::New(expected) => store.writer(expected),
        Origin::Resume(r) => store.resume_writer(r),
    };
    // The first failure, kept for the next request to report.
    let mut failed: Option<ApiError> = None;
    let mut writer = match opened {
        Ok(w) => Some(w),
        Err(e) => {
            failed = Some(e.into());
            None
        }
    };
    let take_err = |failed: &mut Option<ApiError>| {
        failed
            .take()
            .unwrap_or_else(|| ApiError::BlobUploadInvalid("the upload failed earlier".into()))
    };
    while let Some(cmd) = rx.blocking_recv() {
        match cmd {
            Cmd::Pieces(b) => {
                if let (Some(w), None) = (writer.as_mut(), &failed) {
                    if let Err(e) = w.write_pieces(b) {
                        failed = Some(e.into());
                    }
                }
            }
            Cmd::Checkpoint(reply) => {
                let r = match (writer.as_mut(), failed.is_some()) {
                    (Some(w), false) => w.checkpoint(&tag).map_err(ApiError::from),
                    _ => Err(take_err(&mut failed)),
                };
                if let Err(e) = &r {
                    failed = Some(ApiError::BlobUploadInvalid(e.to_string()));
                }
                let _ = reply.send(r);
            }
            Cmd::Commit(expected, reply) => {
                let r = match (writer.take(), failed.is_some()) {
                    (Some(mut w), false) => (|| {
                        if let Some(d) = expected {
                            w.expect_digest(d)?;
                        }
                        Ok(w.commit()?)
                    })(),
                    (w, _) => {
                        // The session ends here: a held write that could not
                        // be resumed (or failed) is discarded.
                        match (w, resumed) {
                            (Some(w), _) => w.abort(),
                            (None, Some(r)) => {
                                if let Err(e) = store.abort_held(r) {
                                    tracing::warn!(error = %e, "could not abort a held upload");
                                }
                            }
                            (None, None) => {}
                        }
                        Err(take_err(&mut failed))
                    }
                };
                let _ = reply.send(r);
                // Committed, or discarded: nothing is left to clean up.
                return;
            }
        }
    }
    let discard = discard.load(Ordering::Relaxed);
    match writer {
        Some(w) if discard => w.abort(),
        Some(w) => w.detach(),
        None => {
            if let (Some(r), true) = (resumed, discard) {
                if let Err(e) = store.abort_held(r) {
                    tracing::warn!(error = %e, "could not abort a held upload");
                }
            }
        }
    }
}

/// The mutable part of a session, held (async mutex) for the whole of each
/// request on it, so requests on one session run one at a time.
pub struct State {
    /// Bytes accepted (and, after a PATCH, durable).
    pub offset: u64,
    pub writer: Option<WriterTask>,
    /// A held write from before a restart, not yet resumed.
    pub resume: Option<RecipeId>,
    /// The session was finished, cancelled, expired or broken.
    pub closed: bool,
}

impl State {
    /// Ends the session's write: aborts it (a held write from before a
    /// restart is returned, for the caller to abort with the store).
    pub fn discard(&mut self) -> Option<RecipeId> {
        self.closed = true;
        if let Some(w) = self.writer.take() {
            w.discard();
        }
        self.resume.take()
    }
}

pub struct Session {
    pub id: String,
    pub repo: RepoName,
    pub state: tokio::sync::Mutex<State>,
    last_used: AtomicU64,
    /// Set when a request was cut off mid-body: requests already waiting
    /// for the state must not go on with it.
    broken: AtomicBool,
}

impl Session {
    pub fn touch(&self, epoch: Instant) {
        self.last_used
            .store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn tag(&self) -> Vec<u8> {
        session_tag(&self.repo, &self.id)
    }

    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }
}

/// Every open session, bounded in number.
pub struct Uploads {
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    /// Set when the server starts shutting down: requests cut off from then
    /// on keep their session's last checkpoint.
    shutting_down: AtomicBool,
    sessions_max: usize,
    epoch: Instant,
    rng: ring::rand::SystemRandom,
}

impl Uploads {
    pub fn new(sessions_max: usize) -> Self {
        Uploads {
            sessions: Mutex::new(HashMap::new()),
            shutting_down: AtomicBool::new(false),
            sessions_max,
            epoch: Instant::now(),
            rng: ring::rand::SystemRandom::new(),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    pub fn open_count(&self) -> usize {
        self.map().len()
    }

    fn insert(&self, repo: &RepoName, id: String, state: State) -> Arc<Session> {
        let s = Arc::new(Session {
            id,
            repo: repo.clone(),
            state: tokio::sync::Mutex::new(state),
            last_used: AtomicU64::new(0),
            broken: AtomicBool::new(false),
        });
        s.touch(self.epoch);
        self.map().insert(s.id.clone(), s.clone());
        s
    }

    pub fn create(&self, repo: &RepoName) -> ApiResult<Arc<Session>> {
        let mut id = [0u8; 16];
        ring::rand::SecureRandom::fill(&self.rng, &mut id)
            .map_err(|_| ApiError::Internal("system random generator failed".into()))?;
        let open = self.open_count();
        if open >= self.sessions_max {
            return Err(ApiError::TooManyRequests(format!(
                "{open} upload sessions are open; finish or cancel some"
            )));
        }
        let state = State {
            offset: 0,
            writer: None,
            resume: None,
            closed: false,
        };
        Ok(self.insert(repo, hex::encode(id), state))
    }

    /// Turns the store's held writes back into sessions (at startup). Held
    /// writes that are not sessions' are returned for the caller to abort.
    pub fn restore(&self, store: &Store) -> ApiResult<Vec<RecipeId>> {
        let mut foreign = Vec::new();
        for h in store.held_writes()? {
            match parse_tag(&h.tag) {
                Some((repo, id)) => {
                    let state = State {
                        offset: h.size,
                        writer: None,
                        resume: Some(h.recipe),
                        closed: false,
                    };
                    self.insert(&repo, id, state);
                }
                None => foreign.push(h.recipe),
            }
        }
        Ok(foreign)
    }

    /// The session `id` of `repo`; unknown ids and other repositories' ids
    /// are both BLOB_UPLOAD_UNKNOWN.
    pub fn get(&self, repo: &RepoName, id: &str) -> ApiResult<Arc<Session>> {
        let s = self
            .map()
            .get(id)
            .cloned()
            .ok_or(ApiError::BlobUploadUnknown)?;
        if s.repo != *repo {
            return Err(ApiError::BlobUploadUnknown);
        }
        s.touch(self.epoch);
        Ok(s)
    }

    /// Forgets a session.
    pub fn remove(&self, id: &str) {
        self.map().remove(id);
    }

    /// Cancels sessions idle for longer than `idle` that no request holds;
    /// returns how many, and the held writes from before a restart that the
    /// caller must abort with the store.
    pub fn expire(&self, idle: Duration) -> (usize, Vec<RecipeId>) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let idle_ms = idle.as_millis() as u64;
        let stale: Vec<Arc<Session>> = self
            .map()
            .values()
            .filter(|s| now.saturating_sub(s.last_used.load(Ordering::Relaxed)) > idle_ms)
            .cloned()
            .collect();
        let (mut n, mut held) = (0, Vec::new());
        for s in stale {
            if let Ok(mut st) = s.state.try_lock() {
                held.extend(st.discard());
                self.remove(&s.id);
                n += 1;
            }
        }
        (n, held)
    }

    /// Marks the start of a shutdown (see [`CutOffGuard`]).
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// At shutdown: drops every session without aborting its write, so that
    /// checkpointed uploads resume after the restart.
    pub fn detach_all(&self) {
        let all: Vec<Arc<Session>> = self.map().drain().map(|(_, s)| s).collect();
        for s in all {
            if let Ok(mut st) = s.state.try_lock() {
                st.writer = None;
            }
        }
    }
}

/// Removes and aborts a session if the request streaming into it is cut
/// off (its future dropped mid-body): the bytes it holds are then unknown.
/// During a shutdown it does nothing: the writer is detached with the rest,
/// and the session resumes from its last checkpoint after the restart.
pub struct CutOffGuard<'a> {
    uploads: &'a Uploads,
    session: &'a Session,
    discard: Option<Arc<AtomicBool>>,
}

impl<'a> CutOffGuard<'a> {
    pub fn new(uploads: &'a Uploads, session: &'a Session, w: &WriterTask) -> Self {
        CutOffGuard {
            uploads,
            session,
            discard: Some(w.discard_flag()),
        }
    }

    pub fn disarm(mut self) {
        self.discard = None;
    }
}

impl Drop for CutOffGuard<'_> {
    fn drop(&mut self) {
        if let Some(d) = self.discard.take() {
            if self.uploads.shutting_down.load(Ordering::Relaxed) {
                return;
            }
            d.store(true, Ordering::Relaxed);
            self.session.broken.store(true, Ordering::Relaxed);
            self.uploads.remove(&self.session.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_roundtrip() {
        let repo = RepoName::parse("a/b").unwrap_or_else(|e| panic!("{e}"));
        let t = session_tag(&repo, "0123abcd");
        assert_eq!(parse_tag(&t), Some((repo, "0123abcd".to_string())));
        assert_eq!(parse_tag(b"other"), None);
        assert_eq!(parse_tag(b"orlop-upload-v1\0a/b\0not hex"), None);
        assert_eq!(parse_tag(b"orlop-upload-v1\0BAD\0abcd"), None);
    }
}
