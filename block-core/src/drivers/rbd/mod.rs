//! The `rbd` driver: an image in a Ceph cluster, through librbd (cargo feature `rbd`, which
//! links librbd and librados: Debian's `librbd-dev`).
//!
//! It behaves as QEMU's `block/rbd.c`:
//!
//! - Opening: `rados_create` as `user`, the configuration file `conf` (the default places when
//!   none is given, failure then ignored), `mon_host` from `server` (`host:port` joined by `;`,
//!   IPv6 hosts in brackets), `key` from the `key-secret` object (its bytes in base64, as
//!   QEMU's `qcrypto_secret_lookup_as_base64`: give the secret the Ceph key with
//!   `format=base64`), `auth_client_required` from `auth-client-required` (`cephx;none`),
//!   `rbd_cache` on unless `cache.direct=on`; then `rados_connect`, the pool's I/O context, the
//!   namespace (which must exist), `rbd_open` (at `snapshot` when given). QEMU's messages:
//!   `error connecting: ...`, `error opening pool P: No such file or directory`,
//!   `error reading header from I: No such file or directory`, `rbd snapshots are read-only`.
//!   Opening runs on a blocking thread, never on a runtime worker.
//! - Bounded waits, which QEMU does not set: unless the configuration file sets them,
//!   `client_mount_timeout` and `rados_mon_op_timeout` are 10 s and `rados_osd_op_timeout`
//!   30 s, so that a stopped cluster fails `blockdev-add` (and I/O) with `Connection timed out`
//!   instead of hanging. librados logs nothing on stderr (`log_to_stderr` and
//!   `err_to_stderr` off) unless `RUST_LOG`/`BLOCKEXPORTD_LOG` enables debug output.
//! - I/O through librbd's aio calls, vectored (`rbd_aio_readv`/`rbd_aio_writev`) straight on
//!   the request's memory, any number in flight. The completion runs on a librbd thread; it
//!   only sends the result through a oneshot channel to the awaiting task. librbd has no FUA:
//!   a FUA write is a write then a flush (QEMU leaves `BDRV_REQ_FUA` unsupported, so its block
//!   layer does the same). Write-zeroes is `rbd_aio_write_zeroes`, with
//!   `RBD_WRITE_ZEROES_FLAG_THICK_PROVISION` when the range may not be unmapped; it counts as
//!   fast (QEMU advertises `BDRV_REQ_NO_FALLBACK`).
//! - Block status from `rbd_diff_iterate2` with `whole_object` (on a blocking thread), only
//!   where the image has a valid fast-diff map; librbd 1.16's wrong offsets for ranges not
//!   aligned to an object (Ceph bug 53784) are avoided as QEMU does: the range starts at its
//!   object's start, and images with striping v2 or a parent report everything as data.
//!   Objects found to hold data, and objects written, are remembered (a bit per object,
//!   forgotten by discard and write-zeroes), so that the status of a range in them needs no
//!   walk: the NBD server asks before every structured read, and one walk costs about as
//!   much CPU as the read (a third of the daemon's CPU in 4 KiB random reads, by `perf`).
//!   Only data is remembered: a stale bit reports data where a hole is, which reads right.
//! - The exclusive lock. librbd's `exclusive-lock` feature is cooperative: a second writer
//!   asks the holder for the lock and gets it, and the two then take turns writing, each
//!   unaware of the other (QEMU relies on it). A writable node here takes the lock for
//!   itself with `rbd_lock_acquire(RBD_LOCK_MODE_EXCLUSIVE)`, which librbd then does not hand
//!   over: a second daemon opening the image writable fails (`error acquiring the exclusive
//!   lock of I: ...`), and so do the writes of any other librbd client, while readers still open.
//!   If the holder dies, the next writer waits for the dead client's watch to expire
//!   (`osd_client_watch_timeout`, 30 s by default), then breaks the stale lock (librbd
//!   blocklists the dead client) and opens.
//!   An inactive node (`blockdev-set-active`) releases the lock and takes it again when
//!   reactivated. Images without the feature are opened without a lock, as QEMU does.
//! - `block_resize` is `rbd_resize`; closing flushes, then `rbd_close`,
//!   `rados_ioctx_destroy`, `rados_shutdown` on a blocking thread.

mod ffi;

use crate::buffer::SgList;
use crate::driver::{
    BlockDriver, BlockIo, Extent, ImageDetails, ImageFacts, Resize, WriteFlags, ZeroFlags,
};
use crate::error::{BlockError, Result};
use async_trait::async_trait;
use libc::{c_int, c_void};
use std::ffi::{CStr, CString};
use std::io;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// What to open: the members of QAPI `BlockdevOptionsRbd`, checked, with the secret looked
/// up.
#[derive(Debug, Clone, Default)]
pub struct RbdOptions {
    /// The pool.
    pub pool: String,
    /// The RADOS namespace inside the pool (none: the default one).
    pub namespace: Option<String>,
    /// The image.
    pub image: String,
    /// The Ceph configuration file (none: Ceph's default places).
    pub conf: Option<String>,
    /// A snapshot to open (read-only).
    pub snapshot: Option<String>,
    /// The Ceph user (`id`, without `client.`).
    pub user: Option<String>,
    /// The authentication modes, `cephx` or `none`, in order.
    pub auth_client_required: Option<Vec<String>>,
    /// The key, in base64, as librados' `key` takes it.
    pub key: Option<String>,
    /// Monitors as (host, port).
    pub server: Vec<(String, String)>,
    /// Open read-only.
    pub read_only: bool,
    /// Fall back to read-only where writing is not possible (a snapshot).
    pub auto_read_only: bool,
    /// `cache.direct=on`: librbd's cache off.
    pub no_cache: bool,
    /// Opened for an inactive node: no exclusive lock until it is activated.
    pub inactive: bool,
}

impl RbdOptions {
    /// The `mon_host` value of `server` (QEMU's `qemu_rbd_mon_host`).
    fn mon_host(&self) -> Option<String> {
        if self.server.is_empty() {
            return None;
        }
        let hosts: Vec<String> = self
            .server
            .iter()
            .map(|(host, port)| {
                if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                }
            })
            .collect();
        Some(hosts.join(";"))
    }

    /// The file name QEMU shows: `json:{...}` of the options that name the image.
    fn filename(&self) -> String {
        let s = |v: &str| serde_json::to_string(v).unwrap_or_default();
        let mut parts = vec![format!("\"pool\": {}", s(&self.pool))];
        if let Some(ns) = &self.namespace {
            parts.push(format!("\"namespace\": {}", s(ns)));
        }
        parts.push(format!("\"image\": {}", s(&self.image)));
        if let Some(c) = &self.conf {
            parts.push(format!("\"conf\": {}", s(c)));
        }
        if let Some(snap) = &self.snapshot {
            parts.push(format!("\"snapshot\": {}", s(snap)));
        }
        if let Some(u) = &self.user {
            parts.push(format!("\"user\": {}", s(u)));
        }
        if !self.server.is_empty() {
            let list: Vec<String> = self
                .server
                .iter()
                .map(|(h, p)| format!("{{\"host\": {}, \"port\": {}}}", s(h), s(p)))
                .collect();
            parts.push(format!("\"server\": [{}]", list.join(", ")));
        }
        parts.push("\"driver\": \"rbd\"".into());
        format!("json:{{{}}}", parts.join(", "))
    }
}

/// Why an image could not be opened, with QEMU's messages; the errno is the source.
#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    /// A string holds a NUL byte.
    #[error("'{0}' must not contain a NUL byte")]
    Nul(&'static str),
    /// `rados_create` failed.
    #[error("error initializing")]
    Init(#[source] io::Error),
    /// The configuration file could not be read.
    #[error("error reading conf file {0}")]
    Conf(String, #[source] io::Error),
    /// librados refused a setting.
    #[error("Could not set '{0}'")]
    Set(&'static str, #[source] io::Error),
    /// `rados_connect` failed (no monitor answered, authentication failed).
    #[error("error connecting")]
    Connect(#[source] io::Error),
    /// The pool could not be opened.
    #[error("error opening pool {0}")]
    Pool(String, #[source] io::Error),
    /// Whether the namespace exists could not be found out.
    #[error("error checking namespace")]
    NamespaceCheck(#[source] io::Error),
    /// The namespace does not exist.
    #[error("namespace '{0}' does not exist")]
    NoNamespace(String),
    /// `rbd_open` failed.
    #[error("error reading header from {0}")]
    Open(String, #[source] io::Error),
    /// `rbd_stat` failed.
    #[error("error getting image info from {0}")]
    Stat(String, #[source] io::Error),
    /// A snapshot opened writable.
    #[error("rbd snapshots are read-only")]
    SnapshotWritable,
    /// Another client holds the image's exclusive lock.
    #[error("error acquiring the exclusive lock of {0}")]
    Lock(String, #[source] io::Error),
}

fn errno(r: c_int) -> io::Error {
    io::Error::from_raw_os_error(-r)
}

fn cstr(s: &str, what: &'static str) -> std::result::Result<CString, RbdError> {
    CString::new(s).map_err(|_| RbdError::Nul(what))
}

/// The cluster, pool and image handles, released once by `close`.
#[derive(Debug)]
struct Handles {
    cluster: ffi::rados_t,
    ioctx: ffi::rados_ioctx_t,
    image: ffi::rbd_image_t,
}

// SAFETY: librados and librbd handles may be used from any thread; every call on them
// here is one librbd documents as thread-safe (aio submission, stat, resize, diff).
unsafe impl Send for Handles {}
// SAFETY: as for `Send`; no Rust state lives behind the pointers.
unsafe impl Sync for Handles {}

impl Handles {
    /// Releases what is not null, in reverse order of creation.
    fn release(&mut self) {
        // SAFETY: each handle is valid or null, released once (nulled after), and no
        // request can use them any more (the caller holds them exclusively).
        unsafe {
            if !self.image.is_null() {
                ffi::rbd_close(self.image);
            }
            if !self.ioctx.is_null() {
                ffi::rados_ioctx_destroy(self.ioctx);
            }
            if !self.cluster.is_null() {
                ffi::rados_shutdown(self.cluster);
            }
        }
        self.image = ptr::null_mut();
        self.ioctx = ptr::null_mut();
        self.cluster = ptr::null_mut();
    }
}

impl Drop for Handles {
    fn drop(&mut self) {
        self.release();
    }
}

/// The shared state: the handles, which requests read-lock while they submit and `close`
/// write-locks to release them.
#[derive(Debug)]
struct Inner {
    handles: RwLock<Option<Handles>>,
    name: String,
    size: AtomicU64,
    object_size: u64,
    features: u64,
    /// Objects known to hold data: one bit per object, set by writes and by block status,
    /// cleared by discards and write-zeroes. Only "data" is remembered: a stale bit makes
    /// block status report data where a hole is, which reads correctly; a remembered hole
    /// could hide another client's write.
    known_data: RwLock<Vec<AtomicU64>>,
}

impl Inner {
    fn objects(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let first = offset / self.object_size;
        let end = (offset + len).div_ceil(self.object_size);
        first..end.max(first)
    }

    /// Remembers the objects of the range as holding data (`true`) or forgets them.
    fn mark(&self, offset: u64, len: u64, data: bool) {
        let bits = self.known_data.read().unwrap_or_else(|e| e.into_inner());
        for obj in self.objects(offset, len) {
            let Some(word) = bits.get((obj / 64) as usize) else {
                break;
            };
            let bit = 1u64 << (obj % 64);
            if data {
                word.fetch_or(bit, Ordering::Relaxed);
            } else {
                word.fetch_and(!bit, Ordering::Relaxed);
            }
        }
    }

    /// The bytes from `offset` (at most `len`) in objects known to hold data.
    fn known_run(&self, offset: u64, len: u64) -> u64 {
        let bits = self.known_data.read().unwrap_or_else(|e| e.into_inner());
        let mut end = offset;
        for obj in self.objects(offset, len) {
            let known = bits
                .get((obj / 64) as usize)
                .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (obj % 64)) != 0);
            if !known {
                break;
            }
            end = (obj + 1) * self.object_size;
        }
        end.saturating_sub(offset).min(len)
    }

    /// Sizes the bitmap for an image of `size` bytes.
    fn resize_known(&self, size: u64) {
        let words = size.div_ceil(self.object_size).div_ceil(64) as usize;
        let mut bits = self.known_data.write().unwrap_or_else(|e| e.into_inner());
        bits.truncate(words);
        bits.resize_with(words, || AtomicU64::new(0));
    }
}

impl Inner {
    /// Calls `f` with the image handle, or fails if the image was closed.
    fn with_image<R>(&self, f: impl FnOnce(ffi::rbd_image_t) -> R) -> Result<R> {
        let guard = self.handles.read().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(h) => Ok(f(h.image)),
            None => Err(BlockError::io(
                format!("image {} is closed", self.name),
                io::Error::from_raw_os_error(libc::EIO),
            )),
        }
    }
}

/// The `rbd` driver.
#[derive(Debug)]
pub struct RbdDriver {
    inner: Arc<Inner>,
    read_only: bool,
    /// The node holds the exclusive lock (writable, active, image with the feature).
    locked: AtomicBool,
    filename: String,
}

/// What a completion sends back: librbd's return value. The box also keeps the request's
/// memory and iovecs alive until librbd is done with them.
struct Pending {
    tx: tokio::sync::oneshot::Sender<isize>,
    _buf: Option<SgList>,
    _iov: Vec<libc::iovec>,
}

/// The completion callback, on a librbd thread: hands the result over without blocking.
unsafe extern "C" fn complete(c: ffi::rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the `Box<Pending>` leaked by `aio` for this completion, which is
    // called once; `c` is that completion, released here once.
    let (pending, r) = unsafe {
        let pending = Box::from_raw(arg.cast::<Pending>());
        let r = ffi::rbd_aio_get_return_value(c);
        ffi::rbd_aio_release(c);
        (pending, r)
    };
    let _ = pending.tx.send(r);
}

impl RbdDriver {
    /// Opens the image (blocking: call it on a blocking thread).
    pub fn open(o: &RbdOptions) -> std::result::Result<RbdDriver, RbdError> {
        let mut h = Handles {
            cluster: ptr::null_mut(),
            ioctx: ptr::null_mut(),
            image: ptr::null_mut(),
        };
        let user = o.user.as_deref().map(|u| cstr(u, "user")).transpose()?;
        // SAFETY: `h.cluster` is written on success; `user` is a C string or null.
        let r = unsafe {
            ffi::rados_create(
                &mut h.cluster,
                user.as_ref().map_or(ptr::null(), |u| u.as_ptr()),
            )
        };
        if r < 0 {
            return Err(RbdError::Init(errno(r)));
        }
        let conf = o.conf.as_deref().map(|c| cstr(c, "conf")).transpose()?;
        // SAFETY: a live cluster handle; the path is a C string or null (default places).
        let r = unsafe {
            ffi::rados_conf_read_file(h.cluster, conf.as_ref().map_or(ptr::null(), |c| c.as_ptr()))
        };
        if r < 0 {
            if let Some(c) = &o.conf {
                return Err(RbdError::Conf(c.clone(), errno(r)));
            }
        }
        let set = |key: &'static str, value: &str| -> std::result::Result<(), RbdError> {
            let k = cstr(key, key)?;
            let v = cstr(value, key)?;
            // SAFETY: a live cluster handle and two C strings.
            let r = unsafe { ffi::rados_conf_set(h.cluster, k.as_ptr(), v.as_ptr()) };
            if r < 0 {
                return Err(RbdError::Set(key, errno(r)));
            }
            Ok(())
        };
        let get = |key: &str| -> Option<f64> {
            let k = CString::new(key).ok()?;
            let mut buf = [0 as libc::c_char; 64];
            // SAFETY: a live cluster handle; librados writes at most `buf.len()` bytes,
            // NUL-terminated.
            let r = unsafe { ffi::rados_conf_get(h.cluster, k.as_ptr(), buf.as_mut_ptr(), 64) };
            if r < 0 {
                return None;
            }
            // SAFETY: NUL-terminated by librados within the buffer.
            let s = unsafe { CStr::from_ptr(buf.as_ptr()) };
            s.to_str().ok()?.trim().parse().ok()
        };
        if !tracing::enabled!(tracing::Level::DEBUG) {
            set("log_to_stderr", "false")?;
            set("err_to_stderr", "false")?;
        }
        // Bounded waits, unless the configuration file chose its own.
        for (key, default, ours) in [
            ("client_mount_timeout", 300.0, "10"),
            ("rados_mon_op_timeout", 0.0, "10"),
            ("rados_osd_op_timeout", 0.0, "30"),
        ] {
            if get(key) == Some(default) {
                set(key, ours)?;
            }
        }
        if let Some(hosts) = o.mon_host() {
            set("mon_host", &hosts)?;
        }
        if let Some(key) = &o.key {
            set("key", key)?;
        }
        if let Some(modes) = &o.auth_client_required {
            set("auth_client_required", &modes.join(";"))?;
        }
        // As QEMU: failure ignored (the option always exists).
        let _ = set("rbd_cache", if o.no_cache { "false" } else { "true" });
        // SAFETY: a live, configured cluster handle.
        let r = unsafe { ffi::rados_connect(h.cluster) };
        if r < 0 {
            return Err(RbdError::Connect(errno(r)));
        }
        let pool = cstr(&o.pool, "pool")?;
        // SAFETY: a connected cluster; `h.ioctx` is written on success.
        let r = unsafe { ffi::rados_ioctx_create(h.cluster, pool.as_ptr(), &mut h.ioctx) };
        if r < 0 {
            return Err(RbdError::Pool(o.pool.clone(), errno(r)));
        }
        let ns = cstr(o.namespace.as_deref().unwrap_or(""), "namespace")?;
        if !ns.as_bytes().is_empty() {
            let mut exists = false;
            // SAFETY: a live I/O context, a C string and a bool to write.
            let r = unsafe { ffi::rbd_namespace_exists(h.ioctx, ns.as_ptr(), &mut exists) };
            if r < 0 {
                return Err(RbdError::NamespaceCheck(errno(r)));
            }
            if !exists {
                return Err(RbdError::NoNamespace(
                    o.namespace.clone().unwrap_or_default(),
                ));
            }
        }
        // SAFETY: a live I/O context; librados copies the name.
        unsafe { ffi::rados_ioctx_set_namespace(h.ioctx, ns.as_ptr()) };
        let image = cstr(&o.image, "image")?;
        let snap = o
            .snapshot
            .as_deref()
            .map(|s| cstr(s, "snapshot"))
            .transpose()?;
        // SAFETY: a live I/O context, C strings (the snapshot's may be null); `h.image` is
        // written on success.
        let r = unsafe {
            ffi::rbd_open(
                h.ioctx,
                image.as_ptr(),
                &mut h.image,
                snap.as_ref().map_or(ptr::null(), |s| s.as_ptr()),
            )
        };
        if r < 0 {
            h.image = ptr::null_mut();
            return Err(RbdError::Open(o.image.clone(), errno(r)));
        }
        // SAFETY: all-integer C struct: zeroes are a valid value.
        let mut info: ffi::rbd_image_info_t = unsafe { std::mem::zeroed() };
        // SAFETY: an open image and a struct of the size given.
        let r = unsafe {
            ffi::rbd_stat(
                h.image,
                &mut info,
                std::mem::size_of::<ffi::rbd_image_info_t>(),
            )
        };
        if r < 0 {
            return Err(RbdError::Stat(o.image.clone(), errno(r)));
        }
        let mut features = 0u64;
        // SAFETY: an open image and a u64 to write.
        if unsafe { ffi::rbd_get_features(h.image, &mut features) } < 0 {
            features = 0;
        }
        let mut read_only = o.read_only;
        if o.snapshot.is_some() && !read_only {
            if !o.auto_read_only {
                return Err(RbdError::SnapshotWritable);
            }
            read_only = true;
        }
        let drv = RbdDriver {
            inner: Arc::new(Inner {
                handles: RwLock::new(None),
                name: o.image.clone(),
                size: AtomicU64::new(info.size),
                object_size: info.obj_size.max(1),
                features,
                known_data: RwLock::new(Vec::new()),
            }),
            read_only,
            locked: AtomicBool::new(false),
            filename: o.filename(),
        };
        drv.inner.resize_known(info.size);
        let image_ptr = h.image;
        *drv.inner.handles.write().unwrap_or_else(|e| e.into_inner()) = Some(h);
        if !read_only && !o.inactive {
            drv.lock(image_ptr)?;
        }
        Ok(drv)
    }

    /// Takes the exclusive lock for this node (blocking), where the image has the feature.
    fn lock(&self, image: ffi::rbd_image_t) -> std::result::Result<(), RbdError> {
        if self.inner.features & ffi::RBD_FEATURE_EXCLUSIVE_LOCK == 0 {
            return Ok(());
        }
        // SAFETY: an open image handle (the caller holds it alive).
        let r = unsafe { ffi::rbd_lock_acquire(image, ffi::RBD_LOCK_MODE_EXCLUSIVE) };
        if r < 0 {
            return Err(RbdError::Lock(self.inner.name.clone(), errno(r)));
        }
        self.locked.store(true, Ordering::Release);
        Ok(())
    }

    /// The image's object size in bytes.
    pub fn object_size(&self) -> u64 {
        self.inner.object_size
    }

    fn io_error(&self, what: &str, r: isize) -> BlockError {
        BlockError::io(
            format!("{what} image {}", self.inner.name),
            io::Error::from_raw_os_error(-(r as i32)),
        )
    }

    /// Starts one aio request with `start` (given the image, the iovecs of `buf` from byte
    /// `skip` on, at most `IOV_MAX` of them, and the completion) and returns how many bytes
    /// of `buf` it covers and the receiver of its result. The list and the iovecs stay alive
    /// in the completion's box until librbd completes the request.
    fn submit(
        &self,
        what: &str,
        buf: Option<(&SgList, usize)>,
        start: impl FnOnce(ffi::rbd_image_t, *const libc::iovec, c_int, ffi::rbd_completion_t) -> c_int,
    ) -> Result<(usize, tokio::sync::oneshot::Receiver<isize>)> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let iov = buf.map_or_else(Vec::new, |(b, skip)| b.with_iovecs(skip, |i| i.to_vec()));
        let n: usize = iov.iter().map(|i| i.iov_len).sum();
        let iov_ptr = iov.as_ptr();
        let iov_cnt = iov.len() as c_int;
        let pending = Box::into_raw(Box::new(Pending {
            tx,
            _buf: buf.map(|(b, _)| b.clone()),
            _iov: iov,
        }));
        let r = self.inner.with_image(|image| {
            let mut c: ffi::rbd_completion_t = ptr::null_mut();
            // SAFETY: `pending` is a live box that the callback takes over; `c` is written
            // on success.
            let r =
                unsafe { ffi::rbd_aio_create_completion(pending.cast(), Some(complete), &mut c) };
            if r < 0 {
                return r;
            }
            // `iov_ptr` points into the box's vector, alive until the callback.
            let r = start(image, iov_ptr, iov_cnt, c);
            if r < 0 {
                // SAFETY: librbd refused the request: the completion will never run.
                unsafe { ffi::rbd_aio_release(c) };
            }
            r
        });
        match r {
            Ok(r) if r >= 0 => Ok((n, rx)),
            other => {
                // SAFETY: no completion was created or the request was refused before it
                // started: the callback never runs and the box is still ours.
                drop(unsafe { Box::from_raw(pending) });
                match other {
                    Ok(r) => Err(self.io_error(what, r as isize)),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Waits for a request started by [`submit`](Self::submit).
    async fn wait(&self, what: &str, rx: tokio::sync::oneshot::Receiver<isize>) -> Result<isize> {
        let r = rx.await.map_err(|_| {
            BlockError::io(
                format!("{what} image {}", self.inner.name),
                io::Error::from_raw_os_error(libc::EIO),
            )
        })?;
        if r < 0 {
            return Err(self.io_error(what, r));
        }
        Ok(r)
    }

    /// Starts a request without data and waits for it.
    async fn aio(
        &self,
        what: &str,
        start: impl FnOnce(ffi::rbd_image_t, *const libc::iovec, c_int, ffi::rbd_completion_t) -> c_int,
    ) -> Result<isize> {
        let (_, rx) = self.submit(what, None, start)?;
        self.wait(what, rx).await
    }

    /// Runs `f` with the image on a blocking thread.
    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner, ffi::rbd_image_t) -> R + Send + 'static,
    ) -> Result<R> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || inner.with_image(|image| f(&inner, image)))
            .await
            .map_err(|e| BlockError::io("rbd worker", io::Error::other(e)))?
    }

    /// Whether block status may ask `rbd_diff_iterate2`, and from where (QEMU's checks).
    fn diff_usable(inner: &Inner, image: ffi::rbd_image_t) -> bool {
        if inner.features & ffi::RBD_FEATURE_FAST_DIFF == 0
            || inner.features & ffi::RBD_FEATURE_STRIPINGV2 != 0
        {
            return false;
        }
        let mut flags = 0u64;
        // SAFETY: an open image (the read lock of `with_image` is held) and a u64.
        if unsafe { ffi::rbd_get_flags(image, &mut flags) } < 0
            || flags & ffi::RBD_FLAG_FAST_DIFF_INVALID != 0
        {
            return false;
        }
        // A clone (an image with a parent) answers anything but -ENOENT.
        // SAFETY: null buffers of length 0, as QEMU passes them: librbd only reports.
        let r = unsafe {
            ffi::rbd_get_parent_info2(
                image,
                ptr::null_mut(),
                0,
                ptr::null_mut(),
                0,
                ptr::null_mut(),
                0,
                ptr::null_mut(),
                0,
            )
        };
        r == -libc::ENOENT
    }
}

/// The state of one `rbd_diff_iterate2` walk (QEMU's `RBDDiffIterateReq`).
struct DiffWalk {
    offs: u64,
    bytes: u64,
    exists: bool,
}

/// Returned by the callback to stop the walk once the status changes.
const STOP_WALK: c_int = -9000;

unsafe extern "C" fn diff_cb(
    offs: u64,
    len: libc::size_t,
    exists: c_int,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: `arg` is the `DiffWalk` the caller lent for the walk, used by this thread only.
    let w = unsafe { &mut *arg.cast::<DiffWalk>() };
    if exists == 0 {
        return 0;
    }
    if !w.exists && offs > w.offs {
        w.bytes = offs - w.offs;
        return STOP_WALK;
    }
    if w.exists && offs > w.offs + w.bytes {
        return STOP_WALK;
    }
    w.bytes += len as u64;
    w.exists = true;
    0
}

impl ImageFacts for RbdDriver {
    fn driver_name(&self) -> &'static str {
        "rbd"
    }

    fn filename(&self) -> Option<String> {
        Some(self.filename.clone())
    }

    fn image_details(&self) -> ImageDetails {
        ImageDetails {
            cluster_size: Some(self.inner.object_size),
            dirty_flag: Some(false),
            format_specific: Some(serde_json::json!({"type": "rbd", "data": {}})),
            ..ImageDetails::default()
        }
    }
}

#[async_trait]
impl BlockIo for RbdDriver {
    fn size(&self) -> u64 {
        self.inner.size.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    async fn readv(&self, offset: u64, buf: &SgList) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let (n, rx) = self.submit("reading", Some((buf, done)), |image, iov, cnt, c| {
                // SAFETY: an open image; the iovecs and their memory live in the
                // completion's box until librbd is done.
                unsafe { ffi::rbd_aio_readv(image, iov, cnt, at, c) }
            })?;
            let r = self.wait("reading", rx).await?;
            // Short reads are padded with zeroes, as QEMU does.
            let got = (r as usize).min(n);
            if got < n {
                buf.fill_zero(done + got, n - got);
            }
            done += n;
        }
        Ok(())
    }

    async fn writev(&self, offset: u64, buf: &SgList, flags: WriteFlags) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let (n, rx) = self.submit("writing", Some((buf, done)), |image, iov, cnt, c| {
                // SAFETY: as for reads.
                unsafe { ffi::rbd_aio_writev(image, iov, cnt, at, c) }
            })?;
            self.wait("writing", rx).await?;
            done += n;
        }
        self.inner.mark(offset, buf.len() as u64, true);
        if flags.fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        self.aio("flushing", |image, _, _, c| {
            // SAFETY: an open image and a fresh completion.
            unsafe { ffi::rbd_aio_flush(image, c) }
        })
        .await?;
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // Forgotten before and after, so that a block status running beside cannot keep it.
        self.inner.mark(offset, len, false);
        let r = self
            .aio("discarding in", |image, _, _, c| {
                // SAFETY: an open image and a fresh completion.
                unsafe { ffi::rbd_aio_discard(image, offset, len, c) }
            })
            .await;
        self.inner.mark(offset, len, false);
        r.map(drop)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let zero_flags = if flags.may_unmap {
            0
        } else {
            ffi::RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        };
        // librbd takes a size_t length: no split is needed on 64-bit hosts.
        let n = usize::try_from(len).map_err(|_| BlockError::Invalid("length too large".into()))?;
        self.inner.mark(offset, len, false);
        let r = self
            .aio("zeroing in", |image, _, _, c| {
                // SAFETY: an open image and a fresh completion.
                unsafe { ffi::rbd_aio_write_zeroes(image, offset, n, c, zero_flags, 0) }
            })
            .await;
        self.inner.mark(offset, len, false);
        r?;
        if flags.fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let size = self.size();
        let len = len.min(size.saturating_sub(offset));
        let data = Extent::new(len, true, false, 1);
        if len == 0 {
            return Ok(data);
        }
        // Objects known to hold data need no walk (NBD asks before every structured read).
        let known = self.inner.known_run(offset, len);
        if known > 0 {
            return Ok(Extent::new(known, true, false, 1));
        }
        self.blocking(move |inner, image| {
            if !RbdDriver::diff_usable(inner, image) {
                return data;
            }
            // librbd 1.16 reports wrong offsets for a start inside an object: start at the
            // object's start (harmless with `whole_object`).
            let head = offset % inner.object_size;
            let mut walk = DiffWalk {
                offs: offset - head,
                bytes: 0,
                exists: false,
            };
            let bytes = len + head;
            // SAFETY: an open image; the callback gets `walk`, which outlives the call.
            let r = unsafe {
                ffi::rbd_diff_iterate2(
                    image,
                    ptr::null(),
                    walk.offs,
                    bytes,
                    1,
                    1,
                    Some(diff_cb),
                    (&mut walk as *mut DiffWalk).cast(),
                )
            };
            if r < 0 && r != STOP_WALK {
                return data;
            }
            if !walk.exists && r == 0 {
                walk.bytes = bytes;
            }
            let n = walk.bytes.min(bytes).saturating_sub(head).min(len);
            if n == 0 {
                return data;
            }
            if walk.exists {
                inner.mark(walk.offs, walk.bytes, true);
                Extent::new(n, true, false, 1)
            } else {
                Extent::new(n, false, true, 1)
            }
        })
        .await
    }
}

#[async_trait]
impl Resize for RbdDriver {
    async fn resize(&self, new_size: u64) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let r = self
            .blocking(move |inner, image| {
                // SAFETY: an open image.
                let r = unsafe { ffi::rbd_resize(image, new_size) };
                if r >= 0 {
                    inner.size.store(new_size, Ordering::Release);
                    inner.resize_known(new_size);
                }
                r
            })
            .await?;
        if r < 0 {
            return Err(self.io_error("resizing", r as isize));
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDriver for RbdDriver {
    fn resizer(&self) -> Option<&dyn Resize> {
        Some(self)
    }

    async fn set_active(&self, active: bool) -> Result<()> {
        if self.read_only || self.inner.features & ffi::RBD_FEATURE_EXCLUSIVE_LOCK == 0 {
            return Ok(());
        }
        if active {
            if self.locked.load(Ordering::Acquire) {
                return Ok(());
            }
            let name = self.inner.name.clone();
            let r = self
                .blocking(|_, image| {
                    // SAFETY: an open image.
                    unsafe { ffi::rbd_lock_acquire(image, ffi::RBD_LOCK_MODE_EXCLUSIVE) }
                })
                .await?;
            if r < 0 {
                // The cause in the text too: activation errors reach QMP by their text alone.
                let cause = errno(r);
                return Err(BlockError::io(
                    format!(
                        "error acquiring the exclusive lock of {name}: {}",
                        qsd_qapi::strerror(&cause)
                    ),
                    cause,
                ));
            }
            self.locked.store(true, Ordering::Release);
        } else if self.locked.swap(false, Ordering::AcqRel) {
            let r = self
                .blocking(|_, image| {
                    // SAFETY: an open image whose lock this node holds.
                    unsafe { ffi::rbd_lock_release(image) }
                })
                .await?;
            if r < 0 {
                return Err(self.io_error("releasing the lock of", r as isize));
            }
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        let flushed = if self.read_only {
            Ok(())
        } else {
            self.flush().await
        };
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let handles = inner
                .handles
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            // rbd_close waits for requests still in flight and releases the lock.
            drop(handles);
        })
        .await
        .map_err(|e| BlockError::io("rbd worker", io::Error::other(e)))?;
        flushed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mon_host_and_filename_as_qemu() {
        let o = RbdOptions {
            pool: "rbd".into(),
            image: "img0".into(),
            conf: Some("/etc/ceph/c.conf".into()),
            server: vec![
                ("::1".into(), "6789".into()),
                ("10.0.0.1".into(), "3300".into()),
            ],
            ..RbdOptions::default()
        };
        assert_eq!(o.mon_host().as_deref(), Some("[::1]:6789;10.0.0.1:3300"));
        assert_eq!(
            o.filename(),
            "json:{\"pool\": \"rbd\", \"image\": \"img0\", \"conf\": \"/etc/ceph/c.conf\", \
             \"server\": [{\"host\": \"::1\", \"port\": \"6789\"}, {\"host\": \"10.0.0.1\", \
             \"port\": \"3300\"}], \"driver\": \"rbd\"}"
        );
        assert_eq!(RbdOptions::default().mon_host(), None);
    }

    #[test]
    fn known_data_is_whole_objects_and_forgotten_by_zeroing() {
        let inner = Inner {
            handles: RwLock::new(None),
            name: "i".into(),
            size: AtomicU64::new(0),
            object_size: 4096,
            features: 0,
            known_data: RwLock::new(Vec::new()),
        };
        inner.resize_known(100 * 4096);
        assert_eq!(inner.known_run(0, 8192), 0);
        inner.mark(4095, 2, true); // objects 0 and 1
        assert_eq!(inner.known_run(100, 1 << 20), 8192 - 100);
        assert_eq!(inner.known_run(100, 50), 50);
        inner.mark(4096, 1, false);
        assert_eq!(inner.known_run(0, 1 << 20), 4096);
        assert_eq!(inner.known_run(4096, 1 << 20), 0);
        inner.mark(99 * 4096, 4096, true);
        assert_eq!(inner.known_run(99 * 4096, 1 << 20), 4096);
        // Objects past the end of the bitmap are never known.
        inner.mark(200 * 4096, 4096, true);
        assert_eq!(inner.known_run(200 * 4096, 4096), 0);
        inner.resize_known(64 * 4096);
        assert_eq!(inner.known_run(0, 4096), 4096);
        assert_eq!(inner.known_run(99 * 4096, 4096), 0);
    }

    #[test]
    fn diff_walk_stops_where_the_status_changes() {
        let mut w = DiffWalk {
            offs: 0,
            bytes: 0,
            exists: false,
        };
        let arg = (&mut w as *mut DiffWalk).cast();
        // SAFETY: `arg` is `w`, alive for the calls.
        unsafe {
            assert_eq!(diff_cb(0, 4096, 1, arg), 0);
            assert_eq!(diff_cb(4096, 4096, 1, arg), 0);
            assert_eq!(diff_cb(16384, 4096, 1, arg), STOP_WALK);
        }
        assert!(w.exists);
        assert_eq!(w.bytes, 8192);
        let mut h = DiffWalk {
            offs: 0,
            bytes: 0,
            exists: false,
        };
        let arg = (&mut h as *mut DiffWalk).cast();
        // SAFETY: as above.
        let r = unsafe { diff_cb(8192, 4096, 1, arg) };
        assert_eq!(r, STOP_WALK);
        assert!(!h.exists);
        assert_eq!(h.bytes, 8192);
    }
}
