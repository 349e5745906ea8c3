//! Segment I/O behind a small trait, so tests can inject faults.
//!
//! Three implementations: [`PreadIo`] (pread/pwrite, always works),
//! [`UringIo`] (io_uring, when the kernel allows it) and [`FaultIo`]
//! (torn writes, lost unsynced data, bit flips, EIO; seeded and replayable).

mod aligned;
mod fault;
mod pread;
mod uring;

pub use aligned::{AlignedBuf, BLOCK_BYTES};
pub use fault::{FaultConfig, FaultIo};
pub use pread::PreadIo;
pub use uring::UringIo;

use crate::error::{Error, Result};
use std::path::Path;
use std::sync::Arc;

/// One open segment file. (`len` is a file's length, and a file is not a
/// collection: no `is_empty`.)
#[allow(clippy::len_without_is_empty)]
pub trait SegmentFile: Send + Sync {
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    /// Fills all of `buf` from `offset`; a short file is `UnexpectedEof`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    /// Makes every completed write durable (fdatasync).
    fn sync(&self) -> std::io::Result<()>;
    /// The file's length in bytes.
    fn len(&self) -> std::io::Result<u64>;
    fn set_len(&self, len: u64) -> std::io::Result<()>;
    /// Starts writeback of a written range without waiting for it, so that a
    /// later `sync` has little left to do. A hint: errors are ignored.
    fn start_writeback(&self, _offset: u64, _len: u64) {}
    /// Writes all of `buf` at `offset`, bypassing the page cache (O_DIRECT)
    /// where the file system allows it, and as `write_at` elsewhere. The
    /// caller aligns `buf` (in memory), `offset` and the length to 4096.
    fn write_direct(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.write_at(buf, offset)
    }
    /// Fills all of `buf` from `offset`, bypassing the page cache
    /// (O_DIRECT) where the file system allows it, and as `read_at`
    /// elsewhere; a short file is `UnexpectedEof`. The caller aligns `buf`
    /// (in memory), `offset` and the length to 4096.
    fn read_direct(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.read_at(buf, offset)
    }
    /// Whether the page cache holds every page of `[offset, offset + len)`
    /// (so that `read_at` would not touch the disk); false where unknown.
    fn cached(&self, _offset: u64, _len: u64) -> bool {
        false
    }
}

/// A second descriptor of a file, opened with O_DIRECT on its first direct
/// read or write; where the file system refuses O_DIRECT (tmpfs, some
/// FUSE), direct reads and writes become plain ones through the file's own
/// descriptor. A failure to open that may pass (no descriptor free: EMFILE,
/// ENFILE; no memory) is not remembered: that one operation goes through
/// the plain descriptor and the next one tries again.
pub(crate) struct DirectFd {
    path: std::path::PathBuf,
    writable: bool,
    fd: std::sync::OnceLock<Option<std::fs::File>>,
}

/// Whether a failed O_DIRECT open may succeed later (a process or system
/// out of descriptors or memory), rather than say the file system refuses.
fn open_may_pass(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EINTR | libc::EAGAIN)
    )
}

/// Logs at most one warning per `interval_ms`, counting the ones it holds back.
pub(crate) struct WarnLimit {
    interval_ms: u64,
    /// When the last warning was let through, plus one (0: never).
    last_ms: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
}

impl WarnLimit {
    pub const fn new(interval_ms: u64) -> Self {
        WarnLimit {
            interval_ms,
            last_ms: std::sync::atomic::AtomicU64::new(0),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// At `now_ms`: Some(warnings held back since the last one) when this
    /// one may be logged, else None (and it is counted).
    pub fn allow(&self, now_ms: u64) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let last = self.last_ms.load(Relaxed);
        let due = last == 0 || now_ms + 1 >= last.saturating_add(self.interval_ms);
        if due
            && self
                .last_ms
                .compare_exchange(last, now_ms + 1, Relaxed, Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Relaxed));
        }
        self.suppressed.fetch_add(1, Relaxed);
        None
    }
}

/// Failed O_DIRECT opens that may pass: warned of once per 10 s.
static OPEN_MAY_PASS_WARNINGS: WarnLimit = WarnLimit::new(10_000);

/// Milliseconds since the first call (a monotonic clock for rate limits).
fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

impl DirectFd {
    pub fn new(path: &Path, mode: OpenMode) -> Self {
        DirectFd {
            path: path.to_path_buf(),
            writable: mode != OpenMode::ReadOnly,
            fd: std::sync::OnceLock::new(),
        }
    }

    fn fd(&self) -> Option<&std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(known) = self.fd.get() {
            return known.as_ref();
        }
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(self.writable)
            .custom_flags(libc::O_DIRECT)
            .open(&self.path);
        let known = match opened {
            Ok(f) => Some(f),
            Err(e) if open_may_pass(&e) => {
                // While descriptors stay short every direct read and write
                // lands here: one warning per interval, with a count.
                if let Some(suppressed) = OPEN_MAY_PASS_WARNINGS.allow(monotonic_ms()) {
                    tracing::warn!(path = %self.path.display(), error = %e, suppressed, "O_DIRECT descriptor not opened this time; reading and writing through the page cache (`suppressed`: like warnings not logged since the last)");
                }
                return None;
            }
            Err(e) => {
                tracing::info!(path = %self.path.display(), error = %e, "O_DIRECT refused; this segment's I/O goes through the page cache");
                None
            }
        };
        // Another thread may have opened it meanwhile: keep the first.
        self.fd.get_or_init(|| known).as_ref()
    }

    pub fn write(&self, plain: &std::fs::File, buf: &[u8], offset: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        match self.fd() {
            Some(f) => match f.write_all_at(buf, offset) {
                // Alignment this file system does not accept: write plainly.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => plain.write_all_at(buf, offset),
                r => r,
            },
            None => plain.write_all_at(buf, offset),
        }
    }

    pub fn read(&self, plain: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        match self.fd() {
            Some(f) => match f.read_exact_at(buf, offset) {
                // Alignment this file system does not accept, or a file
                // that ends inside the last block (the short read leaves an
                // unaligned remainder): read plainly, which reports a short
                // file as UnexpectedEof.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    plain.read_exact_at(buf, offset)
                }
                r => r,
            },
            None => plain.read_exact_at(buf, offset),
        }
    }
}

/// The system's page size, asked once.
fn page_bytes() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    // SAFETY: sysconf reads a constant of the system.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    })
}

/// cachestat(2) (Linux 6.5): whether the page cache holds every page of the
/// range. False where the kernel lacks the call (remembered) or it fails.
pub(crate) fn range_cached(file: &std::fs::File, offset: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    /// The same number on every architecture (the generic syscall table).
    const SYS_CACHESTAT: libc::c_long = 451;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    static MISSING: AtomicBool = AtomicBool::new(false);
    if len == 0 || MISSING.load(Ordering::Relaxed) {
        return false;
    }
    let range = Range { off: offset, len };
    let mut stat = Stat::default();
    // SAFETY: both pointers are to live, properly laid out structs; the
    // kernel writes only `stat`.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    if r != 0 {
        // Not in this kernel, or refused (a seccomp filter): not asked again.
        if matches!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOSYS | libc::EPERM)
        ) {
            MISSING.store(true, Ordering::Relaxed);
        }
        return false;
    }
    let page = page_bytes();
    let pages = (offset + len).div_ceil(page) - offset / page;
    stat.nr_cache >= pages
}

/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`: queue dirty pages for writeback.
pub(crate) fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an open descriptor; no memory is passed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Opens segment files and syncs directories.
pub trait SegmentIo: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn open(&self, path: &Path, mode: OpenMode) -> std::io::Result<Arc<dyn SegmentFile>>;
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()>;
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        std::fs::remove_file(path)
    }
}

/// How a segment file is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Create a new file; fails if it exists.
    Create,
    ReadWrite,
    ReadOnly,
}

pub(crate) fn open_std(path: &Path, mode: OpenMode) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(mode != OpenMode::ReadOnly)
        .create_new(mode == OpenMode::Create)
        .open(path)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Picks the backend: io_uring when the kernel allows it, else pread/pwrite.
pub fn auto() -> Arc<dyn SegmentIo> {
    match UringIo::new() {
        Ok(u) => Arc::new(u),
        Err(e) => {
            tracing::info!(error = %e, "io_uring unavailable; using pread/pwrite for segment I/O");
            Arc::new(PreadIo)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::WarnLimit;

    #[test]
    fn warnings_are_limited_per_interval_and_counted() {
        let w = WarnLimit::new(1000);
        assert_eq!(w.allow(0), Some(0));
        assert_eq!(w.allow(1), None);
        assert_eq!(w.allow(999), None);
        assert_eq!(w.allow(1000), Some(2));
        assert_eq!(w.allow(1500), None);
        assert_eq!(w.allow(5000), Some(1));
        assert_eq!(w.allow(5000), None);
    }
}
