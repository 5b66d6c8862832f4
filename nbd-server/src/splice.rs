//! Zero-copy read replies: page-cache pages go from the image file into a pipe and from the
//! pipe into the socket with `splice(2)`, never through this process's memory.
//!
//! A read of a plain file (a `raw` node over a `file` node without `O_DIRECT`, see
//! [`Node::splice_read`](block_core::Node::splice_read)) on a plaintext unix or TCP socket
//! fills one or more pipes from a per-connection [`Pipes`] pool while the request executes;
//! the reply then queues its header bytes followed by the pipes, and the writer moves each
//! pipe's pages to the socket through a [`SpliceSink`]. The server copies no data: the only
//! copy left is the client's own receive. Anything that cannot take this path (TLS, a format
//! layer, a pool out of descriptors, a short splice) falls back to the copying read.
//!
//! The pages are the page cache's, referenced rather than copied: a write that lands on the
//! same range after the read completed but before the client took the reply can show in it.
//! That is a read concurrent with a write from the client's side (it has no reply yet), for
//! which NBD, like any block device, promises no order.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Reads shorter than this are copied: for small reads one `preadv2` and a share of a
/// `writev` cost less than two `splice` calls.
pub(crate) const SPLICE_MIN: u64 = 32 * 1024;
/// The capacity asked of each pipe.
const PIPE_SIZE: usize = 1 << 20;
/// Idle pipes kept per connection.
const POOL_MAX: usize = 8;
/// Pipes a connection may hold at once (two descriptors each); past that, reads are copied.
const PIPES_MAX: usize = 16;
/// Smaller pipes (a host that refuses to grow them) are not worth a splice.
const PIPE_MIN: usize = 64 * 1024;

#[cfg(feature = "splice-counter")]
static SPLICED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[cfg(feature = "splice-counter")]
/// Bytes this process has sent in read replies without copying them (spliced from the page
/// cache into sockets), over all servers and connections since it started.
pub fn spliced_bytes() -> u64 {
    SPLICED.load(Ordering::Relaxed)
}

/// A pipe whose pages are on their way to the socket.
#[derive(Debug)]
pub(crate) struct Pipe {
    read: OwnedFd,
    write: Arc<OwnedFd>,
    /// The pool's count of live pipes, one less when this one is closed.
    live: Arc<AtomicUsize>,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pipe {
    /// A non-blocking pipe of (at least) `size` bytes, or less when the host limits pipe
    /// sizes (`/proc/sys/fs/pipe-max-size` for unprivileged processes); returns it with its
    /// capacity.
    fn new(size: usize, live: &Arc<AtomicUsize>) -> io::Result<(Pipe, usize)> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded: both are open descriptors that nothing else owns.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ and F_GETPIPE_SZ on an open pipe take and return an int.
        let mut cap =
            unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
        if cap < 0 {
            // SAFETY: as above.
            cap = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        }
        if cap <= 0 {
            return Err(io::Error::last_os_error());
        }
        live.fetch_add(1, Ordering::Relaxed);
        Ok((
            Pipe {
                read,
                write: Arc::new(write),
                live: Arc::clone(live),
            },
            cap as usize,
        ))
    }

    /// The write end, for [`Node::splice_read`](block_core::Node::splice_read).
    pub(crate) fn write_end(&self) -> &Arc<OwnedFd> {
        &self.write
    }

    /// Whether nothing waits in the pipe (`FIONREAD`); false when that cannot be told.
    pub(crate) fn is_empty(&self) -> bool {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the pointer, which points at `n`; the
        // descriptor is open while `self` lives.
        let r = unsafe { libc::ioctl(self.read.as_raw_fd(), libc::FIONREAD, &mut n) };
        r == 0 && n == 0
    }
}

/// A connection's idle pipes, all of the same capacity.
#[derive(Debug)]
pub(crate) struct Pipes {
    free: Mutex<Vec<Pipe>>,
    capacity: usize,
    live: Arc<AtomicUsize>,
    /// The node declined to splice: the connection stops asking.
    declined: AtomicBool,
}

impl Pipes {
    /// An empty pool, or `None` when the host gives no pipes (or only small ones: an
    /// unprivileged process past `fs.pipe-user-pages-soft`). The pipe made to learn the
    /// capacity is closed again, so that an idle connection holds none.
    pub(crate) fn new() -> Option<Pipes> {
        let live = Arc::new(AtomicUsize::new(0));
        let (_probe, capacity) = Pipe::new(PIPE_SIZE, &live).ok()?;
        if capacity < PIPE_MIN {
            return None;
        }
        Some(Pipes {
            free: Mutex::new(Vec::new()),
            capacity,
            live,
            declined: AtomicBool::new(false),
        })
    }

    /// The longest read the connection can splice at once.
    pub(crate) fn max_bytes(&self) -> usize {
        self.capacity * PIPES_MAX
    }

    /// Remembers that the node cannot splice.
    pub(crate) fn decline(&self) {
        self.declined.store(true, Ordering::Relaxed);
    }

    /// Whether the node said it cannot splice.
    pub(crate) fn declined(&self) -> bool {
        self.declined.load(Ordering::Relaxed)
    }

    /// The bytes one pipe holds.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// An empty pipe; `None` when the connection holds [`PIPES_MAX`] already or none can be
    /// made (e.g. out of descriptors).
    pub(crate) fn take(&self) -> Option<Pipe> {
        if let Some(p) = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Some(p);
        }
        if self.live.load(Ordering::Relaxed) >= PIPES_MAX {
            return None;
        }
        match Pipe::new(self.capacity, &self.live) {
            Ok((p, cap)) if cap >= self.capacity => Some(p),
            _ => None,
        }
    }

    /// Idle pipes in the pool.
    #[cfg(test)]
    pub(crate) fn idle(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Returns a pipe that was drained completely.
    pub(crate) fn put(&self, pipe: Pipe) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < POOL_MAX {
            free.push(pipe);
        }
    }
}

/// The socket side: a second registration of the connection's socket (a duplicate
/// descriptor) that waits for it to be writable and splices pipes into it.
#[derive(Debug)]
pub(crate) struct SpliceSink {
    fd: AsyncFd<OwnedFd>,
}

impl SpliceSink {
    /// Registers a duplicate of `socket` with the current runtime.
    pub(crate) fn new(socket: BorrowedFd<'_>) -> io::Result<SpliceSink> {
        let fd = socket.try_clone_to_owned()?;
        // SAFETY: `fd` is owned by the AsyncFd from here on, so it stays open for as long as
        // it is registered (the I/O-safety condition of `register_with_interest`).
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::WRITABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(SpliceSink { fd })
    }

    /// Moves up to `len` bytes from `pipe` into the socket once it is writable; returns how
    /// many moved (at least one). Cancel-safe.
    pub(crate) async fn splice_from(&self, pipe: &Pipe, len: usize) -> io::Result<usize> {
        loop {
            let mut ready = self.fd.writable().await?;
            let r = ready.try_io(|fd| {
                // SAFETY: both descriptors are open for the call; null offsets, as pipes and
                // sockets require.
                let n = unsafe {
                    libc::splice(
                        pipe.read.as_raw_fd(),
                        std::ptr::null_mut(),
                        fd.as_raw_fd(),
                        std::ptr::null_mut(),
                        len,
                        libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => {
                    #[cfg(feature = "splice-counter")]
                    SPLICED.fetch_add(n as u64, Ordering::Relaxed);
                    return Ok(n);
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                // Would block: the readiness was cleared, wait again.
                Err(_) => continue,
            }
        }
    }
}

/// Asks for a send buffer of `bytes` on a socket (`SO_SNDBUF`); the kernel caps it at
/// `net.core.wmem_max`. Best effort: a failure leaves the default.
pub(crate) fn set_send_buffer(socket: RawFd, bytes: usize) {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: SO_SNDBUF takes an int, passed by pointer with its size, valid for the call.
    let r = unsafe {
        libc::setsockopt(
            socket,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "SO_SNDBUF");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pipes_carry_bytes_into_a_socket() {
        let pipes = Pipes::new().expect("pipes");
        assert!(pipes.capacity() >= 64 * 1024);
        let pipe = pipes.take().expect("pipe");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut src = tempfile_with(&data);
        // Fill the pipe the way a node does.
        let mut off: libc::loff_t = 0;
        let mut left = data.len();
        while left > 0 {
            // SAFETY: open descriptors, valid offset pointer.
            let n = unsafe {
                libc::splice(
                    src.as_raw_fd(),
                    &mut off,
                    pipe.write_end().as_raw_fd(),
                    std::ptr::null_mut(),
                    left,
                    0,
                )
            };
            assert!(n > 0, "splice: {}", io::Error::last_os_error());
            left -= n as usize;
        }
        let (a, mut b) = tokio::net::UnixStream::pair().expect("pair");
        let sink = SpliceSink::new(std::os::fd::AsFd::as_fd(&a)).expect("sink");
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut got = vec![0u8; 100_000];
            b.read_exact(&mut got).await.expect("read");
            got
        });
        let mut left = data.len();
        while left > 0 {
            left -= sink.splice_from(&pipe, left).await.expect("splice");
        }
        pipes.put(pipe);
        assert_eq!(reader.await.expect("reader"), data);
        let _ = &mut src;
    }

    #[test]
    fn a_connection_holds_at_most_pipes_max_pipes() {
        let pipes = Pipes::new().expect("pipes");
        let mut held: Vec<Pipe> = (0..PIPES_MAX)
            .map(|_| pipes.take().expect("pipe"))
            .collect();
        assert!(pipes.take().is_none(), "one pipe too many");
        // A pipe closed (dropped dirty) makes room; one given back is reused.
        held.pop();
        let again = pipes.take().expect("room again");
        pipes.put(again);
        assert_eq!(pipes.idle(), 1);
        let _kept = pipes.take().expect("the idle one");
        assert_eq!(pipes.idle(), 0);
        assert!(pipes.take().is_none(), "full again");
    }

    #[test]
    fn send_buffer_grows() {
        fn sndbuf(fd: RawFd) -> libc::c_int {
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into `v`.
            let r = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(r, 0);
            v
        }
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let before = sndbuf(a.as_raw_fd());
        set_send_buffer(a.as_raw_fd(), 1 << 20);
        assert!(
            sndbuf(a.as_raw_fd()) > before,
            "{before} -> {}",
            sndbuf(a.as_raw_fd())
        );
    }

    fn tempfile_with(data: &[u8]) -> std::fs::File {
        use std::io::{Seek, Write};
        let mut f = tempfile::tempfile().expect("tempfile");
        f.write_all(data).expect("write");
        f.rewind().expect("rewind");
        f
    }
}
