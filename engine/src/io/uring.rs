//! io_uring segment I/O. One ring shared by all files of a store, guarded by a
//! mutex; each call submits one operation and waits for its completion.
//!
//! Reads and fdatasync go through the ring. Appends use pwrite(2) (O_DIRECT
//! where allowed, in whole blocks from the segment's stage): on this kernel
//! and ext4, buffered writes submitted to io_uring are punted to io-wq
//! worker threads, which cost a thread hand-off per record; measured on the
//! ingest benchmark, the io-wq threads took about a fifth of all CPU samples
//! (docs/benchmarks.md).

use super::{open_std, DirectFd, OpenMode, SegmentFile, SegmentIo};
use io_uring::{opcode, types, IoUring};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub struct UringIo {
    ring: Arc<Ring>,
}

/// One ring, used by one operation at a time. Every operation waits for its
/// own completion (matched by `user_data`) before the buffer it names can be
/// released; if the ring ever fails in a way that leaves that unknown, it is
/// marked broken and every later operation uses plain pread/pwrite.
struct Ring {
    ring: Mutex<IoUring>,
    next_id: AtomicU64,
    broken: AtomicBool,
}

struct UringFile {
    file: File,
    ring: Arc<Ring>,
    direct: DirectFd,
}

impl UringIo {
    /// Sets up a ring and proves it works with a no-op; errors when the kernel
    /// (or a seccomp profile) refuses io_uring.
    pub fn new() -> std::io::Result<Self> {
        let ring = Arc::new(Ring {
            ring: Mutex::new(IoUring::new(64)?),
            next_id: AtomicU64::new(1),
            broken: AtomicBool::new(false),
        });
        ring.submit(opcode::Nop::new().build())?;
        Ok(UringIo { ring })
    }
}

impl Ring {
    fn usable(&self) -> bool {
        !self.broken.load(Ordering::SeqCst)
    }

    fn submit(&self, entry: io_uring::squeue::Entry) -> std::io::Result<i32> {
        let mut ring = self
            .ring
            .lock()
            .map_err(|_| std::io::Error::other("io_uring mutex poisoned"))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the buffer the entry points at outlives this call: we return
        // only after its own completion arrived, or after marking the ring
        // broken so that it is never submitted to again.
        unsafe {
            ring.submission()
                .push(&entry.user_data(id))
                .map_err(|_| std::io::Error::other("io_uring submission queue full"))?;
        }
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::Interrupted
                        || e.raw_os_error() == Some(libc::EBUSY) =>
                {
                    continue
                }
                Err(e) => {
                    self.broken.store(true, Ordering::SeqCst);
                    tracing::error!(error = %e, "io_uring failed; segment I/O falls back to pread/pwrite");
                    return Err(e);
                }
            }
            if let Some(cqe) = ring.completion().find(|c| c.user_data() == id) {
                let res = cqe.result();
                return if res < 0 {
                    Err(std::io::Error::from_raw_os_error(-res))
                } else {
                    Ok(res)
                };
            }
        }
    }
}

impl SegmentIo for UringIo {
    fn name(&self) -> &'static str {
        "io_uring"
    }
    fn open(&self, path: &Path, mode: OpenMode) -> std::io::Result<Arc<dyn SegmentFile>> {
        Ok(Arc::new(UringFile {
            file: open_std(path, mode)?,
            ring: self.ring.clone(),
            direct: DirectFd::new(path, mode),
        }))
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

impl SegmentFile for UringFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if !self.ring.usable() {
            return self.file.read_exact_at(buf, offset);
        }
        let fd = types::Fd(self.file.as_raw_fd());
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let len = rest.len().min(1 << 30) as u32;
            let e = opcode::Read::new(fd, rest.as_mut_ptr(), len)
                .offset(offset + done as u64)
                .build();
            let n = self.ring.submit(e)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            done += n as usize;
        }
        Ok(())
    }
    fn sync(&self) -> std::io::Result<()> {
        if !self.ring.usable() {
            return self.file.sync_data();
        }
        let fd = types::Fd(self.file.as_raw_fd());
        let e = opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        self.ring.submit(e).map(|_| ())
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)
    }
    fn start_writeback(&self, offset: u64, len: u64) {
        super::start_writeback(&self.file, offset, len)
    }
    fn write_direct(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.direct.write(&self.file, buf, offset)
    }
    fn read_direct(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.direct.read(&self.file, buf, offset)
    }
    fn cached(&self, offset: u64, len: u64) -> bool {
        super::range_cached(&self.file, offset, len)
    }
}
