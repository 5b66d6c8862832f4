//! The rig the queue tests share: a `QueueHandler` on `virtio-queue`'s mock split queue in
//! 16 MiB of guest memory, against a real `file` node over a 1 MiB image.
#![allow(dead_code)]

use block_core::drivers::file::{FileDriver, FileOptions, Locking};
use block_core::{BlockDriver, Node, Submitter};
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_blk::config::DeviceConfig;
use virtio_blk::{BlkDevice, NoLog, QueueHandler};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const QSIZE: u16 = 256;
pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;
pub const INDIRECT: u16 = 4;
pub const IMAGE: u64 = 1 << 20;
pub const HEADERS: u64 = 0x10_0000;
pub const STATUS: u64 = 0x20_0000;
pub const DATA: u64 = 0x30_0000;
pub const TABLES: u64 = 0x80_0000;

pub struct Rig {
    pub mem: Arc<GuestMemoryMmap>,
    queue: Queue,
    handler: QueueHandler<GuestMemoryMmap>,
    pub node: Arc<Node>,
    _dir: tempfile::TempDir,
    _runtime: tokio::runtime::Runtime,
    path: std::path::PathBuf,
    next_desc: u16,
    avail: u16,
    avail_addr: u64,
    used_addr: u64,
    used_seen: u16,
}

impl Rig {
    pub fn new(writable: bool, lbs: u32) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        let image: Vec<u8> = (0..IMAGE).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &image).expect("image");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let driver = FileDriver::open(&FileOptions {
            filename: path.clone(),
            locking: Locking::Off,
            read_only: !writable,
            ..FileOptions::default()
        })
        .expect("open");
        let node = Node::new("disk", Arc::new(driver) as Arc<dyn BlockDriver>, Vec::new());
        let att = node.attach("test", writable).expect("attach");
        let config = DeviceConfig {
            size: IMAGE,
            logical_block_size: lbs,
            optimal_io_size: 0,
            num_queues: 1,
            queue_size: QSIZE,
            writable,
            writeback: true,
            serial: Some("serial-0123456789-abcdef".into()),
        };
        let device = Arc::new(BlkDevice::new(
            Submitter::new(att, runtime.handle().clone()),
            &config,
        ));
        // Two regions, so that a test can offer a map without the data buffers.
        let mem = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[
                (GuestAddress(0), DATA as usize),
                (GuestAddress(DATA), (16 << 20) - DATA as usize),
            ])
            .expect("memory"),
        );
        let mock = MockSplitQueue::new(&*mem, QSIZE);
        let mut queue: Queue = mock.create_queue().expect("queue");
        let (avail_addr, used_addr) = (mock.avail_addr().0, mock.used_addr().0);
        virtio_queue::QueueT::set_event_idx(&mut queue, false);
        Rig {
            handler: QueueHandler::new(device).expect("handler"),
            mem,
            queue,
            node,
            _dir: dir,
            _runtime: runtime,
            path,
            next_desc: 0,
            avail: 0,
            avail_addr,
            used_addr,
            used_seen: 0,
        }
    }

    pub fn desc(&self, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        self.mem
            .write_obj(d, GuestAddress(table + 16 * u64::from(index)))
            .expect("descriptor");
    }

    /// Puts a chain of `(addr, len, flags)` in the table and makes it available; returns its
    /// head. NEXT flags are set here.
    pub fn chain(&mut self, bufs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
            let index = (head + i as u16) % QSIZE;
            let last = i + 1 == bufs.len();
            let flags = if last { flags } else { flags | NEXT };
            self.desc(0, index, addr, len, flags, (index + 1) % QSIZE);
        }
        self.next_desc = (head + bufs.len() as u16) % QSIZE;
        self.offer(head);
        head
    }

    pub fn offer(&mut self, head: u16) {
        let avail = self.avail_addr;
        let slot = avail + 4 + 2 * u64::from(self.avail % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).expect("ring");
        self.avail = self.avail.wrapping_add(1);
        self.mem
            .write_obj(self.avail, GuestAddress(avail + 2))
            .expect("idx");
    }

    pub fn header(&self, at: u64, ty: u32, sector: u64) {
        let mut h = ty.to_le_bytes().to_vec();
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(at)).expect("header");
    }

    /// Kicks and waits for `n` used entries; returns them as (head, len). Checks that the
    /// handler asked for a notification of every entry it put in the used ring (the mock
    /// driver never suppresses them): a driver waits for its interrupt, not for the ring.
    pub fn run(&mut self, n: usize) -> Vec<(u16, u32)> {
        self.handler
            .process_queue(&mut self.queue, &self.mem, &mut NoLog)
            .expect("process");
        self.wait_used(n)
    }

    /// The same memory without the region the data buffers are in (a VDUSE IOTLB before the
    /// driver has mapped them).
    pub fn without_data(&self) -> Arc<GuestMemoryMmap> {
        let (partial, _) = self
            .mem
            .remove_region(GuestAddress(DATA), (16 << 20) - DATA)
            .expect("the data region");
        Arc::new(partial)
    }

    /// As [`run`](Self::run), on `mem`, with `refresh` giving the handler a newer map when a
    /// chain misses; returns the entries and the map the handler ended on.
    pub fn run_on(
        &mut self,
        mem: Arc<GuestMemoryMmap>,
        refresh: &mut dyn FnMut() -> Option<Arc<GuestMemoryMmap>>,
        n: usize,
    ) -> (Vec<(u16, u32)>, Arc<GuestMemoryMmap>) {
        let mut mem = mem;
        self.handler
            .process_queue_with(&mut self.queue, &mut mem, &mut NoLog, refresh)
            .expect("process");
        (self.wait_used(n), mem)
    }

    fn wait_used(&mut self, n: usize) -> Vec<(u16, u32)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        loop {
            let notify = self
                .handler
                .complete(&mut self.queue, &mut NoLog)
                .expect("complete");
            let used = self.take_used();
            assert_eq!(
                notify,
                !used.is_empty(),
                "a notification exactly when entries were used: {used:?}"
            );
            out.extend(used);
            if out.len() >= n {
                assert_eq!(out.len(), n, "more used entries than requests");
                return out;
            }
            assert!(Instant::now() < deadline, "requests never completed");
            let fd = self.handler.completion_fd();
            let mut pfd = libc_pollfd(fd);
            // SAFETY: one valid pollfd for the call.
            unsafe { libc::poll(&mut pfd, 1, 100) };
        }
    }

    pub fn take_used(&mut self) -> Vec<(u16, u32)> {
        let used = self.used_addr;
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).expect("used idx");
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = used + 4 + 8 * u64::from(self.used_seen % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).expect("id");
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).expect("len");
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    pub fn status(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).expect("status")
    }

    pub fn image(&self) -> Vec<u8> {
        std::fs::read(&self.path).expect("read image")
    }
}

fn libc_pollfd(fd: std::os::fd::BorrowedFd<'_>) -> libc::pollfd {
    use std::os::fd::AsRawFd;
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }
}
