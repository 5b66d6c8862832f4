//! An in-memory block driver for tests: a `Vec<u8>` image with a hole map, backing-chain
//! depths a test can set, counters of what reached it, and ways to hold requests in flight.

use async_trait::async_trait;
use block_core::{BlockDriver, BlockError, Extent, SgList, WriteFlags, ZeroFlags};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Allocation (and depth) is tracked per block of this size.
pub const BLOCK: u64 = 4096;

#[derive(Debug, Default)]
struct Image {
    bytes: Vec<u8>,
    /// Per block: allocated (data) or a hole (reads as zeroes).
    allocated: Vec<bool>,
    /// Per block: the backing chain depth reported instead of the default (1 if allocated,
    /// else 0); 0 keeps the default.
    depths: Vec<u32>,
}

impl Image {
    fn resize(&mut self, size: u64) {
        let blocks = size.div_ceil(BLOCK) as usize;
        self.bytes.resize(size as usize, 0);
        self.allocated.resize(blocks, false);
        self.depths.resize(blocks, 0);
    }

    /// Every block that `[offset, offset + len)` touches becomes allocated.
    fn allocate(&mut self, offset: u64, len: u64) {
        for b in offset / BLOCK..(offset + len).div_ceil(BLOCK) {
            self.allocated[b as usize] = true;
        }
    }

    /// Zeroes the range; with `unmap`, the blocks it covers completely become holes (partial
    /// blocks stay allocated, zeroed), else every block it touches is allocated.
    fn zero(&mut self, offset: u64, len: u64, unmap: bool) {
        self.bytes[offset as usize..(offset + len) as usize].fill(0);
        if unmap {
            for b in offset.div_ceil(BLOCK)..(offset + len) / BLOCK {
                self.allocated[b as usize] = false;
            }
        } else {
            self.allocate(offset, len);
        }
    }

    /// (allocated, depth) of block `b`.
    fn status(&self, b: usize) -> (bool, u32) {
        let allocated = self.allocated[b];
        let depth = match self.depths[b] {
            0 => u32::from(allocated),
            d => d,
        };
        (allocated, depth)
    }
}

/// An image in memory behind a lock. Reads, writes, flush, discard, write-zeroes (fast only
/// where it unmaps, unless [`MemDriver::slow_zeroes`] refuses every fast zeroing), block
/// status with depths, resize.
#[derive(Debug)]
pub struct MemDriver {
    image: Mutex<Image>,
    read_only: bool,
    alignment: u32,
    /// Flushes that reached the driver.
    pub flushes: AtomicU64,
    flushed: Condvar,
    /// Writes that came with FUA.
    pub fua_writes: AtomicU64,
    /// The largest write request seen.
    pub max_write: AtomicU64,
    /// Refuse every fast zeroing (as a driver that cannot deallocate).
    pub slow_zeroes: AtomicBool,
    /// Reads at this offset wait for a permit of [`MemDriver::gate`] (to hold a request in
    /// flight).
    pub gated_offset: Option<u64>,
    /// See [`MemDriver::gated_offset`].
    pub gate: tokio::sync::Semaphore,
    read_barrier: Mutex<Option<Arc<tokio::sync::Barrier>>>,
}

impl MemDriver {
    /// A writable image of `size` bytes, all a hole, byte-aligned.
    pub fn new(size: u64) -> Self {
        Self::with(size, 1, false)
    }

    /// An image of `size` bytes with a request alignment, read-only or not.
    pub fn with(size: u64, alignment: u32, read_only: bool) -> Self {
        let mut image = Image::default();
        image.resize(size);
        MemDriver {
            image: Mutex::new(image),
            read_only,
            alignment,
            flushes: AtomicU64::new(0),
            flushed: Condvar::new(),
            fua_writes: AtomicU64::new(0),
            max_write: AtomicU64::new(0),
            slow_zeroes: AtomicBool::new(false),
            gated_offset: None,
            gate: tokio::sync::Semaphore::new(0),
            read_barrier: Mutex::new(None),
        }
    }

    fn image(&self) -> MutexGuard<'_, Image> {
        self.image.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `data` at `offset` directly (test set-up), allocating its blocks.
    pub fn fill(&self, offset: u64, data: &[u8]) {
        let mut image = self.image();
        image.bytes[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        image.allocate(offset, data.len() as u64);
    }

    /// A copy of the image's bytes.
    pub fn contents(&self) -> Vec<u8> {
        self.image().bytes.clone()
    }

    /// Whether the block holding `offset` is allocated.
    pub fn is_allocated(&self, offset: u64) -> bool {
        self.image().allocated[(offset / BLOCK) as usize]
    }

    /// Reports `depth` for the blocks of `[offset, offset + len)`, as if they lived in a
    /// backing file (0 restores the default).
    pub fn set_depth(&self, offset: u64, len: u64, depth: u32) {
        let mut image = self.image();
        for b in offset / BLOCK..(offset + len).div_ceil(BLOCK) {
            image.depths[b as usize] = depth;
        }
    }

    /// From now on every read waits until `n` reads are in the driver at once.
    pub fn set_read_barrier(&self, n: usize) {
        *self.read_barrier.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Arc::new(tokio::sync::Barrier::new(n)));
    }

    /// The number of flushes that reached the driver.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// Waits until the driver has been flushed `n` times in all.
    pub fn wait_for_flushes(&self, n: u64) {
        let mut image = self.image();
        while self.flush_count() < n {
            image = self.flushed.wait(image).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl block_core::ImageFacts for MemDriver {
    fn driver_name(&self) -> &'static str {
        "mem"
    }
}

#[async_trait]
impl block_core::BlockIo for MemDriver {
    fn size(&self) -> u64 {
        self.image().bytes.len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn request_alignment(&self) -> u32 {
        self.alignment
    }

    async fn readv(&self, offset: u64, buf: &SgList) -> block_core::Result<()> {
        if self.gated_offset == Some(offset) {
            if let Ok(permit) = self.gate.acquire().await {
                permit.forget();
            }
        }
        let barrier = self
            .read_barrier
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(barrier) = barrier {
            barrier.wait().await;
        }
        let image = self.image();
        buf.copy_from_slice(
            0,
            &image.bytes[offset as usize..offset as usize + buf.len()],
        );
        Ok(())
    }

    async fn writev(&self, offset: u64, buf: &SgList, flags: WriteFlags) -> block_core::Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        if flags.fua {
            self.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        self.max_write.fetch_max(buf.len() as u64, Ordering::SeqCst);
        let mut image = self.image();
        buf.copy_to_slice(
            0,
            &mut image.bytes[offset as usize..offset as usize + buf.len()],
        );
        image.allocate(offset, buf.len() as u64);
        Ok(())
    }

    async fn flush(&self) -> block_core::Result<()> {
        let _image = self.image();
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.flushed.notify_all();
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> block_core::Result<()> {
        self.image().zero(offset, len, true);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> block_core::Result<()> {
        // Zeroing without unmapping writes every byte: not fast.
        if flags.fast && (!flags.may_unmap || self.slow_zeroes.load(Ordering::SeqCst)) {
            return Err(BlockError::NotFast);
        }
        self.image().zero(offset, len, flags.may_unmap);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> block_core::Result<Extent> {
        let image = self.image();
        let first = (offset / BLOCK) as usize;
        let (allocated, depth) = image.status(first);
        let mut end = (first as u64 + 1) * BLOCK;
        while end < offset + len && image.status((end / BLOCK) as usize) == (allocated, depth) {
            end += BLOCK;
        }
        Ok(Extent::new(
            end.min(offset + len) - offset,
            depth > 0,
            !allocated && depth == 0,
            depth,
        ))
    }
}

#[async_trait]
impl block_core::Resize for MemDriver {
    async fn resize(&self, new_size: u64) -> block_core::Result<()> {
        if new_size > 1 << 34 {
            return Err(BlockError::NoSpace);
        }
        self.image().resize(new_size);
        Ok(())
    }
}

#[async_trait]
impl BlockDriver for MemDriver {
    fn resizer(&self) -> Option<&dyn block_core::Resize> {
        Some(self)
    }
}
