//! The interface every driver implements and every export talks to.
//!
//! A driver is one layer of a node graph: a protocol driver (`file`, `null-co`) reaches host
//! storage; a format driver (`raw`, `qcow2`) interprets the bytes of its child node. Exports
//! never call a driver directly: they go through a [`Node`](crate::Node), which checks bounds
//! and permissions and marks dirty bitmaps before the driver sees a request.
//!
//! Requests are `async` and many may be in flight on one driver at once, from many tasks and
//! threads: a driver must not serialise them unless its format requires it.

use crate::error::Result;
use async_trait::async_trait;
use std::fmt::Debug;
use std::os::fd::OwnedFd;

/// The host's page size: the unit of the page cache, and of a pipe's slots (which matters to
/// callers of [`BlockDriver::splice_read`]: a range starting inside a page takes one slot
/// more).
pub fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if n > 0 {
            n as u64
        } else {
            4096
        }
    })
}
use std::sync::Arc;

/// Flags of a write request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the data is on stable storage when the request completes.
    pub fua: bool,
}

/// Flags of a write-zeroes request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Force unit access, as for [`WriteFlags::fua`].
    pub fua: bool,
    /// The driver may deallocate (punch a hole) instead of writing zeroes, as long as the
    /// range reads back as zeroes.
    pub may_unmap: bool,
    /// Fail with [`BlockError::NotFast`](crate::BlockError::NotFast) rather than zero the
    /// range slowly (by writing buffers of zeroes).
    pub fast: bool,
}

/// The status of one extent, as returned by [`BlockDriver::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length of the extent in bytes; never zero, never beyond the queried range.
    pub len: u64,
    /// The range is backed by data in some layer (not a hole).
    pub data: bool,
    /// The range reads as zeroes.
    pub zero: bool,
    /// Which layer of the backing chain allocates the range: 0 when no layer does, 1 for this
    /// node's own layer, 2 for its backing file, and so on. Protocol drivers report 1 for data
    /// and for holes alike, as QEMU does (`qemu-img map` shows a hole of a raw file as
    /// "present" zeroes).
    pub depth: u32,
}

/// Facts about a layer's image that `query-named-block-nodes` reports (QAPI `ImageInfo`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageDetails {
    /// Bytes the image takes on the host (`actual-size`).
    pub actual_size: Option<u64>,
    /// `cluster-size` of a format with clusters.
    pub cluster_size: Option<u64>,
    /// The backing file name as written in the image (`backing-filename`).
    pub backing_filename: Option<String>,
    /// The backing format as written in the image (`backing-filename-format`).
    pub backing_format: Option<String>,
    /// `dirty-flag`, for formats that have one.
    pub dirty_flag: Option<bool>,
    /// `format-specific` (a QAPI `ImageInfoSpecific`), when the driver knows it.
    pub format_specific: Option<serde_json::Value>,
}

/// One layer of a node graph: the operations a driver provides.
///
/// Offsets and lengths have been checked against [`size`](Self::size) by the node before a
/// driver sees them. Optional operations default to
/// [`BlockError::Unsupported`](crate::BlockError::Unsupported) or to a safe fallback.
#[async_trait]
pub trait BlockDriver: Send + Sync + Debug {
    /// The QAPI driver name (`file`, `raw`, `qcow2`, `null-co`).
    fn driver_name(&self) -> &'static str;

    /// Current size of the layer in bytes.
    fn size(&self) -> u64;

    /// Whether the layer was opened read-only.
    fn read_only(&self) -> bool;

    /// The alignment (in bytes) requests must have, e.g. 512 or 4096 under O_DIRECT; 1 when any
    /// byte offset works.
    fn request_alignment(&self) -> u32 {
        1
    }

    /// The preferred request size in bytes (e.g. a qcow2 cluster); 4096 by default.
    fn preferred_alignment(&self) -> u32 {
        4096
    }

    /// The file name this layer shows in `query-named-block-nodes`, if any.
    fn filename(&self) -> Option<String> {
        None
    }

    /// Whether this layer, when writable, must be the only writer of its `file` child (true
    /// for formats with metadata, such as qcow2; false by default).
    fn exclusive_file_writer(&self) -> bool {
        false
    }

    /// Called once by [`Node::with_config`](crate::Node::with_config) with the node that owns
    /// this driver, for drivers that need their node at close (qcow2 stores the node's
    /// persistent dirty bitmaps then). Nothing by default.
    fn attach_node(&self, node: std::sync::Weak<crate::Node>) {
        let _ = node;
    }

    /// Whether this layer can store persistent dirty bitmaps (a writable qcow2); false by
    /// default.
    fn supports_persistent_bitmaps(&self) -> bool {
        false
    }

    /// Facts about the image for `query-named-block-nodes`; nothing by default.
    fn image_details(&self) -> ImageDetails {
        ImageDetails::default()
    }

    /// Fills `buf` with the bytes at `offset`.
    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Appends the `len` bytes at `offset` to a pipe (`pipe` is its write end) without
    /// copying them through this process's memory (`splice(2)` from the page cache), when
    /// this layer can: `Ok(true)`. `Ok(false)` (the default) means it cannot, e.g. a format
    /// layer or `O_DIRECT`; the caller then reads with [`read`](Self::read), and must
    /// discard the pipe, which may hold part of the range. The pipe must have room for `len`
    /// bytes; its write end is non-blocking.
    async fn splice_read(&self, offset: u64, len: usize, pipe: &Arc<OwnedFd>) -> Result<bool> {
        let _ = (offset, len, pipe);
        Ok(false)
    }

    /// Writes `buf` at `offset`.
    async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()>;

    /// Makes every completed write stable.
    async fn flush(&self) -> Result<()>;

    /// Tells the layer that the range is no longer needed. Its content afterwards is
    /// unspecified. Ignoring the request is a valid implementation.
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// Makes the range read as zeroes. The default writes buffers of zeroes, or fails with
    /// `NotFast` when [`ZeroFlags::fast`] is set.
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if flags.fast {
            return Err(crate::BlockError::NotFast);
        }
        const CHUNK: u64 = 1 << 20;
        let zeroes = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.write(
                offset + done,
                &zeroes[..n as usize],
                WriteFlags { fua: flags.fua },
            )
            .await?;
            done += n;
        }
        Ok(())
    }

    /// The status of the extent starting at `offset`, at most `len` bytes long. The default
    /// reports the whole range as data in this layer.
    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let _ = offset;
        Ok(Extent {
            len,
            data: true,
            zero: false,
            depth: 1,
        })
    }

    /// Changes the size of the layer.
    async fn resize(&self, new_size: u64) -> Result<()> {
        let _ = new_size;
        Err(crate::BlockError::Unsupported("resize"))
    }

    /// Called when the node becomes inactive (`false`, after a flush: release what another
    /// process needs to take the image over, e.g. image locks) and active again (`true`:
    /// take it back). Nothing to do by default.
    async fn set_active(&self, active: bool) -> Result<()> {
        let _ = active;
        Ok(())
    }

    /// Flushes and releases what the layer holds (called once, when its node is closed).
    async fn close(&self) -> Result<()> {
        self.flush().await
    }
}
