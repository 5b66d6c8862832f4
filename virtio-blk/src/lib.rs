//! The virtio-blk device model (virtio 1.2, section 5.2), shared by blockexportd's
//! vhost-user-blk and VDUSE exports and usable by any virtio transport built on
//! `virtio-queue` and `vm-memory`.
//!
//! - [`config`]: feature bits and the little-endian configuration space, built from a
//!   [`DeviceConfig`].
//! - [`chain`]: walking a descriptor chain with every rule checked (loops, nested indirect
//!   tables, addresses outside guest memory, readable after writable).
//! - [`request`]: parsing a request and checking it against the device before any I/O.
//! - [`status`]: the one mapping from block-layer errors to status bytes.
//! - [`queue`]: serving a queue, many requests in flight, straight on guest memory through
//!   block-core's vectored handle ([`block_core::Submitter`]).
//! - [`worker`]: a thread per queue for transports that kick through eventfds (vhost-user,
//!   VDUSE), with the notification left to the transport.
//! - [`inflight`]: the log of requests in flight that lets a restarted backend resubmit what
//!   its predecessor had taken (vhost-user's `INFLIGHT_SHMFD`, VDUSE's reconnect file).

pub mod chain;
pub mod config;
pub mod inflight;
pub mod queue;
pub mod request;
pub mod status;
pub mod worker;

pub use config::{ConfigSpace, DeviceConfig};
pub use queue::{BlkDevice, InflightLog, NoLog, QueueHandler, StableMemory};
pub use status::Status;

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
