//! A vhost-user-blk client for the tests, on libblkio's `virtio-blk-vhost-user` driver: a real
//! virtio-blk front end in this process, no VM.
//!
//! What libblkio asks of the client (and so what a server meets):
//! - every data buffer lies in a memory region that was mapped with the device after `start`
//!   (the driver sends it to the back end with `VHOST_USER_ADD_MEM_REG`, fd and all); this
//!   module keeps one region, cut into fixed slots, one slot per request in flight;
//! - the back end must offer `VHOST_USER_F_PROTOCOL_FEATURES` and the protocol features
//!   `REPLY_ACK`, `CONFIG` and `CONFIGURE_MEM_SLOTS` (`MQ` is used when offered);
//! - a device that offers `VIRTIO_BLK_F_RO` must be opened with `read-only` set, or `start`
//!   fails with `EROFS`; then libblkio itself fails every write, write-zeroes and discard with
//!   `EBADF` before it reaches the device.
//!
//! Requests are submitted without waiting ([`VhostClient::submit`]) and reaped later
//! ([`VhostClient::reap`]), so that many are in flight on every queue at once.

pub use crate::model::Op;
use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

/// How to open the device.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Virtqueues to start (at most what the back end offers).
    pub num_queues: usize,
    /// Open read-only (required when the back end offers `VIRTIO_BLK_F_RO`).
    pub read_only: bool,
    /// Descriptors per virtqueue (a power of two); libblkio's default (256) when `None`.
    pub queue_size: Option<i32>,
    /// The largest request, in bytes: the size of one buffer slot.
    pub max_request: usize,
    /// Buffer slots, i.e. requests that may be in flight over all queues at once.
    pub slots: usize,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            num_queues: 1,
            read_only: false,
            queue_size: None,
            max_request: 1 << 20,
            slots: 128,
        }
    }
}

/// The result of one request: `ret` is 0 or a negative errno; `data` is what a read read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub ret: i32,
    pub data: Vec<u8>,
}

/// A request submitted and not yet reaped.
struct Pending {
    slot: Option<usize>,
    read_len: Option<usize>,
}

/// A connected and started libblkio instance with its buffer region.
pub struct VhostClient {
    // Field order matters: the queues refer to the driver's virtqueue memory, so they are
    // dropped before `blkio` (Rust drops fields in declaration order).
    queues: Vec<Blkioq>,
    blkio: Blkio,
    region: MemoryRegion,
    slot_size: usize,
    free_slots: Vec<usize>,
    pending: Vec<HashMap<usize, Pending>>,
    next_id: usize,
}

fn blkio_err(what: &str, e: blkio::Error) -> String {
    format!(
        "{what}: {} (errno {})",
        e.message(),
        e.errno().raw_os_error()
    )
}

impl VhostClient {
    /// Connects to the vhost-user socket at `path` and starts the queues. The error is
    /// libblkio's errno and message.
    pub fn connect(path: &Path, opts: &ConnectOptions) -> Result<VhostClient, blkio::Error> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", path.to_str().expect("socket path is UTF-8"))?;
        if opts.read_only {
            blkio.set_bool("read-only", true)?;
        }
        blkio.connect()?;
        blkio.set_i32("num-queues", opts.num_queues as i32)?;
        if let Some(size) = opts.queue_size {
            blkio.set_i32("queue-size", size)?;
        }
        let outcome = blkio.start()?;
        let align = blkio.get_u64("mem-region-alignment")? as usize;
        let slot_size = opts.max_request.next_multiple_of(align.max(4096));
        let region = blkio.alloc_mem_region(slot_size * opts.slots)?;
        blkio.map_mem_region(&region)?;
        Ok(VhostClient {
            pending: outcome.queues.iter().map(|_| HashMap::new()).collect(),
            queues: outcome.queues,
            blkio,
            region,
            slot_size,
            free_slots: (0..opts.slots).rev().collect(),
            next_id: 0,
        })
    }

    /// Connects, retrying while the socket is not there yet or refuses (the server is still
    /// starting), until `timeout`; panics with libblkio's error after that or on any other
    /// error.
    pub fn connect_wait(path: &Path, opts: &ConnectOptions, timeout: Duration) -> VhostClient {
        let deadline = Instant::now() + timeout;
        loop {
            match VhostClient::connect(path, opts) {
                Ok(c) => return c,
                Err(e) => {
                    let errno = e.errno().raw_os_error();
                    let retry = errno == libc::ENOENT || errno == libc::ECONNREFUSED;
                    if !retry || Instant::now() >= deadline {
                        panic!("{}", blkio_err(&format!("connect {}", path.display()), e));
                    }
                    // Between connection attempts, not instead of them.
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    /// The started queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The device's capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.prop_u64("capacity")
    }

    /// A u64 property of the driver (libblkio's names: `capacity`, `max-discard-len`, ...).
    pub fn prop_u64(&self, name: &str) -> u64 {
        self.blkio
            .get_u64(name)
            .unwrap_or_else(|e| panic!("{}", blkio_err(name, e)))
    }

    /// An i32 property (`request-alignment` is the device's logical block size, ...).
    pub fn prop_i32(&self, name: &str) -> i32 {
        self.blkio
            .get_i32(name)
            .unwrap_or_else(|e| panic!("{}", blkio_err(name, e)))
    }

    /// A bool property (`flush-needed`, ...).
    pub fn prop_bool(&self, name: &str) -> bool {
        self.blkio
            .get_bool(name)
            .unwrap_or_else(|e| panic!("{}", blkio_err(name, e)))
    }

    /// Requests submitted on `queue` and not reaped yet.
    pub fn in_flight(&self, queue: usize) -> usize {
        self.pending[queue].len()
    }

    /// A buffer slot's memory.
    fn slot_ptr(&self, slot: usize) -> *mut u8 {
        (self.region.addr + slot * self.slot_size) as *mut u8
    }

    fn take_slot(&mut self, len: usize) -> usize {
        assert!(
            len <= self.slot_size,
            "request of {len} bytes over the slot size {}",
            self.slot_size
        );
        self.free_slots
            .pop()
            .expect("every buffer slot is in flight: raise ConnectOptions::slots")
    }

    /// Submits `op` on `queue` without waiting; returns the id its outcome is reaped under.
    /// libblkio sends it to the device at the next [`VhostClient::reap`].
    pub fn submit(&mut self, queue: usize, op: &Op) -> usize {
        let id = self.next_id;
        self.next_id += 1;
        let mut pending = Pending {
            slot: None,
            read_len: None,
        };
        match op {
            Op::Read { offset, len } => {
                let slot = self.take_slot(*len);
                let ptr = self.slot_ptr(slot);
                pending.slot = Some(slot);
                pending.read_len = Some(*len);
                self.queues[queue].read(*offset, ptr, *len, id, ReqFlags::empty());
            }
            Op::Write { offset, data, fua } => {
                let slot = self.take_slot(data.len());
                let ptr = self.slot_ptr(slot);
                // SAFETY: the slot is `slot_size >= data.len()` bytes inside the region this
                // client allocated and keeps mapped; no request in flight uses this slot (it
                // was free), so nothing else reads or writes these bytes now.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, data.len()) };
                pending.slot = Some(slot);
                let flags = if *fua {
                    ReqFlags::FUA
                } else {
                    ReqFlags::empty()
                };
                self.queues[queue].write(*offset, ptr, data.len(), id, flags);
            }
            Op::WriteZeroes { offset, len, unmap } => {
                let flags = if *unmap {
                    ReqFlags::empty()
                } else {
                    ReqFlags::NO_UNMAP
                };
                self.queues[queue].write_zeroes(*offset, *len, id, flags);
            }
            Op::Discard { offset, len } => {
                self.queues[queue].discard(*offset, *len, id, ReqFlags::empty());
            }
            Op::Flush => self.queues[queue].flush(id, ReqFlags::empty()),
        }
        self.pending[queue].insert(id, pending);
        id
    }

    /// Sends what was submitted on `queue` and reaps completions: waits for at least `min`
    /// of them (at most `timeout`), then returns every one that is there, as (id, outcome).
    /// Err(errno) if the wait timed out (`ETIME`) or failed; completions that arrived are kept
    /// for the next call.
    pub fn reap(
        &mut self,
        queue: usize,
        min: usize,
        timeout: Duration,
    ) -> Result<Vec<(usize, Outcome)>, i32> {
        let want = self.pending[queue].len().max(1);
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..want).map(|_| MaybeUninit::uninit()).collect();
        let mut t = timeout;
        let n = self.queues[queue]
            .do_io(
                &mut completions,
                min.min(self.pending[queue].len()),
                Some(&mut t),
                None,
            )
            .map_err(|e| e.errno().raw_os_error())?;
        let mut out = Vec::with_capacity(n);
        for c in &completions[..n] {
            // SAFETY: do_io wrote the first `n` elements.
            let c = unsafe { c.assume_init_ref() };
            let p = self.pending[queue]
                .remove(&c.user_data)
                .unwrap_or_else(|| panic!("completion for unknown request {}", c.user_data));
            let mut data = Vec::new();
            if let (Some(slot), Some(len)) = (p.slot, p.read_len) {
                if c.ret == 0 {
                    data.resize(len, 0);
                    // SAFETY: the read finished (the device wrote the slot and is done with
                    // it); the slot holds at least `len` bytes of the mapped region.
                    unsafe {
                        std::ptr::copy_nonoverlapping(self.slot_ptr(slot), data.as_mut_ptr(), len)
                    };
                }
            }
            if let Some(slot) = p.slot {
                self.free_slots.push(slot);
            }
            out.push((c.user_data, Outcome { ret: c.ret, data }));
        }
        Ok(out)
    }

    /// Runs a batch: submits every (queue, op) at once, then waits for all of them (60 s at
    /// most); returns the outcomes in the batch's order.
    pub fn run(&mut self, batch: &[(usize, Op)]) -> Vec<Outcome> {
        let ids: Vec<usize> = batch.iter().map(|(q, op)| self.submit(*q, op)).collect();
        let mut done: HashMap<usize, Outcome> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        for q in 0..self.queues.len() {
            while self.in_flight(q) > 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                let n = self.in_flight(q);
                match self.reap(q, n, left) {
                    Ok(got) => done.extend(got),
                    Err(errno) => panic!(
                        "queue {q}: {n} requests never completed (errno {errno}): batch {batch:?}"
                    ),
                }
            }
        }
        ids.iter()
            .map(|id| done.remove(id).expect("every request completed"))
            .collect()
    }

    /// Runs one request on `queue` and returns its outcome.
    pub fn run_one(&mut self, queue: usize, op: Op) -> Outcome {
        self.run(&[(queue, op)]).pop().expect("one outcome")
    }

    /// Reads `len` bytes at `offset` on queue 0 (in pieces of the slot size, all in flight at
    /// once); panics on error.
    pub fn read(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let batch: Vec<(usize, Op)> = (0..len)
            .step_by(self.slot_size)
            .map(|at| {
                let piece = (len - at).min(self.slot_size);
                (
                    0,
                    Op::Read {
                        offset: offset + at as u64,
                        len: piece,
                    },
                )
            })
            .collect();
        let mut data = Vec::with_capacity(len);
        for o in self.run(&batch) {
            assert_eq!(o.ret, 0, "read {len} at {offset}");
            data.extend_from_slice(&o.data);
        }
        data
    }

    /// Writes `data` at `offset` on queue 0; panics on error.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let o = self.run_one(
            0,
            Op::Write {
                offset,
                data: data.to_vec(),
                fua: false,
            },
        );
        assert_eq!(o.ret, 0, "write {} at {offset}", data.len());
    }

    /// Flushes on queue 0; panics on error.
    pub fn flush(&mut self) {
        assert_eq!(self.run_one(0, Op::Flush).ret, 0, "flush");
    }
}

/// Sends `ops` one after another to the device at `path` on one virtqueue, through
/// virtio-driver (the driver under libblkio) with a feature set that leaves out
/// `VIRTIO_BLK_F_RO`: the requests reach the device even where libblkio would refuse them
/// itself (a write to a read-only device). Returns each request's result (0, or `-EIO` for
/// `VIRTIO_BLK_S_IOERR`, `-ENOTSUP` for `VIRTIO_BLK_S_UNSUPP`) and the data of reads.
pub fn raw_requests(path: &Path, ops: &[Op]) -> Vec<Outcome> {
    use std::os::fd::{AsRawFd, FromRawFd};
    use virtio_driver::{
        VhostUser, VirtioBlkFeatureFlags, VirtioBlkQueue, VirtioBlkTransport, VirtioFeatureFlags,
    };

    let features = VirtioFeatureFlags::VERSION_1.bits()
        | (VirtioBlkFeatureFlags::BLK_SIZE
            | VirtioBlkFeatureFlags::FLUSH
            | VirtioBlkFeatureFlags::DISCARD
            | VirtioBlkFeatureFlags::WRITE_ZEROES)
            .bits();
    let vu = VhostUser::new(path.to_str().expect("UTF-8 path"), features)
        .unwrap_or_else(|e| panic!("vhost-user connect {}: {e}", path.display()));
    let mut transport: Box<VirtioBlkTransport> = Box::new(vu);
    let mut queues = VirtioBlkQueue::<usize>::setup_queues(&mut *transport, 1, 16)
        .unwrap_or_else(|e| panic!("setup_queues: {e}"));
    let queue = &mut queues[0];

    let len = ops
        .iter()
        .map(|op| match op {
            Op::Read { len, .. } => *len,
            Op::Write { data, .. } => data.len(),
            _ => 0,
        })
        .max()
        .unwrap_or(0)
        .next_multiple_of(4096)
        .max(4096);
    let name = c"raw-requests";
    // SAFETY: memfd_create with a valid NUL-terminated name; no memory is handed over.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is the memfd just created and owned here; OwnedFd closes it once.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on a descriptor we own; no memory is involved.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) }, 0);
    // SAFETY: a fresh shared mapping of `len` bytes of our memfd; nothing else uses that
    // address range. It is unmapped at the end of this function, after the last request.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED, "mmap");
    transport
        .map_mem_region(addr as usize, len, fd.as_raw_fd(), 0)
        .unwrap_or_else(|e| panic!("map_mem_region: {e}"));
    let base = addr as *mut u8;

    let notifier = transport.get_submission_notifier(0);
    let call = transport.get_completion_fd(0);
    let mut out = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let queued = match op {
            // SAFETY: `base` is our mapping of at least `len` bytes (the largest request),
            // which the device may write while this one request is in flight; nothing in this
            // process touches it until the completion.
            Op::Read { offset, len } => unsafe { queue.read_raw(*offset, base, *len, i) },
            Op::Write { offset, data, .. } => {
                // SAFETY: as above; no request is in flight, so the mapping is ours alone.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), base, data.len()) };
                // SAFETY: as above; the device only reads the buffer.
                unsafe { queue.write_raw(*offset, base, data.len(), i) }
            }
            Op::WriteZeroes { offset, len, unmap } => queue.write_zeroes(*offset, *len, *unmap, i),
            Op::Discard { offset, len } => queue.discard(*offset, *len, i),
            Op::Flush => queue.flush(i),
        };
        queued.unwrap_or_else(|e| panic!("queue {op:?}: {e}"));
        notifier.notify().expect("kick");
        let deadline = Instant::now() + Duration::from_secs(30);
        let ret = loop {
            if let Some(c) = queue.completions().next() {
                assert_eq!(c.context, i, "completion of another request");
                break c.ret;
            }
            assert!(Instant::now() < deadline, "{op:?} never completed");
            let mut pfd = libc::pollfd {
                fd: call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; a short timeout, then the used ring is checked again.
            if unsafe { libc::poll(&mut pfd, 1, 10) } > 0 {
                let _ = call.read();
            }
        };
        let mut data = Vec::new();
        if let (Op::Read { len, .. }, 0) = (op, ret) {
            data.resize(*len, 0);
            // SAFETY: the read completed, so the device is done with the buffer, which holds
            // at least `len` bytes of our mapping.
            unsafe { std::ptr::copy_nonoverlapping(base, data.as_mut_ptr(), *len) };
        }
        out.push(Outcome { ret, data });
    }
    drop(queues);
    drop(transport);
    // SAFETY: the mapping made above; the device connection is closed and no pointer into it
    // is used any more.
    unsafe { libc::munmap(addr, len) };
    out
}
