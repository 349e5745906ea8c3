//! The pull floor: a Registry V2 server that does, for every pulled byte,
//! only the work Orlop's design gives every pull and nothing else: the
//! bytes are stored encrypted (AES-256-GCM records of 64 KiB, written with
//! O_DIRECT as Orlop's appends are), so a pull reads each record, from
//! disk the first two times a blob is read and through the page cache from
//! the third (Orlop's admission rule: `engine/src/readpool.rs`),
//! authenticates and decrypts it in place, and writes the plaintext to the
//! socket; no index, no recipe, no HTTP framework, no chunk names. Its pull
//! rates, measured with `orlop bench` as any registry is, are what Orlop's
//! pulls could reach on this machine if everything but that work cost
//! nothing. Distribution's pulls read a file the page cache may already
//! hold and hand it to the kernel (`sendfile`): none of this work.
//!
//! ```text
//! cargo run --profile dev --example pull_floor -- --port 5302 --dir /tmp/pf
//! orlop bench --url http://127.0.0.1:5302 --scenario blob
//! ```
//! It answers what a push and a pull need: `GET /v2/`, `POST` of an
//! upload, `PATCH`, `PUT` with `?digest=` (checked), and `GET` or `HEAD` of
//! a blob. Each GET reads and opens its spans (4 MiB) on `READ_THREADS`
//! threads of its own, one span ahead each, while its connection's thread
//! writes the plaintext out.
//!
//! `records.rs` is the on-disk form; the HTTP head parsing and the append
//! buffer are the push floor's (`../push_floor/http.rs`, `keep.rs`).

#[path = "../push_floor/http.rs"]
mod http;
#[path = "../push_floor/keep.rs"]
mod keep;
mod records;

use crossbeam_channel::bounded;
use http::{oci_error, respond, skip_body, Request};
use orlop_engine::io::AlignedBuf;
use records::{Opened, Stored, Writer};
use ring::aead::LessSafeKey;
use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Uploads open at once.
const UPLOADS_MAX: usize = 256;
/// A blob's reads before this many are direct; later ones go through the
/// page cache (Orlop admits a span on its third read).
const DIRECT_READS: u32 = 2;
/// Threads reading and opening one GET's spans, and spans each may have
/// opened ahead of the writer.
const READ_THREADS: u64 = 2;
const SPANS_AHEAD: usize = 1;
/// Idle span buffers kept for reuse (a fresh one costs its page faults).
const IDLE_BUFS_MAX: usize = 32;
/// Bytes of a request body read from the socket at a time.
const RECV_BYTES: usize = 1 << 20;

struct Blob {
    stored: Stored,
    reads: AtomicU32,
}

struct Shared {
    dir: PathBuf,
    cipher: LessSafeKey,
    uploads: Mutex<HashMap<u64, Writer>>,
    blobs: Mutex<HashMap<String, Arc<Blob>>>,
    idle: Mutex<Vec<AlignedBuf>>,
    next_id: AtomicU64,
}

impl Shared {
    fn take_buf(&self) -> AlignedBuf {
        let reused = self.idle.lock().ok().and_then(|mut v| v.pop());
        reused.unwrap_or_else(records::span_buf)
    }

    fn put_buf(&self, b: AlignedBuf) {
        if let Ok(mut v) = self.idle.lock() {
            if v.len() < IDLE_BUFS_MAX {
                v.push(b);
            }
        }
    }
}

fn lock_err<T>(_: T) -> io::Error {
    io::Error::other("lock poisoned")
}

fn route(s: &mut TcpStream, sh: &Shared, pending: &mut Vec<u8>, req: &Request) -> io::Result<()> {
    let p = req.path.as_str();
    let m = req.method.as_str();
    if m == "GET" && (p == "/v2/" || p == "/v2") {
        return respond(
            s,
            "200 OK",
            &[("Content-Type", "application/json".into())],
            "{}",
        );
    }
    if m == "POST" && p.starts_with("/v2/") && p.ends_with("/blobs/uploads/") {
        skip_body(s, pending, req.len)?;
        return start_upload(s, sh, p);
    }
    if let Some((_, id)) = p.rsplit_once("/blobs/uploads/") {
        if let (Ok(id), "PATCH" | "PUT") = (id.parse::<u64>(), m) {
            return upload(s, sh, pending, req, id);
        }
    }
    if let (Some((_, digest)), "GET" | "HEAD") = (p.rsplit_once("/blobs/"), m) {
        skip_body(s, pending, req.len)?;
        let blob = sh.blobs.lock().map_err(lock_err)?.get(digest).cloned();
        return match blob {
            Some(b) => send_blob(s, sh, &b, digest, m == "GET"),
            None => respond(
                s,
                "404 Not Found",
                &[],
                &oci_error("BLOB_UNKNOWN", "no such blob"),
            ),
        };
    }
    skip_body(s, pending, req.len)?;
    respond(
        s,
        "404 Not Found",
        &[],
        &oci_error("UNSUPPORTED", "not served by the pull floor"),
    )
}

fn start_upload(s: &mut TcpStream, sh: &Shared, p: &str) -> io::Result<()> {
    let mut uploads = sh.uploads.lock().map_err(lock_err)?;
    if uploads.len() >= UPLOADS_MAX {
        drop(uploads);
        let body = oci_error("TOOMANYREQUESTS", "too many open uploads");
        return respond(s, "429 Too Many Requests", &[], &body);
    }
    let id = sh.next_id.fetch_add(1, Ordering::Relaxed);
    uploads.insert(id, Writer::create(sh.dir.join(format!("upload-{id}")))?);
    drop(uploads);
    let hs = [
        ("Location", format!("{p}{id}")),
        ("Range", "0-0".into()),
        ("Docker-Upload-UUID", id.to_string()),
    ];
    respond(s, "202 Accepted", &hs, "")
}

fn upload(
    s: &mut TcpStream,
    sh: &Shared,
    pending: &mut Vec<u8>,
    req: &Request,
    id: u64,
) -> io::Result<()> {
    let Some(mut w) = sh.uploads.lock().map_err(lock_err)?.remove(&id) else {
        skip_body(s, pending, req.len)?;
        let body = oci_error("BLOB_UPLOAD_UNKNOWN", "no such upload");
        return respond(s, "404 Not Found", &[], &body);
    };
    take_body(s, pending, req.len, &mut w, &sh.cipher)?;
    if req.method == "PATCH" {
        let hs = [
            ("Location", req.path.clone()),
            ("Range", format!("0-{}", w.bytes.saturating_sub(1))),
        ];
        sh.uploads.lock().map_err(lock_err)?.insert(id, w);
        return respond(s, "202 Accepted", &hs, "");
    }
    let (got, stored) = w.finish(&sh.cipher)?;
    let want = http::form_digest(&req.query);
    if want.as_deref() != Some(got.as_str()) {
        let _ = std::fs::remove_file(&stored.path);
        let body = oci_error("DIGEST_INVALID", "digest does not match");
        return respond(s, "400 Bad Request", &[], &body);
    }
    let path = sh.dir.join(got.replace(':', "-"));
    std::fs::rename(&stored.path, &path)?;
    let blob = Blob {
        stored: Stored { path, ..stored },
        reads: AtomicU32::new(0),
    };
    sh.blobs
        .lock()
        .map_err(lock_err)?
        .insert(got.clone(), Arc::new(blob));
    let repo = req.path.split("/blobs/uploads/").next().unwrap_or("/v2/x");
    let hs = [
        ("Location", format!("{repo}/blobs/{got}")),
        ("Docker-Content-Digest", got),
    ];
    respond(s, "201 Created", &hs, "")
}

/// Reads `len` body bytes into the upload.
fn take_body(
    s: &mut TcpStream,
    pending: &mut Vec<u8>,
    len: u64,
    w: &mut Writer,
    cipher: &LessSafeKey,
) -> io::Result<()> {
    let from_pending = pending.len().min(len as usize);
    w.push(cipher, &pending[..from_pending])?;
    pending.drain(..from_pending);
    let mut left = len - from_pending as u64;
    let mut buf = vec![0u8; RECV_BYTES];
    while left > 0 {
        let want = (left as usize).min(buf.len());
        let n = s.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        w.push(cipher, &buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// The response head, then (for a GET) every span, read and opened on
/// `READ_THREADS` threads in turn, written out in order.
fn send_blob(s: &mut TcpStream, sh: &Shared, b: &Blob, digest: &str, get: bool) -> io::Result<()> {
    let len = b.stored.len;
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\n\
         Docker-Content-Digest: {digest}\r\nDocker-Distribution-API-Version: registry/2.0\r\n\r\n"
    );
    s.write_all(head.as_bytes())?;
    if !get || len == 0 {
        return Ok(());
    }
    let direct = b.reads.fetch_add(1, Ordering::Relaxed) < DIRECT_READS;
    let file = records::open_for_reads(&b.stored.path, direct)?;
    let spans = records::records_of(len).div_ceil(records::SPAN_RECORDS);
    std::thread::scope(|scope| {
        let mut rxs = Vec::new();
        for t in 0..READ_THREADS {
            let (tx, rx) = bounded::<io::Result<Opened>>(SPANS_AHEAD);
            rxs.push(rx);
            let file = &file;
            scope.spawn(move || {
                let mut span = t;
                while span < spans {
                    let r = records::read_span(file, &sh.cipher, len, span, sh.take_buf());
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        return;
                    }
                    span += READ_THREADS;
                }
            });
        }
        for span in 0..spans {
            let rx = &rxs[(span % READ_THREADS) as usize];
            let opened = rx
                .recv()
                .map_err(|_| io::Error::other("a reader stopped"))??;
            write_plain(s, &opened)?;
            sh.put_buf(opened.buf);
        }
        Ok(())
    })
}

/// Writes a span's plaintext records, one vectored write at a time.
fn write_plain(s: &mut TcpStream, o: &Opened) -> io::Result<()> {
    let b = o.buf.as_slice();
    let mut slices: Vec<IoSlice> = o
        .plain
        .iter()
        .map(|r| IoSlice::new(&b[r.clone()]))
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = s.write_vectored(rest)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

fn main() -> io::Result<()> {
    let mut port = 5302u16;
    let mut dir = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--port", Some(v)) => port = v.parse().map_err(|_| io::Error::other("--port N"))?,
            ("--dir", Some(v)) => dir = Some(PathBuf::from(v)),
            _ => return Err(io::Error::other("usage: pull_floor [--port N] --dir DIR")),
        }
    }
    let dir = dir.ok_or_else(|| io::Error::other("usage: pull_floor [--port N] --dir DIR"))?;
    std::fs::create_dir_all(&dir)?;
    let sh = Arc::new(Shared {
        dir,
        cipher: records::cipher()?,
        uploads: Mutex::new(HashMap::new()),
        blobs: Mutex::new(HashMap::new()),
        idle: Mutex::new(Vec::new()),
        next_id: AtomicU64::new(0),
    });
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    eprintln!("pull floor on {}", listener.local_addr()?);
    http::serve_forever(listener, sh, route)
}
