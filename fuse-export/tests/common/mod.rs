//! Shared helpers of the mount tests: an in-memory block driver with hole tracking, the
//! environment checks, and a mounted-export fixture.

#![allow(dead_code)]

use async_trait::async_trait;
use block_core::{BlockDriver, BlockError, Extent, Node, WriteFlags, ZeroFlags};
use fuse_export::{AllowOther, FuseExport, FuseExportConfig};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Allocation is tracked per block of this size.
pub const BLOCK: u64 = 4096;

#[derive(Debug, Default)]
struct Image {
    bytes: Vec<u8>,
    /// One flag per `BLOCK`: whether the block is allocated (data) or a hole.
    allocated: Vec<bool>,
}

impl Image {
    fn blocks(len: u64) -> usize {
        len.div_ceil(BLOCK) as usize
    }

    fn resize(&mut self, size: u64) {
        self.bytes.resize(size as usize, 0);
        self.allocated.resize(Self::blocks(size), false);
    }

    fn allocate(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = (offset / BLOCK) as usize;
        let last = ((offset + len - 1) / BLOCK) as usize;
        for flag in &mut self.allocated[first..=last] {
            *flag = true;
        }
    }
}

/// A `Vec<u8>` image behind a lock, with hole tracking, a flush counter and an optional
/// barrier that reads wait on (to prove requests run concurrently).
#[derive(Debug)]
pub struct MemDriver {
    image: Mutex<Image>,
    read_only: bool,
    pub flushes: AtomicU64,
    flushed: (Mutex<()>, std::sync::Condvar),
    /// Writes that came with FUA.
    pub fua_writes: AtomicU64,
    /// The largest write request seen.
    pub max_write: AtomicU64,
    /// Refuse fast zeroing (as a driver that cannot deallocate).
    pub slow_zeroes: std::sync::atomic::AtomicBool,
    read_barrier: Mutex<Option<Arc<tokio::sync::Barrier>>>,
}

impl MemDriver {
    /// An image of `size` bytes, all a hole.
    pub fn new(size: u64) -> Arc<MemDriver> {
        Self::with_mode(size, false)
    }

    /// Same, opened read-only.
    pub fn read_only(size: u64) -> Arc<MemDriver> {
        Self::with_mode(size, true)
    }

    fn with_mode(size: u64, read_only: bool) -> Arc<MemDriver> {
        let mut image = Image::default();
        image.resize(size);
        Arc::new(MemDriver {
            image: Mutex::new(image),
            read_only,
            flushes: AtomicU64::new(0),
            flushed: (Mutex::new(()), std::sync::Condvar::new()),
            fua_writes: AtomicU64::new(0),
            max_write: AtomicU64::new(0),
            slow_zeroes: std::sync::atomic::AtomicBool::new(false),
            read_barrier: Mutex::new(None),
        })
    }

    /// Writes `data` at `offset` directly (allocating), as set-up.
    pub fn fill(&self, offset: u64, data: &[u8]) {
        let mut image = self.image.lock().unwrap();
        let end = offset as usize + data.len();
        image.bytes[offset as usize..end].copy_from_slice(data);
        image.allocate(offset, data.len() as u64);
    }

    /// A copy of the image's bytes.
    pub fn contents(&self) -> Vec<u8> {
        self.image.lock().unwrap().bytes.clone()
    }

    /// Whether the block holding `offset` is allocated.
    pub fn is_allocated(&self, offset: u64) -> bool {
        self.image.lock().unwrap().allocated[(offset / BLOCK) as usize]
    }

    /// From now on every read waits until `n` reads are in the driver at once.
    pub fn set_read_barrier(&self, n: usize) {
        *self.read_barrier.lock().unwrap() = Some(Arc::new(tokio::sync::Barrier::new(n)));
    }

    /// Waits until the node has been flushed `n` times in all.
    pub fn wait_for_flushes(&self, n: u64) {
        let mut guard = self.flushed.0.lock().unwrap();
        while self.flushes.load(Ordering::SeqCst) < n {
            guard = self.flushed.1.wait(guard).unwrap();
        }
    }

    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }
}

impl block_core::ImageFacts for MemDriver {
    fn driver_name(&self) -> &'static str {
        "mem"
    }
}

#[async_trait]
impl block_core::BlockIo for MemDriver {
    fn size(&self) -> u64 {
        self.image.lock().unwrap().bytes.len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    async fn readv(&self, offset: u64, buf: &block_core::SgList) -> block_core::Result<()> {
        let barrier = self.read_barrier.lock().unwrap().clone();
        if let Some(barrier) = barrier {
            barrier.wait().await;
        }
        let image = self.image.lock().unwrap();
        buf.copy_from_slice(
            0,
            &image.bytes[offset as usize..offset as usize + buf.len()],
        );
        Ok(())
    }

    async fn writev(
        &self,
        offset: u64,
        buf: &block_core::SgList,
        flags: WriteFlags,
    ) -> block_core::Result<()> {
        if flags.fua {
            self.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        self.max_write.fetch_max(buf.len() as u64, Ordering::SeqCst);
        let mut image = self.image.lock().unwrap();
        buf.copy_to_slice(
            0,
            &mut image.bytes[offset as usize..offset as usize + buf.len()],
        );
        image.allocate(offset, buf.len() as u64);
        Ok(())
    }

    async fn flush(&self) -> block_core::Result<()> {
        let _guard = self.flushed.0.lock().unwrap();
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.flushed.1.notify_all();
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> block_core::Result<()> {
        if flags.fast && self.slow_zeroes.load(Ordering::SeqCst) {
            return Err(BlockError::NotFast);
        }
        let mut image = self.image.lock().unwrap();
        image.bytes[offset as usize..(offset + len) as usize].fill(0);
        if flags.may_unmap {
            // Whole blocks become holes; partial blocks stay allocated, zeroed.
            let first = offset.div_ceil(BLOCK);
            let last = (offset + len) / BLOCK;
            for block in first..last {
                image.allocated[block as usize] = false;
            }
        } else {
            image.allocate(offset, len);
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> block_core::Result<Extent> {
        let image = self.image.lock().unwrap();
        let size = image.bytes.len() as u64;
        let data = image.allocated[(offset / BLOCK) as usize];
        let mut end = (offset / BLOCK + 1) * BLOCK;
        while end < size && image.allocated[(end / BLOCK) as usize] == data {
            end += BLOCK;
        }
        let end = end.min(size).min(offset + len);
        Ok(Extent {
            len: end - offset,
            data,
            zero: !data,
            depth: u32::from(data),
        })
    }
}

#[async_trait]
impl block_core::Resize for MemDriver {
    async fn resize(&self, new_size: u64) -> block_core::Result<()> {
        if new_size > 1 << 34 {
            return Err(BlockError::NoSpace);
        }
        self.image.lock().unwrap().resize(new_size);
        Ok(())
    }
}

#[async_trait]
impl BlockDriver for MemDriver {
    fn resizer(&self) -> Option<&dyn block_core::Resize> {
        Some(self)
    }
}

/// Whether the mount tests can run here: root and a usable `/dev/fuse`. Under `CI=true` a
/// missing prerequisite fails the test; otherwise the test is skipped with a message.
pub fn fuse_usable() -> bool {
    let problem = if !nix::unistd::geteuid().is_root() {
        Some("not running as root".to_owned())
    } else {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
        {
            Ok(_) => None,
            Err(e) => Some(format!("/dev/fuse unusable: {e}")),
        }
    };
    match problem {
        None => true,
        Some(problem) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("FUSE mount tests cannot run under CI=true: {problem}");
            }
            eprintln!("skipping FUSE mount test: {problem}");
            false
        }
    }
}

/// Whether the external program `name` is installed (same CI rule as [`fuse_usable`]).
pub fn have_tool(name: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{name} is required by this test under CI=true but is not installed");
        }
        eprintln!("skipping: {name} is not installed");
    }
    found
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail, returning its stderr.
pub fn run_failing(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        !out.status.success(),
        "{cmd:?} succeeded unexpectedly: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A mounted export over a [`MemDriver`] on a fresh mountpoint in a temporary directory.
pub struct Fixture {
    pub rt: tokio::runtime::Runtime,
    pub dir: tempfile::TempDir,
    pub driver: Arc<MemDriver>,
    pub node: Arc<Node>,
    pub export: Option<FuseExport>,
}

impl Fixture {
    pub fn mount(driver: Arc<MemDriver>, writable: bool, growable: bool) -> Fixture {
        Self::mount_with(driver, writable, growable, false)
    }

    pub fn mount_with(
        driver: Arc<MemDriver>,
        writable: bool,
        growable: bool,
        writethrough: bool,
    ) -> Fixture {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mountpoint = dir.path().join("disk.raw");
        std::fs::write(&mountpoint, b"the file below the mount").unwrap();
        let node = Node::new("mem0", driver.clone(), vec![]);
        let attachment = node.attach("export 'fuse0'", writable).unwrap();
        let cfg = FuseExportConfig {
            mountpoint,
            growable,
            writable,
            writethrough,
            allow_other: AllowOther::Auto,
        };
        let export = FuseExport::mount(cfg, attachment, rt.handle().clone()).unwrap();
        Fixture {
            rt,
            dir,
            driver,
            node,
            export: Some(export),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("disk.raw")
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn unmount(&mut self) {
        if let Some(export) = self.export.take() {
            export.unmount().unwrap();
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        drop(self.export.take());
    }
}

/// Whether `path` is a mountpoint of this mount namespace.
pub fn is_mounted(path: &Path) -> bool {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = path.to_str().unwrap();
    mountinfo
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(path))
}

/// A deterministic, non-repeating byte pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 251) as u8).wrapping_mul(31) ^ (i as u8) ^ seed)
        .collect()
}
