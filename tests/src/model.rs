//! Random block requests checked against a model of the disk: the same operations and checks
//! for every way into an export (libblkio over vhost-user-blk in this process, a guest's
//! `/dev/vdX` over VDUSE).

use crate::pattern;

/// The sector: requests are sized and aligned in these.
pub const SECTOR: u64 = 512;

/// One request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at `offset`.
    Read { offset: u64, len: usize },
    /// Write `data` at `offset` (with `fua`, libblkio follows it with a flush).
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    /// Write zeroes; `unmap` allows the device to deallocate.
    WriteZeroes { offset: u64, len: u64, unmap: bool },
    /// Discard (the range then reads as its old data or as zeroes).
    Discard { offset: u64, len: u64 },
    /// Flush the device's write cache.
    Flush,
}

/// The seed of a random run: the number in the environment variable `var` (to replay a run),
pub use test_support::{count_from_env, seed_from_env, Rng};

/// What the image should hold: the bytes, and per sector whether a discard left it as either
/// those bytes or zeroes (a discard's result is the old data or zeroes; a read settles it).
pub struct Model {
    pub data: Vec<u8>,
    maybe_zero: Vec<bool>,
    /// Discarded sectors read back as zeroes, and as their old data (printed: what the
    /// daemon's discard did).
    pub discard_zeroed: usize,
    pub discard_kept: usize,
}

impl Model {
    /// A disk that holds `data`.
    pub fn new(data: Vec<u8>) -> Model {
        let sectors = data.len() / SECTOR as usize;
        Model {
            data,
            maybe_zero: vec![false; sectors],
            discard_zeroed: 0,
            discard_kept: 0,
        }
    }

    /// Checks `got` (read at `offset`) against the model and settles discarded sectors.
    pub fn check_read(&mut self, offset: u64, got: &[u8], what: &str) {
        for (i, chunk) in got.chunks(SECTOR as usize).enumerate() {
            let s = offset as usize / SECTOR as usize + i;
            let start = s * SECTOR as usize;
            let want = &self.data[start..start + SECTOR as usize];
            if self.maybe_zero[s] {
                let zero = chunk.iter().all(|&b| b == 0);
                assert!(
                    chunk == want || zero,
                    "{what}: sector {s} (offset {start}) of a discard is neither its old data \
                     nor zeroes"
                );
                if chunk == want {
                    self.discard_kept += 1;
                } else {
                    self.discard_zeroed += 1;
                }
                self.data[start..start + SECTOR as usize].copy_from_slice(chunk);
                self.maybe_zero[s] = false;
            } else if chunk != want {
                let first = chunk
                    .iter()
                    .zip(want)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                panic!(
                    "{what}: sector {s} (offset {start}) differs from the model at byte {first}: \
                     read {:02x?}, expected {:02x?}",
                    &chunk[first..(first + 16).min(chunk.len())],
                    &want[first..(first + 16).min(want.len())]
                );
            }
        }
    }

    /// What `op`, completed, did to the disk.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::Write { offset, data, .. } => {
                let o = *offset as usize;
                self.data[o..o + data.len()].copy_from_slice(data);
                self.settle(*offset, data.len() as u64);
            }
            Op::WriteZeroes { offset, len, .. } => {
                let o = *offset as usize;
                self.data[o..o + *len as usize].fill(0);
                self.settle(*offset, *len);
            }
            Op::Discard { offset, len } => {
                let first = (*offset / SECTOR) as usize;
                for s in first..first + (*len / SECTOR) as usize {
                    self.maybe_zero[s] = true;
                }
            }
            Op::Read { .. } | Op::Flush => {}
        }
    }

    /// The sectors of `len` bytes at `offset` hold the model's data again.
    pub fn settle(&mut self, offset: u64, len: u64) {
        let first = (offset / SECTOR) as usize;
        for s in first..first + (len / SECTOR) as usize {
            self.maybe_zero[s] = false;
        }
    }
}

/// The byte range `op` touches, (offset, length); none for a flush.
pub fn range_of(op: &Op) -> Option<(u64, u64)> {
    match op {
        Op::Read { offset, len } => Some((*offset, *len as u64)),
        Op::Write { offset, data, .. } => Some((*offset, data.len() as u64)),
        Op::WriteZeroes { offset, len, .. } | Op::Discard { offset, len } => Some((*offset, *len)),
        Op::Flush => None,
    }
}

/// A batch of random requests on random queues whose ranges do not overlap (their order is
/// then irrelevant, and the model exact): reads, writes (some with FUA), write-zeroes (with
/// and without unmap), discards and flushes, sizes 512 B to 256 KiB aligned to 512.
pub fn random_batch(rng: &mut Rng, size: u64, queues: usize, serial: &mut u64) -> Vec<(usize, Op)> {
    let n = 1 + rng.below(40) as usize;
    let mut batch: Vec<(usize, Op)> = Vec::new();
    let mut taken: Vec<(u64, u64)> = Vec::new();
    let mut attempts = 0;
    while batch.len() < n && attempts < 4 * n {
        attempts += 1;
        let sectors = match rng.below(10) {
            0..=5 => 1 + rng.below(16),
            6..=8 => 1 + rng.below(128),
            _ => 1 + rng.below(512),
        };
        let len = sectors * SECTOR;
        let offset = rng.below((size - len) / SECTOR + 1) * SECTOR;
        let queue = rng.below(queues as u64) as usize;
        let op = match rng.below(20) {
            0..=6 => Op::Read {
                offset,
                len: len as usize,
            },
            7..=13 => {
                *serial += 1;
                Op::Write {
                    offset,
                    data: pattern(len as usize, 1_000_000 + *serial),
                    fua: rng.below(8) == 0,
                }
            }
            14..=15 => Op::WriteZeroes {
                offset,
                len,
                unmap: rng.below(2) == 0,
            },
            16..=18 => Op::Discard { offset, len },
            _ => Op::Flush,
        };
        if let Some((o, l)) = range_of(&op) {
            if taken.iter().any(|&(to, tl)| o < to + tl && to < o + l) {
                continue;
            }
            taken.push((o, l));
        }
        batch.push((queue, op));
    }
    batch
}

/// A request in words, for failure messages.
pub fn describe(op: &Op) -> String {
    match op {
        Op::Read { offset, len } => format!("read {len} at {offset}"),
        Op::Write { offset, data, fua } => format!("write {} at {offset} fua={fua}", data.len()),
        Op::WriteZeroes { offset, len, unmap } => {
            format!("write-zeroes {len} at {offset} unmap={unmap}")
        }
        Op::Discard { offset, len } => format!("discard {len} at {offset}"),
        Op::Flush => "flush".to_string(),
    }
}
