//! The block layer of blockexportd.
//!
//! - [`BlockDriver`]: the interface of one layer (a protocol driver such as `file`, or a format
//!   driver such as `qcow2`), with async read, write (FUA), flush, discard, write-zeroes
//!   (may-unmap, fast-zero), block status and resize.
//! - [`Node`]: a named driver in the graph. Exports talk to nodes: a node checks bounds and
//!   permissions, and marks its [`DirtyBitmap`]s on every write.
//! - [`NodeGraph`]: all nodes by name; [`open::blockdev_add`] builds nodes from QAPI
//!   `BlockdevOptions` JSON.
//!
//! - [`RemoveMode`] and [`ExportGone`]: how any export is removed and the future of its end,
//!   shared by every export crate.
//!
//! Errors carry an errno ([`BlockError::errno`]) that each export maps onto its protocol.
//!
//! ```no_run
//! use block_core::{open, NodeGraph, WriteFlags};
//! use serde_json::json;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let graph = NodeGraph::new();
//! let disk = open::blockdev_add(&graph, json!({
//!     "driver": "qcow2",
//!     "node-name": "disk0",
//!     "file": {"driver": "file", "filename": "disk.qcow2"},
//! })).await?;
//!
//! let mut buf = vec![0u8; 4096];
//! disk.read(0, &mut buf).await?;
//! disk.write(0, &buf, WriteFlags::default()).await?;
//! disk.flush().await?;
//! println!("{}", open::node_info(&disk, false));
//!
//! // Close parents before children: qcow2 writes its metadata and bitmaps then.
//! drop(disk);
//! for node in graph.drain() {
//!     node.driver().close().await?;
//! }
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod bitmap;
pub mod driver;
pub mod drivers;
pub mod error;
pub mod export;
pub mod graph;
pub mod iothread;
pub mod node;
pub mod open;
pub mod qapi;
#[cfg(feature = "qcow2")]
pub mod qcow2_bitmaps;

pub use bitmap::DirtyBitmap;
pub use driver::{BlockDriver, Extent, ImageDetails, WriteFlags, ZeroFlags};
pub use error::{BlockError, Result};
pub use export::{ExportGone, RemoveMode};
pub use graph::{GraphError, NodeGraph};
pub use iothread::IoThread;
pub use node::{Attachment, ChildRole, DetectZeroes, Node, NodeConfig, UserInfo};
