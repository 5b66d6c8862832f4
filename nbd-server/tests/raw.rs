//! Protocol edge cases no library client sends, over a raw unix socket.

mod common;

use common::*;
use nbd_server::{RemoveMode, ServerConfig};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const NBD_EINVAL: u32 = 22;
const ERR_UNSUP: u32 = (1 << 31) + 1;
const ERR_POLICY: u32 = (1 << 31) + 2;
const ERR_INVALID: u32 = (1 << 31) + 3;
const ERR_UNKNOWN: u32 = (1 << 31) + 6;
const ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
const ERR_TOO_BIG: u32 = (1 << 31) + 9;

fn is_closed(s: &mut std::os::unix::net::UnixStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn unknown_option_then_go() {
    let t = TestServer::default_with(MIB);
    let mut s = t.connect();
    raw_greet(&mut s);
    send_option(&mut s, 42, b"some data");
    let (opt, ty, msg) = read_option_reply(&mut s);
    assert_eq!(
        (opt, ty),
        (42, ERR_UNSUP),
        "{}",
        String::from_utf8_lossy(&msg)
    );
    // An unknown option with a huge (drained) payload is answered the same way.
    send_option(&mut s, 4242, &vec![7u8; 200_000]);
    assert_eq!(read_option_reply(&mut s).1, ERR_UNSUP);
    // A known option with oversized data is refused, and the connection lives.
    send_option(&mut s, 6, &vec![0u8; 100_000]);
    assert_eq!(read_option_reply(&mut s).1, ERR_TOO_BIG);
    // STARTTLS without TLS configured.
    send_option(&mut s, 5, &[]);
    assert_eq!(read_option_reply(&mut s).1, ERR_POLICY);
    // LIST with data is invalid; without, it lists "e" with its description.
    send_option(&mut s, 3, b"x");
    assert_eq!(read_option_reply(&mut s).1, ERR_INVALID);
    send_option(&mut s, 3, &[]);
    let (_, ty, data) = read_option_reply(&mut s);
    assert_eq!(ty, 2);
    assert_eq!(&data[..5], &[0, 0, 0, 1, b'e']);
    assert_eq!(&data[5..], b"a test export");
    assert_eq!(read_option_reply(&mut s).1, 1);
    // SET_META_CONTEXT before structured replies is invalid.
    let mut meta = Vec::new();
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.push(b'e');
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    send_option(&mut s, 10, &meta);
    assert_eq!(read_option_reply(&mut s).1, ERR_INVALID);
    // Truncated INFO data is invalid; an unknown export is unknown.
    send_option(&mut s, 6, &[0, 0, 0, 9, b'e']);
    assert_eq!(read_option_reply(&mut s).1, ERR_INVALID);
    send_option(&mut s, 6, &[0, 0, 0, 1, b'x', 0, 0]);
    assert_eq!(read_option_reply(&mut s).1, ERR_UNKNOWN);
    let (size, flags) = raw_go(&mut s, "e");
    assert_eq!(size, MIB);
    // HAS_FLAGS, SEND_FLUSH, SEND_FUA, TRIM, WRITE_ZEROES, MULTI_CONN, CACHE, FAST_ZERO;
    // no DF (simple replies), no READ_ONLY, no ROTATIONAL.
    assert_eq!(flags, 0b0000_1101_0110_1101);
    // One request to prove transmission works.
    send_request(&mut s, 0, 0, 5, 0, 512);
    assert_eq!(read_simple_reply(&mut s), (0, 5));
    let mut buf = vec![0u8; 512];
    s.read_exact(&mut buf).unwrap();
}

#[test]
fn unknown_client_flags_close() {
    let t = TestServer::default_with(MIB);
    let mut s = t.connect();
    assert_eq!(read_u64(&mut s), 0x4e42_444d_4147_4943);
    read_u64(&mut s);
    read_u16(&mut s);
    s.write_all(&0x81u32.to_be_bytes()).unwrap();
    assert!(is_closed(&mut s));
}

#[test]
fn export_name_and_no_zeroes() {
    let t = TestServer::default_with(MIB);
    // With NO_ZEROES: 10 bytes.
    let mut s = t.connect();
    raw_greet(&mut s);
    send_option(&mut s, 1, b"e");
    assert_eq!(read_u64(&mut s), MIB);
    let flags = read_u16(&mut s);
    assert_eq!(flags & 1, 1);
    send_request(&mut s, 0, 3, 9, 0, 0); // flush
    assert_eq!(read_simple_reply(&mut s), (0, 9));
    // Without NO_ZEROES: 124 zero bytes follow.
    let mut s = t.connect();
    read_u64(&mut s);
    read_u64(&mut s);
    read_u16(&mut s);
    s.write_all(&1u32.to_be_bytes()).unwrap();
    send_option(&mut s, 1, b"e");
    assert_eq!(read_u64(&mut s), MIB);
    read_u16(&mut s);
    let mut zeroes = [1u8; 124];
    s.read_exact(&mut zeroes).unwrap();
    assert!(zeroes.iter().all(|&b| b == 0));
    // An unknown name ends the session (EXPORT_NAME cannot return an error).
    let mut s = t.connect();
    raw_greet(&mut s);
    send_option(&mut s, 1, b"missing");
    assert!(is_closed(&mut s));
}

#[test]
fn bad_requests_end_the_request_not_the_connection() {
    let t = TestServer::default_with(MIB);
    let mut s = t.connect();
    raw_greet(&mut s);
    raw_go(&mut s, "e");
    // Unknown command.
    send_request(&mut s, 0, 99, 1, 0, 0);
    assert_eq!(read_simple_reply(&mut s), (NBD_EINVAL, 1));
    // Bad flag (REQ_ONE on a write) with its payload consumed.
    send_request(&mut s, 1 << 3, 1, 2, 0, 4);
    s.write_all(b"abcd").unwrap();
    assert_eq!(read_simple_reply(&mut s), (NBD_EINVAL, 2));
    // Write past the end: ENOSPC, payload consumed.
    send_request(&mut s, 0, 1, 3, MIB - 2, 4);
    s.write_all(b"abcd").unwrap();
    assert_eq!(read_simple_reply(&mut s), (28, 3));
    // Still in sync: a good write and read.
    send_request(&mut s, 1, 1, 4, 100, 4);
    s.write_all(b"wxyz").unwrap();
    assert_eq!(read_simple_reply(&mut s), (0, 4));
    assert_eq!(&t.disk.contents()[100..104], b"wxyz");
    // Oversized write payload: refused before allocation, then the connection ends.
    send_request(&mut s, 0, 1, 6, 0, (32 << 20) + 1);
    assert_eq!(read_simple_reply(&mut s), (NBD_EINVAL, 6));
    assert!(is_closed(&mut s));
    // The server still serves others.
    let mut s = t.connect();
    raw_greet(&mut s);
    raw_go(&mut s, "e");
    send_request(&mut s, 0, 0, 7, 100, 4);
    assert_eq!(read_simple_reply(&mut s), (0, 7));
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"wxyz");
}

#[test]
fn client_stopping_mid_request_does_not_hurt() {
    let t = TestServer::default_with(MIB);
    for cut in [3usize, 20, 28 + 100] {
        let mut s = t.connect();
        raw_greet(&mut s);
        raw_go(&mut s, "e");
        let mut m = Vec::new();
        m.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m.extend_from_slice(&1u64.to_be_bytes());
        m.extend_from_slice(&0u64.to_be_bytes());
        m.extend_from_slice(&4096u32.to_be_bytes());
        m.extend_from_slice(&[0xee; 4096]);
        s.write_all(&m[..cut]).unwrap();
        drop(s);
    }
    // Partial writes were not applied; the server is fine.
    assert!(t.disk.contents().iter().all(|&b| b == 0));
    let mut s = t.connect();
    raw_greet(&mut s);
    raw_go(&mut s, "e");
    send_request(&mut s, 0, 3, 1, 0, 0);
    assert_eq!(read_simple_reply(&mut s), (0, 1));
}

#[test]
fn bad_request_magic_closes() {
    let t = TestServer::default_with(MIB);
    let mut s = t.connect();
    raw_greet(&mut s);
    raw_go(&mut s, "e");
    s.write_all(&[0u8; 28]).unwrap();
    assert!(is_closed(&mut s));
}

#[test]
fn handshake_deadline_drops_silent_client() {
    let t = TestServer::start(
        MemDriver::new(MIB),
        ServerConfig::default()
            .max_connections(0)
            .handshake_max(Some(Duration::from_millis(200)))
            .tls(None),
        true,
    );
    let mut s = t.connect();
    // Greeting arrives, then the client says nothing: the server hangs up.
    assert_eq!(read_u64(&mut s), 0x4e42_444d_4147_4943);
    read_u64(&mut s);
    read_u16(&mut s);
    assert!(is_closed(&mut s));
    // A client that completes the handshake is not affected afterwards.
    let mut s = t.connect();
    raw_greet(&mut s);
    raw_go(&mut s, "e");
    send_request(&mut s, 0, 3, 1, 0, 0);
    assert_eq!(read_simple_reply(&mut s), (0, 1));
}

#[test]
fn connection_limit_waits_for_a_free_slot() {
    let t = TestServer::start(
        MemDriver::new(MIB),
        ServerConfig::default()
            .max_connections(1)
            .handshake_max(None)
            .tls(None),
        true,
    );
    let mut first = t.connect();
    raw_greet(&mut first);
    let (_, flags) = raw_go(&mut first, "e");
    assert_eq!(flags & (1 << 8), 0, "no multi-conn with one connection");
    let mut second = t.connect(); // queued in the listen backlog
    let greeted = Arc::new(AtomicBool::new(false));
    let g = greeted.clone();
    let waiter = std::thread::spawn(move || {
        let magic = read_u64(&mut second);
        g.store(true, Ordering::SeqCst);
        magic
    });
    for i in 0..20 {
        send_request(&mut first, 0, 3, i, 0, 0);
        assert_eq!(read_simple_reply(&mut first), (0, i));
    }
    assert!(
        !greeted.load(Ordering::SeqCst),
        "second client served while the first holds the only slot"
    );
    send_request(&mut first, 0, 2, 99, 0, 0); // NBD_CMD_DISC
    assert!(is_closed(&mut first));
    assert_eq!(waiter.join().unwrap(), 0x4e42_444d_4147_4943);
}

#[test]
fn misaligned_requests_are_refused() {
    let t = TestServer::start(
        MemDriver::with(MIB, 512, false),
        ServerConfig::default(),
        true,
    );
    let mut s = t.connect();
    raw_greet(&mut s);
    // NBD_OPT_INFO without NBD_INFO_BLOCK_SIZE on an aligned export: BLOCK_SIZE info, then
    // NBD_REP_ERR_BLOCK_SIZE_REQD.
    send_option(&mut s, 6, &[0, 0, 0, 1, b'e', 0, 0]);
    let mut saw_block_size = None;
    loop {
        let (_, ty, data) = read_option_reply(&mut s);
        if ty == 3 && data[..2] == [0, 3] {
            saw_block_size = Some(u32::from_be_bytes(data[2..6].try_into().unwrap()));
        }
        if ty != 3 {
            assert_eq!(ty, ERR_BLOCK_SIZE_REQD);
            break;
        }
    }
    assert_eq!(saw_block_size, Some(512));
    raw_go(&mut s, "e");
    send_request(&mut s, 0, 0, 1, 100, 512);
    assert_eq!(read_simple_reply(&mut s), (NBD_EINVAL, 1));
    send_request(&mut s, 0, 0, 2, 512, 512);
    assert_eq!(read_simple_reply(&mut s), (0, 2));
    let mut b = vec![0u8; 512];
    s.read_exact(&mut b).unwrap();
}

#[test]
fn extended_headers_block_status_and_read() {
    let t = TestServer::default_with(8 * MIB);
    t.disk.fill(MIB, &pattern(8192, 5));
    let mut s = t.connect();
    raw_greet(&mut s);
    send_option(&mut s, 11, &[]);
    assert_eq!(read_option_reply(&mut s).1, 1);
    // Structured replies after extended headers: NBD_REP_ERR_EXT_HEADER_REQD.
    send_option(&mut s, 8, &[]);
    assert_eq!(read_option_reply(&mut s).1, (1 << 31) + 10);
    let mut meta = Vec::new();
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.push(b'e');
    meta.extend_from_slice(&2u32.to_be_bytes());
    for q in ["base:allocation", "x-unknown:thing"] {
        meta.extend_from_slice(&(q.len() as u32).to_be_bytes());
        meta.extend_from_slice(q.as_bytes());
    }
    send_option(&mut s, 10, &meta);
    let (_, ty, data) = read_option_reply(&mut s);
    assert_eq!(ty, 4);
    assert_eq!(&data[4..], b"base:allocation");
    let id = u32::from_be_bytes(data[..4].try_into().unwrap());
    assert_eq!(read_option_reply(&mut s).1, 1);
    let (_, flags) = raw_go(&mut s, "e");
    assert_ne!(flags & (1 << 7), 0, "SEND_DF");
    assert_ne!(flags & (1 << 12), 0, "BLOCK_STAT_PAYLOAD");

    // Block status with a 64-bit effect length past the end: "The server SHOULD return
    // NBD_EINVAL if it receives a NBD_CMD_BLOCK_STATUS request with an effect length
    // exceeding the size of the export."
    send_ext_request(&mut s, 0, 7, 11, 0, 1 << 33);
    let c = read_chunk(&mut s);
    assert_eq!((c.ty, c.flags, c.cookie), ((1 << 15) + 1, 1, 11));
    assert_eq!(&c.payload[..4], &NBD_EINVAL.to_be_bytes());
    send_ext_request(&mut s, 0, 7, 12, 0, 8 * MIB);
    let c = read_chunk(&mut s);
    assert_eq!((c.ty, c.flags, c.cookie, c.offset), (6, 1, 12, 0));
    assert_eq!(u32::from_be_bytes(c.payload[..4].try_into().unwrap()), id);
    assert_eq!(u32::from_be_bytes(c.payload[4..8].try_into().unwrap()), 3);
    let desc: Vec<(u64, u64)> = c.payload[8..]
        .chunks(16)
        .map(|d| {
            (
                u64::from_be_bytes(d[..8].try_into().unwrap()),
                u64::from_be_bytes(d[8..].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(desc, vec![(MIB, 3), (8192, 0), (7 * MIB - 8192, 3)]);

    // Payload form: effect length in the payload, one context id.
    let mut payload = Vec::new();
    payload.extend_from_slice(&4096u64.to_be_bytes());
    payload.extend_from_slice(&id.to_be_bytes());
    send_ext_request(&mut s, 1 << 5, 7, 13, MIB, payload.len() as u64);
    s.write_all(&payload).unwrap();
    let c = read_chunk(&mut s);
    assert_eq!((c.ty, c.cookie, c.offset), (6, 13, MIB));
    assert_eq!(
        &c.payload[8..],
        &[0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );

    // A write with PAYLOAD_LEN, a flush, a DF read: all extended replies.
    send_ext_request(&mut s, 1 << 5, 1, 14, 4096, 4);
    s.write_all(b"1234").unwrap();
    let c = read_chunk(&mut s);
    assert_eq!((c.ty, c.flags, c.cookie, c.offset), (0, 1, 14, 4096));
    send_ext_request(&mut s, 1 << 2, 0, 15, 4096, 4);
    let c = read_chunk(&mut s);
    assert_eq!((c.ty, c.flags, c.cookie), (1, 1, 15));
    assert_eq!(&c.payload[..8], &4096u64.to_be_bytes());
    assert_eq!(&c.payload[8..], b"1234");
    // Sparse read over a hole and data.
    send_ext_request(&mut s, 0, 0, 16, MIB - 65536, 65536 + 8192);
    let hole = read_chunk(&mut s);
    assert_eq!((hole.ty, hole.flags), (2, 0));
    assert_eq!(&hole.payload[8..], &65536u32.to_be_bytes());
    let data = read_chunk(&mut s);
    assert_eq!((data.ty, data.flags), (1, 1));
    assert_eq!(&data.payload[8..], &pattern(8192, 5)[..]);
    // Unknown command with an extended header and a payload: consumed, EINVAL.
    send_ext_request(&mut s, 1 << 5, 77, 17, 0, 3);
    s.write_all(b"abc").unwrap();
    let c = read_chunk(&mut s);
    assert_eq!((c.ty, c.cookie), ((1 << 15) + 1, 17));
    assert_eq!(&c.payload[..4], &NBD_EINVAL.to_be_bytes());
}

#[test]
fn remove_export_safe_hard_and_stop() {
    let t = TestServer::default_with(MIB);
    let mut s = t.connect();
    raw_greet(&mut s);
    raw_go(&mut s, "e");
    send_request(&mut s, 0, 3, 1, 0, 0);
    assert_eq!(read_simple_reply(&mut s), (0, 1));
    assert_eq!(t.server.client_count("e"), 1);
    assert_eq!(t.server.export_names(), vec!["e".to_string()]);
    let err = t.server.remove_export("e", RemoveMode::Safe).unwrap_err();
    assert_eq!(err.to_string(), "export 'e' still in use");
    assert!(t.server.remove_export("zzz", RemoveMode::Hard).is_err());
    assert_eq!(t.node.users().len(), 1);
    let gone = t.server.remove_export("e", RemoveMode::Hard).unwrap();
    t.runtime.block_on(gone);
    assert!(is_closed(&mut s));
    assert!(t.node.users().is_empty(), "attachment released");
    assert!(t.server.export_names().is_empty());
    // New clients no longer find it.
    let mut s = t.connect();
    raw_greet(&mut s);
    send_option(&mut s, 7, &[0, 0, 0, 1, b'e', 0, 0]);
    assert_eq!(read_option_reply(&mut s).1, ERR_UNKNOWN);
    // stop() ends handshakes in progress too.
    t.server.stop();
    assert!(is_closed(&mut s));
}

#[test]
fn safe_removal_without_clients_and_name_reuse() {
    let t = TestServer::default_with(MIB);
    let gone = t.server.remove_export("e", RemoveMode::Safe).unwrap();
    t.runtime.block_on(gone);
    assert!(t.node.users().is_empty());
    // The name is free again.
    t.server
        .add_export(
            nbd_server::ExportConfig::new("e", t.node.attach("export 'e'", false).unwrap())
                .writethrough(true),
        )
        .unwrap();
    let dup = t.server.add_export(nbd_server::ExportConfig::new(
        "e",
        t.node.attach("export 'e'", false).unwrap(),
    ));
    assert_eq!(
        dup.unwrap_err().to_string(),
        "NBD server already has export named 'e'"
    );
    let mut s = t.connect();
    raw_greet(&mut s);
    let (_, flags) = raw_go(&mut s, "e");
    assert_ne!(flags & 2, 0, "read-only now");
    send_request(&mut s, 0, 1, 1, 0, 4);
    s.write_all(b"abcd").unwrap();
    assert_eq!(read_simple_reply(&mut s), (1, 1), "NBD_EPERM");
}

#[test]
fn replies_come_back_out_of_order() {
    let mut disk = MemDriver::new(MIB);
    disk.gated_offset = Some(65536);
    disk.fill(0, b"first");
    let t = TestServer::start(disk, ServerConfig::default(), true);
    let mut s = t.connect();
    raw_greet(&mut s);
    raw_go(&mut s, "e");
    // Cookie 1 waits in the driver; cookies 2..=5 are served meanwhile.
    send_request(&mut s, 0, 0, 1, 65536, 5);
    for cookie in 2..=5 {
        send_request(&mut s, 0, 0, cookie, 0, 5);
    }
    for cookie in 2..=5 {
        assert_eq!(read_simple_reply(&mut s), (0, cookie));
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"first");
    }
    t.disk.gate.add_permits(1);
    assert_eq!(read_simple_reply(&mut s), (0, 1));
    let mut b = [1u8; 5];
    s.read_exact(&mut b).unwrap();
    assert_eq!(b, [0; 5]);
}

#[test]
fn hard_removal_finishes_requests_in_flight() {
    let mut disk = MemDriver::new(MIB);
    disk.gated_offset = Some(4096);
    let t = TestServer::start(disk, ServerConfig::default(), true);
    let mut s = t.connect();
    raw_greet(&mut s);
    raw_go(&mut s, "e");
    send_request(&mut s, 0, 0, 1, 4096, 16);
    // The request is in flight once a later one has been answered.
    send_request(&mut s, 0, 3, 2, 0, 0);
    assert_eq!(read_simple_reply(&mut s), (0, 2));
    let gone = t.server.remove_export("e", RemoveMode::Hard).unwrap();
    assert_eq!(
        t.node.users().len(),
        1,
        "still held by the request in flight"
    );
    t.disk.gate.add_permits(1);
    // Its reply still arrives, then the connection closes.
    assert_eq!(read_simple_reply(&mut s), (0, 1));
    let mut b = [1u8; 16];
    s.read_exact(&mut b).unwrap();
    assert_eq!(b, [0; 16]);
    assert!(is_closed(&mut s));
    t.runtime.block_on(gone);
    assert!(t.node.users().is_empty());
}

#[test]
fn option_longer_than_32_mib_ends_the_handshake() {
    let t = TestServer::default_with(MIB);
    let mut s = t.connect();
    raw_greet(&mut s);
    let mut m = Vec::new();
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&6u32.to_be_bytes());
    m.extend_from_slice(&((32u32 << 20) + 1).to_be_bytes());
    s.write_all(&m).unwrap();
    assert!(is_closed(&mut s));
    // Bad option magic ends it too.
    let mut s = t.connect();
    raw_greet(&mut s);
    s.write_all(&[0u8; 16]).unwrap();
    assert!(is_closed(&mut s));
}
