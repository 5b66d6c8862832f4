//! A VDUSE block device: a block-core node served to the host's own kernel as a virtio-blk
//! disk (`/dev/vdX`), with no VM and no kernel NBD client, through Linux's VDUSE ("vDPA
//! Device in Userspace", `Documentation/userspace-api/vduse.rst`).
//!
//! - [`VduseBlk::start`] creates the device (`/dev/vduse/control`, `VDUSE_CREATE_DEV`) with
//!   the `virtio-blk` crate's features and config space, sets up its queues and serves the
//!   kernel's control messages (`SET_STATUS`, `UPDATE_IOTLB`, `GET_VQ_STATE`) on a thread.
//!   Binding it to the vDPA bus, which makes the disk appear, is the administrator's step:
//!   `vdpa dev add name NAME mgmtdev vduse` (iproute2).
//! - Each queue has its own thread and keeps many requests in flight (`virtio_blk::worker`),
//!   data moving between the kernel's IOTLB mappings and the node with no copy and no Rust
//!   reference to the shared memory.
//! - Reconnection: when the daemon stops (or dies) while the device is bound, the kernel
//!   device stays and its I/O waits. A later [`VduseBlk::start`] with the same name takes
//!   the device over; requests taken and not completed before are found in the reconnect
//!   log ([`Options::reconnect_log`], QSD's `$TMPDIR/vduse-blk-NAME` by default) and
//!   resubmitted.
//!
//! ```no_run
//! use block_core::{open, NodeGraph, Submitter};
//! use serde_json::json;
//! use vduse_blk::{Options, VduseBlk};
//!
//! let runtime = tokio::runtime::Runtime::new()?;
//! let graph = NodeGraph::new();
//! let node = runtime.block_on(open::blockdev_add(&graph, block_core::BlockdevOptions::from_json(json!({
//!     "driver": "file", "node-name": "disk0", "filename": "disk.img",
//! })).expect("options")))?;
//! let submitter = Submitter::new(node.attach("vduse-blk", true)?, runtime.handle().clone());
//! let device = VduseBlk::start(submitter, Options {
//!     writable: true,
//!     ..Options::new("disk0")
//! })?;
//! // vdpa dev add name disk0 mgmtdev vduse   ->   /dev/vda
//! device.stop();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod control;
pub mod iotlb;
pub mod sys;

use block_core::Submitter;
use control::Control;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread::JoinHandle;

/// The control device.
pub const CONTROL_PATH: &str = "/dev/vduse/control";

/// QEMU's largest queue (`VIRTQUEUE_MAX_SIZE`).
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// What the device offers.
#[derive(Debug, Clone)]
pub struct Options {
    /// The device's name, unique on the host: `/dev/vduse/NAME` and the vDPA device name.
    pub name: String,
    /// Request queues (1 by default).
    pub num_queues: u16,
    /// Descriptors per queue: a power of two from 4 to 1024 (256 by default).
    pub queue_size: u16,
    /// The logical block size: a power of two from 512 to the page size (512 by default).
    pub logical_block_size: u64,
    /// The serial `GET_ID` answers (none: `GET_ID` is unsupported).
    pub serial: Option<String>,
    /// Writes are allowed (otherwise the device is read-only).
    pub writable: bool,
    /// Every write is made stable before it completes.
    pub writethrough: bool,
    /// The reconnect log's file; `None` keeps no log (a daemon that dies loses the requests
    /// it had taken, and the kernel waits for them forever).
    pub reconnect_log: Option<PathBuf>,
}

impl Options {
    /// QSD's defaults for a device named `name`, the reconnect log where QSD keeps it.
    pub fn new(name: &str) -> Options {
        Options {
            name: name.to_string(),
            num_queues: 1,
            queue_size: 256,
            logical_block_size: 512,
            serial: None,
            writable: false,
            writethrough: false,
            reconnect_log: Some(default_reconnect_log(name)),
        }
    }

    /// QSD's checks, in its order and with its messages; the block size is also held to the
    /// page size, above which Linux's virtio-blk refuses the disk.
    pub fn check(&self) -> Result<(), String> {
        if self.num_queues == 0 {
            return Err("num-queues must be greater than 0".into());
        }
        let q = self.queue_size;
        if q <= 2 || !q.is_power_of_two() || q > MAX_QUEUE_SIZE {
            return Err("queue-size is invalid".into());
        }
        let lbs = self.logical_block_size;
        if !(512..=2 << 20).contains(&lbs) || !lbs.is_power_of_two() {
            return Err(
                "parameter logical-block-size must be a power of 2 between 512 and 2097152".into(),
            );
        }
        let page = page_size();
        if lbs > page {
            return Err(format!(
                "parameter logical-block-size must be a power of 2 between 512 and {page} \
                 (the page size) for a VDUSE device"
            ));
        }
        if sys::name_bytes(&self.name).is_none() || self.name.contains('/') || self.name == ".." {
            return Err(format!(
                "invalid VDUSE device name '{}': 1 to {} bytes, no '/'",
                self.name,
                sys::NAME_MAX - 1
            ));
        }
        Ok(())
    }
}

/// Where QSD keeps a device's reconnect log: `$TMPDIR/vduse-blk-NAME` (`/tmp` by default).
pub fn default_reconnect_log(name: &str) -> PathBuf {
    let dir = std::env::var_os("TMPDIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    dir.join(format!("vduse-blk-{name}"))
}

fn page_size() -> u64 {
    // SAFETY: sysconf takes no pointers.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).unwrap_or(4096)
}

/// Why a device could not be started.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The options are not valid (QSD's message).
    #[error("{0}")]
    Invalid(String),
    /// There is no VDUSE on this host.
    #[error(
        "failed to create vduse device: {CONTROL_PATH}: {} (VDUSE needs Linux 5.15 or later \
         with the vduse module loaded: modprobe vduse)",
        os_message(.0)
    )]
    NoVduse(io::Error),
    /// Another process serves a device of that name.
    #[error("failed to create vduse device: VDUSE device '{0}' is in use by another process")]
    Busy(String),
    /// The kernel refused.
    #[error("failed to create vduse device: {0}")]
    Create(String),
}

pub(crate) use qsd_qapi::strerror as os_message;

/// How [`VduseBlk::stop`] left the kernel device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The device is gone (`VDUSE_DESTROY_DEV`), and its reconnect log with it.
    Destroyed,
    /// The device is still bound to the vDPA bus: it stays, its I/O waits for a daemon that
    /// takes it over, and the reconnect log is kept for that daemon.
    StillBound,
}

/// A running VDUSE block device.
#[derive(Debug)]
pub struct VduseBlk {
    name: String,
    control: Mutex<Option<Control>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    took_over: bool,
}

impl VduseBlk {
    /// Creates the device named `options.name` (or takes over the one of that name that a
    /// previous daemon left bound) and serves it with `submitter`'s node.
    pub fn start(submitter: Submitter, options: Options) -> Result<VduseBlk, Error> {
        options.check().map_err(Error::Invalid)?;
        let (control, took_over) = Control::open(submitter, &options)?;
        let thread = control.spawn().map_err(|e| Error::Create(e.to_string()))?;
        Ok(VduseBlk {
            name: options.name,
            control: Mutex::new(Some(control)),
            thread: Mutex::new(Some(thread)),
            took_over,
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this device was taken over from a previous daemon.
    pub fn took_over(&self) -> bool {
        self.took_over
    }

    /// Whether the kernel's driver has the device running (bound and `DRIVER_OK`).
    pub fn is_running(&self) -> bool {
        self.control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(Control::is_running)
    }

    /// Stops serving: waits for every request taken to complete, closes the device and
    /// destroys it unless it is still bound (then it stays for the next daemon).
    pub fn stop(&self) -> Stopped {
        let control = self
            .control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(control) = control else {
            return Stopped::Destroyed;
        };
        control.request_stop();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
        control.close()
    }
}

impl Drop for VduseBlk {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Opens `path` read-write, close-on-exec.
fn open_rw(path: &Path, nonblock: bool) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = libc::O_CLOEXEC | if nonblock { libc::O_NONBLOCK } else { 0 };
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_come_in_qsds_order() {
        let ok = Options::new("v");
        assert_eq!(ok.check(), Ok(()));
        let with = |f: fn(&mut Options)| {
            let mut o = Options::new("v");
            f(&mut o);
            o.check().unwrap_err()
        };
        assert_eq!(
            with(|o| {
                o.num_queues = 0;
                o.queue_size = 3;
            }),
            "num-queues must be greater than 0"
        );
        for q in [0, 2, 3, 100, 2048] {
            let mut o = Options::new("v");
            o.queue_size = q;
            assert_eq!(o.check().unwrap_err(), "queue-size is invalid", "{q}");
        }
        for q in [4, 256, 1024] {
            let mut o = Options::new("v");
            o.queue_size = q;
            assert_eq!(o.check(), Ok(()), "{q}");
        }
        assert!(with(|o| o.logical_block_size = 1000).contains("2097152"));
        assert!(with(|o| o.logical_block_size = 8192).contains("page size"));
        assert!(with(|o| o.name = String::new()).contains("invalid VDUSE device name"));
        assert!(with(|o| o.name = "a/b".into()).contains("no '/'"));
        assert!(with(|o| o.name = "x".repeat(256)).contains("1 to 255 bytes"));
    }

    #[test]
    fn the_reconnect_log_is_where_qsd_keeps_it() {
        let p = default_reconnect_log("disk0");
        assert_eq!(
            p.file_name().and_then(|n| n.to_str()),
            Some("vduse-blk-disk0")
        );
    }
}

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
