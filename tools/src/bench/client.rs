//! The load generator's HTTP/1.1 client: one keep-alive connection per
//! worker (as wrk and real clients use them), request bodies sent from
//! content made before the clock starts, response bodies compared with it
//! (or, for the corpus, streamed through SHA-256).

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use rand::{RngCore, SeedableRng};
use sha2::Digest as _;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

/// Bytes generated per body frame.
const PIECE_BYTES: usize = 256 * 1024;
/// No request may take longer than this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// Pieces generated on separate threads when content is made.
const GEN_PIECE_BYTES: usize = 4 << 20;

/// Content a scenario sends: `len` pseudo-random bytes (incompressible, as
/// gzip layers are) from `seed`, made in memory before the clock starts, so
/// that the client's own work (generating and hashing) is not timed against
/// the registry. Bodies are zero-copy slices of it, and what is read back
/// is compared with it byte for byte (stricter than a digest, and cheaper,
/// so the client takes less of the CPU the registry runs on).
#[derive(Clone)]
pub struct Content {
    pub bytes: Bytes,
    pub digest: String,
}

impl Content {
    pub fn generate(seed: u64, len: u64) -> Content {
        let mut buf = vec![0u8; len as usize];
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pieces: Vec<(usize, &mut [u8])> = buf.chunks_mut(GEN_PIECE_BYTES).enumerate().collect();
        let per = pieces.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            let mut pieces = pieces.into_iter();
            loop {
                let group: Vec<_> = pieces.by_ref().take(per).collect();
                if group.is_empty() {
                    break;
                }
                s.spawn(move || {
                    for (i, piece) in group {
                        let piece_seed = seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                        rand::rngs::SmallRng::seed_from_u64(piece_seed).fill_bytes(piece);
                    }
                });
            }
        });
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&buf)));
        Content {
            bytes: Bytes::from(buf),
            digest,
        }
    }

    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// The whole content as a request body.
    pub fn body(&self) -> SliceBody {
        SliceBody {
            bytes: self.bytes.clone(),
        }
    }
}

/// A request body sent from memory in `PIECE_BYTES` frames, without copies.
pub struct SliceBody {
    bytes: Bytes,
}

impl Body for SliceBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.bytes.is_empty() {
            return Poll::Ready(None);
        }
        let n = self.bytes.len().min(PIECE_BYTES);
        Poll::Ready(Some(Ok(Frame::data(self.bytes.split_to(n)))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.bytes.len() as u64)
    }

    fn is_end_stream(&self) -> bool {
        self.bytes.is_empty()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ReqBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A response whose body was read (or hashed and counted).
pub struct Resp {
    pub status: u16,
    pub location: Option<String>,
    pub digest_header: Option<String>,
    pub body: Vec<u8>,
}

/// One keep-alive connection to the registry.
pub struct Conn {
    host: String,
    tx: SendRequest<ReqBody>,
}

impl Conn {
    pub async fn open(host: &str) -> Result<Conn> {
        let stream = tokio::net::TcpStream::connect(host)
            .await
            .with_context(|| format!("connecting to {host}"))?;
        let _ = stream.set_nodelay(true);
        let (tx, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            host: host.to_string(),
            tx,
        })
    }

    /// The server closed the connection (after an error, say).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    fn request<B>(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: B,
    ) -> Result<http::Request<ReqBody>>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let mut rb = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        Ok(rb.body(body.map_err(Into::into).boxed_unsync())?)
    }

    async fn send(
        &mut self,
        req: http::Request<ReqBody>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        self.tx.ready().await?;
        let what = format!("{} {}", req.method(), req.uri());
        tokio::time::timeout(REQUEST_TIMEOUT, self.tx.send_request(req))
            .await
            .map_err(|_| anyhow!("{what}: timed out"))?
            .with_context(|| what)
    }

    /// A request with a small body; the response body is kept.
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Resp> {
        let req = self.request(method, path, headers, Full::new(body))?;
        let resp = self.send(req).await?;
        let (status, location, digest_header) = head_of(&resp);
        let body = resp.into_body().collect().await?.to_bytes().to_vec();
        Ok(Resp {
            status,
            location,
            digest_header,
            body,
        })
    }

    /// A request with a streamed body; the response body is kept.
    pub async fn send_body<B>(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: B,
    ) -> Result<Resp>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let req = self.request(method, path, headers, body)?;
        let resp = self.send(req).await?;
        let (status, location, digest_header) = head_of(&resp);
        let body = resp.into_body().collect().await?.to_bytes().to_vec();
        Ok(Resp {
            status,
            location,
            digest_header,
            body,
        })
    }

    /// GETs a blob, hashing and counting its body; fails on a status other
    /// than 200 or a digest that is not `want`.
    pub async fn get_verified(&mut self, path: &str, want: &str) -> Result<u64> {
        let req = self.request("GET", path, &[], Full::new(Bytes::new()))?;
        let mut resp = self.send(req).await?;
        if resp.status() != 200 {
            bail!("GET {path}: status {}", resp.status());
        }
        let mut h = sha2::Sha256::new();
        let mut n = 0u64;
        while let Some(frame) = resp.body_mut().frame().await {
            if let Ok(data) = frame?.into_data() {
                n += data.len() as u64;
                h.update(&data);
            }
        }
        let got = format!("sha256:{}", hex::encode(h.finalize()));
        if got != want {
            bail!("GET {path}: content hashes to {got}");
        }
        Ok(n)
    }
}

impl Conn {
    /// GETs a blob and compares its body with `want` byte for byte; fails
    /// on a status other than 200, a wrong length, different bytes or a
    /// `Docker-Content-Digest` that is not `want`'s.
    pub async fn get_expecting(&mut self, path: &str, want: &Content) -> Result<u64> {
        let req = self.request("GET", path, &[], Full::new(Bytes::new()))?;
        let mut resp = self.send(req).await?;
        if resp.status() != 200 {
            bail!("GET {path}: status {}", resp.status());
        }
        if let Some(d) = resp.headers().get("docker-content-digest") {
            if d.as_bytes() != want.digest.as_bytes() {
                bail!(
                    "GET {path}: Docker-Content-Digest {d:?}, not {}",
                    want.digest
                );
            }
        }
        let mut at = 0usize;
        while let Some(frame) = resp.body_mut().frame().await {
            if let Ok(data) = frame?.into_data() {
                let end = at + data.len();
                if end > want.bytes.len() || want.bytes[at..end] != data[..] {
                    bail!("GET {path}: bytes {at}..{end} differ from what was pushed");
                }
                at = end;
            }
        }
        if at != want.bytes.len() {
            bail!("GET {path}: {at} bytes, want {}", want.bytes.len());
        }
        Ok(at as u64)
    }
}

fn head_of(resp: &hyper::Response<hyper::body::Incoming>) -> (u16, Option<String>, Option<String>) {
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    (
        resp.status().as_u16(),
        header("location"),
        header("docker-content-digest"),
    )
}

/// Appends a query parameter to a Location (which may already have a query).
pub fn with_query(location: &str, query: &str) -> String {
    let sep = if location.contains('?') { '&' } else { '?' };
    format!("{location}{sep}{query}")
}

/// The path part of a Location header (registries may send absolute URLs).
pub fn path_of(location: &str) -> String {
    match location.split_once("://") {
        Some((_, rest)) => rest
            .find('/')
            .map(|i| rest[i..].to_string())
            .unwrap_or_else(|| "/".into()),
        None => location.to_string(),
    }
}

/// A file sent as a request body, piece by piece (the corpus's blobs).
pub struct FileBody {
    file: std::fs::File,
    left: u64,
}

impl FileBody {
    pub fn open(path: &std::path::Path) -> Result<Self> {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let left = file.metadata()?.len();
        Ok(FileBody { file, left })
    }

    pub fn len(&self) -> u64 {
        self.left
    }
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        use std::io::Read;
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(PIECE_BYTES as u64) as usize;
        let mut b = vec![0u8; n];
        // From the page cache: a short blocking read, like a client's.
        if let Err(e) = self.file.read_exact(&mut b) {
            return Poll::Ready(Some(Err(e)));
        }
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(b)))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
}
