//! The mount and unmount system calls, and the process-wide list of FUSE mountpoints.

use crate::error::FuseError;
use nix::mount::{MntFlags, MsFlags};
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

/// Opens `/dev/fuse`.
pub(crate) fn open_fuse_device() -> Result<File, FuseError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(FuseError::OpenDevice)
}

/// Mounts a FUSE file system served through `device` on the regular file `path`.
///
/// The root inode is a regular file (`rootmode`), the kernel checks permissions against the
/// mode we report (`default_permissions`, as QSD), and `nosuid,nodev` are set as libfuse does.
pub(crate) fn mount(path: &Path, device: &File, mode: u32, allow_other: bool) -> io::Result<()> {
    let data = format!(
        "fd={},rootmode={:o},user_id={},group_id={},default_permissions{}",
        device.as_raw_fd(),
        libc::S_IFREG | (mode & 0o7777),
        nix::unistd::getuid(),
        nix::unistd::getgid(),
        if allow_other { ",allow_other" } else { "" },
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

/// Lazily detaches the mount on `path` (`MNT_DETACH`): the path shows the file below at once;
/// the kernel ends the FUSE connection when the last descriptor on the export is closed.
///
/// A path that is no longer a mountpoint (someone ran `umount` already) is not an error.
pub(crate) fn detach(path: &Path) -> Result<(), FuseError> {
    match nix::mount::umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(errno) => Err(FuseError::Unmount {
            path: path.to_path_buf(),
            source: errno.into(),
        }),
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
