//! Scatter/gather lists over memory that travels with the request.
//!
//! A request's data lives in an [`SgList`]: a list of segments (address, length) and an
//! *owner* that keeps their memory alive — a `Vec<u8>` the list took over, an aligned buffer,
//! or whatever an export hands in (a guard that keeps a guest-memory mapping, e.g. from
//! vm-memory, alive). The owner is reference-counted: a driver that hands the memory to
//! another thread (the blocking pool, a qcow2 worker) clones the list, so the memory lives
//! until the last user is done, even when the caller stops waiting. A completed request gives
//! the memory back: [`SgList::into_vec`] returns the `Vec` once no clone is left.
//!
//! # The ownership rule
//! No Rust reference (`&[u8]`, `&mut [u8]`) is ever made to the memory of a list built with
//! [`SgList::from_raw`]: another party (a guest, a VDUSE bounce area) may change it at any
//! time, which a reference forbids. Such memory is only passed to the kernel (`preadv`,
//! `pwritev`) or copied with raw-pointer copies ([`SgList::copy_from_slice`],
//! [`SgList::copy_to_slice`]). Lists built from memory the list owns ([`SgList::from_vec`],
//! [`SgList::zeroed`], [`SgList::aligned`]) are *private*: the block layer may lend them to
//! code that takes slices (imago's vectored I/O), and does so only while the request runs.
//!
//! ```
//! use block_core::SgList;
//!
//! let buf = SgList::from_vec(vec![0u8; 8]);
//! buf.copy_from_slice(2, b"abc");
//! let mut out = [0u8; 3];
//! buf.copy_to_slice(2, &mut out);
//! assert_eq!(&out, b"abc");
//! assert_eq!(buf.into_vec().expect("no clone is left"), b"\0\0abc\0\0\0");
//! ```

use std::any::Any;
use std::fmt;
use std::io;
use std::sync::Arc;

/// The most segments one `preadv`/`pwritev` takes (`IOV_MAX` on Linux).
pub(crate) const IOV_MAX: usize = 1024;

#[derive(Clone, Copy)]
struct Seg {
    ptr: *mut u8,
    len: usize,
}

#[derive(Clone)]
enum Segs {
    One(Seg),
    Many(Arc<[Seg]>),
}

impl Segs {
    fn from_vec(segs: Vec<Seg>) -> Segs {
        if segs.len() == 1 {
            Segs::One(segs[0])
        } else {
            Segs::Many(segs.into())
        }
    }

    fn as_slice(&self) -> &[Seg] {
        match self {
            Segs::One(s) => std::slice::from_ref(s),
            Segs::Many(v) => v,
        }
    }
}

/// A scatter/gather list of memory kept alive by an owner; see the [module docs](self).
///
/// Cloning is cheap (a reference count) and shares the memory.
#[derive(Clone)]
pub struct SgList {
    segs: Segs,
    len: usize,
    owner: Arc<dyn Any + Send + Sync>,
    /// The memory belongs to the list (see the module docs).
    private: bool,
}

// SAFETY: the segments point into memory kept alive by `owner` (itself `Send + Sync`) for as
// long as the list lives; the list never makes references to it, so moving or sharing the
// list between threads is no different from moving the raw addresses.
unsafe impl Send for SgList {}
// SAFETY: as for `Send`: every access goes through raw-pointer copies or the kernel.
unsafe impl Sync for SgList {}

impl fmt::Debug for SgList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SgList")
            .field("len", &self.len)
            .field("segments", &self.segs.as_slice().len())
            .field("private", &self.private)
            .finish()
    }
}

/// A `Vec<u8>` taken apart, owned by a list.
struct VecOwner {
    ptr: *mut u8,
    len: usize,
    cap: usize,
}

// SAFETY: a uniquely owned heap allocation; the raw parts are only used to free it.
unsafe impl Send for VecOwner {}
// SAFETY: `&VecOwner` gives no access to the memory.
unsafe impl Sync for VecOwner {}

impl Drop for VecOwner {
    fn drop(&mut self) {
        // SAFETY: the parts come from a `Vec<u8>` that was never freed (see `from_vec`).
        drop(unsafe { Vec::from_raw_parts(self.ptr, self.len, self.cap) });
    }
}

/// A heap buffer aligned for `O_DIRECT`, zeroed.
pub(crate) struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is uniquely owned heap memory; nothing else aliases it.
unsafe impl Send for AlignedBuf {}
// SAFETY: `&AlignedBuf` gives no access to the memory (`as_mut_slice` needs `&mut`), and the
// lists that own one never hand out references to it.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub(crate) fn new(len: usize, align: usize) -> io::Result<AlignedBuf> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), align.max(1))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(ptr)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(AlignedBuf { ptr, layout })
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points at `layout.size()` initialised (zeroed) bytes owned by `self`,
        // and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated with exactly this layout and is freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// A buffer that owns its bytes on the heap: they stay at one address for as long as the
/// buffer lives, however it is moved (a `Vec<u8>`, a `Box<[u8]>`, a `bytes::BytesMut`), so
/// that a list can own it ([`SgList::from_owned`]). A protocol crate implements it for a
/// newtype around its own buffer type.
///
/// # Safety
/// `stable_mut_ptr` and `len` must describe memory that `self` owns alone, that stays valid
/// for reads and writes and at the same address while `self` lives (moves included), and
/// that nothing else reads or writes while a list owns `self`.
pub unsafe trait StableBuf: Send + Sync + 'static {
    /// The address of the bytes (taken once, through `&mut`).
    fn stable_mut_ptr(&mut self) -> *mut u8;
    /// How many bytes there are.
    fn len(&self) -> usize;
    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// SAFETY: a `Vec`'s heap buffer does not move when the `Vec` does, and the `Vec` owns it.
unsafe impl StableBuf for Vec<u8> {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr()
    }
    fn len(&self) -> usize {
        Vec::len(self)
    }
}

// SAFETY: as for `Vec<u8>`.
unsafe impl StableBuf for Box<[u8]> {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr()
    }
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
}

// SAFETY: a `BytesMut` that the list owns is its own view of its heap bytes: they do not move
// when it does, and no other handle reads or writes that range (views of one allocation are
// disjoint).
#[cfg(feature = "bytes")]
unsafe impl StableBuf for bytes::BytesMut {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr()
    }
    fn len(&self) -> usize {
        bytes::BytesMut::len(self)
    }
}

/// An owned buffer kept by a list (see [`SgList::from_owned`]).
struct Owned<B>(B);

impl SgList {
    /// A list of one segment over a buffer that owns its bytes; the list owns the buffer
    /// (it is dropped with the last clone). Private memory, as with [`from_vec`](Self::from_vec)
    /// (which also gives a `Vec` back).
    pub fn from_owned<B: StableBuf>(mut buf: B) -> SgList {
        let (ptr, len) = (buf.stable_mut_ptr(), buf.len());
        SgList {
            segs: Segs::One(Seg { ptr, len }),
            len,
            owner: Arc::new(Owned(buf)),
            private: true,
        }
    }

    /// A list of one segment: the bytes of `v`, which the list owns until
    /// [`into_vec`](Self::into_vec) gives them back.
    pub fn from_vec(v: Vec<u8>) -> SgList {
        let mut v = std::mem::ManuallyDrop::new(v);
        let (ptr, len, cap) = (v.as_mut_ptr(), v.len(), v.capacity());
        SgList {
            segs: Segs::One(Seg { ptr, len }),
            len,
            owner: Arc::new(VecOwner { ptr, len, cap }),
            private: true,
        }
    }

    /// `len` zeroed bytes.
    pub fn zeroed(len: usize) -> SgList {
        SgList::from_vec(vec![0u8; len])
    }

    /// `len` zeroed bytes whose address is a multiple of `align` (a power of two), for
    /// `O_DIRECT` nodes: a read or write of such a list at an aligned offset needs no bounce
    /// buffer.
    pub fn aligned(len: usize, align: usize) -> io::Result<SgList> {
        let mut buf = AlignedBuf::new(len, align)?;
        let ptr = buf.as_mut_slice().as_mut_ptr();
        Ok(SgList {
            segs: Segs::One(Seg { ptr, len }),
            len,
            owner: Arc::new(buf),
            private: true,
        })
    }

    /// A list over memory the caller describes, kept alive by `owner`.
    ///
    /// The memory is treated as shared with another party: the block layer never makes
    /// a Rust reference to it, only passes it to the kernel or copies it with raw-pointer
    /// copies (format drivers that need slices copy it into a private buffer first).
    ///
    /// # Safety
    /// Every `(address, length)` segment must be valid for reads and writes for as long as
    /// `owner` is alive, and stay mapped at that address; `owner` must not free or unmap it
    /// before it is dropped. Clones of the list keep `owner` alive, so the memory may be
    /// accessed by the kernel or another thread after a request's future was dropped, until
    /// the last clone is gone.
    pub unsafe fn from_raw(
        segments: &[(*mut u8, usize)],
        owner: Arc<dyn Any + Send + Sync>,
    ) -> SgList {
        let segs: Vec<Seg> = segments
            .iter()
            .filter(|(_, len)| *len > 0)
            .map(|&(ptr, len)| Seg { ptr, len })
            .collect();
        let len = segs.iter().map(|s| s.len).sum();
        SgList {
            segs: Segs::from_vec(segs),
            len,
            owner,
            private: false,
        }
    }

    /// The total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the list holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many segments the list has.
    pub fn segment_count(&self) -> usize {
        self.segs.as_slice().len()
    }

    /// Whether the memory belongs to the list (see the [module docs](self)).
    pub fn is_private(&self) -> bool {
        self.private
    }

    /// The memory back, when the list was made by [`from_vec`](Self::from_vec) or
    /// [`zeroed`](Self::zeroed), covers all of it, and no clone is left; the list itself
    /// otherwise.
    pub fn into_vec(self) -> Result<Vec<u8>, SgList> {
        let whole = match self.segs {
            Segs::One(s) => Some(s),
            Segs::Many(_) => None,
        };
        let owner = match Arc::clone(&self.owner).downcast::<VecOwner>() {
            Ok(o) => o,
            Err(_) => return Err(self),
        };
        let Some(seg) = whole else {
            return Err(self);
        };
        if seg.ptr != owner.ptr || seg.len != owner.len {
            return Err(self);
        }
        let SgList { owner: mine, .. } = self;
        drop(mine);
        match Arc::try_unwrap(owner) {
            Ok(owner) => {
                let owner = std::mem::ManuallyDrop::new(owner);
                // SAFETY: the parts come from a `Vec<u8>` (see `from_vec`); `ManuallyDrop`
                // keeps `VecOwner::drop` from freeing it a second time.
                Ok(unsafe { Vec::from_raw_parts(owner.ptr, owner.len, owner.cap) })
            }
            Err(owner) => Err(SgList {
                segs: Segs::One(seg),
                len: seg.len,
                owner,
                private: true,
            }),
        }
    }

    /// A copy of the bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        self.copy_to_slice(0, &mut v);
        v
    }

    /// The `len` bytes at `start`, sharing this list's memory and owner.
    ///
    /// # Panics
    /// When the range is not inside the list.
    pub fn slice(&self, start: usize, len: usize) -> SgList {
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.len),
            "slice {start}+{len} of a list of {} bytes",
            self.len
        );
        let mut segs = Vec::new();
        self.for_each_seg(start, len, |ptr, n| segs.push(Seg { ptr, len: n }));
        SgList {
            segs: Segs::from_vec(segs),
            len,
            owner: Arc::clone(&self.owner),
            private: self.private,
        }
    }

    /// The part of this list that is the memory `ptr..ptr + len`, when all of it lies in one
    /// segment (for code that was handed back one of our own segments as a slice).
    pub(crate) fn find(&self, ptr: *const u8, len: usize) -> Option<SgList> {
        let mut at = 0;
        for s in self.segs.as_slice() {
            let start = s.ptr as usize;
            let p = ptr as usize;
            if p >= start && p.checked_add(len)? <= start + s.len {
                return Some(self.slice(at + (p - start), len));
            }
            at += s.len;
        }
        None
    }

    /// Calls `f` with each piece (address, length) of the range `start..start + len`.
    fn for_each_seg(&self, mut start: usize, mut len: usize, mut f: impl FnMut(*mut u8, usize)) {
        for s in self.segs.as_slice() {
            if len == 0 {
                break;
            }
            if start >= s.len {
                start -= s.len;
                continue;
            }
            let n = (s.len - start).min(len);
            // SAFETY: `start < s.len`, so the address stays inside the segment.
            f(unsafe { s.ptr.add(start) }, n);
            start = 0;
            len -= n;
        }
    }

    /// Copies `src` into the list at byte `at`.
    ///
    /// # Panics
    /// When `src` does not fit.
    pub fn copy_from_slice(&self, at: usize, src: &[u8]) {
        assert!(at.checked_add(src.len()).is_some_and(|e| e <= self.len));
        let mut done = 0;
        self.for_each_seg(at, src.len(), |ptr, n| {
            // SAFETY: `ptr..ptr + n` lies in a segment the owner keeps valid for writes;
            // `src` is a distinct Rust slice, so the ranges cannot overlap.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(done), ptr, n) };
            done += n;
        });
    }

    /// Copies the bytes at `at` into `dst`.
    ///
    /// # Panics
    /// When the list is shorter than `at + dst.len()`.
    pub fn copy_to_slice(&self, at: usize, dst: &mut [u8]) {
        assert!(at.checked_add(dst.len()).is_some_and(|e| e <= self.len));
        let mut done = 0;
        self.for_each_seg(at, dst.len(), |ptr, n| {
            // SAFETY: `ptr..ptr + n` lies in a segment the owner keeps valid for reads; `dst`
            // is a distinct Rust slice.
            unsafe { std::ptr::copy_nonoverlapping(ptr, dst.as_mut_ptr().add(done), n) };
            done += n;
        });
    }

    /// Sets the `len` bytes at `at` to zero.
    pub fn fill_zero(&self, at: usize, len: usize) {
        assert!(at.checked_add(len).is_some_and(|e| e <= self.len));
        self.for_each_seg(at, len, |ptr, n| {
            // SAFETY: `ptr..ptr + n` lies in a segment the owner keeps valid for writes.
            unsafe { std::ptr::write_bytes(ptr, 0, n) };
        });
    }

    /// Whether every byte is zero. Reads the memory through raw pointers, a word at a time.
    pub fn is_zero(&self) -> bool {
        let mut zero = true;
        self.for_each_seg(0, self.len, |ptr, n| {
            if !zero {
                return;
            }
            let mut i = 0;
            while i < n && (ptr as usize + i) % 8 != 0 {
                // SAFETY: inside the segment, valid for reads.
                zero &= unsafe { ptr.add(i).read_volatile() } == 0;
                i += 1;
            }
            while zero && i + 8 <= n {
                // SAFETY: inside the segment and 8-aligned (the loop above); any bit pattern
                // is a valid u64.
                zero &= unsafe { (ptr.add(i) as *const u64).read_volatile() } == 0;
                i += 8;
            }
            while zero && i < n {
                // SAFETY: inside the segment, valid for reads.
                zero &= unsafe { ptr.add(i).read_volatile() } == 0;
                i += 1;
            }
        });
        zero
    }

    /// Whether every segment starts at a multiple of `align` and is a multiple of it long.
    pub fn is_aligned(&self, align: usize) -> bool {
        let align = align.max(1);
        self.segs
            .as_slice()
            .iter()
            .all(|s| s.ptr as usize % align == 0 && s.len % align == 0)
    }

    /// Calls `f` with the `iovec`s of the bytes from `skip` on, at most [`IOV_MAX`] of them
    /// (a caller that gets fewer bytes done than it asked calls again from there).
    pub(crate) fn with_iovecs<R>(&self, skip: usize, f: impl FnOnce(&[libc::iovec]) -> R) -> R {
        if let Segs::One(s) = self.segs {
            let iov = libc::iovec {
                // SAFETY: `skip <= len`, so the address stays inside (or at the end of) the
                // segment.
                iov_base: unsafe { s.ptr.add(skip.min(s.len)) }.cast(),
                iov_len: s.len - skip.min(s.len),
            };
            return f(std::slice::from_ref(&iov));
        }
        let mut iovs = Vec::with_capacity(self.segment_count().min(IOV_MAX));
        self.for_each_seg(skip, self.len.saturating_sub(skip), |ptr, n| {
            if iovs.len() < IOV_MAX {
                iovs.push(libc::iovec {
                    iov_base: ptr.cast(),
                    iov_len: n,
                });
            }
        });
        f(&iovs)
    }

    /// The segments as slices, for code that takes slices (imago).
    ///
    /// # Safety
    /// The list must be [private](Self::is_private), and no other user of its memory may
    /// run while the slices live (true while the request the list was made for runs: its
    /// maker waits for it).
    #[cfg(feature = "qcow2")]
    pub(crate) unsafe fn io_slices_mut(&self) -> Vec<std::io::IoSliceMut<'_>> {
        debug_assert!(self.private);
        self.segs
            .as_slice()
            .iter()
            .map(|s| {
                // SAFETY: the caller's contract: private memory nobody else touches now.
                std::io::IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(s.ptr, s.len) })
            })
            .collect()
    }

    /// The segments as slices; see [`io_slices_mut`](Self::io_slices_mut).
    ///
    /// # Safety
    /// As for [`io_slices_mut`](Self::io_slices_mut).
    #[cfg(feature = "qcow2")]
    pub(crate) unsafe fn io_slices(&self) -> Vec<std::io::IoSlice<'_>> {
        debug_assert!(self.private);
        self.segs
            .as_slice()
            .iter()
            .map(|s| {
                // SAFETY: the caller's contract: private memory nobody else touches now.
                std::io::IoSlice::new(unsafe { std::slice::from_raw_parts(s.ptr, s.len) })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scattered() -> (SgList, Vec<Vec<u8>>) {
        let mut parts = vec![vec![1u8; 3], vec![2u8; 5], vec![3u8; 2]];
        let segs: Vec<(*mut u8, usize)> = parts
            .iter_mut()
            .map(|p| (p.as_mut_ptr(), p.len()))
            .collect();
        // SAFETY: the vectors outlive the list in every test (returned alongside it, and the
        // list is dropped first); their heap memory does not move.
        let list = unsafe { SgList::from_raw(&segs, Arc::new(())) };
        (list, parts)
    }

    #[test]
    fn copies_cross_segments() {
        let (list, parts) = scattered();
        assert_eq!(list.len(), 10);
        assert_eq!(list.to_vec(), [1, 1, 1, 2, 2, 2, 2, 2, 3, 3]);
        list.copy_from_slice(2, &[9, 8, 7]);
        list.fill_zero(8, 1);
        assert_eq!(list.to_vec(), [1, 1, 9, 8, 7, 2, 2, 2, 0, 3]);
        let part = list.slice(2, 7);
        assert_eq!(part.segment_count(), 3);
        assert_eq!(part.to_vec(), [9, 8, 7, 2, 2, 2, 0]);
        assert!(!list.is_zero());
        assert!(list.slice(8, 1).is_zero());
        drop((part, list));
        drop(parts);
    }

    #[test]
    fn vec_comes_back_only_when_unshared() {
        let list = SgList::from_vec(b"hello".to_vec());
        let clone = list.clone();
        let list = list.into_vec().expect_err("a clone is alive");
        drop(clone);
        assert_eq!(list.into_vec().expect("unshared"), b"hello");
        let part = SgList::from_vec(vec![0; 8]).slice(0, 4);
        assert!(part.into_vec().is_err(), "a slice is not the whole vector");
    }

    #[test]
    fn iovecs_start_where_asked() {
        let (list, _parts) = scattered();
        let got = list.with_iovecs(4, |iovs| iovs.iter().map(|i| i.iov_len).collect::<Vec<_>>());
        assert_eq!(got, [4, 2]);
        let one = SgList::zeroed(10);
        assert_eq!(one.with_iovecs(10, |iovs| iovs[0].iov_len), 0);
        assert!(SgList::aligned(8192, 4096).expect("alloc").is_aligned(4096));
        let found = one.find(
            one.slice(3, 4)
                .with_iovecs(0, |i| i[0].iov_base as *const u8),
            4,
        );
        assert_eq!(found.map(|f| f.len()), Some(4));
        assert!(one.find(std::ptr::null(), 1).is_none());
    }
}
