//! The `file` protocol driver (also registered as `host_device`): a host file or block device.
//!
//! # How I/O is done
//! Reads and writes go straight between the request's [`SgList`] and the kernel
//! (`preadv2`/`pwritev2` over its segments): no bounce copy, except where `O_DIRECT`
//! alignment needs one. Buffered reads and writes are first tried inline with `RWF_NOWAIT`:
//! a page-cache hit completes on the calling task with no thread hop. When the kernel answers
//! `EAGAIN` (the data is not cached, or the write would block) the rest of the request goes to
//! tokio's blocking thread pool, which takes a clone of the list (so its memory lives until
//! the pool is done with it, even if the caller stops waiting). Outside a tokio runtime the
//! request is done on the calling thread; threads that want many requests in flight submit
//! them through a [`Submitter`](crate::Submitter). If the kernel refuses `RWF_NOWAIT`
//! altogether (`EOPNOTSUPP`), the driver stops trying it for that kind of request.
//!
//! tmpfs refuses `RWF_NOWAIT` for reads: there a read whose pages `cachestat(2)` finds in
//! memory is done inline all the same (a copy out of the page cache).
//!
//! ext4 refuses `RWF_NOWAIT` for buffered writes. There a write is still done inline when
//! the page cache can take it without reading from the disk (it covers whole pages, or
//! `cachestat(2)` finds its pages cached): a copy into the cache costs a few microseconds,
//! a hop to the pool and back several times that. The kernel may still make such a write
//! wait when it throttles writers with too many dirty pages: when a write takes longer than
//! [`SLOW_INLINE_WRITE`], the next one is watched, and if it is slow too and slept (a
//! voluntary context switch, `getrusage`), the writes of the next [`POOL_AFTER_SLOW_WRITE`]
//! go to the pool, so that the calling event loop is held up once, not at every write. A
//! write that was slow only because the thread was preempted (a busy machine) keeps writes
//! inline: sending them to the pool there made them slower still (on 2 cores shared with
//! the client, 4 KiB NBD writes to tmpfs spent most of their time in futex wake-ups).
//!
//! `splice_read` hands page-cache pages to a pipe (`splice(2)`), for exports that send them
//! on to a socket without copying. It runs inline when `cachestat(2)` says every page of the
//! range is cached, and in the blocking pool otherwise (reading from the disk blocks).
//!
//! With `cache.direct=on` (`O_DIRECT`) every request goes through the pool; a request whose
//! offset, length and memory are aligned to [`BlockIo::request_alignment`] goes straight
//! into its buffers, others through an aligned bounce buffer; misaligned writes are done as
//! read-modify-write under an exclusive lock so that they cannot race with other writes.
//!
//! Holes: `write_zeroes` uses `fallocate(ZERO_RANGE)`, or `PUNCH_HOLE` when unmapping is
//! allowed; `discard` punches holes; `block_status` uses `SEEK_DATA`/`SEEK_HOLE`.

mod lock;

pub use lock::{LockError, Perms};

use crate::buffer::{AlignedBuf, SgList};
use crate::driver::{
    page_size, write_zero_buffers, BlockDriver, BlockIo, Extent, ImageDetails, ImageFacts, Resize,
    SpliceRead, WriteFlags, ZeroFlags,
};
use crate::error::{BlockError, Result};
use async_trait::async_trait;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// `RWF_DSYNC` from `linux/fs.h`: a per-write `O_DSYNC`.
const RWF_DSYNC: libc::c_int = 0x02;
/// `RWF_NOWAIT` from `linux/fs.h`: fail with `EAGAIN` instead of blocking.
const RWF_NOWAIT: libc::c_int = 0x08;
/// `cachestat(2)` (Linux 6.5), numbered alike on every architecture but alpha.
const SYS_CACHESTAT: libc::c_long = 451;
/// An inline write slower than this means the kernel is throttling writers.
pub const SLOW_INLINE_WRITE: std::time::Duration = std::time::Duration::from_millis(1);
/// Longer writes always go to the pool: copying them alone takes a while.
pub const MAX_INLINE_WRITE: usize = 256 * 1024;
/// Reads of cached pages up to this size are done inline where `RWF_NOWAIT` is refused
/// (tmpfs), as `RWF_NOWAIT` reads are elsewhere: a 1 MiB copy out of the page cache takes
/// about 120 µs here, a hop to the pool and back costs more than the copy saves.
pub const MAX_INLINE_READ: usize = 1 << 20;
/// How long writes then go to the blocking pool.
pub const POOL_AFTER_SLOW_WRITE: std::time::Duration = std::time::Duration::from_secs(1);
/// `BLKGETSIZE64` from `linux/fs.h`: `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Whether `file` is on tmpfs (`fstatfs`).
fn on_tmpfs(file: &File) -> bool {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs writes a `struct statfs` into `st`, valid for writes during the call;
    // the fd is open.
    if unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstatfs succeeded, so it filled the struct.
    unsafe { st.assume_init() }.f_type == libc::TMPFS_MAGIC
}

/// Whether the system has no swap now (`sysinfo(2)`).
fn no_swap_now() -> bool {
    let mut info = std::mem::MaybeUninit::<libc::sysinfo>::uninit();
    // SAFETY: sysinfo writes a `struct sysinfo` into `info`, valid for writes during the call.
    if unsafe { libc::sysinfo(info.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: sysinfo succeeded, so it filled the struct.
    unsafe { info.assume_init() }.totalswap == 0
}

/// How long [`no_swap`] trusts its last `sysinfo`.
const SWAP_CHECK_INTERVAL_MS: u64 = 1000;

/// Milliseconds of `CLOCK_MONOTONIC_COARSE` (a read of the vDSO, no system call).
fn coarse_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one `timespec` into `ts`, valid for writes during the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Whether the system had no swap at most a second ago. `sysinfo` itself sums the memory and
/// swap counters (about 9% of the CPU of a 4 KiB read from tmpfs when asked per request); an
/// answer a second old is good enough for choosing where a read runs.
fn no_swap() -> bool {
    /// The last answer: bit 0 whether there was no swap, the rest the time it was asked
    /// (`coarse_ms() + 1`, so that 0 means never).
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = coarse_ms() + 1;
    let last = LAST.load(Ordering::Relaxed);
    if last != 0 && now.saturating_sub(last >> 1) < SWAP_CHECK_INTERVAL_MS {
        return last & 1 == 1;
    }
    let answer = no_swap_now();
    LAST.store(now << 1 | u64::from(answer), Ordering::Relaxed);
    answer
}

/// How the `locking` option was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Locking {
    /// Always lock; fail when locks are not supported.
    On,
    /// Never lock.
    Off,
    /// Lock when the host supports it (the default).
    #[default]
    Auto,
}

/// The options of a `file` node.
#[derive(Debug, Clone, Default)]
pub struct FileOptions {
    /// Path of the file or block device.
    pub filename: PathBuf,
    /// Open read-only.
    pub read_only: bool,
    /// When opening read-write fails for lack of permission, open read-only instead.
    pub auto_read_only: bool,
    /// `cache.direct`: bypass the host page cache (`O_DIRECT`).
    pub direct: bool,
    /// `cache.no-flush`: ignore flush requests.
    pub no_flush: bool,
    /// `locking`.
    pub locking: Locking,
    /// `force-share`: share every permission with other processes (read-only nodes only).
    pub force_share: bool,
    /// The node is a `host_device` (a block or character device) rather than a `file` (a
    /// regular file); each driver refuses the other kind, as QEMU does.
    pub host_device: bool,
    /// Never try `RWF_NOWAIT` inline; every request goes to the blocking pool (for
    /// benchmarks and for hosts where `RWF_NOWAIT` misbehaves).
    pub no_inline: bool,
    /// Take no image locks yet: nobody needs the image (the node, or the parent it is
    /// opened for, is inactive). [`BlockDriver::set_active`] takes them.
    pub defer_locks: bool,
}

/// Why a file could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// `open(2)` failed.
    #[error("Could not open '{path}'")]
    Open {
        /// The path as given.
        path: String,
        /// The host error.
        #[source]
        source: io::Error,
    },
    /// The size could not be found.
    #[error("Could not get the size of '{path}'")]
    Size {
        /// The path as given.
        path: String,
        /// The host error.
        #[source]
        source: io::Error,
    },
    /// `driver=file` was given something else than a regular file.
    #[error("'file' driver requires '{0}' to be a regular file")]
    NotRegular(String),
    /// `driver=host_device` was given something else than a device.
    #[error("'host_device' driver requires '{0}' to be either a character or block device")]
    NotDevice(String),
    /// The image is in use by another process, or locking failed.
    #[error(transparent)]
    Lock(#[from] LockError),
}

/// The `file` driver.
#[derive(Debug)]
pub struct FileDriver {
    file: Arc<File>,
    path: String,
    read_only: bool,
    direct: bool,
    no_flush: bool,
    block_device: bool,
    align: u32,
    size: AtomicU64,
    nowait_read: AtomicBool,
    nowait_write: AtomicBool,
    /// `splice` from this file works (cleared at its first `EINVAL`).
    splice: Arc<AtomicBool>,
    /// `cachestat` works (cleared at its first failure).
    cachestat: AtomicBool,
    /// The file is on tmpfs: see [`FileDriver::never_waits`].
    tmpfs: bool,
    /// Buffered writes (and reads) that `RWF_NOWAIT` refuses may be done inline when the page
    /// cache can take them at once (see the module docs).
    inline_write: bool,
    /// Until when (nanoseconds after [`clock`]) writes go to the pool after a slow one.
    pool_writes_until: AtomicU64,
    /// An inline write was slow: the next one checks whether the kernel made it sleep.
    probe_next_write: AtomicBool,
    /// Taken shared by aligned `O_DIRECT` writes and exclusively by read-modify-write.
    rmw: tokio::sync::RwLock<()>,
    /// The permissions locked at open (none with `locking=off`, or where locks are not
    /// supported): released while the node is inactive.
    locks: Option<(Perms, Perms)>,
    /// The locks are released (or were never taken): the node was inactive.
    unlocked: AtomicBool,
    /// The last data region `SEEK_HOLE` found, `(start, end)`: see [`FileDriver::block_status`].
    data_region: std::sync::Mutex<Option<(u64, u64)>>,
    /// Reads and writes in the driver now, and the most at once (see [`FileDriver::in_flight`]).
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// A read or write counted while it is in the driver.
struct InFlight<'a>(&'a FileDriver);

impl<'a> InFlight<'a> {
    fn new(drv: &'a FileDriver) -> InFlight<'a> {
        let now = drv.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        drv.max_in_flight.fetch_max(now, Ordering::Relaxed);
        InFlight(drv)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl FileDriver {
    /// Opens the file, takes QEMU-compatible locks and finds its size.
    pub fn open(opts: &FileOptions) -> std::result::Result<FileDriver, OpenError> {
        let path = opts.filename.to_string_lossy().into_owned();
        let open = |write: bool| {
            let mut oo = OpenOptions::new();
            oo.read(true).write(write);
            let mut flags = libc::O_CLOEXEC;
            if opts.direct {
                flags |= libc::O_DIRECT;
            }
            oo.custom_flags(flags);
            oo.open(&opts.filename)
        };
        let mut read_only = opts.read_only;
        let file = if read_only {
            open(false)
        } else {
            match open(true) {
                Err(e)
                    if opts.auto_read_only
                        && matches!(
                            e.raw_os_error(),
                            Some(libc::EACCES | libc::EROFS | libc::EPERM)
                        ) =>
                {
                    read_only = true;
                    open(false)
                }
                other => other,
            }
        }
        .map_err(|source| OpenError::Open {
            path: path.clone(),
            source,
        })?;

        let meta = file.metadata().map_err(|source| OpenError::Size {
            path: path.clone(),
            source,
        })?;
        let file_type = meta.file_type();
        let block_device = file_type.is_block_device();
        if opts.host_device && !(block_device || file_type.is_char_device()) {
            return Err(OpenError::NotDevice(path));
        }
        if !opts.host_device && !file_type.is_file() {
            return Err(OpenError::NotRegular(path));
        }
        let size = if block_device {
            device_size(&file).map_err(|source| OpenError::Size {
                path: path.clone(),
                source,
            })?
        } else {
            // QEMU counts sizes in 512-byte sectors: a file's size is rounded up, and the
            // tail beyond its end reads as zeroes.
            meta.len().div_ceil(512) * 512
        };
        let align = if opts.direct {
            logical_block_size(&file).unwrap_or_else(|| probe_direct_alignment(&file))
        } else {
            1
        };

        let mut locks = None;
        if opts.locking != Locking::Off {
            let (perm, shared) = if read_only && opts.force_share {
                (Perms::CONSISTENT_READ, Perms::ALL)
            } else if read_only {
                (
                    Perms::CONSISTENT_READ,
                    Perms::CONSISTENT_READ.with(Perms::WRITE_UNCHANGED),
                )
            } else {
                (
                    Perms::CONSISTENT_READ.with(Perms::WRITE),
                    Perms::CONSISTENT_READ.with(Perms::WRITE_UNCHANGED),
                )
            };
            match if opts.defer_locks {
                Ok(())
            } else {
                lock::lock(&file, perm, shared)
            } {
                Ok(()) => locks = Some((perm, shared)),
                Err(e) if opts.locking == Locking::Auto && e.unsupported() => {
                    tracing::warn!(
                        "{path}: file locking is not supported here; going on without it"
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }

        let tmpfs = on_tmpfs(&file);
        Ok(FileDriver {
            file: Arc::new(file),
            path,
            read_only,
            direct: opts.direct,
            no_flush: opts.no_flush,
            block_device: opts.host_device,
            align,
            size: AtomicU64::new(size),
            nowait_read: AtomicBool::new(!opts.direct && !opts.no_inline),
            nowait_write: AtomicBool::new(!opts.direct && !opts.no_inline),
            splice: Arc::new(AtomicBool::new(!opts.direct)),
            cachestat: AtomicBool::new(!opts.no_inline),
            tmpfs,
            inline_write: !opts.direct && !opts.no_inline,
            pool_writes_until: AtomicU64::new(0),
            probe_next_write: AtomicBool::new(false),
            rmw: tokio::sync::RwLock::new(()),
            locks,
            unlocked: AtomicBool::new(opts.defer_locks),
            data_region: std::sync::Mutex::new(None),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        })
    }

    /// Whether the node is a `host_device` (a block or character device).
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Reads and writes in the driver now, and the most that were at once since the node
    /// was opened.
    pub fn in_flight(&self) -> (usize, usize) {
        (
            self.in_flight.load(Ordering::Relaxed),
            self.max_in_flight.load(Ordering::Relaxed),
        )
    }

    /// Forgets the cached data region (a hole may have been punched).
    fn forget_data_region(&self) {
        *self.data_region.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Whether `O_DIRECT` is in use.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// The number of bytes the file takes on the host (`actual-size`).
    pub fn allocated_size(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }

    fn io_err(&self, what: &str, e: io::Error) -> BlockError {
        if errno(&e) == libc::ENOSPC {
            return BlockError::NoSpace;
        }
        BlockError::io(format!("{what} {}", self.path), e)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&File) -> io::Result<T> + Send + 'static,
    ) -> Result<T> {
        let file = Arc::clone(&self.file);
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            // Called outside any tokio runtime (e.g. from a plain executor): do it here.
            return f(&file).map_err(|e| self.io_err(what, e));
        };
        match handle.spawn_blocking(move || f(&file)).await {
            Ok(r) => r.map_err(|e| self.io_err(what, e)),
            Err(e) => Err(BlockError::io(
                format!("{what} {}", self.path),
                io::Error::other(e.to_string()),
            )),
        }
    }

    /// One inline `preadv2(RWF_NOWAIT)` into `buf` from byte `skip` on; `Ok(None)` when it
    /// would block.
    fn try_read_nowait(&self, offset: u64, buf: &SgList, skip: usize) -> Result<Option<usize>> {
        let n = buf.with_iovecs(skip, |iovs| {
            // SAFETY: the iovecs describe memory of `buf`, which its owner keeps valid for
            // writes during the call; the fd is open while `self.file` lives.
            unsafe {
                libc::preadv2(
                    self.file.as_raw_fd(),
                    iovs.as_ptr(),
                    iovs.len() as libc::c_int,
                    offset as libc::off_t,
                    RWF_NOWAIT,
                )
            }
        });
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match errno(&e) {
            libc::EAGAIN => Ok(None),
            libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS => {
                self.nowait_read.store(false, Ordering::Relaxed);
                Ok(None)
            }
            libc::EINTR => Ok(None),
            _ => Err(self.io_err("reading", e)),
        }
    }

    /// One inline `pwritev2(RWF_NOWAIT)` of `buf` from byte `skip` on; `Ok(None)` when it
    /// would block.
    fn try_write_nowait(&self, offset: u64, buf: &SgList, skip: usize) -> Result<Option<usize>> {
        let n = buf.with_iovecs(skip, |iovs| {
            // SAFETY: the iovecs describe memory of `buf`, valid for reads during the call;
            // the fd is open while `self.file` lives.
            unsafe {
                libc::pwritev2(
                    self.file.as_raw_fd(),
                    iovs.as_ptr(),
                    iovs.len() as libc::c_int,
                    offset as libc::off_t,
                    RWF_NOWAIT,
                )
            }
        });
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match errno(&e) {
            libc::EAGAIN | libc::EINTR => Ok(None),
            libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS => {
                self.nowait_write.store(false, Ordering::Relaxed);
                Ok(None)
            }
            _ => Err(self.io_err("writing", e)),
        }
    }

    /// Whether a buffered write of the range may run on the calling thread: it needs no read
    /// from the disk (whole pages, or pages all cached) and no write was slow lately.
    fn may_write_inline(&self, offset: u64, len: usize) -> bool {
        if !self.inline_write || len > MAX_INLINE_WRITE || self.writes_go_to_the_pool() {
            return false;
        }
        let page = page_size();
        (offset % page == 0 && len as u64 % page == 0) || self.cached(offset, len)
    }

    /// Whether a slow write lately sends writes to the pool (the clock is read only then).
    fn writes_go_to_the_pool(&self) -> bool {
        let until = self.pool_writes_until.load(Ordering::Relaxed);
        until != 0 && clock() < until
    }

    /// Whether the page holding `offset` can be read without waiting (one byte read with
    /// `RWF_NOWAIT`).
    fn up_to_date(&self, offset: u64) -> bool {
        let mut byte = 0u8;
        let iov = libc::iovec {
            iov_base: (&mut byte as *mut u8).cast(),
            iov_len: 1,
        };
        // SAFETY: `iov` describes `byte`, valid for writes during the call; the fd is open.
        let n = unsafe {
            libc::preadv2(
                self.file.as_raw_fd(),
                &iov,
                1,
                offset as libc::off_t,
                RWF_NOWAIT,
            )
        };
        n == 1
    }

    /// Whether the file's pages can never wait for a device: on tmpfs while the system has
    /// no swap, a page is in memory or a hole, which reads as zeroes and is filled by
    /// allocating memory. `cachestat` is then not asked: it walks every page of the range,
    /// about 5% of the CPU time of a 1 MiB copy.
    fn never_waits(&self) -> bool {
        self.tmpfs && no_swap()
    }

    /// Whether every page of the range is in the page cache (`cachestat`), or can be read or
    /// written without waiting for a device all the same ([`never_waits`](Self::never_waits));
    /// false when that cannot be told.
    fn cached(&self, offset: u64, len: usize) -> bool {
        if !self.cachestat.load(Ordering::Relaxed) {
            return false;
        }
        if self.never_waits() {
            return true;
        }
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
        let range = Range {
            off: offset,
            len: len as u64,
        };
        let mut stat = Stat::default();
        // SAFETY: cachestat(fd, const struct cachestat_range *, struct cachestat *, flags):
        // both structs have the kernel's layout (u64 members, repr(C)) and live across the
        // call; the fd is open while `self.file` lives.
        let r = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                self.file.as_raw_fd(),
                &range as *const Range,
                &mut stat as *mut Stat,
                0,
            )
        };
        if r < 0 {
            // ENOSYS (old kernel), EPERM (seccomp), EOPNOTSUPP (hugetlbfs): stop asking.
            if errno(&io::Error::last_os_error()) != libc::EINTR {
                self.cachestat.store(false, Ordering::Relaxed);
            }
            return false;
        }
        let page = page_size();
        let pages = (offset + len as u64).div_ceil(page) - offset / page;
        stat.nr_cache >= pages
    }

    /// Whether an `O_DIRECT` request can use the caller's buffers as they are.
    fn direct_aligned(&self, offset: u64, buf: &SgList) -> bool {
        let align = self.align as usize;
        offset % align as u64 == 0 && buf.len() % align == 0 && buf.is_aligned(align)
    }

    async fn read_direct(&self, offset: u64, buf: &SgList) -> Result<()> {
        if self.direct_aligned(offset, buf) {
            let buf = buf.clone();
            return self
                .blocking("reading", move |f| read_full_sg(f, &buf, 0, offset))
                .await;
        }
        let align = u64::from(self.align);
        let start = offset / align * align;
        let end = (offset + buf.len() as u64).div_ceil(align) * align;
        let bounce = SgList::aligned((end - start) as usize, BUFFER_ALIGN)
            .map_err(|e| self.io_err("allocating a buffer for", e))?;
        let b = bounce.clone();
        self.blocking("reading", move |f| read_full_sg(f, &b, 0, start))
            .await?;
        let skip = (offset - start) as usize;
        let mut data = vec![0u8; buf.len()];
        bounce.copy_to_slice(skip, &mut data);
        buf.copy_from_slice(0, &data);
        Ok(())
    }

    async fn write_direct(&self, offset: u64, buf: &SgList, fua: bool) -> Result<()> {
        if self.direct_aligned(offset, buf) {
            let buf = buf.clone();
            let _shared = self.rmw.read().await;
            return self
                .blocking("writing", move |f| write_full_sg(f, &buf, 0, offset, fua))
                .await;
        }
        let align = u64::from(self.align);
        let start = offset / align * align;
        let end = (offset + buf.len() as u64).div_ceil(align) * align;
        let aligned = start == offset && end == offset + buf.len() as u64;
        let bounce = SgList::aligned((end - start) as usize, BUFFER_ALIGN)
            .map_err(|e| self.io_err("allocating a buffer for", e))?;
        let skip = (offset - start) as usize;
        let data = buf.to_vec();
        if aligned {
            bounce.copy_from_slice(0, &data);
            let _shared = self.rmw.read().await;
            self.blocking("writing", move |f| write_full_sg(f, &bounce, 0, start, fua))
                .await
        } else {
            let _exclusive = self.rmw.write().await;
            self.blocking("writing", move |f| {
                read_full_sg(f, &bounce, 0, start)?;
                bounce.copy_from_slice(skip, &data);
                write_full_sg(f, &bounce, 0, start, fua)
            })
            .await
        }
    }

    async fn fallocate(&self, what: &str, mode: libc::c_int, offset: u64, len: u64) -> Result<()> {
        self.blocking(what, move |f| {
            // SAFETY: plain syscall on an fd that stays open while `f` lives.
            let r = unsafe {
                libc::fallocate(
                    f.as_raw_fd(),
                    mode,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if r == -1 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        })
        .await
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<u64> {
        // SAFETY: plain syscall on an fd that stays open while `self.file` lives.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    }
}

fn device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(size)
    }
}

/// Memory alignment of `O_DIRECT` bounce buffers (enough for any request alignment we use).
const BUFFER_ALIGN: usize = 4096;

/// The smallest request alignment `O_DIRECT` reads accept on this file, found as QEMU does
/// (`raw_probe_alignment`): the first of 512, 1024, 2048 and 4096 that the kernel does not
/// refuse with `EINVAL`; 4096 when none works.
fn probe_direct_alignment(file: &File) -> u32 {
    let Ok(mut buf) = AlignedBuf::new(4096, BUFFER_ALIGN) else {
        return 4096;
    };
    for align in [512usize, 1024, 2048, 4096] {
        match file.read_at(&mut buf.as_mut_slice()[..align], 0) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            _ => return align as u32,
        }
    }
    4096
}

fn logical_block_size(file: &File) -> Option<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at `size`.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET as _, &mut size as *mut _) };
    (r == 0 && size > 0).then_some(size as u32)
}

/// How many times the calling thread gave up the CPU to wait (voluntary context switches).
fn voluntary_switches() -> i64 {
    // SAFETY: getrusage writes one `rusage` into the zeroed struct it is given.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut u);
        u
    };
    usage.ru_nvcsw as i64
}

/// Nanoseconds on a monotonic clock (since its first use in this process).
fn clock() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

/// Moves `len` bytes at `offset` of `f` into the pipe `pipe` with `splice(2)`. `Ok(false)`:
/// the file ended first, the pipe was full, memory was short, or splicing from this file is
/// not supported (`EINVAL`; `works` is then cleared).
fn splice_full(
    f: &File,
    pipe: &OwnedFd,
    offset: u64,
    len: usize,
    works: &AtomicBool,
) -> io::Result<bool> {
    let mut off = offset as libc::loff_t;
    let mut left = len;
    while left > 0 {
        // SAFETY: both fds are open for the call (`f` and `pipe` are borrowed); `off` is a
        // valid in/out offset for the input and the output offset is null, as a pipe requires.
        let n = unsafe {
            libc::splice(
                f.as_raw_fd(),
                &mut off,
                pipe.as_raw_fd(),
                std::ptr::null_mut(),
                left,
                libc::SPLICE_F_MOVE,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match errno(&e) {
                libc::EINTR => continue,
                libc::EAGAIN | libc::ENOMEM => return Ok(false),
                libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP => {
                    works.store(false, Ordering::Relaxed);
                    return Ok(false);
                }
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Ok(false);
        }
        left -= n as usize;
    }
    Ok(true)
}

/// Reads until `buf` is full from byte `skip` on; what lies beyond the end of the file reads
/// as zeroes.
fn read_full_sg(f: &File, buf: &SgList, mut skip: usize, mut offset: u64) -> io::Result<()> {
    while skip < buf.len() {
        let n = buf.with_iovecs(skip, |iovs| {
            // SAFETY: the iovecs describe memory of `buf`, which its owner keeps valid for
            // writes during the call; the fd is open while `f` is borrowed.
            unsafe {
                libc::preadv(
                    f.as_raw_fd(),
                    iovs.as_ptr(),
                    iovs.len() as libc::c_int,
                    offset as libc::off_t,
                )
            }
        });
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            buf.fill_zero(skip, buf.len() - skip);
            break;
        }
        skip += n as usize;
        offset += n as u64;
    }
    Ok(())
}

/// Writes all of `buf` from byte `skip` on; with `fua`, each write is `RWF_DSYNC`.
fn write_full_sg(
    f: &File,
    buf: &SgList,
    mut skip: usize,
    mut offset: u64,
    fua: bool,
) -> io::Result<()> {
    while skip < buf.len() {
        let n = buf.with_iovecs(skip, |iovs| {
            // SAFETY: the iovecs describe memory of `buf`, valid for reads during the call;
            // the fd is open while `f` is borrowed.
            unsafe {
                libc::pwritev2(
                    f.as_raw_fd(),
                    iovs.as_ptr(),
                    iovs.len() as libc::c_int,
                    offset as libc::off_t,
                    if fua { RWF_DSYNC } else { 0 },
                )
            }
        });
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        skip += n as usize;
        offset += n as u64;
    }
    Ok(())
}

impl ImageFacts for FileDriver {
    fn driver_name(&self) -> &'static str {
        if self.block_device {
            "host_device"
        } else {
            "file"
        }
    }

    fn filename(&self) -> Option<String> {
        Some(self.path.clone())
    }

    fn image_details(&self) -> ImageDetails {
        ImageDetails {
            actual_size: self.allocated_size(),
            dirty_flag: Some(false),
            format_specific: Some(serde_json::json!({
                "type": if self.block_device { "host_device" } else { "file" },
                "data": {},
            })),
            ..ImageDetails::default()
        }
    }
}

#[async_trait]
impl BlockIo for FileDriver {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn request_alignment(&self) -> u32 {
        self.align
    }

    async fn readv(&self, offset: u64, buf: &SgList) -> Result<()> {
        let _counted = InFlight::new(self);
        if self.direct {
            return self.read_direct(offset, buf).await;
        }
        let mut done = 0;
        if self.nowait_read.load(Ordering::Relaxed) {
            while done < buf.len() {
                match self.try_read_nowait(offset + done as u64, buf, done)? {
                    Some(0) => {
                        // Beyond the end of the file (it shrank behind our back): zeroes.
                        buf.fill_zero(done, buf.len() - done);
                        return Ok(());
                    }
                    Some(n) => done += n,
                    None => break,
                }
            }
            if done == buf.len() {
                return Ok(());
            }
        } else if self.inline_write
            && buf.len() <= MAX_INLINE_READ
            && self.cached(offset, buf.len())
        {
            // The kernel refuses `RWF_NOWAIT` for reads here (tmpfs does), but every page
            // is in memory: a copy out of the page cache, done here, costs less than a hop
            // to the pool and back.
            return read_full_sg(&self.file, buf, 0, offset).map_err(|e| self.io_err("reading", e));
        }
        let start = offset + done as u64;
        let buf = buf.clone();
        self.blocking("reading", move |f| read_full_sg(f, &buf, done, start))
            .await
    }

    async fn writev(&self, offset: u64, buf: &SgList, flags: WriteFlags) -> Result<()> {
        let _counted = InFlight::new(self);
        if self.direct {
            return self.write_direct(offset, buf, flags.fua).await;
        }
        let mut done = 0;
        if !flags.fua && self.nowait_write.load(Ordering::Relaxed) {
            while done < buf.len() {
                match self.try_write_nowait(offset + done as u64, buf, done)? {
                    Some(0) | None => break,
                    Some(n) => done += n,
                }
            }
            if done == buf.len() {
                return Ok(());
            }
        }
        let start = offset + done as u64;
        // Inline only where the kernel cannot say "would block" (`RWF_NOWAIT` refused): after
        // an `EAGAIN` the write goes to the pool.
        if !flags.fua
            && !self.nowait_write.load(Ordering::Relaxed)
            && self.may_write_inline(start, buf.len() - done)
        {
            // After a slow write, the next one is watched: only a write that slept (a
            // voluntary context switch: the kernel throttling writers) sends writes to the
            // pool; one that was merely preempted (a busy machine) does not.
            let probing = self.probe_next_write.load(Ordering::Relaxed);
            let slept_before = if probing { voluntary_switches() } else { 0 };
            let began = clock();
            let r = write_full_sg(&self.file, buf, done, start, false);
            let slow = clock() - began > SLOW_INLINE_WRITE.as_nanos() as u64;
            if probing {
                if slow && voluntary_switches() > slept_before {
                    self.pool_writes_until.store(
                        clock() + POOL_AFTER_SLOW_WRITE.as_nanos() as u64,
                        Ordering::Relaxed,
                    );
                }
                self.probe_next_write.store(false, Ordering::Relaxed);
            } else if slow {
                self.probe_next_write.store(true, Ordering::Relaxed);
            }
            return r.map_err(|e| self.io_err("writing", e));
        }
        let buf = buf.clone();
        self.blocking("writing", move |f| {
            write_full_sg(f, &buf, done, start, flags.fua)
        })
        .await
    }

    async fn flush(&self) -> Result<()> {
        if self.no_flush || self.read_only {
            return Ok(());
        }
        self.blocking("flushing", |f| f.sync_data()).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.forget_data_region();
        match self
            .fallocate(
                "discarding",
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
            .await
        {
            // Discard is advisory: a host that cannot punch holes ignores it.
            Err(e) if matches!(e.errno(), libc::EOPNOTSUPP | libc::EINVAL | libc::ENOTTY) => Ok(()),
            other => other,
        }
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.forget_data_region();
        let mode = if flags.may_unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        // Aligned O_DIRECT writes must not overlap a read-modify-write in flight.
        let _shared = if self.direct {
            Some(self.rmw.read().await)
        } else {
            None
        };
        let mut result = self.fallocate("zeroing", mode, offset, len).await;
        if flags.may_unmap && matches!(&result, Err(e) if e.errno() == libc::EOPNOTSUPP) {
            result = self
                .fallocate(
                    "zeroing",
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
                .await;
        }
        drop(_shared);
        match result {
            Ok(()) => {
                if flags.fua {
                    self.flush().await?;
                }
                Ok(())
            }
            Err(e) if matches!(e.errno(), libc::EOPNOTSUPP | libc::EINVAL | libc::ENOTTY) => {
                if flags.fast {
                    Err(BlockError::NotFast)
                } else {
                    write_zero_buffers(self, offset, len, flags.fua).await
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let data = Extent {
            len,
            data: true,
            zero: false,
            depth: 1,
        };
        // As QEMU (`qemu-img map` shows file holes as "present"): a hole is allocated in
        // this layer and reads as zeroes.
        let hole = |n: u64| Extent {
            len: n,
            data: false,
            zero: true,
            depth: 1,
        };
        if self.block_device {
            return Ok(data);
        }
        // The data region found last, as QEMU's block-status cache: on tmpfs SEEK_HOLE
        // walks every page up to the hole (milliseconds in a large file), and NBD asks before
        // every structured read. Only data is cached, and "data" is always a safe answer: a
        // hole punched meanwhile reads as zeroes all the same (discard and write-zeroes
        // forget the region; a write can only turn holes into data).
        let cached = *self.data_region.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((start, end)) = cached {
            if start <= offset && offset < end {
                return Ok(Extent {
                    len: (end - offset).min(len),
                    ..data
                });
            }
        }
        // Data first, in one lseek: from inside data, SEEK_HOLE finds where the data ends
        // (the end of the file at the latest); from inside a hole it answers `offset` itself.
        match self.seek(offset, libc::SEEK_HOLE) {
            Ok(h) if h > offset => {
                *self.data_region.lock().unwrap_or_else(|e| e.into_inner()) = Some((offset, h));
                Ok(Extent {
                    len: (h - offset).min(len),
                    ..data
                })
            }
            Ok(_) => match self.seek(offset, libc::SEEK_DATA) {
                Ok(d) if d > offset => Ok(hole((d - offset).min(len))),
                // No data after `offset`: a hole up to the end of the file.
                Err(e) if errno(&e) == libc::ENXIO => Ok(hole(len)),
                // Written in between.
                _ => Ok(data),
            },
            // At or past the end of the file (inside the size's rounding to 512 bytes).
            Err(e) if errno(&e) == libc::ENXIO => Ok(hole(len)),
            // SEEK_HOLE not supported: everything is data.
            Err(_) => Ok(data),
        }
    }
}

#[async_trait]
impl SpliceRead for FileDriver {
    async fn splice_read(&self, offset: u64, len: usize, pipe: &Arc<OwnedFd>) -> Result<bool> {
        if !self.splice.load(Ordering::Relaxed) {
            return Ok(false);
        }
        // `cachestat` also counts pages still being read in (readahead in flight); a page
        // read with `RWF_NOWAIT` must be up to date. Probing the last page suffices in
        // practice: readahead fills a window front to back.
        if self.cached(offset, len) && self.up_to_date(offset + len as u64 - 1) {
            return splice_full(&self.file, pipe, offset, len, &self.splice)
                .map_err(|e| self.io_err("reading", e));
        }
        let pipe = Arc::clone(pipe);
        let splice = Arc::clone(&self.splice);
        self.blocking("reading", move |f| {
            splice_full(f, &pipe, offset, len, &splice)
        })
        .await
    }
}

#[async_trait]
impl Resize for FileDriver {
    async fn resize(&self, new_size: u64) -> Result<()> {
        if self.block_device {
            let size = self.size();
            return match new_size.cmp(&size) {
                std::cmp::Ordering::Equal => Ok(()),
                std::cmp::Ordering::Greater => {
                    Err(BlockError::Invalid("Cannot grow device files".into()))
                }
                std::cmp::Ordering::Less => {
                    Err(BlockError::Invalid("Cannot shrink device files".into()))
                }
            };
        }
        self.forget_data_region();
        self.blocking("resizing", move |f| f.set_len(new_size))
            .await?;
        self.size
            .store(new_size.div_ceil(512) * 512, Ordering::Release);
        Ok(())
    }
}

#[async_trait]
impl BlockDriver for FileDriver {
    fn splice(&self) -> Option<&dyn SpliceRead> {
        // O_DIRECT bypasses the page cache: nothing to splice from.
        (!self.direct).then_some(self as &dyn SpliceRead)
    }

    fn resizer(&self) -> Option<&dyn Resize> {
        Some(self)
    }

    async fn set_active(&self, active: bool) -> Result<()> {
        if self.unlocked.load(Ordering::Acquire) != active {
            return Ok(());
        }
        // Another process may punch holes while we are inactive.
        self.forget_data_region();
        if active && !self.block_device {
            // Another process may have grown or shrunk the file meanwhile.
            let meta = self
                .blocking("reading the size of", |f| f.metadata())
                .await?;
            self.size
                .store(meta.len().div_ceil(512) * 512, Ordering::Release);
        }
        if let Some((perm, shared)) = self.locks {
            let file = Arc::clone(&self.file);
            let path = self.path.clone();
            tokio::task::spawn_blocking(move || {
                if active {
                    match lock::lock(&file, perm, shared) {
                        // `locking=auto` where the file system has no locks (deferred locks
                        // were never tried at open).
                        Err(e) if e.unsupported() => Ok(()),
                        r => r.map_err(|e| BlockError::Invalid(e.to_string())),
                    }
                } else {
                    lock::unlock(&file).map_err(|e| BlockError::io(format!("unlocking {path}"), e))
                }
            })
            .await
            .map_err(|e| BlockError::Invalid(e.to_string()))??;
        }
        self.unlocked.store(!active, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slice conveniences for the tests.
    impl FileDriver {
        async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            let list = SgList::zeroed(buf.len());
            self.readv(offset, &list).await?;
            list.copy_to_slice(0, buf);
            Ok(())
        }

        async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
            self.writev(offset, &SgList::from_vec(buf.to_vec()), flags)
                .await
        }
    }

    fn image(len: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; len]).expect("create image");
        (dir, path)
    }

    /// Drops the file's pages from the page cache; false (with a message) where the file
    /// system keeps them (tmpfs), and the caller skips what needs them gone.
    fn evict(drv: &FileDriver, path: &std::path::Path) -> bool {
        let f = File::open(path).expect("open");
        f.sync_all().expect("sync");
        // SAFETY: posix_fadvise on an open fd.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let gone = !drv.cached(0, 4096);
        if !gone {
            eprintln!(
                "SKIP: {} keeps its pages in memory (tmpfs?)",
                path.display()
            );
        }
        gone
    }

    /// A pipe big enough for `len` bytes: (read end, write end).
    fn pipe(len: usize) -> (File, Arc<OwnedFd>) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK) };
        assert_eq!(r, 0);
        // SAFETY: pipe2 succeeded, so both are open descriptors that nothing else owns.
        let (r, w) = unsafe {
            use std::os::fd::FromRawFd;
            (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        };
        // SAFETY: F_SETPIPE_SZ on an open pipe.
        let size = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, len as libc::c_int) };
        assert!(size as usize >= len, "pipe of {len} bytes: {size}");
        (r, Arc::new(w))
    }

    fn drain(r: &mut File, len: usize) -> Vec<u8> {
        use std::io::Read;
        let mut v = vec![0u8; len];
        r.read_exact(&mut v).expect("read the pipe");
        v
    }

    /// A file on tmpfs is known to live in memory; with no swap its holes, which
    /// `cachestat` counts as uncached, are read inline all the same, with zeroes.
    #[tokio::test]
    async fn tmpfs_holes_never_wait_without_swap() {
        let shm = std::path::Path::new("/dev/shm");
        let dir = tempfile::tempdir_in(shm).expect("tempdir in /dev/shm");
        let path = dir.path().join("img");
        let f = File::create(&path).expect("create");
        f.set_len(1 << 20).expect("a 1 MiB hole");
        f.write_at(&[7u8; 4096], 0).expect("one page of data");
        let drv = FileDriver::open(&FileOptions {
            filename: path.clone(),
            ..FileOptions::default()
        })
        .expect("open");
        assert!(drv.tmpfs, "/dev/shm is tmpfs here");
        assert_eq!(drv.never_waits(), no_swap_now());
        assert_eq!(
            drv.cached(8192, 65536),
            no_swap_now(),
            "a hole, cached only without swap"
        );
        let buf = SgList::from_vec(vec![1u8; 8192]);
        drv.readv(0, &buf).await.expect("read");
        let v = buf.into_vec().expect("the list's own vector");
        assert!(v[..4096].iter().all(|&b| b == 7) && v[4096..].iter().all(|&b| b == 0));
    }

    #[tokio::test]
    async fn splice_read_hands_cached_and_uncached_pages_to_a_pipe() {
        let (_dir, path) = image(0);
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
        std::fs::write(&path, &data).expect("write image");
        let drv = FileDriver::open(&FileOptions {
            filename: path.clone(),
            ..FileOptions::default()
        })
        .expect("open");
        let (mut r, w) = pipe(256 << 10);
        // Cached (just written): inline.
        assert!(drv.cached(4096, 200_000));
        assert!(drv.splice_read(4096, 200_000, &w).await.expect("splice"));
        assert_eq!(drain(&mut r, 200_000), &data[4096..204_096]);
        // Evicted: through the blocking pool, same bytes.
        if !evict(&drv, &path) {
            return;
        }
        assert!(!drv.cached(512 << 10, 100_000));
        assert!(drv
            .splice_read(512 << 10, 100_000, &w)
            .await
            .expect("splice"));
        assert_eq!(
            drain(&mut r, 100_000),
            &data[512 << 10..(512 << 10) + 100_000]
        );
        // Past the end of the file: refused, the caller reads instead.
        assert!(!drv
            .splice_read((1 << 20) - 10, 20, &w)
            .await
            .expect("splice"));
        // O_DIRECT never splices.
        let direct = FileDriver::open(&FileOptions {
            filename: path,
            direct: true,
            ..FileOptions::default()
        });
        if let Ok(direct) = direct {
            assert!(!direct.splice_read(0, 4096, &w).await.expect("splice"));
        }
    }

    #[tokio::test]
    async fn buffered_writes_run_inline_only_when_the_cache_takes_them_at_once() {
        let (_dir, path) = image(1 << 20);
        let drv = FileDriver::open(&FileOptions {
            filename: path.clone(),
            ..FileOptions::default()
        })
        .expect("open");
        let page = page_size() as usize;
        // Whole pages never need a read from the disk.
        assert!(drv.may_write_inline(page as u64, 2 * page));
        // Part of a page: inline only while the page is cached.
        if !evict(&drv, &path) {
            return;
        }
        assert!(!drv.may_write_inline(512, 512));
        drv.write(512, &[7u8; 512], WriteFlags::default())
            .await
            .expect("write through the pool");
        assert!(drv.may_write_inline(1024, 512), "the page is cached now");
        drv.write(1024, &[8u8; 512], WriteFlags::default())
            .await
            .expect("inline write");
        let mut back = vec![0u8; 1024];
        drv.read(512, &mut back).await.expect("read");
        assert_eq!(&back[..512], &[7u8; 512]);
        assert_eq!(&back[512..], &[8u8; 512]);
        // After a slow write, the pool for a while.
        drv.pool_writes_until.store(
            clock() + POOL_AFTER_SLOW_WRITE.as_nanos() as u64,
            Ordering::Relaxed,
        );
        assert!(!drv.may_write_inline(0, page));
        // O_DIRECT and no_inline never write inline.
        let pooled = FileDriver::open(&FileOptions {
            filename: path,
            no_inline: true,
            defer_locks: false,
            force_share: true,
            read_only: true,
            ..FileOptions::default()
        })
        .expect("open");
        assert!(!pooled.may_write_inline(0, page));
    }

    #[tokio::test]
    async fn direct_io_bounces_misaligned_requests() {
        let (_dir, path) = image(64 * 1024);
        let opts = FileOptions {
            filename: path.clone(),
            direct: true,
            locking: Locking::Off,
            ..FileOptions::default()
        };
        let drv = match FileDriver::open(&opts) {
            Ok(d) => d,
            // tmpfs refuses O_DIRECT; nothing to test there.
            Err(OpenError::Open { source, .. }) if errno(&source) == libc::EINVAL => {
                eprintln!("O_DIRECT not supported on the temp dir: skipped");
                return;
            }
            Err(e) => panic!("open: {e}"),
        };
        assert!(drv.request_alignment() >= 512);
        drv.write(1000, &[0xcd; 3000], WriteFlags::default())
            .await
            .expect("misaligned write");
        drv.write(4096, &[0xef; 4096], WriteFlags { fua: true })
            .await
            .expect("aligned write");
        let mut buf = vec![0u8; 10_000];
        drv.read(1, &mut buf).await.expect("misaligned read");
        assert!(buf[..999].iter().all(|&b| b == 0));
        assert!(buf[999..3999].iter().all(|&b| b == 0xcd));
        assert!(buf[3999..4095].iter().all(|&b| b == 0));
        assert!(buf[4095..8191].iter().all(|&b| b == 0xef));
        let on_disk = std::fs::read(&path).expect("read back");
        assert!(on_disk[1000..4000].iter().all(|&b| b == 0xcd));
    }

    #[test]
    fn works_without_a_tokio_runtime() {
        let (_dir, path) = image(8192);
        let drv = FileDriver::open(&FileOptions {
            filename: path,
            ..FileOptions::default()
        })
        .expect("open");
        futures_lite_block_on(async {
            drv.write(100, &[9; 5000], WriteFlags { fua: true })
                .await
                .expect("write");
            let mut buf = [0u8; 5000];
            drv.read(100, &mut buf).await.expect("read");
            assert!(buf.iter().all(|&b| b == 9));
            drv.flush().await.expect("flush");
        });
    }

    /// A minimal executor with no tokio runtime behind it.
    fn futures_lite_block_on<F: std::future::Future>(fut: F) -> F::Output {
        use std::task::{Context, Poll, Wake, Waker};
        struct ThreadWaker(std::thread::Thread);
        impl Wake for ThreadWaker {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut fut = std::pin::pin!(fut);
        loop {
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::park();
        }
    }

    #[tokio::test]
    async fn the_data_region_is_remembered_until_a_hole_may_be_punched() {
        let (_dir, path) = image(0);
        std::fs::write(&path, vec![1u8; 1 << 20]).expect("write image");
        let drv = FileDriver::open(&FileOptions {
            filename: path,
            ..FileOptions::default()
        })
        .expect("open");
        let e = drv.block_status(4096, 8192).await.expect("status");
        assert!(e.data && e.len == 8192);
        assert_eq!(
            *drv.data_region.lock().unwrap(),
            Some((4096, 1 << 20)),
            "SEEK_HOLE found the data up to the end"
        );
        // Answered from the region: no lseek needed.
        let e = drv.block_status(500_000, 1 << 20).await.expect("status");
        assert!(e.data);
        assert_eq!(e.len, (1 << 20) - 500_000);
        drv.discard(65536, 65536).await.expect("discard");
        assert_eq!(*drv.data_region.lock().unwrap(), None);
        let e = drv.block_status(65536, 65536).await.expect("status");
        if !e.data {
            // The file system punched the hole: it shows.
            assert!(e.zero);
        }
        drv.write_zeroes(0, 4096, ZeroFlags::default())
            .await
            .expect("zeroes");
        assert_eq!(*drv.data_region.lock().unwrap(), None);
    }

    #[tokio::test]
    async fn block_device_resize_is_refused_and_files_resize() {
        let (_dir, path) = image(4096);
        let drv = FileDriver::open(&FileOptions {
            filename: path.clone(),
            ..FileOptions::default()
        })
        .expect("open");
        assert!(!drv.is_block_device());
        drv.resize(8192).await.expect("grow");
        assert_eq!(drv.size(), 8192);
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 8192);
    }

    #[tokio::test]
    async fn missing_file_fails_and_read_only_opens() {
        let (_dir, path) = image(4096);
        let missing = path.with_file_name("missing");
        let err = FileDriver::open(&FileOptions {
            filename: missing,
            ..FileOptions::default()
        })
        .expect_err("missing file");
        assert!(err.to_string().starts_with("Could not open '"), "{err}");
        let drv = FileDriver::open(&FileOptions {
            filename: path,
            read_only: true,
            ..FileOptions::default()
        })
        .expect("read-only open");
        assert!(drv.read_only());
    }
}
