//! Prometheus metrics, served at `/metrics` in the text exposition format.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub method: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs to about 3.3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: HistogramFamily<RouteLabels>,
    pub received_bytes: Counter,
    pub sent_bytes: Counter,
    pub upload_sessions: Gauge,
    /// Connections open, and of them those reading 1 MiB at a time.
    pub connections: Gauge,
    pub connections_large_read: Gauge,
    pub uploads_expired: Counter,
    pub blob_commit_seconds: Histogram,
    pub engine: EngineObserver,
    pub gc: GcMetrics,
    pub scrub: ScrubMetrics,
}

/// The scrub of sealed segments, one observation per pass.
#[derive(Clone, Default)]
pub struct ScrubMetrics {
    pub passes: Counter,
    pub failures: Counter,
    pub bytes: Counter,
    pub records: Counter,
    pub damaged: Counter,
    pub last_pass_damaged: Gauge,
    pub last_pass_unix_seconds: Gauge,
}

/// Online garbage collection, one observation per run.
#[derive(Clone, Default)]
pub struct GcMetrics {
    pub runs: Counter,
    pub failures: Counter,
    pub damaged: Counter,
    pub links_removed: Counter,
    pub untagged_deleted: Counter,
    pub blobs_freed: Counter,
    pub bytes_freed: Counter,
    pub chunk_bytes_released: Counter,
    pub segments_compacted: Counter,
    pub bytes_compacted: Counter,
    pub bytes_moved: Counter,
    pub last_duration_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub last_success_unix_seconds: Gauge,
}

/// The engine's commit-path timings and read-path counts, fed through
/// [`orlop_engine::Observer`].
#[derive(Clone)]
pub struct EngineObserver {
    segment_fsync_seconds: Histogram,
    index_write_seconds: Histogram,
    group_commit_requests: Histogram,
    span_reads: Family<SourceLabels, Counter>,
    span_read_bytes: Family<SourceLabels, Counter>,
}

impl std::fmt::Debug for EngineObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EngineObserver")
    }
}

impl orlop_engine::Observer for EngineObserver {
    fn segment_synced(&self, elapsed: Duration) {
        self.segment_fsync_seconds.observe(elapsed.as_secs_f64());
    }
    fn index_written(&self, elapsed: Duration) {
        self.index_write_seconds.observe(elapsed.as_secs_f64());
    }
    fn group_committed(&self, requests: usize) {
        self.group_commit_requests.observe(requests as f64);
    }
    fn span_read(&self, source: orlop_engine::SpanSource, bytes: usize) {
        let labels = SourceLabels {
            source: source.as_str(),
        };
        self.span_reads.get_or_create(&labels).inc();
        self.span_read_bytes
            .get_or_create(&labels)
            .inc_by(bytes as u64);
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "orlop_http_requests",
            "HTTP requests by route, method and status",
            requests.clone(),
        );
        let request_seconds: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "orlop_http_request_duration_seconds",
            "Time from request head to response head, by route",
            request_seconds.clone(),
        );
        let received_bytes = Counter::default();
        registry.register(
            "orlop_http_received_bytes",
            "Request body bytes received",
            received_bytes.clone(),
        );
        let sent_bytes = Counter::default();
        registry.register(
            "orlop_http_sent_bytes",
            "Response body bytes sent (as declared by Content-Length)",
            sent_bytes.clone(),
        );
        let upload_sessions = Gauge::default();
        registry.register(
            "orlop_upload_sessions",
            "Blob upload sessions open",
            upload_sessions.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "orlop_http_connections",
            "Client connections open",
            connections.clone(),
        );
        let connections_large_read = Gauge::default();
        registry.register(
            "orlop_http_connections_large_read",
            "Client connections open that read requests 1 MiB at a time (large_read_connections_max)",
            connections_large_read.clone(),
        );
        let uploads_expired = Counter::default();
        registry.register(
            "orlop_upload_sessions_expired",
            "Upload sessions cancelled because they were idle too long",
            uploads_expired.clone(),
        );
        let blob_commit_seconds = latency_histogram();
        registry.register(
            "orlop_blob_commit_duration_seconds",
            "Time to commit an uploaded blob durably (digest check, fsync, index)",
            blob_commit_seconds.clone(),
        );
        let engine = EngineObserver {
            segment_fsync_seconds: latency_histogram(),
            index_write_seconds: latency_histogram(),
            group_commit_requests: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            span_reads: Family::default(),
            span_read_bytes: Family::default(),
        };
        registry.register(
            "orlop_engine_span_reads",
            "Bulk reads of blob data (spans) by source: direct (disk, past the page cache), page_cache (held there), admitted (read often, now kept there), buffered (direct I/O off)",
            engine.span_reads.clone(),
        );
        registry.register(
            "orlop_engine_span_read_bytes",
            "Bytes of the spans read, by source as in orlop_engine_span_reads",
            engine.span_read_bytes.clone(),
        );
        registry.register(
            "orlop_engine_segment_fsync_duration_seconds",
            "fsync of the active segment before a group commit",
            engine.segment_fsync_seconds.clone(),
        );
        registry.register(
            "orlop_engine_index_write_duration_seconds",
            "Synced RocksDB write batch of a group commit",
            engine.index_write_seconds.clone(),
        );
        registry.register(
            "orlop_engine_group_commit_requests",
            "Requests gathered into one group commit",
            engine.group_commit_requests.clone(),
        );
        let gc = GcMetrics::default();
        for (name, help, c) in [
            ("orlop_gc_runs", "Garbage collection runs", &gc.runs),
            ("orlop_gc_failures", "Garbage collection runs that failed", &gc.failures),
            (
                "orlop_gc_damaged",
                "Rows and blobs garbage collection skipped because they are damaged (see orlop fsck)",
                &gc.damaged,
            ),
            ("orlop_gc_blobs_freed", "Blobs deleted by garbage collection", &gc.blobs_freed),
            (
                "orlop_gc_untagged_manifests_deleted",
                "Untagged manifests deleted by garbage collection (gc_untagged_age_secs)",
                &gc.untagged_deleted,
            ),
            (
                "orlop_gc_links_removed",
                "Repository links no manifest named, removed by garbage collection",
                &gc.links_removed,
            ),
            ("orlop_gc_freed_bytes", "Logical bytes of the blobs deleted by garbage collection", &gc.bytes_freed),
            ("orlop_compact_segments_removed", "Segments emptied and deleted by compaction", &gc.segments_compacted),
            ("orlop_compact_reclaimed_bytes", "Segment bytes returned to the file system by compaction", &gc.bytes_compacted),
            ("orlop_compact_moved_bytes", "Live record bytes compaction copied to new segments", &gc.bytes_moved),
            (
                "orlop_gc_released_chunk_bytes",
                "Stored bytes of chunks left without references by garbage collection (reclaimed by compaction)",
                &gc.chunk_bytes_released,
            ),
        ] {
            registry.register(name, help, c.clone());
        }
        registry.register(
            "orlop_gc_last_duration_seconds",
            "Duration of the latest garbage collection run",
            gc.last_duration_seconds.clone(),
        );
        registry.register(
            "orlop_gc_last_success_unix_seconds",
            "When the latest successful garbage collection run ended",
            gc.last_success_unix_seconds.clone(),
        );
        let scrub = ScrubMetrics::default();
        for (name, help, c) in [
            ("orlop_scrub_passes", "Scrub passes over the sealed segments", &scrub.passes),
            ("orlop_scrub_failures", "Scrub passes that failed", &scrub.failures),
            ("orlop_scrub_read_bytes", "Segment bytes the scrub read and checked", &scrub.bytes),
            ("orlop_scrub_records", "Records the scrub checked", &scrub.records),
            (
                "orlop_scrub_damaged",
                "Damaged records and segments the scrub found (each pass counts again; run orlop fsck --repair)",
                &scrub.damaged,
            ),
        ] {
            registry.register(name, help, c.clone());
        }
        registry.register(
            "orlop_scrub_last_pass_damaged",
            "Damaged records and segments found by the latest complete scrub pass",
            scrub.last_pass_damaged.clone(),
        );
        registry.register(
            "orlop_scrub_last_pass_unix_seconds",
            "When the latest complete scrub pass ended",
            scrub.last_pass_unix_seconds.clone(),
        );
        Metrics {
            registry,
            requests,
            request_seconds,
            received_bytes,
            sent_bytes,
            upload_sessions,
            connections,
            connections_large_read,
            uploads_expired,
            blob_commit_seconds,
            engine,
            gc,
            scrub,
        }
    }

    pub fn observe_request(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_string(),
                method: method.to_string(),
                status: status.to_string(),
            })
            .inc();
        self.request_seconds
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
