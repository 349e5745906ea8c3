//! `orlop bench`: a load generator that speaks only the public Registry V2
//! API, so it measures any registry the same way (Orlop, CNCF
//! Distribution, ...). Scenarios: `blob` (one large blob pushed
//! monolithically and in chunks, then pulled), `many-blobs` (N blobs pushed
//! and pulled C at a time), `manifests` (M manifests pushed under tags, then
//! GET by tag for a fixed time), `images` (a corpus of OCI layouts pushed
//! and pulled as skopeo does), `memory` (P clients push a large blob at
//! once, for the server's peak memory). Every read is verified. Given the server's
//! PID and data directory it also reports the server's CPU seconds per
//! scenario, its peak RSS and its bytes on disk. Output: a table, or JSON.

mod client;
mod images;
mod scenarios;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use scenarios::{Outcome, Plan};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    All,
    Blob,
    ManyBlobs,
    Manifests,
    Images,
    Memory,
}

#[derive(Args)]
pub struct BenchArgs {
    /// The registry, e.g. http://127.0.0.1:5000.
    #[arg(long, default_value = "http://127.0.0.1:5000")]
    url: String,
    /// Which scenario to run.
    #[arg(long, value_enum, default_value = "all")]
    scenario: Scenario,
    /// Repository the scenarios push into (a suffix per run keeps runs apart).
    #[arg(long, default_value = "bench/load")]
    repo: String,
    /// Size of the large blob (`blob`).
    #[arg(long, default_value_t = 1 << 30)]
    blob_bytes: u64,
    /// PATCH size of the chunked upload (`blob`).
    #[arg(long, default_value_t = 8 << 20)]
    chunk_bytes: u64,
    /// Number of blobs (`many-blobs`).
    #[arg(long, default_value_t = 200)]
    blobs: usize,
    /// Size of each blob (`many-blobs`).
    #[arg(long, default_value_t = 4 << 20)]
    blob_size: u64,
    /// Requests in flight (`many-blobs`).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Number of manifests pushed (`manifests`).
    #[arg(long, default_value_t = 1000)]
    manifests: usize,
    /// GETs in flight (`manifests`).
    #[arg(long, default_value_t = 32)]
    get_concurrency: usize,
    /// Seconds of GET by tag (`manifests`).
    #[arg(long, default_value_t = 10)]
    get_secs: u64,
    /// Concurrent pushes (`memory`).
    #[arg(long, default_value_t = 64)]
    memory_pushes: usize,
    /// Size of each push (`memory`; all send the same content).
    #[arg(long, default_value_t = 1 << 30)]
    memory_bytes: u64,
    /// Seed of the generated content (default: from the clock, so content
    /// is new on every run and no registry can deduplicate it away).
    #[arg(long)]
    seed: Option<u64>,
    /// The server's process id: report its CPU seconds and peak RSS.
    #[arg(long)]
    server_pid: Option<u32>,
    /// The server's data directory: report its bytes on disk.
    #[arg(long)]
    server_data: Option<PathBuf>,
    /// Directory of OCI image layouts (`images`; made by
    /// benches/corpus.py). Without it, `all` skips `images`.
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// After the large blob's pull, drop this machine's page cache (sync,
    /// then 3 to /proc/sys/vm/drop_caches; needs root) and pull it again
    /// as `blob-pull-cold`: the blob read from disk, as a registry whose
    /// content outgrows its memory serves most pulls.
    #[arg(long)]
    drop_caches: bool,
    /// Push only (`blob`, `many-blobs`): no pulls, for an endpoint that
    /// keeps nothing, such as the push floor (benches/examples/push_floor/).
    #[arg(long)]
    push_only: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// The host:port of an http:// URL.
fn host_of(url: &str) -> Result<String> {
    let rest = url
        .strip_prefix("http://")
        .context("only http:// registries are supported")?;
    let host = rest.split('/').next().unwrap_or(rest);
    if host.is_empty() {
        bail!("no host in {url}");
    }
    Ok(host.to_string())
}

/// utime + stime of a process, seconds (/proc/<pid>/stat).
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces: ") state ...".
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

/// Peak resident set of a process, bytes (VmHWM).
fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

/// Resets a process's peak resident set (VmHWM) to its current size, so
/// that each scenario reports its own peak (`clear_refs`, Linux 4.0+).
fn reset_peak_rss(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// Bytes allocated on disk under a directory (sparse files count what they use).
fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

fn outcome_json(o: &Outcome) -> serde_json::Value {
    serde_json::json!({
        "scenario": o.name,
        "ops": o.ops,
        "bytes": o.bytes,
        "seconds": o.secs,
        "mb_per_s": o.mb_per_s(),
        "ops_per_s": o.ops_per_s(),
        "p50_ms": o.percentile_ms(50.0),
        "p99_ms": o.percentile_ms(99.0),
        "errors": o.errors,
        "first_error": o.first_error,
        "server_cpu_secs": o.server_cpu_secs,
        "server_peak_rss_bytes": o.server_peak_rss_bytes,
        "server_disk_bytes_after": o.server_disk_bytes_after,
    })
}

pub fn run(a: BenchArgs) -> Result<i32> {
    let host = host_of(&a.url)?;
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let plan = Plan {
        host,
        repo: format!("{}-{:x}", a.repo, seed & 0xffff_ffff),
        seed,
        blob_bytes: a.blob_bytes,
        chunk_bytes: a.chunk_bytes.max(1),
        blobs: a.blobs,
        blob_size: a.blob_size,
        concurrency: a.concurrency.max(1),
        manifests: a.manifests,
        get_concurrency: a.get_concurrency.max(1),
        get_secs: a.get_secs,
        memory_pushes: a.memory_pushes.max(1),
        memory_bytes: a.memory_bytes,
        drop_caches: a.drop_caches,
        push_only: a.push_only,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let wants = |s: Scenario| {
        a.scenario == s
            || (a.scenario == Scenario::All && (s != Scenario::Images || a.corpus.is_some()))
    };
    if a.scenario == Scenario::Images && a.corpus.is_none() {
        bail!("--scenario images needs --corpus DIR (benches/corpus.py makes one)");
    }
    let mut results: Vec<Outcome> = Vec::new();
    let mut peak_rss: Option<u64> = None;
    // `images` first: the bytes on disk after it are the corpus's.
    for (s, name) in [
        (Scenario::Images, "images"),
        (Scenario::Blob, "blob"),
        (Scenario::ManyBlobs, "many-blobs"),
        (Scenario::Manifests, "manifests"),
        (Scenario::Memory, "memory"),
    ] {
        if !wants(s) {
            continue;
        }
        if !a.json {
            eprintln!("bench: {name} ...");
        }
        let cpu_before = a.server_pid.and_then(cpu_secs);
        if let Some(pid) = a.server_pid {
            reset_peak_rss(pid);
        }
        let mut outs = rt.block_on(async {
            match s {
                Scenario::Blob => scenarios::large_blob(&plan).await,
                Scenario::ManyBlobs => scenarios::many_blobs(&plan).await,
                Scenario::Images => match a.corpus.as_deref() {
                    Some(dir) => images::images(&plan, dir).await,
                    None => Ok(Vec::new()),
                },
                Scenario::Memory => scenarios::memory(&plan).await,
                _ => scenarios::manifests(&plan).await,
            }
        })?;
        let cpu = match (cpu_before, a.server_pid.and_then(cpu_secs)) {
            (Some(b), Some(e)) => Some(e - b),
            _ => None,
        };
        // The scenario's server CPU and peak RSS go on its first line, the
        // disk use after it on every line.
        let rss = a.server_pid.and_then(peak_rss_bytes);
        peak_rss = peak_rss.max(rss);
        if let Some(first) = outs.first_mut() {
            first.server_cpu_secs = cpu;
            first.server_peak_rss_bytes = rss;
        }
        let disk = a.server_data.as_deref().map(disk_bytes);
        for o in &mut outs {
            o.server_disk_bytes_after = disk;
        }
        if !a.json {
            for o in &outs {
                eprintln!(
                    "bench: {} done: {:.1} MB/s, {:.0} ops/s, {} errors",
                    o.name,
                    o.mb_per_s(),
                    o.ops_per_s(),
                    o.errors
                );
            }
        }
        results.extend(outs);
    }
    let rss = peak_rss;
    let disk = a.server_data.as_deref().map(disk_bytes);
    let errors: u64 = results.iter().map(|o| o.errors).sum();
    if a.json {
        let v = serde_json::json!({
            "url": a.url,
            "seed": seed,
            "scenarios": results.iter().map(outcome_json).collect::<Vec<_>>(),
            "server_peak_rss_bytes": rss,
            "server_disk_bytes": disk,
            "errors": errors,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("| scenario | ops | MB/s | ops/s | p50 ms | p99 ms | errors | server CPU s | server peak RSS MiB |");
        println!("|---|---|---|---|---|---|---|---|---|");
        for o in &results {
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.2} | {:.2} | {} | {} | {} |",
                o.name,
                o.ops,
                o.mb_per_s(),
                o.ops_per_s(),
                o.percentile_ms(50.0),
                o.percentile_ms(99.0),
                o.errors,
                o.server_cpu_secs
                    .map(|c| format!("{c:.2}"))
                    .unwrap_or_else(|| "-".into()),
                o.server_peak_rss_bytes
                    .map(|r| format!("{:.1}", r as f64 / (1 << 20) as f64))
                    .unwrap_or_else(|| "-".into())
            );
        }
        if let Some(r) = rss {
            println!("server peak RSS: {:.1} MiB", r as f64 / (1 << 20) as f64);
        }
        if let Some(d) = disk {
            println!(
                "server bytes on disk: {:.1} MiB",
                d as f64 / (1 << 20) as f64
            );
        }
        for o in results.iter().filter(|o| o.errors > 0) {
            println!(
                "ERRORS in {}: {} (first: {})",
                o.name,
                o.errors,
                o.first_error.as_deref().unwrap_or("?")
            );
        }
    }
    Ok(if errors == 0 { 0 } else { 1 })
}
