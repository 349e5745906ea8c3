//! A segment file's O_DIRECT descriptor: a failure to open it that may pass
//! (the process out of descriptors) falls back to the plain descriptor for
//! that read only; once descriptors are free, direct reads open it again.
//!
//! One test in its own binary: it lowers the process's descriptor limit,
//! which would disturb tests running beside it.

use orlop_engine::io::{AlignedBuf, OpenMode, PreadIo, SegmentIo, UringIo};
use std::path::Path;

/// Descriptors of this process open on `path`.
fn fds_on(path: &Path) -> usize {
    let want = std::fs::canonicalize(path).unwrap_or_else(|e| panic!("{e}"));
    std::fs::read_dir("/proc/self/fd")
        .unwrap_or_else(|e| panic!("{e}"))
        .filter_map(|d| std::fs::read_link(d.ok()?.path()).ok())
        .filter(|t| *t == want)
        .count()
}

fn nofile() -> libc::rlimit {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
    r
}

fn set_nofile(r: &libc::rlimit) {
    // SAFETY: setrlimit reads the struct it is given.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, r) }, 0);
}

#[test]
fn direct_descriptor_is_retried_after_running_out_of_descriptors() {
    // On the build's disk: tmpfs refuses O_DIRECT for good.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap_or_else(|e| panic!("{e}"));
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let mut backends: Vec<(&str, Box<dyn SegmentIo>)> = vec![("pread", Box::new(PreadIo))];
    // Where the kernel allows io_uring.
    if let Ok(u) = UringIo::new() {
        backends.push(("uring", Box::new(u)));
    }
    for (name, io) in backends {
        let path = dir.path().join(name);
        std::fs::write(&path, &data).unwrap_or_else(|e| panic!("{e}"));
        let file = io
            .open(&path, OpenMode::ReadOnly)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(fds_on(&path), 1, "{name}: one plain descriptor");

        // Use up every descriptor under a lowered limit.
        let saved = nofile();
        let open_now = std::fs::read_dir("/proc/self/fd").map_or(64, |d| d.count()) as u64;
        set_nofile(&libc::rlimit {
            rlim_cur: (open_now + 16).min(saved.rlim_max),
            rlim_max: saved.rlim_max,
        });
        let mut filler = Vec::new();
        loop {
            match std::fs::File::open("/dev/null") {
                Ok(f) => filler.push(f),
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "{e}");
                    break;
                }
            }
            assert!(filler.len() < 4096, "the lowered limit did not hold");
        }
        let mut buf = AlignedBuf::new(data.len());
        let read = file.read_direct(buf.as_mut_slice(), 0);
        drop(filler);
        set_nofile(&saved);
        read.unwrap_or_else(|e| panic!("{name}: read without a descriptor to spare: {e}"));
        assert_eq!(
            buf.as_slice(),
            &data[..],
            "{name}: the fallback read the file"
        );
        assert_eq!(fds_on(&path), 1, "{name}: no direct descriptor yet");

        // Descriptors are free again: the next direct read opens one.
        buf.as_mut_slice().fill(0);
        file.read_direct(buf.as_mut_slice(), 0)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(buf.as_slice(), &data[..], "{name}: the direct read");
        assert_eq!(fds_on(&path), 2, "{name}: the direct descriptor is open");
    }
}
