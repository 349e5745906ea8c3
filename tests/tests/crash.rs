//! Crash test: a child process writes blobs and reports each acknowledged
//! digest; the parent kills it with SIGKILL at random moments, reopens the
//! store, runs verify(), and checks every acknowledged blob byte for byte.
//! The child also collects garbage and compacts as it goes: a blob without
//! an acknowledged reference may be collected, every other one must stay.
//! At the end `orlop fsck` must call the store clean.

use orlop_engine::{Digest, Store};
use orlop_tests::{blob_content, crash_store_config, orlop_bin};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn acknowledged_writes_survive_sigkill() {
    let cycles: u32 = std::env::var("ORLOP_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let seed: u64 = std::env::var("ORLOP_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash test: seed {seed}, {cycles} cycles (ORLOP_CRASH_SEED replays)");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut acked: HashMap<Digest, u64> = HashMap::new(); // digest -> blob index
    let mut refs: HashMap<Digest, u64> = HashMap::new(); // digest -> last acknowledged count
    let mut next = 0u64;
    let mut killed_mid_run = 0;
    let mut gone = 0u64;
    for cycle in 0..cycles {
        let mut child = Command::new(env!("CARGO_BIN_EXE_crash_writer"))
            .arg(dir.path())
            .arg(seed.to_string())
            .arg(next.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn: {e}"));
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("stdout"));
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>()
        });
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..250)));
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap_or_else(|e| panic!("{e}"));
        killed_mid_run += (status.code().is_none()) as u32;
        for line in reader.join().unwrap_or_else(|_| panic!("reader")) {
            let f: Vec<&str> = line.split(' ').collect();
            match f.as_slice() {
                ["PUT", i, d] => {
                    let i: u64 = i.parse().unwrap_or_else(|e| panic!("{e}"));
                    acked.insert(d.parse().unwrap_or_else(|e| panic!("{e}")), i);
                    next = next.max(i + 1);
                }
                ["REF", d, n] => {
                    refs.insert(
                        d.parse().unwrap_or_else(|e| panic!("{e}")),
                        n.parse().unwrap_or_else(|e| panic!("{e}")),
                    );
                }
                _ => panic!("bad line from child: {line:?}"),
            }
        }
        // The child may have written blob `next` without acknowledging it; skip past it.
        next += 1;
        let store = Store::open(crash_store_config(dir.path()))
            .unwrap_or_else(|e| panic!("cycle {cycle}: reopen: {e}"));
        let rep = store.verify().unwrap_or_else(|e| panic!("{e}"));
        assert!(
            rep.is_clean(),
            "cycle {cycle} (seed {seed}): {:#?}",
            rep.problems
        );
        let mut collected = Vec::new();
        for (d, i) in &acked {
            let want = refs.get(d).copied().unwrap_or(0);
            if want == 0 && store.stat(d).unwrap_or_else(|e| panic!("{e}")).is_none() {
                collected.push(d.clone());
                continue;
            }
            let got = store
                .get(d)
                .unwrap_or_else(|e| panic!("cycle {cycle}: acknowledged blob {d} lost: {e}"));
            assert!(
                got == blob_content(seed, *i),
                "cycle {cycle}: blob {d} differs"
            );
            let have = store
                .stat(d)
                .unwrap_or_else(|e| panic!("{e}"))
                .map(|s| s.refs)
                .unwrap_or(0);
            // At most one unacknowledged add_ref may have landed.
            assert!(
                have == want || have == want + 1,
                "cycle {cycle}: {d} refs {have}, acknowledged {want}"
            );
            refs.insert(d.clone(), have);
        }
        for d in collected {
            acked.remove(&d);
            refs.remove(&d);
            gone += 1;
        }
        store.close().unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(
        acked.len() + gone as usize > cycles as usize,
        "the child must make progress: {} blobs",
        acked.len()
    );
    assert!(
        killed_mid_run > cycles / 2,
        "most cycles must end in SIGKILL"
    );
    let out = Command::new(orlop_bin())
        .args(["fsck", "--data"])
        .arg(dir.path())
        .arg("--key-file")
        .arg(dir.path().join("test.key"))
        .output()
        .unwrap_or_else(|e| panic!("run orlop fsck: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "orlop fsck: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("store is clean"), "{stdout}");
    eprintln!(
        "crash test: {} blobs kept and {gone} collected over {cycles} kills",
        acked.len()
    );
}
