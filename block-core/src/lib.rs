//! The block layer of blockexportd.
//!
//! - [`Node`]: a named driver in the graph, with its children, its users and its
//!   [`DirtyBitmap`]s. [`NodeGraph`] holds all nodes by name; [`open::blockdev_add`] builds
//!   nodes from a typed QAPI [`BlockdevOptions`] (serde: [`qsd_qapi`] reads it from QMP's
//!   JSON or the command line's keyval syntax, with QEMU's messages).
//! - [`Attachment`]: a user's hold on a node (QEMU's BlockBackend), and the **one handle
//!   exports do I/O through**. It enforces its own permission (a read-only attachment
//!   refuses writes even on a writable node), the bounds, and marks the node's dirty bitmaps
//!   on every write. A node's own I/O and its driver are private to this crate.
//! - [`SgList`]: a request's data, a scatter/gather list whose memory is kept alive by an
//!   owner that travels with the request (a `Vec`, an aligned buffer, a guard over a guest's
//!   memory) and comes back when it completes. **No Rust reference is ever made to memory
//!   another party can change** ([`SgList::from_raw`]): it is handed to the kernel
//!   (`preadv`/`pwritev`) or copied with raw-pointer copies. See [`buffer`].
//! - [`Submitter`]: threads that are not tokio workers (a virtqueue worker, a FUSE reader)
//!   submit many requests without blocking and get each [`Completion`] through a callback
//!   or a [`CompletionQueue`] with an eventfd; requests run on the runtime given (an
//!   export's iothread). See [`submit`].
//! - [`driver`]: small capability traits a driver implements: [`BlockIo`] (the data path),
//!   [`SpliceRead`] (zero-copy reads into a pipe, optional), [`Resize`] (optional),
//!   [`ImageFacts`] (for `query-named-block-nodes`), [`BlockDriver`] (all of it, and the
//!   lifecycle).
//!
//! - [`RemoveMode`] and [`ExportGone`]: how any export is removed and the future of its end,
//!   shared by every export crate.
//!
//! Errors carry an errno ([`BlockError::errno`]) that each export maps onto its protocol.
//!
//! ```no_run
//! use block_core::{open, NodeGraph, SgList, WriteFlags};
//! use serde_json::json;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let graph = NodeGraph::new();
//! let disk = open::blockdev_add(&graph, block_core::BlockdevOptions::from_json(json!({
//!     "driver": "qcow2",
//!     "node-name": "disk0",
//!     "file": {"driver": "file", "filename": "disk.qcow2"},
//! })).expect("options")).await?;
//!
//! // The export's handle: checks its permission and the bounds, marks dirty bitmaps.
//! let io = disk.attach("export 'exp0'", true)?;
//! let buf = SgList::from_vec(vec![0u8; 4096]);
//! io.readv(0, &buf).await?;
//! io.writev(4096, &buf, WriteFlags::default()).await?;
//! io.flush().await?;
//! let data: Vec<u8> = buf.into_vec().expect("the request is done: the memory is ours");
//! assert_eq!(data.len(), 4096);
//! println!("{}", open::node_info(&disk, false));
//!
//! // Close parents before children: qcow2 writes its metadata and bitmaps then.
//! drop((io, disk));
//! for node in graph.drain() {
//!     node.close().await?;
//! }
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod bitmap;
pub mod buffer;
pub mod driver;
pub mod drivers;
pub mod error;
pub mod export;
pub mod graph;
pub mod iothread;
pub mod node;
pub mod objects;
pub mod open;
pub mod qapi;
#[cfg(feature = "qcow2")]
mod qcow2_bitmaps;
pub mod submit;

pub use bitmap::DirtyBitmap;
pub use buffer::{SgList, StableBuf};
pub use driver::{
    BlockDriver, BlockIo, Extent, ImageDetails, ImageFacts, Resize, SpliceRead, WriteFlags,
    ZeroFlags,
};
pub use error::{BlockError, Result};
pub use export::{ExportGone, RemoveMode};
pub use graph::{GraphError, NodeGraph};
pub use iothread::IoThread;
pub use node::{
    AttachError, Attachment, BitmapExists, ChildRole, DetectZeroes, Node, NodeConfig, UserInfo,
};
pub use qapi::{BlockdevOptions, OptionError};
pub use submit::{Completion, CompletionQueue, Request, Submitter};

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
