//! The `qcow2` format driver, through the [`imago`] crate.
//!
//! The qcow2 file is read and written through our own `file` child node ([`NodeStorage`]
//! implements imago's `Storage` over a [`Node`]), so that locking, `O_DIRECT`, dirty bitmaps
//! and permissions stay ours. A backing image is another of our nodes, handed to imago as a
//! `raw` layer over that node.
//!
//! # Threads
//! imago's async functions return futures that are not `Send`, while every
//! [`BlockDriver`] future must be. Each qcow2 node therefore owns [`WORKER_THREADS`] worker
//! threads, each running a single-threaded tokio runtime with a `LocalSet`; every request is
//! sent to one of them (round-robin) with owned buffers and runs there as a local task, so
//! that many requests are in flight at once. imago's `FormatAccess` is `Sync`, so the
//! threads share one.
//!
//! # Buffers
//! A request's [`SgList`] goes to imago's vectored I/O as it is when it is private memory
//! (see [`crate::buffer`]); a list over foreign memory (a guest's) is copied into a private
//! one first, since imago takes slices. imago hands the data parts back to [`NodeStorage`]
//! as slices; those that lie in the request's own list (found through a task-local) go to
//! the file node as part of that list, with its owner, so the data is read and written
//! straight between the file and the request's buffers. What imago reads for itself
//! (metadata, copy-on-write) goes through a buffer of ours.

use crate::bitmap::DirtyBitmap;
use crate::buffer::SgList;
use crate::driver::{
    BlockDriver, BlockIo, Extent, ImageDetails, ImageFacts, Resize, WriteFlags, ZeroFlags,
};
use crate::error::{BlockError, Result};
use crate::node::Node;
use crate::qcow2_bitmaps::{self, BitmapError, BitmapsLayout, ImageFile, StoredBitmap};
use async_trait::async_trait;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::storage::drivers::CommonStorageHelper;
use imago::storage::PreallocateMode;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, ShallowMapping, Storage};
use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// Why a qcow2 node could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// imago refused the image.
    #[error("Could not open qcow2 image on node '{node}'")]
    Open {
        /// The file node.
        node: String,
        /// What imago said.
        #[source]
        source: io::Error,
    },
    /// The worker thread could not be started.
    #[error("Could not start the qcow2 worker thread")]
    Worker(#[source] io::Error),
    /// The persistent dirty bitmaps could not be read or marked in use.
    #[error("Could not open the persistent bitmaps of node '{node}'")]
    Bitmaps {
        /// The file node.
        node: String,
        /// What went wrong.
        #[source]
        source: BitmapError,
    },
    /// The image needs a feature this driver does not provide.
    #[error("{0}")]
    Unsupported(String),
}

/// imago's `Storage` over one of our nodes.
///
/// Writes beyond the end grow the node (a qcow2 file grows as clusters are allocated).
#[derive(Debug)]
pub struct NodeStorage {
    node: Arc<Node>,
    helper: CommonStorageHelper,
    grow: tokio::sync::Mutex<()>,
}

impl NodeStorage {
    /// A storage object reading and writing `node`.
    pub fn new(node: Arc<Node>) -> NodeStorage {
        NodeStorage {
            node,
            helper: CommonStorageHelper::default(),
            grow: tokio::sync::Mutex::new(()),
        }
    }

    async fn ensure_size(&self, end: u64) -> io::Result<()> {
        if end <= self.node.size() {
            return Ok(());
        }
        let _guard = self.grow.lock().await;
        if end > self.node.size() {
            self.node.resize(end).await.map_err(to_io)?;
        }
        Ok(())
    }
}

impl fmt::Display for NodeStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node '{}'", self.node.name())
    }
}

fn to_io(e: BlockError) -> io::Error {
    match e {
        BlockError::Io { source, .. } => source,
        other => io::Error::from_raw_os_error(other.errno()),
    }
}

tokio::task_local! {
    /// The list of the request imago is serving on this task (see the module docs).
    static REQUEST: SgList;
}

/// The part of the current request's list that is the slice at `ptr`, `len` bytes long.
fn request_part(ptr: *const u8, len: usize) -> Option<SgList> {
    REQUEST.try_with(|r| r.find(ptr, len)).ok().flatten()
}

impl Storage for NodeStorage {
    fn size(&self) -> io::Result<u64> {
        Ok(self.node.size())
    }

    fn resolve_relative_path<P: AsRef<Path>>(&self, relative: P) -> io::Result<PathBuf> {
        let relative = relative.as_ref();
        if relative.is_absolute() {
            return Ok(relative.to_path_buf());
        }
        let base = self
            .get_filename()
            .ok_or_else(|| io::Error::other("the image has no file name"))?;
        let dir = base.parent().unwrap_or_else(|| Path::new("."));
        Ok(dir.join(relative))
    }

    fn get_filename(&self) -> Option<PathBuf> {
        self.node.driver().filename().map(PathBuf::from)
    }

    async unsafe fn pure_readv(&self, bufv: IoVectorMut<'_>, mut offset: u64) -> io::Result<()> {
        let size = self.node.size();
        for mut slice in bufv.into_inner() {
            let len = slice.len();
            let inside = size.saturating_sub(offset).min(len as u64) as usize;
            if let Some(part) = request_part(slice.as_ptr(), len) {
                // The request's own memory: read straight into it (through the list, not
                // through the slice, which is not touched until the read is done).
                self.node
                    .readv(offset, &part.slice(0, inside))
                    .await
                    .map_err(to_io)?;
                part.fill_zero(inside, len - inside);
            } else {
                let buf: &mut [u8] = &mut slice;
                self.node
                    .read(offset, &mut buf[..inside])
                    .await
                    .map_err(to_io)?;
                buf[inside..].fill(0);
            }
            offset += len as u64;
        }
        Ok(())
    }

    async unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        self.ensure_size(offset + bufv.len()).await?;
        let mut offset = offset;
        for slice in bufv.into_inner() {
            let buf: &[u8] = &slice;
            match request_part(buf.as_ptr(), buf.len()) {
                Some(part) => self.node.writev(offset, &part, WriteFlags::default()).await,
                None => self.node.write(offset, buf, WriteFlags::default()).await,
            }
            .map_err(to_io)?;
            offset += buf.len() as u64;
        }
        Ok(())
    }

    async unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.ensure_size(offset + length).await?;
        let flags = ZeroFlags {
            may_unmap: true,
            ..ZeroFlags::default()
        };
        self.node
            .write_zeroes(offset, length, flags)
            .await
            .map_err(to_io)
    }

    async unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.ensure_size(offset + length).await?;
        self.node
            .write_zeroes(offset, length, ZeroFlags::default())
            .await
            .map_err(to_io)
    }

    async unsafe fn pure_discard(&self, offset: u64, length: u64) -> io::Result<()> {
        let size = self.node.size();
        if offset >= size {
            return Ok(());
        }
        let length = length.min(size - offset);
        self.node.discard(offset, length).await.map_err(to_io)
    }

    async fn flush(&self) -> io::Result<()> {
        // No buffers of our own: the node writes through.
        Ok(())
    }

    async fn sync(&self) -> io::Result<()> {
        self.node.flush().await.map_err(to_io)
    }

    async unsafe fn invalidate_cache(&self) -> io::Result<()> {
        Ok(())
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        &self.helper
    }

    async fn resize(&self, new_size: u64, _prealloc_mode: PreallocateMode) -> io::Result<()> {
        self.node.resize(new_size).await.map_err(to_io)
    }
}

/// The image file as [`qcow2_bitmaps`] reads and writes it: our file node, driven from a
/// blocking thread of the runtime (`handle`).
struct NodeImage {
    node: Arc<Node>,
    handle: tokio::runtime::Handle,
}

impl ImageFile for NodeImage {
    fn image_read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let size = self.node.size();
        let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        self.handle
            .block_on(self.node.read(offset, &mut buf[..inside]))
            .map_err(to_io)
    }

    fn image_write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.handle.block_on(async {
            let end = offset + buf.len() as u64;
            if end > self.node.size() {
                self.node.resize(end).await.map_err(to_io)?;
            }
            self.node
                .write(offset, buf, WriteFlags::default())
                .await
                .map_err(to_io)
        })
    }

    fn image_sync(&self) -> io::Result<()> {
        self.handle.block_on(self.node.flush()).map_err(to_io)
    }
}

/// Runs `f` on the image file from a blocking thread.
async fn with_image<T: Send + 'static>(
    file: &Arc<Node>,
    f: impl FnOnce(&NodeImage) -> Result<T, BitmapError> + Send + 'static,
) -> Result<T, BitmapError> {
    let image = NodeImage {
        node: Arc::clone(file),
        handle: tokio::runtime::Handle::current(),
    };
    tokio::task::spawn_blocking(move || f(&image))
        .await
        .unwrap_or_else(|e| {
            Err(BitmapError::Io {
                context: "running the bitmap thread",
                source: io::Error::other(e.to_string()),
            })
        })
}

type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// A thread running non-`Send` futures on a single-threaded runtime.
#[derive(Debug)]
struct Worker {
    tx: tokio::sync::mpsc::UnboundedSender<Job>,
}

fn worker_stopped() -> BlockError {
    BlockError::io(
        "qcow2 worker",
        io::Error::new(io::ErrorKind::BrokenPipe, "the qcow2 worker thread stopped"),
    )
}

impl Worker {
    fn spawn(name: String) -> io::Result<Worker> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new().name(name).spawn(move || {
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let mut running = tokio::task::JoinSet::new();
                loop {
                    tokio::select! {
                        job = rx.recv() => match job {
                            Some(job) => {
                                running.spawn_local(job());
                            }
                            None => break,
                        },
                        // Reap finished tasks so that the set does not grow.
                        Some(_) = running.join_next(), if !running.is_empty() => {}
                    }
                }
                // Every sender is gone: let the jobs already queued (such as the final
                // flush sent by `Drop`) finish before the thread ends.
                while running.join_next().await.is_some() {}
            });
        })?;
        Ok(Worker { tx })
    }

    async fn run<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let (otx, orx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            Box::pin(async move {
                // The job's future (and what it holds, e.g. the node's state) is dropped at
                // the end of this statement, before the caller hears back: once a request
                // returns, no worker keeps the image open behind the caller's back.
                let result = f().await;
                let _ = otx.send(result);
            })
        });
        self.tx.send(job).map_err(|_| worker_stopped())?;
        orx.await.map_err(|_| worker_stopped())
    }
}

/// How many worker threads a qcow2 node runs its requests on.
pub const WORKER_THREADS: usize = 2;

/// The worker threads of one qcow2 node; requests go round-robin.
///
/// imago's `FormatAccess` is `Sync`: its futures may not move between threads, but futures
/// on different threads may use it at once.
#[derive(Debug)]
struct Workers {
    threads: Vec<Worker>,
    next: std::sync::atomic::AtomicUsize,
}

impl Workers {
    fn spawn(name: &str, count: usize) -> io::Result<Workers> {
        let threads = (0..count.max(1))
            .map(|i| Worker::spawn(format!("{name}/{i}")))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Workers {
            threads,
            next: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    fn pick(&self) -> &Worker {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.threads.len();
        &self.threads[i]
    }

    async fn run<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        self.pick().run(f).await
    }

    fn send(&self, job: Job) -> bool {
        self.pick().tx.send(job).is_ok()
    }
}

type Access = FormatAccess<NodeStorage>;

#[derive(Debug)]
struct State {
    /// Shared by ordinary requests; taken exclusively by discard and resize, which imago
    /// requires to have no concurrent data mappings.
    /// `None` once the node is closed (imago must be gone before the bitmaps are stored).
    access: tokio::sync::RwLock<Option<Access>>,
}

fn closed_error() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the qcow2 node is closed")
}

impl State {
    async fn shared(&self) -> io::Result<tokio::sync::RwLockReadGuard<'_, Access>> {
        tokio::sync::RwLockReadGuard::try_map(self.access.read().await, Option::as_ref)
            .map_err(|_| closed_error())
    }

    async fn exclusive(&self) -> io::Result<tokio::sync::RwLockMappedWriteGuard<'_, Access>> {
        tokio::sync::RwLockWriteGuard::try_map(self.access.write().await, Option::as_mut)
            .map_err(|_| closed_error())
    }
}

/// A qcow2 image whose header is read, waiting for its backing node (see
/// [`Qcow2Driver::open`]).
pub struct Qcow2Opener {
    worker: Workers,
    qcow2: Qcow2<NodeStorage>,
    file: Arc<Node>,
    read_only: bool,
    inactive: bool,
    cluster_size: u64,
    facts: HeaderFacts,
    stored: Vec<StoredBitmap>,
    layout: Option<BitmapsLayout>,
}

impl fmt::Debug for Qcow2Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qcow2Opener")
            .field("file", &self.file.name())
            .finish_non_exhaustive()
    }
}

impl Qcow2Opener {
    /// The backing file name in the image header, if any.
    pub fn backing_file(&self) -> Option<String> {
        self.qcow2.implicit_backing_file().cloned()
    }

    /// The backing format in the image header, if any.
    pub fn backing_format(&self) -> Option<String> {
        self.qcow2.implicit_backing_format().cloned()
    }

    /// The directory relative backing file names are resolved against.
    pub fn base_dir(&self) -> Option<PathBuf> {
        self.file
            .driver()
            .filename()
            .and_then(|f| Path::new(&f).parent().map(Path::to_path_buf))
    }

    /// Finishes opening with `backing` as the backing node (or none).
    pub async fn finish(self, backing: Option<Arc<Node>>) -> Result<Qcow2Driver, Qcow2Error> {
        let Qcow2Opener {
            worker,
            mut qcow2,
            file,
            read_only,
            inactive,
            cluster_size,
            facts,
            stored,
            layout,
        } = self;
        let backing_layer = match &backing {
            None => None,
            Some(node) => {
                let storage = NodeStorage::new(Arc::clone(node));
                let raw = worker
                    .run(move || async move {
                        Raw::builder(storage)
                            .write(false)
                            .open(DenyImplicitOpenGate::default())
                            .await
                    })
                    .await
                    .map_err(|e| Qcow2Error::Worker(to_io(e)))?
                    .map_err(|source| Qcow2Error::Open {
                        node: node.name().to_string(),
                        source,
                    })?;
                Some(FormatAccess::new(raw))
            }
        };
        let backing_file = qcow2.implicit_backing_file().cloned();
        let backing_format = qcow2.implicit_backing_format().cloned();
        qcow2.set_backing(backing_layer);
        let access = FormatAccess::new(qcow2);
        let size = access.size();
        Ok(Qcow2Driver {
            worker,
            state: Arc::new(State {
                access: tokio::sync::RwLock::new(Some(access)),
            }),
            size: AtomicU64::new(size),
            read_only,
            file,
            backing,
            cluster_size,
            backing_file,
            backing_format,
            facts,
            closed: std::sync::atomic::AtomicBool::new(false),
            inactive: std::sync::atomic::AtomicBool::new(inactive),
            loaded: Mutex::new(stored.iter().map(StoredBitmap::to_dirty_bitmap).collect()),
            layout: Mutex::new(layout),
            node: OnceLock::new(),
        })
    }
}

/// The `qcow2` driver.
#[derive(Debug)]
pub struct Qcow2Driver {
    worker: Workers,
    state: Arc<State>,
    size: AtomicU64,
    read_only: bool,
    file: Arc<Node>,
    backing: Option<Arc<Node>>,
    cluster_size: u64,
    backing_file: Option<String>,
    backing_format: Option<String>,
    facts: HeaderFacts,
    closed: std::sync::atomic::AtomicBool,
    /// The node is inactive: another process may own the image now, so nothing is written
    /// to it, not even at close (its metadata was flushed when it became inactive).
    inactive: std::sync::atomic::AtomicBool,
    /// Persistent bitmaps read at open, until the node takes them.
    loaded: Mutex<Vec<DirtyBitmap>>,
    /// Where the bitmaps were when they were marked in use (writable nodes).
    layout: Mutex<Option<BitmapsLayout>>,
    /// The node of this driver, to store its persistent bitmaps at close.
    node: OnceLock<Weak<Node>>,
}

impl Drop for Qcow2Driver {
    fn drop(&mut self) {
        // A writable image dropped without `close`: still write its cached metadata out,
        // and wait for it (the flush runs on the worker thread, never on the caller's).
        if !self.read_only && !self.closed.load(Ordering::Acquire) {
            tracing::warn!(
                "qcow2 node on '{}' dropped without close: flushing",
                self.file.name()
            );
            let st = Arc::clone(&self.state);
            let (done_tx, done_rx) = std::sync::mpsc::sync_channel::<()>(1);
            let job: Job = Box::new(move || {
                Box::pin(async move {
                    if let Ok(acc) = st.shared().await {
                        if let Err(e) = acc.flush().await {
                            tracing::error!("flushing a dropped qcow2 image: {e}");
                        }
                    }
                    drop(st);
                    let _ = done_tx.send(());
                })
            });
            if self.worker.send(job) {
                let _ = done_rx.recv();
            }
        }
    }
}

/// How many bytes of the header [`HeaderFacts::parse`] looks at.
const HEADER_FACTS_LEN: usize = 105;

/// What `query-named-block-nodes` reports from a qcow2 header (read when the node opens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HeaderFacts {
    version: u32,
    cluster_bits: u32,
    incompatible: u64,
    compatible: u64,
    refcount_order: u32,
    compression_type: u8,
}

impl HeaderFacts {
    /// Parses the start of a qcow2 header (`docs/interop/qcow2.txt` in QEMU); `None` when
    /// the magic is wrong or the buffer too short.
    fn parse(h: &[u8]) -> Option<HeaderFacts> {
        let u32_at = |o: usize| -> Option<u32> {
            Some(u32::from_be_bytes(h.get(o..o + 4)?.try_into().ok()?))
        };
        let u64_at = |o: usize| -> Option<u64> {
            Some(u64::from_be_bytes(h.get(o..o + 8)?.try_into().ok()?))
        };
        if h.get(..4)? != b"QFI\xfb" {
            return None;
        }
        let version = u32_at(4)?;
        let cluster_bits = u32_at(20)?;
        if version < 3 {
            return Some(HeaderFacts {
                version,
                cluster_bits,
                incompatible: 0,
                compatible: 0,
                refcount_order: 4,
                compression_type: 0,
            });
        }
        let header_length = u32_at(100)?;
        Some(HeaderFacts {
            version,
            cluster_bits,
            incompatible: u64_at(72)?,
            compatible: u64_at(80)?,
            refcount_order: u32_at(96)?,
            compression_type: if header_length > 104 { *h.get(104)? } else { 0 },
        })
    }

    /// `dirty-flag`: incompatible feature bit 0.
    fn dirty(&self) -> bool {
        self.incompatible & 1 != 0
    }

    /// QAPI `ImageInfoSpecific` of type `qcow2`, shaped as QEMU reports it.
    fn format_specific(&self) -> serde_json::Value {
        let compression = if self.compression_type == 1 {
            "zstd"
        } else {
            "zlib"
        };
        let refcount_bits = 1u64.checked_shl(self.refcount_order).unwrap_or(0);
        let data = if self.version < 3 {
            serde_json::json!({
                "compat": "0.10",
                "compression-type": compression,
                "refcount-bits": refcount_bits,
            })
        } else {
            serde_json::json!({
                "compat": "1.1",
                "compression-type": compression,
                "lazy-refcounts": self.compatible & 1 != 0,
                "refcount-bits": refcount_bits,
                "corrupt": self.incompatible & 2 != 0,
                "extended-l2": self.incompatible & 16 != 0,
            })
        };
        serde_json::json!({"type": "qcow2", "data": data})
    }
}

/// What one shallow mapping says, without imago's borrowed references.
enum Mapped {
    Data,
    Zero { explicit: bool },
    Backing { offset: u64 },
    Eof,
}

impl Qcow2Driver {
    /// Reads the qcow2 header from `file` (first step of opening; the caller then opens the
    /// backing node the header or the options name and calls [`Qcow2Opener::finish`]).
    pub async fn open(file: Arc<Node>, read_only: bool) -> Result<Qcow2Opener, Qcow2Error> {
        Qcow2Driver::open_with(file, read_only, false).await
    }

    /// [`open`](Self::open), for an inactive node when `inactive`: nothing is written to the
    /// image (another process may own it) until [`BlockDriver::set_active`] opens it again,
    /// writable unless `read_only`.
    pub async fn open_with(
        file: Arc<Node>,
        read_only: bool,
        inactive: bool,
    ) -> Result<Qcow2Opener, Qcow2Error> {
        let writable = !read_only && !inactive;
        let worker = Workers::spawn(&format!("qcow2 {}", file.name()), WORKER_THREADS)
            .map_err(Qcow2Error::Worker)?;
        let mut header = [0u8; HEADER_FACTS_LEN];
        let n = file.size().min(HEADER_FACTS_LEN as u64) as usize;
        file.read(0, &mut header[..n])
            .await
            .map_err(|e| Qcow2Error::Open {
                node: file.name().to_string(),
                source: to_io(e),
            })?;
        let facts = HeaderFacts::parse(&header[..n])
            .ok_or_else(|| Qcow2Error::Unsupported("Image is not in qcow2 format".into()))?;
        let cluster_size = 1u64.checked_shl(facts.cluster_bits).unwrap_or(0);
        // Persistent bitmaps: read them, and mark them in use before imago opens the image
        // writable (see `qcow2_bitmaps` for the contract).
        let bitmaps_error = |source| Qcow2Error::Bitmaps {
            node: file.name().to_string(),
            source,
        };
        let (stored, layout) = with_image(&file, move |image| {
            let stored = qcow2_bitmaps::load(image)?;
            let layout = if !writable {
                None
            } else {
                qcow2_bitmaps::mark_in_use(image)?
            };
            Ok((stored, layout))
        })
        .await
        .map_err(bitmaps_error)?;
        let storage = NodeStorage::new(Arc::clone(&file));
        let qcow2 = worker
            .run(move || async move {
                Qcow2::<NodeStorage>::builder(storage)
                    .write(writable)
                    .backing(None)
                    .data_file(None)
                    .open(DenyImplicitOpenGate::default())
                    .await
            })
            .await
            .map_err(|e| Qcow2Error::Worker(to_io(e)))?
            .map_err(|source| Qcow2Error::Open {
                node: file.name().to_string(),
                source,
            })?;
        if qcow2.requires_external_data_file() {
            return Err(Qcow2Error::Unsupported(
                "qcow2 images with an external data file are not supported".into(),
            ));
        }
        if let Some(layout) = layout.clone() {
            // imago cleared the bitmaps autoclear bit: set it again before any I/O.
            with_image(&file, move |image| {
                qcow2_bitmaps::restore_autoclear_bit(image, &layout)
            })
            .await
            .map_err(bitmaps_error)?;
        }
        Ok(Qcow2Opener {
            worker,
            qcow2,
            file,
            read_only,
            inactive,
            cluster_size,
            facts,
            stored,
            layout,
        })
    }

    /// The persistent dirty bitmaps read from the image at open, for the node to adopt
    /// (`blockdev_add` adds them to the node). Returns them once.
    pub fn take_loaded_bitmaps(&self) -> Vec<DirtyBitmap> {
        std::mem::take(&mut *self.loaded.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Writes the node's persistent bitmaps into the image, after imago is gone.
    async fn store_bitmaps(&self) -> Result<()> {
        let Some(node) = self.node.get().and_then(Weak::upgrade) else {
            return Ok(());
        };
        let size = self.size();
        let bitmaps: Vec<StoredBitmap> = node
            .bitmaps()
            .iter()
            .filter(|b| b.persistent())
            .map(|b| StoredBitmap::from_dirty_bitmap(b, size))
            .collect();
        let layout = self
            .layout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if bitmaps.is_empty() && layout.is_none() {
            return Ok(());
        }
        with_image(&self.file, move |image| {
            qcow2_bitmaps::store_replacing(image, &bitmaps, layout.as_ref())
        })
        .await
        .map_err(|e| {
            BlockError::io(
                format!("storing the persistent bitmaps of '{}'", node.name()),
                io::Error::other(crate::open::error_text(&e)),
            )
        })
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// The backing file name written in the image header.
    pub fn backing_file(&self) -> Option<&str> {
        self.backing_file.as_deref()
    }

    /// The backing format written in the image header.
    pub fn backing_format(&self) -> Option<&str> {
        self.backing_format.as_deref()
    }

    /// The backing node, if any.
    pub fn backing(&self) -> Option<&Arc<Node>> {
        self.backing.as_ref()
    }

    /// The file node.
    pub fn file(&self) -> &Arc<Node> {
        &self.file
    }

    /// Opens the image again over the same file and backing nodes, in place of the current
    /// imago instance (which has nothing to write: it was flushed when the node became
    /// inactive, and an inactive node takes no writes).
    async fn reopen(&self) -> Result<()> {
        if !self.read_only {
            // Mark the bitmaps in use again (the image may have changed meanwhile, or was
            // opened inactive and never marked), before imago opens it writable.
            let layout = with_image(&self.file, |image| qcow2_bitmaps::mark_in_use(image))
                .await
                .map_err(|e| BlockError::Invalid(format!("reopening qcow2: {e}")))?;
            *self.layout.lock().unwrap_or_else(|e| e.into_inner()) = layout;
        }
        let storage = NodeStorage::new(Arc::clone(&self.file));
        let backing = self.backing.clone();
        let read_only = self.read_only;
        let st = Arc::clone(&self.state);
        let size = self
            .worker
            .run(move || async move {
                let mut qcow2 = Qcow2::<NodeStorage>::builder(storage)
                    .write(!read_only)
                    .backing(None)
                    .data_file(None)
                    .open(DenyImplicitOpenGate::default())
                    .await?;
                if let Some(node) = backing {
                    let raw = Raw::builder(NodeStorage::new(node))
                        .write(false)
                        .open(DenyImplicitOpenGate::default())
                        .await?;
                    qcow2.set_backing(Some(FormatAccess::new(raw)));
                }
                let access = FormatAccess::new(qcow2);
                let size = access.size();
                *st.access.write().await = Some(access);
                Ok::<_, io::Error>(size)
            })
            .await
            .map_err(|e| Self::err("reopening qcow2", to_io(e)))?
            .map_err(|e| Self::err("reopening qcow2", e))?;
        self.size.store(size, Ordering::Release);
        let layout = self
            .layout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(layout) = layout {
            // imago cleared the bitmaps autoclear bit again.
            with_image(&self.file, move |image| {
                qcow2_bitmaps::restore_autoclear_bit(image, &layout)
            })
            .await
            .map_err(|e| BlockError::Invalid(format!("reopening qcow2: {e}")))?;
        }
        Ok(())
    }

    fn err(what: &str, e: io::Error) -> BlockError {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            return BlockError::NoSpace;
        }
        BlockError::io(what, e)
    }

    async fn flush_metadata(&self) -> Result<()> {
        let st = Arc::clone(&self.state);
        self.worker
            .run(move || async move {
                let acc = st.shared().await?;
                acc.flush().await?;
                acc.sync().await
            })
            .await?
            .map_err(|e| Self::err("flushing qcow2", e))
    }

    async fn mapping(&self, offset: u64, len: u64) -> Result<(Mapped, u64)> {
        let st = Arc::clone(&self.state);
        self.worker
            .run(move || async move {
                let acc = st.shared().await?;
                let (m, n) = acc.get_shallow_mapping(offset, len).await?;
                let m = match m {
                    ShallowMapping::Raw { .. } | ShallowMapping::Special { .. } => Mapped::Data,
                    ShallowMapping::Indirect { offset, .. } => Mapped::Backing { offset },
                    ShallowMapping::Zero { explicit, .. } => Mapped::Zero { explicit },
                    ShallowMapping::Eof { .. } => Mapped::Eof,
                    _ => Mapped::Data,
                };
                Ok::<_, io::Error>((m, n))
            })
            .await?
            .map_err(|e| Self::err("reading qcow2 metadata", e))
    }
}

/// Splits `[offset, end)` at the clusters it covers only in part: returns `(head, tail)`, so
/// that `[offset, head)` and `[tail, end)` lie in such clusters and `[head, tail)` is made of
/// whole clusters (the last one may end at the image's end, which counts as whole).
fn partial_ends(offset: u64, end: u64, cluster: u64, size: u64) -> (u64, u64) {
    let head = if offset % cluster == 0 {
        offset
    } else {
        end.min(offset.next_multiple_of(cluster))
    };
    let tail = if end % cluster == 0 || end == size {
        end
    } else {
        head.max(end - end % cluster)
    };
    (head, tail)
}

/// Makes `[offset, offset + len)` read as zeroes without changing the mapping of anything
/// outside it: parts that read as zeroes in this image are left alone, the others are
/// written with zeroes like any data. Safe beside writes to the rest of the same clusters.
async fn zero_in_place(acc: &Access, mut offset: u64, mut len: u64) -> io::Result<()> {
    let mut zeroes = Vec::new();
    while len > 0 {
        let (mapping, n) = acc.get_shallow_mapping(offset, len).await?;
        let n = n.clamp(1, len);
        if !matches!(mapping, ShallowMapping::Zero { .. }) {
            if zeroes.len() < n as usize {
                zeroes.resize(n as usize, 0);
            }
            acc.write(&zeroes[..n as usize], offset).await?;
        }
        offset += n;
        len -= n;
    }
    Ok(())
}

impl ImageFacts for Qcow2Driver {
    fn driver_name(&self) -> &'static str {
        "qcow2"
    }

    fn filename(&self) -> Option<String> {
        self.file.filename()
    }

    fn image_details(&self) -> ImageDetails {
        ImageDetails {
            actual_size: self.file.image_details().actual_size,
            cluster_size: Some(self.cluster_size),
            backing_filename: self.backing_file.clone(),
            backing_format: self.backing_format.clone(),
            dirty_flag: Some(self.facts.dirty()),
            format_specific: Some(self.facts.format_specific()),
        }
    }
}

#[async_trait]
impl BlockIo for Qcow2Driver {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn preferred_alignment(&self) -> u32 {
        u32::try_from(self.cluster_size).unwrap_or(u32::MAX)
    }

    async fn readv(&self, offset: u64, buf: &SgList) -> Result<()> {
        // imago takes slices: foreign memory is read into a list of ours first.
        let list = if buf.is_private() {
            buf.clone()
        } else {
            SgList::zeroed(buf.len())
        };
        let st = Arc::clone(&self.state);
        let job = list.clone();
        self.worker
            .run(move || async move {
                let acc = st.shared().await?;
                // SAFETY: `job` is private memory (checked above) that nothing else
                // touches while the request runs: its caller waits for it, and the list
                // is ours when it was copied.
                let slices = unsafe { job.io_slices_mut() };
                REQUEST
                    .scope(job.clone(), acc.readv(IoVectorMut::from(slices), offset))
                    .await
            })
            .await?
            .map_err(|e| Self::err("reading qcow2", e))?;
        if !buf.is_private() {
            buf.copy_from_slice(0, &list.to_vec());
        }
        Ok(())
    }

    async fn writev(&self, offset: u64, buf: &SgList, flags: WriteFlags) -> Result<()> {
        let job = if buf.is_private() {
            buf.clone()
        } else {
            SgList::from_vec(buf.to_vec())
        };
        let st = Arc::clone(&self.state);
        self.worker
            .run(move || async move {
                let acc = st.shared().await?;
                // SAFETY: as in `readv`: private memory that nobody writes while the
                // request runs.
                let slices = unsafe { job.io_slices() };
                REQUEST
                    .scope(job.clone(), acc.writev(IoVector::from(slices), offset))
                    .await
            })
            .await?
            .map_err(|e| Self::err("writing qcow2", e))?;
        if flags.fua {
            self.flush_metadata().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        self.flush_metadata().await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // As QEMU: only whole clusters are discarded; they then read as zeroes.
        let cs = self.cluster_size.max(1);
        let start = offset.div_ceil(cs) * cs;
        let end = ((offset + len) / cs * cs).max(start);
        let end = if offset + len == self.size() {
            offset + len
        } else {
            end
        };
        if end <= start {
            return Ok(());
        }
        let st = Arc::clone(&self.state);
        self.worker
            .run(move || async move {
                let mut acc = st.exclusive().await?;
                acc.discard_to_zero(start, end - start).await
            })
            .await?
            .map_err(|e| Self::err("discarding qcow2", e))
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let cs = self.cluster_size.max(1);
        let end = offset + len;
        let aligned = offset % cs == 0 && (end % cs == 0 || end == self.size());
        if flags.fast && !aligned {
            return Err(BlockError::NotFast);
        }
        let st = Arc::clone(&self.state);
        if flags.may_unmap {
            self.worker
                .run(move || async move {
                    let mut acc = st.exclusive().await?;
                    acc.discard_to_zero(offset, len).await
                })
                .await?
                .map_err(|e| Self::err("zeroing qcow2", e))?;
        } else {
            // Beside writes (shared access): only whole clusters get a zero mapping. The
            // clusters at the ends that the range covers only in part are never zeroed as a
            // whole, since a write to their other part may be running: their part of the
            // range is written as zeroes, unless it reads as zeroes already.
            let (head, tail) = partial_ends(offset, end, cs, self.size());
            self.worker
                .run(move || async move {
                    let acc = st.shared().await?;
                    zero_in_place(&acc, offset, head - offset).await?;
                    if tail > head {
                        acc.write_zeroes(head, tail - head).await?;
                    }
                    zero_in_place(&acc, tail, end - tail).await
                })
                .await?
                .map_err(|e| Self::err("zeroing qcow2", e))?;
        }
        if flags.fua {
            self.flush_metadata().await?;
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let (m, n) = self.mapping(offset, len).await?;
        let n = n.clamp(1, len);
        Ok(match m {
            Mapped::Data => Extent {
                len: n,
                data: true,
                zero: false,
                depth: 1,
            },
            Mapped::Zero { explicit } => Extent {
                len: n,
                data: false,
                zero: true,
                depth: u32::from(explicit),
            },
            Mapped::Eof => Extent {
                len,
                data: false,
                zero: true,
                depth: 0,
            },
            Mapped::Backing { offset: boff } => match &self.backing {
                Some(backing) if boff < backing.size() => {
                    let blen = n.min(backing.size() - boff);
                    let e = backing.block_status(boff, blen).await?;
                    Extent {
                        depth: if e.depth == 0 { 0 } else { e.depth + 1 },
                        ..e
                    }
                }
                _ => Extent {
                    len: n,
                    data: false,
                    zero: true,
                    depth: 0,
                },
            },
        })
    }
}

#[async_trait]
impl Resize for Qcow2Driver {
    async fn resize(&self, new_size: u64) -> Result<()> {
        let st = Arc::clone(&self.state);
        // A grown area reads as zeroes. Two things could show through it after a shrink: the
        // backing file's data (QEMU zeroes where the backing file reaches into the new area,
        // in `bdrv_co_truncate`), and the old data in the rest of the cluster the shrink cut
        // in two (imago and QEMU keep that cluster; QEMU 10 shows the stale bytes again).
        let old_size = self.size();
        let cs = self.cluster_size.max(1);
        let backing_end = self.backing.as_ref().map_or(0, |b| b.size());
        let zero_end = backing_end.max(old_size.next_multiple_of(cs)).min(new_size);
        let size = self
            .worker
            .run(move || async move {
                let mut acc = st.exclusive().await?;
                acc.resize(new_size, imago::format::PreallocateMode::None)
                    .await?;
                if zero_end > old_size {
                    acc.write_zeroes(old_size, zero_end - old_size).await?;
                }
                acc.flush().await?;
                Ok::<_, io::Error>(acc.size())
            })
            .await?
            .map_err(|e| Self::err("resizing qcow2", e))?;
        self.size.store(size, Ordering::Release);
        Ok(())
    }
}

#[async_trait]
impl BlockDriver for Qcow2Driver {
    fn resizer(&self) -> Option<&dyn Resize> {
        Some(self)
    }

    fn exclusive_file_writer(&self) -> bool {
        !self.read_only
    }

    fn attach_node(&self, node: Weak<Node>) {
        let _ = self.node.set(node);
    }

    fn supports_persistent_bitmaps(&self) -> bool {
        !self.read_only
    }

    async fn set_active(&self, active: bool) -> Result<()> {
        let was_inactive = self.inactive.swap(!active, Ordering::AcqRel);
        if active && was_inactive {
            // Another process may have changed the image meanwhile: read its metadata
            // again, as QEMU's qcow2_co_invalidate_cache reopens the image.
            if let Err(e) = self.reopen().await {
                self.inactive.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        if self.inactive.load(Ordering::Acquire) {
            // As QEMU's qcow2_close of an inactive node: nothing is written. Persistent
            // bitmaps stay marked in use in the image (they read as inconsistent there).
            let st = Arc::clone(&self.state);
            self.worker
                .run(move || async move {
                    drop(st.access.write().await.take());
                })
                .await?;
            self.closed.store(true, Ordering::Release);
            return Ok(());
        }
        self.flush_metadata().await?;
        if !self.read_only {
            // imago must be flushed and gone before the bitmaps are written next to it.
            let st = Arc::clone(&self.state);
            self.worker
                .run(move || async move {
                    let access = st.access.write().await.take();
                    if let Some(access) = access {
                        access.flush().await?;
                    }
                    Ok::<_, io::Error>(())
                })
                .await?
                .map_err(|e| Self::err("closing qcow2", e))?;
            self.closed.store(true, Ordering::Release);
            self.store_bitmaps().await?;
            self.file.flush().await?;
        }
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_ends_split_at_partly_covered_clusters() {
        const C: u64 = 65536;
        const SIZE: u64 = 10 * C + 512;
        // Aligned: nothing partial.
        assert_eq!(partial_ends(C, 3 * C, C, SIZE), (C, 3 * C));
        // Head and tail in part.
        assert_eq!(partial_ends(4096, 2 * C + 8, C, SIZE), (C, 2 * C));
        // Inside one cluster: all of it is the head.
        assert_eq!(partial_ends(C + 10, C + 20, C, SIZE), (C + 20, C + 20));
        // Up to the end of the image, whose last cluster is short: whole.
        assert_eq!(partial_ends(10 * C, SIZE, C, SIZE), (10 * C, SIZE));
        assert_eq!(partial_ends(9 * C + 1, SIZE, C, SIZE), (10 * C, SIZE));
        // A tail in the short last cluster that stops before the end.
        assert_eq!(partial_ends(9 * C, 10 * C + 8, C, SIZE), (9 * C, 10 * C));
    }

    #[test]
    fn header_facts() {
        let mut h = vec![0u8; HEADER_FACTS_LEN];
        h[..4].copy_from_slice(b"QFI\xfb"); // magic
        h[4..8].copy_from_slice(&3u32.to_be_bytes()); // version 3
        h[20..24].copy_from_slice(&16u32.to_be_bytes()); // cluster_bits: 64 KiB
        h[72..80].copy_from_slice(&(2u64 | 1).to_be_bytes()); // incompatible: corrupt, dirty
        h[80..88].copy_from_slice(&1u64.to_be_bytes()); // compatible: lazy refcounts
        h[96..100].copy_from_slice(&4u32.to_be_bytes()); // refcount_order: 16 bits
        h[100..104].copy_from_slice(&112u32.to_be_bytes()); // header_length
        h[104] = 1; // compression type: zstd
        let f = HeaderFacts::parse(&h).expect("valid header");
        assert_eq!(f.cluster_bits, 16);
        assert!(f.dirty());
        assert_eq!(
            f.format_specific(),
            serde_json::json!({"type": "qcow2", "data": {
                "compat": "1.1", "compression-type": "zstd", "lazy-refcounts": true,
                "refcount-bits": 16, "corrupt": true, "extended-l2": false}})
        );
        // Version 2 stops at byte 72: its defaults.
        h[4..8].copy_from_slice(&2u32.to_be_bytes());
        let f = HeaderFacts::parse(&h[..72]).expect("v2 header");
        assert_eq!(f.format_specific()["data"]["compat"], "0.10");
        assert!(!f.dirty());
        // Wrong magic, short buffers.
        assert_eq!(HeaderFacts::parse(b"QFI"), None);
        h[0] = b'X';
        assert_eq!(HeaderFacts::parse(&h), None);
    }
}
