//! Sockets made as QEMU's `util/qemu-sockets.c` makes them, with its error messages.
//!
//! For a daemon's chardevs and its other listeners (blockexportd binds its NBD server and
//! vhost-user sockets with it too). A unix path is bound with [`listen_unix`]: whatever is at
//! the path is unlinked first, so that a socket file left by a daemon that was killed does not
//! stop the next one with "Address already in use". QEMU unlinks without looking at the file's
//! type, a regular file included; a directory cannot be unlinked and fails the same way.

use std::io;
use std::path::Path;
use tokio::net::{TcpStream, UnixListener, UnixStream};

/// A socket could not be bound or connected.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// What was at the path could not be removed.
    #[error("Failed to unlink socket {path}")]
    Unlink {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `bind(2)` failed.
    #[error("Failed to bind socket to {path}")]
    Bind {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `connect(2)` failed (or no address of the host accepted).
    #[error("Failed to connect to '{addr}'")]
    Connect {
        /// The path, or `host:port`.
        addr: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The port is not a number.
    #[error("Parameter 'port' expects a port number: '{0}'")]
    Port(String),
}

impl SocketError {
    /// The message as QEMU prints it (`Failed to connect to 'P': No such file or directory`).
    pub fn qemu_message(&self) -> String {
        qsd_qapi::error_text(self)
    }
}

/// Binds a listening unix socket at `path`, unlinking whatever was there first (QEMU's
/// `unix_listen_saddr`). Must run inside a tokio runtime.
pub fn listen_unix(path: &Path) -> Result<UnixListener, SocketError> {
    let shown = || path.display().to_string();
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(SocketError::Unlink {
                path: shown(),
                source,
            })
        }
    }
    UnixListener::bind(path).map_err(|source| SocketError::Bind {
        path: shown(),
        source,
    })
}

/// Connects to a listening unix socket.
pub async fn connect_unix(path: &Path) -> Result<UnixStream, SocketError> {
    UnixStream::connect(path)
        .await
        .map_err(|source| SocketError::Connect {
            addr: path.display().to_string(),
            source,
        })
}

/// Connects to `host:port` (a name or an address, IPv6 addresses with or without brackets),
/// trying each address of the host in turn, with Nagle's algorithm off as QEMU's chardevs
/// have it.
pub async fn connect_tcp(host: &str, port: &str) -> Result<TcpStream, SocketError> {
    let number: u16 = port.parse().map_err(|_| SocketError::Port(port.into()))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let stream =
        TcpStream::connect((bare, number))
            .await
            .map_err(|source| SocketError::Connect {
                addr: format!("{host}:{port}"),
                source,
            })?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stale_socket_or_file_is_replaced_a_directory_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        // A socket file whose listener is gone: bind() alone would fail with EADDRINUSE.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(UnixListener::bind(&path).is_err());
        let l = listen_unix(&path).unwrap();
        let _c = std::os::unix::net::UnixStream::connect(&path).unwrap();
        drop(l);
        // A regular file is unlinked as well, as QEMU does.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"x").unwrap();
        listen_unix(&path).unwrap();
        let d = dir.path().join("d");
        std::fs::create_dir(&d).unwrap();
        let e = listen_unix(&d).unwrap_err();
        assert_eq!(
            e.qemu_message(),
            format!("Failed to unlink socket {}: Is a directory", d.display())
        );
    }

    #[tokio::test]
    async fn connect_errors_read_as_qemu_s() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none");
        let e = connect_unix(&path).await.unwrap_err();
        assert_eq!(
            e.qemu_message(),
            format!(
                "Failed to connect to '{}': No such file or directory",
                path.display()
            )
        );
        // A port nobody listens on: bind one, note it, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = connect_tcp("127.0.0.1", &port.to_string())
            .await
            .unwrap_err();
        assert_eq!(
            e.qemu_message(),
            format!("Failed to connect to '127.0.0.1:{port}': Connection refused")
        );
    }
}
