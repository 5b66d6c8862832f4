//! The `null-co` driver: a node of a given size whose reads return nothing useful (or
//! zeroes with `read-zeroes=on`) and whose writes are dropped. Meant for benchmarks.

use crate::buffer::SgList;
use crate::driver::{
    BlockDriver, BlockIo, Extent, ImageDetails, ImageFacts, WriteFlags, ZeroFlags,
};
use crate::error::Result;
use async_trait::async_trait;
use std::time::Duration;

/// The default size of a `null-co` node: 1 GiB, as in QEMU.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// The `null-co` driver.
#[derive(Debug)]
pub struct NullDriver {
    size: u64,
    read_zeroes: bool,
    read_only: bool,
    latency: Option<Duration>,
}

impl NullDriver {
    /// A node of `size` bytes. With `read_zeroes` false a read leaves the caller's buffer
    /// untouched, as QEMU's driver does. `latency_ns` delays every request.
    pub fn new(size: u64, read_zeroes: bool, read_only: bool, latency_ns: u64) -> NullDriver {
        NullDriver {
            size,
            read_zeroes,
            read_only,
            latency: (latency_ns > 0).then(|| Duration::from_nanos(latency_ns)),
        }
    }

    /// Whether reads return zeroes.
    pub fn read_zeroes(&self) -> bool {
        self.read_zeroes
    }

    async fn delay(&self) {
        if let Some(d) = self.latency {
            tokio::time::sleep(d).await;
        }
    }
}

impl ImageFacts for NullDriver {
    fn driver_name(&self) -> &'static str {
        "null-co"
    }

    fn filename(&self) -> Option<String> {
        Some("null-co://".into())
    }

    fn image_details(&self) -> ImageDetails {
        ImageDetails {
            actual_size: Some(0),
            ..ImageDetails::default()
        }
    }
}

#[async_trait]
impl BlockDriver for NullDriver {}

#[async_trait]
impl BlockIo for NullDriver {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    async fn readv(&self, _offset: u64, buf: &SgList) -> Result<()> {
        self.delay().await;
        if self.read_zeroes {
            buf.fill_zero(0, buf.len());
        }
        Ok(())
    }

    async fn writev(&self, _offset: u64, _buf: &SgList, _flags: WriteFlags) -> Result<()> {
        self.delay().await;
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        self.delay().await;
        Ok(())
    }

    async fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> Result<()> {
        self.delay().await;
        Ok(())
    }

    async fn block_status(&self, _offset: u64, len: u64) -> Result<Extent> {
        // QEMU: with read-zeroes the range is known to read as zeroes; without, nothing is
        // known about it.
        Ok(Extent {
            len,
            data: false,
            zero: self.read_zeroes,
            depth: if self.read_zeroes { 1 } else { 0 },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_leave_the_buffer_alone_unless_read_zeroes() {
        let d = NullDriver::new(4096, false, false, 0);
        let buf = SgList::from_vec(vec![7u8; 16]);
        d.readv(0, &buf).await.expect("read");
        assert_eq!(buf.to_vec(), [7u8; 16]);
        let z = NullDriver::new(4096, true, false, 0);
        z.readv(0, &buf).await.expect("read");
        assert_eq!(buf.to_vec(), [0u8; 16]);
        assert!(z.block_status(0, 4096).await.expect("status").zero);
    }
}
