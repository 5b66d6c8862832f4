//! A log of the requests a backend has taken from each split virtqueue and not yet put in the
//! used ring, kept in shared memory that outlives the backend, so that the next backend
//! resubmits them. vhost-user's `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` keeps it in a memfd
//! the frontend holds on to (QEMU's docs/interop/vhost-user.rst, "Inflight I/O tracking");
//! VDUSE, whose kernel device outlives the daemon, in a file ([`InflightMap::open`]).
//!
//! The layout of a queue's region is the one QEMU's libvhost-user uses, so that a frontend
//! that moves between backends finds what it expects (the frontend itself never reads it):
//!
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//! struct { u8 inflight; u8 padding[5]; u16 next; u64 counter; } desc[desc_num];
//! ```

use crate::queue::InflightLog;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

const HEADER: usize = 16;
const DESC: usize = 16;
const VERSION: u16 = 1;

/// Bytes of one queue's region, rounded up to a cache line.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).next_multiple_of(64)
}

/// A mapping of the shared log file.
#[derive(Debug)]
pub struct InflightMap {
    ptr: NonNull<u8>,
    len: usize,
    queue_size: u16,
    num_queues: u16,
    file: File,
}

// SAFETY: the mapping is plain shared memory, accessed only through atomics.
unsafe impl Send for InflightMap {}
// SAFETY: as above; every access is atomic.
unsafe impl Sync for InflightMap {}

impl Drop for InflightMap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are the mapping made in `map`, unmapped once, here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl InflightMap {
    /// A new, zeroed log for `num_queues` queues of `queue_size`, in a memfd.
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<InflightMap> {
        if num_queues == 0 || queue_size == 0 || queue_size > 32768 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let name = c"vhost-user-blk-inflight";
        // SAFETY: a valid NUL-terminated name; no other memory is involved.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create returned a new descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let len = usize::from(num_queues) * queue_region_size(queue_size);
        file.set_len(len as u64)?;
        let map = InflightMap::map(file, 0, len, num_queues, queue_size)?;
        for q in 0..num_queues {
            let r = map.queue(q);
            r.header_u16(8).store(VERSION, Ordering::Relaxed);
            r.header_u16(10).store(queue_size, Ordering::Relaxed);
        }
        Ok(map)
    }

    /// The log kept in the file at `path` (created if missing, mode 0600). A file of another
    /// size (a log for other queues, or none) is emptied: nothing in it is recovered.
    pub fn open(
        path: &std::path::Path,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<InflightMap> {
        use std::os::unix::fs::OpenOptionsExt;
        if num_queues == 0 || queue_size == 0 || queue_size > 32768 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        let len = usize::from(num_queues) * queue_region_size(queue_size);
        if file.metadata()?.len() != len as u64 {
            file.set_len(0)?;
            file.set_len(len as u64)?;
        }
        InflightMap::map(file, 0, len, num_queues, queue_size)
    }

    /// Forgets every queue's log (the driver reset the device: nothing it had made available
    /// is owed any more).
    pub fn clear(&self) {
        for q in 0..self.num_queues {
            let r = self.queue(q);
            for h in 0..r.size {
                r.inflight(h).store(0, Ordering::Relaxed);
            }
            r.header_u16(8).store(0, Ordering::Release);
        }
    }

    /// Maps a log the frontend handed over (`SET_INFLIGHT_FD`).
    pub fn map(
        file: File,
        offset: u64,
        len: usize,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<InflightMap> {
        if len < usize::from(num_queues) * queue_region_size(queue_size) || len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a new shared mapping of `len` bytes of a file we hold; no existing memory is
        // affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(InflightMap {
            ptr: NonNull::new(ptr.cast()).expect("mmap gave a non-null address"),
            len,
            queue_size,
            num_queues,
            file,
        })
    }

    /// The file (for `GET_INFLIGHT_FD`'s answer).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never empty (a log has at least one queue).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues in the log.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Entries per queue.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn queue(&self, q: u16) -> QueueRegion<'_> {
        assert!(q < self.num_queues);
        // SAFETY: q < num_queues, so the region lies inside the mapping (checked in `map`).
        let base = unsafe {
            self.ptr
                .as_ptr()
                .add(usize::from(q) * queue_region_size(self.queue_size))
        };
        QueueRegion {
            base,
            size: self.queue_size,
            _map: self,
        }
    }
}

struct QueueRegion<'a> {
    base: *mut u8,
    size: u16,
    _map: &'a InflightMap,
}

impl QueueRegion<'_> {
    fn header_u16(&self, at: usize) -> &AtomicU16 {
        debug_assert!(at + 2 <= HEADER && at % 2 == 0);
        // SAFETY: inside the queue's header, 2-aligned (the mapping is page-aligned and the
        // region 64-aligned); shared memory accessed only atomically while mapped (`'a`).
        unsafe { AtomicU16::from_ptr(self.base.add(at).cast()) }
    }

    fn inflight(&self, head: u16) -> &AtomicU8 {
        debug_assert!(head < self.size);
        // SAFETY: entry `head` < desc_num lies inside the region; see `header_u16`.
        unsafe { AtomicU8::from_ptr(self.base.add(HEADER + DESC * usize::from(head))) }
    }

    fn counter(&self, head: u16) -> &AtomicU64 {
        // SAFETY: the entry's 8-byte-aligned counter, inside the region; see `header_u16`.
        unsafe { AtomicU64::from_ptr(self.base.add(HEADER + DESC * usize::from(head) + 8).cast()) }
    }
}

/// Where a queue starts again: its log, the chains to resubmit and the next available index.
#[derive(Debug)]
pub struct Resume {
    /// The queue's log, if there is one for it.
    pub log: Option<QueueLog>,
    /// Chains a previous backend had taken and not completed, oldest first.
    pub resubmit: Vec<u16>,
    /// Where the queue takes chains from: past those in the used ring and those resubmitted
    /// (with a log), or the transport's own `base` (without).
    pub next_avail: u16,
}

impl Resume {
    /// Queue `queue` of a ring of `ring_size` whose used index is `used_idx`, with the log in
    /// `map` if any; `base` is the transport's idea of the next available index.
    pub fn new(
        map: Option<&Arc<InflightMap>>,
        queue: u16,
        ring_size: u16,
        used_idx: u16,
        base: u16,
    ) -> Resume {
        let mut log = map.and_then(|m| QueueLog::new(Arc::clone(m), queue, ring_size));
        let resubmit = log
            .as_mut()
            .map(|l| l.recover(used_idx, ring_size))
            .unwrap_or_default();
        let next_avail = if log.is_some() {
            // Chains a previous backend took are either in the used ring or resubmitted.
            used_idx.wrapping_add(resubmit.len() as u16)
        } else {
            base
        };
        if !resubmit.is_empty() {
            tracing::info!(
                "queue {queue}: resubmitting {} requests a previous backend had in flight",
                resubmit.len()
            );
        }
        Resume {
            log,
            resubmit,
            next_avail,
        }
    }
}

/// One queue's log, kept by its worker (an [`InflightLog`]).
#[derive(Debug)]
pub struct QueueLog {
    map: Arc<InflightMap>,
    queue: u16,
    counter: u64,
}

impl QueueLog {
    /// The log of queue `queue` in `map`, if the map has it and matches `queue_size`.
    pub fn new(map: Arc<InflightMap>, queue: u16, queue_size: u16) -> Option<QueueLog> {
        if queue >= map.num_queues() || queue_size > map.queue_size() {
            return None;
        }
        Some(QueueLog {
            map,
            queue,
            counter: 0,
        })
    }

    /// What a previous backend left: brings the log in line with the used ring's index
    /// `used_idx` (undoing the one request it may have died between publishing and clearing)
    /// and returns the heads still in flight, oldest first (only heads of a ring of
    /// `ring_size`: a log's entries beyond it are nobody's). The queue must go on taking
    /// chains at `used_idx + returned.len()`.
    pub fn recover(&mut self, used_idx: u16, ring_size: u16) -> Vec<u16> {
        let r = self.map.queue(self.queue);
        if r.header_u16(8).load(Ordering::Relaxed) != VERSION {
            // A log no backend has written: nothing to recover.
            r.header_u16(8).store(VERSION, Ordering::Relaxed);
            r.header_u16(10)
                .store(self.map.queue_size(), Ordering::Relaxed);
            r.header_u16(14).store(used_idx, Ordering::Relaxed);
            return Vec::new();
        }
        if r.header_u16(14).load(Ordering::Acquire) != used_idx {
            let last = r.header_u16(12).load(Ordering::Relaxed);
            if last < r.size {
                r.inflight(last).store(0, Ordering::Relaxed);
            }
            r.header_u16(14).store(used_idx, Ordering::Release);
        }
        let mut heads: Vec<(u64, u16)> = (0..r.size.min(ring_size))
            .filter(|&h| r.inflight(h).load(Ordering::Acquire) == 1)
            .map(|h| (r.counter(h).load(Ordering::Relaxed), h))
            .collect();
        heads.sort_unstable();
        self.counter = heads.last().map_or(0, |&(c, _)| c);
        heads.into_iter().map(|(_, h)| h).collect()
    }
}

impl InflightLog for QueueLog {
    fn started(&mut self, head: u16) {
        let r = self.map.queue(self.queue);
        if head >= r.size {
            return;
        }
        self.counter += 1;
        r.counter(head).store(self.counter, Ordering::Relaxed);
        r.inflight(head).store(1, Ordering::Release);
    }

    fn before_used(&mut self, head: u16) {
        let r = self.map.queue(self.queue);
        r.header_u16(12).store(head, Ordering::Release);
    }

    fn after_used(&mut self, head: u16, used_idx: u16) {
        let r = self.map.queue(self.queue);
        if head < r.size {
            r.inflight(head).store(0, Ordering::Release);
        }
        fence(Ordering::SeqCst);
        r.header_u16(14).store(used_idx, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_file_is_found_again_and_a_clear_one_recovers_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let map = Arc::new(InflightMap::open(&path, 1, 16).expect("open"));
        let mut first = QueueLog::new(Arc::clone(&map), 0, 16).expect("log");
        assert!(first.recover(0, 16).is_empty());
        first.started(4);
        first.started(9);
        drop(first);
        drop(map);
        let map = Arc::new(InflightMap::open(&path, 1, 16).expect("open again"));
        let mut second = QueueLog::new(Arc::clone(&map), 0, 16).expect("log");
        assert_eq!(second.recover(0, 16), vec![4, 9]);
        map.clear();
        let mut third = QueueLog::new(Arc::clone(&map), 0, 16).expect("log");
        assert!(
            third.recover(0, 16).is_empty(),
            "a reset device owes nothing"
        );
        drop((second, third, map));
        // Another geometry: emptied, not misread.
        let map = Arc::new(InflightMap::open(&path, 2, 16).expect("open larger"));
        let mut other = QueueLog::new(map, 1, 16).expect("log");
        assert!(other.recover(0, 16).is_empty());
    }

    #[test]
    fn a_second_backend_finds_what_the_first_left_in_flight() {
        let map = Arc::new(InflightMap::create(2, 8).expect("create"));
        let mut first = QueueLog::new(Arc::clone(&map), 1, 8).expect("log");
        assert!(first.recover(0, 8).is_empty());
        for h in [3, 5, 1, 7] {
            first.started(h);
        }
        // 5 completes normally; 1 is published in the used ring but the backend dies before
        // clearing it.
        first.before_used(5);
        first.after_used(5, 1);
        first.before_used(1);
        drop(first);

        let file = map.file().try_clone().expect("clone");
        let len = map.len();
        let again = Arc::new(InflightMap::map(file, 0, len, 2, 8).expect("map"));
        let mut second = QueueLog::new(Arc::clone(&again), 1, 8).expect("log");
        assert_eq!(
            second.recover(2, 8),
            vec![3, 7],
            "oldest first, 1 and 5 done"
        );
        // Queue 0 was never used.
        let mut other = QueueLog::new(again, 0, 8).expect("log");
        assert!(other.recover(0, 8).is_empty());
        // New requests count on from the recovered ones.
        second.started(2);
        assert_eq!(second.counter, 5);
    }
}
