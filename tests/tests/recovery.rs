//! Recovery of a registry's store with the `orlop` tools:
//! - `orlop fsck --repair`: a damaged layer shared by two images is
//!   quarantined and reported with every repository, manifest and tag that
//!   needs it; the server then answers BLOB_UNKNOWN for it (never wrong
//!   bytes), everything else still pulls, and pushing the layer again
//!   restores both images.
//! - `orlop rebuild-index`: the index directory deleted, the rebuild from
//!   the segments finds every image, tag and repository again.

use orlop_tests::oci::*;
use orlop_tests::registry::Registry;
use orlop_tests::{first_segment, flip_byte, orlop_bin};
use serde_json::Value;
use std::process::Command;

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn fsck_repair_reports_damage_and_a_push_restores_it() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let data = dir.path().join("data");
    let reg = Registry::start(&data, &[]);
    let c = reg.client();
    let shared = noise(80, 200_000);
    // Pushed first: its first chunk is the first record of the first segment.
    let shared_digest = push_blob(&c, "team/app", &shared);
    let a = Image::with_layers("repair-a", vec![shared.clone(), noise(81, 50_000)]);
    let b = Image::with_layers("repair-b", vec![shared.clone(), noise(82, 50_000)]);
    let other = Image::with_layers("repair-c", vec![noise(83, 50_000)]);
    push_image(&c, "team/app", "v1", &a);
    push_image(&c, "team/web", "latest", &b);
    push_image(&c, "team/other", "v1", &other);
    reg.stop();

    // Segment header (64), record header (64), then the payload.
    flip_byte(&first_segment(&data), 64 + 64 + 1_000, 0x10);

    let out = Command::new(orlop_bin())
        .args(["fsck", "--repair", "--json", "--data"])
        .arg(&data)
        .output()
        .unwrap_or_else(|e| panic!("orlop fsck --repair: {e}"));
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(1), "a broken blob remains: {v:#}");
    assert_eq!(v["quarantined"].as_array().map(Vec::len), Some(1), "{v:#}");
    let broken = v["broken"].as_array().cloned().unwrap_or_default();
    assert_eq!(broken.len(), 1, "{v:#}");
    let damage = &broken[0];
    assert_eq!(damage["digest"], shared_digest.as_str());
    assert_eq!(strings(&damage["repositories"]), ["team/app", "team/web"]);
    assert_eq!(strings(&damage["tags"]), ["team/app:v1", "team/web:latest"]);
    let manifests = strings(&damage["manifests"]);
    assert_eq!(manifests.len(), 2, "{manifests:?}");
    assert!(manifests.contains(&format!("team/app@{}", a.digest())));
    assert!(manifests.contains(&format!("team/web@{}", b.digest())));
    assert_eq!(v["after"]["clean"], true, "{v:#}");

    let reg = Registry::start(&data, &[]);
    let c = reg.client();
    let head = c.req(
        "HEAD",
        &format!("/v2/team/app/blobs/{shared_digest}"),
        &[],
        b"",
    );
    assert_eq!(head.status, 404, "a broken blob is reported absent");
    let get = c.get(&format!("/v2/team/web/blobs/{shared_digest}"));
    assert_eq!(get.status, 404);
    assert_eq!(get.error_code(), "BLOB_UNKNOWN");
    assert_pulls(&c, "team/other", "v1", &other);
    // The client pushes the layer again: both images are whole again.
    push_blob(&c, "team/app", &shared);
    assert_pulls(&c, "team/app", "v1", &a);
    assert_pulls(&c, "team/web", "latest", &b);
    reg.stop_and_fsck();
}

fn tags(c: &orlop_tests::registry::Client, repo: &str) -> Vec<String> {
    let r = c.get(&format!("/v2/{repo}/tags/list"));
    assert_eq!(r.status, 200);
    strings(&r.json()["tags"])
}

#[test]
fn rebuild_index_finds_every_image_and_tag_again() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let data = dir.path().join("data");
    // Small segments, so that the journal spans sealed segments too.
    let reg = Registry::start(&data, &[("ORLOP_SEGMENT_BYTES", "2097152")]);
    let c = reg.client();
    let base = noise(90, 400_000);
    let images: Vec<(&str, &str, Image)> = vec![
        (
            "shop/web",
            "v1",
            Image::with_layers("web-1", vec![base.clone(), noise(91, 300_000)]),
        ),
        (
            "shop/web",
            "v2",
            Image::with_layers("web-2", vec![base.clone(), noise(92, 300_000)]),
        ),
        (
            "shop/api",
            "latest",
            Image::with_layers("api", vec![base.clone(), noise(93, 200_000)]),
        ),
        (
            "tools/ci",
            "stable",
            Image::with_layers("ci", vec![noise(94, 500_000)]),
        ),
    ];
    for (repo, tag, img) in &images {
        push_image(&c, repo, tag, img);
    }
    // A second tag on one image, a deleted tag, a deleted manifest.
    put_manifest(&c, "shop/web", "prod", OCI_MANIFEST, &images[0].2.manifest);
    let gone = Image::with_layers("gone", vec![noise(95, 100_000)]);
    push_image(&c, "shop/web", "old", &gone);
    assert_eq!(
        c.req(
            "DELETE",
            &format!("/v2/shop/web/manifests/{}", gone.digest()),
            &[],
            b""
        )
        .status,
        202
    );
    push_image(&c, "shop/api", "tmp", &images[2].2);
    assert_eq!(
        c.req("DELETE", "/v2/shop/api/manifests/tmp", &[], b"")
            .status,
        202
    );
    let catalog = strings(&c.get("/v2/_catalog").json()["repositories"]);
    let web_tags = tags(&c, "shop/web");
    let api_tags = tags(&c, "shop/api");
    assert_eq!(web_tags, ["prod", "v1", "v2"]);
    reg.stop();

    std::fs::remove_dir_all(data.join("index")).unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(orlop_bin())
        .args(["rebuild-index", "--json", "--data"])
        .arg(&data)
        .output()
        .unwrap_or_else(|e| panic!("orlop rebuild-index: {e}"));
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{v:#}");
    assert_eq!(v["clean"], true, "{v:#}");
    assert_eq!(v["blobs_lost"].as_array().map(Vec::len), Some(0), "{v:#}");
    assert!(v["blob_counts_set"].as_u64().unwrap_or(0) > 0, "{v:#}");

    let reg = Registry::start(&data, &[("ORLOP_SEGMENT_BYTES", "2097152")]);
    let c = reg.client();
    assert_eq!(
        strings(&c.get("/v2/_catalog").json()["repositories"]),
        catalog
    );
    assert_eq!(tags(&c, "shop/web"), web_tags);
    assert_eq!(tags(&c, "shop/api"), api_tags);
    for (repo, tag, img) in &images {
        assert_pulls(&c, repo, tag, img);
    }
    assert_pulls(&c, "shop/web", "prod", &images[0].2);
    let r = c.get(&format!("/v2/shop/web/manifests/{}", gone.digest()));
    assert_eq!(r.status, 404, "a deleted manifest stays deleted");
    // The rebuilt registry takes pushes.
    let next = Image::with_layers("web-3", vec![base.clone(), noise(96, 100_000)]);
    push_image(&c, "shop/web", "v3", &next);
    assert_pulls(&c, "shop/web", "v3", &next);
    reg.stop_and_fsck();
}
