//! Errors of the FUSE export, and the mapping of block-layer errors onto FUSE errnos.

use block_core::BlockError;
use std::io;
use std::path::PathBuf;

/// Why a FUSE export could not be set up or torn down.
///
/// The messages follow qemu-storage-daemon's where it has one, so that a management tool sees
/// the same text; the cause (an OS error) is the [`source`](std::error::Error::source).
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    /// Another export of this process is mounted on the same path.
    #[error("There already is a FUSE export on '{}'", .0.display())]
    AlreadyExported(PathBuf),
    /// The mountpoint could not be examined (it does not exist, for example).
    #[error("Failed to stat '{}'", path.display())]
    Stat {
        /// The mountpoint as given.
        path: PathBuf,
        /// Why `stat` failed.
        #[source]
        source: io::Error,
    },
    /// The mountpoint is a directory, a device, a socket...
    #[error("'{}' is not a regular file", .0.display())]
    NotRegularFile(PathBuf),
    /// The export is writable but the attachment it was given is read-only.
    #[error("Cannot export node '{0}' writable through a read-only attachment")]
    ReadOnlyAttachment(String),
    /// `/dev/fuse` could not be opened.
    #[error("Failed to open /dev/fuse")]
    OpenDevice(#[source] io::Error),
    /// The `mount` system call failed.
    #[error("Failed to mount FUSE session to export")]
    Mount(#[source] io::Error),
    /// The kernel and this process could not agree on the FUSE protocol (the `INIT` exchange
    /// failed), or the reader threads could not be started.
    #[error("Failed to set up FUSE session")]
    Session(#[source] io::Error),
    /// The lazy unmount failed.
    #[error("Failed to unmount FUSE export from '{}'", path.display())]
    Unmount {
        /// The mountpoint.
        path: PathBuf,
        /// Why `umount2` failed.
        #[source]
        source: io::Error,
    },
    /// Flushing the node when the export ended failed: writes acknowledged earlier may not be
    /// stable.
    #[error("Failed to flush node '{node}' when unmounting its FUSE export")]
    Flush {
        /// The node name.
        node: String,
        /// The block-layer error.
        #[source]
        source: BlockError,
    },
    /// The blocking task that closes the export (waits for requests, flushes) did not finish:
    /// the runtime shut down under it.
    #[error("The task closing the FUSE export did not finish")]
    CloseTask(#[source] tokio::task::JoinError),
    /// The tokio runtime given to the export has shut down, so the final flush could not run.
    #[error("The runtime of the FUSE export has shut down before the node was flushed")]
    RuntimeGone,
}

/// The errno a FUSE request ends with when the block layer fails it.
///
/// One row per [`BlockError`] variant, with no catch-all, so that a new variant has to be
/// mapped here before the crate builds again.
pub fn errno_of(err: &BlockError) -> i32 {
    match err {
        // The host's own errno, passed through (EIO when there is none).
        BlockError::Io { source, .. } => match source.raw_os_error() {
            Some(errno) if errno > 0 => errno,
            _ => libc::EIO,
        },
        // The node shrank between the export's bounds check and the request.
        BlockError::OutOfRange { .. } => libc::EIO,
        // What a write to a file on a read-only file system returns.
        BlockError::ReadOnly => libc::EROFS,
        // fallocate(2) documents EOPNOTSUPP for a mode the file system cannot do.
        BlockError::Unsupported(_) => libc::EOPNOTSUPP,
        BlockError::NotFast => libc::EOPNOTSUPP,
        BlockError::Invalid(_) => libc::EINVAL,
        BlockError::NoSpace => libc::ENOSPC,
        // What QEMU answers for I/O on an inactive node.
        BlockError::Inactive => libc::EPERM,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn every_block_error_has_its_errno() {
        let cases: Vec<(BlockError, i32)> = vec![
            (
                BlockError::io("read", io::Error::from_raw_os_error(libc::EIO)),
                libc::EIO,
            ),
            (
                BlockError::io("write", io::Error::from_raw_os_error(libc::ENOSPC)),
                libc::ENOSPC,
            ),
            (BlockError::io("x", io::Error::other("no errno")), libc::EIO),
            (
                BlockError::OutOfRange {
                    offset: 10,
                    len: 10,
                    size: 5,
                },
                libc::EIO,
            ),
            (BlockError::ReadOnly, libc::EROFS),
            (BlockError::Unsupported("discard"), libc::EOPNOTSUPP),
            (BlockError::NotFast, libc::EOPNOTSUPP),
            (BlockError::Invalid("misaligned".into()), libc::EINVAL),
            (BlockError::NoSpace, libc::ENOSPC),
        ];
        for (err, errno) in cases {
            assert_eq!(errno_of(&err), errno, "{err}");
        }
    }

    #[test]
    fn messages_match_qsd_and_keep_the_cause_apart() {
        let err = FuseError::Stat {
            path: "/tmp/nope".into(),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert_eq!(err.to_string(), "Failed to stat '/tmp/nope'");
        assert!(err.source().is_some());
        assert_eq!(
            FuseError::NotRegularFile("/tmp".into()).to_string(),
            "'/tmp' is not a regular file"
        );
        assert_eq!(
            FuseError::AlreadyExported("/tmp/mp".into()).to_string(),
            "There already is a FUSE export on '/tmp/mp'"
        );
    }
}
