//! The mount and unmount system calls, and the process-wide list of FUSE mountpoints.

use crate::error::FuseError;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::mount::{MntFlags, MsFlags};
use nix::sys::socket::{
    recvmsg, socketpair, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The setuid helper of fuse3 that mounts for unprivileged users.
const FUSERMOUNT: &str = "fusermount3";

/// How a mount was made, hence how it is undone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MountKind {
    /// `mount(2)` by this process (it has `CAP_SYS_ADMIN`): undone with `umount2`.
    Direct,
    /// Through `fusermount3` (an unprivileged process): undone with `fusermount3 -u -z`.
    Fusermount,
}

/// The mountpoints of this process's FUSE exports, as absolute paths (not resolving
/// symlinks: a mount on a symlink's path is on the link, as QSD notes).
static MOUNTPOINTS: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// A claim on a mountpoint in [`MOUNTPOINTS`]; released when dropped.
#[derive(Debug)]
pub(crate) struct Reservation(PathBuf);

impl Reservation {
    /// Claims `path`, or fails with QSD's "There already is a FUSE export on ..." when another
    /// export of this process has it.
    pub(crate) fn claim(path: &Path) -> Result<Reservation, FuseError> {
        let key = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let mut set = MOUNTPOINTS.lock().unwrap_or_else(|e| e.into_inner());
        if !set.insert(key.clone()) {
            return Err(FuseError::AlreadyExported(path.to_path_buf()));
        }
        Ok(Reservation(key))
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        MOUNTPOINTS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.0);
    }
}

/// Checks that `path` is a regular file, with QSD's messages.
pub(crate) fn check_regular_file(path: &Path) -> Result<(), FuseError> {
    let meta = std::fs::metadata(path).map_err(|source| FuseError::Stat {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(FuseError::NotRegularFile(path.to_path_buf()));
    }
    Ok(())
}

/// Mounts a FUSE file system on the regular file `path` and returns the `/dev/fuse`
/// descriptor that serves it.
///
/// Like libfuse: `mount(2)` directly when this process may (root), else through the setuid
/// `fusermount3`, which opens the device itself and hands the descriptor back over a socket.
pub(crate) fn mount(
    path: &Path,
    mode: u32,
    allow_other: bool,
) -> Result<(File, MountKind), FuseError> {
    match OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        Ok(device) => match mount_direct(path, &device, mode, allow_other) {
            Ok(()) => return Ok((device, MountKind::Direct)),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
            Err(e) => return Err(FuseError::Mount(e)),
        },
        Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)) => {}
        Err(e) => return Err(FuseError::OpenDevice(e)),
    }
    let device = mount_fusermount(path, allow_other).map_err(FuseError::Mount)?;
    Ok((device, MountKind::Fusermount))
}

/// The options both ways of mounting share: the kernel checks permissions against the mode we
/// report (`default_permissions`, as QSD).
fn common_options(allow_other: bool) -> String {
    format!(
        "default_permissions{}",
        if allow_other { ",allow_other" } else { "" }
    )
}

/// `mount(2)`: the root inode is a regular file (`rootmode`), and `nosuid,nodev` are set as
/// libfuse does.
fn mount_direct(path: &Path, device: &File, mode: u32, allow_other: bool) -> io::Result<()> {
    let data = format!(
        "fd={},rootmode={:o},user_id={},group_id={},{}",
        device.as_raw_fd(),
        libc::S_IFREG | (mode & 0o7777),
        nix::unistd::getuid(),
        nix::unistd::getgid(),
        common_options(allow_other),
    );
    nix::mount::mount(
        Some("blockexportd"),
        path,
        Some("fuse"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(io::Error::from)
}

/// `fusermount3 -o OPTIONS -- PATH` with `_FUSE_COMMFD` set to one end of a socket pair: the
/// helper mounts, sends the `/dev/fuse` descriptor as `SCM_RIGHTS` and exits.
// The one unsafe block of the crate: adopting the descriptor received over the socket.
#[allow(unsafe_code)]
fn mount_fusermount(path: &Path, allow_other: bool) -> io::Result<File> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    // The helper inherits its end.
    fcntl(theirs.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))?;
    let output = Command::new(FUSERMOUNT)
        .arg("-o")
        .arg(format!(
            "nosuid,nodev,fsname=blockexportd,{}",
            common_options(allow_other)
        ))
        .arg("--")
        .arg(path)
        .env("_FUSE_COMMFD", theirs.as_raw_fd().to_string())
        .output();
    drop(theirs);
    let output = output?;
    // The helper has exited: its message, if any, waits in the socket.
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!(std::os::fd::RawFd);
    let received = recvmsg::<()>(
        ours.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT,
    )
    .ok()
    .and_then(|msg| {
        msg.cmsgs().ok()?.find_map(|cmsg| match cmsg {
            ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
            _ => None,
        })
    });
    match received {
        // SAFETY: the descriptor was just created in this process by SCM_RIGHTS and is owned
        // by nothing else; wrapping it transfers its ownership (and closing) to the File.
        Some(fd) if fd >= 0 => Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) })),
        _ => Err(io::Error::other(format!(
            "{FUSERMOUNT} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))),
    }
}

/// Lazily detaches the mount on `path` (`MNT_DETACH`, or `fusermount3 -u -z`): the path shows
/// the file below at once; the kernel ends the FUSE connection when the last descriptor on the
/// export is closed.
///
/// A path that is no longer a mountpoint (someone ran `umount` already) is not an error.
pub(crate) fn detach(path: &Path, kind: MountKind) -> Result<(), FuseError> {
    let failed = |source: io::Error| FuseError::Unmount {
        path: path.to_path_buf(),
        source,
    };
    match kind {
        MountKind::Direct => match nix::mount::umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
            Err(errno) => Err(failed(errno.into())),
        },
        MountKind::Fusermount => {
            let output = Command::new(FUSERMOUNT)
                .args(["-u", "-z", "--"])
                .arg(path)
                .output()
                .map_err(failed)?;
            let stderr = String::from_utf8_lossy(&output.stderr);
            // "entry for PATH not found in /etc/mtab" (user) or "Invalid argument" (root):
            // not mounted any more.
            if output.status.success()
                || stderr.contains("not found in")
                || stderr.contains("Invalid argument")
            {
                Ok(())
            } else {
                Err(failed(io::Error::other(format!(
                    "{FUSERMOUNT} -u failed: {}",
                    stderr.trim()
                ))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_claimed_once_until_released() {
        let path = Path::new("/nonexistent/fuse-export-unit-test");
        let first = Reservation::claim(path).unwrap();
        let again = Reservation::claim(path).unwrap_err();
        assert_eq!(
            again.to_string(),
            "There already is a FUSE export on '/nonexistent/fuse-export-unit-test'"
        );
        drop(first);
        let _second = Reservation::claim(path).unwrap();
    }

    fn mounted(path: &Path) -> bool {
        let path = path.to_str().unwrap();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|line| line.split(' ').nth(4) == Some(path))
    }

    /// The unprivileged way of mounting, exercised as root (fusermount3 works for root too):
    /// the descriptor comes back over the socket and `fusermount3 -u -z` detaches.
    #[test]
    fn fusermount3_mounts_and_detaches() {
        let have = Command::new(FUSERMOUNT).arg("-V").output().is_ok();
        let problem = (!have || !nix::unistd::geteuid().is_root())
            .then(|| format!("this test needs {FUSERMOUNT} and root"));
        if !test_support::require(problem) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mp");
        std::fs::write(&file, b"").unwrap();
        let device = mount_fusermount(&file, false).unwrap();
        assert!(mounted(&file));
        // Nobody touches the file (no INIT reply is ever sent); detaching needs no reply.
        detach(&file, MountKind::Fusermount).unwrap();
        assert!(!mounted(&file));
        drop(device);
        // Detaching what is not mounted any more is not an error.
        detach(&file, MountKind::Fusermount).unwrap();
        detach(&file, MountKind::Direct).unwrap();
        // A failing helper's message is kept.
        let err = mount_fusermount(&dir.path().join("missing"), false).unwrap_err();
        assert!(err.to_string().contains("fusermount3 failed"), "{err}");
    }

    #[test]
    fn mountpoint_must_be_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            check_regular_file(dir.path()),
            Err(FuseError::NotRegularFile(_))
        ));
        let missing = dir.path().join("missing");
        match check_regular_file(&missing) {
            Err(FuseError::Stat { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT))
            }
            other => panic!("unexpected {other:?}"),
        }
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        check_regular_file(&file).unwrap();
    }
}
