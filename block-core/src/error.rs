//! Errors of the block layer.
//!
//! Every error a request can end with carries the errno that the export protocols map onto
//! their own codes (NBD error values, virtio status bytes, FUSE errnos).

use std::io;

/// The result type of every block-layer operation.
pub type Result<T, E = BlockError> = std::result::Result<T, E>;

/// Why a block-layer operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The host (or the layer below) failed the I/O.
    #[error("{context}")]
    Io {
        /// What was being done, e.g. "reading image.qcow2".
        context: String,
        /// The host error; its `raw_os_error()` is the errno reported.
        #[source]
        source: io::Error,
    },
    /// The request lies (partly) beyond the end of the node.
    #[error(
        "request at offset {offset} with length {len} is beyond the end of the node ({size} bytes)"
    )]
    OutOfRange {
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Size of the node when the request was checked.
        size: u64,
    },
    /// A write was sent to a node (or handle) that is read-only.
    #[error("node is read-only")]
    ReadOnly,
    /// The driver does not support this operation.
    #[error("{0} is not supported by this node")]
    Unsupported(&'static str),
    /// A fast-zero request could not be done faster than writing zeroes.
    #[error("zeroing this range would not be fast")]
    NotFast,
    /// The request's arguments are invalid (e.g. misaligned for an O_DIRECT node).
    #[error("{0}")]
    Invalid(String),
    /// No space is left to complete the write.
    #[error("no space left on the node")]
    NoSpace,
    /// The node is inactive (handed over to another process, QEMU's `blockdev-set-active`):
    /// only reads are allowed.
    #[error("node is inactive")]
    Inactive,
}

impl BlockError {
    /// An I/O error with a short description of what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        BlockError::Io {
            context: context.into(),
            source,
        }
    }

    /// The errno this error stands for, as the export protocols report it.
    pub fn errno(&self) -> i32 {
        match self {
            BlockError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            BlockError::OutOfRange { .. } => libc::EINVAL,
            BlockError::ReadOnly => libc::EPERM,
            BlockError::Unsupported(_) => libc::ENOTSUP,
            BlockError::NotFast => libc::ENOTSUP,
            BlockError::Invalid(_) => libc::EINVAL,
            BlockError::NoSpace => libc::ENOSPC,
            BlockError::Inactive => libc::EPERM,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping() {
        let cases: Vec<(BlockError, i32)> = vec![
            (
                BlockError::io("x", io::Error::from_raw_os_error(libc::ENOSPC)),
                libc::ENOSPC,
            ),
            (BlockError::io("x", io::Error::other("no errno")), libc::EIO),
            (
                BlockError::OutOfRange {
                    offset: 1,
                    len: 2,
                    size: 0,
                },
                libc::EINVAL,
            ),
            (BlockError::ReadOnly, libc::EPERM),
            (BlockError::Unsupported("discard"), libc::ENOTSUP),
            (BlockError::NotFast, libc::ENOTSUP),
            (BlockError::Invalid("x".into()), libc::EINVAL),
            (BlockError::NoSpace, libc::ENOSPC),
            (BlockError::Inactive, libc::EPERM),
        ];
        for (err, errno) in cases {
            assert_eq!(err.errno(), errno, "{err}");
        }
    }
}
