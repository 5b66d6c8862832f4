//! A descriptor table, an available ring and guest memory made of the input: the chain walk
//! and request parsing keep their invariants, and a queue handler over a `null-co` node
//! answers every chain it can without writing a byte of guest memory outside the chain's
//! device-writable buffers and the used ring, and never claims more bytes written than the
//! chain offered.
//!
//! Input: `[size/device] [heads-1] heads (u16 each) | main table descriptors | indirect
//! table: count, descriptors | chunks of memory: offset (u16), length (u8), bytes`. A
//! descriptor is a tag byte (how its address and length are coded) and those fields, then
//! flags (u8) and next (u8). Missing bytes read as zero.
#![no_main]

use block_core::drivers::null::NullDriver;
use block_core::{BlockDriver, Node, Submitter};
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};
use virtio_blk::chain::{walk, Segment};
use virtio_blk::config::DeviceConfig;
use virtio_blk::request::{parse, Action, Limits};
use virtio_blk::{BlkDevice, NoLog, QueueHandler};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const TABLE: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const USED_END: u64 = USED + 4 + 8 * 256 + 2;
const DATA: u64 = 0x3000;
const INDIRECT: u64 = 0x8000;
/// A second region after a hole.
const HIGH: u64 = 0x2_0000;
const REGIONS: [(u64, u64); 2] = [(0, 0x1_0000), (HIGH, 0x1_0000)];
const SIZE: u64 = 1 << 20;

struct State {
    _runtime: tokio::runtime::Runtime,
    /// Writable and read-only, with 512 B and 4 KiB logical blocks.
    devices: Vec<Arc<BlkDevice>>,
}

fn state() -> &'static State {
    static STATE: OnceLock<State> = OnceLock::new();
    STATE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .expect("runtime");
        let mut devices = Vec::new();
        for writable in [true, false] {
            for lbs in [512, 4096] {
                let driver = NullDriver::new(SIZE, true, !writable, 0);
                let node = Node::new("null", Arc::new(driver) as Arc<dyn BlockDriver>, Vec::new());
                let att = node.attach("fuzz", writable).expect("attach");
                let config = DeviceConfig {
                    size: SIZE,
                    logical_block_size: lbs,
                    optimal_io_size: 0,
                    num_queues: 1,
                    queue_size: 256,
                    writable,
                    writeback: true,
                    serial: Some("fuzz".into()),
                };
                let submitter = Submitter::new(att, runtime.handle().clone());
                devices.push(Arc::new(BlkDevice::new(submitter, &config)));
            }
        }
        State {
            _runtime: runtime,
            devices,
        }
    })
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }

    /// A descriptor, as the 16 bytes of the table.
    fn desc(&mut self) -> [u8; 16] {
        let tag = self.u8();
        let addr = match tag & 3 {
            0 => DATA + u64::from(self.u16()),
            1 => INDIRECT + 16 * u64::from(self.u8()),
            2 => HIGH + u64::from(self.u16()),
            _ => u64::from_le_bytes(self.bytes()),
        };
        let len = match (tag >> 2) & 3 {
            0 => u32::from(self.u8()),
            1 => u32::from(self.u16()),
            2 => u32::from_le_bytes(self.bytes()),
            _ => 16 * u32::from(self.u8()),
        };
        let flags = u16::from(self.u8()) | if tag & 0x80 != 0 { 0xff00 } else { 0 };
        let next = u16::from(self.u8());
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        raw
    }
}

fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut out = Vec::new();
    for (at, len) in REGIONS {
        let mut b = vec![0u8; len as usize];
        mem.read_slice(&mut b, GuestAddress(at)).expect("region");
        out.extend(b);
    }
    out
}

/// The guest address of byte `i` of a snapshot.
fn address_of(i: usize) -> u64 {
    let (mut i, mut r) = (i as u64, 0);
    while i >= REGIONS[r].1 {
        i -= REGIONS[r].1;
        r += 1;
    }
    REGIONS[r].0 + i
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// The walk's and the parser's invariants for one chain; returns the chain's device-writable
/// buffers and its parse, if it has them.
fn check_chain(
    mem: &GuestMemoryMmap,
    queue_size: u16,
    head: u16,
    limits: &Limits,
) -> Option<(Vec<Segment>, Option<virtio_blk::request::Parsed>)> {
    let mut segs = Vec::new();
    walk(mem, GuestAddress(TABLE), queue_size, head, &mut segs).ok()?;
    assert!(segs.len() <= usize::from(queue_size) + 65535);
    assert!(segs.iter().all(|s| s.len > 0));
    let split = segs.iter().position(|s| s.write).unwrap_or(segs.len());
    assert!(
        segs[split..].iter().all(|s| s.write),
        "readable after writable"
    );
    assert!(total(&segs) <= u64::from(u32::MAX));
    assert!(segs
        .iter()
        .all(|s| s.addr.0.checked_add(u64::from(s.len)).is_some()));
    let writable = segs[split..].to_vec();
    let parsed = parse(mem, &segs, limits).ok();
    match &parsed {
        None => assert!(segs.last().is_none_or(|s| !s.write)),
        Some(p) => {
            let last = segs.last().expect("a status byte");
            assert_eq!(p.status.0, last.addr.0 + u64::from(last.len) - 1);
            let check_range = |offset: u64, len: u64| {
                assert_eq!(offset % u64::from(limits.logical_block_size), 0);
                assert_eq!(len % 512, 0);
                assert!(offset
                    .checked_add(len)
                    .is_some_and(|end| end <= limits.size));
            };
            match &p.action {
                Action::Read { offset, data, len } | Action::Write { offset, data, len } => {
                    let write = matches!(p.action, Action::Write { .. });
                    assert!(!write || limits.writable);
                    check_range(*offset, *len);
                    assert_eq!(total(data), *len);
                    assert!(data.len() as u64 <= u64::from(limits.seg_max));
                    assert!(data.iter().all(|s| s.write != write));
                    if !write {
                        assert_eq!(*len, total(&writable) - 1, "all but the status byte");
                    }
                }
                Action::Discard { offset, len } | Action::WriteZeroes { offset, len, .. } => {
                    assert!(limits.writable);
                    check_range(*offset, *len);
                }
                Action::GetId { data } => assert_eq!(total(data), total(&writable) - 1),
                Action::Flush | Action::Done(_) => {}
            }
        }
    }
    Some((writable, parsed))
}

fuzz_target!(|data: &[u8]| {
    let state = state();
    let mut input = Input(data);
    let b0 = input.u8();
    let queue_size = 1u16 << (b0 & 7);
    let device = &state.devices[usize::from((b0 >> 3) & 3)];
    let heads: Vec<u16> = (0..1 + (input.u8() & 3)).map(|_| input.u16()).collect();

    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|&(at, len)| (GuestAddress(at), len as usize))
        .collect();
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&ranges).expect("memory"));
    for i in 0..u64::from(queue_size) {
        if input.0.is_empty() {
            break;
        }
        let d = input.desc();
        mem.write_slice(&d, GuestAddress(TABLE + 16 * i))
            .expect("table");
    }
    for i in 0..u64::from(input.u8()) {
        let d = input.desc();
        mem.write_slice(&d, GuestAddress(INDIRECT + 16 * i))
            .expect("indirect table");
    }
    while !input.0.is_empty() {
        let at = DATA + u64::from(input.u16());
        let len = usize::from(input.u8()).min(input.0.len());
        let _ = mem.write_slice(&input.0[..len], GuestAddress(at));
        input.0 = &input.0[len..];
    }

    let mut queue = Queue::new(256).expect("queue");
    queue.set_size(queue_size);
    queue.set_desc_table_address(Some(TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_event_idx(false);
    queue.set_ready(true);
    let mut handler = QueueHandler::<GuestMemoryMmap>::new(device.clone()).expect("handler");
    let limits = Limits {
        size: SIZE,
        logical_block_size: if (b0 >> 3) & 1 == 0 { 512 } else { 4096 },
        seg_max: 254,
        writable: (b0 >> 4) & 1 == 0,
    };

    let mut used_idx = 0u16;
    for (n, &head) in heads.iter().enumerate() {
        // What this chain is (against memory as it is now: earlier requests may have written
        // into tables), then the handler serves it alone.
        let chain = check_chain(&mem, queue_size, head, &limits);
        let slot = AVAIL + 4 + 2 * (n as u64 % u64::from(queue_size));
        mem.write_obj(head, GuestAddress(slot)).expect("avail ring");
        mem.write_obj(n as u16 + 1, GuestAddress(AVAIL + 2))
            .expect("avail idx");
        let before = snapshot(&mem);
        handler
            .process_queue(&mut queue, &mem, &mut NoLog)
            .expect("process");
        handler.drain(&mut queue, &mut NoLog).expect("drain");
        assert_eq!(handler.in_flight(), 0);
        let after = snapshot(&mem);

        let idx: u16 = mem.read_obj(GuestAddress(USED + 2)).expect("used idx");
        let answered = head < queue_size;
        assert_eq!(
            idx,
            used_idx + u16::from(answered),
            "one used entry per chain"
        );
        let writable = chain.as_ref().map(|c| c.0.clone()).unwrap_or_default();
        if answered {
            let e = USED + 4 + 8 * u64::from(used_idx % queue_size);
            let id: u32 = mem.read_obj(GuestAddress(e)).expect("used id");
            let len: u32 = mem.read_obj(GuestAddress(e + 4)).expect("used len");
            assert_eq!(id, u32::from(head));
            assert!(
                u64::from(len) <= total(&writable),
                "used len {len} beyond the chain"
            );
            if !matches!(chain, Some((_, Some(_)))) {
                assert_eq!(len, 0, "a refused chain has nothing written");
            }
        }
        used_idx = idx;
        // Chunk by chunk first: a loop over every byte, instrumented, would be most of the
        // run time.
        let changed = before
            .chunks(64)
            .zip(after.chunks(64))
            .enumerate()
            .filter(|(_, (b, a))| b != a)
            .flat_map(|(c, (b, a))| {
                (0..b.len())
                    .filter(move |&j| b[j] != a[j])
                    .map(move |j| 64 * c + j)
            });
        for i in changed {
            let at = address_of(i);
            let in_writable = writable
                .iter()
                .any(|s| s.addr.0 <= at && at - s.addr.0 < u64::from(s.len));
            assert!(
                (USED..USED_END).contains(&at)
                    || (in_writable && chain.as_ref().is_some_and(|c| c.1.is_some())),
                "guest memory at {at:#x} written outside the chain's writable buffers"
            );
        }
        if let Some((_, Some(p))) = &chain {
            let at = p.status.0;
            let held = REGIONS.iter().any(|&(r, len)| (r..r + len).contains(&at));
            if held && !(USED..USED_END).contains(&at) {
                let s: u8 = mem.read_obj(p.status).expect("status");
                match p.action {
                    Action::Done(want) => assert_eq!(s, want as u8),
                    _ => assert!(s <= 2, "status {s}"),
                }
            }
        }
    }
});
