//! The vhost-user protocol, backend side, for one frontend connection (QEMU's
//! docs/interop/vhost-user.rst): features, the memory table, the rings and their workers,
//! the config space, and the in-flight log.
//!
//! `vhost-user-backend` would do most of this, but its handler refuses `GET_INFLIGHT_FD`
//! and cannot be extended from outside; so the messages are handled here, on `vhost`'s
//! message layer, and the rings on `virtio-queue`.

use crate::transport::CallFd;
use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Backend as BackendChannel, Error, GpuBackend, Result};
use vhost::vhost_user::{VhostUserBackendReqHandlerMut, VhostUserFrontendReqHandler};
use vhost::VhostUserMemoryRegionBase;
use virtio_blk::config::{feature, read_config, DeviceConfig, WRITEBACK_OFFSET};
use virtio_blk::inflight::{queue_region_size, InflightMap, Resume};
use virtio_blk::worker::{Shared, Start, Worker};
use virtio_blk::BlkDevice;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
    GuestRegionMmap, MmapRegion,
};

/// The largest ring we take (QEMU's VIRTQUEUE_MAX_SIZE).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Memory slots offered with `CONFIGURE_MEM_SLOTS` (QEMU's libvhost-user offers as many).
const MAX_MEM_SLOTS: u64 = 509;

/// What every connection of one export shares.
#[derive(Debug)]
pub struct Device {
    /// The device model's side (submitter, writeback state).
    pub blk: Arc<BlkDevice>,
    /// The export's options as the device offers them.
    pub config: DeviceConfig,
}

impl Device {
    fn features(&self) -> u64 {
        self.config.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
}

struct Region {
    guest_phys: u64,
    size: u64,
    user_addr: u64,
    mapping: Arc<GuestRegionMmap>,
}

#[derive(Default)]
struct Vring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    base: u16,
    kick: Option<File>,
    worker: Option<Worker<CallFd>>,
    shared: Option<Arc<Shared<CallFd>>>,
    enabled: bool,
}

/// One connection's state.
pub struct Backend {
    device: Arc<Device>,
    features: u64,
    protocol: u64,
    owner: bool,
    regions: Vec<Region>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    vrings: Vec<Vring>,
    inflight: Option<Arc<InflightMap>>,
    /// Tells the frontend of resizes over the backend channel, while the connection lasts.
    config_change: Option<AbortOnDrop>,
}

/// A task that ends when its handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on `channel` after every resize seen on
/// `sizes`, so that the frontend raises the config interrupt and the guest reads the new
/// capacity (QSD's `vu_blk_exp_resize`). Sizes that change again before the frontend answered
/// are told once.
async fn tell_resizes(mut sizes: tokio::sync::watch::Receiver<u64>, channel: BackendChannel) {
    while sizes.changed().await.is_ok() {
        let ch = channel.clone();
        // With REPLY_ACK the send waits for the frontend's answer: off the runtime's threads.
        match tokio::task::spawn_blocking(move || ch.handle_config_change()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!("vhost-user-blk: telling the frontend of a resize: {e}");
                return;
            }
            Err(_) => return,
        }
    }
}

fn invalid(what: &'static str) -> Error {
    Error::InvalidOperation(what)
}

fn os(e: io::Error) -> Error {
    Error::ReqHandlerError(e)
}

impl Backend {
    /// A fresh connection of `device`.
    pub fn new(device: Arc<Device>) -> Backend {
        let n = usize::from(device.config.num_queues);
        Backend {
            device,
            features: 0,
            protocol: 0,
            owner: false,
            regions: Vec::new(),
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            vrings: (0..n).map(|_| Vring::default()).collect(),
            inflight: None,
            config_change: None,
        }
    }

    fn vring(&mut self, index: u32) -> Result<&mut Vring> {
        self.vrings
            .get_mut(index as usize)
            .ok_or(Error::InvalidParam)
    }

    /// Translates an address of the frontend's own address space to a guest address.
    fn vmm_to_guest(&self, va: u64) -> Result<u64> {
        self.regions
            .iter()
            .find(|r| va >= r.user_addr && va - r.user_addr < r.size)
            .map(|r| r.guest_phys + (va - r.user_addr))
            .ok_or(Error::InvalidParam)
    }

    fn publish_memory(&mut self) -> Result<()> {
        self.regions.sort_by_key(|r| r.guest_phys);
        let mem = if self.regions.is_empty() {
            GuestMemoryMmap::new()
        } else {
            GuestMemoryMmap::from_arc_regions(
                self.regions
                    .iter()
                    .map(|r| Arc::clone(&r.mapping))
                    .collect(),
            )
            .map_err(|_| Error::InvalidParam)?
        };
        self.mem
            .lock()
            .map_err(|_| invalid("memory lock"))?
            .replace(mem);
        Ok(())
    }

    fn map_region(region: &VhostUserMemoryRegion, file: File) -> Result<Region> {
        let size = usize::try_from(region.memory_size).map_err(|_| Error::InvalidParam)?;
        // A mapping past the end of its file would fault (SIGBUS) when touched.
        let end = region
            .mmap_offset
            .checked_add(region.memory_size)
            .ok_or(Error::InvalidParam)?;
        if !covers(&file, end) {
            return Err(invalid("memory region past the end of its file"));
        }
        let mapping = MmapRegion::from_file(FileOffset::new(file, region.mmap_offset), size)
            .map_err(|e| os(io::Error::other(e.to_string())))?;
        let mapping = GuestRegionMmap::new(mapping, GuestAddress(region.guest_phys_addr))
            .ok_or(Error::InvalidParam)?;
        Ok(Region {
            guest_phys: region.guest_phys_addr,
            size: region.memory_size,
            user_addr: region.user_addr,
            mapping: Arc::new(mapping),
        })
    }

    /// Starts ring `index` if it has all it needs (a kick fd, addresses, memory).
    fn start_ring(&mut self, index: usize) -> Result<()> {
        let event_idx = self.features & (1 << feature::RING_EVENT_IDX) != 0;
        let protocol_features =
            self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        let desc = self.vmm_to_guest(self.vrings[index].desc)?;
        let avail = self.vmm_to_guest(self.vrings[index].avail)?;
        let used = self.vmm_to_guest(self.vrings[index].used)?;
        let v = &mut self.vrings[index];
        let Some(kick) = v.kick.take() else {
            return Ok(());
        };
        let size = if v.size == 0 { MAX_QUEUE_SIZE } else { v.size };
        let mut queue = Queue::new(MAX_QUEUE_SIZE).map_err(|_| Error::InvalidParam)?;
        queue.set_size(size);
        queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        let mem = self.mem.memory();
        if !queue.is_valid(&*mem) {
            return Err(invalid("vring outside guest memory"));
        }
        let used_idx = queue
            .used_idx(&*mem, Ordering::Acquire)
            .map_err(|_| invalid("used ring"))?
            .0;
        let Resume {
            log,
            resubmit,
            next_avail,
        } = Resume::new(self.inflight.as_ref(), index as u16, size, used_idx, v.base);
        queue.set_next_avail(next_avail);
        queue.set_next_used(used_idx);
        drop(mem);
        let shared = match &v.shared {
            Some(s) => Arc::clone(s),
            None => {
                let s = Arc::new(Shared::new(CallFd::default()).map_err(os)?);
                v.shared = Some(Arc::clone(&s));
                s
            }
        };
        shared.stop.store(false, Ordering::Release);
        // Without protocol features a ring is enabled once started (vhost-user.rst).
        shared
            .enabled
            .store(v.enabled || !protocol_features, Ordering::Release);
        let worker = Worker::start(
            Start {
                queue,
                mem: self.mem.clone(),
                kick,
                device: Arc::clone(&self.device.blk),
                log,
                resubmit,
                name: format!("vhost-user-blk q{index}"),
                next_avail: None,
            },
            shared,
        )
        .map_err(os)?;
        v.worker = Some(worker);
        Ok(())
    }

    fn stop_ring(&mut self, index: usize) -> Option<u16> {
        let v = self.vrings.get_mut(index)?;
        let w = v.worker.take()?;
        let queue = w.stop()?;
        v.base = queue.next_avail();
        Some(v.base)
    }

    /// Stops every ring (the frontend went away, or reset the device).
    pub fn stop_all(&mut self) {
        for i in 0..self.vrings.len() {
            self.stop_ring(i);
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop_all();
    }
}

impl VhostUserBackendReqHandlerMut for Backend {
    fn set_owner(&mut self) -> Result<()> {
        if self.owner {
            return Err(invalid("already owned"));
        }
        self.owner = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.stop_all();
        self.owner = false;
        self.features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> Result<()> {
        self.stop_all();
        self.features = 0;
        for v in &mut self.vrings {
            *v = Vring::default();
        }
        Ok(())
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(self.device.features())
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        if features & !self.device.features() != 0 {
            return Err(invalid("feature not offered"));
        }
        self.features = features;
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        if ctx.len() != files.len() {
            return Err(Error::InvalidParam);
        }
        let regions = ctx
            .iter()
            .zip(files)
            .map(|(r, f)| Backend::map_region(r, f))
            .collect::<Result<Vec<_>>>()?;
        self.regions = regions;
        self.publish_memory()?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        if num == 0 || num > u32::from(MAX_QUEUE_SIZE) || !num.is_power_of_two() {
            return Err(Error::InvalidParam);
        }
        self.vring(index)?.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<()> {
        let v = self.vring(index)?;
        v.desc = descriptor;
        v.used = used;
        v.avail = available;
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        let base = u16::try_from(base).map_err(|_| Error::InvalidParam)?;
        self.vring(index)?.base = base;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        let i = index as usize;
        if i >= self.vrings.len() {
            return Err(Error::InvalidParam);
        }
        let base = self.stop_ring(i).unwrap_or(self.vrings[i].base);
        // A stopped ring starts disabled again (vhost-user.rst, "Ring states").
        self.vrings[i].enabled = false;
        self.vrings[i].kick = None;
        Ok(VhostUserVringState::new(index, u32::from(base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let i = usize::from(index);
        if i >= self.vrings.len() {
            return Err(Error::InvalidParam);
        }
        // A kick fd for a running ring replaces it: restart the ring on the new one.
        if self.vrings[i].worker.is_some() {
            self.stop_ring(i);
        }
        let Some(fd) = fd else {
            return Err(invalid("polling rings are not supported"));
        };
        self.vrings[i].kick = Some(fd);
        self.start_ring(i)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let i = usize::from(index);
        let v = self.vrings.get_mut(i).ok_or(Error::InvalidParam)?;
        let shared = match &v.shared {
            Some(s) => Arc::clone(s),
            None => {
                let s = Arc::new(Shared::new(CallFd::default()).map_err(os)?);
                v.shared = Some(Arc::clone(&s));
                s
            }
        };
        shared.transport.set(fd);
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> Result<()> {
        self.vring(u32::from(index)).map(|_| ())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE)
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        self.protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(u64::from(self.device.config.num_queues))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        let v = self.vring(index)?;
        v.enabled = enable;
        if let Some(s) = &v.shared {
            s.enabled.store(enable, Ordering::Release);
            s.wake();
        }
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>> {
        let mut config = self.device.config.clone();
        config.size = self.device.blk.submitter().attachment().size();
        config.writeback = self.device.blk.writeback();
        Ok(read_config(&config.config_space(), offset, size))
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> Result<()> {
        // Only the write-cache byte is the driver's to write.
        if offset != WRITEBACK_OFFSET || buf.len() != 1 {
            return Err(Error::InvalidParam);
        }
        self.device.blk.set_writeback(buf[0] != 0);
        Ok(())
    }

    fn set_backend_req_fd(&mut self, channel: BackendChannel) {
        // The frontend answers our messages when both ends took REPLY_ACK (the spec:
        // "the front-end must respond with zero when operation is successfully completed").
        channel
            .set_reply_ack_flag(self.protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0);
        let submitter = self.device.blk.submitter();
        let sizes = submitter.attachment().watch_size();
        let task = submitter.runtime().spawn(tell_resizes(sizes, channel));
        self.config_change = Some(AbortOnDrop(task));
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        Err(invalid("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        Err(invalid("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> Result<(VhostUserInflight, File)> {
        // As many queues as the frontend asks for, up to the device's own.
        let queues = inflight.num_queues.clamp(1, self.device.config.num_queues);
        let map = InflightMap::create(queues, inflight.queue_size).map_err(os)?;
        let file = map.file().try_clone().map_err(os)?;
        let reply = VhostUserInflight {
            mmap_size: (usize::from(queues) * queue_region_size(inflight.queue_size)) as u64,
            mmap_offset: 0,
            num_queues: queues,
            queue_size: inflight.queue_size,
        };
        self.inflight = Some(Arc::new(map));
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> Result<()> {
        let len = usize::try_from(inflight.mmap_size).map_err(|_| Error::InvalidParam)?;
        let end = inflight
            .mmap_offset
            .checked_add(inflight.mmap_size)
            .ok_or(Error::InvalidParam)?;
        if !covers(&file, end) {
            return Err(invalid("in-flight log past the end of its file"));
        }
        let map = InflightMap::map(
            file,
            inflight.mmap_offset,
            len,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(os)?;
        self.inflight = Some(Arc::new(map));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        if self.regions.len() as u64 >= MAX_MEM_SLOTS {
            return Err(invalid("no free memory slot"));
        }
        let r = Backend::map_region(region, fd)?;
        self.regions.push(r);
        self.publish_memory()?;
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> Result<()> {
        let before = self.regions.len();
        self.regions
            .retain(|r| !(r.guest_phys == region.guest_phys_addr && r.size == region.memory_size));
        if self.regions.len() == before {
            return Err(Error::InvalidParam);
        }
        self.publish_memory()
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        Err(invalid("no device state transfer"))
    }

    fn check_device_state(&mut self) -> Result<()> {
        Err(invalid("no device state transfer"))
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        Err(invalid("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> Result<()> {
        Err(invalid("dirty logging is not supported"))
    }
}

/// Whether `file` reaches `end` bytes (a file that is not a regular one, a device or a
/// hugetlbfs file whose size says nothing, is taken as it is).
fn covers(file: &File, end: u64) -> bool {
    match file.metadata() {
        Ok(m) if m.file_type().is_file() => m.len() >= end,
        Ok(_) => true,
        Err(_) => false,
    }
}
