//! The device model driven through `virtio-queue`'s mock split queue: a driver's view of
//! well-formed and malformed requests, against a real `file` node.

mod common;

use common::*;
use virtio_blk::request::kind;
use vm_memory::{Bytes, GuestAddress};

#[test]
fn writes_and_reads_go_straight_between_guest_memory_and_the_node() {
    let mut r = Rig::new(true, 512);
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    r.mem.write_slice(&data, GuestAddress(DATA)).expect("data");
    r.header(HEADERS, kind::OUT, 8);
    r.mem
        .write_obj(0xffu8, GuestAddress(STATUS))
        .expect("status");
    // Header, data in two buffers (the second split across descriptors), status.
    let head = r.chain(&[
        (HEADERS, 16, 0),
        (DATA, 3072, 0),
        (DATA + 3072, 5120, 0),
        (STATUS, 1, WRITE),
    ]);
    assert_eq!(r.run(1), vec![(head, 1)]);
    assert_eq!(r.status(STATUS), 0);
    assert_eq!(&r.image()[4096..4096 + 8192], &data[..]);

    // Read it back into other memory, status byte sharing the last data buffer.
    r.header(HEADERS + 16, kind::IN, 8);
    let head = r.chain(&[
        (HEADERS + 16, 16, 0),
        (DATA + 0x10000, 4096, WRITE),
        (DATA + 0x11000, 4097, WRITE),
    ]);
    assert_eq!(r.run(1), vec![(head, 8193)]);
    let mut back = vec![0u8; 8193];
    r.mem
        .read_slice(&mut back, GuestAddress(DATA + 0x10000))
        .expect("back");
    assert_eq!(&back[..8192], &data[..]);
    assert_eq!(back[8192], 0, "status byte");
}

#[test]
fn many_requests_in_flight_all_complete() {
    let mut r = Rig::new(true, 512);
    let mut heads = Vec::new();
    for i in 0..64u64 {
        let h = HEADERS + 16 * i;
        let s = STATUS + i;
        let d = DATA + 4096 * i;
        r.mem
            .write_slice(&vec![i as u8 + 1; 4096], GuestAddress(d))
            .expect("data");
        r.header(h, kind::OUT, i * 8);
        r.mem.write_obj(0xffu8, GuestAddress(s)).expect("status");
        heads.push(r.chain(&[(h, 16, 0), (d, 4096, 0), (s, 1, WRITE)]));
    }
    let mut used: Vec<u16> = r.run(64).into_iter().map(|(h, _)| h).collect();
    used.sort_unstable();
    heads.sort_unstable();
    assert_eq!(used, heads);
    let image = r.image();
    for i in 0..64usize {
        assert_eq!(r.status(STATUS + i as u64), 0);
        assert!(image[i * 4096..(i + 1) * 4096]
            .iter()
            .all(|&b| b == i as u8 + 1));
    }
}

#[test]
fn flush_get_id_discard_and_write_zeroes() {
    let mut r = Rig::new(true, 512);
    r.header(HEADERS, kind::FLUSH, 0);
    let h = r.chain(&[(HEADERS, 16, 0), (STATUS, 1, WRITE)]);
    assert_eq!(r.run(1), vec![(h, 1)]);
    assert_eq!(r.status(STATUS), 0);

    r.header(HEADERS, kind::GET_ID, 0);
    let h = r.chain(&[(HEADERS, 16, 0), (DATA, 20, WRITE), (STATUS + 1, 1, WRITE)]);
    assert_eq!(r.run(1), vec![(h, 21)]);
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).expect("id");
    assert_eq!(&id, b"serial-0123456789-ab", "20 bytes, no terminator");

    // Write zeroes with unmap over 8 KiB at sector 16, discard at sector 64.
    let mut seg = 16u64.to_le_bytes().to_vec();
    seg.extend_from_slice(&16u32.to_le_bytes());
    seg.extend_from_slice(&1u32.to_le_bytes());
    r.mem
        .write_slice(&seg, GuestAddress(DATA + 0x1000))
        .expect("seg");
    r.header(HEADERS, kind::WRITE_ZEROES, 0);
    let h = r.chain(&[
        (HEADERS, 16, 0),
        (DATA + 0x1000, 16, 0),
        (STATUS + 2, 1, WRITE),
    ]);
    assert_eq!(r.run(1), vec![(h, 1)]);
    assert_eq!(r.status(STATUS + 2), 0);
    let image = r.image();
    assert!(image[8192..16384].iter().all(|&b| b == 0));
    assert_ne!(image[16384], 0);

    let mut seg = 64u64.to_le_bytes().to_vec();
    seg.extend_from_slice(&8u32.to_le_bytes());
    seg.extend_from_slice(&0u32.to_le_bytes());
    r.mem
        .write_slice(&seg, GuestAddress(DATA + 0x2000))
        .expect("seg");
    r.header(HEADERS, kind::DISCARD, 0);
    let h = r.chain(&[
        (HEADERS, 16, 0),
        (DATA + 0x2000, 16, 0),
        (STATUS + 3, 1, WRITE),
    ]);
    assert_eq!(r.run(1), vec![(h, 1)]);
    assert_eq!(r.status(STATUS + 3), 0);
    drop(r.node);
}

/// Each malformed or refused request gets its status (or, without a status byte, nothing)
/// and the queue goes on: the request after it is served.
#[test]
fn malformed_requests_get_their_status_and_the_queue_goes_on() {
    let mut r = Rig::new(true, 4096);
    let check = |r: &mut Rig, name: &str, bufs: Vec<(u64, u32, u16)>, want: Option<u8>| {
        r.mem
            .write_obj(0xeeu8, GuestAddress(STATUS))
            .expect("status");
        let head = r.chain(&bufs);
        let used = r.run(1);
        assert_eq!(used.len(), 1, "{name}");
        assert_eq!(used[0].0, head, "{name}");
        match want {
            Some(s) => assert_eq!(r.status(STATUS), s, "{name}"),
            None => {
                assert_eq!(used[0].1, 0, "{name}: nothing written");
                assert_eq!(r.status(STATUS), 0xee, "{name}: status untouched");
            }
        }
        // The next request is served.
        r.header(HEADERS + 0x800, kind::FLUSH, 0);
        r.mem
            .write_obj(0xeeu8, GuestAddress(STATUS + 8))
            .expect("status");
        r.chain(&[(HEADERS + 0x800, 16, 0), (STATUS + 8, 1, WRITE)]);
        r.run(1);
        assert_eq!(r.status(STATUS + 8), 0, "{name}: the queue goes on");
    };
    r.header(HEADERS, kind::IN, 8);
    check(
        &mut r,
        "no status byte",
        vec![(HEADERS, 16, 0), (DATA, 4096, 0)],
        None,
    );
    check(&mut r, "header only", vec![(HEADERS, 16, 0)], None);
    check(
        &mut r,
        "device-writable header",
        vec![
            (HEADERS, 16, WRITE),
            (DATA, 4096, WRITE),
            (STATUS, 1, WRITE),
        ],
        Some(1),
    );
    check(
        &mut r,
        "short header",
        vec![(HEADERS, 8, 0), (DATA, 4096, WRITE), (STATUS, 1, WRITE)],
        Some(1),
    );
    r.header(HEADERS + 16, kind::IN, 1);
    check(
        &mut r,
        "sector not on a logical block",
        vec![
            (HEADERS + 16, 16, 0),
            (DATA, 4096, WRITE),
            (STATUS, 1, WRITE),
        ],
        Some(1),
    );
    r.header(HEADERS + 32, kind::IN, IMAGE / 512 - 8);
    check(
        &mut r,
        "beyond the end",
        vec![
            (HEADERS + 32, 16, 0),
            (DATA, 8192, WRITE),
            (STATUS, 1, WRITE),
        ],
        Some(1),
    );
    r.header(HEADERS + 48, kind::IN, u64::MAX / 256);
    check(
        &mut r,
        "sector overflow",
        vec![
            (HEADERS + 48, 16, 0),
            (DATA, 4096, WRITE),
            (STATUS, 1, WRITE),
        ],
        Some(1),
    );
    r.header(HEADERS + 64, kind::IN, 0);
    check(
        &mut r,
        "length not whole sectors",
        vec![
            (HEADERS + 64, 16, 0),
            (DATA, 1000, WRITE),
            (STATUS, 1, WRITE),
        ],
        Some(1),
    );
    check(
        &mut r,
        "buffer outside guest memory",
        vec![
            (HEADERS + 64, 16, 0),
            (15 << 20, 2 << 20, WRITE),
            (STATUS, 1, WRITE),
        ],
        Some(1),
    );
    check(
        &mut r,
        "readable after writable",
        vec![(HEADERS + 64, 16, 0), (DATA, 4096, WRITE), (STATUS, 1, 0)],
        None,
    );
    r.header(HEADERS + 80, 0x1234, 0);
    check(
        &mut r,
        "unknown type",
        vec![(HEADERS + 80, 16, 0), (STATUS, 1, WRITE)],
        Some(2),
    );
    // Discard with the unmap flag: UNSUPP; two segments: UNSUPP; a short one: IOERR.
    let mut seg = 0u64.to_le_bytes().to_vec();
    seg.extend_from_slice(&8u32.to_le_bytes());
    seg.extend_from_slice(&1u32.to_le_bytes());
    seg.extend_from_slice(&[0u8; 16]);
    r.mem.write_slice(&seg, GuestAddress(DATA)).expect("seg");
    r.header(HEADERS + 96, kind::DISCARD, 0);
    check(
        &mut r,
        "discard with unmap",
        vec![(HEADERS + 96, 16, 0), (DATA, 16, 0), (STATUS, 1, WRITE)],
        Some(2),
    );
    check(
        &mut r,
        "two discard segments",
        vec![(HEADERS + 96, 16, 0), (DATA, 32, 0), (STATUS, 1, WRITE)],
        Some(2),
    );
    check(
        &mut r,
        "short discard segment",
        vec![(HEADERS + 96, 16, 0), (DATA, 12, 0), (STATUS, 1, WRITE)],
        Some(1),
    );
}

#[test]
fn loops_nested_indirect_tables_and_too_many_segments_are_refused() {
    let mut r = Rig::new(true, 512);
    // A loop in the ring's table: descriptor 200 -> 201 -> 200.
    r.desc(0, 200, HEADERS, 16, NEXT, 201);
    r.desc(0, 201, STATUS, 1, WRITE | NEXT, 200);
    r.offer(200);
    assert_eq!(r.run(1), vec![(200, 0)]);

    // A next index outside the table.
    r.desc(0, 202, HEADERS, 16, NEXT, QSIZE + 5);
    r.offer(202);
    assert_eq!(r.run(1), vec![(202, 0)]);

    // An indirect table pointing to another indirect table.
    r.desc(TABLES, 0, TABLES + 0x100, 32, INDIRECT, 0);
    r.desc(0, 203, TABLES, 16, INDIRECT, 0);
    r.offer(203);
    assert_eq!(r.run(1), vec![(203, 0)]);

    // An indirect table of a bad size.
    r.desc(0, 204, TABLES, 24, INDIRECT, 0);
    r.offer(204);
    assert_eq!(r.run(1), vec![(204, 0)]);

    // A good indirect table: header, data, status.
    r.header(HEADERS, kind::IN, 0);
    r.desc(TABLES + 0x200, 0, HEADERS, 16, NEXT, 1);
    r.desc(TABLES + 0x200, 1, DATA, 512, WRITE | NEXT, 2);
    r.desc(TABLES + 0x200, 2, STATUS, 1, WRITE, 0);
    r.desc(0, 205, TABLES + 0x200, 48, INDIRECT, 0);
    r.offer(205);
    assert_eq!(r.run(1), vec![(205, 513)]);
    assert_eq!(r.status(STATUS), 0);
    let mut back = vec![0u8; 512];
    r.mem
        .read_slice(&mut back, GuestAddress(DATA))
        .expect("data");
    assert_eq!(back, r.image()[..512]);

    // A loop inside an indirect table.
    r.desc(TABLES + 0x400, 0, HEADERS, 16, NEXT, 1);
    r.desc(TABLES + 0x400, 1, DATA, 512, WRITE | NEXT, 0);
    r.desc(0, 206, TABLES + 0x400, 32, INDIRECT, 0);
    r.offer(206);
    assert_eq!(r.run(1), vec![(206, 0)]);

    // More data segments than seg_max (254): 255 segments of 512 bytes, in an indirect table.
    let n = 255u16;
    r.desc(TABLES + 0x1000, 0, HEADERS, 16, NEXT, 1);
    for i in 0..n {
        r.desc(
            TABLES + 0x1000,
            1 + i,
            DATA + 512 * u64::from(i),
            512,
            WRITE | NEXT,
            2 + i,
        );
    }
    r.desc(TABLES + 0x1000, n + 1, STATUS, 1, WRITE, 0);
    r.desc(0, 207, TABLES + 0x1000, 16 * u32::from(n + 2), INDIRECT, 0);
    r.offer(207);
    r.mem
        .write_obj(0xeeu8, GuestAddress(STATUS))
        .expect("status");
    assert_eq!(r.run(1), vec![(207, 1)]);
    assert_eq!(r.status(STATUS), 1);
}

#[test]
fn a_read_only_device_refuses_writes_with_ioerr() {
    let mut r = Rig::new(false, 512);
    r.header(HEADERS, kind::OUT, 0);
    r.chain(&[(HEADERS, 16, 0), (DATA, 512, 0), (STATUS, 1, WRITE)]);
    r.run(1);
    assert_eq!(r.status(STATUS), 1);
    let mut seg = 0u64.to_le_bytes().to_vec();
    seg.extend_from_slice(&8u32.to_le_bytes());
    seg.extend_from_slice(&0u32.to_le_bytes());
    r.mem.write_slice(&seg, GuestAddress(DATA)).expect("seg");
    for ty in [kind::DISCARD, kind::WRITE_ZEROES] {
        r.header(HEADERS, ty, 0);
        r.mem
            .write_obj(0xeeu8, GuestAddress(STATUS))
            .expect("status");
        r.chain(&[(HEADERS, 16, 0), (DATA, 16, 0), (STATUS, 1, WRITE)]);
        r.run(1);
        assert_eq!(r.status(STATUS), 1);
    }
    assert!(r.image()[..512]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == (i % 253) as u8));
}

/// VDUSE's IOTLB grows as the driver maps buffers, without telling the device: a request on
/// memory the handler's map lacks asks for a newer map and is served on it, and only a
/// transport that has none refuses it.
#[test]
fn a_request_outside_the_map_is_served_on_the_refreshed_map() {
    let mut r = Rig::new(true, 512);
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 13 + 1) as u8).collect();
    r.mem.write_slice(&data, GuestAddress(DATA)).expect("data");
    r.header(HEADERS, kind::OUT, 16);
    let head = r.chain(&[(HEADERS, 16, 0), (DATA, 4096, 0), (STATUS, 1, WRITE)]);
    let full = std::sync::Arc::clone(&r.mem);
    let mut asked = 0;
    let (used, ended_on) = r.run_on(
        r.without_data(),
        &mut || {
            asked += 1;
            Some(std::sync::Arc::clone(&full))
        },
        1,
    );
    assert_eq!(used, vec![(head, 1)]);
    assert_eq!(asked, 1, "one refresh for the one miss");
    assert!(
        std::sync::Arc::ptr_eq(&ended_on, &full),
        "the handler goes on with the newer map"
    );
    assert_eq!(r.status(STATUS), 0);
    assert_eq!(&r.image()[8192..8192 + 4096], &data[..]);

    // A read into memory nobody maps: IOERR, nothing read into it.
    r.header(HEADERS + 16, kind::IN, 16);
    let head = r.chain(&[
        (HEADERS + 16, 16, 0),
        (DATA, 4096, WRITE),
        (STATUS, 1, WRITE),
    ]);
    let (used, _) = r.run_on(r.without_data(), &mut || None, 1);
    assert_eq!(used, vec![(head, 1)]);
    assert_eq!(r.status(STATUS), 1, "VIRTIO_BLK_S_IOERR");

    // A header outside the map is a miss too, not an IOERR.
    r.header(DATA + 0x8000, kind::IN, 16);
    let head = r.chain(&[
        (DATA + 0x8000, 16, 0),
        (DATA + 0x9000, 512, WRITE),
        (STATUS, 1, WRITE),
    ]);
    let (used, _) = r.run_on(
        r.without_data(),
        &mut || Some(std::sync::Arc::clone(&full)),
        1,
    );
    assert_eq!(used, vec![(head, 513)]);
    assert_eq!(r.status(STATUS), 0);
}
