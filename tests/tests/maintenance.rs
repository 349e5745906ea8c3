//! Maintenance inside a running `orlop serve`: a garbage collection asked
//! for with SIGUSR1 (periodic runs off), and the scrub finding a flipped bit
//! in a sealed segment while the registry serves.

use orlop_tests::oci::*;
use orlop_tests::registry::Registry;
use orlop_tests::{first_segment, flip_byte};
use std::time::{Duration, Instant};

fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A signal sent the moment the address is announced finds the server's
/// handlers in place: SIGUSR1 asks for a collection (the process lives on)
/// and SIGTERM stops it cleanly. Both used to be taken over only when tasks
/// started after the announcement were first polled, and a signal in
/// between killed the process (seen once in CI: "orlop serve exited with
/// signal: 15" from the registry model's restart). The window was narrow;
/// this asserts the property a few times over.
#[test]
fn signals_right_after_the_address_are_handled() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let data = dir.path().join("data");
    for _ in 0..5 {
        let mut reg = Registry::start(&data, &[("ORLOP_GC_INTERVAL_SECS", "0")]);
        unsafe { libc::kill(reg.child.id() as i32, libc::SIGUSR1) };
        std::thread::sleep(Duration::from_millis(200));
        let status = reg.child.try_wait().unwrap_or_else(|e| panic!("{e}"));
        assert!(status.is_none(), "SIGUSR1 ended the server: {status:?}");
        reg.stop();
        // `stop` asserts a clean exit.
        Registry::start(&data, &[]).stop();
    }
}

#[test]
fn sigusr1_runs_a_collection_on_demand() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let reg = Registry::start(
        &dir.path().join("data"),
        &[
            ("ORLOP_GC_INTERVAL_SECS", "0"),
            ("ORLOP_GC_GRACE_SECS", "1"),
        ],
    );
    let c = reg.client();
    let img = Image::with_layers("on-demand", vec![noise(60, 200_000)]);
    push_image(&c, "ops/app", "v1", &img);
    let r = c.req(
        "DELETE",
        &format!("/v2/ops/app/manifests/{}", img.digest()),
        &[],
        b"",
    );
    assert_eq!(r.status, 202);
    // Periodic collection is off: nothing runs on its own.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c.metric("orlop_gc_runs_total"), 0.0);
    let pid = reg.child.id() as i32;
    // Each signal asks for one run; the layer goes once its link is swept
    // and its grace is over.
    wait_for("the on-demand collection", 30, || {
        unsafe { libc::kill(pid, libc::SIGUSR1) };
        std::thread::sleep(Duration::from_millis(500));
        c.metric("orlop_gc_blobs_freed_total") >= 3.0
    });
    assert!(c.metric("orlop_gc_runs_total") >= 1.0);
    let layer = digest(&img.layers[0]);
    let head = c.req("HEAD", &format!("/v2/ops/app/blobs/{layer}"), &[], b"");
    assert_eq!(head.status, 404);
    reg.stop_and_fsck();
}

#[test]
fn the_scrub_reports_damage_in_a_sealed_segment() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let data = dir.path().join("data");
    let reg = Registry::start(
        &data,
        &[
            ("ORLOP_SEGMENT_BYTES", "1052672"),
            ("ORLOP_SCRUB_INTERVAL_SECS", "1"),
        ],
    );
    let c = reg.client();
    // Enough to seal a few segments.
    let img = Image::with_layers("scrubbed", vec![noise(61, 1_500_000), noise(62, 1_500_000)]);
    push_image(&c, "ops/scrub", "v1", &img);
    wait_for("a clean scrub pass", 30, || {
        c.metric("orlop_scrub_passes_total") >= 1.0
            && c.metric("orlop_scrub_last_pass_unix_seconds") > 0.0
    });
    assert_eq!(c.metric("orlop_scrub_damaged_total"), 0.0);
    assert!(c.metric("orlop_scrub_read_bytes_total") > 1_000_000.0);
    // Flip a payload byte of the first sealed segment's first record: the
    // config, pushed first.
    flip_byte(&first_segment(&data), 64 + 64 + 10, 0x08);
    wait_for("the scrub to find the damage", 30, || {
        c.metric("orlop_scrub_damaged_total") >= 1.0
            && c.metric("orlop_scrub_last_pass_damaged") >= 1.0
    });
    // The damaged config is refused, never served wrong; the layers serve.
    let r = c.get(&format!("/v2/ops/scrub/blobs/{}", digest(&img.config)));
    assert_ne!(r.status, 200, "a damaged blob must not be served");
    let r = c.get(&format!("/v2/ops/scrub/blobs/{}", digest(&img.layers[1])));
    assert_eq!(r.status, 200);
    assert!(r.body == img.layers[1]);
    reg.stop();
}

/// `orlop keygen` writes a private key file, by a bare name in the working
/// directory too, and never overwrites one.
#[test]
fn keygen_writes_a_key_once() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let keygen = |name: &str| {
        std::process::Command::new(orlop_tests::orlop_bin())
            .args(["keygen", name])
            .current_dir(dir.path())
            .output()
            .unwrap_or_else(|e| panic!("orlop keygen: {e}"))
    };
    let out = keygen("k1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.path().join("k1");
    let first = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(first.starts_with("orlop-store-key-v1:"), "{first}");
    let mode = std::fs::metadata(&path).map_or(0, |m| m.permissions().mode());
    assert_eq!(mode & 0o777, 0o600);
    let again = keygen("k1");
    assert!(!again.status.success(), "a second keygen overwrote the key");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}")),
        first
    );
    assert!(!dir.path().join("k1.new").exists());
}
