//! Exports one [`block_core`] node as one regular file through FUSE, as
//! qemu-storage-daemon's `--export type=fuse` does.
//!
//! The export is mounted on an existing regular file (the mountpoint), which then shows the
//! node's bytes until the export is unmounted: any program on the host can read, write,
//! `truncate`, `fallocate`, `fsync` and `lseek(SEEK_DATA/SEEK_HOLE)` it, `qemu-img` included.
//!
//! | file operation | block layer |
//! |---|---|
//! | `read` | [`Node::read`](block_core::Node::read), cut at the end of the node |
//! | `write` | [`Node::write`](block_core::Node::write) (FUA with `writethrough` or `O_SYNC`/`O_DSYNC`); past the end: grow (`growable`) or `EIO` |
//! | `truncate` | [`Node::resize`](block_core::Node::resize) (writable exports) |
//! | `fallocate` punch hole | write-zeroes with `may_unmap` and `fast` (`EOPNOTSUPP` if the node cannot) |
//! | `fallocate` zero range | write-zeroes |
//! | `fallocate` (allocate) | grow, then write zeroes over the holes of the range |
//! | `lseek` `SEEK_DATA`/`SEEK_HOLE` | [`Node::block_status`](block_core::Node::block_status) |
//! | `fsync`, `close` | [`Node::flush`](block_core::Node::flush) |
//! | `chmod`, `chown` | kept in memory for the export's life, as QSD |
//!
//! Block-layer errors become errnos through one table, [`errno_of`].
//!
//! Files are opened with `FOPEN_DIRECT_IO`: the host page cache is bypassed, so every read
//! sees what other exports of the same node wrote, nothing is cached twice, and a write is
//! acknowledged only when the node has it (QSD 10.0 lets the page cache in; we do not).
//! `mmap` still works on kernels with `FUSE_DIRECT_IO_ALLOW_MMAP` (6.6+).
//!
//! Several reader threads read requests from `/dev/fuse` (one cloned descriptor each); the I/O
//! of each request runs as a task on the tokio runtime given to the export and replies when it
//! completes, so many requests are in flight at once.
//!
//! ```no_run
//! use block_core::Node;
//! use fuse_export::{AllowOther, FuseExport, FuseExportConfig};
//! # fn example(node: std::sync::Arc<Node>) -> Result<(), Box<dyn std::error::Error>> {
//! let rt = tokio::runtime::Runtime::new()?;
//! let attachment = node.attach("export 'fuse0'", true)?;
//! let cfg = FuseExportConfig::new("/tmp/disk.raw")
//!     .writable(true)
//!     .allow_other(AllowOther::Auto);
//! let export = FuseExport::mount(cfg, attachment, rt.handle().clone())?;
//! // ... /tmp/disk.raw now shows the node ...
//! export.unmount()?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]
#![deny(unsafe_code)]

mod config;
mod error;
mod export;
mod fs;
mod plan;
mod sys;

pub use config::{AllowOther, FuseExportConfig};
pub use error::{errno_of, FuseError};
pub use export::FuseExport;

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
