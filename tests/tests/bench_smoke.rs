//! A quick run of every `orlop bench` scenario at tiny sizes against a real
//! `orlop serve` (the `images` one over a corpus of two small OCI layouts),
//! so that the load tool itself cannot rot: every scenario reports
//! operations, no errors, and the server's CPU, RSS and disk.

use orlop_tests::oci::{noise, tar_gz, write_layout, Image};
use orlop_tests::orlop_bin;
use orlop_tests::registry::Registry;
use serde_json::Value;
use std::process::Command;

/// The blob and many-blobs scenarios at tiny sizes: a 3 MB blob (PATCHes
/// of 1 MB), 8 blobs of 300 kB, 4 at a time.
const TINY_PUSHES: [&str; 10] = [
    "--blob-bytes",
    "3000000",
    "--chunk-bytes",
    "1000000",
    "--blobs",
    "8",
    "--blob-size",
    "300000",
    "--concurrency",
    "4",
];

#[test]
fn every_bench_scenario_runs_against_orlop() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let data = dir.path().join("data");
    let reg = Registry::start(&data, &[]);
    // A tiny corpus: two images sharing a gzip base layer.
    let corpus = dir.path().join("corpus");
    let base = tar_gz(&[
        ("etc/os-release", b"NAME=bench\n"),
        ("usr/lib/big", &noise(1, 200_000)),
    ]);
    for (name, extra) in [("app-v1", 2u64), ("app-v2", 3)] {
        let top = tar_gz(&[("app/data", &noise(extra, 50_000))]);
        let img = Image::with_layers(name, vec![base.clone(), top]);
        write_layout(&corpus.join(name), &img, name);
    }
    // As root, the large blob is pulled again from disk (blob-pull-cold).
    let cold = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/sys/vm/drop_caches")
        .is_ok();
    let pid = reg.child.id().to_string();
    let (data_arg, corpus_arg) = (data.to_string_lossy(), corpus.to_string_lossy());
    let mut args = TINY_PUSHES.to_vec();
    args.extend([
        "--manifests",
        "20",
        "--get-concurrency",
        "4",
        "--get-secs",
        "1",
        "--memory-pushes",
        "6",
        "--memory-bytes",
        "2000000",
        "--server-pid",
        &pid,
        "--server-data",
        &data_arg,
        "--corpus",
        &corpus_arg,
    ]);
    args.extend(cold.then_some("--drop-caches"));
    let v = bench_run(&reg.host(), "all", &args);
    assert_eq!(v["errors"], 0, "{v:#}");
    let mut scenarios = v["scenarios"].as_array().cloned().unwrap_or_default();
    let mut want = vec![
        "images-push",
        "images-pull",
        "blob-push",
        "blob-push-chunked",
        "blob-pull",
    ];
    if cold {
        want.push("blob-pull-cold");
    }
    want.extend([
        "blob-pull-hot",
        "many-blobs-push",
        "many-blobs-pull",
        "manifests-push",
        "manifests-get",
        "memory-push",
    ]);
    assert_eq!(names(&v), want);
    for s in &scenarios {
        assert!(s["ops"].as_u64().unwrap_or(0) > 0, "{s:#}");
        assert!(s["mb_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{s:#}");
    }
    // Two images pushed and pulled; the second reuses the base layer.
    assert_eq!(scenarios[0]["ops"], 2);
    assert_eq!(scenarios[1]["ops"], 2);
    assert!(
        scenarios[1]["bytes"].as_u64().unwrap_or(0) > scenarios[0]["bytes"].as_u64().unwrap_or(0)
    );
    assert!(
        scenarios[0]["server_disk_bytes_after"]
            .as_u64()
            .unwrap_or(0)
            > 0
    );
    if cold {
        let c = scenarios.remove(5);
        assert_eq!(c["scenario"], "blob-pull-cold");
        assert_eq!(c["bytes"], 3_000_000);
    }
    // Byte counts are what was pushed and read back.
    assert_eq!(scenarios[2]["bytes"], 3_000_000);
    assert_eq!(scenarios[4]["bytes"], 3_000_000);
    assert_eq!(scenarios[5]["bytes"], 3_000_000);
    assert_eq!(scenarios[6]["bytes"], 8 * 300_000);
    assert_eq!(scenarios[7]["bytes"], 8 * 300_000);
    assert_eq!(scenarios[8]["ops"], 20);
    assert_eq!(scenarios[10]["ops"], 6);
    assert_eq!(scenarios[10]["bytes"], 6 * 2_000_000);
    // Each scenario reports the server's own peak (VmHWM reset before it).
    for i in [0, 2, 6, 8, 10] {
        assert!(
            scenarios[i]["server_peak_rss_bytes"].as_u64().unwrap_or(0) > 1 << 20,
            "{:#}",
            scenarios[i]
        );
    }
    assert!(
        v["server_peak_rss_bytes"].as_u64().unwrap_or(0) > 1 << 20,
        "{v:#}"
    );
    assert!(
        v["server_disk_bytes"].as_u64().unwrap_or(0) > 6_000_000,
        "{v:#}"
    );
    assert!(scenarios[2]["server_cpu_secs"].as_f64().is_some(), "{v:#}");
    reg.stop_and_fsck();
}

/// A floor example's process, killed when dropped (also when a test
/// panics: it would otherwise outlive the test, holding its output open).
struct Floor(std::process::Child);

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a floor example (built by `cargo test` beside the tests) on a
/// free port; its process and the address its first line names.
fn start_floor(name: &str, args: &[&str]) -> (Floor, String) {
    use std::io::BufRead;
    let floor = orlop_bin()
        .parent()
        .unwrap_or_else(|| panic!("no target dir"))
        .join("examples")
        .join(name);
    let mut child = Command::new(&floor)
        .args(["--port", "0"])
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", floor.display()));
    let mut line = String::new();
    let stderr = child.stderr.take().unwrap_or_else(|| panic!("no stderr"));
    std::io::BufReader::new(stderr)
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("{e}"));
    let host = line
        .split_whitespace()
        .nth(3)
        .map(|a| a.trim_end_matches(','))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    (Floor(child), host)
}

/// `orlop bench --json` of one scenario against `host` with `args` (sizes
/// and flags); its report, once it exited 0.
fn bench_run(host: &str, scenario: &str, args: &[&str]) -> Value {
    let out = Command::new(orlop_bin())
        .args(["bench", "--json", "--url"])
        .arg(format!("http://{host}"))
        .args(["--scenario", scenario])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("orlop bench: {e}"));
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{v:#}");
    v
}

/// The scenario names of a report, in order.
fn names(v: &Value) -> Vec<String> {
    v["scenarios"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["scenario"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// `orlop bench --push-only` of both push scenarios at tiny sizes against
/// the push floor started with `floor_args`; their reports.
fn push_floor_runs(floor_args: &[&str]) -> (Value, Value) {
    let (floor, host) = start_floor("push_floor", floor_args);
    let args = [&TINY_PUSHES[..], &["--push-only"]].concat();
    let blob = bench_run(&host, "blob", &args);
    let many = bench_run(&host, "many-blobs", &args);
    drop(floor);
    assert_eq!(names(&blob), ["blob-push", "blob-push-chunked"], "{blob:#}");
    assert_eq!(names(&many), ["many-blobs-push"], "{many:#}");
    (blob, many)
}

/// The push floor (benches/examples/push_floor/) takes `orlop bench
/// --push-only` of both push scenarios, checking every digest, as
/// `benches/compare` runs it.
#[test]
fn push_floor_takes_the_bench_pushes() {
    let (blob, many) = push_floor_runs(&[]);
    assert_eq!(blob["scenarios"][0]["bytes"], 3_000_000);
    assert_eq!(blob["scenarios"][1]["bytes"], 3_000_000);
    assert_eq!(many["scenarios"][0]["bytes"], 8 * 300_000);
    assert_eq!(many["scenarios"][0]["ops"], 8);
}

/// The plaintext bytes of the records in a push floor upload file (walked
/// record by record from the start until the zero padding after the last),
/// each record's CRC32C checked.
fn kept_plain_bytes(path: &std::path::Path) -> u64 {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let le = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize;
    let (mut at, mut plain) = (0, 0u64);
    while at + 64 <= b.len() && &b[at..at + 4] == b"CHNK" {
        let (payload, raw) = (le(at + 8), le(at + 12));
        assert_eq!(payload, raw + 16, "record at {at} of {}", path.display());
        assert!(at + 64 + payload <= b.len(), "record at {at} cut short");
        let crc = crc32c::crc32c(&b[at + 64..at + 64 + payload]);
        assert_eq!(
            crc as usize,
            le(at + 60),
            "record at {at} of {}",
            path.display()
        );
        plain += raw as u64;
        at += 64 + payload;
    }
    assert!(
        b[at..].iter().all(|&x| x == 0),
        "bytes after the last record"
    );
    plain
}

/// With `--keep`, the push floor writes every upload's sealed records to
/// a file of its own before it answers: the records of each file add up
/// to exactly the bytes of its blob (the chunked upload's file was synced
/// at every PATCH and written on after it).
#[test]
fn push_floor_keeps_the_records_with_keep() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let kept = dir.path().join("kept");
    let kept_arg = kept.to_string_lossy().to_string();
    push_floor_runs(&["--keep", &kept_arg]);
    let mut sizes: Vec<u64> = std::fs::read_dir(&kept)
        .unwrap_or_else(|e| panic!("{e}"))
        .filter_map(|e| e.ok())
        .map(|e| kept_plain_bytes(&e.path()))
        .collect();
    sizes.sort_unstable();
    let mut want = vec![300_000u64; 8];
    want.extend([3_000_000, 3_000_000]);
    assert_eq!(sizes, want);
}

/// The pull floor (benches/examples/pull_floor/) keeps what the bench
/// pushes and serves every pull back byte for byte (the bench compares
/// each with what it pushed): the first pulls of the large blob read its
/// records with O_DIRECT, the last two through the page cache. The large
/// blob is 9 MB: three spans of reads, the last one short.
#[test]
fn pull_floor_serves_the_bench_pulls() {
    let mut args = TINY_PUSHES;
    args[1] = "9000000";
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let files = dir.path().join("pull-floor");
    let files_arg = files.to_string_lossy().to_string();
    let (floor, host) = start_floor("pull_floor", &["--dir", &files_arg]);
    let blob = bench_run(&host, "blob", &args);
    let many = bench_run(&host, "many-blobs", &args);
    drop(floor);
    assert_eq!(
        names(&blob),
        [
            "blob-push",
            "blob-push-chunked",
            "blob-pull",
            "blob-pull-hot"
        ],
        "{blob:#}"
    );
    assert_eq!(
        names(&many),
        ["many-blobs-push", "many-blobs-pull"],
        "{many:#}"
    );
    for (v, i, bytes) in [
        (&blob, 2, 9_000_000),
        (&blob, 3, 9_000_000),
        (&many, 1, 8 * 300_000),
    ] {
        assert_eq!(v["scenarios"][i]["bytes"], bytes, "{v:#}");
        assert_eq!(v["scenarios"][i]["errors"], 0, "{v:#}");
    }
    // Two large blobs and eight small ones, each in a file of its own.
    let stored = std::fs::read_dir(&files)
        .unwrap_or_else(|e| panic!("{e}"))
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("sha256-"))
        .count();
    assert_eq!(stored, 10);
}
