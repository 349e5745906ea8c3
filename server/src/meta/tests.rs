//! Registry rows against a real store: a manifest push renews only links
//! old enough to need it, so pushes that share layers do not contend.

use super::codec::ManifestMeta;
use super::*;
use crate::names::RepoName;

fn registry(dir: &std::path::Path, touch_after_ms: u64) -> Registry {
    let mut cfg = orlop_engine::StoreConfig::new(dir);
    cfg.key = orlop_engine::KeySource::Bytes([3; 32]);
    cfg.extra_column_families = REGISTRY_CFS.iter().map(|c| c.to_string()).collect();
    let store = Arc::new(Store::open(cfg).unwrap_or_else(|e| panic!("{e}")));
    Registry::new(store).with_link_touch_after_ms(touch_after_ms)
}

fn manifest_naming(d: &Digest, n: u8) -> NewManifest {
    let body = [n; 40];
    NewManifest {
        digest: Digest::sha256_of(&body),
        meta: ManifestMeta {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: 40,
            created_unix_ms: now_unix_ms(),
            parents: 0,
            tags: 0,
            blobs: vec![d.clone()],
            manifests: vec![],
            subject: None,
            artifact_type: None,
        },
        blob_sizes: vec![(d.clone(), None)],
        child_sizes: vec![],
        referrer: None,
    }
}

#[test]
fn a_manifest_push_renews_only_an_old_link() {
    for (touch_after_ms, renewed) in [(3_600_000, false), (0, true)] {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let reg = registry(dir.path(), touch_after_ms);
        let repo = RepoName::parse("rows/app").unwrap_or_else(|e| panic!("{e}"));
        let layer = reg
            .store()
            .put(b"a layer", None)
            .unwrap_or_else(|e| panic!("{e}"))
            .digest;
        reg.link_blob(&repo, &layer)
            .unwrap_or_else(|e| panic!("{e}"));
        let key = rkey(&repo, &layer.to_key());
        let before = reg.get(CF_LINKS, &key).unwrap_or_else(|e| panic!("{e}"));
        std::thread::sleep(std::time::Duration::from_millis(5));
        let m = manifest_naming(&layer, 1);
        // The manifest's own bytes are stored as a blob first.
        reg.store()
            .put(&[1u8; 40], Some(m.digest.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        reg.put_manifest(&repo, &m, None)
            .unwrap_or_else(|e| panic!("{e}"));
        let after = reg.get(CF_LINKS, &key).unwrap_or_else(|e| panic!("{e}"));
        assert!(after.is_some());
        assert_eq!(before != after, renewed, "touch_after_ms {touch_after_ms}");
        assert!(reg
            .audit_refs()
            .unwrap_or_else(|e| panic!("{e}"))
            .is_empty());
    }
}
