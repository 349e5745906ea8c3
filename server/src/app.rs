//! The application: shared state, the router, and per-request logging and
//! metrics. Handlers live in `routes/`.

use crate::config::ServerConfig;
use crate::error::{ApiError, ApiResult};
use crate::http::{error_response, query_pairs, respond, Resp};
use crate::meta::Registry;
use crate::metrics::Metrics;
use crate::names::{parse_digest, Reference, RepoName};
use crate::routes;
use crate::upload::Uploads;
use http::Method;
use hyper::body::Incoming;
use orlop_engine::{Digest, Store};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub type Req = http::Request<Incoming>;

pub struct App {
    pub cfg: ServerConfig,
    pub registry: Registry,
    pub uploads: Uploads,
    pub metrics: Arc<Metrics>,
    /// Bounds the request bodies streaming into the engine at once.
    pub streaming: tokio::sync::Semaphore,
    /// Bounds the blob responses streaming out of the engine at once (each
    /// holds a blocking thread while it streams).
    pub downloads: Arc<tokio::sync::Semaphore>,
    /// Set at shutdown: a garbage collection run in progress ends early.
    pub gc_cancel: Arc<std::sync::atomic::AtomicBool>,
    /// A garbage collection run is in progress (on a blocking thread).
    pub gc_running: std::sync::atomic::AtomicBool,
}

impl App {
    pub fn new(cfg: ServerConfig, store: Arc<Store>, metrics: Arc<Metrics>) -> Self {
        App {
            uploads: Uploads::new(cfg.upload_sessions_max),
            streaming: tokio::sync::Semaphore::new(cfg.uploads_streaming_max),
            downloads: Arc::new(tokio::sync::Semaphore::new(cfg.downloads_streaming_max)),
            registry: Registry::new(store)
                .with_link_touch_after_ms(cfg.gc_grace_secs.saturating_mul(500).max(1000)),
            gc_cancel: Arc::default(),
            gc_running: Default::default(),
            metrics,
            cfg,
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        self.registry.store()
    }

    /// How long a request body may stall before the request fails.
    pub fn body_idle(&self) -> Duration {
        Duration::from_secs(self.cfg.request_head_timeout_secs.max(60))
    }
}

/// Runs blocking engine work off the async workers.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("blocking task failed: {e}")))?
}

/// Where a request goes, with its path parameters parsed and validated.
pub enum Route {
    Base,
    Catalog,
    Metrics,
    Blob(RepoName, Digest),
    UploadStart(RepoName),
    Upload(RepoName, String),
    Manifest(RepoName, Reference),
    Tags(RepoName),
    Referrers(RepoName, Digest),
}

/// The route's name for logs and metrics (a fixed, small set).
pub fn route_name(path: &str) -> &'static str {
    match split_route(path) {
        Some(Shape::Base) => "base",
        Some(Shape::Catalog) => "catalog",
        Some(Shape::Metrics) => "metrics",
        Some(Shape::Tags(_)) => "tags",
        Some(Shape::UploadStart(_) | Shape::Upload(..)) => "upload",
        Some(Shape::Blob(..)) => "blob",
        Some(Shape::Manifest(..)) => "manifest",
        Some(Shape::Referrers(..)) => "referrers",
        None => "unknown",
    }
}

/// A request path split into its parts, not yet validated.
enum Shape<'a> {
    Base,
    Catalog,
    Metrics,
    Tags(&'a str),
    UploadStart(&'a str),
    Upload(&'a str, &'a str),
    Blob(&'a str, &'a str),
    Manifest(&'a str, &'a str),
    Referrers(&'a str, &'a str),
}

/// Splits off the last segment first (a digest, tag or session id never
/// holds a '/'), so that repository names such as `team/blobs/app` route
/// correctly.
fn split_route(path: &str) -> Option<Shape<'_>> {
    match path {
        "/v2" | "/v2/" => return Some(Shape::Base),
        "/v2/_catalog" => return Some(Shape::Catalog),
        "/metrics" => return Some(Shape::Metrics),
        _ => {}
    }
    let rest = path.strip_prefix("/v2/")?;
    if let Some(name) = rest
        .strip_suffix("/blobs/uploads/")
        .or_else(|| rest.strip_suffix("/blobs/uploads"))
    {
        return Some(Shape::UploadStart(name));
    }
    let (before, last) = rest.rsplit_once('/')?;
    if let Some(name) = before.strip_suffix("/blobs/uploads") {
        return Some(Shape::Upload(name, last));
    }
    if last == "list" {
        if let Some(name) = before.strip_suffix("/tags") {
            return Some(Shape::Tags(name));
        }
    }
    if let Some(name) = before.strip_suffix("/blobs") {
        return Some(Shape::Blob(name, last));
    }
    if let Some(name) = before.strip_suffix("/manifests") {
        return Some(Shape::Manifest(name, last));
    }
    if let Some(name) = before.strip_suffix("/referrers") {
        return Some(Shape::Referrers(name, last));
    }
    None
}

pub fn parse_route(path: &str) -> ApiResult<Route> {
    Ok(match split_route(path).ok_or(ApiError::NotFound)? {
        Shape::Base => Route::Base,
        Shape::Catalog => Route::Catalog,
        Shape::Metrics => Route::Metrics,
        Shape::Tags(n) => Route::Tags(RepoName::parse(n)?),
        Shape::UploadStart(n) => Route::UploadStart(RepoName::parse(n)?),
        Shape::Upload(n, id) => {
            let repo = RepoName::parse(n)?;
            if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(ApiError::BlobUploadUnknown);
            }
            Route::Upload(repo, id.to_string())
        }
        Shape::Blob(n, d) => Route::Blob(RepoName::parse(n)?, parse_digest(d)?),
        Shape::Manifest(n, r) => Route::Manifest(RepoName::parse(n)?, Reference::parse(r)?),
        Shape::Referrers(n, d) => Route::Referrers(RepoName::parse(n)?, parse_digest(d)?),
    })
}

/// The method as a metric label: a fixed set, whatever clients send.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        _ => "other",
    }
}

/// Serves one request: routes it, turns errors into the spec's error body,
/// adds the API version header, and logs and counts it.
pub async fn handle(app: Arc<App>, req: Req) -> Resp {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let route = route_name(&path);
    let bytes_in = crate::http::header(req.headers(), "content-length")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let mut resp = match dispatch(&app, req).await {
        Ok(r) => r,
        Err(e) => {
            if matches!(e, ApiError::Internal(_) | ApiError::Damaged(_)) {
                tracing::error!(error = %e, %method, %path, "request failed");
            }
            error_response(&e)
        }
    };
    resp.headers_mut().insert(
        "Docker-Distribution-API-Version",
        http::HeaderValue::from_static("registry/2.0"),
    );
    let status = resp.status().as_u16();
    let bytes_out = if method == Method::HEAD {
        0
    } else {
        crate::http::header(resp.headers(), "content-length")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let elapsed = start.elapsed();
    app.metrics.sent_bytes.inc_by(bytes_out);
    app.metrics
        .observe_request(route, method_label(&method), status, elapsed);
    tracing::info!(
        target: "orlop::access",
        method = %method,
        path = %path,
        route,
        status,
        bytes_in,
        bytes_out,
        duration_ms = elapsed.as_secs_f64() * 1000.0,
    );
    resp
}

/// Bytes of a request's head as sent: request line and header lines.
fn head_bytes(req: &Req) -> usize {
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len())
        + req.uri().authority().map_or(0, |a| a.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    let headers: usize = req
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    line + headers + 2
}

async fn dispatch(app: &Arc<App>, req: Req) -> ApiResult<Resp> {
    // A connection with a large read buffer lets hyper parse longer heads;
    // every connection is held to the same bound.
    let head_len = head_bytes(&req);
    if head_len > crate::serve::REQUEST_HEAD_BYTES_MAX {
        return Err(ApiError::HeadTooLarge {
            size: head_len as u64,
            limit: crate::serve::REQUEST_HEAD_BYTES_MAX as u64,
        });
    }
    let route = parse_route(req.uri().path())?;
    let q = query_pairs(req.uri().query());
    let m = req.method().clone();
    let head = m == Method::HEAD;
    match (route, m) {
        (Route::Base, Method::GET | Method::HEAD) => Ok(respond(
            200,
            &[("Content-Type", "application/json".into())],
            "{}",
        )),
        (Route::Metrics, Method::GET) => {
            app.metrics
                .upload_sessions
                .set(app.uploads.open_count() as i64);
            Ok(respond(
                200,
                &[(
                    "Content-Type",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8".into(),
                )],
                app.metrics.render(),
            ))
        }
        (Route::Catalog, Method::GET) => routes::lists::catalog(app, &q).await,
        (Route::Tags(repo), Method::GET) => routes::lists::tags(app, repo, &q).await,
        (Route::Referrers(repo, d), Method::GET) => {
            routes::lists::referrers(app, repo, d, &q).await
        }
        (Route::Blob(repo, d), Method::GET | Method::HEAD) => {
            routes::blobs::get(app, repo, d, head, req.headers()).await
        }
        (Route::Blob(repo, d), Method::DELETE) => routes::blobs::delete(app, repo, d).await,
        (Route::UploadStart(repo), Method::POST) => {
            routes::uploads::start(app, repo, &q, req).await
        }
        (Route::Upload(repo, id), Method::PATCH) => {
            routes::uploads::patch(app, repo, id, req).await
        }
        (Route::Upload(repo, id), Method::PUT) => {
            routes::uploads::finish(app, repo, id, &q, req).await
        }
        (Route::Upload(repo, id), Method::GET) => routes::uploads::status(app, repo, id).await,
        (Route::Upload(repo, id), Method::DELETE) => routes::uploads::cancel(app, repo, id).await,
        (Route::Manifest(repo, r), Method::GET | Method::HEAD) => {
            routes::manifests::get(app, repo, r, head, req.headers()).await
        }
        (Route::Manifest(repo, r), Method::PUT) => routes::manifests::put(app, repo, r, req).await,
        (Route::Manifest(repo, r), Method::DELETE) => routes::manifests::delete(app, repo, r).await,
        _ => Err(ApiError::MethodNotAllowed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse() {
        let d = Digest::sha256_of(b"a").to_string();
        assert!(matches!(parse_route("/v2/"), Ok(Route::Base)));
        assert!(
            matches!(parse_route("/v2/a/b/tags/list"), Ok(Route::Tags(n)) if n.as_str() == "a/b")
        );
        assert!(matches!(
            parse_route("/v2/a/blobs/uploads/"),
            Ok(Route::UploadStart(_))
        ));
        assert!(
            matches!(parse_route("/v2/a/blobs/uploads/abc"), Ok(Route::Upload(_, id)) if id == "abc")
        );
        assert!(
            matches!(parse_route(&format!("/v2/blobs/blobs/{d}")), Ok(Route::Blob(n, _)) if n.as_str() == "blobs")
        );
        assert!(matches!(
            parse_route("/v2/x/manifests/latest"),
            Ok(Route::Manifest(_, Reference::Tag(_)))
        ));
        assert!(matches!(
            parse_route(&format!("/v2/x/referrers/{d}")),
            Ok(Route::Referrers(..))
        ));
        assert!(matches!(
            parse_route("/v2/UPPER/manifests/x"),
            Err(ApiError::NameInvalid(_))
        ));
        assert!(matches!(
            parse_route("/v2/x/blobs/sha256:nothex"),
            Err(ApiError::DigestInvalid(_))
        ));
        assert!(matches!(
            parse_route("/v2/x/whatever"),
            Err(ApiError::NotFound)
        ));
        assert!(matches!(parse_route("/other"), Err(ApiError::NotFound)));
        assert_eq!(route_name("/v2/a/blobs/uploads/"), "upload");
        assert_eq!(route_name(&format!("/v2/a/blobs/{d}")), "blob");
        // Repository names may contain the API's keywords as components.
        assert!(matches!(parse_route("/v2/team/blobs/app/manifests/latest"),
            Ok(Route::Manifest(n, _)) if n.as_str() == "team/blobs/app"));
        assert!(
            matches!(parse_route(&format!("/v2/a/manifests/b/referrers/{d}")),
            Ok(Route::Referrers(n, _)) if n.as_str() == "a/manifests/b")
        );
        assert!(
            matches!(parse_route("/v2/x/tags/tags/list"), Ok(Route::Tags(n)) if n.as_str() == "x/tags")
        );
        assert!(matches!(parse_route("/v2/x/blobs/uploads/blobs/uploads/"),
            Ok(Route::UploadStart(n)) if n.as_str() == "x/blobs/uploads"));
    }
}
