//! The vhost-user-blk export of blockexportd.
//!
//! This crate will hold the vhost-user backend (on `vhost-user-backend`, `vhost` and
//! `vm-memory`): listening on a unix socket or an inherited descriptor, one worker per queue
//! with many requests in flight, and reconnection. It arrives with its own issue; nothing is
//! implemented yet.

#![forbid(unsafe_code)]
