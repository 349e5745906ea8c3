//! The push floor: a Registry V2 upload endpoint that does, for every pushed
//! byte, only the work Orlop's design gives every push (the kernel's
//! receive, SHA-256 of the whole blob, FastCDC cut points, a keyed BLAKE3
//! name per chunk, a copy into a record buffer, AES-256-GCM and CRC32C of
//! the record) and nothing else: no dedupe lookup, no index, no disk, no
//! HTTP framework, no upload state on disk. Its push rate, measured with
//! `orlop bench` as any registry is, is what Orlop's push could reach on
//! this machine if everything but that work cost nothing. `--work sha`
//! keeps only the receive and SHA-256, the work any registry must do.
//!
//! ```text
//! cargo run --profile dev --example push_floor -- --port 5301 --work full
//! orlop bench --url http://127.0.0.1:5301 --scenario blob --push-only
//! ```
//! (with `--push-only`: nothing is kept, so there is nothing to pull;
//! `benches/compare` runs it so and prints its rates beside Orlop's.) It
//! answers only what a push needs: `GET /v2/`, `POST` of an upload, `PATCH`
//! and `PUT` with `?digest=` (checked). A PATCH is answered once its bytes
//! are hashed and cut, what was left cut at a forced boundary (Orlop's 202
//! waits for that too, and for an fsync the floor does not make). A lone
//! upload runs its
//! hashing and its cutting on two threads of their own; one that starts
//! while two others are open runs both on its connection's thread, as
//! Orlop's writers do (`write_inline_from_writers`, by default the cores).

use crossbeam_channel::{bounded, Receiver, Sender};
use orlop_engine::ChunkParams;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use sha2::Digest as _;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Bytes read from the socket at a time, handed on whole.
const BLOCK_BYTES: usize = 4 << 20;
/// Blocks in flight per threaded upload (the bound of its queues).
const BLOCKS_PER_UPLOAD: usize = 4;
/// Largest request head accepted.
const HEAD_BYTES_MAX: usize = 64 << 10;
/// Uploads open at once, and connections served at once.
const UPLOADS_MAX: usize = 1024;
const CONNECTIONS_MAX: usize = 256;
/// With this many other uploads open, a new one hashes and cuts on its
/// connection's thread (Orlop's `write_inline_from_writers`: the cores).
const INLINE_FROM_UPLOADS: usize = 2;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Work {
    Sha,
    Full,
}

/// The naming key and the cipher, as the engine derives them from a key.
struct Keys {
    naming: [u8; 32],
    cipher: LessSafeKey,
}

impl Keys {
    fn new() -> io::Result<Self> {
        let master = [7u8; 32];
        let enc = blake3::derive_key("orlop push floor encryption key", &master);
        let unbound =
            UnboundKey::new(&AES_256_GCM, &enc).map_err(|_| io::Error::other("aes key"))?;
        Ok(Keys {
            naming: blake3::derive_key("orlop push floor naming key", &master),
            cipher: LessSafeKey::new(unbound),
        })
    }
}

/// FastCDC over a stream fed in blocks, then per chunk what the engine's
/// cutting and appending stages do to it on the way to a segment.
struct Cutter {
    keys: Arc<Keys>,
    p: ChunkParams,
    mask_s: u64,
    mask_l: u64,
    /// Bytes of the stream not yet cut (less than one largest chunk, plus
    /// the head of the next block while the carry is cut).
    carry: Vec<u8>,
    record: Vec<u8>,
    sealed: u64,
    check: u32,
}

impl Cutter {
    fn new(keys: Arc<Keys>) -> Self {
        let p = ChunkParams::default();
        let bits = fastcdc::v2020::logarithm2(p.avg_bytes) as usize;
        Cutter {
            keys,
            p,
            mask_s: fastcdc::v2020::MASKS[bits + 1],
            mask_l: fastcdc::v2020::MASKS[bits - 1],
            carry: Vec::with_capacity(2 * p.max_bytes as usize),
            record: Vec::with_capacity(p.max_bytes as usize + 16),
            sealed: 0,
            check: 0,
        }
    }

    fn max(&self) -> usize {
        self.p.max_bytes as usize
    }

    /// The length of the chunk at the start of `src`.
    fn cut(&self, src: &[u8]) -> usize {
        let (_, len) = fastcdc::v2020::cut(
            src,
            self.p.min_bytes as usize,
            self.p.avg_bytes as usize,
            self.p.max_bytes as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        len.clamp(1, src.len())
    }

    /// Names, copies, seals and checksums one chunk; keeps nothing.
    fn chunk(&mut self, c: &[u8]) -> io::Result<()> {
        let id = blake3::keyed_hash(&self.keys.naming, c);
        self.record.clear();
        self.record.extend_from_slice(c);
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&self.sealed.to_le_bytes());
        self.sealed += 1;
        let tag = self
            .keys
            .cipher
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(id.as_bytes()),
                &mut self.record,
            )
            .map_err(|_| io::Error::other("seal"))?;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&self.record), tag.as_ref());
        self.check ^= crc;
        Ok(())
    }

    /// Cuts every chunk of the stream so far that is final (one largest
    /// chunk of bytes follows its start).
    fn feed(&mut self, block: &[u8]) -> io::Result<()> {
        let max = self.max();
        let mut at = 0;
        if !self.carry.is_empty() {
            let old = self.carry.len();
            let take = block.len().min(max);
            let mut carry = std::mem::take(&mut self.carry);
            carry.extend_from_slice(&block[..take]);
            let mut s = 0;
            while s < old && carry.len() - s >= max {
                let len = self.cut(&carry[s..]);
                self.chunk(&carry[s..s + len])?;
                s += len;
            }
            if s < old {
                // The block was short: all of it is in the carry now.
                carry.drain(..s);
                self.carry = carry;
                return Ok(());
            }
            at = s - old;
            carry.clear();
            self.carry = carry;
        }
        while block.len() - at >= max {
            let len = self.cut(&block[at..]);
            self.chunk(&block[at..at + len])?;
            at += len;
        }
        self.carry.extend_from_slice(&block[at..]);
        Ok(())
    }

    /// Cuts what is left at the end of the stream.
    fn finish(&mut self) -> io::Result<()> {
        let carry = std::mem::take(&mut self.carry);
        let mut s = 0;
        while s < carry.len() {
            let len = self.cut(&carry[s..]);
            self.chunk(&carry[s..s + len])?;
            s += len;
        }
        Ok(())
    }
}

enum Msg {
    Block(Vec<u8>, usize),
    /// Every byte so far hashed and cut (what is buffered cut at a forced
    /// boundary, as Orlop's checkpoint of a PATCH does); with `last`, the
    /// reply is the digest.
    Barrier {
        last: bool,
        reply: Sender<io::Result<String>>,
    },
}

/// One upload's hashing (and, with `Work::Full`, cutting).
enum Pipe {
    Inline {
        sha: sha2::Sha256,
        cutter: Option<Box<Cutter>>,
        block: Vec<u8>,
    },
    Threaded {
        tx: Sender<Msg>,
        free: Receiver<Vec<u8>>,
        threads: Vec<JoinHandle<()>>,
    },
}

struct Upload {
    pipe: Pipe,
    bytes: u64,
}

fn hex_digest(sha: sha2::Sha256) -> String {
    format!("sha256:{}", hex_lower(&sha.finalize()))
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Upload {
    fn new(work: Work, keys: &Arc<Keys>, inline: bool) -> io::Result<Upload> {
        let cutter = (work == Work::Full).then(|| Box::new(Cutter::new(keys.clone())));
        if inline {
            let pipe = Pipe::Inline {
                sha: sha2::Sha256::new(),
                cutter,
                block: vec![0; BLOCK_BYTES],
            };
            return Ok(Upload { pipe, bytes: 0 });
        }
        let (free_tx, free) = bounded(BLOCKS_PER_UPLOAD);
        for _ in 0..BLOCKS_PER_UPLOAD {
            free_tx
                .send(vec![0u8; BLOCK_BYTES])
                .map_err(|_| io::Error::other("free queue"))?;
        }
        let (tx, sha_rx) = bounded::<Msg>(BLOCKS_PER_UPLOAD);
        let mut threads = Vec::new();
        let cut_tx = match cutter {
            Some(mut c) => {
                let (cut_tx, cut_rx) = bounded::<Msg>(BLOCKS_PER_UPLOAD);
                let free_tx = free_tx.clone();
                threads.push(std::thread::spawn(move || {
                    let mut failed = None;
                    while let Ok(m) = cut_rx.recv() {
                        match m {
                            Msg::Block(b, n) => {
                                if failed.is_none() {
                                    failed = c.feed(&b[..n]).err();
                                }
                                let _ = free_tx.send(b);
                            }
                            Msg::Barrier { reply, .. } => {
                                let r = match failed.take() {
                                    Some(e) => Err(e),
                                    None => c.finish().map(|()| format!("{:08x}", c.check)),
                                };
                                let _ = reply.send(r);
                            }
                        }
                    }
                }));
                Some(cut_tx)
            }
            None => None,
        };
        threads.push(std::thread::spawn(move || {
            let mut sha = sha2::Sha256::new();
            while let Ok(m) = sha_rx.recv() {
                match m {
                    Msg::Block(b, n) => {
                        sha.update(&b[..n]);
                        let _ = match &cut_tx {
                            Some(t) => t.send(Msg::Block(b, n)).is_ok(),
                            None => free_tx.send(b).is_ok(),
                        };
                    }
                    Msg::Barrier { last, reply } => {
                        let digest = match last {
                            true => hex_digest(std::mem::take(&mut sha)),
                            false => String::new(),
                        };
                        let r = match &cut_tx {
                            Some(t) => {
                                let (atx, arx) = bounded(1);
                                let cut = t
                                    .send(Msg::Barrier { last, reply: atx })
                                    .map_err(|_| io::Error::other("cutter gone"))
                                    .and_then(|()| {
                                        arx.recv().map_err(|_| io::Error::other("cutter gone"))?
                                    });
                                cut.map(|_| digest)
                            }
                            None => Ok(digest),
                        };
                        let _ = reply.send(r);
                    }
                }
            }
        }));
        Ok(Upload {
            pipe: Pipe::Threaded { tx, free, threads },
            bytes: 0,
        })
    }

    /// Takes `len` body bytes: those already read (`pending`), then the
    /// socket's, a block at a time.
    fn take_body(&mut self, s: &mut TcpStream, pending: &mut Vec<u8>, len: u64) -> io::Result<()> {
        let mut left = len;
        while left > 0 {
            let mut block = self.next_block()?;
            let want = (left as usize).min(BLOCK_BYTES);
            let from_pending = pending.len().min(want);
            block[..from_pending].copy_from_slice(&pending[..from_pending]);
            pending.drain(..from_pending);
            let mut n = from_pending;
            while n < want {
                let r = s.read(&mut block[n..want])?;
                if r == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "body cut short",
                    ));
                }
                n += r;
            }
            self.hand_on(block, n)?;
            left -= n as u64;
            self.bytes += n as u64;
        }
        Ok(())
    }

    fn next_block(&mut self) -> io::Result<Vec<u8>> {
        match &mut self.pipe {
            Pipe::Inline { block, .. } => Ok(std::mem::take(block)),
            Pipe::Threaded { free, .. } => {
                free.recv().map_err(|_| io::Error::other("pipeline gone"))
            }
        }
    }

    fn hand_on(&mut self, b: Vec<u8>, n: usize) -> io::Result<()> {
        match &mut self.pipe {
            Pipe::Inline { sha, cutter, block } => {
                sha.update(&b[..n]);
                if let Some(c) = cutter {
                    c.feed(&b[..n])?;
                }
                *block = b;
                Ok(())
            }
            Pipe::Threaded { tx, .. } => tx
                .send(Msg::Block(b, n))
                .map_err(|_| io::Error::other("pipeline gone")),
        }
    }

    /// Returns once every byte so far is hashed and cut, what is buffered
    /// at a forced boundary: what a PATCH's 202 waits for in Orlop (which
    /// then also makes them durable).
    fn barrier(&mut self) -> io::Result<()> {
        match &mut self.pipe {
            Pipe::Inline { cutter, .. } => match cutter {
                Some(c) => c.finish(),
                None => Ok(()),
            },
            Pipe::Threaded { tx, .. } => {
                let (rtx, rrx) = bounded(1);
                tx.send(Msg::Barrier {
                    last: false,
                    reply: rtx,
                })
                .map_err(|_| io::Error::other("pipeline gone"))?;
                rrx.recv()
                    .map_err(|_| io::Error::other("pipeline gone"))?
                    .map(|_| ())
            }
        }
    }

    /// Ends the upload: its digest once every byte is hashed and cut.
    fn finish(self) -> io::Result<String> {
        match self.pipe {
            Pipe::Inline { sha, cutter, .. } => {
                if let Some(mut c) = cutter {
                    c.finish()?;
                }
                Ok(hex_digest(sha))
            }
            Pipe::Threaded { tx, threads, .. } => {
                let (rtx, rrx) = bounded(1);
                tx.send(Msg::Barrier {
                    last: true,
                    reply: rtx,
                })
                .map_err(|_| io::Error::other("pipeline gone"))?;
                let r = rrx.recv().map_err(|_| io::Error::other("pipeline gone"))?;
                drop(tx);
                for t in threads {
                    let _ = t.join();
                }
                r
            }
        }
    }
}

struct Shared {
    work: Work,
    keys: Arc<Keys>,
    uploads: Mutex<HashMap<u64, Upload>>,
    open: AtomicUsize,
    next_id: AtomicU64,
}

struct Request {
    method: String,
    path: String,
    query: String,
    len: u64,
    close: bool,
    /// `Expect: 100-continue`: the client waits for a 100 before the body.
    expect_continue: bool,
}

/// Reads a request head into `pending`, parses it and drops it from
/// `pending`; `None` when the peer closed the connection.
fn read_head(s: &mut TcpStream, pending: &mut Vec<u8>) -> io::Result<Option<Request>> {
    let mut buf = [0u8; 16 << 10];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let status = req
            .parse(pending)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if let httparse::Status::Complete(head) = status {
            let mut len = 0;
            let mut close = false;
            let mut expect_continue = false;
            for h in req.headers.iter() {
                let v = std::str::from_utf8(h.value).unwrap_or("").trim();
                if h.name.eq_ignore_ascii_case("content-length") {
                    len = v.parse().map_err(|_| {
                        io::Error::new(io::ErrorKind::InvalidData, "content-length")
                    })?;
                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "chunked bodies are not taken",
                    ));
                } else if h.name.eq_ignore_ascii_case("connection") {
                    close = v.eq_ignore_ascii_case("close");
                } else if h.name.eq_ignore_ascii_case("expect") {
                    expect_continue = v.eq_ignore_ascii_case("100-continue");
                }
            }
            let target = req.path.unwrap_or("/");
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            let r = Request {
                method: req.method.unwrap_or("").to_string(),
                path: path.to_string(),
                query: query.to_string(),
                len,
                close,
                expect_continue,
            };
            pending.drain(..head);
            return Ok(Some(r));
        }
        if pending.len() >= HEAD_BYTES_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(None);
        }
        pending.extend_from_slice(&buf[..n]);
    }
}

fn respond(
    s: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &str,
) -> io::Result<()> {
    let mut out = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("Docker-Distribution-API-Version: registry/2.0\r\n\r\n");
    out.push_str(body);
    s.write_all(out.as_bytes())
}

fn oci_error(code: &str, message: &str) -> String {
    format!(r#"{{"errors":[{{"code":"{code}","message":"{message}"}}]}}"#)
}

/// Reads and drops `len` body bytes.
fn skip_body(s: &mut TcpStream, pending: &mut Vec<u8>, len: u64) -> io::Result<()> {
    let from_pending = pending.len().min(len as usize);
    pending.drain(..from_pending);
    let left = len - from_pending as u64;
    io::copy(&mut s.take(left), &mut io::sink())?;
    Ok(())
}

fn serve(mut s: TcpStream, sh: Arc<Shared>) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut pending = Vec::new();
    while let Some(req) = read_head(&mut s, &mut pending)? {
        if req.expect_continue && req.len > 0 {
            s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        route(&mut s, &sh, &mut pending, &req)?;
        if req.close {
            break;
        }
    }
    Ok(())
}

fn route(s: &mut TcpStream, sh: &Shared, pending: &mut Vec<u8>, req: &Request) -> io::Result<()> {
    let p = req.path.as_str();
    if req.method == "GET" && (p == "/v2/" || p == "/v2") {
        return respond(
            s,
            "200 OK",
            &[("Content-Type", "application/json".into())],
            "{}",
        );
    }
    if req.method == "POST" && p.starts_with("/v2/") && p.ends_with("/blobs/uploads/") {
        skip_body(s, pending, req.len)?;
        let mut uploads = sh.uploads.lock().map_err(|_| io::Error::other("lock"))?;
        if uploads.len() >= UPLOADS_MAX {
            let body = oci_error("TOOMANYREQUESTS", "too many open uploads");
            drop(uploads);
            return respond(s, "429 Too Many Requests", &[], &body);
        }
        let inline = sh.open.fetch_add(1, Ordering::SeqCst) >= INLINE_FROM_UPLOADS;
        let id = sh.next_id.fetch_add(1, Ordering::Relaxed);
        uploads.insert(id, Upload::new(sh.work, &sh.keys, inline)?);
        drop(uploads);
        let loc = format!("{p}{id}");
        return respond(
            s,
            "202 Accepted",
            &[
                ("Location", loc),
                ("Range", "0-0".into()),
                ("Docker-Upload-UUID", id.to_string()),
            ],
            "",
        );
    }
    let upload_id = p
        .rsplit_once("/blobs/uploads/")
        .and_then(|(_, id)| id.parse::<u64>().ok());
    let (Some(id), "PATCH" | "PUT") = (upload_id, req.method.as_str()) else {
        skip_body(s, pending, req.len)?;
        return respond(
            s,
            "404 Not Found",
            &[],
            &oci_error("UNSUPPORTED", "the push floor keeps nothing"),
        );
    };
    let taken = sh
        .uploads
        .lock()
        .map_err(|_| io::Error::other("lock"))?
        .remove(&id);
    let Some(mut up) = taken else {
        skip_body(s, pending, req.len)?;
        return respond(
            s,
            "404 Not Found",
            &[],
            &oci_error("BLOB_UPLOAD_UNKNOWN", "no such upload"),
        );
    };
    let taken = up.take_body(s, pending, req.len);
    let taken = match req.method.as_str() {
        "PATCH" => taken.and_then(|()| up.barrier()),
        _ => taken,
    };
    if let Err(e) = taken {
        sh.open.fetch_sub(1, Ordering::SeqCst);
        return Err(e);
    }
    if req.method == "PATCH" {
        let range = format!("0-{}", up.bytes.saturating_sub(1));
        sh.uploads
            .lock()
            .map_err(|_| io::Error::other("lock"))?
            .insert(id, up);
        return respond(
            s,
            "202 Accepted",
            &[("Location", p.to_string()), ("Range", range)],
            "",
        );
    }
    sh.open.fetch_sub(1, Ordering::SeqCst);
    let want = form_digest(&req.query);
    let got = up.finish()?;
    if want.as_deref() != Some(got.as_str()) {
        return respond(
            s,
            "400 Bad Request",
            &[],
            &oci_error("DIGEST_INVALID", "digest does not match"),
        );
    }
    let repo = p.split("/blobs/uploads/").next().unwrap_or("/v2/x");
    respond(
        s,
        "201 Created",
        &[
            ("Location", format!("{repo}/blobs/{got}")),
            ("Docker-Content-Digest", got),
        ],
        "",
    )
}

/// `digest=` of a query string, percent-decoded (only `%3A`, as clients send it).
fn form_digest(query: &str) -> Option<String> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("digest="))
        .map(|d| d.replace("%3A", ":").replace("%3a", ":"))
}

fn main() -> io::Result<()> {
    let mut port = 5301u16;
    let mut work = Work::Full;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--port", Some(v)) => port = v.parse().map_err(|_| io::Error::other("--port N"))?,
            ("--work", Some(v)) if v == "full" => work = Work::Full,
            ("--work", Some(v)) if v == "sha" => work = Work::Sha,
            _ => {
                return Err(io::Error::other(
                    "usage: push_floor [--port N] [--work full|sha]",
                ))
            }
        }
    }
    let sh = Arc::new(Shared {
        work,
        keys: Arc::new(Keys::new()?),
        uploads: Mutex::new(HashMap::new()),
        open: AtomicUsize::new(0),
        next_id: AtomicU64::new(0),
    });
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    // The first line names the address (`--port 0` picks a free port).
    eprintln!("push floor on {}, work {work:?}", listener.local_addr()?);
    let live = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let s = conn?;
        if live.load(Ordering::SeqCst) >= CONNECTIONS_MAX {
            continue; // dropped: the client sees the connection closed
        }
        live.fetch_add(1, Ordering::SeqCst);
        let (sh, live) = (sh.clone(), live.clone());
        std::thread::spawn(move || {
            if let Err(e) = serve(s, sh) {
                eprintln!("connection: {e}");
            }
            live.fetch_sub(1, Ordering::SeqCst);
        });
    }
    Ok(())
}
