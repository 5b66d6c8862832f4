//! A vhost-user-blk backend: a block-core node served to a VM's virtio-blk device (QEMU,
//! cloud-hypervisor, crosvm) or to a userspace driver (libblkio) over a unix socket, with
//! the guest's memory shared.
//!
//! - One frontend at a time, as QEMU's own export: the next one is accepted when the current
//!   one goes (a VM rebooting, a frontend killed and restarted), with no re-adding.
//! - Each queue has its own thread and keeps many requests in flight (the device model of
//!   the `virtio-blk` crate), data moving between guest memory and the node with no copy.
//! - `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`: requests in flight when the backend dies are
//!   resubmitted by the next backend the frontend reconnects to.
//!
//! ```no_run
//! use block_core::{open, NodeGraph, Submitter};
//! use serde_json::json;
//! use vhost_user_blk::{Listen, Options, VhostUserBlk};
//!
//! let runtime = tokio::runtime::Runtime::new()?;
//! let graph = NodeGraph::new();
//! let node = runtime.block_on(open::blockdev_add(&graph, block_core::BlockdevOptions::from_json(json!({
//!     "driver": "file", "node-name": "disk0", "filename": "disk.img",
//! })).expect("options")))?;
//! let submitter = Submitter::new(node.attach("vhost-user-blk", true)?, runtime.handle().clone());
//! let server = VhostUserBlk::start(submitter, Options {
//!     writable: true,
//!     ..Options::new(Listen::Path("/tmp/vhost.sock".into()))
//! })?;
//! // qemu-system-x86_64 ... -chardev socket,id=c0,path=/tmp/vhost.sock
//! //   -device vhost-user-blk-pci,chardev=c0 (guest memory shared: memory-backend-memfd)
//! server.wait_closed();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod backend;
mod transport;

/// The in-flight log (moved to the `virtio-blk` crate, which VDUSE shares).
pub use virtio_blk::inflight;

pub use backend::MAX_QUEUE_SIZE;

use backend::{Backend, Device};
use block_core::Submitter;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vhost::vhost_user::{BackendReqHandler, Error as VhostError};
use virtio_blk::config::DeviceConfig;
use virtio_blk::BlkDevice;

/// Where the backend listens.
#[derive(Debug)]
pub enum Listen {
    /// A unix socket path (a stale socket file there is replaced).
    Path(PathBuf),
    /// A listening unix socket, inherited or passed in.
    Fd(OwnedFd),
}

/// The export's options (QEMU's `BlockExportOptionsVhostUserBlk` and the common ones).
#[derive(Debug)]
pub struct Options {
    /// Where to listen.
    pub addr: Listen,
    /// Logical block size: a power of two from 512 to 2 MiB (default 512).
    pub logical_block_size: u32,
    /// Request queues (default 1).
    pub num_queues: u16,
    /// Writes allowed.
    pub writable: bool,
    /// Every write is made stable before it completes (the device reports no write cache).
    pub writethrough: bool,
    /// The `GET_ID` serial, if any.
    pub serial: Option<String>,
}

impl Options {
    /// QEMU's defaults, listening at `addr`.
    pub fn new(addr: Listen) -> Options {
        Options {
            addr,
            logical_block_size: 512,
            num_queues: 1,
            writable: false,
            writethrough: false,
            serial: None,
        }
    }

    /// QEMU's checks of the options, with its messages.
    pub fn check(&self) -> Result<(), String> {
        let lbs = self.logical_block_size;
        if !(512..=2 << 20).contains(&lbs) || !lbs.is_power_of_two() {
            return Err(
                "parameter logical-block-size must be a power of 2 between 512 and 2097152"
                    .to_string(),
            );
        }
        if self.num_queues == 0 {
            return Err("num-queues must be greater than 0".to_string());
        }
        Ok(())
    }
}

struct State {
    /// The current frontend's socket (to disconnect it).
    client: Mutex<Option<UnixStream>>,
    connected: AtomicBool,
    stopping: AtomicBool,
    stop: std::fs::File,
}

/// A running vhost-user-blk backend.
pub struct VhostUserBlk {
    state: Arc<State>,
    thread: Mutex<Option<JoinHandle<()>>>,
    path: Option<PathBuf>,
}

impl std::fmt::Debug for VhostUserBlk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserBlk")
            .field("path", &self.path)
            .field("connected", &self.has_client())
            .finish_non_exhaustive()
    }
}

impl VhostUserBlk {
    /// Checks `options`, listens, and serves frontends one after another on a thread of its
    /// own until [`stop`](Self::stop).
    pub fn start(submitter: Submitter, options: Options) -> io::Result<VhostUserBlk> {
        options
            .check()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let (listener, path) = match options.addr {
            Listen::Path(ref p) => {
                // A stale socket file (nothing listening) is replaced, as QEMU does.
                if std::fs::symlink_metadata(p).is_ok() && UnixStream::connect(p).is_err() {
                    let _ = std::fs::remove_file(p);
                }
                (UnixListener::bind(p)?, Some(p.clone()))
            }
            Listen::Fd(ref fd) => (UnixListener::from(fd.try_clone()?), None),
        };
        listener.set_nonblocking(true)?;
        let config = DeviceConfig {
            size: submitter.attachment().size(),
            logical_block_size: options.logical_block_size,
            optimal_io_size: 0,
            num_queues: options.num_queues,
            // seg_max follows from it: 126 segments, as QSD offers, which a driver without
            // indirect descriptors fits in a ring of 128.
            queue_size: 128,
            writable: options.writable,
            writeback: !options.writethrough,
            serial: options.serial.clone(),
        };
        let device = Arc::new(Device {
            blk: Arc::new(BlkDevice::new(submitter, &config)),
            config,
        });
        let state = Arc::new(State {
            client: Mutex::new(None),
            connected: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            stop: virtio_blk::worker::eventfd()?,
        });
        let s = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("vhost-user-blk".into())
            .spawn(move || serve(listener, device, &s))?;
        Ok(VhostUserBlk {
            state,
            thread: Mutex::new(Some(thread)),
            path,
        })
    }

    /// Whether a frontend is connected. A frontend that has closed its end counts as gone at
    /// once, even before its connection's rings are stopped.
    pub fn has_client(&self) -> bool {
        if !self.state.connected.load(Ordering::Acquire) {
            return false;
        }
        let client = self.state.client.lock().unwrap_or_else(|e| e.into_inner());
        let Some(c) = client.as_ref() else {
            return false;
        };
        let mut pfd = libc::pollfd {
            fd: c.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call; a zero timeout only samples its state.
        let r = unsafe { libc::poll(&mut pfd, 1, 0) };
        !(r > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0)
    }

    /// Disconnects the current frontend, if any (it may connect again).
    pub fn disconnect(&self) {
        let client = self.state.client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = client.as_ref() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Stops listening, disconnects the frontend, and returns once every request in flight
    /// has completed and every thread has ended.
    pub fn stop(&self) {
        self.state.stopping.store(true, Ordering::Release);
        let _ = std::io::Write::write(&mut &self.state.stop, &1u64.to_ne_bytes());
        self.disconnect();
        self.wait_closed();
    }

    /// Waits until the backend has stopped.
    pub fn wait_closed(&self) {
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for VhostUserBlk {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(listener: UnixListener, device: Arc<Device>, state: &State) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: state.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if state.stopping.load(Ordering::Acquire) {
            return;
        }
        if r < 0 {
            continue;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::warn!("vhost-user-blk: accept: {e}");
                continue;
            }
        };
        if stream.set_nonblocking(false).is_err() {
            continue;
        }
        let Ok(control) = stream.try_clone() else {
            continue;
        };
        *state.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(control);
        state.connected.store(true, Ordering::Release);
        if state.stopping.load(Ordering::Acquire) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        serve_one(stream, &device);
        state.connected.store(false, Ordering::Release);
        *state.client.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Serves one frontend until it goes; then stops its rings (every request in flight
/// completes first).
fn serve_one(stream: UnixStream, device: &Arc<Device>) {
    let backend = Arc::new(Mutex::new(Backend::new(Arc::clone(device))));
    let mut handler = BackendReqHandler::from_stream(stream, Arc::clone(&backend));
    loop {
        match handler.handle_request() {
            Ok(()) => {}
            Err(VhostError::Disconnected) | Err(VhostError::PartialMessage) => break,
            Err(e @ (VhostError::SocketBroken(_) | VhostError::SocketError(_))) => {
                tracing::debug!("vhost-user-blk: frontend gone: {e}");
                break;
            }
            Err(e) => {
                // A request the backend refused: the frontend was told (REPLY_ACK), or it
                // was malformed, which ends the connection as in QEMU.
                tracing::warn!("vhost-user-blk: {e}");
                if matches!(
                    e,
                    VhostError::InvalidMessage
                        | VhostError::OversizedMsg
                        | VhostError::IncorrectFds
                        | VhostError::InactiveFeature(_)
                        | VhostError::InactiveOperation(_)
                ) {
                    break;
                }
            }
        }
    }
    drop(handler);
    backend.lock().unwrap_or_else(|e| e.into_inner()).stop_all();
}

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
