//! The little HTTP/1.1 the floors speak (the push floor's, and the pull
//! floor's through `#[path]`): a thread per connection, request heads
//! (httparse), plain responses, OCI error bodies.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Largest request head accepted.
const HEAD_BYTES_MAX: usize = 64 << 10;
/// Connections served at once; one more is closed at once.
const CONNECTIONS_MAX: usize = 256;

/// What answers one request: the connection, the server's state, the
/// bytes read past the request's head, the head.
pub(crate) type Route<S> = fn(&mut TcpStream, &S, &mut Vec<u8>, &Request) -> io::Result<()>;

/// Serves every connection `listener` takes on a thread of its own, each
/// request by `route`, until accepting fails.
pub(crate) fn serve_forever<S: Send + Sync + 'static>(
    listener: TcpListener,
    sh: Arc<S>,
    route: Route<S>,
) -> io::Result<()> {
    let live = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let s = conn?;
        if live.load(Ordering::SeqCst) >= CONNECTIONS_MAX {
            continue; // dropped: the client sees the connection closed
        }
        live.fetch_add(1, Ordering::SeqCst);
        let (sh, live) = (sh.clone(), live.clone());
        std::thread::spawn(move || {
            if let Err(e) = serve(s, sh.as_ref(), route) {
                eprintln!("connection: {e}");
            }
            live.fetch_sub(1, Ordering::SeqCst);
        });
    }
    Ok(())
}

/// One connection's requests, in turn.
fn serve<S>(mut s: TcpStream, sh: &S, route: Route<S>) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut pending = Vec::new();
    while let Some(req) = read_head(&mut s, &mut pending)? {
        if req.expect_continue && req.len > 0 {
            s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        route(&mut s, sh, &mut pending, &req)?;
        if req.close {
            break;
        }
    }
    Ok(())
}

pub(crate) struct Request {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) query: String,
    pub(crate) len: u64,
    pub(crate) close: bool,
    /// `Expect: 100-continue`: the client waits for a 100 before the body.
    pub(crate) expect_continue: bool,
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

pub(crate) fn respond(
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

/// `digest=` of a query string, percent-decoded (only `%3A`, as clients send it).
pub(crate) fn form_digest(query: &str) -> Option<String> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("digest="))
        .map(|d| d.replace("%3A", ":").replace("%3a", ":"))
}

pub(crate) fn oci_error(code: &str, message: &str) -> String {
    format!(r#"{{"errors":[{{"code":"{code}","message":"{message}"}}]}}"#)
}

/// Reads and drops `len` body bytes.
pub(crate) fn skip_body(s: &mut TcpStream, pending: &mut Vec<u8>, len: u64) -> io::Result<()> {
    let from_pending = pending.len().min(len as usize);
    pending.drain(..from_pending);
    let left = len - from_pending as u64;
    io::copy(&mut s.take(left), &mut io::sink())?;
    Ok(())
}
