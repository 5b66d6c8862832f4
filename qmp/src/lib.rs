//! A QMP (QEMU Machine Protocol) server for any daemon.
//!
//! It speaks QMP as QEMU 10.0's monitor does, byte for byte where it can:
//! greeting, capabilities negotiation, `{"execute", "arguments", "id"}`
//! requests with `id` echoed verbatim, error classes and texts, events with
//! timestamps, compact or pretty output. It knows nothing about what the
//! daemon manages: the daemon registers async command handlers and emits
//! events; argument checking with QAPI's error messages is provided by
//! [`parse_arguments`].
//!
//! Transports: a unix or TCP listener (one client at a time per listener,
//! like a QEMU `--chardev socket,server=on` monitor), stdin/stdout, any
//! already-connected stream, or connections the daemon makes itself, with
//! an optional reconnect delay ([`QmpServer::serve_client`], a QEMU
//! `--chardev socket` without `server=on`). The chardev backends as QEMU opens them:
//! [`sockets`] (QEMU's `util/qemu-sockets.c`: a stale socket file unlinked before binding,
//! its error messages) and [`pipe`] (`--chardev pipe`: `PATH.in`/`PATH.out`).
//!
//! ```no_run
//! use qmp_server::{parse_arguments, MonitorOptions, QmpError, QmpServer, VersionInfo};
//!
//! # async fn run() -> std::io::Result<()> {
//! let server = QmpServer::new(VersionInfo { major: 10, minor: 0, micro: 0, package: String::new() });
//! server.register("echo", |args| async move {
//!     #[derive(serde::Deserialize)]
//!     struct Echo { text: String }
//!     let a: Echo = parse_arguments(args)?;
//!     Ok::<_, QmpError>(serde_json::json!({ "text": a.text }))
//! });
//! let listener = tokio::net::UnixListener::bind("/tmp/qmp.sock")?;
//! let s = server.clone();
//! tokio::spawn(async move { s.serve_unix(listener, MonitorOptions::default()).await });
//! server.events().emit("READY", serde_json::json!({}));
//! server.quit_requested().await;
//! server.shutdown();
//! # Ok(())
//! # }
//! ```
//!
//! Behaviour worth knowing (all matching QSD 10.0 unless said otherwise):
//! - input is a JSON stream, not lines: several requests on one line and one
//!   request over several lines both work; QEMU's extensions (single-quoted
//!   strings, `\'`) are accepted; after a malformed message the connection
//!   lives on ([`stream`] module docs);
//! - requests of one monitor run one at a time, in order; a command keeps
//!   running if its client disconnects;
//! - output lines end with CR LF, as QEMU's monitor writes them;
//! - `oob` is offered and may be enabled, but no command supports
//!   out-of-band execution (`The command X does not support OOB`), as in QSD.
//! - memory per monitor is bounded: one pending input message
//!   ([`StreamLimits`]) and the queued output ([`ServerLimits`]); a client
//!   that does not read is disconnected instead of growing the queue, and
//!   neither it nor events to it ever block other monitors.

#![forbid(unsafe_code)]

pub mod args;
mod client;
mod dispatch;
pub mod error;
pub mod pipe;
mod server;
pub mod sockets;
pub mod writer;

/// QMP's input stream: QEMU's JSON dialect, from [`qsd_qapi::json`].
pub use qsd_qapi::json as stream;

pub use args::{from_value, from_value_at, parse_arguments, parse_base, ArgumentError};
pub use error::{ErrorClass, QmpError};
pub use server::{EventSender, MonitorOptions, QmpServer, ServerLimits, VersionInfo};
pub use stream::{JsonStream, StreamError, StreamLimits};

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
