//! Walking a split-ring descriptor chain (virtio 1.2, 2.7.5), with every rule a driver could
//! break checked: nothing in a descriptor table makes us loop, read outside the guest's
//! memory, or accept a chain the spec forbids.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const DESC_SIZE: u64 = 16;

/// One buffer of a chain: `len` bytes of guest memory at `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes (never 0: empty descriptors are skipped).
    pub len: u32,
    /// Device-writable (the device writes it; otherwise the device reads it).
    pub write: bool,
}

/// Why a chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    /// A `next` index, or the head, lies outside its descriptor table.
    IndexOutOfRange,
    /// More descriptors than the table holds: a loop, or a chain longer than the queue.
    TooLong,
    /// An indirect table inside an indirect table.
    NestedIndirect,
    /// An indirect table whose length is 0, not a multiple of 16, or above 65535 entries.
    BadIndirectTable,
    /// A descriptor (or table) the guest's memory does not hold.
    BadAddress,
    /// More than 4 GiB of buffers in one chain (2.7.5.2).
    TooManyBytes,
    /// A device-readable buffer after a device-writable one (2.7.4.2).
    ReadableAfterWritable,
}

impl std::fmt::Display for ChainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChainError::IndexOutOfRange => "descriptor index out of range",
            ChainError::TooLong => "descriptor chain longer than its table",
            ChainError::NestedIndirect => "indirect table inside an indirect table",
            ChainError::BadIndirectTable => "invalid indirect descriptor table",
            ChainError::BadAddress => "descriptor outside guest memory",
            ChainError::TooManyBytes => "descriptor chain over 4 GiB",
            ChainError::ReadableAfterWritable => "device-readable descriptor after a writable one",
        })
    }
}

/// Walks the chain starting at `head` of the descriptor table at `table` (of `queue_size`
/// entries), appending its non-empty buffers to `out` (cleared first).
pub fn walk<M: GuestMemory + ?Sized>(
    mem: &M,
    table: GuestAddress,
    queue_size: u16,
    head: u16,
    out: &mut Vec<Segment>,
) -> Result<(), ChainError> {
    out.clear();
    let mut table = table;
    let mut size = u32::from(queue_size);
    let mut budget = size;
    let mut index = u32::from(head);
    let mut indirect = false;
    let mut total: u64 = 0;
    let mut seen_write = false;
    loop {
        if index >= size {
            return Err(ChainError::IndexOutOfRange);
        }
        if budget == 0 {
            return Err(ChainError::TooLong);
        }
        budget -= 1;
        let addr = table
            .0
            .checked_add(u64::from(index) * DESC_SIZE)
            .ok_or(ChainError::BadAddress)?;
        let desc: Descriptor = mem
            .read_obj(GuestAddress(addr))
            .map_err(|_| ChainError::BadAddress)?;
        let flags = desc.flags();
        if flags & F_INDIRECT != 0 {
            if indirect {
                return Err(ChainError::NestedIndirect);
            }
            let len = desc.len();
            if len == 0 || u64::from(len) % DESC_SIZE != 0 || u64::from(len) / DESC_SIZE > 65535 {
                return Err(ChainError::BadIndirectTable);
            }
            // The chain continues in the table; a NEXT flag beside INDIRECT (which the spec
            // forbids) is ignored, as QEMU does.
            table = desc.addr();
            size = len / DESC_SIZE as u32;
            budget = size;
            index = 0;
            indirect = true;
            continue;
        }
        if desc.addr().0.checked_add(u64::from(desc.len())).is_none() {
            return Err(ChainError::BadAddress);
        }
        total += u64::from(desc.len());
        if total > u64::from(u32::MAX) {
            return Err(ChainError::TooManyBytes);
        }
        let write = flags & F_WRITE != 0;
        if write {
            seen_write = true;
        } else if seen_write {
            return Err(ChainError::ReadableAfterWritable);
        }
        if desc.len() > 0 {
            out.push(Segment {
                addr: desc.addr(),
                len: desc.len(),
                write,
            });
        }
        if flags & F_NEXT == 0 {
            return Ok(());
        }
        index = u32::from(desc.next());
    }
}
