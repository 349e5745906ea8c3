use super::{open_std, DirectFd, OpenMode, SegmentFile, SegmentIo};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// pread/pwrite/fdatasync on plain files. Always available.
#[derive(Debug, Default, Clone, Copy)]
pub struct PreadIo;

struct PreadFile(File, DirectFd);

impl SegmentIo for PreadIo {
    fn name(&self) -> &'static str {
        "pread"
    }
    fn open(&self, path: &Path, mode: OpenMode) -> std::io::Result<Arc<dyn SegmentFile>> {
        Ok(Arc::new(PreadFile(
            open_std(path, mode)?,
            DirectFd::new(path, mode),
        )))
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

impl SegmentFile for PreadFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn start_writeback(&self, offset: u64, len: u64) {
        super::start_writeback(&self.0, offset, len)
    }
    fn write_direct(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.1.write(&self.0, buf, offset)
    }
    fn read_direct(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.1.read(&self.0, buf, offset)
    }
    fn cached(&self, offset: u64, len: u64) -> bool {
        super::range_cached(&self.0, offset, len)
    }
}
