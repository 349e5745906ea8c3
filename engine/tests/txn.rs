//! Transactions: preconditions, atomicity of rows and reference deltas, and
//! durability across a reopen.

mod common;

use common::*;
use orlop_engine::{Error, Store, StoreConfig, Txn};

const CF: &str = "test_rows";

fn config(dir: &std::path::Path) -> StoreConfig {
    let mut c = small_config(dir);
    c.extra_column_families = vec![CF.to_string()];
    c
}

fn ok<T>(r: Result<T, Error>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn refs(s: &Store, d: &orlop_engine::Digest) -> u64 {
    ok(s.stat(d))
        .map(|i| i.refs)
        .unwrap_or_else(|| panic!("no blob"))
}

#[test]
fn txn_applies_rows_and_refs_together() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let c = config(dir.path());
    let s = open(&c);
    let a = ok(s.put(&noise(1, 10_000), None)).digest;
    let b = ok(s.put(&noise(2, 10_000), None)).digest;

    let mut t = Txn::new();
    t.expect(CF, b"tag", None);
    t.put(CF, b"tag", a.to_string());
    t.add_ref(&a);
    t.add_ref(&a);
    t.add_ref(&b);
    ok(s.apply(t));
    assert_eq!(refs(&s, &a), 2);
    assert_eq!(refs(&s, &b), 1);
    assert_eq!(ok(s.kv_get(CF, b"tag")), Some(a.to_string().into_bytes()));

    // A failed precondition changes nothing: neither rows nor counts.
    let mut t = Txn::new();
    t.expect(CF, b"tag", None);
    t.put(CF, b"tag", b.to_string());
    t.add_ref(&b);
    assert!(matches!(s.apply(t), Err(Error::Conflict { .. })));
    assert_eq!(refs(&s, &b), 1);
    assert_eq!(ok(s.kv_get(CF, b"tag")), Some(a.to_string().into_bytes()));

    // An underflow on one digest fails the whole transaction.
    let mut t = Txn::new();
    t.delete(CF, b"tag");
    t.drop_ref(&a);
    t.drop_ref(&b);
    t.drop_ref(&b);
    assert!(matches!(s.apply(t), Err(Error::RefUnderflow(_))));
    assert_eq!(refs(&s, &a), 2);
    assert!(ok(s.kv_get(CF, b"tag")).is_some());

    // An unknown blob fails it too.
    let mut t = Txn::new();
    t.put(CF, b"x", b"y".to_vec());
    t.add_ref(&orlop_engine::Digest::sha256_of(b"never stored"));
    assert!(matches!(s.apply(t), Err(Error::BlobUnknown(_))));
    assert_eq!(ok(s.kv_get(CF, b"x")), None);

    // A matching precondition on a value.
    let mut t = Txn::new();
    t.expect(CF, b"tag", Some(a.to_string().into_bytes()));
    t.put(CF, b"tag", b.to_string());
    t.drop_ref(&a);
    t.add_ref(&b);
    ok(s.apply(t));
    drop(s);

    let s = open(&c);
    assert_eq!(refs(&s, &a), 1);
    assert_eq!(refs(&s, &b), 2);
    assert_eq!(ok(s.kv_get(CF, b"tag")), Some(b.to_string().into_bytes()));
    assert_clean(&s);
}

#[test]
fn kv_scan_pages_by_prefix() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = open(&config(dir.path()));
    let mut t = Txn::new();
    for k in ["a/1", "a/2", "a/3", "b/1", "a0"] {
        t.put(CF, k.as_bytes().to_vec(), k.as_bytes().to_vec());
    }
    ok(s.apply(t));
    let keys = |after: Option<&[u8]>, n| -> Vec<String> {
        ok(s.kv_scan(CF, b"a/", after, n))
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
            .collect()
    };
    assert_eq!(keys(None, 10), ["a/1", "a/2", "a/3"]);
    assert_eq!(keys(None, 2), ["a/1", "a/2"]);
    assert_eq!(keys(Some(b"a/2"), 10), ["a/3"]);
    assert_eq!(keys(Some(b"a/3"), 10), Vec::<String>::new());
    assert!(matches!(
        s.kv_scan("nope", b"", None, 1),
        Err(Error::UnknownColumnFamily(_))
    ));
}

#[test]
fn concurrent_txns_keep_counts_exact() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = std::sync::Arc::new(open(&config(dir.path())));
    let d = ok(s.put(&noise(9, 5000), None)).digest;
    // Eight threads race to claim the same row; each success adds a ref.
    let wins: usize = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let (s, d) = (s.clone(), d.clone());
                sc.spawn(move || {
                    let mut won = 0;
                    for round in 0..20u32 {
                        let key = format!("row{round}");
                        let mut t = Txn::new();
                        t.expect(CF, key.clone(), None);
                        t.put(CF, key, format!("{i}"));
                        t.add_ref(&d);
                        match s.apply(t) {
                            Ok(()) => won += 1,
                            Err(Error::Conflict { .. }) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                    won
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| panic!("thread")))
            .sum()
    });
    assert_eq!(wins, 20, "each row is claimed exactly once");
    assert_eq!(refs(&s, &d), 20);
}
