//! Running the server: open the store, bind, serve HTTP/1.1 connections
//! (bounded in number, with a bound on the request head and its arrival
//! time), expire idle upload sessions, and on SIGTERM or SIGINT stop
//! accepting, drain requests in flight for a grace period, and close the
//! store cleanly.

use crate::app::{handle, App};
use crate::config::ServerConfig;
use crate::meta::REGISTRY_CFS;
use crate::metrics::Metrics;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use orlop_engine::{KeySource, Store, StoreConfig};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

enum Either<A, B> {
    Left(A),
    Right(B),
}

/// Waits for whichever of two futures finishes first (the other is dropped).
async fn race<A: Future, B: Future>(a: A, b: B) -> Either<A::Output, B::Output> {
    let (mut a, mut b) = (std::pin::pin!(a), std::pin::pin!(b));
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(x) = a.as_mut().poll(cx) {
            return std::task::Poll::Ready(Either::Left(x));
        }
        if let std::task::Poll::Ready(y) = b.as_mut().poll(cx) {
            return std::task::Poll::Ready(Either::Right(y));
        }
        std::task::Poll::Pending
    })
    .await
}

/// Largest request head (request line and headers) accepted, and the read
/// buffer of a connection without a large-read permit.
pub const REQUEST_HEAD_BYTES_MAX: usize = 64 * 1024;
/// Read buffer of a connection with a large-read permit
/// (`large_read_connections_max`). Its head is still held to
/// `REQUEST_HEAD_BYTES_MAX`, by `app::dispatch`.
const LARGE_READ_BYTES: usize = 1 << 20;

/// Counts a connection in the metrics while it lives.
struct ConnGauge {
    connections: prometheus_client::metrics::gauge::Gauge,
    large: Option<prometheus_client::metrics::gauge::Gauge>,
}

impl ConnGauge {
    fn new(m: &Metrics, large: bool) -> Self {
        m.connections.inc();
        let large = large.then(|| {
            m.connections_large_read.inc();
            m.connections_large_read.clone()
        });
        ConnGauge {
            connections: m.connections.clone(),
            large,
        }
    }
}

impl Drop for ConnGauge {
    fn drop(&mut self) {
        self.connections.dec();
        if let Some(g) = &self.large {
            g.dec();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("store: {0}")]
    Store(#[from] orlop_engine::Error),
    #[error("restoring upload sessions: {0}")]
    Restore(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

/// The engine configuration the server opens its store with.
pub fn store_config(cfg: &ServerConfig) -> StoreConfig {
    let mut s = StoreConfig::new(&cfg.data);
    s.segment_bytes = cfg.segment_bytes;
    // Request bodies arrive in pieces of up to 256 KiB (`routes::uploads`):
    // two queued per writer keep its threads busy, and 16 streaming uploads
    // within the memory bound.
    s.write_pipeline_pieces_max = 2;
    s.write_inline_from_writers = cfg.write_inline_from_writers;
    s.append_mode = if cfg.segment_direct_io {
        orlop_engine::AppendMode::Direct
    } else {
        orlop_engine::AppendMode::Buffered
    };
    s.read_direct = cfg.segment_direct_io;
    if let Some(k) = &cfg.key_file {
        s.key = KeySource::File(k.clone());
    }
    s.extra_column_families = REGISTRY_CFS.iter().map(|c| c.to_string()).collect();
    s
}

/// Serves until SIGTERM or SIGINT. `on_ready` gets the bound address (the
/// port is chosen by the OS when the configured one is 0).
pub fn run(cfg: ServerConfig, on_ready: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
    run_until(cfg, on_ready, shutdown_signal)
}

/// Takes SIGTERM and SIGINT over at once (not at the future's first poll):
/// called before the address is announced, so that a signal sent as soon
/// as it is cannot find the default action (death) still in place.
fn shutdown_signal() -> impl Future<Output = ()> + Send {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                race(term.recv(), int.recv()).await;
            }
            _ => std::future::pending::<()>().await,
        }
        tracing::info!("shutdown requested");
    }
}

/// Serves until the future that `stop` returns completes; `stop` is called
/// inside the runtime, before the address is announced.
pub fn run_until<F: Future<Output = ()> + Send>(
    cfg: ServerConfig,
    on_ready: impl FnOnce(SocketAddr),
    stop: impl FnOnce() -> F + Send,
) -> Result<(), ServeError> {
    let metrics = Arc::new(Metrics::new());
    let mut scfg = store_config(&cfg);
    scfg.observer = Some(Arc::new(metrics.engine.clone()));
    let store = Arc::new(Store::open(scfg)?);
    tracing::info!(data = %cfg.data.display(), io = store.io_backend(), "store open");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Blob downloads hold blocking threads while they stream; keep room
        // beside them for the short blocking calls of every other request.
        .max_blocking_threads(cfg.downloads_streaming_max + 256)
        .thread_name("orlop-http")
        .build()
        .map_err(io_err("starting the runtime"))?;
    let app = Arc::new(App::new(cfg.clone(), store.clone(), metrics));
    let foreign = app
        .uploads
        .restore(&store)
        .map_err(|e| ServeError::Restore(e.to_string()))?;
    for r in foreign {
        store.abort_held(r)?;
    }
    let restored = app.uploads.open_count();
    if restored > 0 {
        tracing::info!(sessions = restored, "resumable upload sessions restored");
    }
    let app2 = app.clone();
    let served = rt.block_on(async move {
        // SIGTERM, SIGINT and SIGUSR1 are taken over before the address is
        // announced.
        let stop = stop();
        let usr1 = gc_signal();
        let listener = TcpListener::bind(cfg.addr)
            .await
            .map_err(io_err(format!("binding {}", cfg.addr)))?;
        let addr = listener.local_addr().map_err(io_err("local address"))?;
        tracing::info!(%addr, "listening");
        on_ready(addr);
        serve(app2, listener, stop, usr1).await;
        Ok::<_, ServeError>(())
    });
    drop(app);
    rt.shutdown_timeout(Duration::from_secs(5));
    close_store(store);
    served
}

/// Closes the store once the upload threads have let go of it.
fn close_store(mut store: Arc<Store>) {
    for _ in 0..500 {
        match Arc::try_unwrap(store) {
            Ok(s) => {
                match s.close() {
                    Ok(()) => tracing::info!("store closed cleanly"),
                    Err(e) => tracing::error!(error = %e, "store did not close cleanly"),
                }
                return;
            }
            Err(s) => {
                store = s;
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    tracing::warn!("store still in use at exit; it closes when the last user drops it");
}

async fn serve<F: Future<Output = ()>>(
    app: Arc<App>,
    listener: TcpListener,
    stop: F,
    usr1: Option<tokio::signal::unix::Signal>,
) {
    let cfg = app.cfg.clone();
    let conns = Arc::new(tokio::sync::Semaphore::new(cfg.connections_max));
    let large_reads = Arc::new(tokio::sync::Semaphore::new(cfg.large_read_connections_max));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let expiry = tokio::spawn(expire_uploads(app.clone()));
    let gc = tokio::spawn(collect_garbage(app.clone(), usr1));
    let scrub = tokio::spawn(scrub_segments(app.clone()));
    let mut stop = std::pin::pin!(stop);
    loop {
        let permit = match race(conns.clone().acquire_owned(), stop.as_mut()).await {
            Either::Left(Ok(p)) => p,
            _ => break,
        };
        let accepted = match race(listener.accept(), stop.as_mut()).await {
            Either::Left(r) => r,
            Either::Right(()) => break,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // Held for the connection's life: a connection keeps the buffer
        // size it was accepted with.
        let large = large_reads.clone().try_acquire_owned().ok();
        let read_bytes = match large {
            Some(_) => LARGE_READ_BYTES,
            None => REQUEST_HEAD_BYTES_MAX,
        };
        let app = app.clone();
        let open = ConnGauge::new(&app.metrics, large.is_some());
        let mut stop_conn = stop_rx.clone();
        let head_timeout = Duration::from_secs(cfg.request_head_timeout_secs);
        tasks.spawn(async move {
            let _permit = (permit, large, open);
            let svc = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(handle(app, req).await) }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(head_timeout)
                .max_buf_size(read_bytes);
            let mut conn = std::pin::pin!(builder.serve_connection(TokioIo::new(stream), svc));
            match race(conn.as_mut(), stop_conn.changed()).await {
                Either::Left(Err(e)) => {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                Either::Left(Ok(())) => {}
                Either::Right(_) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    drop(listener);
    expiry.abort();
    // A run in progress stops at its next batch; wait for it so that the
    // store closes cleanly.
    app.gc_cancel
        .store(true, std::sync::atomic::Ordering::SeqCst);
    gc.abort();
    let _ = gc.await;
    // A pass in progress ends at its next record (it only reads).
    scrub.abort();
    let _ = scrub.await;
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        while app.gc_running.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if waited.is_err() {
        tracing::warn!("garbage collection did not stop within 30 s");
    }
    app.uploads.begin_shutdown();
    let _ = stop_tx.send(true);
    let grace = Duration::from_secs(cfg.shutdown_grace_secs);
    let drained =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            left = tasks.len(),
            "grace period over; cutting remaining connections"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    // Checkpointed uploads stay held in the store and resume after a restart.
    app.uploads.detach_all();
}

async fn expire_uploads(app: Arc<App>) {
    let idle = Duration::from_secs(app.cfg.upload_expiry_secs);
    let every = (idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let (n, held) = app.uploads.expire(idle);
        crate::routes::uploads::abort_held(&app, held).await;
        if n > 0 {
            app.metrics.uploads_expired.inc_by(n as u64);
            tracing::info!(sessions = n, "expired idle upload sessions");
        }
    }
}

/// Takes SIGUSR1 over (a request for a collection), inside the runtime.
fn gc_signal() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::user_defined1()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGUSR1 handler: on-demand collection is unavailable");
            None
        }
    }
}

/// Online garbage collection every `gc_interval_secs` (the first run one
/// interval after startup), and on demand when the process gets SIGUSR1
/// (`kill -USR1 <pid>`; also with periodic runs off), on a blocking thread
/// beside the traffic.
async fn collect_garbage(app: Arc<App>, mut usr1: Option<tokio::signal::unix::Signal>) {
    let periodic = app.cfg.gc_interval_secs > 0;
    if !periodic && usr1.is_none() {
        return;
    }
    // With periodic runs off, the timer never fires.
    let every = Duration::from_secs(app.cfg.gc_interval_secs.max(1));
    let start = tokio::time::Instant::now() + every;
    let mut tick = tokio::time::interval_at(start, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let timer = async {
            if periodic {
                tick.tick().await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let requested = async {
            match usr1.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        if let Either::Right(()) = race(timer, requested).await {
            tracing::info!("garbage collection requested (SIGUSR1)");
        }
        let app2 = app.clone();
        let r = tokio::task::spawn_blocking(move || crate::gc::run(&app2)).await;
        if let Err(e) = r {
            tracing::error!(error = %e, "garbage collection task failed");
        }
    }
}

/// A scrub pass every `scrub_interval_secs`, the first 10 minutes after
/// startup (or one interval, if that is shorter), on a blocking thread.
async fn scrub_segments(app: Arc<App>) {
    if app.cfg.scrub_interval_secs == 0 {
        return;
    }
    let every = Duration::from_secs(app.cfg.scrub_interval_secs);
    let first = every.min(Duration::from_secs(600));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + first, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let app2 = app.clone();
        let r = tokio::task::spawn_blocking(move || crate::scrub::run(&app2)).await;
        if let Err(e) = r {
            tracing::error!(error = %e, "scrub task failed");
        }
    }
}
