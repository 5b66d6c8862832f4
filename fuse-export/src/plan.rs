//! What a request does to the node, decided without any I/O.
//!
//! The FUSE handlers turn each kernel request into one of these plans first (bounds, growth,
//! `fallocate` modes), then run the plan against the node. Keeping the decisions here makes
//! every rule testable without a mount.

/// `fallocate(2)` mode bits, as in `linux/falloc.h`.
mod falloc {
    pub const KEEP_SIZE: i32 = 0x01;
    pub const PUNCH_HOLE: i32 = 0x02;
    pub const ZERO_RANGE: i32 = 0x10;
}

/// How to carry out a write of `len` bytes at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WritePlan {
    /// Write the first `len` bytes of the request; `len` is shorter than the request when it
    /// crosses the end of a fixed-size export (the kernel reports a short write).
    Write {
        /// Bytes to write.
        len: u64,
    },
    /// Grow the node to `new_size` (if it is still smaller), then write the whole request.
    GrowThenWrite {
        /// The end of the request.
        new_size: u64,
    },
}

/// Plans a write against a node of `size` bytes.
///
/// Without `growable`, a write that starts at or after the end fails with `EIO` (what
/// qemu-storage-daemon's export makes a client see), and one that crosses the end is cut at
/// the end; the size never changes.
pub(crate) fn plan_write(
    offset: u64,
    len: u64,
    size: u64,
    growable: bool,
) -> Result<WritePlan, i32> {
    let end = offset.checked_add(len).ok_or(libc::EFBIG)?;
    if end <= size {
        return Ok(WritePlan::Write { len });
    }
    if growable {
        return Ok(WritePlan::GrowThenWrite { new_size: end });
    }
    if offset >= size {
        return Err(libc::EIO);
    }
    Ok(WritePlan::Write { len: size - offset })
}

/// How many bytes a read of `len` bytes at `offset` returns from a node of `size` bytes: reads
/// are cut at the end of the file, as on any regular file.
pub(crate) fn read_len(offset: u64, len: u64, size: u64) -> u64 {
    if offset >= size {
        0
    } else {
        len.min(size - offset)
    }
}

/// How a zeroed range is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZeroKind {
    /// `FALLOC_FL_PUNCH_HOLE`: deallocate, and fail with `EOPNOTSUPP` if the node cannot do it
    /// without writing zeroes (`may_unmap` and `fast`).
    Punch,
    /// `FALLOC_FL_ZERO_RANGE`: read as zeroes, stay allocated (no `may_unmap`).
    Zero,
}

/// What an `fallocate(2)` request does, in order: grow, then zero or allocate a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct FallocatePlan {
    /// Grow the node to this size first.
    pub grow_to: Option<u64>,
    /// Zero this range (`offset`, `len`) after growing.
    pub zero: Option<(u64, u64, ZeroKind)>,
    /// Make sure this range (`offset`, `len`) is allocated: fill its holes with zeroes.
    pub allocate: Option<(u64, u64)>,
}

/// Plans an `fallocate(2)` call on a node of `size` bytes.
///
/// - mode 0 / `KEEP_SIZE`: allocate the range (holes are written with zeroes, which the
///   drivers allocate); without `KEEP_SIZE` the node grows to cover the range first.
/// - `PUNCH_HOLE | KEEP_SIZE`: write-zeroes with `may_unmap` and `fast`. `PUNCH_HOLE` alone
///   is `EINVAL` (fallocate(2): "must be ORed with FALLOC_FL_KEEP_SIZE").
/// - `ZERO_RANGE` (± `KEEP_SIZE`): write-zeroes without unmapping; grows without
///   `KEEP_SIZE`.
/// - anything else (collapse, insert, unshare range): `EOPNOTSUPP`.
///
/// With `KEEP_SIZE`, the part of the range past the end is ignored, as fallocate(2) says.
pub(crate) fn plan_fallocate(
    mode: i32,
    offset: u64,
    len: u64,
    size: u64,
) -> Result<FallocatePlan, i32> {
    let end = offset.checked_add(len).ok_or(libc::EFBIG)?;
    let keep_size = mode & falloc::KEEP_SIZE != 0;
    let op = mode & !falloc::KEEP_SIZE;
    // The range that exists once the request has grown the node (if it may).
    let clamp = |keep: bool| -> Option<(u64, u64)> {
        let stop = if keep { end.min(size) } else { end };
        (stop > offset).then(|| (offset, stop - offset))
    };
    let grow_to = (!keep_size && end > size).then_some(end);
    match op {
        0 => Ok(FallocatePlan {
            grow_to,
            zero: None,
            allocate: clamp(keep_size),
        }),
        falloc::PUNCH_HOLE => {
            if !keep_size {
                return Err(libc::EINVAL);
            }
            Ok(FallocatePlan {
                grow_to: None,
                zero: clamp(true).map(|(o, l)| (o, l, ZeroKind::Punch)),
                allocate: None,
            })
        }
        falloc::ZERO_RANGE => Ok(FallocatePlan {
            grow_to,
            zero: clamp(keep_size).map(|(o, l)| (o, l, ZeroKind::Zero)),
            allocate: None,
        }),
        _ => Err(libc::EOPNOTSUPP),
    }
}

/// Checks an `lseek` request that the kernel forwards (only `SEEK_DATA` and `SEEK_HOLE` reach
/// the file system) and returns the offset to start searching from and whether data is
/// wanted.
pub(crate) fn check_seek(offset: i64, whence: i32, size: u64) -> Result<(u64, bool), i32> {
    let want_data = match whence {
        libc::SEEK_DATA => true,
        libc::SEEK_HOLE => false,
        _ => return Err(libc::EINVAL),
    };
    let offset = u64::try_from(offset).map_err(|_| libc::EINVAL)?;
    // lseek(2): "ENXIO: whence is SEEK_DATA or SEEK_HOLE, and offset is beyond the end of the
    // file".
    if offset >= size {
        return Err(libc::ENXIO);
    }
    Ok((offset, want_data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_inside_the_node_are_whole() {
        assert_eq!(
            plan_write(0, 4096, 8192, false),
            Ok(WritePlan::Write { len: 4096 })
        );
        assert_eq!(
            plan_write(4096, 4096, 8192, true),
            Ok(WritePlan::Write { len: 4096 })
        );
    }

    #[test]
    fn fixed_exports_never_grow() {
        assert_eq!(plan_write(8192, 1, 8192, false), Err(libc::EIO));
        assert_eq!(plan_write(9000, 10, 8192, false), Err(libc::EIO));
        assert_eq!(
            plan_write(8000, 1000, 8192, false),
            Ok(WritePlan::Write { len: 192 })
        );
    }

    #[test]
    fn growable_exports_grow_to_the_end_of_the_write() {
        assert_eq!(
            plan_write(8000, 1000, 8192, true),
            Ok(WritePlan::GrowThenWrite { new_size: 9000 })
        );
        assert_eq!(
            plan_write(1 << 20, 512, 0, true),
            Ok(WritePlan::GrowThenWrite {
                new_size: (1 << 20) + 512
            })
        );
        assert_eq!(plan_write(u64::MAX, 2, 0, true), Err(libc::EFBIG));
    }

    #[test]
    fn reads_stop_at_the_end() {
        assert_eq!(read_len(0, 100, 50), 50);
        assert_eq!(read_len(50, 100, 50), 0);
        assert_eq!(read_len(60, 100, 50), 0);
        assert_eq!(read_len(10, 20, 50), 20);
    }

    #[test]
    fn punch_hole_needs_keep_size_and_stays_inside() {
        assert_eq!(
            plan_fallocate(falloc::PUNCH_HOLE, 0, 10, 100),
            Err(libc::EINVAL)
        );
        let plan = plan_fallocate(falloc::PUNCH_HOLE | falloc::KEEP_SIZE, 90, 20, 100).unwrap();
        assert_eq!(
            plan,
            FallocatePlan {
                grow_to: None,
                zero: Some((90, 10, ZeroKind::Punch)),
                allocate: None
            }
        );
        let beyond = plan_fallocate(falloc::PUNCH_HOLE | falloc::KEEP_SIZE, 200, 20, 100).unwrap();
        assert_eq!(beyond, FallocatePlan::default());
    }

    #[test]
    fn zero_range_grows_unless_keep_size() {
        let plan = plan_fallocate(falloc::ZERO_RANGE, 90, 20, 100).unwrap();
        assert_eq!(plan.grow_to, Some(110));
        assert_eq!(plan.zero, Some((90, 20, ZeroKind::Zero)));
        let keep = plan_fallocate(falloc::ZERO_RANGE | falloc::KEEP_SIZE, 90, 20, 100).unwrap();
        assert_eq!(keep.grow_to, None);
        assert_eq!(keep.zero, Some((90, 10, ZeroKind::Zero)));
    }

    #[test]
    fn allocate_grows_and_allocates() {
        let plan = plan_fallocate(0, 50, 100, 100).unwrap();
        assert_eq!(plan.grow_to, Some(150));
        assert_eq!(plan.allocate, Some((50, 100)));
        let keep = plan_fallocate(falloc::KEEP_SIZE, 50, 100, 100).unwrap();
        assert_eq!(keep.grow_to, None);
        assert_eq!(keep.allocate, Some((50, 50)));
    }

    #[test]
    fn other_fallocate_modes_are_unsupported() {
        const COLLAPSE_RANGE: i32 = 0x08;
        const INSERT_RANGE: i32 = 0x20;
        const UNSHARE_RANGE: i32 = 0x40;
        for mode in [
            COLLAPSE_RANGE,
            INSERT_RANGE,
            UNSHARE_RANGE,
            falloc::PUNCH_HOLE | falloc::ZERO_RANGE,
        ] {
            assert_eq!(
                plan_fallocate(mode, 0, 10, 100),
                Err(libc::EOPNOTSUPP),
                "mode {mode:#x}"
            );
        }
        assert_eq!(plan_fallocate(0, u64::MAX, 10, 100), Err(libc::EFBIG));
    }

    #[test]
    fn seek_checks() {
        assert_eq!(check_seek(0, libc::SEEK_DATA, 10), Ok((0, true)));
        assert_eq!(check_seek(9, libc::SEEK_HOLE, 10), Ok((9, false)));
        assert_eq!(check_seek(10, libc::SEEK_HOLE, 10), Err(libc::ENXIO));
        assert_eq!(check_seek(-1, libc::SEEK_DATA, 10), Err(libc::EINVAL));
        assert_eq!(check_seek(0, libc::SEEK_END, 10), Err(libc::EINVAL));
    }
}
