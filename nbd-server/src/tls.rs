//! TLS: the server's settings and the connection stream that switches to TLS after
//! `NBD_OPT_STARTTLS`.
//!
//! With [`TlsConfig`] set, the server runs in the spec's FORCEDTLS mode, as QEMU does with
//! `tls-creds`: every option but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is refused with
//! `NBD_REP_ERR_TLS_REQD` until TLS is up (`NBD_OPT_EXPORT_NAME`, which cannot return an
//! error, ends the connection). After `NBD_REP_ACK` the TLS handshake runs on the same
//! stream, then the optional [`TlsConfig::authorize`] hook decides on the client's
//! certificate, and the negotiation starts over inside TLS.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;

/// Decides whether a client may continue once TLS is up, from its end-entity certificate
/// (DER; `None` if it sent none). `Ok` carries the client's distinguished name (for logs);
/// `Err` the reason for the refusal (logged; the client sees the connection closed).
///
/// Called for every connection, so that the authorization it consults can change while the
/// server runs.
pub type Authorize = dyn Fn(Option<&[u8]>) -> Result<String, String> + Send + Sync;

/// TLS settings of a server (QEMU's `tls-creds` and `tls-authz`).
#[derive(Clone)]
pub struct TlsConfig {
    /// The rustls configuration: certificate, key and client verification. Client
    /// certificates are checked here (for QEMU's `verify-peer=on`, a client verifier over
    /// the CA).
    pub server_config: Arc<rustls::ServerConfig>,
    /// Authorization after the TLS handshake; `None` admits every client the TLS layer
    /// accepted.
    pub authorize: Option<Arc<Authorize>>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("alpn_protocols", &self.server_config.alpn_protocols)
            .field("authorize", &self.authorize.as_ref().map(|_| "Fn"))
            .finish_non_exhaustive()
    }
}

/// A connection's stream: plaintext, or TLS after `NBD_OPT_STARTTLS`. An enum, so that the
/// plaintext path costs one branch and no extra allocation or dynamic call.
#[derive(Debug)]
pub(crate) enum MaybeTls<S> {
    /// No TLS (not configured, or not started yet).
    Plain(S),
    /// TLS established over the stream.
    Tls(Box<TlsStream<S>>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
