//! HTTP plumbing: response bodies (whole or streamed from a bounded
//! channel), response builders, request-body reading with bounds, and query
//! strings.

use crate::error::{ApiError, ApiResult};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

pub type RespBody = UnsyncBoxBody<Bytes, std::io::Error>;
pub type Resp = Response<RespBody>;

/// A response body fed piece by piece from a bounded channel; an error from
/// the producer aborts the response (the connection is cut, so a client
/// never takes a short or damaged body for a whole one).
pub struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Result<Vec<Bytes>, std::io::Error>>,
    /// Pieces of the last batch received, not yet sent.
    pending: std::collections::VecDeque<Bytes>,
    len: u64,
}

impl ChannelBody {
    /// A body fed in batches of pieces (one message per engine read-ahead
    /// batch: a wake-up per batch, not per piece).
    pub fn new(
        rx: tokio::sync::mpsc::Receiver<Result<Vec<Bytes>, std::io::Error>>,
        len: u64,
    ) -> Self {
        ChannelBody {
            rx,
            pending: std::collections::VecDeque::new(),
            len,
        }
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(batch))) => self.pending.extend(batch),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len)
    }
}

pub fn full(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> RespBody {
    full(Bytes::new())
}

/// A response with a status, headers and a whole body.
pub fn respond(status: u16, headers: &[(&str, String)], body: impl Into<Bytes>) -> Resp {
    let body: Bytes = body.into();
    let mut r = Response::new(full(body.clone()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    set_headers(r.headers_mut(), headers);
    if !r.headers().contains_key(http::header::CONTENT_LENGTH) {
        r.headers_mut()
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    r
}

pub fn set_headers(h: &mut HeaderMap, headers: &[(&str, String)]) {
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            http::header::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.insert(k, v);
        }
    }
}

/// The spec's JSON error response.
pub fn error_response(e: &ApiError) -> Resp {
    let (status, _) = e.status_and_code();
    let mut headers = vec![("Content-Type", "application/json".to_string())];
    match e {
        ApiError::UploadOutOfOrder { offset, location } => {
            headers.push(("Location", location.clone()));
            headers.push(("Range", upload_range(*offset)));
        }
        ApiError::RangeNotSatisfiable { size } => {
            headers.push(("Content-Range", format!("bytes */{size}")));
        }
        ApiError::Unauthorized => {
            headers.push(("WWW-Authenticate", "Basic realm=\"orlop\"".to_string()));
        }
        _ => {}
    }
    respond(status, &headers, e.body())
}

/// The `Range` header of an upload holding `offset` bytes (`0-0` when
/// empty, as Distribution and its clients have it).
pub fn upload_range(offset: u64) -> String {
    format!("0-{}", offset.saturating_sub(1))
}

pub fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Reads a whole request body of at most `limit` bytes.
pub async fn read_body<B>(body: &mut B, limit: u64, idle: Duration) -> ApiResult<Bytes>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut out = bytes::BytesMut::new();
    while let Some(data) = next_data(body, idle).await? {
        let size = (out.len() + data.len()) as u64;
        if size > limit {
            return Err(ApiError::TooLarge { size, limit });
        }
        out.extend_from_slice(&data);
    }
    Ok(out.freeze())
}

/// The next data frame of a request body; `None` at its end. A client that
/// sends nothing for `idle` gets an error rather than holding resources.
pub async fn next_data<B>(body: &mut B, idle: Duration) -> ApiResult<Option<Bytes>>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    loop {
        let frame = tokio::time::timeout(idle, body.frame())
            .await
            .map_err(|_| ApiError::BlobUploadInvalid("request body stalled".into()))?;
        match frame {
            None => return Ok(None),
            Some(Err(e)) => {
                return Err(ApiError::BlobUploadInvalid(format!(
                    "reading request body: {e}"
                )))
            }
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    if !d.is_empty() {
                        return Ok(Some(d));
                    }
                }
            }
        }
    }
}

/// Query parameters, percent-decoded, in order.
pub fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    q.map(|q| {
        form_urlencoded::parse(q.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    })
    .unwrap_or_default()
}

pub fn query_get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A parsed `Range: bytes=...` request against a blob of `size` bytes:
/// `Ok(None)` for no (or an ignored multi-range) header, else (offset, len).
pub fn parse_range(h: Option<&str>, size: u64) -> ApiResult<Option<(u64, u64)>> {
    let Some(h) = h else { return Ok(None) };
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let unsatisfiable = ApiError::RangeNotSatisfiable { size };
    let (a, b) = spec
        .split_once('-')
        .ok_or(ApiError::RangeNotSatisfiable { size })?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let n: u64 = b
            .parse()
            .map_err(|_| ApiError::RangeNotSatisfiable { size })?;
        if n == 0 || size == 0 {
            return Err(unsatisfiable);
        }
        (size.saturating_sub(n), size - 1)
    } else {
        let start: u64 = a
            .parse()
            .map_err(|_| ApiError::RangeNotSatisfiable { size })?;
        let end = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            let e: u64 = b
                .parse()
                .map_err(|_| ApiError::RangeNotSatisfiable { size })?;
            e.min(size.saturating_sub(1))
        };
        (start, end)
    };
    if start >= size || end < start {
        return Err(unsatisfiable);
    }
    Ok(Some((start, end - start + 1)))
}

/// `Content-Range: <start>-<end>` of a PATCH (with or without `bytes=`).
pub fn parse_content_range(h: &str) -> ApiResult<(u64, u64)> {
    let bad = || ApiError::BlobUploadInvalid(format!("bad Content-Range {h:?}"));
    let s = h.trim();
    let s = s
        .strip_prefix("bytes=")
        .or_else(|| s.strip_prefix("bytes "))
        .unwrap_or(s);
    let s = s.split('/').next().unwrap_or(s);
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let start: u64 = a.trim().parse().map_err(|_| bad())?;
    let end: u64 = b.trim().parse().map_err(|_| bad())?;
    if end < start {
        return Err(bad());
    }
    Ok((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let r = |h: &str| parse_range(Some(h), 100);
        assert_eq!(r("bytes=0-9").ok(), Some(Some((0, 10))));
        assert_eq!(r("bytes=90-").ok(), Some(Some((90, 10))));
        assert_eq!(r("bytes=-5").ok(), Some(Some((95, 5))));
        assert_eq!(r("bytes=50-500").ok(), Some(Some((50, 50))));
        assert_eq!(r("bytes=0-1,5-6").ok(), Some(None));
        assert!(r("bytes=100-").is_err());
        assert!(r("bytes=9-3").is_err());
        assert!(r("bytes=-0").is_err());
        assert!(r("bytes=x-").is_err());
        assert!(parse_range(Some("bytes=0-"), 0).is_err());
    }

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("0-99").ok(), Some((0, 99)));
        assert_eq!(parse_content_range("bytes=100-199").ok(), Some((100, 199)));
        assert_eq!(parse_content_range("bytes 5-9/10").ok(), Some((5, 9)));
        assert!(parse_content_range("9-5").is_err());
        assert!(parse_content_range("abc").is_err());
        assert!(parse_content_range("18446744073709551615-18446744073709551616").is_err());
    }
}
