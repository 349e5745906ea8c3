//! A real `orlop serve` process on a loopback port chosen by the OS, and a
//! small HTTP/1.1 client (hyper) for talking to it.

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::task::{Context, Poll};
use std::time::Duration;

/// A running registry.
pub struct Registry {
    pub child: Child,
    pub addr: SocketAddr,
    pub data: PathBuf,
}

impl Registry {
    /// Starts `orlop serve --data DIR --addr 127.0.0.1:0` with extra
    /// environment, and waits for its "listening" line.
    pub fn start(data: &Path, env: &[(&str, &str)]) -> Registry {
        Self::spawn(data, env, Stdio::inherit(), &|_| {})
    }

    /// Like [`Registry::start`], with `setup` applied to the command first.
    pub fn start_with(data: &Path, env: &[(&str, &str)], setup: &dyn Fn(&mut Command)) -> Registry {
        Self::spawn(data, env, Stdio::inherit(), setup)
    }

    /// Like [`Registry::start`], with the server's log (stderr) in `log`.
    pub fn start_logged(data: &Path, env: &[(&str, &str)], log: &Path) -> Registry {
        let f = std::fs::File::create(log).unwrap_or_else(|e| panic!("{e}"));
        Self::spawn(data, env, Stdio::from(f), &|_| {})
    }

    fn spawn(
        data: &Path,
        env: &[(&str, &str)],
        stderr: Stdio,
        setup: &dyn Fn(&mut Command),
    ) -> Registry {
        let mut cmd = Command::new(crate::orlop_bin());
        cmd.args(["serve", "--addr", "127.0.0.1:0", "--data"])
            .arg(data)
            .env("ORLOP_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        setup(&mut cmd);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn orlop serve: {e}"));
        let out = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        let mut line = String::new();
        BufReader::new(out)
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("reading orlop's stdout: {e}"));
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Registry {
            child,
            addr,
            data: data.to_path_buf(),
        }
    }

    /// Peak resident memory of the server process so far (VmHWM), in bytes.
    pub fn peak_rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    }

    pub fn client(&self) -> Client {
        Client::new(self.addr)
    }

    /// `host:port`, as image references name it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// SIGTERM, then waits; asserts a clean exit.
    pub fn stop(mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap_or_else(|e| panic!("wait: {e}"));
        assert!(status.success(), "orlop serve exited with {status}");
    }

    /// SIGKILL, then waits.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the server, then runs `orlop fsck --json` (engine verify plus
    /// the registry's reference audit) and asserts the store is clean.
    pub fn stop_and_fsck(self) {
        let data = self.data.clone();
        self.stop();
        assert_fsck_clean(&data);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn assert_fsck_clean(data: &Path) {
    let out = Command::new(crate::orlop_bin())
        .args(["fsck", "--json", "--data"])
        .arg(data)
        .output()
        .unwrap_or_else(|e| panic!("orlop fsck: {e}"));
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("fsck output {e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(report["clean"], Value::Bool(true), "fsck: {report:#}");
    assert_eq!(out.status.code(), Some(0));
}

/// A response, whole.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The first error code of a spec error body.
    pub fn error_code(&self) -> String {
        self.json()["errors"][0]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// A body sent piece by piece, as an iterator yields them, with no declared
/// length (chunked encoding).
pub struct PieceBody<I>(I);

impl<I: Iterator<Item = Bytes> + Unpin> Body for PieceBody<I> {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.next().map(|b| Ok(Frame::data(b))))
    }
}

/// A body of `len` deterministic pseudo-random bytes made as it is sent
/// (chunked encoding), so a test can push gigabytes without holding them.
pub struct Generated {
    rng: rand::rngs::SmallRng,
    left: u64,
}

impl Generated {
    pub fn new(seed: u64, len: u64) -> Self {
        use rand::SeedableRng;
        Generated {
            rng: rand::rngs::SmallRng::seed_from_u64(seed),
            left: len,
        }
    }

    /// The SHA-256 digest of the bytes `Generated::new(seed, len)` sends.
    pub fn digest(seed: u64, len: u64) -> String {
        use sha2::Digest as _;
        let mut g = Generated::new(seed, len);
        let mut h = sha2::Sha256::new();
        while let Some(b) = g.next_piece() {
            h.update(&b);
        }
        format!("sha256:{}", hex::encode(h.finalize()))
    }

    fn next_piece(&mut self) -> Option<Bytes> {
        use rand::RngCore;
        if self.left == 0 {
            return None;
        }
        let n = self.left.min(256 * 1024) as usize;
        let mut b = vec![0u8; n];
        self.rng.fill_bytes(&mut b);
        self.left -= n as u64;
        Some(Bytes::from(b))
    }
}

impl Iterator for Generated {
    type Item = Bytes;
    fn next(&mut self) -> Option<Bytes> {
        self.next_piece()
    }
}

/// One connection per request, on a private single-threaded runtime.
pub struct Client {
    addr: SocketAddr,
    rt: tokio::runtime::Runtime,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"));
        Client { addr, rt }
    }

    pub fn req(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        self.send(
            method,
            path,
            headers,
            Full::new(Bytes::copy_from_slice(body)),
        )
    }

    pub fn get(&self, path: &str) -> Resp {
        self.req("GET", path, &[], b"")
    }

    /// The value of an unlabelled metric on `/metrics` (0 when absent).
    pub fn metric(&self, name: &str) -> f64 {
        let m = String::from_utf8_lossy(&self.get("/metrics").body).into_owned();
        m.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    }

    /// Sends the pieces with chunked transfer encoding (no Content-Length).
    pub fn req_streamed(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        pieces: Vec<Vec<u8>>,
    ) -> Resp {
        let body = PieceBody(pieces.into_iter().map(Bytes::from));
        self.send(method, path, headers, body)
    }

    /// Sends a generated body (chunked encoding).
    pub fn req_generated(&self, method: &str, path: &str, body: Generated) -> Resp {
        self.send(method, path, &[], PieceBody(body))
    }

    fn send<B>(&self, method: &str, path: &str, headers: &[(&str, &str)], body: B) -> Resp
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.rt.block_on(async {
            let stream = tokio::net::TcpStream::connect(self.addr)
                .await
                .unwrap_or_else(|e| panic!("connect: {e}"));
            let (mut tx, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .unwrap_or_else(|e| panic!("handshake: {e}"));
            tokio::spawn(conn);
            let mut rb = http::Request::builder()
                .method(method)
                .uri(path)
                .header("host", self.addr.to_string());
            for (k, v) in headers {
                rb = rb.header(*k, *v);
            }
            let req = rb.body(body).unwrap_or_else(|e| panic!("request: {e}"));
            let resp = tokio::time::timeout(Duration::from_secs(120), tx.send_request(req))
                .await
                .unwrap_or_else(|_| panic!("{method} {path}: timed out"))
                .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp
                .into_body()
                .collect()
                .await
                .unwrap_or_else(|e| panic!("{method} {path}: body: {e}"))
                .to_bytes()
                .to_vec();
            Resp {
                status,
                headers,
                body,
            }
        })
    }
}
