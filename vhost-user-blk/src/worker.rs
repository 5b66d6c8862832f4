//! One thread per started virtqueue: it waits on the guest's kick eventfd and on the
//! completion eventfd of its [`QueueHandler`], takes new requests, puts finished ones in the
//! used ring and signals the guest's call eventfd when the ring's notification rules say so.

use crate::inflight::QueueLog;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use virtio_blk::{BlkDevice, InflightLog, NoLog, QueueHandler};
use virtio_queue::Queue;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

/// What a worker and the protocol handler share.
#[derive(Debug)]
pub struct Shared {
    /// The guest's call eventfd (the frontend may replace it while the ring runs).
    pub call: Mutex<Option<File>>,
    /// The ring is enabled (`SET_VRING_ENABLE`).
    pub enabled: AtomicBool,
    /// Asked to stop: drain and exit.
    pub stop: AtomicBool,
    /// Written to wake the worker (stop, enable).
    pub wake: File,
}

impl Shared {
    pub fn new() -> io::Result<Shared> {
        Ok(Shared {
            call: Mutex::new(None),
            enabled: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            wake: eventfd()?,
        })
    }

    /// Wakes the worker.
    pub fn wake(&self) {
        let _ = (&self.wake).write(&1u64.to_ne_bytes());
    }

    fn signal_guest(&self) {
        let call = self.call.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = call.as_ref() {
            let _ = (&*f).write(&1u64.to_ne_bytes());
        }
    }
}

/// An eventfd as a `File` (non-blocking, close-on-exec).
pub fn eventfd() -> io::Result<File> {
    let fd = nix::sys::eventfd::EventFd::from_flags(
        nix::sys::eventfd::EfdFlags::EFD_CLOEXEC | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
    )
    .map_err(io::Error::from)?;
    Ok(File::from(std::os::fd::OwnedFd::from(fd)))
}

/// A running queue.
#[derive(Debug)]
pub struct Worker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Queue>>,
}

/// Everything a worker starts with.
pub struct Start {
    /// The queue, addresses set, `next_avail`/`next_used` where the ring is.
    pub queue: Queue,
    /// Guest memory (the frontend may replace the table while the ring runs).
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// The guest's kick eventfd.
    pub kick: File,
    /// The device.
    pub device: Arc<BlkDevice>,
    /// The in-flight log, if the frontend gave one.
    pub log: Option<QueueLog>,
    /// Chains a previous backend had taken and not completed: started first.
    pub resubmit: Vec<u16>,
    /// Queue index (for the thread name).
    pub index: usize,
}

impl Worker {
    /// Starts the queue's thread.
    pub fn start(start: Start, shared: Arc<Shared>) -> io::Result<Worker> {
        let handler = QueueHandler::new(Arc::clone(&start.device))?;
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("vhost-user-blk q{}", start.index))
            .spawn(move || run(start, handler, &s))?;
        Ok(Worker {
            shared,
            thread: Some(thread),
        })
    }

    /// Stops the queue once every request in flight has completed; returns the queue (its
    /// `next_avail` is the ring's base for `GET_VRING_BASE`).
    pub fn stop(mut self) -> Option<Queue> {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake();
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.shared.stop.store(true, Ordering::Release);
            self.shared.wake();
            let _ = t.join();
        }
    }
}

fn drain_fd(mut f: &File) {
    let mut b = [0u8; 8];
    let _ = f.read(&mut b);
}

fn run(start: Start, mut handler: QueueHandler<GuestMemoryMmap>, shared: &Shared) -> Queue {
    let Start {
        mut queue,
        mem,
        kick,
        log,
        resubmit,
        ..
    } = start;
    let mut log = log;
    let mut nolog = NoLog;
    let log: &mut dyn InflightLog = match log.as_mut() {
        Some(l) => l,
        None => &mut nolog,
    };
    let mut fds = [
        libc::pollfd {
            fd: kick.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: handler.completion_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: shared.wake.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let mut first = true;
    loop {
        let m = mem.memory().into_inner();
        if first {
            first = false;
            handler.resubmit(&mut queue, &m, &resubmit, log);
        }
        if shared.stop.load(Ordering::Acquire) {
            if let Ok(true) = handler.drain(&mut queue, log) {
                shared.signal_guest();
            }
            return queue;
        }
        let mut notify = false;
        if shared.enabled.load(Ordering::Acquire) {
            if let Err(e) = handler.process_queue(&mut queue, &m, log) {
                tracing::warn!("vhost-user-blk: queue error: {e}");
            }
        }
        match handler.complete(&mut queue, log) {
            Ok(n) => notify |= n,
            Err(e) => tracing::warn!("vhost-user-blk: used ring error: {e}"),
        }
        if notify {
            shared.signal_guest();
        }
        drop(m);
        for f in fds.iter_mut() {
            f.revents = 0;
        }
        // SAFETY: three valid pollfds for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::warn!("vhost-user-blk: poll: {e}");
                shared.stop.store(true, Ordering::Release);
            }
            continue;
        }
        if fds[0].revents != 0 {
            drain_fd(&kick);
        }
        if fds[2].revents != 0 {
            drain_fd(&shared.wake);
        }
        // The completion eventfd is reset by `complete`.
    }
}
