//! Serving one virtqueue: requests popped, checked, started through block-core's vectored
//! handle straight on guest memory, and completed out of order as they finish.
//!
//! The transport (vhost-user, VDUSE) owns the [`Queue`] and its notifications; it calls
//! [`QueueHandler::process_queue`] when the driver kicks and [`QueueHandler::complete`] when
//! the handler's [`completion_fd`](QueueHandler::completion_fd) is readable, and signals the
//! driver when `complete` says so. Many requests are in flight at once: the handler never
//! waits for one.

use crate::chain::{walk, ChainError, Segment};
use crate::config::DeviceConfig;
use crate::request::{parse, Action, Limits, ID_BYTES};
use crate::status::{status_of, Status};
use block_core::{Completion, CompletionQueue, Request, SgList, Submitter, WriteFlags, ZeroFlags};
use std::any::Any;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

/// Guest memory whose buffers may be handed to block-core as raw pointers: every slice it
/// gives stays mapped, at the same address, for as long as the memory object lives.
///
/// # Safety
/// An implementation promises that the pointers of the [`vm_memory::VolatileSlice`]s its
/// `get_slices` returns stay valid for reads and writes of their length until the object is
/// dropped (no pointer guard unmaps on drop, no region is unmapped while it lives).
pub unsafe trait StableMemory: GuestMemory + Send + Sync + 'static {}

// SAFETY: a GuestMemoryMmap maps its regions when it is built and unmaps them when the last
// reference to a region goes, which our `Arc<GuestMemoryMmap>` owner keeps; its slices'
// pointer guards are plain pointers (the Xen backend, which maps on demand, is not enabled).
unsafe impl StableMemory for GuestMemoryMmap<()> {}

/// Hooks a transport may keep an in-flight log with (vhost-user's `INFLIGHT_SHMFD`): called
/// when a chain is taken from the available ring, and around the used-ring update of its
/// completion. The defaults do nothing.
pub trait InflightLog {
    /// The chain at `head` was taken.
    fn started(&mut self, _head: u16) {}
    /// The chain at `head` is about to be put in the used ring.
    fn before_used(&mut self, _head: u16) {}
    /// The chain at `head` is in the used ring, whose index is now `used_idx`.
    fn after_used(&mut self, _head: u16, _used_idx: u16) {}
}

/// An [`InflightLog`] that keeps nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoLog;
impl InflightLog for NoLog {}

/// The device side shared by every queue of one device.
#[derive(Debug)]
pub struct BlkDevice {
    submitter: Submitter,
    logical_block_size: u32,
    seg_max: u32,
    writable: bool,
    writeback: AtomicBool,
    serial: Vec<u8>,
    has_serial: bool,
}

impl BlkDevice {
    /// A device doing its I/O through `submitter`, as `config` describes it.
    pub fn new(submitter: Submitter, config: &DeviceConfig) -> BlkDevice {
        // The device ID is a NUL-padded string of 20 bytes: a shorter serial is padded, so
        // that what the driver's buffer held before (a VDUSE bounce page) is not read as part
        // of it.
        let serial = config.serial.as_deref().map(|s| {
            let mut id = s.as_bytes()[..s.len().min(ID_BYTES)].to_vec();
            id.resize(ID_BYTES, 0);
            id
        });
        BlkDevice {
            submitter,
            logical_block_size: config.logical_block_size.max(512),
            seg_max: config.seg_max(),
            writable: config.writable,
            writeback: AtomicBool::new(config.writeback),
            has_serial: serial.is_some(),
            serial: serial.unwrap_or_default(),
        }
    }

    /// Whether the write cache is on (the driver flushes), or every write is made stable
    /// before it completes.
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    /// The driver wrote the config space's `writeback` byte.
    pub fn set_writeback(&self, on: bool) {
        self.writeback.store(on, Ordering::Relaxed);
    }

    /// The submitter requests go through.
    pub fn submitter(&self) -> &Submitter {
        &self.submitter
    }

    fn limits(&self) -> Limits {
        Limits {
            size: self.submitter.attachment().size(),
            logical_block_size: self.logical_block_size,
            seg_max: self.seg_max,
            writable: self.writable,
        }
    }
}

/// A chain named memory outside the map it was tried on.
struct Miss;

struct Pending<M> {
    head: u16,
    status: GuestAddress,
    /// Bytes written into the chain on success (data and status byte).
    used_len: u32,
    mem: Arc<M>,
}

/// One queue's requests: see the [module docs](self).
pub struct QueueHandler<M: StableMemory> {
    device: Arc<BlkDevice>,
    completions: CompletionQueue,
    pending: Vec<Option<Pending<M>>>,
    free: Vec<usize>,
    in_flight: usize,
    done: Vec<(u64, Completion)>,
    segs: Vec<Segment>,
    warned: bool,
    /// Used entries were added since the driver was last considered for a notification,
    /// with the memory they were added in.
    added: Option<Arc<M>>,
}

impl<M: StableMemory> std::fmt::Debug for QueueHandler<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueHandler")
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl<M: StableMemory> QueueHandler<M> {
    /// A handler for one queue of `device`.
    pub fn new(device: Arc<BlkDevice>) -> io::Result<QueueHandler<M>> {
        Ok(QueueHandler {
            device,
            completions: CompletionQueue::new()?,
            pending: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            done: Vec::new(),
            segs: Vec::new(),
            warned: false,
            added: None,
        })
    }

    /// Readable when requests have completed: call [`complete`](Self::complete).
    pub fn completion_fd(&self) -> BorrowedFd<'_> {
        self.completions.eventfd()
    }

    /// Requests started and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Takes every chain the driver made available and starts it (re-enabling notifications
    /// and looking again, so that no kick is lost).
    pub fn process_queue(
        &mut self,
        queue: &mut Queue,
        mem: &Arc<M>,
        log: &mut dyn InflightLog,
    ) -> Result<(), virtio_queue::Error> {
        let mut mem = Arc::clone(mem);
        self.process_queue_with(queue, &mut mem, log, &mut || None)
    }

    /// As [`process_queue`](Self::process_queue), for memory that may be incomplete: a chain
    /// that names memory outside `mem` calls `refresh`, and when that gives a newer map the
    /// chain is tried again on it (and `mem` is the newer map from then on). Only then is the
    /// chain refused.
    pub fn process_queue_with(
        &mut self,
        queue: &mut Queue,
        mem: &mut Arc<M>,
        log: &mut dyn InflightLog,
        refresh: &mut dyn FnMut() -> Option<Arc<M>>,
    ) -> Result<(), virtio_queue::Error> {
        loop {
            queue.disable_notification(&**mem)?;
            while let Some(chain) = queue.pop_descriptor_chain(&**mem) {
                let head = chain.head_index();
                log.started(head);
                self.start(queue, mem, head, log, refresh);
            }
            if !queue.enable_notification(&**mem)? {
                return Ok(());
            }
        }
    }

    /// Starts the chains at `heads` again (requests a previous backend had taken and not
    /// completed, from an in-flight log).
    pub fn resubmit(
        &mut self,
        queue: &mut Queue,
        mem: &mut Arc<M>,
        heads: &[u16],
        log: &mut dyn InflightLog,
        refresh: &mut dyn FnMut() -> Option<Arc<M>>,
    ) {
        for &head in heads {
            self.start(queue, mem, head, log, refresh);
        }
    }

    fn start(
        &mut self,
        queue: &mut Queue,
        mem: &mut Arc<M>,
        head: u16,
        log: &mut dyn InflightLog,
        refresh: &mut dyn FnMut() -> Option<Arc<M>>,
    ) {
        if self.try_start(queue, mem, head, log, true).is_ok() {
            return;
        }
        if let Some(newer) = refresh() {
            *mem = newer;
        }
        let _ = self.try_start(queue, mem, head, log, false);
    }

    /// Starts the chain at `head`. With `may_miss`, a chain naming memory outside `mem` is
    /// left untouched (`Err`) for the caller to retry on a fresher map; otherwise it is
    /// refused or failed.
    fn try_start(
        &mut self,
        queue: &mut Queue,
        mem: &Arc<M>,
        head: u16,
        log: &mut dyn InflightLog,
        may_miss: bool,
    ) -> Result<(), Miss> {
        let mut segs = std::mem::take(&mut self.segs);
        let walked = walk(
            &**mem,
            GuestAddress(queue.desc_table()),
            queue.size(),
            head,
            &mut segs,
        );
        let parsed = match walked {
            Err(ChainError::BadAddress) if may_miss => {
                self.segs = segs;
                return Err(Miss);
            }
            Err(e) => {
                self.refuse(queue, mem, head, &e.to_string(), log);
                self.segs = segs;
                return Ok(());
            }
            Ok(()) => parse(&**mem, &segs, &self.device.limits()),
        };
        self.segs = segs;
        let Ok(parsed) = parsed else {
            if may_miss {
                return Err(Miss);
            }
            self.refuse(queue, mem, head, "no status byte", log);
            return Ok(());
        };
        let status = parsed.status;
        if may_miss && !mem.check_range(status, 1, Permissions::Write) {
            return Err(Miss);
        }
        let writeback = self.device.writeback();
        let (request, used_len) = match parsed.action {
            Action::Done(s) => {
                // An unreadable header is answered IOERR: unless it was only not mapped yet.
                if may_miss && s == Status::IoErr && !covered(&**mem, &self.segs) {
                    return Err(Miss);
                }
                self.finish(queue, mem, head, status, s, 1, log);
                return Ok(());
            }
            Action::GetId { data } => {
                let s = if !self.device.has_serial {
                    Status::Unsupp
                } else if scatter(&**mem, &data, &self.device.serial) {
                    Status::Ok
                } else if may_miss {
                    return Err(Miss);
                } else {
                    Status::IoErr
                };
                let written = match s {
                    Status::Ok => self.device.serial.len().min(total(&data) as usize) as u32,
                    _ => 0,
                };
                self.finish(queue, mem, head, status, s, written + 1, log);
                return Ok(());
            }
            Action::Read { offset, data, len } => match sg_list(mem, &data, Permissions::Write) {
                Some(buf) => (Request::Read { offset, buf }, len as u32 + 1),
                None if may_miss => return Err(Miss),
                None => {
                    self.finish(queue, mem, head, status, Status::IoErr, 1, log);
                    return Ok(());
                }
            },
            Action::Write { offset, data, .. } => match sg_list(mem, &data, Permissions::Read) {
                Some(buf) => (
                    Request::Write {
                        offset,
                        buf,
                        flags: WriteFlags { fua: !writeback },
                    },
                    1,
                ),
                None if may_miss => return Err(Miss),
                None => {
                    self.finish(queue, mem, head, status, Status::IoErr, 1, log);
                    return Ok(());
                }
            },
            Action::Flush => (Request::Flush, 1),
            Action::Discard { offset, len } => (Request::Discard { offset, len }, 1),
            Action::WriteZeroes { offset, len, unmap } => (
                Request::WriteZeroes {
                    offset,
                    len,
                    flags: ZeroFlags {
                        fua: !writeback,
                        may_unmap: unmap,
                        fast: false,
                    },
                },
                1,
            ),
        };
        let slot = match self.free.pop() {
            Some(i) => i,
            None => {
                self.pending.push(None);
                self.pending.len() - 1
            }
        };
        self.pending[slot] = Some(Pending {
            head,
            status,
            used_len,
            mem: mem.clone(),
        });
        self.in_flight += 1;
        self.device
            .submitter
            .submit_to(request, slot as u64, &self.completions);
        Ok(())
    }

    /// Puts every completed request in the used ring. Returns whether the driver must be
    /// notified: of these, and of requests answered at once by
    /// [`process_queue`](Self::process_queue) (malformed, `GET_ID`, finished inline).
    pub fn complete(
        &mut self,
        queue: &mut Queue,
        log: &mut dyn InflightLog,
    ) -> Result<bool, virtio_queue::Error> {
        let mut done = std::mem::take(&mut self.done);
        self.completions.drain(&mut done);
        for (tag, completion) in done.drain(..) {
            let slot = tag as usize;
            let Some(p) = self.pending.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot);
            self.in_flight -= 1;
            let s = status_of(&completion.result);
            let used_len = if s == Status::Ok { p.used_len } else { 1 };
            drop(completion.buf);
            self.finish(queue, &p.mem, p.head, p.status, s, used_len, log);
        }
        self.done = done;
        match self.added.take() {
            Some(mem) => queue.needs_notification(&*mem),
            None => Ok(false),
        }
    }

    /// Waits until every started request has completed and is in the used ring (a queue
    /// being stopped). Returns whether the driver must be notified.
    pub fn drain(
        &mut self,
        queue: &mut Queue,
        log: &mut dyn InflightLog,
    ) -> Result<bool, virtio_queue::Error> {
        let mut notify = self.complete(queue, log)?;
        while self.in_flight > 0 {
            if self.completions.wait().is_err() {
                break;
            }
            notify |= self.complete(queue, log)?;
        }
        Ok(notify)
    }

    /// Returns a chain that cannot be answered with a status byte, with nothing written, so
    /// that the queue goes on.
    fn refuse(
        &mut self,
        queue: &mut Queue,
        mem: &Arc<M>,
        head: u16,
        why: &str,
        log: &mut dyn InflightLog,
    ) {
        if !self.warned {
            self.warned = true;
            tracing::warn!("virtio-blk: malformed request refused: {why}");
        }
        log.before_used(head);
        if queue.add_used(&**mem, head, 0).is_ok() {
            log.after_used(head, queue.next_used());
            self.added = Some(Arc::clone(mem));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        queue: &mut Queue,
        mem: &Arc<M>,
        head: u16,
        status: GuestAddress,
        s: Status,
        used_len: u32,
        log: &mut dyn InflightLog,
    ) {
        // The status byte is the last byte of a buffer the driver gave as device-writable; if
        // it is not in guest memory the driver lied and gets nothing written (used length 0).
        let used_len = if mem.write_obj(s as u8, status).is_ok() {
            used_len
        } else {
            0
        };
        log.before_used(head);
        if queue.add_used(&**mem, head, used_len).is_ok() {
            log.after_used(head, queue.next_used());
            self.added = Some(Arc::clone(mem));
        }
    }
}

/// Whether every buffer of `segs` lies in `mem`.
fn covered<M: GuestMemory + ?Sized>(mem: &M, segs: &[Segment]) -> bool {
    segs.iter().all(|s| {
        let perm = if s.write {
            Permissions::Write
        } else {
            Permissions::Read
        };
        mem.check_range(s.addr, s.len as usize, perm)
    })
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// The guest buffers `segs` as a list block-core can do I/O on, owned by `mem`.
fn sg_list<M: StableMemory>(mem: &Arc<M>, segs: &[Segment], perm: Permissions) -> Option<SgList> {
    let mut raw = Vec::with_capacity(segs.len());
    for s in segs {
        let slices = mem.get_slices(s.addr, s.len as usize, perm).ok()?;
        for slice in slices {
            let slice = slice.ok()?;
            raw.push((slice.ptr_guard_mut().as_ptr(), slice.len()));
        }
    }
    let owner: Arc<dyn Any + Send + Sync> = mem.clone();
    // SAFETY: each pointer is the start of a slice of guest memory of the given length, which
    // `M: StableMemory` keeps mapped while `owner` (a reference to that memory) lives, and the
    // list keeps `owner` alive. The guest may change the memory at any time: block-core never
    // makes a Rust reference to a foreign list's memory.
    Some(unsafe { SgList::from_raw(&raw, owner) })
}

/// Copies `bytes` into the buffers `segs` (as far as they reach); false if a buffer is not
/// in guest memory.
fn scatter<M: GuestMemory + ?Sized>(mem: &M, segs: &[Segment], bytes: &[u8]) -> bool {
    let mut at = 0;
    for s in segs {
        if at == bytes.len() {
            break;
        }
        let n = (bytes.len() - at).min(s.len as usize);
        if mem.write_slice(&bytes[at..at + n], s.addr).is_err() {
            return false;
        }
        at += n;
    }
    true
}
