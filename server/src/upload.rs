//! Blob upload sessions. A session owns at most one engine writer, driven by
//! a dedicated thread fed through a bounded channel, so request bodies stream
//! into the engine piece by piece with backpressure and memory stays bounded
//! whatever the blob's size. Sessions are bounded in number and expire when
//! idle; an expired or cancelled session's writer is aborted, which leaves
//! its data reclaimable.

use crate::error::{ApiError, ApiResult};
use crate::names::RepoName;
use bytes::Bytes;
use orlop_engine::{BlobInfo, Digest, Store};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Pieces queued between a request body and its writer thread.
const WRITER_QUEUE_PIECES: usize = 4;

enum Cmd {
    Piece(Bytes),
    /// Replies with the bytes accepted so far once every earlier piece is in.
    Sync(oneshot::Sender<ApiResult<u64>>),
    Commit(Option<Digest>, oneshot::Sender<ApiResult<BlobInfo>>),
}

/// The async side of one engine writer. Dropping it without a commit aborts
/// the write.
pub struct WriterTask {
    tx: mpsc::Sender<Cmd>,
}

impl WriterTask {
    pub fn spawn(store: Arc<Store>, expected: Option<Digest>) -> ApiResult<Self> {
        let (tx, rx) = mpsc::channel(WRITER_QUEUE_PIECES);
        std::thread::Builder::new()
            .name("orlop-upload".into())
            .spawn(move || writer_thread(store, expected, rx))
            .map_err(|e| ApiError::Internal(format!("starting an upload thread: {e}")))?;
        Ok(WriterTask { tx })
    }

    fn gone() -> ApiError {
        ApiError::Unavailable("the upload's writer stopped".into())
    }

    pub async fn write(&self, piece: Bytes) -> ApiResult<()> {
        self.tx
            .send(Cmd::Piece(piece))
            .await
            .map_err(|_| Self::gone())
    }

    /// Waits until every piece sent so far is in the engine's pipeline.
    pub async fn sync(&self) -> ApiResult<u64> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Sync(tx))
            .await
            .map_err(|_| Self::gone())?;
        rx.await.map_err(|_| Self::gone())?
    }

    /// Commits durably; with `expected`, refuses content with another digest.
    pub async fn commit(self, expected: Option<Digest>) -> ApiResult<BlobInfo> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Commit(expected, tx))
            .await
            .map_err(|_| Self::gone())?;
        rx.await.map_err(|_| Self::gone())?
    }
}

fn writer_thread(store: Arc<Store>, expected: Option<Digest>, mut rx: mpsc::Receiver<Cmd>) {
    let mut writer = store.writer(expected).map_err(ApiError::from);
    while let Some(cmd) = rx.blocking_recv() {
        match cmd {
            Cmd::Piece(b) => {
                if let Ok(w) = &mut writer {
                    if let Err(e) = w.write(b) {
                        writer = Err(e.into());
                    }
                }
            }
            Cmd::Sync(reply) => {
                let r = match &writer {
                    Ok(w) => Ok(w.size()),
                    Err(e) => Err(ApiError::BlobUploadInvalid(e.to_string())),
                };
                let _ = reply.send(r);
            }
            Cmd::Commit(expected, reply) => {
                let r = writer.and_then(|mut w| {
                    if let Some(d) = expected {
                        w.expect_digest(d)?;
                    }
                    Ok(w.commit()?)
                });
                let _ = reply.send(r);
                return;
            }
        }
    }
    // The session ended without a commit: dropping the writer aborts it.
}

/// The mutable part of a session, held (async mutex) for the whole of each
/// request on it, so requests on one session run one at a time.
pub struct State {
    /// Bytes accepted so far.
    pub offset: u64,
    pub writer: Option<WriterTask>,
    /// Set while a request streams into the writer. Still set when the next
    /// request arrives means the earlier one was cut off mid-body: the
    /// session's byte count is unknown and it cannot continue.
    pub streaming: bool,
    /// The session was finished, cancelled or expired.
    pub closed: bool,
}

pub struct Session {
    pub id: String,
    pub repo: RepoName,
    pub state: tokio::sync::Mutex<State>,
    last_used: AtomicU64,
}

impl Session {
    pub fn touch(&self, epoch: Instant) {
        self.last_used
            .store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Every open session, bounded in number.
pub struct Uploads {
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    sessions_max: usize,
    epoch: Instant,
    rng: ring::rand::SystemRandom,
}

impl Uploads {
    pub fn new(sessions_max: usize) -> Self {
        Uploads {
            sessions: Mutex::new(HashMap::new()),
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

    pub fn create(&self, repo: &RepoName) -> ApiResult<Arc<Session>> {
        let mut id = [0u8; 16];
        ring::rand::SecureRandom::fill(&self.rng, &mut id)
            .map_err(|_| ApiError::Internal("system random generator failed".into()))?;
        let s = Arc::new(Session {
            id: hex::encode(id),
            repo: repo.clone(),
            state: tokio::sync::Mutex::new(State {
                offset: 0,
                writer: None,
                streaming: false,
                closed: false,
            }),
            last_used: AtomicU64::new(0),
        });
        s.touch(self.epoch);
        let mut m = self.map();
        if m.len() >= self.sessions_max {
            return Err(ApiError::TooManyRequests(format!(
                "{} upload sessions are open; finish or cancel some",
                m.len()
            )));
        }
        m.insert(s.id.clone(), s.clone());
        Ok(s)
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

    /// Forgets a session (its state's writer, if any, aborts when dropped).
    pub fn remove(&self, id: &str) {
        self.map().remove(id);
    }

    /// Cancels sessions idle for longer than `idle` that no request holds;
    /// returns how many.
    pub fn expire(&self, idle: Duration) -> usize {
        let now = self.epoch.elapsed().as_millis() as u64;
        let idle_ms = idle.as_millis() as u64;
        let stale: Vec<Arc<Session>> = self
            .map()
            .values()
            .filter(|s| now.saturating_sub(s.last_used.load(Ordering::Relaxed)) > idle_ms)
            .cloned()
            .collect();
        let mut n = 0;
        for s in stale {
            if let Ok(mut st) = s.state.try_lock() {
                st.closed = true;
                st.writer = None;
                self.remove(&s.id);
                n += 1;
            }
        }
        n
    }
}
