//! The `orlop` command against real stores.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};

fn orlop(args: &[&str], data: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orlop"))
        .args(args)
        .arg("--data")
        .arg(data)
        .output()
        .unwrap_or_else(|e| panic!("run orlop: {e}"))
}

/// `orlop put FILE`; returns the digest it prints.
fn put(file: &Path, data: &Path) -> String {
    let o = orlop(&["put", file.to_str().unwrap_or_default()], data);
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .split(' ')
        .next()
        .unwrap_or_default()
        .to_string()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn put_get_stats_fsck_and_a_flipped_bit() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let data = dir.path().join("data");
    let input = dir.path().join("blob.bin");
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let content: Vec<u8> = (0..3_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&input, &content).unwrap_or_else(|e| panic!("{e}"));

    let o = orlop(&["init"], &data);
    assert!(o.status.success(), "{}", text(&o));
    let digest = put(&input, &data);
    assert!(digest.starts_with("sha256:"), "{digest}");

    let out = dir.path().join("out.bin");
    let o = orlop(
        &["get", &digest, "--out", out.to_str().unwrap_or_default()],
        &data,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::read(&out).unwrap_or_default() == content);

    let o = orlop(&["stats", "--json"], &data);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(v["blobs"], 1);
    assert_eq!(v["logical_bytes"], 3_000_000);

    let o = orlop(&["fsck"], &data);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("store is clean"));

    // Flip one bit in the middle of the first segment's data.
    let seg = std::fs::read_dir(data.join("segments"))
        .unwrap_or_else(|e| panic!("{e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .min()
        .unwrap_or_else(|| panic!("no segment"));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 1_000_000)
        .unwrap_or_else(|e| panic!("{e}"));
    f.write_all_at(&[b[0] ^ 4], 1_000_000)
        .unwrap_or_else(|e| panic!("{e}"));
    drop(f);

    let o = orlop(&["fsck"], &data);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains(&digest),
        "fsck must name the damaged blob: {}",
        text(&o)
    );
    let o = orlop(&["fsck", "--json"], &data);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(v["clean"], false);
    assert!(v["problems"]
        .as_array()
        .map(|a| a.iter().any(|p| p["digest"] == digest.as_str()))
        .unwrap_or(false));

    let o = orlop(&["get", &digest], &data);
    assert!(!o.status.success(), "a damaged blob must not be served");
}

#[test]
fn wrong_key_is_refused() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let data = dir.path().join("data");
    assert!(orlop(&["init"], &data).status.success());
    let other = dir.path().join("other.key");
    let o = Command::new(env!("CARGO_BIN_EXE_orlop"))
        .arg("keygen")
        .arg(&other)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(o.status.success());
    let o = Command::new(env!("CARGO_BIN_EXE_orlop"))
        .args(["fsck", "--data"])
        .arg(&data)
        .arg("--key-file")
        .arg(&other)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("wrong key"), "{}", text(&o));
}

#[test]
fn gc_dry_run_then_collect() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let data = dir.path().join("data");
    let input = dir.path().join("blob.bin");
    let content: Vec<u8> = (0..500_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&input, &content).unwrap_or_else(|e| panic!("{e}"));
    let digest = put(&input, &data);
    // `orlop put` takes no reference: the blob is garbage at once.
    let json = |o: &Output| -> serde_json::Value {
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
    };
    let o = orlop(&["gc", "--grace-secs", "3600", "--json"], &data);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(json(&o)["kept_young"], 1);
    let o = orlop(&["gc", "--dry-run", "--json", "--grace-secs", "0"], &data);
    assert!(o.status.success(), "{}", text(&o));
    let v = json(&o);
    assert_eq!(
        (v["blobs_freed"].clone(), v["bytes_freed"].clone()),
        (1.into(), 500_000.into())
    );
    let o = orlop(&["get", &digest], &data);
    assert!(
        o.status.success(),
        "a dry run changes nothing: {}",
        text(&o)
    );
    let o = orlop(&["gc", "--grace-secs", "0"], &data);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("freed 1 blobs (500000 bytes)"),
        "{}",
        text(&o)
    );
    let o = orlop(&["get", &digest], &data);
    assert!(!o.status.success(), "a collected blob is gone");
    let o = orlop(&["fsck", "--json"], &data);
    assert!(o.status.success(), "{}", text(&o));
    let v = json(&o);
    assert_eq!(v["blobs"], 0);
    assert!(v["unreferenced_chunks"].as_u64().unwrap_or(0) > 0, "{v}");
    // Compaction returns the space: a dry run first, then the run.
    let o = orlop(&["compact", "--dry-run", "--json"], &data);
    assert!(o.status.success(), "{}", text(&o));
    let v = json(&o);
    assert_eq!(v["segments_chosen"], 1, "{v}");
    assert_eq!(v["segments_removed"], 0, "{v}");
    let o = orlop(&["compact", "--json"], &data);
    assert!(o.status.success(), "{}", text(&o));
    let v = json(&o);
    assert_eq!(v["segments_removed"], 1, "{v}");
    assert!(v["chunks_dropped"].as_u64().unwrap_or(0) > 0, "{v}");
    let o = orlop(&["fsck", "--json"], &data);
    assert!(o.status.success(), "{}", text(&o));
    let v = json(&o);
    assert_eq!(v["unreferenced_chunks"], 0, "{v}");
    assert_eq!(v["segments"], 0, "{v}");
}
