//! Property tests: the chain walk over arbitrary descriptor tables (against a model that
//! follows the spec's rules with visited sets), request parsing over arbitrary chains (against
//! an oracle of what is valid), and the queue handler over random reads and writes, many in
//! flight at once, against a model of the image.

mod common;

use common::*;
use proptest::prelude::*;
use proptest::sample::Index;
use std::collections::{HashMap, HashSet};
use virtio_blk::chain::{walk, Segment};
use virtio_blk::config::{MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS};
use virtio_blk::request::{kind, parse, Action, Limits, Refused};
use virtio_blk::Status;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MIB: u64 = 1 << 20;
/// Guest memory of the walk and parse tests: two adjacent regions, a hole, a third region.
const REGIONS: [(u64, u64); 3] = [(0, MIB), (MIB, MIB), (3 * MIB, MIB)];
const MEM_END: u64 = 4 * MIB;

fn guest_memory() -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|&(at, len)| (GuestAddress(at), len as usize))
        .collect();
    GuestMemoryMmap::<()>::from_ranges(&ranges).expect("memory")
}

/// Whether guest memory holds every byte of `[addr, addr + len)`.
fn in_memory(addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    // The first two regions are contiguous.
    (end <= 2 * MIB) || (addr >= 3 * MIB && end <= MEM_END)
}

// ---- chain::walk ----

#[derive(Debug, Clone)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
    /// For an indirect descriptor: point it at this generated indirect table (if any).
    aim: Option<Index>,
}

#[derive(Debug, Clone)]
struct Table {
    at: u64,
    descs: Vec<Desc>,
    /// Indices linked into one chain (NEXT set, `next` pointing on, the last without NEXT),
    /// when `tidy`; readable before writable from `write_from` on.
    path: Vec<usize>,
    write_from: usize,
    tidy: bool,
}

#[derive(Debug, Clone)]
struct Scenario {
    queue_size: u16,
    head: u16,
    /// Start at the main table's linked path (when it has one).
    head_on_path: bool,
    main: Table,
    indirect: Vec<Table>,
}

fn addr_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 0..MEM_END + 0x1000,
        1 => (u64::MAX - 0x2_0000)..=u64::MAX,
        1 => any::<u64>(),
    ]
}

fn table_addr_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => (0..MEM_END / 16).prop_map(|i| i * 16),
        // Across the boundary of the two adjacent regions, or running into the hole.
        2 => (0..4096u64).prop_map(|i| MIB - 2048 + i),
        2 => (0..4096u64).prop_map(|i| 2 * MIB - 2048 + i),
        1 => any::<u64>(),
    ]
}

fn desc_strategy() -> impl Strategy<Value = Desc> {
    (
        addr_strategy(),
        prop_oneof![
            2 => Just(0u32),
            12 => 1..0x4000u32,
            1 => (u32::MAX - 0x1000)..=u32::MAX,
            1 => any::<u32>(),
        ],
        prop_oneof![6 => 0..4u16, 2 => 0..8u16, 1 => any::<u16>()],
        prop_oneof![8 => 0..72u16, 1 => any::<u16>()],
        prop::option::weighted(0.8, any::<Index>()),
    )
        .prop_map(|(addr, len, flags, next, aim)| Desc {
            addr,
            len,
            flags,
            next,
            aim,
        })
}

fn table_strategy(entries: usize) -> impl Strategy<Value = Table> {
    (
        table_addr_strategy(),
        prop::collection::vec(desc_strategy(), entries),
        Just((0..entries).collect::<Vec<usize>>()).prop_shuffle(),
        0..=entries,
        0..=entries,
        prop::bool::weighted(0.7),
    )
        .prop_map(|(at, descs, mut path, path_len, write_from, tidy)| {
            path.truncate(path_len.max(1));
            Table {
                at,
                descs,
                path,
                write_from,
                tidy,
            }
        })
}

fn scenario_strategy() -> impl Strategy<Value = Scenario> {
    prop_oneof![8 => 1..=64u16, 1 => Just(256u16), 1 => Just(32768u16)]
        .prop_flat_map(|queue_size| {
            let entries = usize::from(queue_size.min(64));
            (
                Just(queue_size),
                prop_oneof![8 => 0..entries as u16, 1 => any::<u16>()],
                table_strategy(entries),
                prop::collection::vec((1..=40usize).prop_flat_map(table_strategy), 0..4),
                prop::bool::weighted(0.8),
            )
        })
        .prop_map(
            |(queue_size, head, main, indirect, head_on_path)| Scenario {
                queue_size,
                head,
                head_on_path,
                main,
                indirect,
            },
        )
}

/// Links a table's path and aims its indirect descriptors, as generated.
fn fix_up(table: &mut Table, indirect: &[(u64, usize)]) {
    if table.tidy {
        for (i, &at) in table.path.iter().enumerate() {
            let d = &mut table.descs[at];
            d.flags &= !(NEXT | WRITE);
            if i >= table.write_from {
                d.flags |= WRITE;
            }
            match table.path.get(i + 1) {
                Some(&next) => {
                    d.flags |= NEXT;
                    d.next = next as u16;
                }
                None => d.flags &= !NEXT,
            }
        }
    }
    for d in &mut table.descs {
        if let (true, Some(aim), false) = (d.flags & INDIRECT != 0, d.aim, indirect.is_empty()) {
            let (at, entries) = indirect[aim.index(indirect.len())];
            d.addr = at;
            d.len = 16 * entries as u32;
        }
    }
}

fn write_table(mem: &GuestMemoryMmap, table: &Table) {
    for (i, d) in table.descs.iter().enumerate() {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&d.len.to_le_bytes());
        raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
        raw[14..16].copy_from_slice(&d.next.to_le_bytes());
        if let Some(at) = table.at.checked_add(16 * i as u64) {
            // Whatever part lies outside guest memory is simply not there.
            let _ = mem.write_slice(&raw, GuestAddress(at));
        }
    }
}

/// The spec's rules (2.7.5), followed with a visited set per table instead of a budget: the
/// buffers of the chain, or None if the chain breaks a rule.
fn model_walk(
    mem: &GuestMemoryMmap,
    table: u64,
    queue_size: u16,
    head: u16,
) -> Option<Vec<Segment>> {
    let mut out = Vec::new();
    let (mut table, mut size) = (table, u64::from(queue_size));
    let mut visited = HashSet::new();
    let mut index = u64::from(head);
    let (mut in_indirect, mut seen_write, mut total) = (false, false, 0u64);
    loop {
        if index >= size || !visited.insert(index) {
            return None;
        }
        let at = table.checked_add(16 * index)?;
        let mut raw = [0u8; 16];
        if !in_memory(at, 16) {
            return None;
        }
        mem.read_slice(&mut raw, GuestAddress(at))
            .expect("in memory");
        let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap());
        let len = u32::from_le_bytes(raw[8..12].try_into().unwrap());
        let flags = u16::from_le_bytes(raw[12..14].try_into().unwrap());
        let next = u16::from_le_bytes(raw[14..16].try_into().unwrap());
        if flags & INDIRECT != 0 {
            // One level of indirection, a whole number of descriptors, at most 65535 of them.
            if in_indirect || len == 0 || len % 16 != 0 || len / 16 > 65535 {
                return None;
            }
            (table, size, index, in_indirect) = (addr, u64::from(len / 16), 0, true);
            visited.clear();
            continue;
        }
        addr.checked_add(u64::from(len))?;
        total += u64::from(len);
        let write = flags & WRITE != 0;
        if total > u64::from(u32::MAX) || (seen_write && !write) {
            return None;
        }
        seen_write |= write;
        if len > 0 {
            out.push(Segment {
                addr: GuestAddress(addr),
                len,
                write,
            });
        }
        if flags & NEXT == 0 {
            return Some(out);
        }
        index = u64::from(next);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The walk terminates without panicking on any table; what it accepts is what the spec's
    /// rules accept, buffer for buffer; what it returns keeps the invariants the rest of the
    /// device relies on. (It does not check that buffers lie in guest memory: that is checked
    /// where they are used, by the header's read and by the I/O's slices.)
    #[test]
    fn walk_accepts_exactly_the_chains_the_rules_allow(mut s in scenario_strategy()) {
        let mem = guest_memory();
        let aims: Vec<(u64, usize)> = s.indirect.iter().map(|t| (t.at, t.descs.len())).collect();
        fix_up(&mut s.main, &aims);
        if s.main.tidy && s.head_on_path {
            s.head = s.main.path[0] as u16;
        }
        write_table(&mem, &s.main);
        for t in &mut s.indirect {
            // An indirect table's chain starts at its first entry.
            match t.path.iter().position(|&i| i == 0) {
                Some(i) => t.path.swap(0, i),
                None => t.path[0] = 0,
            }
            fix_up(t, &aims);
            write_table(&mem, t);
        }
        let mut segs = vec![Segment { addr: GuestAddress(1), len: 1, write: true }];
        let walked = walk(&mem, GuestAddress(s.main.at), s.queue_size, s.head, &mut segs);
        let model = model_walk(&mem, s.main.at, s.queue_size, s.head);
        match (&walked, &model) {
            (Ok(()), Some(want)) => prop_assert_eq!(&segs, want),
            (Err(_), None) => {}
            _ => prop_assert!(false, "walk {:?} but the rules say {:?}", walked, model),
        }
        if walked.is_ok() {
            prop_assert!(segs.len() <= usize::from(s.queue_size) + 65535);
            prop_assert!(segs.iter().all(|s| s.len > 0));
            let first_write = segs.iter().position(|s| s.write).unwrap_or(segs.len());
            prop_assert!(segs[first_write..].iter().all(|s| s.write), "readable after writable");
            let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
            prop_assert!(total <= u64::from(u32::MAX));
            prop_assert!(segs.iter().all(|s| s.addr.0.checked_add(u64::from(s.len)).is_some()));
        }
    }
}

/// A chain of exactly 4 GiB - 1 bytes is allowed, one byte more is not; a chain through an
/// indirect table may have queue_size - 1 + 65535 buffers.
#[test]
fn walk_limits_at_their_edges() {
    let mem = guest_memory();
    let put = |at: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(at + 16 * i))
            .expect("desc");
    };
    let mut segs = Vec::new();
    put(0, 0, 0x1000, u32::MAX - 1, NEXT, 1);
    put(0, 1, 0x1000, 1, WRITE, 0);
    assert_eq!(walk(&mem, GuestAddress(0), 4, 0, &mut segs), Ok(()));
    assert_eq!(segs.len(), 2);
    put(0, 1, 0x1000, 2, WRITE, 0);
    assert!(walk(&mem, GuestAddress(0), 4, 0, &mut segs).is_err());

    // 3 direct buffers, then an indirect table of 65535 (the table lies in the third region).
    let table = 3 * MIB;
    for i in 0..65535u64 {
        put(
            table,
            i,
            0x2000,
            1,
            if i == 65534 { WRITE } else { NEXT },
            i as u16 + 1,
        );
    }
    put(0, 0, 0x1000, 1, NEXT, 1);
    put(0, 1, 0x1000, 1, NEXT, 2);
    put(0, 2, 0x1000, 1, NEXT, 3);
    put(0, 3, table, 65535 * 16, INDIRECT, 0);
    assert_eq!(walk(&mem, GuestAddress(0), 4, 0, &mut segs), Ok(()));
    assert_eq!(segs.len(), 3 + 65535);
    // A table of 65536 entries is refused.
    put(0, 3, table, 65536 * 16, INDIRECT, 0);
    assert!(walk(&mem, GuestAddress(0), 4, 0, &mut segs).is_err());
}

// ---- request::parse ----

#[derive(Debug, Clone)]
struct SegSpec {
    len: u32,
    /// Bytes left free before it.
    gap: u32,
    /// Not in guest memory (near the top of the address space).
    outside: bool,
}

#[derive(Debug, Clone)]
struct ParseCase {
    readable: Vec<SegSpec>,
    writable: Vec<SegSpec>,
    /// The writable buffers are device-readable after all (a chain without a status byte).
    no_status: bool,
    ty: u32,
    sector: u64,
    /// The discard or write-zeroes segment: sector, sectors, flags.
    dwz: (u64, u32, u32),
    limits: Limits,
}

fn seg_strategy(small: bool) -> impl Strategy<Value = SegSpec> {
    let len = if small {
        prop_oneof![6 => 1..=40u32, 3 => 1..=0x4000u32, 1 => (1u32 << 20)..(1 << 27)].boxed()
    } else {
        prop_oneof![3 => 1..=40u32, 6 => 1..=0x4000u32, 1 => (1u32 << 20)..(1 << 27)].boxed()
    };
    (
        len,
        prop_oneof![4 => Just(0u32), 1 => 0..600u32],
        prop::bool::weighted(0.05),
    )
        .prop_map(|(len, gap, outside)| SegSpec { len, gap, outside })
}

fn sector_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        // On every logical block size's boundary.
        4 => (0..16u64).prop_map(|s| s * 128),
        4 => 0..2100u64,
        1 => (u64::MAX / 512 - 4)..=u64::MAX / 512 + 4,
        1 => any::<u64>(),
    ]
}

fn parse_case_strategy() -> impl Strategy<Value = ParseCase> {
    let ty = prop_oneof![
        8 => prop::sample::select(vec![
            kind::IN,
            kind::OUT,
            kind::FLUSH,
            kind::GET_ID,
            kind::DISCARD,
            kind::WRITE_ZEROES,
        ]),
        1 => any::<u32>(),
    ];
    let limits = (
        prop_oneof![
            3 => Just(MIB),
            3 => (0..=2048u64).prop_map(|s| s * 512),
            1 => 0..(1u64 << 21),
            1 => Just(u64::MAX),
        ],
        prop_oneof![3 => Just(512u32), 1 => prop::sample::select(vec![1024u32, 4096, 65536])],
        prop_oneof![1..=4u32, 1..=300u32],
        any::<bool>(),
    )
        .prop_map(|(size, logical_block_size, seg_max, writable)| Limits {
            size,
            logical_block_size,
            seg_max,
            writable,
        });
    (
        prop::collection::vec(seg_strategy(true), 0..6),
        prop::collection::vec(seg_strategy(false), 0..6),
        prop::bool::weighted(0.05),
        (ty, any::<bool>()),
        sector_strategy(),
        (
            sector_strategy(),
            prop_oneof![0..64u32, 32760..32780u32, any::<u32>()],
            prop_oneof![4 => 0..2u32, 1 => any::<u32>()],
        ),
        limits,
        // Round the data to this unit (0: not at all); 256 is half the time not whole sectors.
        prop_oneof![2 => Just(0u64), 2 => Just(512u64), 1 => Just(256u64)],
    )
        .prop_map(
            |(mut readable, mut writable, no_status, (ty, barrier), sector, dwz, limits, fit)| {
                if fit > 0 {
                    fit_lengths(ty, fit, &mut readable, &mut writable);
                }
                ParseCase {
                    readable,
                    writable,
                    no_status,
                    ty: if barrier { ty | kind::BARRIER } else { ty },
                    sector,
                    dwz,
                    limits,
                }
            },
        )
}

/// Lengthens the last buffers so that the data is a multiple of `unit` (a discard's payload
/// exactly one segment), as a well-behaved driver's would be with a unit of 512.
fn fit_lengths(ty: u32, unit: u64, readable: &mut [SegSpec], writable: &mut [SegSpec]) {
    let sum = |s: &[SegSpec]| s.iter().map(|s| u64::from(s.len)).sum::<u64>();
    if let Some((last, others)) = readable.split_last_mut() {
        let others = sum(others);
        let want = if ty == kind::DISCARD || ty == kind::WRITE_ZEROES {
            32u64.saturating_sub(others)
        } else {
            let r = (others + u64::from(last.len)).max(16) - 16;
            u64::from(last.len) + (unit - r % unit) % unit
        };
        if want > 0 {
            last.len = want as u32;
        }
    }
    let w = sum(writable);
    if let Some(last) = writable.last_mut() {
        last.len += ((unit - (w - 1) % unit) % unit) as u32;
    }
}

/// The segments of a case, laid out one after the other from 4 KiB on (those outside guest
/// memory one after the other near the top of the address space), with the readable ones holding the header and
/// the discard segment followed by filler.
fn lay_out(mem: &GuestMemoryMmap, c: &ParseCase) -> Vec<Segment> {
    let mut stream = c.ty.to_le_bytes().to_vec();
    stream.extend_from_slice(&0u32.to_le_bytes());
    stream.extend_from_slice(&c.sector.to_le_bytes());
    stream.extend_from_slice(&c.dwz.0.to_le_bytes());
    stream.extend_from_slice(&c.dwz.1.to_le_bytes());
    stream.extend_from_slice(&c.dwz.2.to_le_bytes());
    let mut segs = Vec::new();
    let mut at = 0x1000u64;
    // Where the buffers outside guest memory go: below the top, room for 12 of 2^27 bytes.
    let mut high = u64::MAX - (1 << 34);
    let mut streamed = 0usize;
    let n_readable = c.readable.len();
    for (i, s) in c.readable.iter().chain(&c.writable).enumerate() {
        let write = i >= n_readable && !c.no_status;
        let addr = if s.outside {
            high += u64::from(s.gap);
            high += u64::from(s.len);
            high - u64::from(s.len)
        } else {
            at += u64::from(s.gap);
            at += u64::from(s.len);
            at - u64::from(s.len)
        };
        let n = (stream.len().saturating_sub(streamed)).min(s.len as usize);
        if !write && n > 0 && in_memory(addr, n as u64) {
            mem.write_slice(&stream[streamed..streamed + n], GuestAddress(addr))
                .expect("in memory");
        }
        if !write {
            streamed += s.len as usize;
        }
        segs.push(Segment {
            addr: GuestAddress(addr),
            len: s.len,
            write,
        });
    }
    segs
}

/// The bytes of `segs` from byte `skip` to `skip + len`, as maximal contiguous ranges.
fn ranges(segs: &[Segment], skip: u64, len: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let (mut pos, end) = (0u64, skip + len);
    for s in segs {
        let (from, to) = (pos.max(skip), (pos + u64::from(s.len)).min(end));
        if from < to {
            let (a, b) = (s.addr.0 + (from - pos), s.addr.0 + (to - pos));
            match out.last_mut() {
                Some(last) if last.1 == a => last.1 = b,
                _ => out.push((a, b)),
            }
        }
        pos += u64::from(s.len);
    }
    out
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Whether `len` bytes at sector `sector` are a valid range of the device (in u128, so that
/// nothing overflows).
fn range_ok(l: &Limits, sector: u64, len: u64) -> bool {
    let offset = u128::from(sector) * 512;
    len % 512 == 0
        && offset % u128::from(l.logical_block_size) == 0
        && offset + u128::from(len) <= u128::from(l.size)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10000))]

    /// Parsing never panics, refuses exactly the chains without a device-writable last
    /// buffer, and produces an action exactly when the request is valid, with the right
    /// range and buffers.
    #[test]
    fn parse_acts_exactly_on_valid_requests(c in parse_case_strategy()) {
        let mem = guest_memory();
        let segs = lay_out(&mem, &c);
        let l = &c.limits;
        let parsed = parse(&mem, &segs, l);
        let Some(last) = segs.last().filter(|s| s.write) else {
            prop_assert_eq!(parsed, Err(Refused));
            return Ok(());
        };
        let parsed = parsed.expect("a chain with a status byte is answered");
        prop_assert_eq!(parsed.status.0, last.addr.0 + u64::from(last.len) - 1);

        let split = segs.iter().position(|s| s.write).unwrap();
        let (readable, writable) = segs.split_at(split);
        let readable_len = total(readable);
        // Whether the bytes [0, n) of the readable part are all in guest memory.
        let readable_held = |n: u64| {
            let mut pos = 0;
            readable.iter().all(|s| {
                let ok = pos >= n || in_memory(s.addr.0, u64::from(s.len).min(n - pos));
                pos += u64::from(s.len);
                ok
            }) && readable_len >= n
        };
        if !readable_held(16) {
            prop_assert_eq!(parsed.action, Action::Done(Status::IoErr));
            return Ok(());
        }
        // Device-writable buffers but the status byte; device-readable ones after the header.
        let in_len = total(writable) - 1;
        let in_ranges = ranges(writable, 0, in_len);
        let in_count = writable.len() - usize::from(last.len == 1);
        let out_len = readable_len.saturating_sub(16);
        let out_ranges = ranges(readable, 16, out_len);
        let out_count = readable.iter().scan(0u64, |pos, s| {
            *pos += u64::from(s.len);
            Some(*pos > 16)
        }).filter(|&after| after).count();

        let action = parsed.action.clone();
        prop_assert!(
            l.writable
                || !matches!(
                    action,
                    Action::Write { .. } | Action::Discard { .. } | Action::WriteZeroes { .. }
                ),
            "read-only device: {:?}", action
        );
        match c.ty & !kind::BARRIER {
            ty @ (kind::IN | kind::OUT) => {
                let write = ty == kind::OUT;
                let (len, count) = if write { (out_len, out_count) } else { (in_len, in_count) };
                let valid = (!write || l.writable)
                    && count as u64 <= u64::from(l.seg_max)
                    && range_ok(l, c.sector, len);
                if !valid {
                    prop_assert_eq!(action, Action::Done(Status::IoErr));
                    return Ok(());
                }
                let (offset, data, got_len) = match action {
                    Action::Read { offset, data, len } if !write => (offset, data, len),
                    Action::Write { offset, data, len } if write => (offset, data, len),
                    other => {
                        prop_assert!(false, "valid request, got {:?}", other);
                        unreachable!()
                    }
                };
                prop_assert_eq!(offset, c.sector * 512);
                prop_assert_eq!(offset % u64::from(l.logical_block_size), 0);
                prop_assert_eq!(got_len, len);
                prop_assert_eq!(len % 512, 0);
                prop_assert!(offset + len <= l.size);
                prop_assert_eq!(total(&data), len);
                prop_assert_eq!(data.len(), count);
                prop_assert!(data.len() as u64 <= u64::from(l.seg_max));
                prop_assert!(data.iter().all(|s| s.write != write && s.len > 0));
                let want = if write { &out_ranges } else { &in_ranges };
                prop_assert_eq!(&ranges(&data, 0, len), want);
                if !write {
                    // The status byte is not among the data.
                    let status = parsed.status.0;
                    let covers = |s: &Segment| (s.addr.0..s.addr.0 + u64::from(s.len)).contains(&status);
                    prop_assert!(!data.iter().any(covers), "the status byte among the data");
                }
            }
            kind::FLUSH => prop_assert_eq!(action, Action::Flush),
            kind::GET_ID => {
                let Action::GetId { data } = action else {
                    prop_assert!(false, "GET_ID: {:?}", action);
                    unreachable!()
                };
                prop_assert_eq!(ranges(&data, 0, in_len), in_ranges);
                prop_assert_eq!(total(&data), in_len);
            }
            ty @ (kind::DISCARD | kind::WRITE_ZEROES) => {
                let (sector, sectors, flags) = c.dwz;
                let max = if ty == kind::DISCARD { MAX_DISCARD_SECTORS } else { MAX_WRITE_ZEROES_SECTORS };
                let len = u64::from(sectors) * 512;
                let flags_ok = flags & !1 == 0 && (ty == kind::WRITE_ZEROES || flags == 0);
                let valid = l.writable
                    && out_len == 16
                    && readable_held(32)
                    && sectors <= max
                    && range_ok(l, sector, len)
                    && flags_ok;
                if !valid {
                    prop_assert!(
                        matches!(action, Action::Done(Status::IoErr | Status::Unsupp)),
                        "invalid {:#x}: {:?}", ty, action
                    );
                    if !l.writable {
                        prop_assert_eq!(action, Action::Done(Status::IoErr));
                    }
                    return Ok(());
                }
                let want = if ty == kind::DISCARD {
                    Action::Discard { offset: sector * 512, len }
                } else {
                    Action::WriteZeroes { offset: sector * 512, len, unmap: flags == 1 }
                };
                prop_assert!(sector * 512 + len <= l.size);
                prop_assert_eq!(action, want);
            }
            _ => prop_assert_eq!(action, Action::Done(Status::Unsupp)),
        }
    }
}

// ---- QueueHandler against a model ----

#[derive(Debug, Clone)]
struct Op {
    write: bool,
    /// Logical block (taken modulo the image's blocks that leave room for the length).
    block: u32,
    blocks: u32,
    /// Where the data is cut into buffers (fractions of its length).
    cuts: Vec<Index>,
    /// Bytes of guest memory skipped before each buffer.
    gaps: Vec<u8>,
    /// For a read: the status byte is the last byte of the last data buffer.
    shared_status: bool,
    seed: u8,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    (
        prop::bool::weighted(0.5),
        any::<u32>(),
        1..=16u32,
        prop::collection::vec(any::<Index>(), 0..8),
        prop::collection::vec(any::<u8>(), 8),
        any::<bool>(),
        any::<u8>(),
    )
        .prop_map(
            |(write, block, blocks, cuts, gaps, shared_status, seed)| Op {
                write,
                block,
                blocks,
                cuts,
                gaps,
                shared_status,
                seed,
            },
        )
}

/// A request in flight: offset, length, whether a write, its data buffers (address,
/// length), its status byte's address.
type Started = (u64, u64, bool, Vec<(u64, u32)>, u64);

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Batches of reads and writes (no two overlapping in a batch unless both read), all in
    /// flight at once, their data cut into random buffers: every read returns the model's
    /// bytes, and the image ends as the model.
    #[test]
    fn queue_reads_and_writes_match_a_model(
        lbs in prop::sample::select(vec![512u32, 4096]),
        batches in prop::collection::vec(prop::collection::vec(op_strategy(), 1..=16), 1..=6),
    ) {
        let mut r = Rig::new(true, lbs);
        let mut model: Vec<u8> = (0..IMAGE).map(|i| (i % 253) as u8).collect();
        let image_blocks = (IMAGE / u64::from(lbs)) as u32;
        for batch in &batches {
            let mut started: HashMap<u16, Started> = HashMap::new();
            let mut taken: Vec<(u64, u64, bool)> = Vec::new();
            let mut at = DATA;
            for (n, op) in batch.iter().enumerate() {
                let blocks = op.blocks.min(image_blocks);
                let block = op.block % (image_blocks - blocks + 1);
                let offset = u64::from(block) * u64::from(lbs);
                let len = u64::from(blocks) * u64::from(lbs);
                if taken.iter().any(|&(o, l, w)| {
                    (w || op.write) && o < offset + len && offset < o + l
                }) {
                    continue;
                }
                taken.push((offset, len, op.write));
                let mut cuts: Vec<u64> = op.cuts.iter().map(|c| c.index(len as usize) as u64).collect();
                cuts.extend([0, len]);
                cuts.sort_unstable();
                cuts.dedup();
                let mut bufs = Vec::new();
                for (i, w) in cuts.windows(2).enumerate() {
                    at += u64::from(op.gaps[i % op.gaps.len()]);
                    bufs.push((at, (w[1] - w[0]) as u32));
                    at += w[1] - w[0];
                }
                let status = if !op.write && op.shared_status {
                    bufs.last_mut().expect("a buffer").1 += 1;
                    at += 1;
                    at - 1
                } else {
                    STATUS + n as u64
                };
                at += 64;
                r.mem.write_obj(0xeeu8, GuestAddress(status)).expect("status");
                let header = HEADERS + 16 * n as u64;
                let ty = if op.write { kind::OUT } else { kind::IN };
                r.header(header, ty, offset / 512);
                let flags = if op.write { 0 } else { WRITE };
                let mut chain = vec![(header, 16, 0)];
                if op.write {
                    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31) ^ op.seed).collect();
                    let mut pos = 0usize;
                    for &(addr, blen) in &bufs {
                        r.mem.write_slice(&data[pos..pos + blen as usize], GuestAddress(addr)).expect("data");
                        pos += blen as usize;
                    }
                    model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                } else {
                    for &(addr, blen) in &bufs {
                        r.mem.write_slice(&vec![0xa5; blen as usize], GuestAddress(addr)).expect("poison");
                    }
                }
                chain.extend(bufs.iter().map(|&(a, l)| (a, l, flags)));
                if op.write || !op.shared_status {
                    chain.push((status, 1, WRITE));
                }
                let head = r.chain(&chain);
                if !op.write && op.shared_status {
                    bufs.last_mut().expect("a buffer").1 -= 1;
                }
                started.insert(head, (offset, len, op.write, bufs, status));
            }
            let used = r.run(started.len());
            let mut seen = HashSet::new();
            for (head, used_len) in used {
                prop_assert!(seen.insert(head), "head {} used twice", head);
                let (offset, len, write, bufs, status) = started.get(&head).expect("a started head").clone();
                prop_assert_eq!(r.status(status), 0, "status of head {}", head);
                prop_assert_eq!(u64::from(used_len), if write { 1 } else { len + 1 });
                if !write {
                    let mut back = Vec::new();
                    for (addr, blen) in bufs {
                        let mut b = vec![0u8; blen as usize];
                        r.mem.read_slice(&mut b, GuestAddress(addr)).expect("back");
                        back.extend(b);
                    }
                    // Writes in the same batch never overlap this read: the model is current.
                    prop_assert!(back == model[offset as usize..(offset + len) as usize],
                        "read at {} of {} bytes differs from the model", offset, len);
                }
            }
        }
        prop_assert!(r.image() == model, "the image differs from the model");
    }
}
