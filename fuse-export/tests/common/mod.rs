//! Shared helpers of the mount tests: an in-memory block driver with hole tracking, the
//! environment checks, and a mounted-export fixture.

#![allow(dead_code)]

use block_core::Node;
use fuse_export::{FuseExport, FuseExportConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;

// Each test file takes what it needs of these.
#[allow(unused_imports)]
pub use test_support::{require_tool, run_failing, run_stdout, MemDriver, BLOCK};

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
    test_support::require(problem.map(|p| format!("FUSE mount tests cannot run: {p}")))
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
        let cfg = FuseExportConfig::new(mountpoint)
            .growable(growable)
            .writable(writable)
            .writethrough(writethrough);
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
