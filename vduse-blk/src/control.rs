//! The device's life: creating or taking it over, the kernel's control messages, and the
//! queues they start and stop.

use crate::iotlb::Iotlb;
use crate::sys::{self, DevConfig, DevRequest, DevResponse, VqConfig, VqEventfd, VqInfo};
use crate::{open_rw, os_message, Error, Options, Stopped, CONTROL_PATH};
use block_core::Submitter;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use virtio_blk::config::{feature, ConfigSpace, DeviceConfig};
use virtio_blk::inflight::{InflightMap, Resume};
use virtio_blk::worker::{eventfd, Shared, Start, Transport, Worker};
use virtio_blk::BlkDevice;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;
use zerocopy::{FromZeros, IntoBytes};

/// What [`crate::VduseBlk`] keeps of a started device.
#[derive(Debug)]
pub(crate) struct Control {
    name: String,
    control: File,
    stop: File,
    running: Arc<AtomicBool>,
    log_path: Option<PathBuf>,
    device: Mutex<Option<Device>>,
    /// Tells the driver of resizes (see [`tell_resizes`]); ends with the export.
    config_change: AbortOnDrop,
}

/// A task that ends when its handle is dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// After every resize seen on `sizes`: writes the new capacity into the device's config space
/// (`VDUSE_DEV_SET_CONFIG`) and raises the config interrupt (`VDUSE_DEV_INJECT_CONFIG_IRQ`), so
/// that the driver reads it, as QSD's `vduse_blk_resize` does.
///
/// It holds the device file only while it tells: `VDUSE_DESTROY_DEV` is refused (`EBUSY`) while
/// any descriptor of the device is open.
async fn tell_resizes(
    mut sizes: tokio::sync::watch::Receiver<u64>,
    dev: Weak<File>,
    mut config: DeviceConfig,
) {
    while sizes.changed().await.is_ok() {
        let Some(dev) = dev.upgrade() else { return };
        config.size = *sizes.borrow_and_update();
        let space = config.config_space();
        let offset = std::mem::offset_of!(ConfigSpace, capacity);
        let capacity = space.capacity.as_bytes();
        if let Err(e) = sys::set_config(&dev, offset as u32, capacity) {
            tracing::warn!("vduse: VDUSE_DEV_SET_CONFIG: {e}");
            continue;
        }
        // Refused (EINVAL) while no driver runs the device: it reads the config when it binds.
        if let Err(e) = sys::ioctl_none(&dev, sys::DEV_INJECT_CONFIG_IRQ) {
            tracing::debug!("vduse: VDUSE_DEV_INJECT_CONFIG_IRQ: {e}");
        }
    }
}

impl Control {
    /// Creates the device, or opens the one of that name a previous daemon left; returns
    /// whether it was taken over.
    pub(crate) fn open(submitter: Submitter, o: &Options) -> Result<(Control, bool), Error> {
        let control = open_rw(CONTROL_PATH.as_ref(), false).map_err(Error::NoVduse)?;
        let create =
            |e: io::Error, what: &str| Error::Create(format!("{what}: {}", os_message(&e)));
        let mut version = 0u64;
        sys::ioctl(&control, sys::GET_API_VERSION, version.as_mut_bytes())
            .map_err(|e| create(e, "VDUSE_GET_API_VERSION"))?;
        let mut ours = sys::API_VERSION;
        sys::ioctl(&control, sys::SET_API_VERSION, ours.as_mut_bytes())
            .map_err(|e| create(e, "VDUSE_SET_API_VERSION"))?;

        let size = submitter.attachment().size();
        let config = DeviceConfig {
            size,
            logical_block_size: o.logical_block_size as u32,
            optimal_io_size: 0,
            num_queues: o.num_queues,
            queue_size: o.queue_size,
            writable: o.writable,
            writeback: !o.writethrough,
            serial: o.serial.clone(),
        };
        // VDUSE takes no writable config space (no CONFIG_WCE: Linux then sees a write-back
        // cache because FLUSH is offered), and QSD offers MQ only for several queues.
        let mut features = config.features() & !(1 << feature::CONFIG_WCE);
        if o.num_queues == 1 {
            features &= !(1 << feature::MQ);
        }
        features |= sys::F_ACCESS_PLATFORM;
        let space = config.config_space();
        let space = space.as_bytes();
        let name = sys::name_bytes(&o.name).ok_or_else(|| Error::Invalid("name".into()))?;
        let mut dc = DevConfig::new_zeroed();
        dc.name = name;
        dc.device_id = sys::VIRTIO_ID_BLOCK;
        dc.features = features;
        dc.vq_num = u32::from(o.num_queues);
        dc.vq_align = 4096;
        dc.config_size = space.len() as u32;
        let took_over = match sys::create_dev(&control, &dc, space) {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => true,
            Err(e) => return Err(create(e, "VDUSE_CREATE_DEV")),
        };
        let destroy_new = |control: &File| {
            if !took_over {
                let mut n = name;
                let _ = sys::ioctl(control, sys::DESTROY_DEV, &mut n);
            }
        };
        let path = PathBuf::from(format!("/dev/vduse/{}", o.name));
        let dev = match open_rw(&path, true) {
            Ok(f) => Arc::new(f),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(Error::Busy(o.name.clone()))
            }
            Err(e) => {
                destroy_new(&control);
                return Err(create(e, &path.display().to_string()));
            }
        };
        for index in 0..u32::from(o.num_queues) {
            let mut vc = VqConfig {
                index,
                max_size: o.queue_size,
                ..VqConfig::default()
            };
            if let Err(e) = sys::ioctl(&dev, sys::VQ_SETUP, vc.as_mut_bytes()) {
                drop(dev);
                destroy_new(&control);
                return Err(create(e, "VDUSE_VQ_SETUP"));
            }
        }
        let log = match &o.reconnect_log {
            None => None,
            Some(p) => match InflightMap::open(p, o.num_queues, o.queue_size) {
                Ok(m) => {
                    // A new device owes nothing: whatever the file held is another's.
                    if !took_over {
                        m.clear();
                    }
                    Some(Arc::new(m))
                }
                Err(e) => {
                    drop(dev);
                    destroy_new(&control);
                    return Err(Error::Create(format!(
                        "failed to set reconnect log file {}: {}",
                        p.display(),
                        os_message(&e)
                    )));
                }
            },
        };
        let config_change = AbortOnDrop(submitter.runtime().spawn(tell_resizes(
            submitter.attachment().watch_size(),
            Arc::downgrade(&dev),
            config.clone(),
        )));
        let running = Arc::new(AtomicBool::new(false));
        let mut device = Device {
            iotlb: Arc::new(Iotlb::new(Arc::clone(&dev))),
            dev,
            blk: Arc::new(BlkDevice::new(submitter, &config)),
            log,
            queue_size: o.queue_size,
            vqs: (0..o.num_queues).map(|_| Vq::default()).collect(),
            running: Arc::clone(&running),
        };
        if took_over {
            // The driver has the device running already: no SET_STATUS will come.
            device.start_dataplane();
        }
        let stop = eventfd().map_err(|e| create(e, "eventfd"))?;
        Ok((
            Control {
                name: o.name.clone(),
                control,
                stop,
                running,
                log_path: o.reconnect_log.clone(),
                device: Mutex::new(Some(device)),
                config_change,
            },
            took_over,
        ))
    }

    /// Starts the thread that serves the kernel's messages.
    pub(crate) fn spawn(&self) -> io::Result<JoinHandle<()>> {
        let device = self
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| io::Error::other("already started"))?;
        let stop = self.stop.try_clone()?;
        std::thread::Builder::new()
            .name(format!("vduse-blk {}", self.name))
            .spawn(move || device.run(&stop))
    }

    pub(crate) fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    pub(crate) fn request_stop(&self) {
        let _ = (&self.stop).write(&1u64.to_ne_bytes());
    }

    /// Once the thread is gone (and with it the device file): destroys the device unless it
    /// is still bound.
    pub(crate) fn close(self) -> Stopped {
        drop(self.config_change);
        drop(self.device.lock().unwrap_or_else(|e| e.into_inner()).take());
        let Some(mut name) = sys::name_bytes(&self.name) else {
            return Stopped::Destroyed;
        };
        match sys::ioctl(&self.control, sys::DESTROY_DEV, &mut name) {
            Ok(_) => {
                if let Some(p) = &self.log_path {
                    let _ = std::fs::remove_file(p);
                }
                Stopped::Destroyed
            }
            Err(e) => {
                if e.raw_os_error() != Some(libc::EBUSY) {
                    tracing::warn!("vduse: destroying device '{}': {e}", self.name);
                }
                tracing::info!(
                    "vduse: device '{}' is still bound: it stays, its I/O waiting for a \
                     daemon that exports it again",
                    self.name
                );
                Stopped::StillBound
            }
        }
    }
}

/// How a queue tells the driver about used buffers, and finds memory it missed.
struct VqTransport {
    dev: Arc<File>,
    index: u32,
    iotlb: Arc<Iotlb>,
}

impl Transport for VqTransport {
    fn notify(&self) {
        let mut index = self.index;
        if let Err(e) = sys::ioctl(&self.dev, sys::VQ_INJECT_IRQ, index.as_mut_bytes()) {
            tracing::warn!("vduse: VDUSE_VQ_INJECT_IRQ {}: {e}", self.index);
        }
    }

    fn refresh_memory(&self) -> bool {
        self.iotlb.refresh().unwrap_or_else(|e| {
            tracing::warn!("vduse: reading the IOTLB: {e}");
            false
        })
    }
}

#[derive(Default)]
struct Vq {
    worker: Option<Worker<VqTransport>>,
    next_avail: Arc<AtomicU16>,
}

/// The device file and everything its messages act on (owned by the control thread).
struct Device {
    dev: Arc<File>,
    blk: Arc<BlkDevice>,
    iotlb: Arc<Iotlb>,
    log: Option<Arc<InflightMap>>,
    queue_size: u16,
    vqs: Vec<Vq>,
    running: Arc<AtomicBool>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("queues", &self.vqs.len())
            .finish_non_exhaustive()
    }
}

impl Device {
    fn run(mut self, stop: &File) {
        let mut fds = [
            libc::pollfd {
                fd: self.dev.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            for f in fds.iter_mut() {
                f.revents = 0;
            }
            // SAFETY: two valid pollfds for the duration of the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::warn!("vduse: poll: {e}");
                break;
            }
            if fds[1].revents != 0 {
                break;
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                tracing::warn!("vduse: the device file was closed under us");
                break;
            }
            if fds[0].revents != 0 && !self.serve_messages() {
                break;
            }
        }
        // Requests taken are completed before the device file closes; what the driver makes
        // available from now on waits for the next daemon.
        self.stop_dataplane(false);
    }

    /// Answers every message waiting; false if the device file failed.
    fn serve_messages(&mut self) -> bool {
        loop {
            let mut req = DevRequest::new_zeroed();
            match (&*self.dev).read(req.as_mut_bytes()) {
                Ok(n) if n == std::mem::size_of::<DevRequest>() => {}
                Ok(n) => {
                    tracing::warn!("vduse: short message ({n} bytes)");
                    return false;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vduse: reading a message: {e}");
                    return false;
                }
            }
            let resp = self.handle(&req);
            if let Err(e) = (&*self.dev).write_all(resp.as_bytes()) {
                tracing::warn!("vduse: answering message {}: {e}", req.request_id);
                return false;
            }
        }
    }

    fn handle(&mut self, req: &DevRequest) -> DevResponse {
        match req.kind {
            sys::REQ_SET_STATUS => {
                let status = req.status();
                if status & sys::S_DRIVER_OK != 0 {
                    self.start_dataplane();
                } else if status == 0 {
                    self.stop_dataplane(true);
                }
                DevResponse::to(req, sys::RESULT_OK)
            }
            sys::REQ_UPDATE_IOTLB => {
                let (start, last) = req.iova();
                match self.iotlb.invalidate(start, last) {
                    Ok(()) => DevResponse::to(req, sys::RESULT_OK),
                    Err(e) => {
                        tracing::warn!("vduse: IOTLB update {start:#x}-{last:#x}: {e}");
                        DevResponse::to(req, sys::RESULT_FAILED)
                    }
                }
            }
            sys::REQ_GET_VQ_STATE => {
                let index = req.vq_index();
                match self.vqs.get(index as usize) {
                    Some(vq) => {
                        let mut r = DevResponse::to(req, sys::RESULT_OK);
                        r.vq_index = index;
                        r.avail_index = vq.next_avail.load(Ordering::Acquire);
                        r
                    }
                    None => DevResponse::to(req, sys::RESULT_FAILED),
                }
            }
            _ => DevResponse::to(req, sys::RESULT_FAILED),
        }
    }

    /// `DRIVER_OK`: starts every queue the driver made ready that is not running.
    fn start_dataplane(&mut self) {
        let mut features = 0u64;
        if let Err(e) = sys::ioctl(&self.dev, sys::DEV_GET_FEATURES, features.as_mut_bytes()) {
            tracing::warn!("vduse: VDUSE_DEV_GET_FEATURES: {e}");
            return;
        }
        if features & sys::F_VERSION_1 == 0 {
            tracing::warn!("vduse: the driver did not accept VIRTIO_F_VERSION_1");
            return;
        }
        let event_idx = features & (1 << feature::RING_EVENT_IDX) != 0;
        if let Err(e) = self.iotlb.refresh() {
            tracing::warn!("vduse: reading the IOTLB: {e}");
        }
        for index in 0..self.vqs.len() {
            if self.vqs[index].worker.is_none() {
                if let Err(e) = self.start_queue(index, event_idx) {
                    tracing::warn!("vduse: starting queue {index}: {e}");
                }
            }
        }
        let any = self.vqs.iter().any(|v| v.worker.is_some());
        self.running.store(any, Ordering::Release);
    }

    fn start_queue(&mut self, index: usize, event_idx: bool) -> io::Result<()> {
        let mut info = VqInfo {
            index: index as u32,
            ..VqInfo::default()
        };
        sys::ioctl(&self.dev, sys::VQ_GET_INFO, info.as_mut_bytes())?;
        if info.ready == 0 {
            return Ok(());
        }
        let num = u16::try_from(info.num)
            .ok()
            .filter(|n| *n > 0 && *n <= self.queue_size && n.is_power_of_two())
            .ok_or_else(|| io::Error::other(format!("ring size {}", info.num)))?;
        let mut queue = Queue::new(self.queue_size).map_err(|e| io::Error::other(e.to_string()))?;
        queue.set_size(num);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(info.desc_addr);
        queue.set_desc_table_address(lo, hi);
        let (lo, hi) = split(info.driver_addr);
        queue.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(info.device_addr);
        queue.set_used_ring_address(lo, hi);
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        let mut mem = self.iotlb.memory().memory();
        if !queue.is_valid(&*mem) {
            self.iotlb.refresh()?;
            mem = self.iotlb.memory().memory();
            if !queue.is_valid(&*mem) {
                return Err(io::Error::other("the ring is not in the IOTLB"));
            }
        }
        let used_idx = queue
            .used_idx(&*mem, Ordering::Acquire)
            .map_err(|e| io::Error::other(e.to_string()))?
            .0;
        drop(mem);
        let Resume {
            log,
            resubmit,
            next_avail,
        } = Resume::new(
            self.log.as_ref(),
            index as u16,
            num,
            used_idx,
            info.state[0],
        );
        queue.set_next_avail(next_avail);
        queue.set_next_used(used_idx);
        let kick = eventfd()?;
        let mut ke = VqEventfd {
            index: index as u32,
            fd: kick.as_raw_fd(),
        };
        sys::ioctl(&self.dev, sys::VQ_SETUP_KICKFD, ke.as_mut_bytes())?;
        let shared = Arc::new(Shared::new(VqTransport {
            dev: Arc::clone(&self.dev),
            index: index as u32,
            iotlb: Arc::clone(&self.iotlb),
        })?);
        shared.enabled.store(true, Ordering::Release);
        let vq = &mut self.vqs[index];
        vq.next_avail.store(next_avail, Ordering::Release);
        let worker = Worker::start(
            Start {
                queue,
                mem: self.iotlb.memory(),
                kick: kick.try_clone()?,
                device: Arc::clone(&self.blk),
                log,
                resubmit,
                name: format!("vduse-blk q{index}"),
                next_avail: Some(Arc::clone(&vq.next_avail)),
            },
            shared,
        )?;
        vq.worker = Some(worker);
        // A kick the driver made before the eventfd was assigned (a daemon taking over).
        let _ = (&kick).write(&1u64.to_ne_bytes());
        Ok(())
    }

    /// Stops every queue once its requests are done. `reset`: the driver reset the device,
    /// which then owes nothing and maps nothing.
    fn stop_dataplane(&mut self, reset: bool) {
        for (index, vq) in self.vqs.iter_mut().enumerate() {
            let Some(w) = vq.worker.take() else {
                continue;
            };
            if let Some(q) = w.stop() {
                vq.next_avail.store(q.next_avail(), Ordering::Release);
            }
            let mut ke = VqEventfd {
                index: index as u32,
                fd: sys::EVENTFD_DEASSIGN,
            };
            let _ = sys::ioctl(&self.dev, sys::VQ_SETUP_KICKFD, ke.as_mut_bytes());
        }
        if reset {
            for vq in &self.vqs {
                vq.next_avail.store(0, Ordering::Release);
            }
            if let Some(l) = &self.log {
                l.clear();
            }
            self.iotlb.clear();
        }
        self.running.store(false, Ordering::Release);
    }
}
