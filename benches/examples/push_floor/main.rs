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
//! upload runs its hashing and its cutting on two threads of their own;
//! one that starts while two others are open runs both on its
//! connection's thread, as Orlop's writers do (`write_inline_from_writers`,
//! by default the cores).
//!
//! With `--keep DIR` it also does the disk work a durable push cannot skip
//! (`keep.rs`): each upload's records are written to a file of its own
//! with O_DIRECT, 1 MiB at a time (a lone upload's by a thread of their
//! own, behind its cutting, as Orlop's lone writer appends on a thread of
//! its own), and synced before a PATCH or PUT is answered. That floor
//! bounds a registry that keeps what it acknowledges.
//!
//! `cut.rs` is the per-chunk work, `upload.rs` one upload's hashing and
//! cutting (threaded or inline), `http.rs` the little HTTP/1.1 it speaks.

mod cut;
mod http;
mod keep;
mod upload;

use cut::Keys;
use http::{oci_error, respond, skip_body, Request};
use std::collections::HashMap;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use upload::Upload;

/// Uploads open at once (each holds a 4 MiB block, two at most four and
/// two threads: at most about 1 GiB in all).
const UPLOADS_MAX: usize = 256;
/// With this many other uploads open, a new one hashes and cuts on its
/// connection's thread (Orlop's `write_inline_from_writers`: the cores).
const INLINE_FROM_UPLOADS: usize = 2;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Work {
    Sha,
    Full,
}

struct Shared {
    work: Work,
    keys: Arc<Keys>,
    /// With `--keep`: where each upload's records are written.
    keep: Option<PathBuf>,
    uploads: Mutex<HashMap<u64, Upload>>,
    open: AtomicUsize,
    next_id: AtomicU64,
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
        let sink = match &sh.keep {
            Some(dir) => Some(keep::Sink::create(
                &dir.join(format!("upload-{id}")),
                keep::APPEND_WRITE_BYTES,
                !inline,
            )?),
            None => None,
        };
        uploads.insert(id, Upload::new(sh.work, &sh.keys, inline, sink)?);
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
    let want = http::form_digest(&req.query);
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

fn main() -> io::Result<()> {
    let mut port = 5301u16;
    let mut work = Work::Full;
    let mut keep = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--port", Some(v)) => port = v.parse().map_err(|_| io::Error::other("--port N"))?,
            ("--work", Some(v)) if v == "full" => work = Work::Full,
            ("--work", Some(v)) if v == "sha" => work = Work::Sha,
            ("--keep", Some(v)) => keep = Some(PathBuf::from(v)),
            _ => {
                return Err(io::Error::other(
                    "usage: push_floor [--port N] [--work full|sha] [--keep DIR]",
                ))
            }
        }
    }
    if let Some(dir) = &keep {
        if work != Work::Full {
            return Err(io::Error::other("--keep needs --work full"));
        }
        std::fs::create_dir_all(dir)?;
    }
    let sh = Arc::new(Shared {
        work,
        keys: Arc::new(Keys::new()?),
        keep: keep.clone(),
        uploads: Mutex::new(HashMap::new()),
        open: AtomicUsize::new(0),
        next_id: AtomicU64::new(0),
    });
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    // The first line names the address (`--port 0` picks a free port).
    eprintln!(
        "push floor on {}, work {work:?}, keep {keep:?}",
        listener.local_addr()?
    );
    http::serve_forever(listener, sh, route)
}
