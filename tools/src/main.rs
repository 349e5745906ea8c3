//! `orlop`: the operator's command.

mod bench;
mod compact;
mod fsck;
mod gc;
mod rebuild;
mod repair;
mod serve;
mod stats;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use orlop_engine::{Digest, KeySource, MasterKey, Store, StoreConfig};
use std::io::{Read, Write};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "orlop",
    version,
    about = "Orlop: an on-prem container registry on its own storage engine"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
pub struct StoreArgs {
    /// Data directory of the store.
    #[arg(long, default_value = "./data", env = "ORLOP_DATA")]
    pub data: PathBuf,
    /// Key file (default: <data>/store.key, created with mode 0600 on first use).
    #[arg(long, env = "ORLOP_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Take the key (hex) from this environment variable instead of a file.
    #[arg(long, conflicts_with = "key_file")]
    pub key_env: Option<String>,
}

impl StoreArgs {
    pub fn config(&self) -> StoreConfig {
        let mut cfg = StoreConfig::new(&self.data);
        // A registry's column families, so that fsck can audit its rows.
        cfg.extra_column_families = orlop_server::meta::REGISTRY_CFS
            .iter()
            .map(|c| c.to_string())
            .collect();
        cfg.key = match (&self.key_file, &self.key_env) {
            (Some(f), _) => KeySource::File(f.clone()),
            (None, Some(var)) => KeySource::Env(var.clone()),
            (None, None) => KeySource::Default,
        };
        cfg
    }
}

/// A progress bar on stderr when it is a terminal (and `show`), else a
/// hidden one; `unit` follows the counts ("blobs").
/// Moves a bar made by [`progress_bar`] to an engine job's progress.
pub fn show_progress(bar: &indicatif::ProgressBar, p: orlop_engine::Progress) {
    bar.set_prefix(p.phase);
    bar.set_length(p.total);
    bar.set_position(p.done);
}

pub fn progress_bar(show: bool, unit: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !(show && std::io::stderr().is_terminal()) {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(0);
    let template = format!("{{prefix:>8}} [{{bar:40}}] {{pos}}/{{len}} {unit} {{elapsed}}");
    b.set_style(
        indicatif::ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the registry (OCI Distribution / Docker Registry V2 API).
    Serve(serve::ServeArgs),
    /// Create a store (and its key) under --data.
    Init {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Store a file (or stdin with "-") as a blob and print its digest.
    Put {
        #[command(flatten)]
        store: StoreArgs,
        file: PathBuf,
        /// Refuse to commit unless the content has this digest.
        #[arg(long)]
        digest: Option<String>,
    },
    /// Write a blob to stdout (or --out).
    Get {
        #[command(flatten)]
        store: StoreArgs,
        digest: String,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check every chunk, blob, reference count and segment. Exit 0 only when clean.
    Fsck(fsck::FsckArgs),
    /// Collect blobs without references (a stopped store; `serve` collects online).
    Gc(gc::GcArgs),
    /// Empty segments whose live fraction is low (a stopped store; run gc first).
    Compact(compact::CompactArgs),
    /// Blobs, chunks, bytes, dedupe and compression ratios, segment live ratios.
    Stats(stats::StatsArgs),
    /// Recreate a lost or corrupt index from the segments (a stopped store).
    RebuildIndex(rebuild::RebuildArgs),
    /// Load a registry (any, by URL) through the Registry V2 API and report
    /// throughput, latency and (given its PID and data) its CPU, RSS and disk.
    Bench(bench::BenchArgs),
    /// Generate a new random store key file (mode 0600).
    Keygen { path: PathBuf },
}

/// jemalloc: under many concurrent uploads and downloads (threads that
/// allocate and free MiB-sized buffers), glibc's per-thread arenas kept
/// 300-470 MiB resident after a 16-way many-blobs run whose live data is
/// well under 200 MiB; jemalloc returns freed pages as it goes.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    let cli = Cli::parse();
    // The server logs one line per request by default; the tools only warnings.
    let default_level = if matches!(cli.cmd, Cmd::Serve(_)) {
        "info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("ORLOP_LOG")
        .unwrap_or_else(|_| default_level.into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // ORLOP_LOG_FORMAT=json: one JSON object per line, for log pipelines.
    if std::env::var("ORLOP_LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.json().flatten_event(true).init();
    } else {
        logs.init();
    }
    raise_descriptor_limit();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

/// Raises the soft limit on open files to the hard one, as Go programs
/// (Distribution among them) do at start: a store keeps every segment open,
/// with a second (O_DIRECT) descriptor for each one read or written directly,
/// and the server a socket per connection; the usual soft limit of 1024 runs
/// out at a few hundred segments.
fn raise_descriptor_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or write only the struct given.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0;
    if !ok || r.rlim_cur >= r.rlim_max {
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: r.rlim_max,
        rlim_max: r.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        tracing::warn!(
            soft = r.rlim_cur,
            hard = r.rlim_max,
            error = %std::io::Error::last_os_error(),
            "could not raise the open-file limit"
        );
    }
}

fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Init { store } => {
            let s = Store::open(store.config()).context("opening store")?;
            println!(
                "store ready at {} (segment I/O: {})",
                store.data.display(),
                s.io_backend()
            );
            s.close()?;
            Ok(0)
        }
        Cmd::Put {
            store,
            file,
            digest,
        } => {
            let expected = digest.map(|d| d.parse::<Digest>()).transpose()?;
            let s = Store::open(store.config())?;
            let mut input: Box<dyn Read> = if file.as_os_str() == "-" {
                Box::new(std::io::stdin())
            } else {
                Box::new(
                    std::fs::File::open(&file)
                        .with_context(|| format!("opening {}", file.display()))?,
                )
            };
            let mut w = s.writer(expected)?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = input.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                w.write(bytes::Bytes::copy_from_slice(&buf[..n]))?;
            }
            let info = w.commit()?;
            println!("{} {}", info.digest, info.size);
            s.close()?;
            Ok(0)
        }
        Cmd::Get { store, digest, out } => {
            let d: Digest = digest.parse()?;
            let mut cfg = store.config();
            cfg.read_only = true;
            let s = Store::open(cfg)?;
            let mut r = s.reader(&d)?;
            let mut sink: Box<dyn Write> = match out {
                Some(p) => Box::new(std::fs::File::create(&p)?),
                None => Box::new(std::io::stdout().lock()),
            };
            while let Some(piece) = r.next_piece()? {
                sink.write_all(&piece)?;
            }
            sink.flush()?;
            Ok(0)
        }
        Cmd::Serve(a) => serve::run(a),
        Cmd::Fsck(a) => fsck::run(a),
        Cmd::Gc(a) => gc::run(a),
        Cmd::Compact(a) => compact::run(a),
        Cmd::Stats(a) => stats::run(a),
        Cmd::RebuildIndex(a) => rebuild::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Keygen { path } => {
            MasterKey::generate()?.write_file(&path)?;
            println!("wrote a new key to {} (mode 0600)", path.display());
            Ok(0)
        }
    }
}
