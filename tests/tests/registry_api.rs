//! The Registry V2 API over real HTTP against a real `orlop serve` process.
//! Every test ends by stopping the server and running `orlop fsck`, which
//! verifies the engine and audits every blob reference count against the
//! registry's rows.

use orlop_tests::oci::*;
use orlop_tests::registry::{Client, Registry};
use serde_json::json;

fn start() -> (tempfile::TempDir, Registry) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let r = Registry::start(&dir.path().join("data"), &[]);
    (dir, r)
}

#[test]
fn base_and_error_format() {
    let (_dir, reg) = start();
    let c = reg.client();
    let r = c.get("/v2/");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("docker-distribution-api-version").as_deref(),
        Some("registry/2.0")
    );
    let d = digest(b"nothing");
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("GET", "/v2/Bad/tags/list".into(), 400, "NAME_INVALID"),
        ("GET", "/v2/a//b/tags/list".into(), 400, "NAME_INVALID"),
        (
            "GET",
            "/v2/ok/blobs/sha256:1234".into(),
            400,
            "DIGEST_INVALID",
        ),
        ("GET", "/v2/ok/blobs/md5:abc".into(), 400, "DIGEST_INVALID"),
        ("GET", format!("/v2/ok/blobs/{d}"), 404, "BLOB_UNKNOWN"),
        ("HEAD", format!("/v2/ok/blobs/{d}"), 404, ""),
        ("GET", "/v2/ok/manifests/latest".into(), 404, "NAME_UNKNOWN"),
        (
            "GET",
            format!("/v2/ok/manifests/{d}"),
            404,
            "MANIFEST_UNKNOWN",
        ),
        ("GET", "/v2/ok/manifests/-bad".into(), 400, "TAG_INVALID"),
        ("GET", "/v2/ok/tags/list".into(), 404, "NAME_UNKNOWN"),
        (
            "GET",
            "/v2/ok/blobs/uploads/nope".into(),
            404,
            "BLOB_UPLOAD_UNKNOWN",
        ),
        ("POST", "/v2/ok/manifests/latest".into(), 405, "UNSUPPORTED"),
        ("GET", "/v2/ok/something".into(), 404, "UNSUPPORTED"),
        (
            "GET",
            "/v2/_catalog?n=x".into(),
            400,
            "PAGINATION_NUMBER_INVALID",
        ),
    ];
    for (m, path, status, code) in cases {
        let r = c.req(m, &path, &[], b"");
        assert_eq!(
            r.status,
            status,
            "{m} {path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        if !code.is_empty() {
            assert_eq!(r.error_code(), code, "{m} {path}");
            assert_eq!(
                r.header("content-type").as_deref(),
                Some("application/json")
            );
        }
    }
    reg.stop_and_fsck();
}

#[test]
fn blob_upload_forms_and_reads() {
    let (_dir, reg) = start();
    let c = reg.client();
    let data = noise(1, 700_000);
    let d = digest(&data);

    // POST then PUT with the whole body (monolithic).
    let r = c.req("POST", "/v2/app/blobs/uploads/", &[], b"");
    assert_eq!(r.status, 202);
    let loc = r.header("location").unwrap_or_default();
    assert!(r.header("docker-upload-uuid").is_some());
    assert_eq!(r.header("range").as_deref(), Some("0-0"));
    let r = c.req("PUT", &format!("{loc}?digest={d}"), &[], &data);
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("location"), Some(format!("/v2/app/blobs/{d}")));
    assert_eq!(r.header("docker-content-digest"), Some(d.clone()));
    // The session is gone once finished.
    assert_eq!(c.get(&loc).status, 404);

    // HEAD and GET, whole and ranged.
    let r = c.req("HEAD", &format!("/v2/app/blobs/{d}"), &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some(data.len().to_string()));
    assert_eq!(r.header("docker-content-digest"), Some(d.clone()));
    assert!(r.body.is_empty());
    assert!(c.get(&format!("/v2/app/blobs/{d}")).body == data);
    let r = c.req(
        "GET",
        &format!("/v2/app/blobs/{d}"),
        &[("range", "bytes=1000-1999")],
        b"",
    );
    assert_eq!(r.status, 206);
    assert!(r.body == data[1000..2000]);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 1000-1999/{}", data.len()))
    );
    let r = c.req(
        "GET",
        &format!("/v2/app/blobs/{d}"),
        &[("range", "bytes=-10")],
        b"",
    );
    assert!(r.status == 206 && r.body == data[data.len() - 10..]);
    let r = c.req(
        "GET",
        &format!("/v2/app/blobs/{d}"),
        &[("range", "bytes=700000-")],
        b"",
    );
    assert_eq!(r.status, 416);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes */{}", data.len()))
    );

    // Chunked PATCHes with Content-Range, one out of order, then PUT.
    let data2 = noise(2, 300_000);
    let d2 = digest(&data2);
    let loc = c
        .req("POST", "/v2/app/blobs/uploads/", &[], b"")
        .header("location")
        .unwrap_or_default();
    let r = c.req(
        "PATCH",
        &loc,
        &[("content-range", "0-99999")],
        &data2[..100_000],
    );
    assert_eq!(r.status, 202);
    assert_eq!(r.header("range").as_deref(), Some("0-99999"));
    let r = c.req(
        "PATCH",
        &loc,
        &[("content-range", "150000-199999")],
        &data2[150_000..200_000],
    );
    assert_eq!(r.status, 416, "out of order");
    assert_eq!(r.header("range").as_deref(), Some("0-99999"));
    assert_eq!(r.header("location"), Some(loc.clone()));
    let r = c.req(
        "PATCH",
        &loc,
        &[("content-range", "100000-199999")],
        &data2[100_000..200_000],
    );
    assert_eq!(r.status, 202);
    let r = c.get(&loc);
    assert_eq!(r.status, 204);
    assert_eq!(r.header("range").as_deref(), Some("0-199999"));
    // The last piece travels with the PUT.
    let r = c.req(
        "PUT",
        &format!("{loc}?digest={d2}"),
        &[("content-range", "200000-299999")],
        &data2[200_000..],
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert!(c.get(&format!("/v2/app/blobs/{d2}")).body == data2);

    // A streamed PATCH (chunked transfer encoding, no Content-Range), then
    // an empty PUT, as docker pushes.
    let data3 = noise(3, 1_500_000);
    let d3 = digest(&data3);
    let loc = c
        .req("POST", "/v2/app/blobs/uploads/", &[], b"")
        .header("location")
        .unwrap_or_default();
    let pieces = data3.chunks(65_536).map(<[u8]>::to_vec).collect();
    let r = c.req_streamed("PATCH", &loc, &[], pieces);
    assert_eq!(r.status, 202);
    assert_eq!(r.header("range"), Some(format!("0-{}", data3.len() - 1)));
    let r = c.req("PUT", &format!("{loc}?digest={d3}"), &[], b"");
    assert_eq!(r.status, 201);
    assert!(c.get(&format!("/v2/app/blobs/{d3}")).body == data3);

    // A wrong digest stores nothing, and the session ends.
    let bad = noise(4, 50_000);
    let loc = c
        .req("POST", "/v2/app/blobs/uploads/", &[], b"")
        .header("location")
        .unwrap_or_default();
    let r = c.req(
        "PUT",
        &format!("{loc}?digest={}", digest(b"other")),
        &[],
        &bad,
    );
    assert_eq!((r.status, r.error_code().as_str()), (400, "DIGEST_INVALID"));
    assert_eq!(
        c.req("HEAD", &format!("/v2/app/blobs/{}", digest(&bad)), &[], b"")
            .status,
        404
    );
    assert_eq!(c.get(&loc).status, 404);
    let r = c.req(
        "POST",
        &format!("/v2/app/blobs/uploads/?digest={}", digest(b"x")),
        &[],
        b"y",
    );
    assert_eq!(r.error_code(), "DIGEST_INVALID");

    // The empty blob, in a single request.
    let de = push_blob(&c, "app", b"");
    let r = c.get(&format!("/v2/app/blobs/{de}"));
    assert!(r.status == 200 && r.body.is_empty());

    // Cancel an upload.
    let loc = c
        .req("POST", "/v2/app/blobs/uploads/", &[], b"")
        .header("location")
        .unwrap_or_default();
    c.req("PATCH", &loc, &[], b"some bytes");
    assert_eq!(c.req("DELETE", &loc, &[], b"").status, 204);
    assert_eq!(c.get(&loc).error_code(), "BLOB_UPLOAD_UNKNOWN");

    // Mounts: from a repository holding the blob, from one that does not
    // (falls back to an upload session), and without `from`.
    let r = c.req(
        "POST",
        &format!("/v2/other/blobs/uploads/?mount={d}&from=app"),
        &[],
        b"",
    );
    assert_eq!(r.status, 201);
    assert_eq!(r.header("location"), Some(format!("/v2/other/blobs/{d}")));
    assert!(c.get(&format!("/v2/other/blobs/{d}")).body == data);
    let r = c.req(
        "POST",
        &format!("/v2/third/blobs/uploads/?mount={d}&from=nowhere"),
        &[],
        b"",
    );
    assert_eq!(r.status, 202);
    let r = c.req(
        "POST",
        &format!("/v2/third/blobs/uploads/?mount={d2}"),
        &[],
        b"",
    );
    assert_eq!(r.status, 201);
    // A blob is visible only in repositories that link it.
    assert_eq!(c.get(&format!("/v2/fourth/blobs/{d}")).status, 404);

    // Deleting a link: gone from that repository, kept in the others.
    assert_eq!(
        c.req("DELETE", &format!("/v2/other/blobs/{d}"), &[], b"")
            .status,
        202
    );
    assert_eq!(c.get(&format!("/v2/other/blobs/{d}")).status, 404);
    assert_eq!(
        c.req("DELETE", &format!("/v2/other/blobs/{d}"), &[], b"")
            .status,
        404
    );
    assert!(c.get(&format!("/v2/app/blobs/{d}")).body == data);
    reg.stop_and_fsck();
}

#[test]
fn manifests_tags_and_deletes() {
    let (_dir, reg) = start();
    let c = reg.client();
    let shared = noise(10, 200_000);
    let a = Image::with_layers("a", vec![shared.clone(), noise(11, 50_000)]);
    let b = Image::with_layers("b", vec![shared.clone(), noise(12, 60_000)]);

    // A manifest naming a blob the registry lacks is refused and stores nothing.
    push_blob(&c, "app", &a.config);
    let r = put_manifest(&c, "app", "v1", OCI_MANIFEST, &a.manifest);
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "MANIFEST_BLOB_UNKNOWN")
    );
    assert_eq!(
        c.req(
            "HEAD",
            &format!("/v2/app/manifests/{}", a.digest()),
            &[],
            b""
        )
        .status,
        404
    );
    // Malformed manifests, each refused with MANIFEST_INVALID.
    for (body, ct) in [
        (b"{not json".to_vec(), OCI_MANIFEST),
        (b"{\"schemaVersion\":2}".to_vec(), "application/x-unknown"),
        (a.manifest.clone(), OCI_INDEX),
    ] {
        let r = put_manifest(&c, "app", "v1", ct, &body);
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (400, "MANIFEST_INVALID")
        );
    }
    // A digest reference that does not match the body.
    let r = put_manifest(&c, "app", &b.digest(), OCI_MANIFEST, &a.manifest);
    assert_eq!(r.error_code(), "DIGEST_INVALID");

    push_image(&c, "app", "v1", &a);
    push_image(&c, "app", "v2", &b);
    assert_pulls(&c, "app", "v1", &a);
    assert_pulls(&c, "app", "v2", &b);
    let r = c.req(
        "HEAD",
        &format!("/v2/app/manifests/{}", a.digest()),
        &[],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type").as_deref(), Some(OCI_MANIFEST));
    assert_eq!(
        r.header("content-length"),
        Some(a.manifest.len().to_string())
    );
    // Pushing by digest, re-pushing, and re-tagging are all fine.
    assert_eq!(
        put_manifest(&c, "app", &a.digest(), OCI_MANIFEST, &a.manifest).status,
        201
    );
    push_image(&c, "app", "v1", &a);
    push_image(&c, "app", "latest", &b);
    push_image(&c, "app", "latest", &a);

    // Tags, paginated.
    for t in ["t1", "t2", "t3"] {
        assert_eq!(
            put_manifest(&c, "app", t, OCI_MANIFEST, &b.manifest).status,
            201
        );
    }
    let all = c.get("/v2/app/tags/list").json();
    assert_eq!(
        all,
        json!({"name": "app", "tags": ["latest", "t1", "t2", "t3", "v1", "v2"]})
    );
    let r = c.get("/v2/app/tags/list?n=2");
    assert_eq!(r.json()["tags"], json!(["latest", "t1"]));
    assert_eq!(
        r.header("link").as_deref(),
        Some("</v2/app/tags/list?n=2&last=t1>; rel=\"next\"")
    );
    let r = c.get("/v2/app/tags/list?n=2&last=t1");
    assert_eq!(r.json()["tags"], json!(["t2", "t3"]));
    let r = c.get("/v2/app/tags/list?n=10&last=v1");
    assert_eq!(r.json()["tags"], json!(["v2"]));
    assert!(r.header("link").is_none());

    // Catalog, paginated.
    push_blob(&c, "zeta/one", b"z");
    let r = c.get("/v2/_catalog?n=1");
    assert_eq!(r.json(), json!({"repositories": ["app"]}));
    assert!(r.header("link").is_some());
    assert_eq!(
        c.get("/v2/_catalog?last=app").json(),
        json!({"repositories": ["zeta/one"]})
    );

    // Delete by tag: only the tag goes.
    assert_eq!(
        c.req("DELETE", "/v2/app/manifests/t1", &[], b"").status,
        202
    );
    assert_eq!(
        c.req("DELETE", "/v2/app/manifests/t1", &[], b"")
            .error_code(),
        "MANIFEST_UNKNOWN"
    );
    assert_pulls(&c, "app", "t2", &b);
    // Delete by digest: the manifest and every tag on it.
    let r = c.req(
        "DELETE",
        &format!("/v2/app/manifests/{}", b.digest()),
        &[],
        b"",
    );
    assert_eq!(r.status, 202);
    assert_eq!(
        c.get("/v2/app/tags/list").json()["tags"],
        json!(["latest", "v1"])
    );
    assert_eq!(
        c.get(&format!("/v2/app/manifests/{}", b.digest())).status,
        404
    );
    assert_pulls(&c, "app", "v1", &a);
    reg.stop_and_fsck();
}

#[test]
fn indexes_referrers_and_negotiation() {
    let (_dir, reg) = start();
    let c = reg.client();
    let amd = Image::with_layers("amd64", vec![noise(20, 30_000)]);
    let arm = Image::with_layers("arm64", vec![noise(21, 30_000)]);
    push_image(&c, "multi", "amd", &amd);
    push_image(&c, "multi", "arm", &arm);
    let mut amd_desc = descriptor(OCI_MANIFEST, &amd.manifest);
    amd_desc["platform"] = json!({"os": "linux", "architecture": "amd64"});
    let mut arm_desc = descriptor(OCI_MANIFEST, &arm.manifest);
    arm_desc["platform"] = json!({"os": "linux", "architecture": "arm64"});
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [arm_desc, amd_desc]
    }))
    .unwrap_or_default();
    // An index naming a manifest the repository lacks is refused.
    let stranger = Image::with_layers("x", vec![]);
    let bad = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [descriptor(OCI_MANIFEST, &stranger.manifest)]}))
    .unwrap_or_default();
    assert_eq!(
        put_manifest(&c, "multi", "bad", OCI_INDEX, &bad).error_code(),
        "MANIFEST_BLOB_UNKNOWN"
    );
    // `latest` first names the amd64 image, then moves to the index that
    // lists it: the image's row changes twice in one transaction.
    let r = put_manifest(&c, "multi", "latest", OCI_MANIFEST, &amd.manifest);
    assert_eq!(r.status, 201);
    assert_eq!(
        put_manifest(&c, "multi", "latest", OCI_INDEX, &index).status,
        201
    );
    let r = c.req(
        "DELETE",
        &format!("/v2/multi/manifests/{}", amd.digest()),
        &[],
        b"",
    );
    assert_eq!(r.status, 409, "the index still lists it");

    // Negotiation: an index when accepted, else the linux/amd64 image.
    let r = c.req(
        "GET",
        "/v2/multi/manifests/latest",
        &[("accept", OCI_INDEX), ("accept", OCI_MANIFEST)],
        b"",
    );
    assert_eq!(r.body, index);
    assert_eq!(r.header("content-type").as_deref(), Some(OCI_INDEX));
    let r = c.req(
        "GET",
        "/v2/multi/manifests/latest",
        &[("accept", OCI_MANIFEST)],
        b"",
    );
    assert_eq!(r.body, amd.manifest);
    assert_eq!(r.header("docker-content-digest"), Some(amd.digest()));

    // A child of an index cannot be deleted before the index.
    let r = c.req(
        "DELETE",
        &format!("/v2/multi/manifests/{}", arm.digest()),
        &[],
        b"",
    );
    assert_eq!(r.status, 409);

    // Referrers: an SBOM and a signature pointing at the amd64 image.
    let empty = b"{}".to_vec();
    push_blob(&c, "multi", &empty);
    let referrer = |artifact: &str, payload: &[u8]| {
        push_blob(&c, "multi", payload);
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact,
            "config": descriptor("application/vnd.oci.empty.v1+json", &empty),
            "layers": [descriptor("application/octet-stream", payload)],
            "subject": descriptor(OCI_MANIFEST, &amd.manifest),
            "annotations": {"kind": artifact},
        }))
        .unwrap_or_default()
    };
    let sbom = referrer("application/spdx+json", b"sbom");
    let sig = referrer("application/vnd.dev.cosign.simplesigning.v1+json", b"sig");
    for m in [&sbom, &sig] {
        let r = put_manifest(&c, "multi", &digest(m), OCI_MANIFEST, m);
        assert_eq!(r.status, 201);
        assert_eq!(r.header("oci-subject"), Some(amd.digest()));
    }
    let r = c.get(&format!("/v2/multi/referrers/{}", amd.digest()));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type").as_deref(), Some(OCI_INDEX));
    let list = r.json();
    assert_eq!(list["manifests"].as_array().map(Vec::len), Some(2));
    assert!(r.header("oci-filters-applied").is_none());
    let r = c.get(&format!(
        "/v2/multi/referrers/{}?artifactType=application/spdx%2Bjson",
        amd.digest()
    ));
    assert_eq!(
        r.header("oci-filters-applied").as_deref(),
        Some("artifactType")
    );
    let m = &r.json()["manifests"];
    assert_eq!(m.as_array().map(Vec::len), Some(1));
    assert_eq!(m[0]["digest"], json!(digest(&sbom)));
    assert_eq!(m[0]["artifactType"], json!("application/spdx+json"));
    assert_eq!(m[0]["annotations"]["kind"], json!("application/spdx+json"));
    assert_eq!(m[0]["size"], json!(sbom.len()));
    // No referrers: an empty index, not an error.
    let r = c.get(&format!("/v2/multi/referrers/{}", arm.digest()));
    assert_eq!(r.json()["manifests"], json!([]));
    // Deleting a referrer removes it from the list.
    c.req(
        "DELETE",
        &format!("/v2/multi/manifests/{}", digest(&sig)),
        &[],
        b"",
    );
    let r = c.get(&format!("/v2/multi/referrers/{}", amd.digest()));
    assert_eq!(r.json()["manifests"].as_array().map(Vec::len), Some(1));

    // Deleting the index frees its children for deletion.
    c.req(
        "DELETE",
        &format!("/v2/multi/manifests/{}", digest(&index)),
        &[],
        b"",
    );
    let r = c.req(
        "DELETE",
        &format!("/v2/multi/manifests/{}", arm.digest()),
        &[],
        b"",
    );
    assert_eq!(r.status, 202);
    reg.stop_and_fsck();
}

#[test]
fn manifest_size_limit_and_docker_types() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let reg = Registry::start(
        &dir.path().join("data"),
        &[("ORLOP_MANIFEST_BYTES_MAX", "2000")],
    );
    let c = reg.client();
    let big = vec![b' '; 3000];
    let r = put_manifest(&c, "app", "big", OCI_MANIFEST, &big);
    assert_eq!(r.status, 413);

    // Docker v2 schema 2 with its own media types.
    let layer = noise(30, 1000);
    let config = b"{\"architecture\":\"amd64\",\"os\":\"linux\"}".to_vec();
    push_blob(&c, "app", &layer);
    push_blob(&c, "app", &config);
    let v2s2 = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": descriptor("application/vnd.docker.container.image.v1+json", &config),
        "layers": [descriptor("application/vnd.docker.image.rootfs.diff.tar.gzip", &layer)],
    }))
    .unwrap_or_default();
    let r = put_manifest(
        &c,
        "app",
        "docker",
        "application/vnd.docker.distribution.manifest.v2+json",
        &v2s2,
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = c.get("/v2/app/manifests/docker");
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/vnd.docker.distribution.manifest.v2+json")
    );
    // A descriptor whose size disagrees with the stored blob.
    let wrong = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": digest(&config), "size": 5},
        "layers": [],
    }))
    .unwrap_or_default();
    assert_eq!(
        put_manifest(&c, "app", "wrong", OCI_MANIFEST, &wrong).error_code(),
        "MANIFEST_INVALID"
    );
    // Docker schema 1, kept byte for byte.
    let s1 = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 1, "name": "app", "tag": "old", "architecture": "amd64",
        "fsLayers": [{"blobSum": digest(&layer)}],
        "history": [{"v1Compatibility": "{}"}],
        "signatures": [{"header": {"alg": "ES256"}, "signature": "x", "protected": "y"}],
    }))
    .unwrap_or_default();
    let t = "application/vnd.docker.distribution.manifest.v1+prettyjws";
    assert_eq!(put_manifest(&c, "app", "old", t, &s1).status, 201);
    assert_eq!(c.get("/v2/app/manifests/old").body, s1);
    // A Helm chart as `helm push` writes it: an OCI manifest whose config
    // and layer carry Helm's own media types.
    let chart = tar_gz(&[(
        "mychart/Chart.yaml",
        b"apiVersion: v2\nname: mychart\nversion: 0.1.0\n",
    )]);
    let chart_config = br#"{"name":"mychart","version":"0.1.0","apiVersion":"v2"}"#.to_vec();
    push_blob(&c, "charts/mychart", &chart);
    push_blob(&c, "charts/mychart", &chart_config);
    let helm = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": descriptor("application/vnd.cncf.helm.config.v1+json", &chart_config),
        "layers": [descriptor("application/vnd.cncf.helm.chart.content.v1.tar+gzip", &chart)],
    }))
    .unwrap_or_default();
    let r = put_manifest(&c, "charts/mychart", "0.1.0", OCI_MANIFEST, &helm);
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = c.req(
        "GET",
        "/v2/charts/mychart/manifests/0.1.0",
        &[("accept", OCI_MANIFEST)],
        b"",
    );
    assert_eq!(r.body, helm);
    assert_eq!(
        c.get(&format!("/v2/charts/mychart/blobs/{}", digest(&chart)))
            .body,
        chart
    );
    reg.stop_and_fsck();
}

#[test]
fn restart_and_kill_keep_acknowledged_pushes() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let data = dir.path().join("data");
    let img = Image::with_layers("k", vec![noise(40, 400_000), noise(41, 10)]);
    let reg = Registry::start(&data, &[]);
    push_image(&reg.client(), "durable", "v1", &img);
    reg.kill();
    let reg = Registry::start(&data, &[]);
    assert_pulls(&reg.client(), "durable", "v1", &img);
    reg.stop();
    let reg = Registry::start(&data, &[]);
    assert_pulls(&reg.client(), "durable", "v1", &img);
    reg.stop_and_fsck();
}

/// A field of a process's `/proc/PID/limits` line ("Max open files").
fn open_file_limits(pid: u32) -> (String, String) {
    let limits =
        std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_else(|e| panic!("{e}"));
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("no open-file limit in {limits}"));
    let mut f = line["Max open files".len()..].split_whitespace();
    let soft = f.next().unwrap_or_default().to_string();
    let hard = f.next().unwrap_or_default().to_string();
    (soft, hard)
}

#[test]
fn serve_raises_its_open_file_limit() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // Started with a soft limit of 256 (below the hard one, which stays).
    let lower = |cmd: &mut std::process::Command| {
        // SAFETY: between fork and exec only getrlimit and setrlimit run,
        // which are async-signal-safe and allocate nothing.
        unsafe {
            cmd.pre_exec(|| {
                let mut r = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_max > 256 {
                    r.rlim_cur = 256;
                    libc::setrlimit(libc::RLIMIT_NOFILE, &r);
                }
                Ok(())
            });
        }
    };
    let reg = Registry::start_with(&dir.path().join("data"), &[], &lower);
    let (soft, hard) = open_file_limits(reg.child.id());
    assert_eq!(soft, hard, "the soft limit is raised to the hard one");
    assert_eq!(reg.client().get("/v2/").status, 200);
    reg.stop();
}

#[test]
fn idle_upload_sessions_expire() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let reg = Registry::start(
        &dir.path().join("data"),
        &[("ORLOP_UPLOAD_EXPIRY_SECS", "1")],
    );
    let c = reg.client();
    let loc = c
        .req("POST", "/v2/app/blobs/uploads/", &[], b"")
        .header("location")
        .unwrap_or_default();
    assert_eq!(c.req("PATCH", &loc, &[], &noise(50, 100_000)).status, 202);
    std::thread::sleep(std::time::Duration::from_secs(4));
    let r = c.req("PATCH", &loc, &[], b"more");
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (404, "BLOB_UPLOAD_UNKNOWN")
    );
    let m = String::from_utf8_lossy(&c.get("/metrics").body).into_owned();
    let expired = m
        .lines()
        .find(|l| l.starts_with("orlop_upload_sessions_expired_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok());
    assert!(expired.is_some_and(|n| n >= 1.0), "{m}");
    reg.stop_and_fsck();
}

#[test]
fn metrics_count_requests_and_engine_commits() {
    let (_dir, reg) = start();
    let c = reg.client();
    let digest = push_blob(&c, "m", &noise(60, 1000));
    assert_eq!(c.get(&format!("/v2/m/blobs/{digest}")).body.len(), 1000);
    assert_eq!(c.get("/v2/m/tags/list").status, 200);
    assert_eq!(c.get("/v2/absent/tags/list").status, 404);
    let r = c.get("/metrics");
    assert_eq!(r.status, 200);
    let m = String::from_utf8_lossy(&r.body).into_owned();
    for needle in [
        "orlop_http_requests_total{route=\"upload\",method=\"POST\",status=\"201\"} 1",
        "orlop_http_requests_total{route=\"tags\",method=\"GET\",status=\"404\"} 1",
        "orlop_http_request_duration_seconds_bucket",
        "orlop_http_received_bytes_total 1000",
        "orlop_engine_segment_fsync_duration_seconds_count",
        "orlop_engine_index_write_duration_seconds_count",
        "orlop_blob_commit_duration_seconds_count 1",
        "orlop_upload_sessions 0",
        "orlop_engine_span_reads_total{source=",
    ] {
        assert!(m.contains(needle), "missing {needle:?} in\n{m}");
    }
    // The pull's one span: the record (64-byte header, 16-byte tag) in whole blocks.
    let span_bytes: f64 = m
        .lines()
        .filter(|l| l.starts_with("orlop_engine_span_read_bytes_total{"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum();
    assert_eq!(span_bytes, 4096.0, "{m}");
    reg.stop();
}

#[test]
fn concurrent_pushes_and_deletes_keep_counts_exact() {
    let (_dir, reg) = start();
    let addr = reg.addr;
    let shared: Vec<Vec<u8>> = (0..3).map(|i| noise(100 + i, 40_000)).collect();
    std::thread::scope(|s| {
        for t in 0..6u64 {
            let shared = shared.clone();
            s.spawn(move || {
                let c = Client::new(addr);
                let repo = format!("r{}", t % 3);
                for i in 0..6u64 {
                    let layers = vec![
                        shared[(t + i) as usize % 3].clone(),
                        noise(1000 * t + i, 5000),
                    ];
                    let img = Image::with_layers(&format!("{t}-{i}"), layers);
                    push_image(&c, &repo, &format!("t{}", i % 3), &img);
                    if i % 2 == 1 {
                        let r = c.req(
                            "DELETE",
                            &format!("/v2/{repo}/manifests/{}", img.digest()),
                            &[],
                            b"",
                        );
                        assert_eq!(r.status, 202);
                    }
                }
            });
        }
    });
    reg.stop_and_fsck();
}

fn start_upload(c: &Client, repo: &str) -> String {
    let r = c.req("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], b"");
    assert_eq!(r.status, 202);
    r.header("location").unwrap_or_default()
}

#[test]
fn uploads_resume_after_kill_and_restart() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let data_dir = dir.path().join("data");
    let data = noise(70, 900_000);
    let d = digest(&data);
    let reg = Registry::start(&data_dir, &[]);
    let c = reg.client();
    let loc = start_upload(&c, "resume");
    let r = c.req(
        "PATCH",
        &loc,
        &[("content-range", "0-299999")],
        &data[..300_000],
    );
    assert_eq!(r.status, 202);
    // An acknowledged PATCH survives kill -9.
    reg.kill();
    let reg = Registry::start(&data_dir, &[]);
    let c = reg.client();
    let r = c.get(&loc);
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("range").as_deref(), Some("0-299999"));
    let r = c.req(
        "PATCH",
        &loc,
        &[("content-range", "300000-599999")],
        &data[300_000..600_000],
    );
    assert_eq!(r.status, 202);
    assert_eq!(r.header("range").as_deref(), Some("0-599999"));
    // ... and a graceful restart.
    reg.stop();
    let reg = Registry::start(&data_dir, &[]);
    let c = reg.client();
    let r = c.req(
        "PATCH",
        &loc,
        &[("content-range", "100-199")],
        &data[100..200],
    );
    assert_eq!(r.status, 416, "out of order after the restart");
    assert_eq!(r.header("range").as_deref(), Some("0-599999"));
    // The 416 left the session as it was: continue and finish it.
    let r = c.req(
        "PATCH",
        &loc,
        &[("content-range", "600000-899999")],
        &data[600_000..],
    );
    assert_eq!(r.status, 202);
    let r = c.req("PUT", &format!("{loc}?digest={d}"), &[], b"");
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert!(c.get(&format!("/v2/resume/blobs/{d}")).body == data);
    // A session whose last bytes travel with the PUT, after a kill -9.
    c.req("DELETE", &format!("/v2/resume/blobs/{d}"), &[], b"");
    let loc2 = start_upload(&c, "resume");
    let r = c.req("PATCH", &loc2, &[], &data[..500_000]);
    assert_eq!(r.status, 202);
    reg.kill();
    let reg = Registry::start(&data_dir, &[]);
    let c = reg.client();
    let r = c.req(
        "PUT",
        &format!("{loc2}?digest={d}"),
        &[("content-range", "500000-899999")],
        &data[500_000..],
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert!(c.get(&format!("/v2/resume/blobs/{d}")).body == data);
    reg.stop_and_fsck();
}

#[test]
fn cut_off_request_ends_its_session() {
    use std::io::Write;
    let (_dir, reg) = start();
    let c = reg.client();
    let loc = start_upload(&c, "cut");
    assert_eq!(c.req("PATCH", &loc, &[], &noise(80, 10_000)).status, 202);
    // A PATCH that promises 100 kB, sends 1 kB, and hangs up.
    let mut s = std::net::TcpStream::connect(reg.addr).unwrap_or_else(|e| panic!("{e}"));
    write!(
        s,
        "PATCH {loc} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    )
    .unwrap_or_else(|e| panic!("{e}"));
    s.write_all(&noise(81, 1000))
        .unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(std::time::Duration::from_millis(300));
    drop(s);
    let mut code = String::new();
    for _ in 0..50 {
        code = c.get(&loc).error_code();
        if code == "BLOB_UPLOAD_UNKNOWN" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(code, "BLOB_UPLOAD_UNKNOWN");
    let m = String::from_utf8_lossy(&c.get("/metrics").body).into_owned();
    assert!(m.contains("orlop_upload_sessions 0"), "{m}");
    reg.stop_and_fsck();
}

#[test]
fn upload_edge_cases() {
    let (_dir, reg) = start();
    let c = reg.client();
    // sha512, single request and POST-then-PUT.
    let data = noise(90, 70_000);
    use sha2::Digest as _;
    let d512 = format!("sha512:{}", hex::encode(sha2::Sha512::digest(&data)));
    let r = c.req(
        "POST",
        &format!("/v2/edge/blobs/uploads/?digest={d512}"),
        &[],
        &data,
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let loc = start_upload(&c, "edge2");
    let r = c.req("PUT", &format!("{loc}?digest={d512}"), &[], &data);
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert!(c.get(&format!("/v2/edge2/blobs/{d512}")).body == data);
    // A 0-byte chunk changes nothing.
    let loc = start_upload(&c, "edge");
    assert_eq!(c.req("PATCH", &loc, &[], b"abc").status, 202);
    let r = c.req("PATCH", &loc, &[], b"");
    assert_eq!((r.status, r.header("range").as_deref()), (202, Some("0-2")));
    let r = c.req("PUT", &format!("{loc}?digest={}", digest(b"abc")), &[], b"");
    assert_eq!(r.status, 201);
    // A Content-Range that overflows is refused, not a crash.
    let loc = start_upload(&c, "edge");
    let r = c.req(
        "PATCH",
        &loc,
        &[("content-range", "0-18446744073709551615")],
        b"x",
    );
    assert_eq!(r.status, 400);
    // A PUT without a digest.
    let loc = start_upload(&c, "edge");
    assert_eq!(c.req("PUT", &loc, &[], b"x").error_code(), "DIGEST_INVALID");
    // Repository names holding the API's keywords.
    let img = Image::with_layers("kw", vec![noise(91, 1000)]);
    push_image(&c, "team/blobs/manifests/tags", "v1", &img);
    assert_pulls(&c, "team/blobs/manifests/tags", "v1", &img);
    assert_eq!(
        c.get("/v2/team/blobs/manifests/tags/tags/list").json()["tags"],
        json!(["v1"])
    );
    // Deleting a tag whose manifest another tag still uses.
    assert_eq!(
        put_manifest(
            &c,
            "team/blobs/manifests/tags",
            "v2",
            OCI_MANIFEST,
            &img.manifest
        )
        .status,
        201
    );
    assert_eq!(
        c.req(
            "DELETE",
            "/v2/team/blobs/manifests/tags/manifests/v1",
            &[],
            b""
        )
        .status,
        202
    );
    assert_pulls(&c, "team/blobs/manifests/tags", "v2", &img);
    reg.stop_and_fsck();
}

#[test]
fn referrers_paginate() {
    let (_dir, reg) = start();
    let c = reg.client();
    let img = Image::with_layers("subject", vec![noise(95, 500)]);
    push_image(&c, "refs", "v1", &img);
    let empty = b"{}".to_vec();
    push_blob(&c, "refs", &empty);
    let mut all = Vec::new();
    for i in 0..5 {
        let m = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": format!("application/x.t{}", i % 2),
            "config": descriptor("application/vnd.oci.empty.v1+json", &empty), "layers": [],
            "subject": descriptor(OCI_MANIFEST, &img.manifest),
            "annotations": {"n": i.to_string()},
        }))
        .unwrap_or_default();
        assert_eq!(
            put_manifest(&c, "refs", &digest(&m), OCI_MANIFEST, &m).status,
            201
        );
        all.push(digest(&m));
    }
    all.sort();
    let mut seen = Vec::new();
    let mut next = Some(format!("/v2/refs/referrers/{}?n=2", img.digest()));
    while let Some(path) = next.take() {
        let r = c.get(&path);
        assert_eq!(r.status, 200);
        let page = r.json()["manifests"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(page.len() <= 2);
        seen.extend(
            page.iter()
                .map(|m| m["digest"].as_str().unwrap_or_default().to_string()),
        );
        next = r.header("link").map(|l| {
            l.trim_start_matches('<')
                .split('>')
                .next()
                .unwrap_or_default()
                .to_string()
        });
    }
    assert_eq!(seen, all, "every referrer once, in order");
    let r = c.get(&format!(
        "/v2/refs/referrers/{}?n=1&artifactType=application/x.t1",
        img.digest()
    ));
    assert_eq!(r.json()["manifests"].as_array().map(Vec::len), Some(1));
    assert!(r
        .header("link")
        .is_some_and(|l| l.contains("artifactType=application%2Fx.t1")));
    reg.stop_and_fsck();
}

#[test]
fn access_log_lines_in_json() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let log = dir.path().join("serve.log");
    let env = [
        ("ORLOP_LOG", "orlop::access=info"),
        ("ORLOP_LOG_FORMAT", "json"),
    ];
    let reg = Registry::start_logged(&dir.path().join("data"), &env, &log);
    let c = reg.client();
    push_blob(&c, "logged", &noise(99, 1234));
    assert_eq!(c.get("/v2/logged/blobs/sha256:1234").status, 400);
    reg.stop();
    let text = std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{e}"));
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0]["method"], "POST");
    assert_eq!(lines[0]["route"], "upload");
    assert_eq!(lines[0]["status"], 201);
    assert_eq!(lines[0]["bytes_in"], 1234);
    assert!(lines[0]["duration_ms"].as_f64().is_some());
    assert_eq!(lines[1]["path"], "/v2/logged/blobs/sha256:1234");
    assert_eq!(lines[1]["status"], 400);
}

/// The server collects on its own: a deleted image's unshared layers (their
/// links, then the blobs), its manifest, and a deleted blob; it keeps what
/// another manifest names and an unused blob that clients keep asking for;
/// pushes work again afterwards.
#[test]
fn online_gc_collects_deleted_content() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let data = dir.path().join("data");
    let reg = Registry::start(
        &data,
        &[
            ("ORLOP_GC_INTERVAL_SECS", "1"),
            ("ORLOP_GC_GRACE_SECS", "2"),
        ],
    );
    let c = reg.client();
    let shared = noise(70, 300_000);
    let a = Image::with_layers("gc-a", vec![shared.clone(), noise(71, 150_000)]);
    let b = Image::with_layers("gc-b", vec![shared, noise(73, 5_000)]);
    push_image(&c, "gc", "a", &a);
    push_image(&c, "gc", "b", &b);
    let loose = noise(72, 200_000);
    let loose_digest = push_blob(&c, "gc", &loose);
    assert_eq!(
        c.req("DELETE", &format!("/v2/gc/blobs/{loose_digest}"), &[], b"")
            .status,
        202
    );
    // Uploaded, named by no manifest, but asked for again and again (as a
    // client does before it pushes the manifest): kept.
    let wanted = push_blob(&c, "gc", &noise(74, 1_000));
    assert_eq!(
        c.req(
            "DELETE",
            &format!("/v2/gc/manifests/{}", a.digest()),
            &[],
            b""
        )
        .status,
        202
    );
    let a_only = digest(&a.layers[1]);
    let head = |d: &str| c.req("HEAD", &format!("/v2/gc/blobs/{d}"), &[], b"").status;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    // a's manifest, a's config, a's own layer, the loose blob.
    while c.metric("orlop_gc_blobs_freed_total") < 4.0 || head(&a_only) != 404 {
        assert!(
            std::time::Instant::now() < deadline,
            "the deleted image and blob were not collected: {} freed",
            c.metric("orlop_gc_blobs_freed_total")
        );
        assert_eq!(
            head(&wanted),
            200,
            "a blob clients keep asking for was collected"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    assert!(c.metric("orlop_gc_links_removed_total") >= 2.0);
    assert!(c.metric("orlop_gc_freed_bytes_total") >= 350_000.0);
    assert_eq!(c.metric("orlop_gc_failures_total"), 0.0);
    assert_eq!(head(&loose_digest), 404);
    assert_eq!(head(&wanted), 200);
    // b still pulls byte for byte, with the layer it shared with a.
    assert_pulls(&c, "gc", "b", &b);
    // a can be pushed again from scratch and pulls byte for byte.
    push_image(&c, "gc", "a", &a);
    assert_pulls(&c, "gc", "a", &a);
    reg.stop_and_fsck();
}

/// `gc_untagged_age_secs`: an untagged image is deleted (then its layers),
/// a tagged one and a signature of it (an untagged referrer) stay.
#[test]
fn online_gc_expires_untagged_manifests() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let reg = Registry::start(
        &dir.path().join("data"),
        &[
            ("ORLOP_GC_INTERVAL_SECS", "1"),
            ("ORLOP_GC_GRACE_SECS", "1"),
            ("ORLOP_GC_UNTAGGED_AGE_SECS", "1"),
        ],
    );
    let c = reg.client();
    let tagged = Image::with_layers("kept", vec![noise(80, 50_000)]);
    push_image(&c, "u", "v1", &tagged);
    let untagged = Image::with_layers("dropped", vec![noise(81, 60_000)]);
    for b in untagged.blobs() {
        push_blob(&c, "u", b);
    }
    let r = put_manifest(
        &c,
        "u",
        &untagged.digest(),
        OCI_MANIFEST,
        &untagged.manifest,
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let empty = b"{}".to_vec();
    push_blob(&c, "u", &empty);
    push_blob(&c, "u", b"signature");
    let sig = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.dev.cosign.simplesigning.v1+json",
        "config": descriptor("application/vnd.oci.empty.v1+json", &empty),
        "layers": [descriptor("application/octet-stream", b"signature")],
        "subject": descriptor(OCI_MANIFEST, &tagged.manifest),
    }))
    .unwrap_or_default();
    let r = put_manifest(&c, "u", &digest(&sig), OCI_MANIFEST, &sig);
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));

    let status = |path: String| {
        c.req("HEAD", &path, &[("accept", OCI_MANIFEST)], b"")
            .status
    };
    let untagged_layer = digest(&untagged.layers[0]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    // Watched through metrics: a GET of the layer would renew its link.
    // Freed: the untagged manifest, its config and its layer.
    while c.metric("orlop_gc_blobs_freed_total") < 3.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the untagged image was not collected"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    assert!(c.metric("orlop_gc_untagged_manifests_deleted_total") >= 1.0);
    assert!(c.metric("orlop_gc_links_removed_total") >= 2.0);
    assert_eq!(
        status(format!("/v2/u/manifests/{}", untagged.digest())),
        404
    );
    assert_eq!(c.get(&format!("/v2/u/blobs/{untagged_layer}")).status, 404);
    assert_pulls(&c, "u", "v1", &tagged);
    assert_eq!(status(format!("/v2/u/manifests/{}", digest(&sig))), 200);
    let r = c.get(&format!("/v2/u/referrers/{}", tagged.digest()));
    assert_eq!(r.json()["manifests"].as_array().map(Vec::len), Some(1));
    reg.stop_and_fsck();
}

/// Sends a GET of `/v2/` with one extra header of `pad` bytes on a
/// connection of its own; the status line's code, or `None` when the
/// server hung up without one.
fn get_with_padded_head(addr: std::net::SocketAddr, pad: usize) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{e}"));
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("{e}"));
    let head = format!(
        "GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(pad)
    );
    // A server that stops reading at its bound may reset the connection
    // while the head is still being written.
    let _ = s.write_all(head.as_bytes());
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    let code = text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    Some(code)
}

#[test]
fn request_heads_are_bounded_on_every_connection() {
    // Every connection holds a large read buffer (1 MiB), so hyper parses
    // heads far over the 64 KiB bound: the handler holds them to it.
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let reg = Registry::start(
        &dir.path().join("data"),
        &[("ORLOP_LARGE_READ_CONNECTIONS_MAX", "1000")],
    );
    assert_eq!(get_with_padded_head(reg.addr, 60_000), Some(200));
    assert_eq!(get_with_padded_head(reg.addr, 100_000), Some(431));
    assert_eq!(get_with_padded_head(reg.addr, 900_000), Some(431));
    // The error is in the spec's format.
    let c = reg.client();
    let r = c.req("GET", "/v2/", &[("X-Pad", &"b".repeat(70_000))], b"");
    assert_eq!(r.status, 431);
    assert_eq!(r.error_code(), "UNSUPPORTED");
    // Large reads carry bodies as before.
    let data = noise(95, 3_000_000);
    let d = push_blob(&c, "heads", &data);
    assert_eq!(c.get(&format!("/v2/heads/blobs/{d}")).body, data);
    reg.stop_and_fsck();

    // With no large reads, hyper's own bound answers (or hangs up).
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let reg = Registry::start(
        &dir.path().join("data"),
        &[("ORLOP_LARGE_READ_CONNECTIONS_MAX", "0")],
    );
    assert_eq!(get_with_padded_head(reg.addr, 60_000), Some(200));
    for pad in [100_000, 900_000] {
        let code = get_with_padded_head(reg.addr, pad);
        assert!(matches!(code, None | Some(431)), "{pad}: {code:?}");
    }
    let m = String::from_utf8_lossy(&reg.client().get("/metrics").body).into_owned();
    assert!(gauge(&m, "orlop_http_connections") >= 1, "{m}");
    assert_eq!(gauge(&m, "orlop_http_connections_large_read"), 0, "{m}");
    reg.stop_and_fsck();
}

/// The value of an unlabelled gauge in a metrics page (-1 when absent).
fn gauge(metrics: &str, name: &str) -> i64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(-1)
}
