//! blockexportd: a storage daemon exporting disk images over NBD and FUSE, managed over QMP,
//! with qemu-storage-daemon's command line.
//!
//! The binary (`main.rs`) only parses the command line and calls this library.

pub mod keyval;
