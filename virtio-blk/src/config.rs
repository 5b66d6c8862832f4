//! Feature bits and the configuration space (virtio 1.2, 5.2.3 and 5.2.4).

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// The unit of `capacity` and of request sectors, whatever the logical block size.
pub const SECTOR_SIZE: u64 = 512;
/// `log2(SECTOR_SIZE)`.
pub const SECTOR_SHIFT: u32 = 9;

/// Feature bits: virtio-blk's own (5.2.3) and the transport-independent ones we offer.
pub mod feature {
    /// `size_max` is the largest segment.
    pub const SIZE_MAX: u32 = 1;
    /// `seg_max` is the most segments a request may have.
    pub const SEG_MAX: u32 = 2;
    /// The device is read-only.
    pub const RO: u32 = 5;
    /// `blk_size` is the logical block size.
    pub const BLK_SIZE: u32 = 6;
    /// Flush requests.
    pub const FLUSH: u32 = 9;
    /// The topology fields are valid.
    pub const TOPOLOGY: u32 = 10;
    /// The driver may switch the write cache (`writeback`) in the config space.
    pub const CONFIG_WCE: u32 = 11;
    /// `num_queues` queues.
    pub const MQ: u32 = 12;
    /// Discard requests.
    pub const DISCARD: u32 = 13;
    /// Write-zeroes requests.
    pub const WRITE_ZEROES: u32 = 14;
    /// Indirect descriptor tables (2.7.5.3).
    pub const RING_INDIRECT_DESC: u32 = 28;
    /// `used_event` / `avail_event` notification suppression (2.7.7).
    pub const RING_EVENT_IDX: u32 = 29;
    /// A virtio 1.x device (little-endian everywhere).
    pub const VERSION_1: u32 = 32;
}

/// The most sectors one discard or write-zeroes segment may cover (QEMU's value: 16 MiB).
pub const MAX_DISCARD_SECTORS: u32 = 32768;
/// The most sectors one write-zeroes segment may cover.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 32768;
/// The largest segment of a read or write that we advertise (`size_max`).
pub const SIZE_MAX: u32 = 1 << 22;

/// The configuration space, laid out as `struct virtio_blk_config`, all fields little-endian
/// (a virtio 1.x device). Its `writeback` byte is the only one a driver may write.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct ConfigSpace {
    /// Size of the device in 512-byte sectors.
    pub capacity: U64,
    /// Largest segment (with `SIZE_MAX`).
    pub size_max: U32,
    /// Most segments in a request (with `SEG_MAX`).
    pub seg_max: U32,
    /// Legacy CHS geometry: cylinders.
    pub cylinders: U16,
    /// Legacy CHS geometry: heads.
    pub heads: u8,
    /// Legacy CHS geometry: sectors.
    pub sectors: u8,
    /// Logical block size (with `BLK_SIZE`).
    pub blk_size: U32,
    /// log2 of logical blocks per physical block (with `TOPOLOGY`).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block (with `TOPOLOGY`).
    pub alignment_offset: u8,
    /// Suggested minimum I/O size in logical blocks (with `TOPOLOGY`).
    pub min_io_size: U16,
    /// Optimal I/O size in logical blocks (with `TOPOLOGY`).
    pub opt_io_size: U32,
    /// 1: write-back cache (the driver flushes); 0: writethrough (with `CONFIG_WCE`).
    pub writeback: u8,
    /// Reserved.
    pub unused0: u8,
    /// Number of request queues (with `MQ`).
    pub num_queues: U16,
    /// Most sectors in one discard segment.
    pub max_discard_sectors: U32,
    /// Most segments in one discard request.
    pub max_discard_seg: U32,
    /// Discard alignment in sectors.
    pub discard_sector_alignment: U32,
    /// Most sectors in one write-zeroes segment.
    pub max_write_zeroes_sectors: U32,
    /// Most segments in one write-zeroes request.
    pub max_write_zeroes_seg: U32,
    /// 1: a write-zeroes with the unmap flag may deallocate.
    pub write_zeroes_may_unmap: u8,
    /// Reserved.
    pub unused1: [u8; 3],
    /// Secure erase (not offered).
    pub max_secure_erase_sectors: U32,
    /// Secure erase (not offered).
    pub max_secure_erase_seg: U32,
    /// Secure erase (not offered).
    pub secure_erase_sector_alignment: U32,
}

/// Where `writeback` lies in the config space.
pub const WRITEBACK_OFFSET: u32 = 32;

/// What a virtio-blk device offers: the export's options and the node's facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Size of the node in bytes (rounded down to whole sectors in `capacity`).
    pub size: u64,
    /// The logical block size: a power of two, 512 or more.
    pub logical_block_size: u32,
    /// The node's preferred I/O size in bytes (the topology's `opt_io_size`), if any.
    pub optimal_io_size: u32,
    /// Number of request queues.
    pub num_queues: u16,
    /// Size of each queue: the longest chain, and so the most segments, is bounded by it.
    pub queue_size: u16,
    /// Writes are allowed (otherwise the device is read-only).
    pub writable: bool,
    /// The write cache starts enabled (the guest flushes); otherwise every write is made
    /// stable before it completes (the export's `writethrough`).
    pub writeback: bool,
    /// The serial returned by `GET_ID` (at most 20 bytes are sent), if any.
    pub serial: Option<String>,
}

impl DeviceConfig {
    /// The most data segments of one request: the queue size minus header and status.
    pub fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).max(1)
    }

    /// The device feature bits.
    pub fn features(&self) -> u64 {
        let mut f = [
            feature::VERSION_1,
            feature::SIZE_MAX,
            feature::SEG_MAX,
            feature::BLK_SIZE,
            feature::TOPOLOGY,
            feature::FLUSH,
            feature::CONFIG_WCE,
            feature::MQ,
            feature::RING_INDIRECT_DESC,
            feature::RING_EVENT_IDX,
        ]
        .iter()
        .fold(0u64, |acc, bit| acc | 1 << bit);
        if self.writable {
            f |= 1 << feature::DISCARD | 1 << feature::WRITE_ZEROES;
        } else {
            f |= 1 << feature::RO;
        }
        f
    }

    /// The configuration space.
    pub fn config_space(&self) -> ConfigSpace {
        let lbs = self.logical_block_size.max(512);
        let lbs_sectors = lbs >> SECTOR_SHIFT;
        // Capacity is in 512-byte sectors but must be whole logical blocks.
        let capacity = (self.size / u64::from(lbs)) * u64::from(lbs_sectors);
        let opt_blocks = if self.optimal_io_size > lbs {
            self.optimal_io_size / lbs
        } else {
            1
        };
        ConfigSpace {
            capacity: capacity.into(),
            size_max: SIZE_MAX.into(),
            seg_max: self.seg_max().into(),
            blk_size: lbs.into(),
            min_io_size: 1.into(),
            opt_io_size: opt_blocks.into(),
            writeback: u8::from(self.writeback),
            num_queues: self.num_queues.into(),
            max_discard_sectors: MAX_DISCARD_SECTORS.into(),
            max_discard_seg: 1.into(),
            discard_sector_alignment: lbs_sectors.into(),
            max_write_zeroes_sectors: MAX_WRITE_ZEROES_SECTORS.into(),
            max_write_zeroes_seg: 1.into(),
            write_zeroes_may_unmap: 1,
            ..ConfigSpace::default()
        }
    }
}

/// Reads `len` bytes at `offset` of `space` as a driver sees them: bytes past its end (fields
/// of later spec versions) read as zero.
pub fn read_config(space: &ConfigSpace, offset: u32, len: u32) -> Vec<u8> {
    let bytes = space.as_bytes();
    let mut out = vec![0u8; len as usize];
    let start = (offset as usize).min(bytes.len());
    let end = (offset as usize)
        .saturating_add(len as usize)
        .min(bytes.len());
    out[..end - start].copy_from_slice(&bytes[start..end]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn layout_matches_the_spec() {
        assert_eq!(size_of::<ConfigSpace>(), 72);
        assert_eq!(offset_of!(ConfigSpace, size_max), 8);
        assert_eq!(offset_of!(ConfigSpace, seg_max), 12);
        assert_eq!(offset_of!(ConfigSpace, blk_size), 20);
        assert_eq!(offset_of!(ConfigSpace, physical_block_exp), 24);
        assert_eq!(offset_of!(ConfigSpace, min_io_size), 26);
        assert_eq!(offset_of!(ConfigSpace, opt_io_size), 28);
        assert_eq!(
            offset_of!(ConfigSpace, writeback),
            WRITEBACK_OFFSET as usize
        );
        assert_eq!(offset_of!(ConfigSpace, num_queues), 34);
        assert_eq!(offset_of!(ConfigSpace, max_discard_sectors), 36);
        assert_eq!(offset_of!(ConfigSpace, max_write_zeroes_sectors), 48);
        assert_eq!(offset_of!(ConfigSpace, write_zeroes_may_unmap), 56);
        assert_eq!(offset_of!(ConfigSpace, max_secure_erase_sectors), 60);
    }

    fn config(writable: bool) -> DeviceConfig {
        DeviceConfig {
            size: (1 << 30) + 1000,
            logical_block_size: 4096,
            optimal_io_size: 0,
            num_queues: 2,
            queue_size: 256,
            writable,
            writeback: true,
            serial: None,
        }
    }

    #[test]
    fn little_endian_fields_and_whole_blocks() {
        let c = config(true).config_space();
        let b = c.as_bytes();
        // 1 GiB + 1000 bytes: whole 4 KiB blocks only, counted in 512-byte sectors.
        assert_eq!(&b[0..8], &((1u64 << 30) / 512).to_le_bytes());
        assert_eq!(&b[20..24], &4096u32.to_le_bytes());
        assert_eq!(&b[12..16], &254u32.to_le_bytes());
        assert_eq!(&b[34..36], &2u16.to_le_bytes());
        assert_eq!(&b[44..48], &8u32.to_le_bytes());
        assert_eq!(b[32], 1);
    }

    #[test]
    fn features_follow_writability() {
        let rw = config(true).features();
        let ro = config(false).features();
        for bit in [feature::DISCARD, feature::WRITE_ZEROES] {
            assert_ne!(rw & (1 << bit), 0);
            assert_eq!(ro & (1 << bit), 0);
        }
        assert_eq!(rw & (1 << feature::RO), 0);
        assert_ne!(ro & (1 << feature::RO), 0);
        assert_ne!(rw & (1 << feature::VERSION_1), 0);
        assert_ne!(rw & (1 << feature::RING_EVENT_IDX), 0);
    }

    #[test]
    fn reads_past_the_end_are_zero() {
        let c = config(true).config_space();
        let r = read_config(&c, 60, 40);
        assert_eq!(r.len(), 40);
        assert!(r[12..].iter().all(|&b| b == 0));
        assert_eq!(read_config(&c, 1000, 4), vec![0; 4]);
        assert_eq!(read_config(&c, u32::MAX, 4), vec![0; 4]);
    }
}
