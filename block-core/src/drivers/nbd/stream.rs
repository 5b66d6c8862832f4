//! Connecting to the server: TCP or a unix socket, then TLS when asked for.

use std::io;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::pki_types::ServerName;

/// A byte stream to the server.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// The connection to the server, plain or TLS.
pub type Stream = Box<dyn Io>;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// TCP: host name or address, port.
    Inet {
        /// Host.
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix socket.
    Unix(std::path::PathBuf),
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Inet { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Addr::Inet { host, port } => write!(f, "{host}:{port}"),
            Addr::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// TLS to use on the connection.
#[derive(Clone)]
pub struct Tls {
    /// The client configuration (from a `tls-creds-x509` object with the client endpoint).
    pub config: Arc<rustls::ClientConfig>,
    /// The name the server's certificate is checked against.
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Connects to `addr` (with `TCP_NODELAY`: requests are small and latency matters).
pub async fn connect(addr: &Addr) -> io::Result<Stream> {
    match addr {
        Addr::Inet { host, port } => {
            let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            s.set_nodelay(true)?;
            Ok(Box::new(s))
        }
        Addr::Unix(path) => Ok(Box::new(tokio::net::UnixStream::connect(path).await?)),
    }
}

/// Runs the TLS handshake over `s` (after `NBD_OPT_STARTTLS` was acknowledged).
pub async fn start_tls(s: Stream, tls: &Tls) -> io::Result<Stream> {
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config));
    let s = connector.connect(tls.server_name.clone(), s).await?;
    Ok(Box::new(s))
}
