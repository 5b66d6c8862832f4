//! Random requests on a block device, checked against a model: run in a test guest on the
//! `/dev/vdX` of an export (see `tests/tests/vduse_blk_vm.rs`).
//!
//! `guest-random-ops DEVICE MODEL_OUT SEED BATCHES THREADS`: the device must hold
//! `pattern(size, SEED)` at the start. Each batch is the model's random batch of
//! non-overlapping requests, issued at once from up to THREADS threads, through the page
//! cache's back door (`O_DIRECT` reads and writes, `RWF_DSYNC` for FUA, `BLKDISCARD`,
//! `BLKZEROOUT` and `fallocate` punch-hole for write-zeroes without and with unmap,
//! `fdatasync` for flush); every read is checked. At the end the whole device is read back
//! and checked, and the model is written to MODEL_OUT (another disk) for the host to compare
//! with the image. The last line printed is `ok ...` or what went wrong.

use blockexportd_tests::model::{describe, random_batch, Model, Op, Rng};
use blockexportd_tests::pattern;
use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicUsize, Ordering};

/// `_IO(0x12, 119)`: discard a byte range of a block device.
const BLKDISCARD: libc::c_ulong = 0x1277;
/// `_IO(0x12, 127)`: write zeroes to a byte range, without unmapping.
const BLKZEROOUT: libc::c_ulong = 0x127f;
/// `_IOR(0x12, 114, u64)`: the device's size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// A page-aligned buffer, as `O_DIRECT` wants.
struct Aligned {
    ptr: *mut u8,
    len: usize,
}

impl Aligned {
    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len.max(1), 4096).expect("buffer layout")
    }

    fn zeroed(len: usize) -> Aligned {
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(Self::layout(len)) };
        assert!(!ptr.is_null(), "out of memory");
        Aligned { ptr, len }
    }

    fn from(data: &[u8]) -> Aligned {
        let mut b = Aligned::zeroed(data.len());
        b.as_mut().copy_from_slice(data);
        b
    }

    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` is a live allocation of `len` initialised bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_ref`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr, Self::layout(self.len)) }
    }
}

// SAFETY: the buffer is owned memory with no thread affinity.
unsafe impl Send for Aligned {}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn read_at(dev: &File, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
    let mut buf = Aligned::zeroed(len);
    let mut done = 0;
    while done < len {
        let rest = &mut buf.as_mut()[done..];
        // SAFETY: `rest` is writable memory of `rest.len()` bytes for the whole call.
        let n = unsafe {
            libc::pread(
                dev.as_raw_fd(),
                rest.as_mut_ptr().cast(),
                rest.len(),
                (offset + done as u64) as libc::off_t,
            )
        };
        match n {
            n if n < 0 => return Err(errno()),
            0 => return Err(libc::EIO),
            n => done += n as usize,
        }
    }
    Ok(buf.as_ref().to_vec())
}

fn write_at(dev: &File, offset: u64, data: &[u8], fua: bool) -> Result<(), i32> {
    let buf = Aligned::from(data);
    let mut done = 0;
    while done < data.len() {
        let rest = &buf.as_ref()[done..];
        let iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        let flags = if fua { libc::RWF_DSYNC } else { 0 };
        // SAFETY: `iov` names `rest`, readable for the whole call.
        let n = unsafe {
            libc::pwritev2(
                dev.as_raw_fd(),
                &iov,
                1,
                (offset + done as u64) as libc::off_t,
                flags,
            )
        };
        match n {
            n if n < 0 => return Err(errno()),
            0 => return Err(libc::EIO),
            n => done += n as usize,
        }
    }
    Ok(())
}

fn range_ioctl(dev: &File, request: libc::c_ulong, offset: u64, len: u64) -> Result<(), i32> {
    let range = [offset, len];
    // SAFETY: both ioctls read two u64 (start, length) from the pointer, which outlives the call.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), request, range.as_ptr()) };
    if r < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// Issues one request; a read returns its data.
fn issue(dev: &File, op: &Op) -> Result<Vec<u8>, i32> {
    match op {
        Op::Read { offset, len } => read_at(dev, *offset, *len),
        Op::Write { offset, data, fua } => write_at(dev, *offset, data, *fua).map(|_| Vec::new()),
        Op::WriteZeroes {
            offset,
            len,
            unmap: false,
        } => range_ioctl(dev, BLKZEROOUT, *offset, *len).map(|_| Vec::new()),
        Op::WriteZeroes {
            offset,
            len,
            unmap: true,
        } => {
            // On a block device, a punched hole is a write-zeroes that may unmap.
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: plain syscall on an owned descriptor.
            let r = unsafe {
                libc::fallocate(
                    dev.as_raw_fd(),
                    mode,
                    *offset as libc::off_t,
                    *len as libc::off_t,
                )
            };
            if r < 0 {
                Err(errno())
            } else {
                Ok(Vec::new())
            }
        }
        Op::Discard { offset, len } => {
            range_ioctl(dev, BLKDISCARD, *offset, *len).map(|_| Vec::new())
        }
        Op::Flush => {
            if dev.sync_data().is_err() {
                Err(errno())
            } else {
                Ok(Vec::new())
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        eprintln!("usage: guest-random-ops DEVICE MODEL_OUT SEED BATCHES THREADS");
        std::process::exit(2);
    }
    let seed: u64 = args[3].parse().expect("SEED is a number");
    let batches: usize = args[4].parse().expect("BATCHES is a number");
    let threads: usize = args[5].parse().expect("THREADS is a number");
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&args[1])
        .unwrap_or_else(|e| panic!("open {}: {e}", args[1]));
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), BLKGETSIZE64, &mut size) };
    assert!(r == 0, "BLKGETSIZE64: errno {}", errno());

    let mut model = Model::new(pattern(size as usize, seed));
    let chunk = 1 << 20;
    let read_all = |model: &mut Model, what: &str| {
        for offset in (0..size).step_by(chunk) {
            let len = chunk.min((size - offset) as usize);
            let got = read_at(&dev, offset, len).unwrap_or_else(|e| panic!("{what}: errno {e}"));
            model.check_read(offset, &got, &format!("{what} at {offset}"));
        }
    };
    read_all(&mut model, &format!("seed {seed} first read"));

    let mut rng = Rng::new(seed);
    let mut serial = 0;
    let mut counts = [0usize; 5];
    for b in 0..batches {
        // The "queue" of a request picks its thread.
        let batch = random_batch(&mut rng, size, threads, &mut serial);
        let next = AtomicUsize::new(0);
        let mut outcomes: Vec<Option<Result<Vec<u8>, i32>>> = vec![None; batch.len()];
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads.min(batch.len()))
                .map(|_| {
                    s.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some((_, op)) = batch.get(i) else { break };
                            mine.push((i, issue(&dev, op)));
                        }
                        mine
                    })
                })
                .collect();
            for w in workers {
                for (i, r) in w.join().expect("a request thread panicked") {
                    outcomes[i] = Some(r);
                }
            }
        });
        for ((_, op), outcome) in batch.iter().zip(outcomes) {
            let what = format!("seed {seed} batch {b} {}", describe(op));
            let data = match outcome.expect("every request ran") {
                Ok(data) => data,
                Err(e) => panic!("{what}: failed with errno {e}"),
            };
            let kind = match op {
                Op::Read { offset, .. } => {
                    model.check_read(*offset, &data, &what);
                    0
                }
                Op::Write { .. } => 1,
                Op::WriteZeroes { .. } => 2,
                Op::Discard { .. } => 3,
                Op::Flush => 4,
            };
            counts[kind] += 1;
        }
        for (_, op) in &batch {
            model.apply(op);
        }
    }
    read_all(&mut model, &format!("seed {seed} final read"));

    let mut out = OpenOptions::new()
        .write(true)
        .open(&args[2])
        .unwrap_or_else(|e| panic!("open {}: {e}", args[2]));
    out.write_all(&model.data).expect("write the model");
    out.sync_all().expect("sync the model");
    let [reads, writes, zeroes, discards, flushes] = counts;
    println!(
        "ok {reads} reads, {writes} writes, {zeroes} write-zeroes, {discards} discards, \
         {flushes} flushes; discarded sectors read back: {} as zeroes, {} as their old data",
        model.discard_zeroed, model.discard_kept
    );
}
