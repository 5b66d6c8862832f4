//! The status byte of a completed request (virtio 1.2, 5.2.6).

use block_core::BlockError;

/// A request's status byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// Failed (or malformed).
    IoErr = 1,
    /// Not supported by this device.
    Unsupp = 2,
}

/// The status a block-layer result is reported with: the one place errors become status
/// bytes (every error named, so that a new one must be decided here).
pub fn status_of(result: &Result<(), BlockError>) -> Status {
    match result {
        Ok(()) => Status::Ok,
        Err(e) => match e {
            BlockError::Io { .. } => Status::IoErr,
            BlockError::OutOfRange { .. } => Status::IoErr,
            BlockError::ReadOnly => Status::IoErr,
            BlockError::Unsupported(_) => Status::Unsupp,
            // Only asked for with the fast flag, which virtio-blk has not: still an answer.
            BlockError::NotFast => Status::Unsupp,
            BlockError::Invalid(_) => Status::IoErr,
            // virtio-blk has no "no space" status: the guest sees an I/O error.
            BlockError::NoSpace => Status::IoErr,
            BlockError::Inactive => Status::IoErr,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn every_error_has_its_status() {
        let rows: Vec<(Result<(), BlockError>, Status)> = vec![
            (Ok(()), Status::Ok),
            (
                Err(BlockError::io(
                    "reading",
                    io::Error::from_raw_os_error(libc_eio()),
                )),
                Status::IoErr,
            ),
            (
                Err(BlockError::OutOfRange {
                    offset: 0,
                    len: 1,
                    size: 0,
                }),
                Status::IoErr,
            ),
            (Err(BlockError::ReadOnly), Status::IoErr),
            (Err(BlockError::Unsupported("discard")), Status::Unsupp),
            (Err(BlockError::NotFast), Status::Unsupp),
            (Err(BlockError::Invalid("x".into())), Status::IoErr),
            (Err(BlockError::NoSpace), Status::IoErr),
            (Err(BlockError::Inactive), Status::IoErr),
        ];
        for (result, want) in rows {
            assert_eq!(status_of(&result), want, "{result:?}");
        }
        assert_eq!(Status::Ok as u8, 0);
        assert_eq!(Status::IoErr as u8, 1);
        assert_eq!(Status::Unsupp as u8, 2);
    }

    fn libc_eio() -> i32 {
        5
    }
}
