//! An NBD (Network Block Device) server that serves any [`block_core`] node.
//!
//! - Fixed newstyle handshake with `NBD_OPT_INFO`/`GO`, `LIST`, `STRUCTURED_REPLY`,
//!   `EXTENDED_HEADERS`, `LIST_META_CONTEXT`/`SET_META_CONTEXT` (`base:allocation`,
//!   `qemu:allocation-depth`, `qemu:dirty-bitmap:NAME`), and
//!   `NBD_REP_ERR_UNSUP` for anything else, the connection living on.
//! - Transmission with many requests in flight per connection, replies out of order;
//!   simple, structured (sparse reads, error chunks with messages) and extended replies.
//! - Errors as the spec maps them ([`proto::NbdErrno::from_errno`]).
//! - Connection limit, handshake deadline, safe and hard export removal.
//! - Per-export event loops ([`ExportConfig::runtime`], QEMU's `iothread`): the listeners
//!   and handshakes run where the server was started; a client that picked such an export
//!   moves there, socket included (deregistered from one reactor, registered with the other).
//!
//! The wire format lives in [`proto`]; the handshake is a state machine without I/O
//! ([`handshake`]); transports are generic over `AsyncRead + AsyncWrite`.
//! - TLS ([`TlsConfig`]): x509 through `tokio-rustls`, or pre-shared keys through OpenSSL
//!   with the `psk` feature ([`TlsAcceptor`]); `NBD_OPT_STARTTLS` required before any other
//!   option, as QEMU with `tls-creds`, and an authorization hook ([`Authorize`]) on the
//!   client's identity ([`Peer`]: certificate or PSK username) after the TLS handshake
//!   (QEMU's `tls-authz`), refusing with a typed [`Refusal`]. The hook gets the certificate as
//!   DER and picks the name it checks: this crate parses no certificate and depends on no
//!   authorization crate; `qsd-crypto`'s `authz-*` objects implement the hook with QEMU's
//!   GnuTLS-order distinguished name.
//!
//! ```no_run
//! # async fn run(node: std::sync::Arc<block_core::Node>) -> Result<(), Box<dyn std::error::Error>> {
//! use nbd_server::{ExportConfig, NbdServer, ServerConfig};
//! let server = NbdServer::new(ServerConfig::default());
//! server.add_export(ExportConfig::new("disk", node.attach("export 'disk'", true)?))?;
//! let listener = tokio::net::UnixListener::bind("/tmp/nbd.sock")?;
//! server.serve_unix(listener).await; // until server.stop()
//! # Ok(()) }
//! ```

#![deny(unsafe_code)]

mod export;
pub mod handshake;
mod loops;
pub mod meta;
/// The wire format, from the [`nbd_proto`] crate (shared with NBD clients).
pub use nbd_proto as proto;
#[cfg(feature = "psk")]
mod psk;
mod server;
mod socket;
#[allow(unsafe_code)] // pipes, descriptors and splice(2): each block says why it is sound
mod splice;
mod tls;
pub mod transmission;

/// The removal mode and drain future of every export type, from [`block_core`].
pub use block_core::{ExportGone, RemoveMode};
pub use export::ExportConfig;
#[cfg(feature = "psk")]
pub use psk::{PskAcceptor, PskError, PskLookup};
pub use server::{
    NbdError, NbdServer, ServerConfig, DEFAULT_HANDSHAKE_MAX_SECONDS, DEFAULT_MAX_CONNECTIONS,
};
#[cfg(feature = "splice-counter")]
pub use splice::spliced_bytes;
pub use tls::{Authorize, Peer, PeerKind, Refusal, TlsAcceptor, TlsConfig};

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
