//! The FUSE file system: one inode, the root, which is a regular file showing the node.
//!
//! Each kernel request is decoded on one of the reader threads (fuser's, one cloned
//! `/dev/fuse` descriptor each), checked and planned there ([`crate::plan`]), and its I/O is
//! spawned on the export's tokio runtime; the reply is sent from the task when the I/O
//! completes. A reader thread thus never waits for the block layer and many requests are in
//! flight at once.
//!
//! Requests enter through a gate that counts them; [`Shared::close`] shuts the gate, waits for
//! the requests in flight, flushes the node and lets the attachment go. Requests that arrive
//! afterwards (through a descriptor opened before a lazy unmount) fail with `ENOTCONN`, what
//! they get from qemu-storage-daemon once its export is deleted.

use crate::config::FuseExportConfig;
use crate::error::{errno_of, FuseError};
use crate::plan::{self, WritePlan, ZeroKind};
use block_core::{Attachment, BlockError, SgList, WriteFlags, ZeroFlags};
use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, PollEvents,
    PollFlags, PollNotifier, ReplyAttr, ReplyBmap, ReplyData, ReplyEmpty, ReplyEntry, ReplyIoctl,
    ReplyLock, ReplyLseek, ReplyOpen, ReplyPoll, ReplyWrite, ReplyXattr, Request, TimeOrNow,
};
use std::ffi::OsStr;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::runtime::Handle;

/// The largest write the kernel sends in one request (and, through `max_pages`, the largest
/// read): 1 MiB, the kernel's default `max_pages` limit (256 pages).
pub(crate) const MAX_WRITE: u32 = 1 << 20;

/// Requests larger than this are refused before a buffer is allocated; the kernel never sends
/// them with the `max_pages` we negotiate.
const MAX_REQUEST: u32 = 16 << 20;

/// How long the kernel may cache the file's attributes (QSD uses one second as well).
const ATTR_TTL: Duration = Duration::from_secs(1);

/// The attributes that `chmod`/`chown` change; kept in memory for the export's life.
#[derive(Debug, Clone, Copy)]
struct Owner {
    mode: u32,
    uid: u32,
    gid: u32,
}

/// Where the export is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Serving requests.
    Open,
    /// No new requests; waiting for those in flight, then flushing.
    Closing,
    /// Flushed (or failed to) and the attachment released.
    Closed,
}

/// The gate's state: the attachment while the export serves, and the requests in flight.
#[derive(Debug)]
struct GateState {
    attachment: Option<Attachment>,
    phase: Phase,
    in_flight: usize,
    close_error: Option<FuseError>,
}

/// The state the reader threads and the I/O tasks share with the [`FuseExport`](crate::FuseExport).
#[derive(Debug)]
pub(crate) struct Shared {
    node_name: String,
    writable: bool,
    growable: bool,
    writethrough: bool,
    allow_other: bool,
    rt: Handle,
    gate: Mutex<GateState>,
    /// Signalled when the last request in flight ends and when closing is done.
    changed: Condvar,
    owner: Mutex<Owner>,
    /// Serialises size changes, so that two growing writes never shrink the node.
    resize: tokio::sync::Mutex<()>,
}

/// One request's pass through the gate, with the export's I/O handle (the node stays
/// attached while a permit lives).
struct Permit {
    shared: Arc<Shared>,
    /// Always `Some` until the permit drops: released before the count goes down, so that
    /// once [`Shared::close`] saw no request in flight, only its own hold is left.
    io: Option<Attachment>,
}

impl Permit {
    /// The export's I/O handle.
    fn node(&self) -> &Attachment {
        self.io
            .as_ref()
            .expect("a permit holds the attachment until it drops")
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        drop(self.io.take());
        let mut gate = self.shared.lock_gate();
        gate.in_flight -= 1;
        if gate.in_flight == 0 {
            self.shared.changed.notify_all();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(crate) fn new(
        cfg: &FuseExportConfig,
        attachment: Attachment,
        allow_other: bool,
        rt: Handle,
    ) -> Arc<Shared> {
        let mode = if cfg.writable { 0o600 } else { 0o400 };
        Arc::new(Shared {
            node_name: attachment.node().name().to_owned(),
            writable: cfg.writable,
            growable: cfg.growable,
            writethrough: cfg.writethrough,
            allow_other,
            rt,
            gate: Mutex::new(GateState {
                attachment: Some(attachment),
                phase: Phase::Open,
                in_flight: 0,
                close_error: None,
            }),
            changed: Condvar::new(),
            owner: Mutex::new(Owner {
                mode,
                uid: nix::unistd::getuid().as_raw(),
                gid: nix::unistd::getgid().as_raw(),
            }),
            resize: tokio::sync::Mutex::new(()),
        })
    }

    /// Whether the mount uses `allow_other`.
    pub(crate) fn allow_other(&self) -> bool {
        self.allow_other
    }

    /// The mode bits the file has now.
    pub(crate) fn mode(&self) -> u32 {
        lock(&self.owner).mode
    }

    fn lock_gate(&self) -> MutexGuard<'_, GateState> {
        lock(&self.gate)
    }

    fn enter(self: &Arc<Self>) -> Option<Permit> {
        let mut gate = self.lock_gate();
        if gate.phase != Phase::Open {
            return None;
        }
        let io = gate.attachment.as_ref()?.clone();
        gate.in_flight += 1;
        Some(Permit {
            shared: Arc::clone(self),
            io: Some(io),
        })
    }

    /// Stops taking requests, waits for those in flight, flushes the node and releases the
    /// attachment.
    ///
    /// The first call does the work; a call made meanwhile (the kernel ending the connection
    /// while [`FuseExport::unmount`](crate::FuseExport::unmount) runs, say) waits until it is
    /// done, so that nobody returns before the node is flushed. A failure is kept for
    /// [`take_close_error`](Self::take_close_error).
    ///
    /// Blocks; inside a multi-threaded tokio runtime it tells the runtime so
    /// (`block_in_place`). It must not be called from a current-thread runtime that is also
    /// the export's runtime, since the requests in flight need that thread to finish.
    pub(crate) fn close(&self) {
        block_outside_runtime(|| {
            let node = {
                let mut gate = self.lock_gate();
                match gate.phase {
                    Phase::Open => {}
                    Phase::Closing => {
                        while gate.phase != Phase::Closed {
                            gate = self.changed.wait(gate).unwrap_or_else(|e| e.into_inner());
                        }
                        return;
                    }
                    Phase::Closed => return,
                }
                gate.phase = Phase::Closing;
                gate.attachment.clone()
            };
            let result = match node {
                Some(node) => self.drain_and_flush(node),
                None => Ok(()),
            };
            let mut gate = self.lock_gate();
            let attachment = gate.attachment.take();
            gate.phase = Phase::Closed;
            if let Err(err) = result {
                gate.close_error = Some(err);
            }
            drop(gate);
            drop(attachment);
            self.changed.notify_all();
        })
    }

    /// Why closing failed, if it did (taken once).
    pub(crate) fn take_close_error(&self) -> Option<FuseError> {
        self.lock_gate().close_error.take()
    }

    fn drain_and_flush(&self, node: Attachment) -> Result<(), FuseError> {
        let mut gate = self.lock_gate();
        while gate.in_flight > 0 {
            gate = self.changed.wait(gate).unwrap_or_else(|e| e.into_inner());
        }
        drop(gate);
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt.spawn(async move {
            let result = node.flush().await;
            // The handle goes before the closer hears: once it has, only its hold is left.
            drop(node);
            let _ = tx.send(result);
        });
        match rx.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(FuseError::Flush {
                node: self.node_name.clone(),
                source,
            }),
            Err(_) => Err(FuseError::RuntimeGone),
        }
    }

    /// The attributes of the file showing `node`.
    fn node_attr(&self, io: &Attachment) -> FileAttr {
        let node = io.node();
        let blksize = node.preferred_alignment().max(512);
        let allocated = node.image_details().actual_size;
        self.attr(node.size(), allocated, blksize)
    }

    /// The file's attributes. `allocated` is what the image takes on the host in bytes
    /// (QEMU's `bdrv_get_allocated_file_size`); `st_blocks` counts it in 512-byte units, or
    /// counts `size` when it is unknown or 0, as QSD does.
    fn attr(&self, size: u64, allocated: Option<u64>, blksize: u32) -> FileAttr {
        let owner = *lock(&self.owner);
        let now = SystemTime::now();
        FileAttr {
            ino: INodeNo::ROOT,
            size,
            blocks: allocated.filter(|&a| a > 0).unwrap_or(size).div_ceil(512),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind: FileType::RegularFile,
            perm: (owner.mode & 0o7777) as u16,
            nlink: 1,
            uid: owner.uid,
            gid: owner.gid,
            rdev: 0,
            blksize,
            flags: 0,
        }
    }
}

/// Runs `f`, which blocks, telling a multi-threaded tokio runtime first if called from one of
/// its workers.
fn block_outside_runtime<T>(f: impl FnOnce() -> T) -> T {
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

fn errno(code: i32) -> Errno {
    Errno::from_i32(code)
}

fn block_errno(err: &BlockError) -> Errno {
    errno(errno_of(err))
}

/// The errno of a request that arrives after the export ended.
const GONE: i32 = libc::ENOTCONN;

/// The [`Filesystem`] the reader threads call.
#[derive(Debug)]
pub(crate) struct ExportFs {
    shared: Arc<Shared>,
}

impl ExportFs {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        ExportFs { shared }
    }

    /// Enters the gate, or fails the request with `ENOTCONN` (or `ENOENT` for an inode that is
    /// not the root).
    fn enter(&self, ino: INodeNo) -> Result<Permit, Errno> {
        if ino != INodeNo::ROOT {
            return Err(Errno::ENOENT);
        }
        self.shared.enter().ok_or(errno(GONE))
    }

    fn spawn<F>(&self, future: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        // If the runtime has shut down the future is dropped with its reply, and fuser answers
        // EIO for a dropped reply.
        self.shared.rt.spawn(future);
    }
}

/// Grows the node to `new_size` unless it is already that large; size changes are serialised.
async fn grow(shared: &Shared, node: &Attachment, new_size: u64) -> Result<(), BlockError> {
    let _guard = shared.resize.lock().await;
    if node.size() < new_size {
        node.resize(new_size).await?;
    }
    Ok(())
}

/// Fills the holes of the range with zeroes, which allocates them.
async fn allocate(node: &Attachment, mut offset: u64, len: u64) -> Result<(), BlockError> {
    let end = offset + len;
    while offset < end {
        let extent = node.block_status(offset, end - offset).await?;
        if !extent.data {
            let flags = ZeroFlags {
                fua: false,
                may_unmap: false,
                fast: false,
            };
            node.write_zeroes(offset, extent.len, flags).await?;
        }
        offset += extent.len;
    }
    Ok(())
}

/// The first offset at or after `offset` that is data (`want_data`) or a hole; the end of the
/// node counts as a hole, as on any file system.
async fn seek(node: &Attachment, mut offset: u64, want_data: bool) -> Result<u64, i32> {
    loop {
        let size = node.size();
        if offset >= size {
            return if want_data {
                Err(libc::ENXIO)
            } else {
                Ok(size)
            };
        }
        let extent = node
            .block_status(offset, size - offset)
            .await
            .map_err(|e| errno_of(&e))?;
        if extent.data == want_data {
            return Ok(offset);
        }
        offset += extent.len;
    }
}

impl Filesystem for ExportFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(nearest) = config.set_max_write(MAX_WRITE) {
            config
                .set_max_write(nearest)
                .map_err(|_| io::Error::other("the kernel refused every max_write"))?;
        }
        // Both are optional: AIO direct I/O split into parallel requests, and mmap() of a file
        // opened with FOPEN_DIRECT_IO (Linux 6.6+).
        for flag in [
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
        ] {
            let _ = config.add_capabilities(flag);
        }
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn destroy(&mut self) {
        // The kernel ended the connection (the last descriptor closed after a lazy unmount,
        // or someone unmounted the file from outside): make sure the node is flushed.
        self.shared.close();
        if let Some(err) = self.shared.lock_gate().close_error.as_ref() {
            tracing::error!(error = %err, "closing FUSE export");
        }
    }

    fn lookup(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEntry) {
        // The root is a regular file: it has no entries.
        reply.error(Errno::ENOENT);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.enter(ino) {
            Ok(permit) => {
                reply.attr(&ATTR_TTL, &self.shared.node_attr(permit.node()));
            }
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        crtime: Option<SystemTime>,
        chgtime: Option<SystemTime>,
        bkuptime: Option<SystemTime>,
        flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let permit = match self.enter(ino) {
            Ok(permit) => permit,
            Err(e) => return reply.error(e),
        };
        let shared = &self.shared;
        // As QSD: only the size and the mode can change, and the owner with allow_other.
        let times = atime.is_some()
            || mtime.is_some()
            || ctime.is_some()
            || crtime.is_some()
            || chgtime.is_some()
            || bkuptime.is_some()
            || flags.is_some();
        if times || (!shared.allow_other && (uid.is_some() || gid.is_some())) {
            return reply.error(Errno::ENOTSUP);
        }
        if let Some(mode) = mode {
            // Without allow_other nobody but the owner can reach the file: refuse to pretend.
            if !shared.allow_other && mode & 0o077 != 0 {
                return reply.error(Errno::EPERM);
            }
            if !shared.writable && mode & 0o222 != 0 {
                return reply.error(Errno::EROFS);
            }
        }
        if size.is_some() && !shared.writable {
            return reply.error(Errno::EACCES);
        }
        let shared = Arc::clone(shared);
        self.spawn(async move {
            let node = permit.node();
            if let Some(size) = size {
                let _guard = shared.resize.lock().await;
                if let Err(e) = node.resize(size).await {
                    return reply.error(block_errno(&e));
                }
            }
            {
                let mut owner = lock(&shared.owner);
                if let Some(mode) = mode {
                    owner.mode = mode & 0o7777;
                }
                if let Some(uid) = uid {
                    owner.uid = uid;
                }
                if let Some(gid) = gid {
                    owner.gid = gid;
                }
            }
            reply.attr(&ATTR_TTL, &shared.node_attr(node));
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if let Err(e) = self.enter(ino) {
            return reply.error(e);
        }
        if !self.shared.writable && flags.acc_mode() != OpenAccMode::O_RDONLY {
            // QSD refuses the writes themselves with EACCES (and the kernel refuses the open
            // for anybody but root, the mode being 0400); refusing the open is the same
            // answer, earlier.
            return reply.error(Errno::EACCES);
        }
        // Direct I/O: every read and write reaches the node, so the file shows what other
        // exports of the node write, nothing is cached twice (the node's driver has its own
        // caching policy), and a write is acknowledged only once the node has it.
        // Parallel direct writes: the kernel does not serialise writes on the inode lock.
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let permit = match self.enter(ino) {
            Ok(permit) => permit,
            Err(e) => return reply.error(e),
        };
        if size > MAX_REQUEST {
            return reply.error(Errno::EINVAL);
        }
        let len = plan::read_len(offset, u64::from(size), permit.node().size());
        if len == 0 {
            return reply.data(&[]);
        }
        self.spawn(async move {
            // len <= MAX_REQUEST, checked above.
            let buf = SgList::zeroed(len as usize);
            match permit.node().readv(offset, &buf).await {
                Ok(()) => match buf.into_vec() {
                    Ok(data) => reply.data(&data),
                    // A clone outlived the request (not expected): copy.
                    Err(buf) => reply.data(&buf.to_vec()),
                },
                Err(e) => reply.error(block_errno(&e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let permit = match self.enter(ino) {
            Ok(permit) => permit,
            Err(e) => return reply.error(e),
        };
        if !self.shared.writable {
            return reply.error(Errno::EACCES);
        }
        if data.len() > MAX_REQUEST as usize {
            return reply.error(Errno::EINVAL);
        }
        let plan = match plan::plan_write(
            offset,
            data.len() as u64,
            permit.node().size(),
            self.shared.growable,
        ) {
            Ok(plan) => plan,
            Err(code) => return reply.error(errno(code)),
        };
        let len = match plan {
            WritePlan::Write { len } => len as usize,
            WritePlan::GrowThenWrite { .. } => data.len(),
        };
        let buf = SgList::from_vec(data[..len].to_vec());
        let fua = self.shared.writethrough || flags.0 & libc::O_DSYNC != 0;
        let shared = Arc::clone(&self.shared);
        self.spawn(async move {
            let node = permit.node();
            if let WritePlan::GrowThenWrite { new_size } = plan {
                if let Err(e) = grow(&shared, node, new_size).await {
                    return reply.error(block_errno(&e));
                }
            }
            match node.writev(offset, &buf, WriteFlags { fua }).await {
                // len <= MAX_REQUEST, so it fits.
                Ok(()) => reply.written(buf.len() as u32),
                Err(e) => reply.error(block_errno(&e)),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Called on every close(): like QSD, make what was written stable before close returns.
        let permit = match self.enter(ino) {
            Ok(permit) => permit,
            Err(e) => return reply.error(e),
        };
        if !self.shared.writable {
            return reply.ok();
        }
        self.spawn(async move {
            match permit.node().flush().await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(block_errno(&e)),
            }
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let permit = match self.enter(ino) {
            Ok(permit) => permit,
            Err(e) => return reply.error(e),
        };
        self.spawn(async move {
            match permit.node().flush().await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(block_errno(&e)),
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let permit = match self.enter(ino) {
            Ok(permit) => permit,
            Err(e) => return reply.error(e),
        };
        if !self.shared.writable {
            return reply.error(Errno::EACCES);
        }
        let plan = match plan::plan_fallocate(mode, offset, length, permit.node().size()) {
            Ok(plan) => plan,
            Err(code) => return reply.error(errno(code)),
        };
        let shared = Arc::clone(&self.shared);
        self.spawn(async move {
            let node = permit.node();
            let result = async {
                if let Some(new_size) = plan.grow_to {
                    grow(&shared, node, new_size).await?;
                }
                if let Some((offset, len, kind)) = plan.zero {
                    let flags = match kind {
                        ZeroKind::Punch => ZeroFlags {
                            fua: false,
                            may_unmap: true,
                            fast: true,
                        },
                        ZeroKind::Zero => ZeroFlags::default(),
                    };
                    node.write_zeroes(offset, len, flags).await?;
                }
                if let Some((offset, len)) = plan.allocate {
                    allocate(node, offset, len).await?;
                }
                Ok::<(), BlockError>(())
            }
            .await;
            match result {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(block_errno(&e)),
            }
        });
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let permit = match self.enter(ino) {
            Ok(permit) => permit,
            Err(e) => return reply.error(e),
        };
        let (offset, want_data) = match plan::check_seek(offset, whence, permit.node().size()) {
            Ok(checked) => checked,
            Err(code) => return reply.error(errno(code)),
        };
        self.spawn(async move {
            match seek(permit.node(), offset, want_data).await {
                // A node is never larger than i64::MAX bytes (the kernel's loff_t).
                Ok(found) => reply.offset(i64::try_from(found).unwrap_or(i64::MAX)),
                Err(code) => reply.error(errno(code)),
            }
        });
    }

    // The operations QSD does not implement either: libfuse answers them with `ENOSYS`, which
    // the kernel remembers (no second getxattr is sent) and turns into what the caller sees
    // (`EOPNOTSUPP` for xattrs, `ENOTTY` for ioctls, a local fallback for copy_file_range and
    // poll). They are answered here so that fuser's defaults do not log them.

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: PollNotifier,
        _events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn getlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        _start: u64,
        _end: u64,
        _typ: i32,
        _pid: u32,
        reply: ReplyLock,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn setlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        _start: u64,
        _end: u64,
        _typ: i32,
        _pid: u32,
        _sleep: bool,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn bmap(&self, _req: &Request, _ino: INodeNo, _blocksize: u32, _idx: u64, reply: ReplyBmap) {
        reply.error(Errno::ENOSYS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::ENOSYS);
    }
}
