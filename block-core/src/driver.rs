//! The interfaces a driver implements: small capability traits.
//!
//! A driver is one layer of a node graph: a protocol driver (`file`, `null-co`) reaches host
//! storage; a format driver (`raw`, `qcow2`) interprets the bytes of its child node. Exports
//! never call a driver: they do their I/O through an [`Attachment`](crate::Attachment), which
//! checks its permission and the bounds and marks dirty bitmaps before the node's driver sees
//! a request.
//!
//! - [`BlockIo`]: the data path (vectored read and write over [`SgList`]s, flush, discard,
//!   write-zeroes, block status). Every driver has it.
//! - [`SpliceRead`]: hand page-cache pages to a pipe, for exports that send them to a socket
//!   without copying. A driver offers it through [`BlockDriver::splice`].
//! - [`Resize`]: change the size, offered through [`BlockDriver::resizer`].
//! - [`ImageFacts`]: what `query-named-block-nodes` shows.
//! - [`BlockDriver`]: the above together, and the node's lifecycle (activation, close).
//!
//! Optional operations default to "unsupported" (or a safe fallback, as writing zeroes).
//! Requests are `async` and many may be in flight on one driver at once, from many tasks and
//! threads: a driver must not serialise them unless its format requires it.

use crate::buffer::SgList;
use crate::error::Result;
use async_trait::async_trait;
use std::fmt::Debug;
use std::os::fd::OwnedFd;

/// The host's page size: the unit of the page cache, and of a pipe's slots (which matters to
/// callers of [`SpliceRead::splice_read`]: a range starting inside a page takes one slot
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

/// The status of one extent, as returned by [`BlockIo::block_status`]: made with
/// [`Extent::new`] (more facts may come: the struct cannot be built by hand outside the crate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
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

impl Extent {
    /// An extent of `len` bytes: `data` (backed by data in some layer), `zero` (reads as
    /// zeroes), allocated by layer `depth` of the backing chain (see [`Extent::depth`]).
    pub const fn new(len: u64, data: bool, zero: bool, depth: u32) -> Extent {
        Extent {
            len,
            data,
            zero,
            depth,
        }
    }
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

/// The data path of one layer.
///
/// Offsets and lengths have been checked against [`size`](Self::size) by the node before a
/// driver sees them. The memory of a request's [`SgList`] is kept alive by the list: a driver
/// that hands it to another thread clones the list (see [`crate::buffer`] for the rule about
/// references to it).
#[async_trait]
pub trait BlockIo: Send + Sync + Debug {
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

    /// Fills `buf` with the bytes at `offset`.
    async fn readv(&self, offset: u64, buf: &SgList) -> Result<()>;

    /// Writes `buf` at `offset`.
    async fn writev(&self, offset: u64, buf: &SgList, flags: WriteFlags) -> Result<()>;

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
        write_zero_buffers(self, offset, len, flags.fua).await
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
}

/// Writes buffers of zeroes over the range (the slow way to zero it).
pub(crate) async fn write_zero_buffers<D: BlockIo + ?Sized>(
    drv: &D,
    offset: u64,
    len: u64,
    fua: bool,
) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeroes = SgList::zeroed(CHUNK.min(len) as usize);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        let part = if n as usize == zeroes.len() {
            zeroes.clone()
        } else {
            zeroes.slice(0, n as usize)
        };
        drv.writev(offset + done, &part, WriteFlags { fua }).await?;
        done += n;
    }
    Ok(())
}

/// Reads that hand page-cache pages to a pipe instead of copying them (`splice(2)`): a
/// capability a driver may offer ([`BlockDriver::splice`]).
#[async_trait]
pub trait SpliceRead: Send + Sync {
    /// Appends the `len` bytes at `offset` to a pipe (`pipe` is its write end) without
    /// copying them through this process's memory, when this layer can: `Ok(true)`.
    /// `Ok(false)` means it cannot now (e.g. the range lies past the end of the file); the
    /// caller then reads with [`BlockIo::readv`], and must discard the pipe, which may hold
    /// part of the range. The pipe must have room for `len` bytes; its write end is
    /// non-blocking.
    async fn splice_read(&self, offset: u64, len: usize, pipe: &Arc<OwnedFd>) -> Result<bool>;
}

/// Changing a layer's size: a capability a driver may offer ([`BlockDriver::resizer`]).
#[async_trait]
pub trait Resize: Send + Sync {
    /// Changes the size of the layer to `new_size` bytes.
    async fn resize(&self, new_size: u64) -> Result<()>;
}

/// What `query-named-block-nodes` shows about a layer.
pub trait ImageFacts: Send + Sync {
    /// The QAPI driver name (`file`, `raw`, `qcow2`, `null-co`).
    fn driver_name(&self) -> &'static str;

    /// The file name this layer shows in `query-named-block-nodes`, if any.
    fn filename(&self) -> Option<String> {
        None
    }

    /// Facts about the image (QAPI `ImageInfo`); nothing by default.
    fn image_details(&self) -> ImageDetails {
        ImageDetails::default()
    }
}

/// One layer of a node graph: its data path, its facts, the capabilities it offers and its
/// lifecycle.
#[async_trait]
pub trait BlockDriver: BlockIo + ImageFacts {
    /// Zero-copy reads into a pipe, when the layer can do them (none by default).
    fn splice(&self) -> Option<&dyn SpliceRead> {
        None
    }

    /// Resizing, when the layer can (none by default: `block_resize` then fails).
    fn resizer(&self) -> Option<&dyn Resize> {
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
