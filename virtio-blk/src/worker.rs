//! One thread per started virtqueue, for transports whose driver kicks through an eventfd
//! (vhost-user, VDUSE): it waits on the kick eventfd and on the completion eventfd of its
//! [`QueueHandler`], takes new requests, puts finished ones in the used ring and has the
//! [`Transport`] signal the driver when the ring's notification rules say so.

use crate::inflight::QueueLog;
use crate::queue::{BlkDevice, InflightLog, NoLog, QueueHandler};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

/// What the worker needs from its transport.
pub trait Transport: Send + Sync + 'static {
    /// Tells the driver that the used ring has new entries (vhost-user writes the call
    /// eventfd, VDUSE asks the kernel to inject the interrupt).
    fn notify(&self);

    /// A request named memory the worker's map does not cover: look at the device's memory
    /// again (VDUSE's IOTLB grows as the driver maps buffers, without a message). Returns
    /// whether the map changed; the default, for memory that is complete, is `false`.
    fn refresh_memory(&self) -> bool {
        false
    }
}

/// What a worker and the protocol handler share.
#[derive(Debug)]
pub struct Shared<T> {
    /// The transport's side: notifications and memory.
    pub transport: T,
    /// The ring is enabled (vhost-user's `SET_VRING_ENABLE`); a disabled ring takes no new
    /// requests.
    pub enabled: AtomicBool,
    /// Asked to stop: drain and exit.
    pub stop: AtomicBool,
    /// Written to wake the worker (stop, enable).
    pub wake: File,
}

impl<T: Transport> Shared<T> {
    /// A disabled ring's shared state.
    pub fn new(transport: T) -> io::Result<Shared<T>> {
        Ok(Shared {
            transport,
            enabled: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            wake: eventfd()?,
        })
    }

    /// Wakes the worker.
    pub fn wake(&self) {
        let _ = (&self.wake).write(&1u64.to_ne_bytes());
    }
}

/// An eventfd as a `File` (non-blocking, close-on-exec).
pub fn eventfd() -> io::Result<File> {
    // SAFETY: eventfd takes no pointers; a negative result is checked below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// A running queue.
#[derive(Debug)]
pub struct Worker<T: Transport> {
    shared: Arc<Shared<T>>,
    thread: Option<JoinHandle<Queue>>,
}

/// Everything a worker starts with.
pub struct Start {
    /// The queue, addresses set, `next_avail`/`next_used` where the ring is.
    pub queue: Queue,
    /// The driver's memory (the transport may replace the map while the ring runs).
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// The driver's kick eventfd.
    pub kick: File,
    /// The device.
    pub device: Arc<BlkDevice>,
    /// The in-flight log, if the transport keeps one.
    pub log: Option<QueueLog>,
    /// Chains a previous backend had taken and not completed: started first.
    pub resubmit: Vec<u16>,
    /// The thread's name.
    pub name: String,
    /// Where the worker publishes the ring's next available index after each pass (VDUSE's
    /// `GET_VQ_STATE` asks it while the ring runs), if anyone asks.
    pub next_avail: Option<Arc<AtomicU16>>,
}

impl<T: Transport> Worker<T> {
    /// Starts the queue's thread.
    pub fn start(start: Start, shared: Arc<Shared<T>>) -> io::Result<Worker<T>> {
        let handler = QueueHandler::new(Arc::clone(&start.device))?;
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(start.name.clone())
            .spawn(move || run(start, handler, &s))?;
        Ok(Worker {
            shared,
            thread: Some(thread),
        })
    }

    /// Stops the queue once every request in flight has completed; returns the queue (its
    /// `next_avail` is where the ring goes on).
    pub fn stop(mut self) -> Option<Queue> {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake();
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl<T: Transport> Drop for Worker<T> {
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

fn run<T: Transport>(
    start: Start,
    mut handler: QueueHandler<GuestMemoryMmap>,
    shared: &Shared<T>,
) -> Queue {
    let Start {
        mut queue,
        mem,
        kick,
        log,
        resubmit,
        name,
        next_avail,
        ..
    } = start;
    let mut log = log;
    let mut nolog = NoLog;
    let log: &mut dyn InflightLog = match log.as_mut() {
        Some(l) => l,
        None => &mut nolog,
    };
    let mut refresh = || {
        shared
            .transport
            .refresh_memory()
            .then(|| mem.memory().into_inner())
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
        let mut m = mem.memory().into_inner();
        if first {
            first = false;
            handler.resubmit(&mut queue, &mut m, &resubmit, log, &mut refresh);
        }
        if shared.stop.load(Ordering::Acquire) {
            if let Ok(true) = handler.drain(&mut queue, log) {
                shared.transport.notify();
            }
            return queue;
        }
        let mut notify = false;
        if shared.enabled.load(Ordering::Acquire) {
            if let Err(e) = handler.process_queue_with(&mut queue, &mut m, log, &mut refresh) {
                tracing::warn!("{name}: queue error: {e}");
            }
        }
        if let Some(n) = &next_avail {
            n.store(queue.next_avail(), Ordering::Release);
        }
        match handler.complete(&mut queue, log) {
            Ok(n) => notify |= n,
            Err(e) => tracing::warn!("{name}: used ring error: {e}"),
        }
        if notify {
            shared.transport.notify();
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
                tracing::warn!("{name}: poll: {e}");
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
