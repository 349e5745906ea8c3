//! Memory stays bounded under many concurrent pushes: 64 clients each
//! stream a blob in one PATCH (as docker does) and finish it, while the
//! server's peak resident memory is measured.
//!
//! CI pushes 64 × 32 MiB; `ORLOP_MEMTEST_MIB=1024` runs the 64 × 1 GiB case
//! (with `ORLOP_MEMTEST_SHARED=1` all clients send the same bytes, so the
//! store dedupes them and the disk holds one copy). docs/benchmarks.md keeps
//! the measured figures.

use orlop_tests::registry::{Client, Generated, Registry};

const CLIENTS: u64 = 64;
/// The bound the issue sets for 64 concurrent 1 GiB pushes.
const PEAK_RSS_BYTES_MAX: u64 = 256 << 20;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn sixty_four_concurrent_pushes_stay_bounded() {
    let mib = env_u64("ORLOP_MEMTEST_MIB", 32);
    let shared = env_u64("ORLOP_MEMTEST_SHARED", 0) == 1;
    let len = mib << 20;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let reg = Registry::start(&dir.path().join("data"), &[]);
    let addr = reg.addr;
    let seed_of = |i: u64| if shared { 7 } else { 1000 + i };
    let digests: Vec<String> = if shared {
        vec![Generated::digest(7, len); CLIENTS as usize]
    } else {
        (0..CLIENTS)
            .map(|i| Generated::digest(seed_of(i), len))
            .collect()
    };
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for (i, d) in digests.iter().enumerate() {
            s.spawn(move || {
                let c = Client::new(addr);
                let r = c.req("POST", "/v2/mem/blobs/uploads/", &[], b"");
                assert_eq!(
                    r.status,
                    202,
                    "client {i}: {}",
                    String::from_utf8_lossy(&r.body)
                );
                let loc = r.header("location").unwrap_or_default();
                let r = c.req_generated("PATCH", &loc, Generated::new(seed_of(i as u64), len));
                assert_eq!(
                    r.status,
                    202,
                    "client {i}: {}",
                    String::from_utf8_lossy(&r.body)
                );
                let r = c.req("PUT", &format!("{loc}?digest={d}"), &[], b"");
                assert_eq!(
                    r.status,
                    201,
                    "client {i}: {}",
                    String::from_utf8_lossy(&r.body)
                );
            });
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let peak = reg.peak_rss_bytes();
    println!(
        "memory: {CLIENTS} concurrent pushes of {mib} MiB in {secs:.1}s ({:.0} MB/s), server peak RSS {} MiB",
        (CLIENTS * len) as f64 / secs / 1e6,
        peak >> 20
    );
    assert!(peak > 0, "could not read the server's peak RSS");
    assert!(
        peak <= PEAK_RSS_BYTES_MAX,
        "peak RSS {} MiB exceeds {} MiB",
        peak >> 20,
        PEAK_RSS_BYTES_MAX >> 20
    );
    // Every blob reads back with its digest (HEAD: size and digest).
    let c = reg.client();
    for d in &digests {
        let r = c.req("HEAD", &format!("/v2/mem/blobs/{d}"), &[], b"");
        assert_eq!(r.header("content-length"), Some(len.to_string()));
    }
    reg.stop_and_fsck();
}
