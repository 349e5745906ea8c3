//! io_uring segment I/O. One ring shared by all files of a store, guarded by a
//! mutex; each call submits one operation and waits for its completion.

use super::{open_std, OpenMode, SegmentFile, SegmentIo};
use io_uring::{opcode, types, IoUring};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

pub struct UringIo {
    ring: Arc<Mutex<IoUring>>,
}

struct UringFile {
    file: File,
    ring: Arc<Mutex<IoUring>>,
}

impl UringIo {
    /// Sets up a ring and proves it works with a no-op; errors when the kernel
    /// (or a seccomp profile) refuses io_uring.
    pub fn new() -> std::io::Result<Self> {
        let ring = IoUring::new(64)?;
        let u = UringIo {
            ring: Arc::new(Mutex::new(ring)),
        };
        submit(&u.ring, opcode::Nop::new().build())?;
        Ok(u)
    }
}

fn submit(ring: &Mutex<IoUring>, entry: io_uring::squeue::Entry) -> std::io::Result<i32> {
    let mut ring = ring
        .lock()
        .map_err(|_| std::io::Error::other("io_uring mutex poisoned"))?;
    // SAFETY: the buffers an entry points at outlive this call, which waits for
    // the completion before returning.
    unsafe {
        ring.submission()
            .push(&entry.user_data(1))
            .map_err(|_| std::io::Error::other("io_uring submission queue full"))?;
    }
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| std::io::Error::other("io_uring returned no completion"))?;
    let res = cqe.result();
    if res < 0 {
        Err(std::io::Error::from_raw_os_error(-res))
    } else {
        Ok(res)
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
        }))
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

impl SegmentFile for UringFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let fd = types::Fd(self.file.as_raw_fd());
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &buf[done..];
            let len = rest.len().min(1 << 30) as u32;
            let e = opcode::Write::new(fd, rest.as_ptr(), len)
                .offset(offset + done as u64)
                .build();
            let n = submit(&self.ring, e)?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            done += n as usize;
        }
        Ok(())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let fd = types::Fd(self.file.as_raw_fd());
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let len = rest.len().min(1 << 30) as u32;
            let e = opcode::Read::new(fd, rest.as_mut_ptr(), len)
                .offset(offset + done as u64)
                .build();
            let n = submit(&self.ring, e)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            done += n as usize;
        }
        Ok(())
    }
    fn sync(&self) -> std::io::Result<()> {
        let fd = types::Fd(self.file.as_raw_fd());
        let e = opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        submit(&self.ring, e).map(|_| ())
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)
    }
}
