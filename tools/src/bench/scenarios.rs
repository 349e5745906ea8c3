//! The load scenarios. Each speaks only the public Registry V2 API, verifies
//! what it reads, and is bounded in count and time.

use super::client::{path_of, with_query, Conn, Content};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// What one scenario did.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub name: String,
    pub ops: u64,
    pub bytes: u64,
    pub secs: f64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Per-operation latencies, milliseconds.
    pub latencies_ms: Vec<f64>,
    /// Server CPU seconds spent during the scenario (with `--server-pid`).
    pub server_cpu_secs: Option<f64>,
    /// The server's bytes on disk after the scenario (with `--server-data`).
    pub server_disk_bytes_after: Option<u64>,
    /// The server's peak resident set during the scenario (`--server-pid`).
    pub server_peak_rss_bytes: Option<u64>,
}

impl Outcome {
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.secs.max(1e-9) / 1e6
    }
    pub fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.secs.max(1e-9)
    }
    /// The `p`-th percentile latency (0..=100), milliseconds.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_ms.is_empty() {
            return 0.0;
        }
        let mut v = self.latencies_ms.clone();
        v.sort_by(f64::total_cmp);
        let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        v[i.min(v.len() - 1)]
    }
}

/// The sizes and counts the scenarios run with.
#[derive(Clone, Debug)]
pub struct Plan {
    pub host: String,
    pub repo: String,
    pub seed: u64,
    pub blob_bytes: u64,
    pub chunk_bytes: u64,
    pub blobs: usize,
    pub blob_size: u64,
    pub concurrency: usize,
    pub manifests: usize,
    pub get_concurrency: usize,
    pub get_secs: u64,
    pub memory_pushes: usize,
    pub memory_bytes: u64,
    /// Pull the large blob again after dropping the page cache.
    pub drop_caches: bool,
    /// Skip the pulls of `blob` and `many-blobs`.
    pub push_only: bool,
}

/// Gathers results from workers.
#[derive(Default)]
pub(super) struct Tally {
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    latencies: Mutex<Vec<f64>>,
}

impl Tally {
    pub(super) fn ok(&self, bytes: u64, started: Instant) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        let ms = started.elapsed().as_secs_f64() * 1e3;
        self.latencies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ms);
    }
    pub(super) fn fail(&self, e: anyhow::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert_with(|| format!("{e:#}"));
    }
    pub(super) fn outcome(self, name: &str, secs: f64) -> Outcome {
        Outcome {
            name: name.to_string(),
            ops: self.ops.into_inner(),
            bytes: self.bytes.into_inner(),
            secs,
            errors: self.errors.into_inner(),
            first_error: self
                .first_error
                .into_inner()
                .unwrap_or_else(|p| p.into_inner()),
            latencies_ms: self
                .latencies
                .into_inner()
                .unwrap_or_else(|p| p.into_inner()),
            server_cpu_secs: None,
            server_disk_bytes_after: None,
            server_peak_rss_bytes: None,
        }
    }
}

pub(super) fn expect(status: u16, want: u16, what: &str, body: &[u8]) -> Result<()> {
    if status != want {
        bail!(
            "{what}: status {status} (want {want}): {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
    }
    Ok(())
}

/// Starts an upload session; returns its Location path.
async fn start_upload(c: &mut Conn, repo: &str) -> Result<String> {
    let r = c
        .call(
            "POST",
            &format!("/v2/{repo}/blobs/uploads/"),
            &[],
            Bytes::new(),
        )
        .await?;
    expect(r.status, 202, "POST upload", &r.body)?;
    r.location
        .map(|l| path_of(&l))
        .context("upload session without a Location")
}

/// POST a session, then PUT the whole body with `?digest=` (monolithic).
pub async fn push_monolithic(c: &mut Conn, repo: &str, content: &Content) -> Result<()> {
    put_upload(c, repo, &content.digest, content.len(), content.body()).await
}

/// POST a session, then PUT `body` (`len` bytes) with `?digest=`, which
/// every registry supports.
pub(super) async fn put_upload<B>(
    c: &mut Conn,
    repo: &str,
    digest: &str,
    len: u64,
    body: B,
) -> Result<()>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let loc = start_upload(c, repo).await?;
    let len_s = len.to_string();
    let headers = [
        ("content-type", "application/octet-stream"),
        ("content-length", len_s.as_str()),
    ];
    let r = c
        .send_body(
            "PUT",
            &with_query(&loc, &format!("digest={digest}")),
            &headers,
            body,
        )
        .await?;
    expect(r.status, 201, "PUT upload", &r.body)
}

/// POST a session, PATCH `chunk` bytes at a time with Content-Range, then
/// PUT `?digest=` (what docker and skopeo do).
pub async fn push_chunked(c: &mut Conn, repo: &str, content: &Content, chunk: u64) -> Result<()> {
    let mut loc = start_upload(c, repo).await?;
    let len = content.len();
    let mut sent = 0u64;
    while sent < len {
        let n = chunk.min(len - sent);
        let piece = content.bytes.slice(sent as usize..(sent + n) as usize);
        let range = format!("{sent}-{}", sent + n - 1);
        let headers = [
            ("content-type", "application/octet-stream"),
            ("content-range", range.as_str()),
        ];
        let r = c.call("PATCH", &loc, &headers, piece).await?;
        expect(r.status, 202, "PATCH", &r.body)?;
        loc = r
            .location
            .map(|l| path_of(&l))
            .context("PATCH without a Location")?;
        sent += n;
    }
    let r = c
        .call(
            "PUT",
            &with_query(&loc, &format!("digest={}", content.digest)),
            &[],
            Bytes::new(),
        )
        .await?;
    expect(r.status, 201, "PUT chunked", &r.body)
}

/// One large blob pushed monolithically and in chunks, then pulled back
/// and compared with what was pushed.
pub async fn large_blob(p: &Plan) -> Result<Vec<Outcome>> {
    let mut c = Conn::open(&p.host).await?;
    let mut out = Vec::new();
    let content = Content::generate(p.seed ^ 0x1111, p.blob_bytes);
    let t = Instant::now();
    let tally = Tally::default();
    match push_monolithic(&mut c, &p.repo, &content).await {
        Ok(()) => tally.ok(p.blob_bytes, t),
        Err(e) => tally.fail(e),
    }
    out.push(tally.outcome("blob-push", t.elapsed().as_secs_f64()));

    let content2 = Content::generate(p.seed ^ 0x2222, p.blob_bytes);
    let t = Instant::now();
    let tally = Tally::default();
    match push_chunked(&mut c, &p.repo, &content2, p.chunk_bytes).await {
        Ok(()) => tally.ok(p.blob_bytes, t),
        Err(e) => tally.fail(e),
    }
    out.push(tally.outcome("blob-push-chunked", t.elapsed().as_secs_f64()));
    drop(content2);
    if p.push_only {
        return Ok(out);
    }

    out.push(pull_once(&mut c, &p.repo, &content, "blob-pull").await);
    // Cold before hot: the cold pull is then the blob's second read, as a
    // pull of a blob not read lately is (a registry may remember reads and
    // serve a blob read often through its cache).
    if p.drop_caches {
        drop_page_cache()?;
        out.push(pull_once(&mut c, &p.repo, &content, "blob-pull-cold").await);
    }
    out.push(pull_hot(&mut c, &p.repo, &content).await);
    Ok(out)
}

/// Pulls of the large blob in a row, the last of them reported as
/// `blob-pull-hot`: a blob that a fleet pulls, by then served from memory
/// by either kind of registry (Distribution's writes left it in the page
/// cache; Orlop reads a span through the page cache from its third read).
/// `blob-pull` is the first pull after the push, from wherever the push
/// left the bytes.
const HOT_PULLS: usize = 3;

/// [`HOT_PULLS`] pulls of `content`; the last is the outcome, unless an
/// earlier one failed.
async fn pull_hot(c: &mut Conn, repo: &str, content: &Content) -> Outcome {
    let mut last = pull_once(c, repo, content, "blob-pull-hot").await;
    for _ in 1..HOT_PULLS {
        if last.errors > 0 {
            break;
        }
        last = pull_once(c, repo, content, "blob-pull-hot").await;
    }
    last
}

/// One timed pull of `content`, compared with it byte for byte.
async fn pull_once(c: &mut Conn, repo: &str, content: &Content, name: &str) -> Outcome {
    let t = Instant::now();
    let tally = Tally::default();
    let path = format!("/v2/{repo}/blobs/{}", content.digest);
    match c.get_expecting(&path, content).await {
        Ok(n) => tally.ok(n, t),
        Err(e) => tally.fail(e),
    }
    tally.outcome(name, t.elapsed().as_secs_f64())
}

/// Writes dirty pages out, then drops the page cache (and dentries and
/// inodes) of the whole machine.
fn drop_page_cache() -> Result<()> {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n")
        .context("--drop-caches: writing /proc/sys/vm/drop_caches (needs root)")
}

/// Runs `n` jobs over `workers` connections; each job gets its index.
async fn fan_out<F, Fut>(
    host: &str,
    n: usize,
    workers: usize,
    tally: &Arc<Tally>,
    job: F,
) -> Result<()>
where
    F: Fn(Conn, usize, Arc<Tally>) -> Fut + Send + Sync + 'static + Clone,
    Fut: std::future::Future<Output = Conn> + Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..workers.max(1).min(n.max(1)) {
        let mut conn = Conn::open(host).await?;
        let (next, tally, job) = (next.clone(), tally.clone(), job.clone());
        let host = host.to_string();
        handles.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                conn = job(conn, i, tally.clone()).await;
                match reopen_if_closed(conn, &host, &tally).await {
                    Some(c) => conn = c,
                    None => break,
                }
            }
        }));
    }
    for h in handles {
        h.await?;
    }
    Ok(())
}

/// The connection, or a new one if the server closed it (after an
/// error); `None` (counted as an error) when none can be opened.
async fn reopen_if_closed(conn: Conn, host: &str, tally: &Tally) -> Option<Conn> {
    if !conn.is_closed() {
        return Some(conn);
    }
    match Conn::open(host).await {
        Ok(c) => Some(c),
        Err(e) => {
            tally.fail(e);
            None
        }
    }
}

/// `blobs` blobs of `blob_size` pushed (POST, then PUT with the body, which
/// every registry supports) and pulled back with digests checked,
/// `concurrency` at a time.
pub async fn many_blobs(p: &Plan) -> Result<Vec<Outcome>> {
    let contents: Arc<Vec<Content>> = Arc::new(
        (0..p.blobs)
            .map(|i| Content::generate(p.seed ^ (0x3333_0000 + i as u64), p.blob_size))
            .collect(),
    );
    let repo = p.repo.clone();
    let tally = Arc::new(Tally::default());
    let t = Instant::now();
    {
        let (contents, repo) = (contents.clone(), repo.clone());
        fan_out(
            &p.host,
            p.blobs,
            p.concurrency,
            &tally,
            move |mut c, i, tally| {
                let (contents, repo) = (contents.clone(), repo.clone());
                async move {
                    let started = Instant::now();
                    match push_monolithic(&mut c, &repo, &contents[i]).await {
                        Ok(()) => tally.ok(contents[i].len(), started),
                        Err(e) => tally.fail(e),
                    }
                    c
                }
            },
        )
        .await?;
    }
    let secs = t.elapsed().as_secs_f64();
    let push = Arc::try_unwrap(tally).map_err(|_| anyhow::anyhow!("tally still shared"))?;
    let mut out = vec![push.outcome("many-blobs-push", secs)];
    if p.push_only {
        return Ok(out);
    }
    let tally = Arc::new(Tally::default());
    let t = Instant::now();
    fan_out(
        &p.host,
        p.blobs,
        p.concurrency,
        &tally,
        move |mut c, i, tally| {
            let (contents, repo) = (contents.clone(), repo.clone());
            async move {
                let want = &contents[i];
                let started = Instant::now();
                match c
                    .get_expecting(&format!("/v2/{repo}/blobs/{}", want.digest), want)
                    .await
                {
                    Ok(n) => tally.ok(n, started),
                    Err(e) => tally.fail(e),
                }
                c
            }
        },
    )
    .await?;
    let secs = t.elapsed().as_secs_f64();
    let pull = Arc::try_unwrap(tally).map_err(|_| anyhow::anyhow!("tally still shared"))?;
    out.push(pull.outcome("many-blobs-pull", secs));
    Ok(out)
}

/// `pushes` clients at once each push the same `bytes`-byte blob in one
/// PATCH (as docker does), then PUT; for the server's peak memory under
/// many concurrent large uploads. The content is shared so that the disk
/// needs one copy on a deduplicating store, and the client one buffer.
pub async fn memory(p: &Plan) -> Result<Vec<Outcome>> {
    let content = Arc::new(Content::generate(p.seed ^ 0x4444, p.memory_bytes));
    let repo = p.repo.clone();
    let tally = Arc::new(Tally::default());
    let t = Instant::now();
    fan_out(
        &p.host,
        p.memory_pushes,
        p.memory_pushes,
        &tally,
        move |mut c, _i, tally| {
            let (content, repo) = (content.clone(), repo.clone());
            async move {
                let started = Instant::now();
                match push_patched(&mut c, &repo, &content).await {
                    Ok(()) => tally.ok(content.len(), started),
                    Err(e) => tally.fail(e),
                }
                c
            }
        },
    )
    .await?;
    let secs = t.elapsed().as_secs_f64();
    let push = Arc::try_unwrap(tally).map_err(|_| anyhow::anyhow!("tally still shared"))?;
    Ok(vec![push.outcome("memory-push", secs)])
}

/// POST a session, PATCH the whole body streamed (no Content-Range), then
/// PUT `?digest=`.
async fn push_patched(c: &mut Conn, repo: &str, content: &Content) -> Result<()> {
    let loc = start_upload(c, repo).await?;
    let len_s = content.len().to_string();
    let headers = [
        ("content-type", "application/octet-stream"),
        ("content-length", len_s.as_str()),
    ];
    let r = c.send_body("PATCH", &loc, &headers, content.body()).await?;
    expect(r.status, 202, "PATCH", &r.body)?;
    let loc = r
        .location
        .map(|l| path_of(&l))
        .context("PATCH without a Location")?;
    let r = c
        .call(
            "PUT",
            &with_query(&loc, &format!("digest={}", content.digest)),
            &[],
            Bytes::new(),
        )
        .await?;
    expect(r.status, 201, "PUT after PATCH", &r.body)
}

/// The manifest of image number `i` (over one shared config and layer).
fn manifest_of(i: usize, config: &(String, usize), layer: &(String, usize)) -> Vec<u8> {
    let m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.0, "size": config.1},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer.0, "size": layer.1}],
        "annotations": {"org.orlop.bench.n": i.to_string()},
    });
    serde_json::to_vec(&m).unwrap_or_default()
}

fn sha256(b: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

/// `manifests` small manifests pushed under tags (concurrency 16), then
/// GET by tag at `get_concurrency` for `get_secs`, each answer checked.
pub async fn manifests(p: &Plan) -> Result<Vec<Outcome>> {
    let mut c = Conn::open(&p.host).await?;
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec();
    let layer = format!("orlop bench layer {}", p.seed).into_bytes();
    for b in [&config, &layer] {
        let body = http_body_util::Full::new(Bytes::from(b.clone()));
        put_upload(&mut c, &p.repo, &sha256(b), b.len() as u64, body).await?;
    }
    let (cd, ld) = (
        (sha256(&config), config.len()),
        (sha256(&layer), layer.len()),
    );
    let bodies: Arc<Vec<(Vec<u8>, String)>> = Arc::new(
        (0..p.manifests)
            .map(|i| {
                let m = manifest_of(i, &cd, &ld);
                let d = sha256(&m);
                (m, d)
            })
            .collect(),
    );
    let repo = p.repo.clone();
    let tally = Arc::new(Tally::default());
    let t = Instant::now();
    {
        let (bodies, repo) = (bodies.clone(), repo.clone());
        fan_out(&p.host, p.manifests, 16, &tally, move |mut c, i, tally| {
            let (bodies, repo) = (bodies.clone(), repo.clone());
            async move {
                let started = Instant::now();
                let (m, _) = &bodies[i];
                let r = c
                    .call(
                        "PUT",
                        &format!("/v2/{repo}/manifests/t{i}"),
                        &[("content-type", OCI_MANIFEST)],
                        Bytes::from(m.clone()),
                    )
                    .await;
                match r.and_then(|r| expect(r.status, 201, "PUT manifest", &r.body)) {
                    Ok(()) => tally.ok(m.len() as u64, started),
                    Err(e) => tally.fail(e),
                }
                c
            }
        })
        .await?;
    }
    let secs = t.elapsed().as_secs_f64();
    let push = Arc::try_unwrap(tally).map_err(|_| anyhow::anyhow!("tally still shared"))?;
    let mut out = vec![push.outcome("manifests-push", secs)];

    let tally = Arc::new(Tally::default());
    let until = Instant::now() + Duration::from_secs(p.get_secs);
    let t = Instant::now();
    let mut handles = Vec::new();
    for w in 0..p.get_concurrency.max(1) {
        let mut c = Conn::open(&p.host).await?;
        let (bodies, repo, tally) = (bodies.clone(), repo.clone(), tally.clone());
        let seed = p.seed ^ w as u64;
        let host = p.host.clone();
        handles.push(tokio::spawn(async move {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            while Instant::now() < until && !bodies.is_empty() {
                let i = rng.gen_range(0..bodies.len());
                let started = Instant::now();
                let r = c
                    .call(
                        "GET",
                        &format!("/v2/{repo}/manifests/t{i}"),
                        &[("accept", OCI_MANIFEST)],
                        Bytes::new(),
                    )
                    .await;
                let checked = r.and_then(|r| {
                    expect(r.status, 200, "GET manifest", &r.body)?;
                    if r.body != bodies[i].0 || r.digest_header.as_deref() != Some(&bodies[i].1) {
                        bail!("GET manifest t{i}: wrong bytes or digest");
                    }
                    Ok(r.body.len() as u64)
                });
                match checked {
                    Ok(n) => tally.ok(n, started),
                    Err(e) => tally.fail(e),
                }
                match reopen_if_closed(c, &host, &tally).await {
                    Some(nc) => c = nc,
                    None => break,
                }
            }
        }));
    }
    for h in handles {
        h.await?;
    }
    let secs = t.elapsed().as_secs_f64();
    let get = Arc::try_unwrap(tally).map_err(|_| anyhow::anyhow!("tally still shared"))?;
    out.push(get.outcome("manifests-get", secs));
    Ok(out)
}
