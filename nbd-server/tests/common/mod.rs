//! Shared test support: an in-memory driver with hole tracking, a server on a unix socket
//! in a temp dir (tokio runtime on a background thread), tool checks and a raw client.

#![allow(dead_code)]

use async_trait::async_trait;
use block_core::{BlockDriver, BlockError, Extent, Node, WriteFlags, ZeroFlags};
use nbd_server::{ExportConfig, NbdServer, ServerConfig};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Arc, RwLock};

/// Granularity of the hole map.
pub const BLOCK: u64 = 4096;

/// A disk in memory. Each 4 KiB block is allocated or a hole (reads as zeroes).
#[derive(Debug)]
pub struct MemDisk {
    state: RwLock<(Vec<u8>, Vec<bool>)>,
    alignment: u32,
    read_only: bool,
    /// Reads at this offset wait for a permit of `gate` (to hold a request in flight).
    pub gated_offset: Option<u64>,
    pub gate: tokio::sync::Semaphore,
    /// Per block: a backing chain depth reported instead of the default (1 if allocated,
    /// else 0); 0 keeps the default. Lets tests pretend a block lives in a backing file.
    depths: RwLock<Vec<u32>>,
}

impl MemDisk {
    pub fn new(size: u64) -> Self {
        Self::with(size, 1, false)
    }

    pub fn with(size: u64, alignment: u32, read_only: bool) -> Self {
        let blocks = size.div_ceil(BLOCK) as usize;
        MemDisk {
            state: RwLock::new((vec![0; size as usize], vec![false; blocks])),
            alignment,
            read_only,
            gated_offset: None,
            gate: tokio::sync::Semaphore::new(0),
            depths: RwLock::new(vec![0; blocks]),
        }
    }

    /// A copy of the whole content.
    pub fn contents(&self) -> Vec<u8> {
        self.state.read().unwrap().0.clone()
    }

    /// Whether the block holding `offset` is allocated.
    pub fn allocated(&self, offset: u64) -> bool {
        self.state.read().unwrap().1[(offset / BLOCK) as usize]
    }

    /// Writes directly (test setup), allocating the blocks.
    pub fn fill(&self, offset: u64, data: &[u8]) {
        let mut s = self.state.write().unwrap();
        s.0[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        for b in offset / BLOCK..(offset + data.len() as u64).div_ceil(BLOCK) {
            s.1[b as usize] = true;
        }
    }

    /// Reports `depth` for the blocks of `[offset, offset+len)` (block aligned).
    pub fn set_depth(&self, offset: u64, len: u64, depth: u32) {
        let mut d = self.depths.write().unwrap();
        for b in offset / BLOCK..(offset + len).div_ceil(BLOCK) {
            d[b as usize] = depth;
        }
    }

    /// Zeroes the range; with `unmap`, blocks it covers completely become holes, else
    /// every block it touches is allocated.
    fn zero(&self, offset: u64, len: u64, unmap: bool) {
        let mut s = self.state.write().unwrap();
        s.0[offset as usize..(offset + len) as usize].fill(0);
        if unmap {
            for b in offset.div_ceil(BLOCK)..(offset + len) / BLOCK {
                s.1[b as usize] = false;
            }
        } else {
            for b in offset / BLOCK..(offset + len).div_ceil(BLOCK) {
                s.1[b as usize] = true;
            }
        }
    }
}

impl block_core::ImageFacts for MemDisk {
    fn driver_name(&self) -> &'static str {
        "mem"
    }
}

#[async_trait]
impl block_core::BlockIo for MemDisk {
    fn size(&self) -> u64 {
        self.state.read().unwrap().0.len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn request_alignment(&self) -> u32 {
        self.alignment
    }

    async fn readv(&self, offset: u64, buf: &block_core::SgList) -> block_core::Result<()> {
        if self.gated_offset == Some(offset) {
            self.gate.acquire().await.unwrap().forget();
        }
        let s = self.state.read().unwrap();
        buf.copy_from_slice(0, &s.0[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    async fn writev(
        &self,
        offset: u64,
        buf: &block_core::SgList,
        _flags: WriteFlags,
    ) -> block_core::Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        self.fill(offset, &buf.to_vec());
        Ok(())
    }

    async fn flush(&self) -> block_core::Result<()> {
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> block_core::Result<()> {
        self.zero(offset, len, true);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> block_core::Result<()> {
        // Zeroing without unmapping writes every byte: not fast.
        if flags.fast && !flags.may_unmap {
            return Err(BlockError::NotFast);
        }
        self.zero(offset, len, flags.may_unmap);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> block_core::Result<Extent> {
        let s = self.state.read().unwrap();
        let depths = self.depths.read().unwrap();
        let status = |b: usize| {
            let allocated = s.1[b];
            let depth = match depths[b] {
                0 => u32::from(allocated),
                d => d,
            };
            (allocated, depth)
        };
        let first = (offset / BLOCK) as usize;
        let (allocated, depth) = status(first);
        let mut end = (first as u64 + 1) * BLOCK;
        while end < offset + len && status((end / BLOCK) as usize) == (allocated, depth) {
            end += BLOCK;
        }
        Ok(Extent {
            len: end.min(offset + len) - offset,
            data: depth > 0,
            zero: !allocated && depth == 0,
            depth,
        })
    }
}

#[async_trait]
impl BlockDriver for MemDisk {}

/// A server running on a background runtime, listening on a unix socket.
pub struct TestServer {
    pub server: NbdServer,
    pub socket: PathBuf,
    pub disk: Arc<MemDisk>,
    pub node: Arc<Node>,
    pub runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// A server exporting `disk` as `e` (writable unless `writable` is false).
    pub fn start(disk: MemDisk, config: ServerConfig, writable: bool) -> Self {
        Self::start_with(disk, config, move |node| {
            let mut e = ExportConfig::new("e", node.attach("export 'e'", writable).unwrap());
            e.description = Some("a test export".into());
            e
        })
    }

    /// A server exporting `disk` as `export` makes it from the node.
    pub fn start_with(
        disk: MemDisk,
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
        Self::start(MemDisk::new(size), ServerConfig::default(), true)
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

/// Whether `tool` can run. Under `CI=true` a missing tool fails the test; otherwise the
/// test is skipped with a message.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("required tool {tool} is missing (CI=true)");
        }
        eprintln!("SKIP: {tool} not installed");
    }
    found
}

/// Whether python3 can import the libnbd binding (same CI rule as [`have`]).
pub fn have_python_nbd() -> bool {
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("the libnbd python binding is missing (CI=true)");
        }
        eprintln!("SKIP: python3 nbd module not installed");
    }
    ok
}

/// Runs a command and returns its output, panicking with its stderr on failure.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("failed to spawn");
    assert!(
        out.status.success(),
        "{:?} failed: {}\n{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
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
