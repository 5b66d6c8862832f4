//! The device model without any transport: a driver's side played in-process on
//! `virtio-queue`'s mock split queue, one read request against an image file.
//!
//! `cargo run -p virtio-blk --example one_request -- IMAGE`
//!
//! A real transport (vhost-user-blk, VDUSE) does the same three things: `process_queue` when
//! the driver kicks, `complete` when `completion_fd()` is readable, and an interrupt to the
//! driver when `complete` returns true.

use block_core::{open, NodeGraph, Submitter};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use virtio_blk::request::kind;
use virtio_blk::{BlkDevice, DeviceConfig, NoLog, QueueHandler, Status};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QUEUE_SIZE: u16 = 16;
const HEADER: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const NEXT: u16 = 1;
const WRITE: u16 = 2;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let image = std::env::args().nth(1).ok_or("usage: one_request IMAGE")?;
    let runtime = tokio::runtime::Runtime::new()?;
    let graph = NodeGraph::new();
    let node = runtime.block_on(open::blockdev_add(
        &graph,
        block_core::BlockdevOptions::from_json(
            serde_json::json!({"driver": "file", "node-name": "disk0", "filename": image}),
        )?,
    ))?;
    let config = DeviceConfig {
        size: node.size(),
        logical_block_size: 512,
        optimal_io_size: 0,
        num_queues: 1,
        queue_size: QUEUE_SIZE,
        writable: false,
        writeback: true,
        serial: Some("example".into()),
    };
    let submitter = Submitter::new(node.attach("example", false)?, runtime.handle().clone());
    let device = Arc::new(BlkDevice::new(submitter, &config));
    let mut handler = QueueHandler::new(device)?;

    // The driver's side: guest memory, a queue, and a chain of three buffers: the request
    // header (read sector 0), 4 KiB for the data, one status byte.
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(
        GuestAddress(0),
        1 << 20,
    )])?);
    let mock = MockSplitQueue::new(&*mem, QUEUE_SIZE);
    let mut queue: Queue = mock.create_queue()?;
    queue.set_event_idx(false);
    let mut header = kind::IN.to_le_bytes().to_vec();
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&0u64.to_le_bytes());
    mem.write_slice(&header, GuestAddress(HEADER))?;
    let chain = [
        (HEADER, 16, NEXT),
        (DATA, 4096, WRITE | NEXT),
        (STATUS, 1, WRITE),
    ];
    for (i, (addr, len, flags)) in chain.into_iter().enumerate() {
        let d = RawDescriptor::from(Descriptor::new(addr, len, flags, i as u16 + 1));
        mem.write_obj(d, GuestAddress(mock.desc_table_addr().0 + 16 * i as u64))?;
    }
    let avail = mock.avail_addr().0;
    mem.write_obj(0u16, GuestAddress(avail + 4))?; // ring[0]: the chain's head
    mem.write_obj(1u16, GuestAddress(avail + 2))?; // idx

    // The device's side: take the request, wait for its completion, put it in the used ring.
    handler.process_queue(&mut queue, &mem, &mut NoLog)?;
    while !handler.complete(&mut queue, &mut NoLog)? {
        let mut pfd = libc::pollfd {
            fd: handler.completion_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, -1) };
    }
    let used_len: u32 = mem.read_obj(GuestAddress(mock.used_addr().0 + 8))?;
    let status: u8 = mem.read_obj(GuestAddress(STATUS))?;
    let mut data = vec![0u8; 16];
    mem.read_slice(&mut data, GuestAddress(DATA))?;
    println!(
        "status {status} ({}), {used_len} bytes written by the device, data begins {data:02x?}",
        if status == Status::Ok as u8 {
            "OK"
        } else {
            "error"
        }
    );
    Ok(())
}
