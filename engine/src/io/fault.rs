//! A fault-injecting segment I/O for tests and the simulator.
//!
//! It wraps real files and remembers, per file, how much is durable. It can
//! tear writes (a prefix lands, then EIO), fail fsync with EIO, flip bits on
//! read, and simulate a crash: every file loses a random part of what was
//! written since its last sync (possibly leaving a torn, garbled tail, and
//! a hole of zeros where an earlier write was lost and a later one landed),
//! and files created since their directory was last synced may vanish. All
//! decisions come from one seeded generator, so a seed replays a failure.

use super::{open_std, OpenMode, SegmentFile, SegmentIo};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Fault rates, in faults per million operations.
#[derive(Clone, Copy, Debug, Default)]
pub struct FaultConfig {
    pub torn_write_ppm: u32,
    pub sync_eio_ppm: u32,
    pub read_bitflip_ppm: u32,
}

#[derive(Default)]
struct FileState {
    durable_len: u64,
}

struct State {
    rng: SmallRng,
    cfg: FaultConfig,
    files: HashMap<PathBuf, FileState>,
    created_unsynced: HashSet<PathBuf>,
    faults_injected: u64,
}

#[derive(Clone)]
pub struct FaultIo {
    state: Arc<Mutex<State>>,
    generation: Arc<AtomicU64>,
}

struct FaultFile {
    file: File,
    path: PathBuf,
    state: Arc<Mutex<State>>,
    generation: Arc<AtomicU64>,
    opened_in: u64,
}

fn lock(s: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding this lock only happens in a failing test; keep going.
    s.lock().unwrap_or_else(|p| p.into_inner())
}

fn eio() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EIO)
}

impl FaultIo {
    pub fn new(seed: u64, cfg: FaultConfig) -> Self {
        FaultIo {
            state: Arc::new(Mutex::new(State {
                rng: SmallRng::seed_from_u64(seed),
                cfg,
                files: HashMap::new(),
                created_unsynced: HashSet::new(),
                faults_injected: 0,
            })),
            generation: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn set_config(&self, cfg: FaultConfig) {
        lock(&self.state).cfg = cfg;
    }

    pub fn faults_injected(&self) -> u64 {
        lock(&self.state).faults_injected
    }

    /// Simulates power loss. Handles opened before the crash fail from now on.
    /// Returns the number of bytes lost across all files.
    pub fn crash(&self) -> std::io::Result<u64> {
        self.generation.fetch_add(1, Ordering::SeqCst);
        let mut st = lock(&self.state);
        let st = &mut *st;
        let mut lost = 0;
        for path in std::mem::take(&mut st.created_unsynced) {
            if st.rng.gen_bool(0.5) && path.exists() {
                lost += std::fs::metadata(&path)?.len();
                std::fs::remove_file(&path)?;
                st.files.remove(&path);
            }
        }
        for (path, fs) in st.files.iter_mut() {
            let f = match open_std(path, OpenMode::ReadWrite) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let len = f.metadata()?.len();
            if len <= fs.durable_len {
                fs.durable_len = len;
                continue;
            }
            let unsynced = len - fs.durable_len;
            let keep = if st.rng.gen_bool(0.5) {
                0
            } else {
                st.rng.gen_range(0..=unsynced)
            };
            if keep > 0 && st.rng.gen_bool(0.3) {
                // A torn sector: garble a few bytes of what survived.
                for _ in 0..4 {
                    let at = fs.durable_len + st.rng.gen_range(0..keep);
                    f.write_all_at(&[st.rng.gen()], at)?;
                }
            }
            if keep > 0 && st.rng.gen_bool(0.3) {
                lost += punch_hole(&f, &mut st.rng, fs.durable_len, fs.durable_len + keep)?;
            }
            f.set_len(fs.durable_len + keep)?;
            f.sync_all()?;
            lost += unsynced - keep;
            fs.durable_len += keep;
        }
        Ok(lost)
    }
}

/// Blocks of a hole a crash leaves, at most.
const HOLE_BLOCKS_MAX: u64 = 256;

/// Unsynced writes reach the disk in any order, so a crash can keep a later
/// write and lose an earlier one: zeros (what a file extended past never
/// written blocks reads as) over whole 4 KiB blocks somewhere in
/// `[from, to)`, the unsynced part that survived, with bytes after them.
/// Returns the bytes zeroed.
fn punch_hole(f: &File, rng: &mut SmallRng, from: u64, to: u64) -> std::io::Result<u64> {
    const BLOCK: u64 = 4096;
    let first = from.div_ceil(BLOCK);
    let end = to / BLOCK;
    if first >= end {
        return Ok(0);
    }
    let at = rng.gen_range(first..end);
    let blocks = rng.gen_range(1..=(end - at).min(HOLE_BLOCKS_MAX));
    let zeros = vec![0u8; (blocks * BLOCK) as usize];
    f.write_all_at(&zeros, at * BLOCK)?;
    Ok(blocks * BLOCK)
}

impl SegmentIo for FaultIo {
    fn name(&self) -> &'static str {
        "fault"
    }
    fn open(&self, path: &Path, mode: OpenMode) -> std::io::Result<Arc<dyn SegmentFile>> {
        let existed = path.exists();
        let file = open_std(path, mode)?;
        let len = file.metadata()?.len();
        let mut st = lock(&self.state);
        if !existed {
            st.created_unsynced.insert(path.to_path_buf());
        }
        st.files
            .entry(path.to_path_buf())
            .or_insert(FileState { durable_len: len });
        Ok(Arc::new(FaultFile {
            file,
            path: path.to_path_buf(),
            state: self.state.clone(),
            generation: self.generation.clone(),
            opened_in: self.generation.load(Ordering::SeqCst),
        }))
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        File::open(dir)?.sync_all()?;
        lock(&self.state)
            .created_unsynced
            .retain(|p| p.parent() != Some(dir));
        Ok(())
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        let mut st = lock(&self.state);
        st.files.remove(path);
        st.created_unsynced.remove(path);
        std::fs::remove_file(path)
    }
}

impl FaultFile {
    fn check_alive(&self) -> std::io::Result<()> {
        if self.generation.load(Ordering::SeqCst) != self.opened_in {
            return Err(std::io::Error::other(
                "file handle from before a simulated crash",
            ));
        }
        Ok(())
    }
}

fn roll(st: &mut State, ppm: u32) -> bool {
    ppm > 0 && st.rng.gen_range(0..1_000_000) < ppm
}

impl SegmentFile for FaultFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.check_alive()?;
        let mut st = lock(&self.state);
        let tp = st.cfg.torn_write_ppm;
        if roll(&mut st, tp) && !buf.is_empty() {
            st.faults_injected += 1;
            let n = st.rng.gen_range(0..buf.len());
            self.file.write_all_at(&buf[..n], offset)?;
            return Err(eio());
        }
        self.file.write_all_at(buf, offset)
    }
    /// Half the spans (by their 64 KiB block) count as in the page cache, so
    /// the read pool's page-cache branch runs under the same faults as its
    /// direct one. Decided by the offset alone: no draw from the seeded
    /// generator, so a seed replays the same faults whatever the reads.
    fn cached(&self, offset: u64, _len: u64) -> bool {
        (offset >> 16) % 2 == 1
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.check_alive()?;
        self.file.read_exact_at(buf, offset)?;
        let mut st = lock(&self.state);
        let bp = st.cfg.read_bitflip_ppm;
        if roll(&mut st, bp) && !buf.is_empty() {
            st.faults_injected += 1;
            let i = st.rng.gen_range(0..buf.len());
            let bit = st.rng.gen_range(0..8);
            buf[i] ^= 1 << bit;
        }
        Ok(())
    }
    fn sync(&self) -> std::io::Result<()> {
        self.check_alive()?;
        let mut st = lock(&self.state);
        let sp = st.cfg.sync_eio_ppm;
        if roll(&mut st, sp) {
            st.faults_injected += 1;
            return Err(eio());
        }
        self.file.sync_data()?;
        let len = self.file.metadata()?.len();
        st.files.entry(self.path.clone()).or_default().durable_len = len;
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        self.check_alive()?;
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check_alive()?;
        self.file.set_len(len)?;
        let mut st = lock(&self.state);
        let fs = st.files.entry(self.path.clone()).or_default();
        fs.durable_len = fs.durable_len.min(len);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hole lands on whole blocks inside the unsynced range only, and
    /// leaves what follows it.
    #[test]
    fn holes_stay_inside_the_unsynced_range() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("f");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut rng = SmallRng::seed_from_u64(9);
        let (from, to) = (5000u64, 200_000u64);
        let mut saw_bytes_after = false;
        for _ in 0..200 {
            f.write_all_at(&[0xAB; 210_000], 0)
                .unwrap_or_else(|e| panic!("{e}"));
            let zeroed = punch_hole(&f, &mut rng, from, to).unwrap_or_else(|e| panic!("{e}"));
            let mut b = vec![0u8; 210_000];
            f.read_exact_at(&mut b, 0).unwrap_or_else(|e| panic!("{e}"));
            let zeros: Vec<usize> = (0..b.len()).filter(|&i| b[i] == 0).collect();
            assert_eq!(zeros.len() as u64, zeroed);
            assert!(zeroed > 0 && zeroed.is_multiple_of(4096));
            let (lo, hi) = (zeros[0] as u64, *zeros.last().unwrap_or(&0) as u64 + 1);
            assert!(
                lo >= from && hi <= to && lo.is_multiple_of(4096),
                "{lo}..{hi}"
            );
            assert_eq!(hi - lo, zeroed, "one run of zeros");
            saw_bytes_after |= b[hi as usize..to as usize].contains(&0xAB);
        }
        assert!(saw_bytes_after);
        // No whole block inside the range: nothing to punch.
        assert_eq!(punch_hole(&f, &mut rng, 4097, 8191).unwrap_or(1), 0);
    }
}
