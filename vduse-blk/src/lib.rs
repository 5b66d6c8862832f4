//! The VDUSE block export of blockexportd.
//!
//! This crate will hold the VDUSE device: `/dev/vduse/control` and its ioctls, the IOTLB and
//! the virtqueues, serving a `block-core` node as a host `/dev/vdX`. It arrives with its own
//! issue; nothing is implemented yet.

#![forbid(unsafe_code)]
