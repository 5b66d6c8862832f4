//! TLS with pre-shared keys through OpenSSL (the `psk` feature): rustls has no external
//! pre-shared keys.
//!
//! The client names an identity (QEMU's PSK username) and proves that it holds the key the
//! server finds for it; the key also authenticates the server. The server has no
//! certificate. TLS 1.3 and TLS 1.2 are negotiated (with TLS 1.2, ECDHE-PSK suites first,
//! then plain PSK: no DH parameters are loaded, so no DHE-PSK), as GnuTLS offers them to
//! QEMU's and libnbd's clients; session tickets are not issued, so that every connection
//! proves its key again.

use crate::tls::AcceptError;
use openssl::error::ErrorStack;
use openssl::ex_data::Index;
use openssl::ssl::{Ssl, SslContext, SslMethod, SslOptions, SslVersion};
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_openssl::SslStream;

/// Finds the key of an identity at each handshake; `None` refuses the client (unknown
/// identity, or a key that cannot be read).
pub type PskLookup = dyn Fn(&str) -> Option<Vec<u8>> + Send + Sync;

/// Why a [`PskAcceptor`] cannot be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up TLS-PSK")]
pub struct PskError(#[source] ErrorStack);

/// The server side of TLS-PSK: an OpenSSL context whose key lookup is the caller's.
#[derive(Clone)]
pub struct PskAcceptor {
    context: SslContext,
}

impl fmt::Debug for PskAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PskAcceptor").finish_non_exhaustive()
    }
}

/// Where a connection keeps the identity its key was found under.
fn identity_index() -> Result<Index<Ssl, String>, ErrorStack> {
    static INDEX: OnceLock<Index<Ssl, String>> = OnceLock::new();
    if let Some(index) = INDEX.get() {
        return Ok(*index);
    }
    let index = Ssl::new_ex_index()?;
    Ok(*INDEX.get_or_init(|| index))
}

impl PskAcceptor {
    /// A TLS server that takes clients holding the key `lookup` gives for their identity.
    pub fn new(lookup: Arc<PskLookup>) -> Result<PskAcceptor, PskError> {
        let index = identity_index().map_err(PskError)?;
        let mut b = SslContext::builder(SslMethod::tls_server()).map_err(PskError)?;
        b.set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(PskError)?;
        // TLS 1.2: forward-secret PSK suites first (DHE-PSK stays unused without DH
        // parameters); never NULL encryption.
        b.set_cipher_list("ECDHE-PSK:DHE-PSK:PSK:!eNULL:!aNULL:!3DES:!RC4")
            .map_err(PskError)?;
        b.set_options(SslOptions::NO_TICKET | SslOptions::NO_RENEGOTIATION);
        b.set_num_tickets(0).map_err(PskError)?;
        b.set_psk_server_callback(move |ssl, identity, psk| {
            let Some(identity) = identity.and_then(|i| std::str::from_utf8(i).ok()) else {
                return Ok(0);
            };
            let Some(key) = lookup(identity) else {
                tracing::debug!(identity, "TLS-PSK: no key for this identity");
                return Ok(0);
            };
            if key.is_empty() || key.len() > psk.len() {
                tracing::warn!(identity, len = key.len(), "TLS-PSK: key of unusable length");
                return Ok(0);
            }
            psk[..key.len()].copy_from_slice(&key);
            ssl.set_ex_data(index, identity.to_string());
            Ok(key.len())
        });
        Ok(PskAcceptor { context: b.build() })
    }

    /// Runs the handshake; returns the stream and the client's identity.
    pub(crate) async fn accept<S>(&self, plain: S) -> Result<(SslStream<S>, String), AcceptError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let handshake = |e: ErrorStack| AcceptError::Handshake(io::Error::other(e));
        let ssl = Ssl::new(&self.context).map_err(handshake)?;
        let mut stream = SslStream::new(ssl, plain).map_err(handshake)?;
        Pin::new(&mut stream).accept().await.map_err(|e| {
            AcceptError::Handshake(
                e.into_io_error()
                    .unwrap_or_else(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            )
        })?;
        let index = identity_index().map_err(handshake)?;
        let identity = stream.ssl().ex_data(index).cloned().ok_or_else(|| {
            AcceptError::Handshake(io::Error::other("TLS-PSK session without an identity"))
        })?;
        tracing::debug!(
            identity,
            version = stream.ssl().version_str(),
            cipher = stream.ssl().current_cipher().map(|c| c.name()),
            "TLS-PSK handshake done"
        );
        Ok((stream, identity))
    }
}
