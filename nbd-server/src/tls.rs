//! TLS: the server's settings and the connection stream that switches to TLS after
//! `NBD_OPT_STARTTLS`.
//!
//! With [`TlsConfig`] set, the server runs in the spec's FORCEDTLS mode, as QEMU does with
//! `tls-creds`: every option but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is refused with
//! `NBD_REP_ERR_TLS_REQD` until TLS is up (`NBD_OPT_EXPORT_NAME`, which cannot return an
//! error, ends the connection). After `NBD_REP_ACK` the TLS handshake runs on the same
//! stream ([`TlsAcceptor`]: x509 through rustls, or pre-shared keys through OpenSSL with the
//! `psk` feature), then the optional [`TlsConfig::authorize`] hook decides on the client's
//! identity ([`Peer`]), and the negotiation starts over inside TLS.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;

/// Who the client is once TLS is up, for [`Authorize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer<'a> {
    /// x509: the client's end-entity certificate (DER), `None` if it sent none.
    Certificate(Option<&'a [u8]>),
    /// Pre-shared keys: the identity (QEMU's PSK username) whose key the client proved.
    PskIdentity(&'a str),
}

impl Peer<'_> {
    /// How the client authenticated.
    pub fn kind(&self) -> PeerKind {
        match self {
            Peer::Certificate(_) => PeerKind::X509,
            Peer::PskIdentity(_) => PeerKind::Psk,
        }
    }
}

/// How a TLS client authenticated: the word QEMU's messages use for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// A certificate (`x509`).
    X509,
    /// A pre-shared key (`PSK`).
    Psk,
}

impl fmt::Display for PeerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeerKind::X509 => "x509",
            PeerKind::Psk => "PSK",
        })
    }
}

/// Why [`Authorize`] refused a client, in QEMU's words. The client sees the connection closed;
/// the server logs this.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// An x509 client that sent no certificate.
    #[error("No certificate peers")]
    NoCertificate,
    /// The authorization said no to this identity.
    #[error("TLS {kind} authz check for {identity} is denied")]
    Denied {
        /// How the client authenticated.
        kind: PeerKind,
        /// Its identity: a distinguished name, a PSK username.
        identity: String,
    },
    /// The identity could not be read from the certificate.
    #[error("Cannot get client distinguished name")]
    Identity(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The authorization could not decide (e.g. its rules cannot be read).
    #[error(transparent)]
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

impl Refusal {
    /// The text with its causes, `msg: cause: cause`, as QEMU logs it.
    pub fn message(&self) -> String {
        let mut out = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            out.push_str(": ");
            out.push_str(&c.to_string());
            cause = c.source();
        }
        out
    }
}

/// Decides whether a client may continue once TLS is up, from its identity ([`Peer`]).
///
/// The hook gets the certificate as DER, not a distinguished name: which name to check
/// (subject DN in some library's order, a SAN, a fingerprint) is the authorization's business,
/// and this crate stays free of any certificate parser. `qsd-crypto`'s authz objects
/// implement it with QEMU's GnuTLS-order DN.
///
/// Called for every connection, so that the authorization it consults can change while the
/// server runs. Closures `Fn(Peer<'_>) -> Result<String, Refusal>` implement it.
pub trait Authorize: Send + Sync {
    /// `Ok` with the client's name (for logs: a distinguished name, a PSK username), or why
    /// the client is refused.
    fn authorize(&self, peer: Peer<'_>) -> Result<String, Refusal>;
}

impl<F> Authorize for F
where
    F: Fn(Peer<'_>) -> Result<String, Refusal> + Send + Sync,
{
    fn authorize(&self, peer: Peer<'_>) -> Result<String, Refusal> {
        self(peer)
    }
}

/// How the TLS handshake runs after `NBD_OPT_STARTTLS` (QEMU's `tls-creds` types).
#[derive(Clone)]
pub enum TlsAcceptor {
    /// Certificates (`tls-creds-x509`) through rustls: certificate, key and client
    /// verification are in the configuration (for QEMU's `verify-peer=on`, a client verifier
    /// over the CA).
    Rustls(Arc<rustls::ServerConfig>),
    /// Pre-shared keys (`tls-creds-psk`) through OpenSSL.
    #[cfg(feature = "psk")]
    Psk(crate::psk::PskAcceptor),
}

impl fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsAcceptor::Rustls(c) => f
                .debug_struct("Rustls")
                .field("alpn_protocols", &c.alpn_protocols)
                .finish_non_exhaustive(),
            #[cfg(feature = "psk")]
            TlsAcceptor::Psk(p) => f.debug_tuple("Psk").field(p).finish(),
        }
    }
}

/// TLS settings of a server (QEMU's `tls-creds` and `tls-authz`).
#[derive(Clone)]
pub struct TlsConfig {
    /// The handshake: x509 or pre-shared keys.
    pub acceptor: TlsAcceptor,
    /// Authorization after the TLS handshake; `None` admits every client the TLS layer
    /// accepted.
    pub authorize: Option<Arc<dyn Authorize>>,
}

impl TlsConfig {
    /// x509 through rustls, with no authorization hook.
    pub fn rustls(server_config: Arc<rustls::ServerConfig>) -> TlsConfig {
        TlsConfig {
            acceptor: TlsAcceptor::Rustls(server_config),
            authorize: None,
        }
    }
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("acceptor", &self.acceptor)
            .field(
                "authorize",
                &self.authorize.as_ref().map(|_| "dyn Authorize"),
            )
            .finish()
    }
}

/// Runs the TLS handshake on `plain` with `tls`, then the authorization hook.
pub(crate) async fn accept<S>(plain: S, tls: &TlsConfig) -> Result<MaybeTls<S>, AcceptError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (stream, name) = match &tls.acceptor {
        TlsAcceptor::Rustls(config) => {
            let secured = tokio_rustls::TlsAcceptor::from(Arc::clone(config))
                .accept(plain)
                .await
                .map_err(AcceptError::Handshake)?;
            let name = match &tls.authorize {
                Some(authorize) => {
                    let cert = secured
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(|c| c.as_ref());
                    Some(
                        authorize
                            .authorize(Peer::Certificate(cert))
                            .map_err(AcceptError::Unauthorized)?,
                    )
                }
                None => None,
            };
            (MaybeTls::Tls(Box::new(secured)), name)
        }
        #[cfg(feature = "psk")]
        TlsAcceptor::Psk(acceptor) => {
            let (secured, identity) = acceptor.accept(plain).await?;
            let name = match &tls.authorize {
                Some(authorize) => Some(
                    authorize
                        .authorize(Peer::PskIdentity(&identity))
                        .map_err(AcceptError::Unauthorized)?,
                ),
                None => None,
            };
            (MaybeTls::Psk(Box::new(secured)), name)
        }
    };
    if let Some(name) = name {
        tracing::debug!(name, "NBD client authorized");
    }
    Ok(stream)
}

/// Why [`accept`] failed.
#[derive(Debug)]
pub(crate) enum AcceptError {
    /// The TLS handshake failed.
    Handshake(io::Error),
    /// The hook refused the client.
    Unauthorized(Refusal),
}

/// A connection's stream: plaintext, or TLS after `NBD_OPT_STARTTLS`. An enum, so that the
/// plaintext path costs one branch and no extra allocation or dynamic call.
#[derive(Debug)]
pub(crate) enum MaybeTls<S> {
    /// No TLS (not configured, or not started yet).
    Plain(S),
    /// TLS established over the stream (rustls).
    Tls(Box<TlsStream<S>>),
    /// TLS with pre-shared keys established over the stream (OpenSSL).
    #[cfg(feature = "psk")]
    Psk(Box<tokio_openssl::SslStream<S>>),
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
            #[cfg(feature = "psk")]
            MaybeTls::Psk(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
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
            #[cfg(feature = "psk")]
            MaybeTls::Psk(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
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
            #[cfg(feature = "psk")]
            MaybeTls::Psk(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
            #[cfg(feature = "psk")]
            MaybeTls::Psk(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            #[cfg(feature = "psk")]
            MaybeTls::Psk(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            #[cfg(feature = "psk")]
            MaybeTls::Psk(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
