//! blockexportd: a storage daemon exporting disk images over NBD and FUSE, managed over QMP,
//! with qemu-storage-daemon's command line.
//!
//! The binary (`main.rs`) only parses the command line and calls this library:
//! [`cli`] splits the command line, [`run`] applies it in order, [`daemon`] holds the state
//! and implements the commands, [`exports`] holds the export types, [`commands`] registers
//! them on the QMP server.

pub mod bitmaps;
pub mod cli;
pub mod commands;
pub mod daemon;
mod errors;
pub mod exports;
pub mod logging;
pub mod memory;
pub mod objects;
pub mod process;
pub mod qapi;
pub mod run;
