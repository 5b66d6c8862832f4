//! The `raw` format driver: the bytes of its `file` child, optionally a window of them
//! (`offset`, `size`), with everything passed through.

use crate::buffer::SgList;
use crate::driver::{
    BlockDriver, BlockIo, Extent, ImageDetails, ImageFacts, Resize, SpliceRead, WriteFlags,
    ZeroFlags,
};
use crate::error::{BlockError, Result};
use crate::node::Node;
use async_trait::async_trait;
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// Why a `raw` node could not be opened (QEMU's messages).
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    /// `offset` lies beyond the child.
    #[error("Offset ({offset}) cannot be greater than size of the containing file ({file_size})")]
    OffsetTooLarge {
        /// The `offset` option.
        offset: u64,
        /// Size of the child.
        file_size: u64,
    },
    /// `offset` + `size` lies beyond the child.
    #[error(
        "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the  actual size of the containing file ({file_size})"
    )]
    TooLarge {
        /// The `offset` option.
        offset: u64,
        /// The `size` option.
        size: u64,
        /// Size of the child.
        file_size: u64,
    },
    /// `size` is not a multiple of 512.
    #[error("Specified size is not multiple of 512")]
    Unaligned,
}

/// The `raw` driver.
#[derive(Debug)]
pub struct RawDriver {
    child: Arc<Node>,
    offset: u64,
    size: Option<u64>,
    read_only: bool,
}

impl RawDriver {
    /// A raw layer over `child`, starting at `offset`, `size` bytes long (to the end of the
    /// child when `None`).
    pub fn open(
        child: Arc<Node>,
        offset: u64,
        size: Option<u64>,
        read_only: bool,
    ) -> std::result::Result<RawDriver, RawError> {
        let file_size = child.size();
        if offset > file_size {
            return Err(RawError::OffsetTooLarge { offset, file_size });
        }
        if let Some(size) = size {
            if offset.checked_add(size).is_none_or(|end| end > file_size) {
                return Err(RawError::TooLarge {
                    offset,
                    size,
                    file_size,
                });
            }
            if size % 512 != 0 {
                return Err(RawError::Unaligned);
            }
        }
        Ok(RawDriver {
            child,
            offset,
            size,
            read_only,
        })
    }

    /// The child node.
    pub fn child(&self) -> &Arc<Node> {
        &self.child
    }

    /// The `offset` option.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

impl ImageFacts for RawDriver {
    fn driver_name(&self) -> &'static str {
        "raw"
    }

    fn filename(&self) -> Option<String> {
        self.child.filename()
    }

    fn image_details(&self) -> ImageDetails {
        ImageDetails {
            actual_size: self.child.image_details().actual_size,
            dirty_flag: Some(false),
            ..ImageDetails::default()
        }
    }
}

#[async_trait]
impl BlockIo for RawDriver {
    fn size(&self) -> u64 {
        self.size
            .unwrap_or_else(|| self.child.size().saturating_sub(self.offset))
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn request_alignment(&self) -> u32 {
        self.child.request_alignment()
    }

    fn preferred_alignment(&self) -> u32 {
        self.child.preferred_alignment()
    }

    async fn readv(&self, offset: u64, buf: &SgList) -> Result<()> {
        self.child.readv(self.offset + offset, buf).await
    }

    async fn writev(&self, offset: u64, buf: &SgList, flags: WriteFlags) -> Result<()> {
        self.child.writev(self.offset + offset, buf, flags).await
    }

    async fn flush(&self) -> Result<()> {
        self.child.flush().await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.child.discard(self.offset + offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.child
            .write_zeroes(self.offset + offset, len, flags)
            .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.child.block_status(self.offset + offset, len).await
    }
}

#[async_trait]
impl SpliceRead for RawDriver {
    async fn splice_read(&self, offset: u64, len: usize, pipe: &Arc<OwnedFd>) -> Result<bool> {
        self.child
            .splice_read(self.offset + offset, len, pipe)
            .await
    }
}

#[async_trait]
impl Resize for RawDriver {
    async fn resize(&self, new_size: u64) -> Result<()> {
        if self.size.is_some() {
            return Err(BlockError::Invalid(
                "Cannot resize fixed-size raw disks".into(),
            ));
        }
        let end = self
            .offset
            .checked_add(new_size)
            .ok_or_else(|| BlockError::Invalid("Image size too large".into()))?;
        self.child.resize(end).await
    }
}

#[async_trait]
impl BlockDriver for RawDriver {
    fn splice(&self) -> Option<&dyn SpliceRead> {
        self.child.can_splice().then_some(self as &dyn SpliceRead)
    }

    fn resizer(&self) -> Option<&dyn Resize> {
        Some(self)
    }

    async fn close(&self) -> Result<()> {
        // The child is a node of its own and is closed as such.
        Ok(())
    }
}
