//! Dirty bitmaps: which parts of a node were written since the bitmap was made or cleared.
//!
//! A bitmap tracks the node in `granularity`-sized chunks. While enabled, every write,
//! discard and write-zeroes that reaches its node sets the bits of the chunks it touches.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The default granularity of a bitmap: 64 KiB, as in QEMU.
pub const DEFAULT_GRANULARITY: u32 = 64 * 1024;

/// One dirty bitmap of a node.
#[derive(Debug)]
pub struct DirtyBitmap {
    name: String,
    granularity: u32,
    persistent: bool,
    enabled: AtomicBool,
    busy: AtomicBool,
    inconsistent: AtomicBool,
    inner: Mutex<Bits>,
}

#[derive(Debug, Clone)]
struct Bits {
    size: u64,
    words: Vec<u64>,
}

impl Bits {
    fn chunks(size: u64, granularity: u32) -> u64 {
        size.div_ceil(u64::from(granularity))
    }
}

impl DirtyBitmap {
    /// A new, empty, enabled bitmap for a node of `size` bytes. `granularity` must be a power
    /// of two between 512 bytes and 2 GiB (checked by the caller, which reports QEMU's error).
    pub fn new(name: impl Into<String>, size: u64, granularity: u32, persistent: bool) -> Self {
        let chunks = Bits::chunks(size, granularity);
        DirtyBitmap {
            name: name.into(),
            granularity,
            persistent,
            enabled: AtomicBool::new(true),
            busy: AtomicBool::new(false),
            inconsistent: AtomicBool::new(false),
            inner: Mutex::new(Bits {
                size,
                words: vec![0; chunks.div_ceil(64) as usize],
            }),
        }
    }

    fn bits(&self) -> std::sync::MutexGuard<'_, Bits> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bitmap's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u32 {
        self.granularity
    }

    /// Whether the bitmap is stored in the image.
    pub fn persistent(&self) -> bool {
        self.persistent
    }

    /// Whether writes are being recorded.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Starts or stops recording writes.
    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Release);
    }

    /// Whether an operation (e.g. an NBD export) uses the bitmap, so that it may not be
    /// changed or removed.
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    /// Marks the bitmap as used (or no longer used) by an operation.
    pub fn set_busy(&self, busy: bool) {
        self.busy.store(busy, Ordering::Release);
    }

    /// Whether the stored copy was found in use at open (the image was not closed cleanly):
    /// its content cannot be trusted.
    pub fn inconsistent(&self) -> bool {
        self.inconsistent.load(Ordering::Acquire)
    }

    /// Marks the bitmap inconsistent.
    pub fn set_inconsistent(&self, inconsistent: bool) {
        self.inconsistent.store(inconsistent, Ordering::Release);
    }

    /// Records a write of `len` bytes at `offset`, if the bitmap is enabled.
    pub fn mark(&self, offset: u64, len: u64) {
        if self.enabled() {
            self.set_range(offset, len);
        }
    }

    /// Sets the bits covering the byte range, enabled or not.
    pub fn set_range(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let g = u64::from(self.granularity);
        let mut bits = self.bits();
        let chunks = Bits::chunks(bits.size, self.granularity);
        let first = offset / g;
        let last = ((offset.saturating_add(len) - 1) / g).min(chunks.saturating_sub(1));
        let mut chunk = first;
        while chunk <= last {
            bits.words[(chunk / 64) as usize] |= 1 << (chunk % 64);
            chunk += 1;
        }
    }

    /// Clears every bit.
    pub fn clear(&self) {
        self.bits().words.iter_mut().for_each(|w| *w = 0);
    }

    /// Number of dirty bytes (dirty chunks times granularity, the last chunk clamped to the
    /// node's size), as QEMU's `count`.
    pub fn count(&self) -> u64 {
        let bits = self.bits();
        let g = u64::from(self.granularity);
        let mut count = 0;
        for (i, w) in bits.words.iter().enumerate() {
            let mut w = *w;
            while w != 0 {
                let chunk = i as u64 * 64 + u64::from(w.trailing_zeros());
                let start = chunk * g;
                count += (start + g).min(bits.size) - start;
                w &= w - 1;
            }
        }
        count
    }

    /// Whether the chunk holding `offset` is dirty.
    pub fn is_dirty(&self, offset: u64) -> bool {
        let bits = self.bits();
        let chunk = offset / u64::from(self.granularity);
        bits.words
            .get((chunk / 64) as usize)
            .is_some_and(|w| w & (1 << (chunk % 64)) != 0)
    }

    /// The extent at `offset` of at most `len` bytes: its length and whether it is dirty.
    pub fn extent(&self, offset: u64, len: u64) -> (u64, bool) {
        let g = u64::from(self.granularity);
        let dirty = self.is_dirty(offset);
        let mut end = (offset / g + 1) * g;
        let limit = offset
            .saturating_add(len)
            .min(self.bits().size.max(offset + 1));
        while end < limit && self.is_dirty(end) == dirty {
            end += g;
        }
        (end.min(limit) - offset, dirty)
    }

    /// Sets every bit that is set in `other` (which must have the same size).
    pub fn merge_from(&self, other: &DirtyBitmap) {
        let other_bits = other.bits().clone();
        let g = u64::from(other.granularity);
        for (i, w) in other_bits.words.iter().enumerate() {
            let mut w = *w;
            while w != 0 {
                let chunk = i as u64 * 64 + u64::from(w.trailing_zeros());
                self.set_range(chunk * g, g);
                w &= w - 1;
            }
        }
    }

    /// Follows a resize of the node: new chunks are clean.
    pub fn resize(&self, new_size: u64) {
        let mut bits = self.bits();
        let chunks = Bits::chunks(new_size, self.granularity);
        bits.words.resize(chunks.div_ceil(64) as usize, 0);
        if chunks % 64 != 0 {
            if let Some(last) = bits.words.last_mut() {
                *last &= (1u64 << (chunks % 64)) - 1;
            }
        }
        bits.size = new_size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_and_counts() {
        let b = DirtyBitmap::new("b", 1 << 20, 65536, false);
        assert_eq!(b.count(), 0);
        b.mark(1, 1);
        assert_eq!(b.count(), 65536);
        b.mark(65535, 2);
        assert_eq!(b.count(), 2 * 65536);
        assert_eq!(b.extent(0, 1 << 20), (2 * 65536, true));
        assert_eq!(b.extent(2 * 65536, 1 << 20), ((1 << 20) - 2 * 65536, false));
        b.set_enabled(false);
        b.mark(5 << 16, 1);
        assert_eq!(b.count(), 2 * 65536);
        b.clear();
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn last_chunk_is_clamped() {
        let b = DirtyBitmap::new("b", 65536 + 100, 65536, false);
        b.mark(65536, 100);
        assert_eq!(b.count(), 100);
        b.resize(65536);
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn merge() {
        let a = DirtyBitmap::new("a", 1 << 20, 65536, false);
        let b = DirtyBitmap::new("b", 1 << 20, 65536, false);
        a.mark(0, 1);
        b.mark(3 << 16, 1);
        a.merge_from(&b);
        assert!(a.is_dirty(0) && a.is_dirty(3 << 16) && !a.is_dirty(1 << 16));
    }
}
