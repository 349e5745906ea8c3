//! Real clients against a real `orlop serve`: skopeo, podman, buildah,
//! containerd (`ctr`) and the Docker engine push and pull, and every byte
//! that comes back is checked. CI
//! (`.ci/run`) installs skopeo and podman and starts dockerd; a missing tool
//! fails the test rather than skipping it.

use orlop_tests::oci::*;
use orlop_tests::registry::Registry;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is needed for this test (CI installs it): {e}"));
    assert!(
        out.status.success(),
        "{cmd} {}: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn skopeo(args: &[&str]) -> String {
    let mut all = vec!["--insecure-policy"];
    all.extend_from_slice(args);
    run("skopeo", &all)
}

/// A small image whose layers are real gzipped tars.
fn sample_image(name: &str) -> Image {
    let base = tar_gz(&[
        ("etc/os-release", b"NAME=orlop-test\n"),
        ("usr/share/doc/big", &noise(7, 300_000)),
    ]);
    let app = tar_gz(&[("app/hello.txt", format!("hello from {name}\n").as_bytes())]);
    Image::with_layers(name, vec![base, app])
}

/// A statically linked program that prints "hello from orlop" (gcc).
fn static_hello(dir: &Path) -> Vec<u8> {
    let src = dir.join("hello.c");
    std::fs::write(
        &src,
        "#include <unistd.h>\nint main(void){write(1,\"hello from orlop\\n\",17);return 0;}\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let bin = dir.join("hello");
    run(
        "gcc",
        &[
            "-static",
            "-Os",
            "-o",
            &bin.display().to_string(),
            &src.display().to_string(),
        ],
    );
    std::fs::read(&bin).unwrap_or_else(|e| panic!("{e}"))
}

fn blob_file(layout: &Path, d: &str) -> Vec<u8> {
    std::fs::read(layout.join("blobs/sha256").join(&d["sha256:".len()..]))
        .unwrap_or_else(|e| panic!("blob {d} missing from the pulled layout: {e}"))
}

#[test]
fn skopeo_copies_in_and_out() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let reg = Registry::start(&dir.path().join("data"), &[]);
    let host = reg.host();
    let img = sample_image("skopeo");
    let src = dir.path().join("src");
    write_layout(&src, &img, "v1");
    let src_ref = format!("oci:{}:v1", src.display());
    let dst_ref = format!("docker://{host}/tools/skopeo:v1");
    skopeo(&["copy", "--dest-tls-verify=false", &src_ref, &dst_ref]);

    // The manifest comes back byte for byte, the tag is listed.
    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &dst_ref]);
    assert_eq!(raw.as_bytes(), img.manifest.as_slice());
    let tags: Value = serde_json::from_str(&skopeo(&[
        "list-tags",
        "--tls-verify=false",
        &format!("docker://{host}/tools/skopeo"),
    ]))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tags["Tags"], serde_json::json!(["v1"]));

    // Copy back out to a layout: every blob is identical.
    let out = dir.path().join("out");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &dst_ref,
        &format!("oci:{}:v1", out.display()),
    ]);
    for b in img.blobs() {
        assert!(
            blob_file(&out, &digest(b)) == *b,
            "blob {} differs",
            digest(b)
        );
    }

    // A Docker v2 schema 2 conversion (the config is rewritten; the layers
    // keep their bytes).
    let v2s2_ref = format!("docker://{host}/tools/skopeo:docker");
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--format",
        "v2s2",
        &src_ref,
        &v2s2_ref,
    ]);
    let raw: Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &v2s2_ref,
    ]))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        raw["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    let docker_out = dir.path().join("docker-out");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &v2s2_ref,
        &format!("oci:{}:x", docker_out.display()),
    ]);
    for l in &img.layers {
        assert!(blob_file(&docker_out, &digest(l)) == *l);
    }

    // A two-platform index, copied with --all both ways.
    let other = sample_image("skopeo-arm");
    let multi = dir.path().join("multi");
    write_layout(&multi, &img, "unused");
    let arm_dir = dir.path().join("arm");
    write_layout(&arm_dir, &other, "unused");
    push_index_layout(&multi, &arm_dir, &img, &other);
    let multi_ref = format!("docker://{host}/tools/multi:v1");
    skopeo(&[
        "copy",
        "--all",
        "--dest-tls-verify=false",
        &format!("oci:{}:multi", multi.display()),
        &multi_ref,
    ]);
    let idx: Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &multi_ref,
    ]))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(idx["manifests"].as_array().map(Vec::len), Some(2));
    let multi_out = dir.path().join("multi-out");
    skopeo(&[
        "copy",
        "--all",
        "--src-tls-verify=false",
        &multi_ref,
        &format!("oci:{}:m", multi_out.display()),
    ]);
    for b in img.blobs().chain(other.blobs()) {
        assert!(blob_file(&multi_out, &digest(b)) == *b);
    }

    // Delete through the API client.
    skopeo(&["delete", "--tls-verify=false", &dst_ref]);
    let r = reg.client().get("/v2/tools/skopeo/tags/list");
    assert_eq!(r.json()["tags"], serde_json::json!(["docker"]));
    reg.stop_and_fsck();
}

/// Adds `other`'s blobs to the layout at `multi` and tags an index of both
/// images there as `multi`.
fn push_index_layout(multi: &Path, other_dir: &Path, img: &Image, other: &Image) {
    for b in other.blobs().chain(std::iter::once(&other.manifest)) {
        let d = digest(b);
        std::fs::write(multi.join("blobs/sha256").join(&d["sha256:".len()..]), b)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let _ = other_dir;
    let mut a = descriptor(OCI_MANIFEST, &img.manifest);
    a["platform"] = serde_json::json!({"os": "linux", "architecture": "amd64"});
    let mut b = descriptor(OCI_MANIFEST, &other.manifest);
    b["platform"] = serde_json::json!({"os": "linux", "architecture": "arm64"});
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [a, b]
    }))
    .unwrap_or_default();
    let d = digest(&index);
    std::fs::write(
        multi.join("blobs/sha256").join(&d["sha256:".len()..]),
        &index,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut top = descriptor(OCI_INDEX, &index);
    top["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "multi"});
    let layout =
        serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [top]});
    std::fs::write(
        multi.join("index.json"),
        serde_json::to_vec(&layout).unwrap_or_default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn podman_pushes_and_pulls() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let reg = Registry::start(&dir.path().join("data"), &[]);
    let host = reg.host();
    let img = sample_image("podman");
    // Podman keeps its own image store under the test's directory.
    let root = dir.path().join("podman-root");
    let runroot = dir.path().join("podman-run");
    let (root, runroot) = (root.display().to_string(), runroot.display().to_string());
    let podman = |args: &[&str]| {
        let mut all = vec![
            "--root",
            &root,
            "--runroot",
            &runroot,
            "--storage-driver",
            "vfs",
        ];
        all.extend_from_slice(args);
        run("podman", &all)
    };
    // Seed the image through the API, pull it with podman, push it back
    // under another name, drop it locally, and pull that.
    push_image(&reg.client(), "seed/app", "v1", &img);
    let seed = format!("{host}/seed/app:v1");
    let local = format!("{host}/podman/app:v1");
    podman(&["pull", "--tls-verify=false", &seed]);
    podman(&["tag", &seed, &local]);
    podman(&["push", "--tls-verify=false", &local]);
    podman(&["rmi", "--all", "--force"]);
    podman(&["pull", "--tls-verify=false", &local]);
    let files = podman(&["image", "inspect", "--format", "{{.Digest}}", &local]);
    let pushed = reg.client().req(
        "HEAD",
        "/v2/podman/app/manifests/v1",
        &[
            ("accept", OCI_MANIFEST),
            (
                "accept",
                "application/vnd.docker.distribution.manifest.v2+json",
            ),
        ],
        b"",
    );
    assert_eq!(pushed.status, 200);
    assert_eq!(
        Some(files.trim().to_string()),
        pushed.header("docker-content-digest")
    );
    // The layer bytes podman pushed are what the digests say.
    let m = reg.client().get("/v2/podman/app/manifests/v1").json();
    for l in m["layers"].as_array().cloned().unwrap_or_default() {
        let d = l["digest"].as_str().unwrap_or_default();
        let body = reg.client().get(&format!("/v2/podman/app/blobs/{d}")).body;
        assert_eq!(digest(&body), d);
    }
    reg.stop_and_fsck();
}

#[test]
fn docker_engine_pushes_and_pulls() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let reg = Registry::start(&dir.path().join("data"), &[]);
    let host = reg.host();
    let tag = format!("{host}/docker/app:{}", std::process::id());
    let hello = static_hello(dir.path());
    let rootfs = tar_gz(&[
        ("hello", &hello),
        ("hello.txt", b"hello from docker\n"),
        ("data/blob", &noise(8, 200_000)),
    ]);
    let tarball = dir.path().join("rootfs.tar.gz");
    std::fs::write(&tarball, &rootfs).unwrap_or_else(|e| panic!("{e}"));
    run("docker", &["import", &tarball.display().to_string(), &tag]);
    let pushed = run("docker", &["push", &tag]);
    run("docker", &["rmi", &tag]);
    run("docker", &["pull", &tag]);
    let id = run(
        "docker",
        &[
            "image",
            "inspect",
            "--format",
            "{{index .RepoDigests 0}}",
            &tag,
        ],
    );
    let r = reg.client().req(
        "HEAD",
        &format!("/v2/docker/app/manifests/{}", std::process::id()),
        &[(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )],
        b"",
    );
    let d = r.header("docker-content-digest").unwrap_or_default();
    assert!(
        pushed.contains(&d),
        "push output names the digest: {pushed}"
    );
    assert!(id.trim().ends_with(&d), "{id} vs {d}");
    // The pulled image runs.
    let said = run(
        "docker",
        &["run", "--rm", "--network", "none", &tag, "/hello"],
    );
    assert_eq!(said, "hello from orlop\n");
    // The file comes back out of the pulled image.
    let cid = run("docker", &["create", &tag, "/nothing"]);
    let out = dir.path().join("hello.txt");
    run(
        "docker",
        &[
            "cp",
            &format!("{}:/hello.txt", cid.trim()),
            &out.display().to_string(),
        ],
    );
    run("docker", &["rm", cid.trim()]);
    run("docker", &["rmi", &tag]);
    assert_eq!(
        std::fs::read(&out).unwrap_or_default(),
        b"hello from docker\n"
    );
    reg.stop_and_fsck();
}

#[test]
fn buildah_and_podman_build_from_an_orlop_image() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let reg = Registry::start(&dir.path().join("data"), &[]);
    let host = reg.host();
    let base = sample_image("base");
    push_image(&reg.client(), "base/app", "v1", &base);
    let base_ref = format!("{host}/base/app:v1");
    let root = dir.path().join("root").display().to_string();
    let runroot = dir.path().join("run").display().to_string();
    let storage = [
        "--root",
        root.as_str(),
        "--runroot",
        runroot.as_str(),
        "--storage-driver",
        "vfs",
    ];
    let tool = |cmd: &str, args: &[&str]| {
        let mut all: Vec<&str> = storage.to_vec();
        all.extend_from_slice(args);
        run(cmd, &all)
    };

    // buildah: from, copy, commit, push.
    let ctx = dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(ctx.join("added.txt"), b"added by a build\n").unwrap_or_else(|e| panic!("{e}"));
    let ctr = tool("buildah", &["from", "--tls-verify=false", &base_ref]);
    let ctr = ctr.trim();
    tool(
        "buildah",
        &[
            "copy",
            ctr,
            &ctx.join("added.txt").display().to_string(),
            "/added.txt",
        ],
    );
    let built = format!("{host}/buildah/app:v1");
    tool("buildah", &["commit", ctr, &built]);
    tool("buildah", &["push", "--tls-verify=false", &built]);
    tool("buildah", &["rm", ctr]);

    // podman build FROM the base image in Orlop, then push.
    std::fs::write(
        ctx.join("Containerfile"),
        format!("FROM {base_ref}\nCOPY added.txt /added.txt\nLABEL built=podman\n"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let podman_built = format!("{host}/podman/built:v1");
    tool(
        "podman",
        &[
            "build",
            "--tls-verify=false",
            "-t",
            &podman_built,
            &ctx.display().to_string(),
        ],
    );
    tool("podman", &["push", "--tls-verify=false", &podman_built]);

    // Both images are the base's layers plus one new layer, and every blob
    // reads back with the digest its manifest names.
    let c = reg.client();
    for (repo, tag) in [("buildah/app", "v1"), ("podman/built", "v1")] {
        let r = c.req(
            "GET",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[
                ("accept", OCI_MANIFEST),
                (
                    "accept",
                    "application/vnd.docker.distribution.manifest.v2+json",
                ),
            ],
            b"",
        );
        assert_eq!(r.status, 200, "{repo}");
        let m = r.json();
        let layers = m["layers"].as_array().cloned().unwrap_or_default();
        assert_eq!(layers.len(), base.layers.len() + 1, "{repo}: {m}");
        for l in layers.iter().chain(std::iter::once(&m["config"])) {
            let d = l["digest"].as_str().unwrap_or_default();
            let body = c.get(&format!("/v2/{repo}/blobs/{d}")).body;
            assert_eq!(digest(&body), d, "{repo}");
        }
    }
    // Pull the buildah image back with podman.
    tool("podman", &["rmi", "--all", "--force"]);
    tool("podman", &["pull", "--tls-verify=false", &built]);
    reg.stop_and_fsck();
}

/// containerd's socket: the system one, or the one dockerd runs.
fn containerd_socket() -> String {
    [
        "/run/containerd/containerd.sock",
        "/var/run/docker/containerd/containerd.sock",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .unwrap_or_else(|| panic!("no containerd socket (CI starts dockerd, which runs one)"))
    .to_string()
}

#[test]
fn containerd_pulls_unpacks_and_pushes() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let reg = Registry::start(&dir.path().join("data"), &[]);
    let host = reg.host();
    let img = sample_image("containerd");
    push_image(&reg.client(), "seed/ctr", "v1", &img);
    let sock = containerd_socket();
    let ns = format!("orlop-test-{}", std::process::id());
    let ctr = |args: &[&str]| {
        let mut all = vec!["--address", sock.as_str(), "-n", ns.as_str()];
        all.extend_from_slice(args);
        run("ctr", &all)
    };
    let seed = format!("{host}/seed/ctr:v1");
    let pushed = format!("{host}/ctr/app:v1");
    // Pull (with unpack: containerd checks every layer against its diff id).
    ctr(&["images", "pull", "--plain-http", &seed]);
    ctr(&["images", "tag", &seed, &pushed]);
    ctr(&["images", "push", "--plain-http", &pushed]);
    ctr(&["images", "rm", &seed, &pushed]);
    let c = reg.client();
    let r = c.req(
        "GET",
        "/v2/ctr/app/manifests/v1",
        &[("accept", OCI_MANIFEST)],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body, img.manifest,
        "containerd pushed the manifest it pulled"
    );
    for b in img.blobs() {
        assert!(c.get(&format!("/v2/ctr/app/blobs/{}", digest(b))).body == *b);
    }
    reg.stop_and_fsck();
}
