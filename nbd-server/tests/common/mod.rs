//! Shared test support: an in-memory driver with hole tracking, a server on a unix socket
//! in a temp dir (tokio runtime on a background thread), tool checks and a raw client.

#![allow(dead_code)]

use block_core::{BlockDriver, Node};
use nbd_server::{ExportConfig, NbdServer, ServerConfig};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

// Each test file takes what it needs of these.
#[allow(unused_imports)]
pub use test_support::{require_python_nbd, require_tool, run_ok, MemDriver, BLOCK};

/// A server running on a background runtime, listening on a unix socket.
pub struct TestServer {
    pub server: NbdServer,
    pub socket: PathBuf,
    pub disk: Arc<MemDriver>,
    pub node: Arc<Node>,
    pub runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// A server exporting `disk` as `e` (writable unless `writable` is false).
    pub fn start(disk: MemDriver, config: ServerConfig, writable: bool) -> Self {
        Self::start_with(disk, config, move |node| {
            let mut e = ExportConfig::new("e", node.attach("export 'e'", writable).unwrap());
            e.description = Some("a test export".into());
            e
        })
    }

    /// A server exporting `disk` as `export` makes it from the node.
    pub fn start_with(
        disk: MemDriver,
        config: ServerConfig,
        export: impl FnOnce(&Arc<Node>) -> ExportConfig,
    ) -> Self {
        let disk = Arc::new(disk);
        let node = Node::new("n", disk.clone() as Arc<dyn BlockDriver>, Vec::new());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let server = NbdServer::new(config);
        server.add_export(export(&node)).unwrap();
        // Bound before the accept loop starts: clients can connect as soon as this returns.
        let listener = {
            let _guard = runtime.enter();
            tokio::net::UnixListener::bind(&socket).unwrap()
        };
        let s = server.clone();
        runtime.spawn(async move { s.serve_unix(listener).await });
        TestServer {
            server,
            socket,
            disk,
            node,
            runtime,
            _dir: dir,
        }
    }

    pub fn default_with(size: u64) -> Self {
        Self::start(MemDriver::new(size), ServerConfig::default(), true)
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///e?socket={}", self.socket.display())
    }

    pub fn connect(&self) -> UnixStream {
        UnixStream::connect(&self.socket).unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.server.stop();
    }
}

/// A deterministic pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

// ---- a raw client for edge cases no library client sends ----

pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;

pub fn read_u16(s: &mut UnixStream) -> u16 {
    let mut b = [0; 2];
    s.read_exact(&mut b).unwrap();
    u16::from_be_bytes(b)
}

pub fn read_u32(s: &mut UnixStream) -> u32 {
    let mut b = [0; 4];
    s.read_exact(&mut b).unwrap();
    u32::from_be_bytes(b)
}

pub fn read_u64(s: &mut UnixStream) -> u64 {
    let mut b = [0; 8];
    s.read_exact(&mut b).unwrap();
    u64::from_be_bytes(b)
}

/// Reads the greeting and sends the client flags (fixed newstyle, no zeroes).
pub fn raw_greet(s: &mut UnixStream) {
    assert_eq!(read_u64(s), 0x4e42_444d_4147_4943);
    assert_eq!(read_u64(s), IHAVEOPT);
    assert_eq!(read_u16(s), 3);
    s.write_all(&3u32.to_be_bytes()).unwrap();
}

pub fn send_option(s: &mut UnixStream, option: u32, data: &[u8]) {
    let mut m = Vec::new();
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).unwrap();
}

/// Reads one option reply: (option, reply type, data).
pub fn read_option_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    assert_eq!(read_u64(s), 0x0003_e889_0455_65a9);
    let option = read_u32(s);
    let ty = read_u32(s);
    let len = read_u32(s) as usize;
    let mut data = vec![0; len];
    s.read_exact(&mut data).unwrap();
    (option, ty, data)
}

/// Sends `NBD_OPT_GO` for `name` and reads replies up to the ACK; returns (size, flags).
pub fn raw_go(s: &mut UnixStream, name: &str) -> (u64, u16) {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    send_option(s, 7, &d);
    let mut export = None;
    loop {
        let (opt, ty, data) = read_option_reply(s);
        assert_eq!(opt, 7);
        match ty {
            1 => break,
            3 => {
                if u16::from_be_bytes([data[0], data[1]]) == 0 {
                    let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    let flags = u16::from_be_bytes([data[10], data[11]]);
                    export = Some((size, flags));
                }
            }
            other => panic!(
                "unexpected reply type {other:x}: {}",
                String::from_utf8_lossy(&data)
            ),
        }
    }
    export.expect("no NBD_INFO_EXPORT")
}

/// Sends a compact request.
pub fn send_request(s: &mut UnixStream, flags: u16, ty: u16, cookie: u64, offset: u64, len: u32) {
    let mut m = Vec::new();
    m.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&ty.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    s.write_all(&m).unwrap();
}

/// Sends an extended request.
pub fn send_ext_request(
    s: &mut UnixStream,
    flags: u16,
    ty: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) {
    let mut m = Vec::new();
    m.extend_from_slice(&0x21e4_1c71u32.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&ty.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    s.write_all(&m).unwrap();
}

/// Reads a simple reply: (error, cookie).
pub fn read_simple_reply(s: &mut UnixStream) -> (u32, u64) {
    assert_eq!(read_u32(s), 0x6744_6698);
    let err = read_u32(s);
    (err, read_u64(s))
}

/// A structured or extended chunk: (flags, type, cookie, offset (extended only), payload).
#[derive(Debug)]
pub struct Chunk {
    pub flags: u16,
    pub ty: u16,
    pub cookie: u64,
    pub offset: u64,
    pub payload: Vec<u8>,
}

pub fn read_chunk(s: &mut UnixStream) -> Chunk {
    let magic = read_u32(s);
    let flags = read_u16(s);
    let ty = read_u16(s);
    let cookie = read_u64(s);
    let (offset, len) = match magic {
        0x668e_33ef => (0, read_u32(s) as usize),
        0x6e8a_278c => {
            let o = read_u64(s);
            (o, read_u64(s) as usize)
        }
        other => panic!("bad reply magic {other:x}"),
    };
    let mut payload = vec![0; len];
    s.read_exact(&mut payload).unwrap();
    Chunk {
        flags,
        ty,
        cookie,
        offset,
        payload,
    }
}
