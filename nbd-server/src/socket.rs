//! Connection streams that can move to another event loop.
//!
//! A tokio socket is registered with the reactor of the runtime it was created in: its
//! readiness comes from that runtime's I/O driver whichever thread polls it. An export with
//! its own runtime (an iothread) wants all of a connection's work there, socket readiness
//! included, so after the handshake the socket is deregistered from the listener's reactor
//! and registered with the export's ([`Rebind::rebind`]).

use crate::tls::MaybeTls;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::runtime::Handle;

/// A stream whose I/O registration can move to another runtime's reactor.
pub(crate) trait Rebind {
    /// Registers the stream with the reactor of `handle`'s runtime (and no longer with the
    /// one it was registered with). On error the stream is unusable: drop it.
    fn rebind(&mut self, handle: &Handle) -> io::Result<()>;

    /// Whether [`rebind`](Self::rebind) really moves the stream (false for a stream the
    /// caller handed over).
    fn movable(&self) -> bool {
        true
    }

    /// The plaintext socket under the stream, which zero-copy read replies may splice into
    /// (see [`crate::splice`]); `None` under TLS and for streams the server did not accept.
    fn splice_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// What the accept loops produce: a unix or TCP socket.
#[derive(Debug)]
pub(crate) enum Socket {
    /// A unix domain socket.
    Unix(UnixStream),
    /// A TCP socket.
    Tcp(TcpStream),
    /// Only while [`Rebind::rebind`] moves the socket, or after it failed.
    Detached,
}

fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "socket lost while moving it")
}

impl Rebind for Socket {
    fn rebind(&mut self, handle: &Handle) -> io::Result<()> {
        // `into_std` deregisters from the current reactor; `from_std` registers with the
        // reactor of the runtime entered (the guard is not held across an await: this is a
        // plain function).
        match std::mem::replace(self, Socket::Detached) {
            Socket::Unix(s) => {
                let std = s.into_std()?;
                let _guard = handle.enter();
                *self = Socket::Unix(UnixStream::from_std(std)?);
            }
            Socket::Tcp(s) => {
                let std = s.into_std()?;
                let _guard = handle.enter();
                *self = Socket::Tcp(TcpStream::from_std(std)?);
            }
            Socket::Detached => return Err(detached()),
        }
        Ok(())
    }

    fn splice_fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Socket::Unix(s) => Some(s.as_fd()),
            Socket::Tcp(s) => Some(s.as_fd()),
            Socket::Detached => None,
        }
    }
}

impl<S: Rebind> Rebind for MaybeTls<S> {
    fn rebind(&mut self, handle: &Handle) -> io::Result<()> {
        match self {
            MaybeTls::Plain(s) => s.rebind(handle),
            // The TLS state (and any record it buffered) stays; only the socket under it moves.
            MaybeTls::Tls(s) => s.get_mut().0.rebind(handle),
            #[cfg(feature = "psk")]
            MaybeTls::Psk(s) => s.get_mut().rebind(handle),
        }
    }

    fn movable(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.movable(),
            MaybeTls::Tls(s) => s.get_ref().0.movable(),
            #[cfg(feature = "psk")]
            MaybeTls::Psk(s) => s.get_ref().movable(),
        }
    }

    fn splice_fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            MaybeTls::Plain(s) => s.splice_fd(),
            // Bytes on the socket are TLS records, not the reply.
            MaybeTls::Tls(_) => None,
            #[cfg(feature = "psk")]
            MaybeTls::Psk(_) => None,
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Socket::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Socket::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Socket::Unix(s) => s.is_write_vectored(),
            Socket::Tcp(s) => s.is_write_vectored(),
            Socket::Detached => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Detached => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Detached => Poll::Ready(Ok(())),
        }
    }
}

/// A stream the caller handed over ([`NbdServer::serve_connection`]): it cannot be moved,
/// so it stays with the reactor it was made in (if any) while the connection's work runs
/// in the export's runtime.
///
/// [`NbdServer::serve_connection`]: crate::NbdServer::serve_connection
#[derive(Debug)]
pub(crate) struct Fixed<S>(pub(crate) S);

impl<S> Rebind for Fixed<S> {
    fn rebind(&mut self, _handle: &Handle) -> io::Result<()> {
        Ok(())
    }

    fn movable(&self) -> bool {
        false
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Fixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Fixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Makes the socket in a first runtime, moves it to an iothread, shuts the first runtime
    /// down (a socket still registered with it would fail from then on), and echoes a
    /// message through it there with a vectored write.
    fn moved_socket_works(make: impl FnOnce() -> Socket, mut peer: impl Read + Write) {
        let first = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut socket = {
            let _guard = first.enter();
            make()
        };
        let iothread = block_core::IoThread::spawn("socket-test").unwrap();
        let handle = iothread.handle().clone();
        socket.rebind(&handle).unwrap();
        drop(first);
        let (tx, rx) = std::sync::mpsc::channel();
        handle.spawn(async move {
            let mut buf = [0u8; 5];
            let outcome = async {
                socket.read_exact(&mut buf).await?;
                let bufs = [io::IoSlice::new(&buf[..2]), io::IoSlice::new(&buf[2..])];
                let n = socket.write_vectored(&bufs).await?;
                socket.write_all(&buf[n..]).await?;
                io::Result::Ok(std::thread::current().name().map(str::to_string))
            };
            let _ = tx.send(outcome.await);
        });
        peer.write_all(b"hello").unwrap();
        let mut back = [0u8; 5];
        peer.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"hello");
        let thread = rx.recv().unwrap().unwrap();
        assert_eq!(thread.as_deref(), Some("socket-test"));
    }

    #[test]
    fn unix_socket_moves_to_another_runtime() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let make = move || {
            let socket = Socket::Unix(UnixStream::from_std(a).unwrap());
            assert!(socket.is_write_vectored());
            socket
        };
        moved_socket_works(make, b);
    }

    #[test]
    fn tcp_socket_moves_to_another_runtime() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        moved_socket_works(
            move || Socket::Tcp(TcpStream::from_std(server).unwrap()),
            client,
        );
    }

    #[test]
    fn a_detached_socket_fails_cleanly() {
        let iothread = block_core::IoThread::spawn("socket-test-detached").unwrap();
        let handle = iothread.handle().clone();
        let mut s = Socket::Detached;
        assert_eq!(
            s.rebind(&handle).unwrap_err().kind(),
            io::ErrorKind::NotConnected
        );
        let write = handle.block_on(async { s.write_all(b"x").await });
        assert_eq!(write.unwrap_err().kind(), io::ErrorKind::NotConnected);
    }
}
