//! Image locking compatible with QEMU's `file-posix` driver.
//!
//! QEMU marks which permissions a process holds on an image, and which it refuses to share,
//! with open file description locks (`F_OFD_SETLK`) on single bytes of the image:
//!
//! - byte `100 + bit`, read-locked: "this process holds permission `bit`";
//! - byte `200 + bit`, read-locked: "this process does not share permission `bit`".
//!
//! The permission bits are QEMU's `BLK_PERM_*`: consistent read (0), write (1), write unchanged
//! (2) and resize (3). Before it uses an image, a process checks that nobody else holds a
//! byte that conflicts with its own wishes (`raw_check_lock_bytes`): for every permission it
//! holds, nobody may have locked the matching "does not share" byte; for every permission it
//! does not share, nobody may have locked the matching "holds" byte. A test is made with
//! `F_OFD_GETLK` asking for a write lock, which conflicts with any other description's lock.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `RAW_LOCK_PERM_BASE` in QEMU's `block/file-posix.c`.
const PERM_BASE: i64 = 100;
/// `RAW_LOCK_SHARED_BASE` in QEMU's `block/file-posix.c`.
const SHARED_BASE: i64 = 200;

/// A set of QEMU block permissions (`BLK_PERM_*` bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms(pub u8);

impl Perms {
    /// `BLK_PERM_CONSISTENT_READ`.
    pub const CONSISTENT_READ: Perms = Perms(0x01);
    /// `BLK_PERM_WRITE`.
    pub const WRITE: Perms = Perms(0x02);
    /// `BLK_PERM_WRITE_UNCHANGED`.
    pub const WRITE_UNCHANGED: Perms = Perms(0x04);
    /// `BLK_PERM_RESIZE`.
    pub const RESIZE: Perms = Perms(0x08);
    /// `BLK_PERM_ALL`.
    pub const ALL: Perms = Perms(0x0f);

    /// The union of two sets.
    pub const fn with(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    fn has_bit(self, bit: u8) -> bool {
        self.0 & (1 << bit) != 0
    }
}

/// The name QEMU gives a permission bit in its messages (`bdrv_perm_names`).
fn perm_name(bit: u8) -> &'static str {
    match bit {
        0 => "consistent read",
        1 => "write",
        2 => "write unchanged",
        _ => "resize",
    }
}

/// Why the image could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process does not share a permission we need (QEMU's wording).
    #[error("Failed to get \"{0}\" lock")]
    Held(&'static str),
    /// Another process holds a permission we do not share (QEMU's wording).
    #[error("Failed to get shared \"{0}\" lock")]
    Shared(&'static str),
    /// A lock operation failed for another reason than a conflict.
    #[error("Failed to lock byte {0}")]
    Lock(i64, #[source] io::Error),
    /// Testing a lock failed.
    #[error("Failed to test lock byte {0}")]
    Test(i64, #[source] io::Error),
}

impl LockError {
    /// Whether the error says that locks are not supported here at all (then `locking=auto`
    /// goes on without them).
    pub fn unsupported(&self) -> bool {
        match self {
            LockError::Lock(_, e) | LockError::Test(_, e) => {
                matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL | libc::ENOTSUP | libc::ENOLCK)
                )
            }
            LockError::Held(_) | LockError::Shared(_) => false,
        }
    }
}

fn flock_for(kind: libc::c_int, offset: i64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct for which all-zero bytes are a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = offset;
    fl.l_len = 1;
    fl
}

fn lock_byte(file: &File, offset: i64) -> io::Result<()> {
    let fl = flock_for(libc::F_RDLCK, offset);
    // SAFETY: the fd is open for as long as `file` lives; `fl` is a valid flock that the
    // kernel only reads.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether another open file description holds a lock on the byte.
fn byte_taken(file: &File, offset: i64) -> io::Result<bool> {
    let mut fl = flock_for(libc::F_WRLCK, offset);
    // SAFETY: as in `lock_byte`; the kernel writes the result into `fl`, which we own.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if ret == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Takes the locks for holding `perm` and sharing only `shared`, then checks that no other
/// process conflicts (QEMU's `raw_apply_lock_bytes` followed by `raw_check_lock_bytes`).
/// The locks live as long as `file`'s open file description.
pub fn lock(file: &File, perm: Perms, shared: Perms) -> Result<(), LockError> {
    for bit in 0..4u8 {
        if perm.has_bit(bit) {
            let off = PERM_BASE + i64::from(bit);
            lock_byte(file, off).map_err(|e| LockError::Lock(off, e))?;
        }
    }
    for bit in 0..4u8 {
        if !shared.has_bit(bit) {
            let off = SHARED_BASE + i64::from(bit);
            lock_byte(file, off).map_err(|e| LockError::Lock(off, e))?;
        }
    }
    for bit in 0..4u8 {
        if perm.has_bit(bit) {
            let off = SHARED_BASE + i64::from(bit);
            if byte_taken(file, off).map_err(|e| LockError::Test(off, e))? {
                return Err(LockError::Held(perm_name(bit)));
            }
        }
    }
    for bit in 0..4u8 {
        if !shared.has_bit(bit) {
            let off = PERM_BASE + i64::from(bit);
            if byte_taken(file, off).map_err(|e| LockError::Test(off, e))? {
                return Err(LockError::Shared(perm_name(bit)));
            }
        }
    }
    Ok(())
}

/// Releases every lock byte [`lock`] may have taken (an inactive node lets another
/// process take the image over, as QEMU drops its permissions then).
pub fn unlock(file: &File) -> io::Result<()> {
    let mut fl = flock_for(libc::F_UNLCK, PERM_BASE);
    fl.l_len = SHARED_BASE + 4 - PERM_BASE;
    // SAFETY: as in `lock_byte`.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn open(path: &std::path::Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open test file")
    }

    #[test]
    fn two_writers_conflict_and_readers_do_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 4096]).expect("write test file");
        let writer_perm = Perms::CONSISTENT_READ.with(Perms::WRITE);
        let writer_shared = Perms::CONSISTENT_READ.with(Perms::WRITE_UNCHANGED);

        let a = open(&path);
        lock(&a, writer_perm, writer_shared).expect("first writer locks");
        // A second open file description is another "process" for OFD locks.
        let b = open(&path);
        let err = lock(&b, writer_perm, writer_shared).expect_err("second writer refused");
        assert_eq!(err.to_string(), "Failed to get \"write\" lock");
        drop(b);

        // A force-share reader only holds consistent read and shares everything.
        let c = open(&path);
        lock(&c, Perms::CONSISTENT_READ, Perms::ALL).expect("force-share reader");

        // A normal reader does not share write: it conflicts with the writer.
        let d = open(&path);
        let err = lock(&d, Perms::CONSISTENT_READ, writer_shared).expect_err("reader refused");
        assert_eq!(err.to_string(), "Failed to get shared \"write\" lock");
        drop(d);

        // That closing releases the locks is checked by the conformance suite, which runs
        // serially: here, another unit test's forked child may hold a copy of `a`'s open
        // file description (and its locks) until it execs.
        drop(a);
    }
}
