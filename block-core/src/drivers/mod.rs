//! The drivers, each behind its cargo feature.
//!
//! | driver | feature | kind |
//! |---|---|---|
//! | [`file`](mod@file) (`file`, `host_device`) | `file` | protocol: a host file or block device |
//! | [`raw`] | `raw` | format: the child's bytes, optionally a window (`offset`, `size`) |
//! | [`qcow2`] | `qcow2` | format: qcow2 through the `imago` crate, with backing chains |
//! | [`null`] (`null-co`) | `null` | protocol: reads nothing, drops writes |
//! | [`nbd`] | `nbd` | protocol: an export of a remote NBD server |
//! | [`rbd`] | `rbd` (not default: links librbd) | protocol: an image in a Ceph cluster |

#[cfg(feature = "file")]
pub mod file;
#[cfg(feature = "nbd")]
pub mod nbd;
#[cfg(feature = "null")]
pub mod null;
#[cfg(feature = "qcow2")]
pub mod qcow2;
#[cfg(feature = "raw")]
pub mod raw;
#[cfg(all(feature = "rbd", librbd))]
pub mod rbd;
