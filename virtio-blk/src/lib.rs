//! The virtio-blk device model of blockexportd (virtio 1.2, section 5.2).
//!
//! This crate will hold what the vhost-user-blk and VDUSE exports share: the configuration
//! space layout and feature bits, request parsing over `virtio-queue` descriptor chains,
//! execution against a `block-core` node and the mapping of errors onto virtio status bytes.
//! Its content arrives with the vhost-user-blk export; nothing is implemented yet.

#![forbid(unsafe_code)]
