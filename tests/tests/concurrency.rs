//! Many clients pushing images that share layers into one repository at
//! once (a CI fleet rebuilding from one base): every push succeeds, none is
//! refused for contention on the shared layers' rows, and the reference
//! counts stay exact.

use orlop_tests::oci::*;
use orlop_tests::registry::Registry;
use std::sync::Arc;

#[test]
fn concurrent_pushes_sharing_layers_all_succeed() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let reg = Registry::start(&dir.path().join("data"), &[]);
    let base = Arc::new(noise(400, 50_000));
    let c = reg.client();
    push_blob(&c, "fleet/app", &base);
    let addr = reg.addr;
    let workers: Vec<_> = (0..16u64)
        .map(|w| {
            let base = base.clone();
            std::thread::spawn(move || {
                let c = orlop_tests::registry::Client::new(addr);
                let mut images = Vec::new();
                for i in 0..10u64 {
                    // Same base layer, same config shape, own manifest.
                    let img = Image::with_layers(&format!("w{w}-{i}"), vec![(*base).clone()]);
                    push_blob(&c, "fleet/app", &img.config);
                    let tag = format!("w{w}-{i}");
                    let r = put_manifest(&c, "fleet/app", &tag, OCI_MANIFEST, &img.manifest);
                    assert_eq!(
                        r.status,
                        201,
                        "push {tag}: {}",
                        String::from_utf8_lossy(&r.body)
                    );
                    images.push((tag, img));
                }
                images
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.join().unwrap_or_else(|_| panic!("a pusher failed")));
    }
    assert_eq!(all.len(), 160);
    for (tag, img) in all.iter().step_by(7) {
        assert_pulls(&c, "fleet/app", tag, img);
    }
    reg.stop_and_fsck();
}
