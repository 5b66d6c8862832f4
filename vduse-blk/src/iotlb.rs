//! The device's view of the driver's memory: the kernel's IOTLB, a set of IOVA ranges each
//! backed by a file the device maps (`VDUSE_IOTLB_GET_FD`). The kernel adds ranges as the
//! driver allocates rings and maps buffers, without a message, and announces removals
//! (`VDUSE_UPDATE_IOTLB`); so the map is read again when a request misses it and when a
//! range is updated. Each version of the map is a [`GuestMemoryMmap`] that in-flight
//! requests keep alive: a range is unmapped only when the last request using it is done.

use crate::sys::{self, IotlbEntry, ACCESS_RW};
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
    GuestRegionMmap,
};
use zerocopy::IntoBytes;

/// One range of the IOTLB as the kernel describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA (inclusive).
    pub last: u64,
    /// Offset of `start` in the range's file.
    pub offset: u64,
    /// `VDUSE_ACCESS_*`.
    pub perm: u8,
}

/// The IOTLB of one device, and the map the queues use.
#[derive(Debug)]
pub struct Iotlb {
    dev: Arc<File>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// The ranges the current map was built from (one refresh at a time).
    ranges: Mutex<Vec<Range>>,
}

impl Iotlb {
    /// An IOTLB read through the device file `dev`, with nothing mapped yet.
    pub fn new(dev: Arc<File>) -> Iotlb {
        Iotlb {
            dev,
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            ranges: Mutex::new(Vec::new()),
        }
    }

    /// The map the queues read (replaced, not changed, by a refresh).
    pub fn memory(&self) -> GuestMemoryAtomic<GuestMemoryMmap> {
        self.mem.clone()
    }

    /// Reads the IOTLB again and replaces the map if it changed; returns whether it did.
    /// Ranges the map already has keep their mapping.
    pub fn refresh(&self) -> io::Result<bool> {
        let mut ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        let mut found = Vec::new();
        let mut files = Vec::new();
        let mut start = 0u64;
        loop {
            let mut e = IotlbEntry {
                start,
                last: u64::MAX,
                ..IotlbEntry::default()
            };
            match sys::ioctl(&self.dev, sys::IOTLB_GET_FD, e.as_mut_bytes()) {
                Ok(fd) => {
                    // SAFETY: the ioctl returned a new descriptor for the range's file, ours.
                    let file = unsafe { File::from_raw_fd(fd) };
                    if e.last < e.start || e.start < start {
                        return Err(io::Error::other("IOTLB answered a range out of order"));
                    }
                    found.push(Range {
                        start: e.start,
                        last: e.last,
                        offset: e.offset,
                        perm: e.perm,
                    });
                    files.push(file);
                    match e.last.checked_add(1) {
                        Some(next) => start = next,
                        None => break,
                    }
                }
                // No range at or above `start`.
                Err(err) if err.raw_os_error() == Some(libc::EINVAL) => break,
                Err(err) => return Err(err),
            }
        }
        if found == *ranges {
            return Ok(false);
        }
        let usable = |r: &&Range| r.perm == ACCESS_RW;
        // Ranges kept keep their mapping (shared with requests in flight on the old map);
        // ranges gone are unmapped when the last such request is done.
        let mut map: GuestMemoryMmap = (*self.mem.memory()).clone();
        for gone in ranges.iter().filter(usable).filter(|r| !found.contains(r)) {
            map = map
                .remove_region(GuestAddress(gone.start), gone.last - gone.start + 1)
                .map_err(|e| io::Error::other(format!("IOTLB map: {e}")))?
                .0;
        }
        for (r, file) in found.iter().zip(files) {
            if ranges.contains(r) {
                continue;
            }
            if !usable(&r) {
                // Not a range the kernel makes for a virtio device's rings or buffers (all
                // read-write): left out, so that a request naming it fails, not faults.
                tracing::warn!(
                    "vduse: IOTLB range {:#x}-{:#x} with access {} not mapped",
                    r.start,
                    r.last,
                    r.perm
                );
                continue;
            }
            map = map
                .insert_region(Arc::new(map_range(r, file)?))
                .map_err(|e| io::Error::other(format!("IOTLB map: {e}")))?;
        }
        self.mem
            .lock()
            .map_err(|_| io::Error::other("IOTLB map lock"))?
            .replace(map);
        *ranges = found;
        Ok(true)
    }

    /// The kernel changed the ranges overlapping `[start, last]` (`VDUSE_UPDATE_IOTLB`): they
    /// are mapped again from what the IOTLB says now.
    pub fn invalidate(&self, start: u64, last: u64) -> io::Result<()> {
        {
            let mut ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
            let mut map: GuestMemoryMmap = (*self.mem.memory()).clone();
            for r in ranges.iter().filter(|r| r.start <= last && r.last >= start) {
                if let Ok((m, _)) = map.remove_region(GuestAddress(r.start), r.last - r.start + 1) {
                    map = m;
                }
            }
            ranges.retain(|r| !(r.start <= last && r.last >= start));
            self.mem
                .lock()
                .map_err(|_| io::Error::other("IOTLB map lock"))?
                .replace(map);
        }
        self.refresh().map(drop)
    }

    /// Drops the map (the driver reset the device).
    pub fn clear(&self) {
        let mut ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(guard) = self.mem.lock() {
            guard.replace(GuestMemoryMmap::new());
        }
        ranges.clear();
    }
}

/// Maps range `r` of `file`, shared, read-write.
fn map_range(r: &Range, file: File) -> io::Result<GuestRegionMmap> {
    let len = usize::try_from(r.last - r.start + 1)
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let region = MmapRegionBuilder::new(len)
        .with_file_offset(FileOffset::new(file, r.offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED)
        .build()
        .map_err(|e| io::Error::other(format!("mapping IOTLB range {:#x}: {e}", r.start)))?;
    GuestRegionMmap::new(region, GuestAddress(r.start))
        .ok_or_else(|| io::Error::other("IOTLB range past the end of the address space"))
}
