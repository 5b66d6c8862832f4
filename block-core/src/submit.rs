//! Submitting requests from threads that are not tokio workers.
//!
//! A virtqueue worker or a FUSE reader runs on a plain thread: it must not block on one
//! request while others wait in its queue. A [`Submitter`] takes a [`Request`] (whose buffer
//! it owns, see [`crate::buffer`]), starts it on the runtime it was made for (an export's
//! iothread, or the main runtime) and returns at once; when the request is done, its
//! [`Completion`], with the buffer back, goes to a callback or to a [`CompletionQueue`],
//! which a thread waits on through an eventfd (as cloud-hypervisor's `AsyncIo` does). Many
//! requests are in flight at once: the driver sees them all.
//!
//! ```no_run
//! use block_core::{open, CompletionQueue, NodeGraph, Request, SgList, Submitter};
//! use serde_json::json;
//!
//! let runtime = tokio::runtime::Runtime::new()?;
//! let graph = NodeGraph::new();
//! let node = runtime.block_on(open::blockdev_add(&graph, block_core::BlockdevOptions::from_json(json!({
//!     "driver": "file", "node-name": "disk0", "filename": "disk.img",
//! })).expect("options")))?;
//! let submitter = Submitter::new(node.attach("worker", false)?, runtime.handle().clone());
//!
//! // On a plain thread: 32 reads at once, then their completions as they come.
//! std::thread::spawn(move || {
//!     let queue = CompletionQueue::new().expect("eventfd");
//!     for tag in 0..32u64 {
//!         let buf = SgList::zeroed(4096);
//!         submitter.submit_to(Request::Read { offset: tag * 4096, buf }, tag, &queue);
//!     }
//!     let mut done = Vec::new();
//!     while done.len() < 32 {
//!         queue.wait().expect("wait");
//!         queue.drain(&mut done);
//!     }
//!     for (tag, completion) in done {
//!         completion.result.expect("read");
//!         println!("read {tag}: {} bytes", completion.buf.map_or(0, |b| b.len()));
//!     }
//! })
//! .join()
//! .expect("worker");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::buffer::SgList;
use crate::driver::{WriteFlags, ZeroFlags};
use crate::error::Result;
use crate::node::Attachment;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

/// One request, owning its buffer.
#[derive(Debug)]
pub enum Request {
    /// Read `buf.len()` bytes at `offset` into `buf`.
    Read {
        /// Where to read.
        offset: u64,
        /// Where the bytes go.
        buf: SgList,
    },
    /// Write `buf` at `offset`.
    Write {
        /// Where to write.
        offset: u64,
        /// The bytes.
        buf: SgList,
        /// FUA.
        flags: WriteFlags,
    },
    /// Make completed writes stable.
    Flush,
    /// Discard the range.
    Discard {
        /// Start of the range.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// Make the range read as zeroes.
    WriteZeroes {
        /// Start of the range.
        offset: u64,
        /// Its length.
        len: u64,
        /// FUA, may-unmap, fast.
        flags: ZeroFlags,
    },
}

/// How a request ended, with its buffer back.
#[derive(Debug)]
pub struct Completion {
    /// The request's result.
    pub result: Result<()>,
    /// The buffer of a read or write (the same list: its memory, its owner).
    pub buf: Option<SgList>,
}

impl Request {
    /// Runs the request on `att` (from async code; [`Submitter`] does this on its runtime).
    pub async fn run(self, att: &Attachment) -> Completion {
        match self {
            Request::Read { offset, buf } => Completion {
                result: att.readv(offset, &buf).await,
                buf: Some(buf),
            },
            Request::Write { offset, buf, flags } => Completion {
                result: att.writev(offset, &buf, flags).await,
                buf: Some(buf),
            },
            Request::Flush => Completion {
                result: att.flush().await,
                buf: None,
            },
            Request::Discard { offset, len } => Completion {
                result: att.discard(offset, len).await,
                buf: None,
            },
            Request::WriteZeroes { offset, len, flags } => Completion {
                result: att.write_zeroes(offset, len, flags).await,
                buf: None,
            },
        }
    }
}

/// Submits requests of one attachment from any thread, without blocking; see the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct Submitter {
    attachment: Attachment,
    runtime: tokio::runtime::Handle,
    inline_start: bool,
    inline_max: usize,
}

impl Submitter {
    /// Requests on `attachment` will run on `runtime` (an export's iothread, or the main
    /// runtime).
    pub fn new(attachment: Attachment, runtime: tokio::runtime::Handle) -> Submitter {
        Submitter {
            attachment,
            runtime,
            inline_start: false,
            inline_max: usize::MAX,
        }
    }

    /// With `true`, [`submit`](Self::submit) starts each request on the calling thread
    /// (inside the runtime's context) and hands it to the runtime only if it has to wait: a
    /// request the driver completes without blocking (a `file` read that hits the page cache
    /// with `RWF_NOWAIT`) then completes on the calling thread, before `submit` returns, with
    /// no hop between threads. Nothing blocks either way: what would block goes to the
    /// runtime's blocking pool or worker threads. Off by default.
    pub fn with_inline_start(mut self, inline_start: bool) -> Submitter {
        self.inline_start = inline_start;
        self
    }

    /// Reads and writes of more than `bytes` are not started on the calling thread (with
    /// [`with_inline_start`](Self::with_inline_start)) but on a thread of the runtime's
    /// blocking pool, the same way (what has to wait goes on on the runtime), so that the
    /// submitting thread goes on while the pool's threads copy: a thread that copied every
    /// large request itself would do them one at a time.
    pub fn with_inline_limit(mut self, bytes: usize) -> Submitter {
        self.inline_max = bytes;
        self
    }

    /// The attachment requests go through.
    pub fn attachment(&self) -> &Attachment {
        &self.attachment
    }

    /// The runtime requests run on (where an export may spawn its other tasks, e.g. one
    /// that waits on [`Attachment::watch_size`]).
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// Starts `request` and returns at once; `done` is called with its completion, on a
    /// thread of the runtime (or on the calling thread, before `submit` returns, when the
    /// request started inline completed at once: see
    /// [`with_inline_start`](Self::with_inline_start)).
    pub fn submit(&self, request: Request, done: impl FnOnce(Completion) + Send + 'static) {
        let len = match &request {
            Request::Read { buf, .. } | Request::Write { buf, .. } => buf.len(),
            _ => 0,
        };
        let attachment = self.attachment.clone();
        let task = async move {
            let completion = request.run(&attachment).await;
            // The handle goes before the completion is told: once the submitter's owner saw
            // its last completion, only its own hold on the node is left.
            drop(attachment);
            done(completion);
        };
        if !self.inline_start {
            self.runtime.spawn(task);
        } else if len > self.inline_max {
            // Started on a thread of the blocking pool, as QEMU's thread pool does it: an
            // idle one is woken alone, where a task spawned on the runtime wakes a worker
            // that wakes another to look for more work (an extra switch per request, about
            // 5% of the CPU of a 1 MiB read from the page cache).
            let runtime = self.runtime.clone();
            self.runtime
                .spawn_blocking(move || start_inline(&runtime, Box::pin(task)));
        } else {
            start_inline(&self.runtime, Box::pin(task));
        }
    }

    /// Starts `request` and returns at once; its completion goes to `queue` with `tag`.
    pub fn submit_to(&self, request: Request, tag: u64, queue: &CompletionQueue) {
        let queue = queue.clone();
        self.submit(request, move |c| queue.push(tag, c));
    }
}

/// Polls `task` once on the calling thread, in `runtime`'s context; what has to wait goes on
/// on the runtime.
fn start_inline(
    runtime: &tokio::runtime::Handle,
    mut task: std::pin::Pin<Box<impl std::future::Future<Output = ()> + Send + 'static>>,
) {
    let _context = runtime.enter();
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    if task.as_mut().poll(&mut cx).is_pending() {
        // What it waits for registered the no-op waker; the runtime polls it again at once,
        // which registers the task's own (a future checks its state on every poll).
        runtime.spawn(task);
    }
}

/// Completions waiting for a thread, with an eventfd that is readable while any wait.
#[derive(Debug, Clone)]
pub struct CompletionQueue {
    inner: Arc<Queue>,
}

#[derive(Debug)]
struct Queue {
    state: Mutex<State>,
    eventfd: OwnedFd,
}

#[derive(Debug, Default)]
struct State {
    done: VecDeque<(u64, Completion)>,
    /// The eventfd was written since the last drain: later completions need not write it
    /// again (one system call per batch, not per completion).
    signalled: bool,
}

impl CompletionQueue {
    /// An empty queue with a fresh (non-blocking) eventfd.
    pub fn new() -> io::Result<CompletionQueue> {
        // SAFETY: eventfd has no memory arguments.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(CompletionQueue {
            inner: Arc::new(Queue {
                state: Mutex::new(State::default()),
                // SAFETY: eventfd returned a new descriptor that nothing else owns.
                eventfd: unsafe { OwnedFd::from_raw_fd(fd) },
            }),
        })
    }

    /// The eventfd: readable when completions wait (for an epoll loop). Reading it is left
    /// to [`drain`](Self::drain).
    pub fn eventfd(&self) -> BorrowedFd<'_> {
        self.inner.eventfd.as_fd()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a completion; signals the eventfd if it was not signalled since the last drain.
    pub fn push(&self, tag: u64, completion: Completion) {
        let mut state = self.lock();
        state.done.push_back((tag, completion));
        if !state.signalled {
            state.signalled = true;
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from `one` to an eventfd we own. It cannot fail with a
            // full counter: it is written once per drain.
            unsafe {
                libc::write(
                    self.inner.eventfd.as_raw_fd(),
                    (&one as *const u64).cast(),
                    8,
                )
            };
        }
    }

    /// Moves every waiting completion to `out` (and resets the eventfd); returns how many.
    pub fn drain(&self, out: &mut Vec<(u64, Completion)>) -> usize {
        let mut state = self.lock();
        if state.signalled {
            state.signalled = false;
            let mut count: u64 = 0;
            // SAFETY: reads at most 8 bytes into `count` from a non-blocking eventfd we own
            // (signalled, so the read does not fail with EAGAIN).
            unsafe {
                libc::read(
                    self.inner.eventfd.as_raw_fd(),
                    (&mut count as *mut u64).cast(),
                    8,
                )
            };
        }
        let n = state.done.len();
        out.extend(state.done.drain(..));
        n
    }

    /// Blocks the calling thread until a completion waits (returns at once if one does).
    pub fn wait(&self) -> io::Result<()> {
        loop {
            if !self.lock().done.is_empty() {
                return Ok(());
            }
            let mut pfd = libc::pollfd {
                fd: self.inner.eventfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the duration of the call.
            let r = unsafe { libc::poll(&mut pfd, 1, -1) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}
