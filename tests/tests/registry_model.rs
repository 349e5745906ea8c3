//! A model-based test of the registry as a whole: random pushes of images
//! that share layers, tag moves, tag and manifest deletes, on-demand
//! garbage collections (each followed by compaction, in 1 MiB segments),
//! graceful restarts and kill -9, against a model of which image each tag
//! names. After every step every tag pulls byte for byte and every deleted
//! tag is gone; at the end fsck (the engine's verify and the registry's
//! reference audit) is clean. The seed is printed, and ORLOP_MODEL_SEED
//! replays a failure.

use orlop_tests::oci::*;
use orlop_tests::registry::{Client, Registry};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

const REPOS: [&str; 2] = ["model/app", "model/base"];
const TAGS: [&str; 4] = ["v1", "v2", "latest", "prod"];
const STEPS: usize = 40;

fn env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("ORLOP_GC_INTERVAL_SECS", "0"),
        ("ORLOP_GC_GRACE_SECS", "1"),
        ("ORLOP_SEGMENT_BYTES", "1052672"),
        ("ORLOP_COMPACT_LIVE_FRACTION_MAX", "0.9"),
    ]
}

fn start(data: &Path) -> Registry {
    Registry::start(data, &env())
}

/// Asks for one collection (SIGUSR1) and waits until it has run.
fn collect(reg: &Registry, c: &Client) {
    let runs = c.metric("orlop_gc_runs_total");
    unsafe { libc::kill(reg.child.id() as i32, libc::SIGUSR1) };
    let deadline = Instant::now() + Duration::from_secs(30);
    // A run counts at its start; the compaction after it ends with its
    // log line, so wait for the run and then for the metric to settle.
    while c.metric("orlop_gc_runs_total") <= runs {
        assert!(
            Instant::now() < deadline,
            "the requested collection never ran"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
}

fn check(c: &Client, model: &BTreeMap<(String, String), Image>, gone: &[(String, String)]) {
    for ((repo, tag), img) in model {
        assert_pulls(c, repo, tag, img);
    }
    for (repo, tag) in gone {
        if !model.contains_key(&(repo.clone(), tag.clone())) {
            let r = c.req("HEAD", &format!("/v2/{repo}/manifests/{tag}"), &[], b"");
            assert_eq!(r.status, 404, "{repo}:{tag} was deleted");
        }
    }
}

#[test]
fn registry_matches_model() {
    let seed: u64 = std::env::var("ORLOP_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("registry model seed: {seed} (replay with ORLOP_MODEL_SEED={seed})");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let palette: Vec<Vec<u8>> = (0..6u64).map(|i| noise(300 + i, 120_000)).collect();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let data = dir.path().join("data");
    let mut reg = start(&data);
    let mut model: BTreeMap<(String, String), Image> = BTreeMap::new();
    let mut gone: Vec<(String, String)> = Vec::new();
    for step in 0..STEPS {
        let c = reg.client();
        let repo = REPOS[rng.gen_range(0..REPOS.len())].to_string();
        let tag = TAGS[rng.gen_range(0..TAGS.len())].to_string();
        let op = rng.gen_range(0..100);
        let tagged: Vec<(String, String)> =
            model.keys().filter(|(r, _)| *r == repo).cloned().collect();
        match op {
            // Push a new image (layers from the palette) under a tag.
            0..=34 => {
                let n = rng.gen_range(1..=3);
                let layers = (0..n)
                    .map(|_| palette[rng.gen_range(0..palette.len())].clone())
                    .collect();
                let img = Image::with_layers(&format!("step-{step}"), layers);
                push_image(&c, &repo, &tag, &img);
                model.insert((repo, tag), img);
            }
            // Move a tag onto another tagged image of the repository.
            35..=49 if !tagged.is_empty() => {
                let from = &tagged[rng.gen_range(0..tagged.len())];
                let img = model[from].clone();
                let r = put_manifest(&c, &repo, &tag, OCI_MANIFEST, &img.manifest);
                assert_eq!(r.status, 201, "step {step}: move {repo}:{tag}");
                model.insert((repo, tag), img);
            }
            // Delete a tag.
            50..=61 if !tagged.is_empty() => {
                let (r, t) = tagged[rng.gen_range(0..tagged.len())].clone();
                let resp = c.req("DELETE", &format!("/v2/{r}/manifests/{t}"), &[], b"");
                assert_eq!(resp.status, 202, "step {step}: delete {r}:{t}");
                model.remove(&(r.clone(), t.clone()));
                gone.push((r, t));
            }
            // Delete a manifest, and with it every tag on it.
            62..=71 if !tagged.is_empty() => {
                let key = &tagged[rng.gen_range(0..tagged.len())];
                let d = model[key].digest();
                let resp = c.req("DELETE", &format!("/v2/{repo}/manifests/{d}"), &[], b"");
                assert_eq!(resp.status, 202, "step {step}: delete {repo}@{d}");
                let dropped: Vec<_> = model
                    .iter()
                    .filter(|((r, _), img)| *r == repo && img.digest() == d)
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in dropped {
                    model.remove(&k);
                    gone.push(k);
                }
            }
            72..=85 => collect(&reg, &c),
            86..=92 => {
                reg.stop();
                reg = start(&data);
            }
            93..=99 => {
                reg.kill();
                reg = start(&data);
            }
            _ => {}
        }
        check(&reg.client(), &model, &gone);
    }
    // A last collection after the grace: what remains still pulls.
    std::thread::sleep(Duration::from_millis(1600));
    let c = reg.client();
    collect(&reg, &c);
    check(&c, &model, &gone);
    reg.stop_and_fsck();
}
