//! The kernel's VDUSE interface (`include/uapi/linux/vduse.h`, API version 0, Linux 5.15
//! and later): the structures, the ioctl numbers and the control messages, written from the
//! header. Every structure's size is checked at compile time against the header's layout
//! on 64-bit Linux. Fields and constants carry the header's names; the header documents them.
#![allow(missing_docs)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

/// The VDUSE ioctl type (`VDUSE_BASE`).
const BASE: u8 = 0x81;

/// The API version this crate speaks (`VDUSE_API_VERSION`).
pub const API_VERSION: u64 = 0;

/// `VDUSE_NAME_MAX`: a device name and its NUL.
pub const NAME_MAX: usize = 256;

/// `VIRTIO_ID_BLOCK`.
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// `VIRTIO_F_ACCESS_PLATFORM`: required of every VDUSE device (its memory is an IOTLB).
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;
/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = 1 << 32;

/// `VIRTIO_CONFIG_S_DRIVER_OK`.
pub const S_DRIVER_OK: u8 = 4;

/// `VDUSE_ACCESS_RO` / `_WO` / `_RW`: what the device may do with an IOTLB region.
pub const ACCESS_RO: u8 = 1;
/// See [`ACCESS_RO`].
pub const ACCESS_WO: u8 = 2;
/// See [`ACCESS_RO`].
pub const ACCESS_RW: u8 = 3;

/// `struct vduse_dev_config`, without its flexible `config[]` (which follows it in the
/// buffer `VDUSE_CREATE_DEV` is given).
#[repr(C)]
#[derive(Debug, Clone, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DevConfig {
    pub name: [u8; NAME_MAX],
    pub vendor_id: u32,
    pub device_id: u32,
    pub features: u64,
    pub vq_num: u32,
    pub vq_align: u32,
    pub reserved: [u32; 13],
    pub config_size: u32,
}

/// `struct vduse_iotlb_entry`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IotlbEntry {
    pub offset: u64,
    pub start: u64,
    pub last: u64,
    pub perm: u8,
    pub padding: [u8; 7],
}

/// `struct vduse_config_data`, without its flexible `buffer[]`.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ConfigData {
    pub offset: u32,
    pub length: u32,
}

/// `struct vduse_vq_config`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VqConfig {
    pub index: u32,
    pub max_size: u16,
    pub reserved: [u16; 13],
}

/// `struct vduse_vq_info` (the split ring's state is the union's first `u16`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VqInfo {
    pub index: u32,
    pub num: u32,
    pub desc_addr: u64,
    pub driver_addr: u64,
    pub device_addr: u64,
    /// `split.avail_index`, or `packed`'s four fields.
    pub state: [u16; 4],
    pub ready: u8,
    pub padding: [u8; 7],
}

/// `struct vduse_vq_eventfd`.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VqEventfd {
    pub index: u32,
    pub fd: i32,
}

/// `VDUSE_EVENTFD_DEASSIGN`.
pub const EVENTFD_DEASSIGN: i32 = -1;

/// `enum vduse_req_type`.
pub const REQ_GET_VQ_STATE: u32 = 0;
/// See [`REQ_GET_VQ_STATE`].
pub const REQ_SET_STATUS: u32 = 1;
/// See [`REQ_GET_VQ_STATE`].
pub const REQ_UPDATE_IOTLB: u32 = 2;

/// `VDUSE_REQ_RESULT_OK` / `_FAILED`.
pub const RESULT_OK: u32 = 0;
/// See [`RESULT_OK`].
pub const RESULT_FAILED: u32 = 1;

/// `struct vduse_dev_request`, read from the device's file. The union is kept as bytes:
/// `vq_state.index` (`u32`), `s.status` (`u8`) and `iova.start`/`iova.last` (`u64`s) all start
/// at its beginning.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DevRequest {
    pub kind: u32,
    pub request_id: u32,
    pub reserved: [u32; 4],
    pub payload: [u64; 16],
}

impl DevRequest {
    /// `vq_state.index` (`GET_VQ_STATE`).
    pub fn vq_index(&self) -> u32 {
        self.payload[0] as u32
    }

    /// `s.status` (`SET_STATUS`).
    pub fn status(&self) -> u8 {
        self.payload[0].as_bytes()[0]
    }

    /// `iova.start`, `iova.last` (`UPDATE_IOTLB`).
    pub fn iova(&self) -> (u64, u64) {
        (self.payload[0], self.payload[1])
    }
}

/// `struct vduse_dev_response`, written to the device's file. The union is `vq_state`:
/// `index` then the split ring's `avail_index`.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DevResponse {
    pub request_id: u32,
    pub result: u32,
    pub reserved: [u32; 4],
    pub vq_index: u32,
    pub avail_index: u16,
    pub padding: [u8; 122],
}

impl DevResponse {
    /// An answer to `request` with `result`.
    pub fn to(request: &DevRequest, result: u32) -> DevResponse {
        let mut r = DevResponse::new_zeroed();
        r.request_id = request.request_id;
        r.result = result;
        r
    }
}

const _: () = {
    assert!(std::mem::size_of::<DevConfig>() == 336);
    assert!(std::mem::size_of::<IotlbEntry>() == 32);
    assert!(std::mem::size_of::<ConfigData>() == 8);
    assert!(std::mem::size_of::<VqConfig>() == 32);
    assert!(std::mem::size_of::<VqInfo>() == 48);
    assert!(std::mem::size_of::<VqEventfd>() == 8);
    assert!(std::mem::size_of::<DevRequest>() == 152);
    assert!(std::mem::size_of::<DevResponse>() == 152);
    assert!(std::mem::offset_of!(VqInfo, state) == 32);
    assert!(std::mem::offset_of!(VqInfo, ready) == 40);
    assert!(std::mem::offset_of!(DevResponse, avail_index) == 28);
};

/// `_IOC(dir, BASE, nr, size)` on the architectures Linux's generic ioctl layout covers
/// (x86, arm64, riscv: 2 direction bits above 14 size bits).
const fn ioc(dir: u64, nr: u8, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((BASE as u64) << 8) | nr as u64
}
const NONE: u64 = 0;
const WRITE: u64 = 1;
const READ: u64 = 2;

pub const GET_API_VERSION: u64 = ioc(READ, 0x00, 8);
pub const SET_API_VERSION: u64 = ioc(WRITE, 0x01, 8);
pub const CREATE_DEV: u64 = ioc(WRITE, 0x02, std::mem::size_of::<DevConfig>());
pub const DESTROY_DEV: u64 = ioc(WRITE, 0x03, NAME_MAX);
pub const IOTLB_GET_FD: u64 = ioc(READ | WRITE, 0x10, std::mem::size_of::<IotlbEntry>());
pub const DEV_GET_FEATURES: u64 = ioc(READ, 0x11, 8);
pub const DEV_SET_CONFIG: u64 = ioc(WRITE, 0x12, std::mem::size_of::<ConfigData>());
pub const DEV_INJECT_CONFIG_IRQ: u64 = ioc(NONE, 0x13, 0);
pub const VQ_SETUP: u64 = ioc(WRITE, 0x14, std::mem::size_of::<VqConfig>());
pub const VQ_GET_INFO: u64 = ioc(READ | WRITE, 0x15, std::mem::size_of::<VqInfo>());
pub const VQ_SETUP_KICKFD: u64 = ioc(WRITE, 0x16, std::mem::size_of::<VqEventfd>());
pub const VQ_INJECT_IRQ: u64 = ioc(WRITE, 0x17, 4);

/// Calls ioctl `request` on `file` with `arg`, a buffer whose layout is the one `request`
/// names. Returns the ioctl's non-negative result.
pub fn ioctl(file: &File, request: u64, arg: &mut [u8]) -> io::Result<i32> {
    let size = ((request >> 16) & 0x3fff) as usize;
    if arg.len() < size {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: `arg` is a live, exclusively borrowed buffer at least as long as the size the
    // request number encodes, which is all the kernel reads or writes through the pointer
    // (CREATE_DEV and SET_CONFIG read `config_size`/`length` more bytes, which the callers
    // put in the same buffer: `create_dev`, `set_config`).
    let r = unsafe { libc::ioctl(file.as_raw_fd(), request as libc::Ioctl, arg.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// An ioctl whose argument is a plain integer value, not a pointer (`INJECT_CONFIG_IRQ`).
pub fn ioctl_none(file: &File, request: u64) -> io::Result<i32> {
    // SAFETY: a request that takes no argument; no memory is passed.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), request as libc::Ioctl, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// `VDUSE_CREATE_DEV`: the configuration followed by the config space, in one buffer.
pub fn create_dev(control: &File, config: &DevConfig, space: &[u8]) -> io::Result<()> {
    let mut buf = config.as_bytes().to_vec();
    buf.extend_from_slice(space);
    ioctl(control, CREATE_DEV, &mut buf).map(drop)
}

/// `VDUSE_DEV_SET_CONFIG`: `bytes` at `offset` of the config space.
pub fn set_config(dev: &File, offset: u32, bytes: &[u8]) -> io::Result<()> {
    let head = ConfigData {
        offset,
        length: bytes.len() as u32,
    };
    let mut buf = head.as_bytes().to_vec();
    buf.extend_from_slice(bytes);
    ioctl(dev, DEV_SET_CONFIG, &mut buf).map(drop)
}

/// A device name as the kernel takes it: NUL-padded to [`NAME_MAX`].
pub fn name_bytes(name: &str) -> Option<[u8; NAME_MAX]> {
    let b = name.as_bytes();
    if b.is_empty() || b.len() >= NAME_MAX || b.contains(&0) {
        return None;
    }
    let mut out = [0u8; NAME_MAX];
    out[..b.len()].copy_from_slice(b);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers the header's `_IOR`/`_IOW`/`_IOWR` definitions give, as a C program
    /// including Linux 6.1's <linux/vduse.h> printed them on x86-64 (as were the sizes and
    /// offsets checked at compile time above).
    #[test]
    fn ioctl_numbers_are_the_headers() {
        assert_eq!(GET_API_VERSION, 0x8008_8100);
        assert_eq!(SET_API_VERSION, 0x4008_8101);
        assert_eq!(CREATE_DEV, 0x4150_8102);
        assert_eq!(DESTROY_DEV, 0x4100_8103);
        assert_eq!(IOTLB_GET_FD, 0xc020_8110);
        assert_eq!(DEV_GET_FEATURES, 0x8008_8111);
        assert_eq!(DEV_SET_CONFIG, 0x4008_8112);
        assert_eq!(DEV_INJECT_CONFIG_IRQ, 0x0000_8113);
        assert_eq!(VQ_SETUP, 0x4020_8114);
        assert_eq!(VQ_GET_INFO, 0xc030_8115);
        assert_eq!(VQ_SETUP_KICKFD, 0x4008_8116);
        assert_eq!(VQ_INJECT_IRQ, 0x4004_8117);
    }

    #[test]
    fn requests_read_their_union_as_the_kernel_lays_it_out() {
        let mut bytes = [0u8; 152];
        bytes[0..4].copy_from_slice(&REQ_UPDATE_IOTLB.to_ne_bytes());
        bytes[4..8].copy_from_slice(&77u32.to_ne_bytes());
        bytes[24..32].copy_from_slice(&0x1000u64.to_ne_bytes());
        bytes[32..40].copy_from_slice(&0x1fffu64.to_ne_bytes());
        let r = DevRequest::read_from_bytes(&bytes).expect("size");
        assert_eq!((r.kind, r.request_id, r.iova()), (2, 77, (0x1000, 0x1fff)));
        bytes[24] = S_DRIVER_OK;
        let r = DevRequest::read_from_bytes(&bytes).expect("size");
        assert_eq!(r.status(), S_DRIVER_OK);
        let mut a = DevResponse::to(&r, RESULT_OK);
        a.vq_index = 3;
        a.avail_index = 0x1234;
        let out = a.as_bytes();
        assert_eq!(&out[0..4], &77u32.to_ne_bytes());
        assert_eq!(&out[24..28], &3u32.to_ne_bytes());
        assert_eq!(&out[28..30], &0x1234u16.to_ne_bytes());
    }

    #[test]
    fn names_are_nul_padded_and_bounded() {
        assert_eq!(&name_bytes("vduse0").expect("ok")[..7], b"vduse0\0");
        assert!(name_bytes("").is_none());
        assert!(name_bytes(&"x".repeat(255)).is_some());
        assert!(name_bytes(&"x".repeat(256)).is_none());
        assert!(name_bytes("a\0b").is_none());
    }
}
