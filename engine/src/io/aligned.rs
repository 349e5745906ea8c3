//! A block-aligned heap buffer, as O_DIRECT reads and writes need.

use std::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
use std::ptr::NonNull;

/// Alignment and granularity of direct I/O (the largest logical block size
/// of common devices; O_DIRECT needs buffer, offset and length aligned).
pub const BLOCK_BYTES: usize = 4096;

/// A zeroed, `BLOCK_BYTES`-aligned heap buffer.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is plain owned memory, accessed only through `&self`
// (shared) or `&mut self` (exclusive).
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// At least `bytes`, rounded up to whole blocks, zeroed.
    pub fn new(bytes: usize) -> AlignedBuf {
        let size = bytes.max(BLOCK_BYTES).div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
        let layout = match Layout::from_size_align(size, BLOCK_BYTES) {
            Ok(l) => l,
            // Only for sizes near isize::MAX, which no caller asks for.
            Err(_) => Layout::new::<[u8; BLOCK_BYTES]>(),
        };
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| handle_alloc_error(layout));
        AlignedBuf { ptr, layout }
    }

    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points at `layout.size()` initialised (zeroed) bytes
        // owned by this buffer.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}
