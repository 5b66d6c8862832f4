//! The `pipe` chardev backend (`--chardev pipe,id=ID,path=PATH`), opened as QEMU 10.0 opens
//! it on POSIX hosts (`chardev/char-pipe.c`).
//!
//! `PATH` names two FIFOs: `PATH.in`, which the daemon reads (the peer's commands), and
//! `PATH.out`, which it writes (replies and events). Each is opened read-write, so:
//!
//! - opening does not wait for the peer (Linux opens a FIFO `O_RDWR` at once), and the peer
//!   may open its ends before or after the daemon starts;
//! - the daemon holds a writer of `PATH.in` itself, so it never reads end-of-file there: a
//!   peer may close `PATH.in` and open it again and carry on in the same QMP session
//!   (capabilities still negotiated);
//! - the daemon holds a reader of `PATH.out`, so its writes never fail for want of a reader;
//!   what no one reads stays in the FIFO, and the monitor waits when the FIFO is full.
//!
//! If either cannot be opened (absent, say), `PATH` itself is opened read-write and serves
//! both ways: a terminal (a serial line, a pty) or any other file. A single FIFO there gives
//! the daemon its own output to read back, in QEMU as here. A file that epoll cannot watch (a
//! regular file) is read and written on tokio's blocking threads: the monitor reads
//! end-of-file there and its session ends, as QEMU's does.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::unix::pipe;

/// A `pipe` chardev could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PipeError {
    /// No `path` option.
    #[error("chardev: pipe: no device path given")]
    NoPath,
    /// Neither the two FIFOs nor `path` itself could be opened; the cause is that of `path`.
    #[error("Could not open '{path}'")]
    Open {
        /// The `path` option.
        path: String,
        /// Why `path` could not be opened.
        #[source]
        source: io::Error,
    },
}

impl PipeError {
    /// The message as QEMU prints it (`Could not open 'P': No such file or directory`).
    pub fn qemu_message(&self) -> String {
        qsd_qapi::error_text(self)
    }
}

/// The reading half of a monitor's connection.
pub type Reader = Box<dyn AsyncRead + Unpin + Send>;
/// The writing half of a monitor's connection.
pub type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// An open `pipe` chardev: what the daemon reads and what it writes (the same file
/// description when `PATH` itself serves both ways).
#[derive(Debug)]
pub struct PipeChardev {
    input: File,
    output: File,
}

/// Opens the chardev of the option `path` (see the [module](self) documentation).
pub fn open(path: Option<&str>) -> Result<PipeChardev, PipeError> {
    let path = path.ok_or(PipeError::NoPath)?;
    // As QEMU: both FIFOs are tried, and both closed again if either fails.
    let input = open_rdwr(&format!("{path}.in"));
    let output = open_rdwr(&format!("{path}.out"));
    if let (Ok(input), Ok(output)) = (input, output) {
        return Ok(PipeChardev { input, output });
    }
    let failed = |source| PipeError::Open {
        path: path.to_owned(),
        source,
    };
    let input = open_rdwr(path).map_err(failed)?;
    let output = input.try_clone().map_err(failed)?;
    Ok(PipeChardev { input, output })
}

/// `open(path, O_RDWR | O_CLOEXEC)`, blocking as QEMU's is (a FIFO opens at once).
fn open_rdwr(path: &str) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

impl PipeChardev {
    /// The two ends as a monitor's reader and writer. Must run inside a tokio runtime.
    pub fn into_async(self) -> io::Result<(Reader, Writer)> {
        let reader: Reader = match watched(&self.input, pipe::Receiver::from_owned_fd_unchecked)? {
            Some(r) => Box::new(r),
            None => Box::new(tokio::fs::File::from_std(self.input)),
        };
        let writer: Writer = match watched(&self.output, pipe::Sender::from_owned_fd_unchecked)? {
            Some(w) => Box::new(w),
            None => Box::new(tokio::fs::File::from_std(self.output)),
        };
        Ok((reader, writer))
    }
}

/// `file` registered with the runtime's epoll through `register`, on a duplicate of its
/// descriptor in non-blocking mode (tokio's pipe types read and write any such descriptor);
/// `None`, with `file` blocking again, where epoll refuses it (`EPERM`: a regular file).
fn watched<T>(file: &File, register: fn(OwnedFd) -> io::Result<T>) -> io::Result<Option<T>> {
    let fd = OwnedFd::from(file.try_clone()?);
    set_nonblocking(file, true)?;
    match register(fd) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            set_nonblocking(file, false)?;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Sets or clears `O_NONBLOCK` on the file description of `file`.
fn set_nonblocking(file: &File, on: bool) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let fd = file.as_raw_fd();
    let mut flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    flags.set(OFlag::O_NONBLOCK, on);
    fcntl(fd, FcntlArg::F_SETFL(flags))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::stat::Mode;
    use std::io::{Read, Write};
    use std::path::Path;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn mkfifo(path: &Path) {
        nix::unistd::mkfifo(path, Mode::from_bits_truncate(0o600)).expect("mkfifo");
    }

    fn base(dir: &tempfile::TempDir) -> String {
        dir.path().join("m").display().to_string()
    }

    #[test]
    fn no_path() {
        let e = open(None).unwrap_err();
        assert_eq!(e.qemu_message(), "chardev: pipe: no device path given");
    }

    /// The error names `path`, whichever of the FIFOs was missing.
    #[test]
    fn missing_fifo_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = base(&dir);
        mkfifo(Path::new(&format!("{path}.in")));
        let e = open(Some(&path)).unwrap_err();
        assert_eq!(
            e.qemu_message(),
            format!("Could not open '{path}': No such file or directory")
        );
        let e = open(Some(dir.path().to_str().unwrap())).unwrap_err();
        assert!(e.qemu_message().ends_with("': Is a directory"), "{e}");
    }

    /// Commands come in on `PATH.in`, replies go out on `PATH.out`; a peer that closes
    /// `PATH.in` and opens it again is read on, with no end-of-file between.
    #[tokio::test]
    async fn fifo_pair() {
        let dir = tempfile::tempdir().unwrap();
        let path = base(&dir);
        let (fin, fout) = (format!("{path}.in"), format!("{path}.out"));
        mkfifo(Path::new(&fin));
        mkfifo(Path::new(&fout));
        let (mut reader, mut writer) = open(Some(&path)).unwrap().into_async().unwrap();

        // Neither open waits: the daemon holds both ends of both FIFOs.
        let mut peer_out = File::open(&fout).unwrap();
        for text in [&b"first"[..], b"second"] {
            let mut peer_in = OpenOptions::new().write(true).open(&fin).unwrap();
            peer_in.write_all(text).unwrap();
            drop(peer_in);
            let mut got = vec![0; text.len()];
            reader.read_exact(&mut got).await.unwrap();
            assert_eq!(got, text);
        }
        writer.write_all(b"reply\n").await.unwrap();
        writer.flush().await.unwrap();
        let mut got = [0; 6];
        peer_out.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"reply\n");
    }

    /// Without the FIFOs, `PATH` itself serves both ways; a regular file is read through
    /// blocking threads, to its end.
    #[tokio::test]
    async fn regular_file_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let path = base(&dir);
        std::fs::write(&path, b"").unwrap();
        let (mut reader, mut writer) = open(Some(&path)).unwrap().into_async().unwrap();
        writer.write_all(b"greeting\n").await.unwrap();
        writer.flush().await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(reader.read_to_end(&mut rest).await.unwrap(), 0);
        assert_eq!(std::fs::read(&path).unwrap(), b"greeting\n");
    }
}
