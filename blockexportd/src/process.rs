//! Process matters: `--daemonize`, `--pidfile`, the descriptor limit.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Raises the soft limit on open descriptors to the hard one. Each NBD client holds its
/// socket and up to 16 pipes for zero-copy reads (32 descriptors), each image its file; the
/// usual soft limit of 1024 would run out well before `max-connections` (100) clients.
/// Best effort: on failure the limit stays.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through the pointer, which points at `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0
        || lim.rlim_cur >= lim.rlim_max
    {
        return;
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit reads one `rlimit` through the pointer, which points at `lim`.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}

/// The write end of the pipe that tells the waiting parent how startup went.
#[derive(Debug)]
pub struct StartupNotifier {
    pipe: File,
}

impl StartupNotifier {
    /// Startup is complete: the parent exits with status 0, and this process detaches its
    /// standard streams.
    pub fn success(mut self) {
        let _ = self.pipe.write_all(&[0]);
        detach_stdio();
    }

    /// Startup failed (the error was already printed): the parent exits with status 1.
    pub fn failure(mut self) {
        let _ = self.pipe.write_all(&[1]);
    }
}

/// Forks. The parent waits until the child reports the end of its startup, then exits with
/// the child's status; it never returns. The child starts a new session and returns a
/// notifier. Must be called before any thread is started.
pub fn daemonize() -> std::io::Result<StartupNotifier> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array of two c_ints it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created by pipe2 and are owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process is still single-threaded (documented precondition), so the child
    // may run any code after fork.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            drop(read_end);
            // SAFETY: setsid has no memory-safety preconditions.
            unsafe { libc::setsid() };
            Ok(StartupNotifier {
                pipe: File::from(write_end),
            })
        }
        _child => {
            drop(write_end);
            let mut status = [1u8];
            let mut pipe = File::from(read_end);
            let code = match pipe.read_exact(&mut status) {
                Ok(()) => i32::from(status[0]),
                Err(_) => 1,
            };
            std::process::exit(code);
        }
    }
}

fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors; `null` stays open during the call.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

/// A pidfile, locked while the daemon runs and removed when dropped.
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
    _file: File,
}

impl Pidfile {
    /// Creates (or takes over) `path`, locks it and writes the pid. Fails if another running
    /// process holds the lock, as QEMU's `qemu_write_pidfile` does.
    pub fn create(path: &Path) -> std::io::Result<Pidfile> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        // SAFETY: lockf on a descriptor we own; no memory is passed.
        if unsafe { libc::lockf(file.as_raw_fd(), libc::F_TLOCK, 0) } < 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "it is locked by another process",
            ));
        }
        file.set_len(0)?;
        writeln!(file, "{}", std::process::id())?;
        Ok(Pidfile {
            path: path.to_path_buf(),
            _file: file,
        })
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
