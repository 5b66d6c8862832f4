//! The server against the real clients: qemu-io, qemu-img, nbdinfo, nbdcopy and libnbd.

mod common;

use common::*;
use nbd_server::ServerConfig;
use std::process::Command;

const MIB: u64 = 1 << 20;

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    cmd.arg(uri);
    let out = run_ok(&mut cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "qemu-io reported a failure: {text}"
    );
    text
}

#[test]
fn qemu_io_write_read_zero_discard_flush() {
    if !require_tool("qemu-io") {
        return;
    }
    let t = TestServer::default_with(4 * MIB);
    // qemu-io (QEMU 10's client) negotiates extended headers and base:allocation.
    qemu_io(
        &t.uri(),
        &[
            "write -P 0xab 0 64k",
            "write -P 0xcd 1M 8k",
            "write -z 64k 64k",
            "discard 2M 1M",
            "flush",
            "read -P 0xab 0 64k",
            "read -P 0 64k 64k",
            "read -P 0xcd 1M 8k",
            "read -P 0 2M 1M",
        ],
    );
    let data = t.disk.contents();
    assert!(data[..65536].iter().all(|&b| b == 0xab));
    assert!(data[65536..131072].iter().all(|&b| b == 0));
    assert!(data[MIB as usize..MIB as usize + 8192]
        .iter()
        .all(|&b| b == 0xcd));
    assert!(!t.disk.is_allocated(2 * MIB));
    // A pattern mismatch is detected (the check above is not vacuous).
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x11 0 4k", &t.uri()])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Pattern verification failed"), "{text}");
}

#[test]
fn qemu_img_info_map_convert_compare() {
    if !require_tool("qemu-img") {
        return;
    }
    let t = TestServer::default_with(8 * MIB);
    let a = pattern(256 * 1024, 7);
    t.disk.fill(0, &a);
    t.disk.fill(5 * MIB, &a[..8192]);
    let uri = t.uri();

    let info = run_ok(Command::new("qemu-img").args(["info", "--output=json", &uri]));
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains(&format!("\"virtual-size\": {}", 8 * MIB)),
        "{info}"
    );

    let map = run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    let map = String::from_utf8_lossy(&map.stdout);
    // Data at [0, 256k) and [5M, 5M+8k); zero holes elsewhere.
    assert!(
        map.contains("\"start\": 0, \"length\": 262144, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"),
        "{map}"
    );
    assert!(
        map.contains("\"start\": 5242880, \"length\": 8192, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"),
        "{map}"
    );
    assert!(
        map.contains("\"start\": 262144, \"length\": 4980736, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false"),
        "{map}"
    );

    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.raw");
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &uri,
        copy.to_str().unwrap(),
    ]));
    assert_eq!(std::fs::read(&copy).unwrap(), t.disk.contents());
    run_ok(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &uri,
        copy.to_str().unwrap(),
    ]));
    // And a difference is found.
    let mut other = std::fs::read(&copy).unwrap();
    other[5 * MIB as usize + 10] ^= 0xff;
    std::fs::write(&copy, &other).unwrap();
    let st = Command::new("qemu-img")
        .args([
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &uri,
            copy.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(
        st.status.code(),
        Some(1),
        "compare must report a difference"
    );

    // Convert into the export (writes, zeroes) and read it back.
    let src = dir.path().join("src.raw");
    let content = pattern(8 * MIB as usize, 99);
    std::fs::write(&src, &content).unwrap();
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        src.to_str().unwrap(),
        &uri,
    ]));
    assert!(t.disk.contents() == content, "converted content differs");
}

#[test]
fn nbdinfo_json_list_map() {
    if !require_tool("nbdinfo") {
        return;
    }
    let t = TestServer::default_with(2 * MIB);
    t.disk.fill(MIB, &pattern(4096, 1));
    let uri = t.uri();
    let out = run_ok(Command::new("nbdinfo").args(["--json", &uri]));
    let json = String::from_utf8_lossy(&out.stdout);
    for expect in [
        "\"export-size\": 2097152",
        "\"description\": \"a test export\"",
        "\"is_read_only\": false",
        "\"is_rotational\": false",
        "\"can_cache\": true",
        "\"can_df\": true",
        "\"can_fast_zero\": true",
        "\"can_flush\": true",
        "\"can_fua\": true",
        "\"can_multi_conn\": true",
        "\"can_trim\": true",
        "\"can_zero\": true",
        "\"block_size_minimum\": 1",
        "\"block_size_preferred\": 4096",
        "\"block_size_maximum\": 33554432",
        "\"base:allocation\"",
        "\"structured\": true",
    ] {
        assert!(json.contains(expect), "missing {expect} in {json}");
    }

    let out = run_ok(Command::new("nbdinfo").args(["--list", "--json", &uri]));
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(list.contains("\"export-name\": \"e\""), "{list}");

    let out = run_ok(Command::new("nbdinfo").args(["--map", &uri]));
    let map = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines.len(), 3, "{map}");
    assert_eq!(&lines[0][..3], ["0", "1048576", "3"], "{map}");
    assert_eq!(&lines[1][..3], ["1048576", "4096", "0"], "{map}");
    assert_eq!(&lines[2][..3], ["1052672", "1044480", "3"], "{map}");

    // A read-only export says so.
    let ro = TestServer::start(MemDriver::new(MIB), ServerConfig::default(), false);
    let out = run_ok(Command::new("nbdinfo").args(["--json", &ro.uri()]));
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(json.contains("\"is_read_only\": true"), "{json}");
    assert!(json.contains("\"can_trim\": false"), "{json}");
    // max-connections 1 clears multi-conn.
    let single = TestServer::start(
        MemDriver::new(MIB),
        ServerConfig::default()
            .max_connections(1)
            .handshake_max(None)
            .tls(None),
        true,
    );
    let out = run_ok(Command::new("nbdinfo").args(["--json", &single.uri()]));
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(json.contains("\"can_multi_conn\": false"), "{json}");
}

#[test]
fn nbdcopy_four_connections_both_ways() {
    if !require_tool("nbdcopy") {
        return;
    }
    let size = 16 * MIB;
    let t = TestServer::default_with(size);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let mut content = pattern(size as usize, 3);
    // Leave a zero region so that the copy exercises zeroing too.
    content[4 * MIB as usize..6 * MIB as usize].fill(0);
    std::fs::write(&src, &content).unwrap();
    run_ok(Command::new("nbdcopy").args([
        "--connections=4",
        "--requests=16",
        src.to_str().unwrap(),
        &t.uri(),
    ]));
    assert!(t.disk.contents() == content, "content differs after upload");
    let back = dir.path().join("back.raw");
    run_ok(Command::new("nbdcopy").args(["--connections=4", &t.uri(), back.to_str().unwrap()]));
    assert!(
        std::fs::read(&back).unwrap() == content,
        "content differs after download"
    );
}

/// Edge cases through libnbd (python binding): error codes the spec names.
#[test]
fn libnbd_error_codes() {
    if !require_python_nbd() {
        return;
    }
    let t = TestServer::default_with(MIB);
    let ro = TestServer::start(MemDriver::new(MIB), ServerConfig::default(), false);
    let script = r#"
import nbd, sys, errno
def expect(name, fn, code):
    try:
        fn()
    except nbd.Error as e:
        # This libnbd reports errno as a name ("EINVAL"); newer ones as a number.
        got = e.errno if isinstance(e.errno, int) else getattr(errno, e.errno, e.errno)
        assert got == code, f"{name}: got {e.errno} {e.string}, want {errno.errorcode[code]}"
        return
    raise AssertionError(f"{name}: no error, want {code}")

h = nbd.NBD()
h.set_strict_mode(0)
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
size = h.get_size()
assert size == 1048576
expect("read past end", lambda: h.pread(512, size - 256), errno.EINVAL)
expect("read beyond", lambda: h.pread(512, size + 4096), errno.EINVAL)
expect("write past end", lambda: h.pwrite(b"x" * 512, size - 256), errno.ENOSPC)
expect("zero past end", lambda: h.zero(512, size - 256), errno.ENOSPC)
expect("trim past end", lambda: h.trim(512, size - 256), errno.EINVAL)
expect("cache past end", lambda: h.cache(512, size - 256), errno.EINVAL)
expect("block status past end", lambda: h.block_status(512, size - 256, lambda *a: 0), errno.EINVAL)
expect("block status len 0", lambda: h.block_status(0, 0, lambda *a: 0), errno.EINVAL)
expect("unknown flag", lambda: h.pread(512, 0, flags=1 << 9), errno.EINVAL)
expect("REQ_ONE on read", lambda: h.pread(512, 0, flags=nbd.CMD_FLAG_REQ_ONE), errno.EINVAL)
expect("oversize read", lambda: h.pread(33 * 1024 * 1024, 0), errno.EINVAL)
expect("oversize read with DF", lambda: h.pread(33 * 1024 * 1024, 0, flags=nbd.CMD_FLAG_DF), errno.EOVERFLOW)
expect("fast zero without hole", lambda: h.zero(4096, 0, flags=nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE), errno.ENOTSUP)
# Still alive and correct after all of that.
h.pwrite(b"\x5a" * 4096, 8192, flags=nbd.CMD_FLAG_FUA)
assert h.pread(4096, 8192, flags=nbd.CMD_FLAG_FUA) == b"\x5a" * 4096
h.zero(4096, 0, flags=nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(0, 0) == b""
# Sparse structured read: data chunk then a hole chunk.
chunks = []
h.pread_structured(65536 * 2, 0, lambda buf, off, st, err: chunks.append((off, len(buf), st)) or 0)
assert (8192, 4096, nbd.READ_DATA) in chunks, chunks
assert any(st == nbd.READ_HOLE for (_, _, st) in chunks), chunks
# Block status: REQ_ONE gives exactly one extent.
ents = []
h.block_status(65536, 0, lambda meta, off, e, err: ents.append((meta, e)) or 0, flags=nbd.CMD_FLAG_REQ_ONE)
assert ents == [("base:allocation", [8192, 3])], ents
ents = []
h.block_status(65536, 0, lambda meta, off, e, err: ents.append((meta, e)) or 0)
assert ents == [("base:allocation", [8192, 3, 4096, 0, 53248, 3])], ents
h.flush()
h.shutdown()

# Without structured replies: simple replies.
h = nbd.NBD()
h.set_strict_mode(0)
h.set_request_structured_replies(False)
h.connect_uri(sys.argv[1])
assert not h.get_structured_replies_negotiated()
assert h.pread(4096, 8192) == b"\x5a" * 4096
expect("simple read past end", lambda: h.pread(512, size - 256), errno.EINVAL)
expect("simple oversize read", lambda: h.pread(33 * 1024 * 1024, 0), errno.EINVAL)
expect("block status not negotiated", lambda: h.block_status(512, 0, lambda *a: 0), errno.EINVAL)
h.shutdown()

# Read-only export: EPERM for writes, trims and zeroes.
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[2])
assert h.is_read_only()
expect("write ro", lambda: h.pwrite(b"x" * 512, 0), errno.EPERM)
expect("trim ro", lambda: h.trim(512, 0), errno.EPERM)
expect("zero ro", lambda: h.zero(512, 0), errno.EPERM)
assert h.pread(512, 0) == b"\0" * 512
h.shutdown()

# Unknown export: the option fails, the server lives.
h = nbd.NBD()
try:
    h.connect_uri(sys.argv[1].replace("///e?", "///nope?"))
    raise AssertionError("connected to a missing export")
except nbd.Error as e:
    assert "no export named" in e.string, e.string
print("ok")
"#;
    let out = run_ok(Command::new("/usr/bin/python3").args(["-c", script, &t.uri(), &ro.uri()]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    assert!(t.disk.contents()[8192..12288].iter().all(|&b| b == 0x5a));
}

#[test]
fn nbdsh_list_and_info() {
    if !require_tool("nbdsh") || !require_python_nbd() {
        return;
    }
    let t = TestServer::default_with(MIB);
    // nbdsh runs the first python3 on PATH: use the system one, which has the binding.
    let path = format!(
        "/usr/bin:/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    let out = run_ok(Command::new("nbdsh").env("PATH", path).args([
        "-u",
        &t.uri(),
        "-c",
        "assert h.get_export_name() == 'e'\nassert h.get_size() == 1048576\nassert h.can_multi_conn()\nprint(h.get_block_size(nbd.SIZE_MAXIMUM))",
    ]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "33554432");
}

#[test]
fn tcp_listener_serves_qemu_io() {
    if !require_tool("qemu-io") {
        return;
    }
    let t = TestServer::default_with(MIB);
    let listener = {
        let _guard = t.runtime.enter();
        let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std.set_nonblocking(true).unwrap();
        tokio::net::TcpListener::from_std(std).unwrap()
    };
    let port = listener.local_addr().unwrap().port();
    let s = t.server.clone();
    t.runtime.spawn(async move { s.serve_tcp(listener).await });
    let uri = format!("nbd://127.0.0.1:{port}/e");
    qemu_io(&uri, &["write -P 0x42 4k 4k", "read -P 0x42 4k 4k"]);
    assert!(t.disk.contents()[4096..8192].iter().all(|&b| b == 0x42));
}

/// `qemu-nbd --list` shows what QEMU's client negotiates (extended headers: "transaction
/// size: 64-bit") and the flags; the expected text is what QSD 10 prints for the same export.
#[test]
fn qemu_nbd_list_matches_qsd() {
    if !require_tool("qemu-nbd") {
        return;
    }
    let t = TestServer::default_with(MIB);
    let out = run_ok(Command::new("qemu-nbd").args(["--list", "-k", t.socket.to_str().unwrap()]));
    let text = String::from_utf8_lossy(&out.stdout);
    let expected = "exports available: 1
 export: 'e'
  description: a test export
  size:  1048576
  flags: 0x1ded ( flush fua trim zeroes df multi cache fast-zero block-status-payload )
  min block: 1
  opt block: 4096
  max block: 33554432
  transaction size: 64-bit
  available meta contexts: 1
   base:allocation
";
    assert_eq!(text, expected);
}
