//! Parsing a virtio-blk request (virtio 1.2, 5.2.6) out of a walked descriptor chain.
//!
//! A request is a device-readable header (`type`, `ioprio`, `sector`), data buffers, and a
//! device-writable status byte at the very end. Everything is checked here, before any I/O:
//! what can be answered with a status byte is ([`Action::Done`]); a chain without a place for
//! the status byte cannot be answered and is refused ([`Refused`]).

use crate::chain::Segment;
use crate::config::{MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS, SECTOR_SHIFT, SECTOR_SIZE};
use crate::status::Status;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Request types (5.2.6).
pub mod kind {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// Device id (the serial).
    pub const GET_ID: u32 = 8;
    /// Discard.
    pub const DISCARD: u32 = 11;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = 13;
    /// Legacy barrier flag, ignored (as QEMU does).
    pub const BARRIER: u32 = 0x8000_0000;
}

/// The unmap flag of a write-zeroes segment.
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
/// Bytes of the GET_ID answer.
pub const ID_BYTES: usize = 20;
const HEADER_LEN: u64 = 16;
const DWZ_SEGMENT_LEN: u64 = 16;

/// What the device knows when it checks a request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Size of the device in bytes.
    pub size: u64,
    /// Logical block size: sectors must be aligned to it.
    pub logical_block_size: u32,
    /// Most data segments of a read or write.
    pub seg_max: u32,
    /// Writes, discards and write-zeroes are allowed.
    pub writable: bool,
}

/// What to do for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Read into `data` (device-writable buffers) from byte `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Where the data goes.
        data: Vec<Segment>,
        /// Total bytes.
        len: u64,
    },
    /// Write `data` (device-readable buffers) at byte `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// The data.
        data: Vec<Segment>,
        /// Total bytes.
        len: u64,
    },
    /// Flush.
    Flush,
    /// Write the serial into `data`.
    GetId {
        /// Where the id goes.
        data: Vec<Segment>,
    },
    /// Discard `len` bytes at `offset`.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Zero `len` bytes at `offset`.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// The driver allows deallocation.
        unmap: bool,
    },
    /// Answer at once with this status.
    Done(Status),
}

/// A parsed request: what to do and where its status byte goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// What to do.
    pub action: Action,
    /// Guest address of the status byte.
    pub status: GuestAddress,
}

/// A chain that cannot be answered: it has no device-writable byte at its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused;

/// Parses the request in `segs` (a walked chain).
pub fn parse<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    limits: &Limits,
) -> Result<Parsed, Refused> {
    let last = segs.last().ok_or(Refused)?;
    if !last.write {
        return Err(Refused);
    }
    let status = GuestAddress(
        last.addr
            .0
            .checked_add(u64::from(last.len) - 1)
            .ok_or(Refused)?,
    );
    let done = |s| {
        Ok(Parsed {
            action: Action::Done(s),
            status,
        })
    };
    // Device-readable part first (the walk guarantees the order), then device-writable.
    let split = segs.iter().position(|s| s.write).unwrap_or(segs.len());
    let (readable, writable) = segs.split_at(split);
    let mut header = [0u8; HEADER_LEN as usize];
    if gather(mem, readable, &mut header).is_err() {
        // No (or a short, or an unreadable) header: a device-writable header lands here too.
        return done(Status::IoErr);
    }
    let ty = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let payload = skip(readable, HEADER_LEN);
    // The device-writable buffers but the status byte.
    let in_data = trim_last(writable);
    let action = match ty & !kind::BARRIER {
        kind::IN | kind::OUT => {
            let write = ty & !kind::BARRIER == kind::OUT;
            let data = if write { payload } else { in_data };
            if write && !limits.writable {
                return done(Status::IoErr);
            }
            if data.len() as u64 > u64::from(limits.seg_max) {
                return done(Status::IoErr);
            }
            let len: u64 = data.iter().map(|s| u64::from(s.len)).sum();
            let Some(offset) = check_range(limits, sector, len) else {
                return done(Status::IoErr);
            };
            if write {
                Action::Write { offset, data, len }
            } else {
                Action::Read { offset, data, len }
            }
        }
        kind::FLUSH => Action::Flush,
        kind::GET_ID => Action::GetId { data: in_data },
        t @ (kind::DISCARD | kind::WRITE_ZEROES) => {
            if !limits.writable {
                return done(Status::IoErr);
            }
            let size: u64 = payload.iter().map(|s| u64::from(s.len)).sum();
            // One segment is all we offer (`max_discard_seg`, `max_write_zeroes_seg`).
            if size > DWZ_SEGMENT_LEN {
                return done(Status::Unsupp);
            }
            let mut seg = [0u8; DWZ_SEGMENT_LEN as usize];
            if size != DWZ_SEGMENT_LEN || gather(mem, &payload, &mut seg).is_err() {
                return done(Status::IoErr);
            }
            let sector = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
            let sectors = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
            let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4 bytes"));
            let max = if t == kind::WRITE_ZEROES {
                MAX_WRITE_ZEROES_SECTORS
            } else {
                MAX_DISCARD_SECTORS
            };
            if sectors > max {
                return done(Status::IoErr);
            }
            let len = u64::from(sectors) << SECTOR_SHIFT;
            let Some(offset) = check_range(limits, sector, len) else {
                return done(Status::IoErr);
            };
            // Unknown flags, and unmap on a discard, get UNSUPP (5.2.6.2).
            if flags & !WRITE_ZEROES_FLAG_UNMAP != 0
                || (t == kind::DISCARD && flags & WRITE_ZEROES_FLAG_UNMAP != 0)
            {
                return done(Status::Unsupp);
            }
            if t == kind::DISCARD {
                Action::Discard { offset, len }
            } else {
                Action::WriteZeroes {
                    offset,
                    len,
                    unmap: flags & WRITE_ZEROES_FLAG_UNMAP != 0,
                }
            }
        }
        _ => Action::Done(Status::Unsupp),
    };
    Ok(Parsed { action, status })
}

/// The byte offset of `sector` if `len` bytes there lie inside the device, in whole 512-byte
/// sectors, starting on a logical block.
fn check_range(limits: &Limits, sector: u64, len: u64) -> Option<u64> {
    if len % SECTOR_SIZE != 0 {
        return None;
    }
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    if offset % u64::from(limits.logical_block_size) != 0 {
        return None;
    }
    let end = offset.checked_add(len)?;
    (end <= limits.size).then_some(offset)
}

/// Copies the first `out.len()` bytes of `segs` into `out`; fails if they are shorter or not in
/// guest memory.
fn gather<M: GuestMemory + ?Sized>(mem: &M, segs: &[Segment], out: &mut [u8]) -> Result<(), ()> {
    let mut done = 0;
    for s in segs {
        if done == out.len() {
            break;
        }
        let n = (out.len() - done).min(s.len as usize);
        mem.read_slice(&mut out[done..done + n], s.addr)
            .map_err(|_| ())?;
        done += n;
    }
    if done == out.len() {
        Ok(())
    } else {
        Err(())
    }
}

/// `segs` without their first `n` bytes.
fn skip(segs: &[Segment], mut n: u64) -> Vec<Segment> {
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        if n >= u64::from(s.len) {
            n -= u64::from(s.len);
            continue;
        }
        out.push(Segment {
            // No overflow: the walk refused buffers that wrap around.
            addr: GuestAddress(s.addr.0 + n),
            len: s.len - n as u32,
            write: s.write,
        });
        n = 0;
    }
    out
}

/// `segs` without their last byte (the status byte).
fn trim_last(segs: &[Segment]) -> Vec<Segment> {
    let mut out = segs.to_vec();
    if let Some(last) = out.last_mut() {
        if last.len == 1 {
            out.pop();
        } else {
            last.len -= 1;
        }
    }
    out
}
