//! The server: exports by name, listeners, connection limits, handshake deadline, stop.

use crate::export::{Export, ExportConfig};
use crate::handshake::{self, ExportSource, HandshakeError};
use crate::loops::Loops;
use crate::proto::MAX_STRING_SIZE;
use crate::socket::{Fixed, Rebind, Socket};
use crate::tls::TlsConfig;
use crate::transmission;
use block_core::{ExportGone, RemoveMode};
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// Errors of the export and server management API. Messages follow QEMU's.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// An export with this name already exists.
    #[error("NBD server already has export named '{0}'")]
    ExportExists(String),
    /// The export name is longer than 4096 bytes.
    #[error("export name '{0}' too long")]
    NameTooLong(String),
    /// The description is longer than 4096 bytes.
    #[error("description '{0}' too long")]
    DescriptionTooLong(String),
    /// No export has this name.
    #[error("Export '{0}' is not found")]
    NoSuchExport(String),
    /// A safe removal was asked while clients are connected.
    #[error("export '{0}' still in use")]
    InUse(String),
    /// A bitmap to export is busy (exported elsewhere, or used by another operation).
    #[error("Bitmap '{0}' is currently in use by another operation and cannot be used")]
    BitmapBusy(String),
    /// A bitmap to export is inconsistent (a persistent bitmap not stored cleanly).
    #[error("Bitmap '{0}' is inconsistent and cannot be used")]
    BitmapInconsistent(String),
    /// An enabled bitmap would change under a read-only export of a writable node.
    #[error("Enabled bitmap '{0}' incompatible with readonly export")]
    BitmapEnabled(String),
}

/// Settings of an [`NbdServer`]: [`ServerConfig::default`] (QEMU's), then the setters of what
/// differs (more settings may come: the struct cannot be built by hand).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Most clients connected at once, 0 for no limit. At the limit the server stops
    /// accepting until a client leaves (as QEMU does); 1 also clears
    /// `NBD_FLAG_CAN_MULTI_CONN` on exports added afterwards.
    pub max_connections: u32,
    /// A client that has not finished the handshake within this time is dropped
    /// (`handshake-max-seconds`; `None` for no limit).
    pub handshake_max: Option<Duration>,
    /// TLS (`tls-creds`, `tls-authz`): with it, clients must start TLS before anything
    /// else. The handshake deadline covers the TLS handshake too.
    pub tls: Option<TlsConfig>,
    /// After the handshake, connections move to this many threads, each with its own
    /// single-threaded event loop, and stay there (the one with the fewest connections is
    /// picked); 0 keeps them on the runtime that accepted them. An export's own
    /// [`runtime`](crate::ExportConfig::runtime) wins. See the `loops` module for why.
    pub event_loops: usize,
}

/// QEMU's default connection limit of the NBD server (`NBD_DEFAULT_MAX_CONNECTIONS`).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 100;

/// QEMU's default handshake deadline of the NBD server, in seconds
/// (`NBD_DEFAULT_HANDSHAKE_MAX_SECS`).
pub const DEFAULT_HANDSHAKE_MAX_SECONDS: u32 = 10;

impl Default for ServerConfig {
    /// QEMU 10's defaults: at most [`DEFAULT_MAX_CONNECTIONS`] connections, a
    /// [`DEFAULT_HANDSHAKE_MAX_SECONDS`] second handshake deadline.
    fn default() -> Self {
        ServerConfig {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_max: Some(Duration::from_secs(u64::from(
                DEFAULT_HANDSHAKE_MAX_SECONDS,
            ))),
            tls: None,
            event_loops: 0,
        }
    }
}

impl ServerConfig {
    /// Sets [`ServerConfig::max_connections`].
    pub fn max_connections(mut self, max_connections: u32) -> Self {
        self.max_connections = max_connections;
        self
    }

    /// Sets [`ServerConfig::handshake_max`].
    pub fn handshake_max(mut self, handshake_max: Option<Duration>) -> Self {
        self.handshake_max = handshake_max;
        self
    }

    /// Sets [`ServerConfig::tls`].
    pub fn tls(mut self, tls: Option<TlsConfig>) -> Self {
        self.tls = tls;
        self
    }

    /// Sets [`ServerConfig::event_loops`].
    pub fn event_loops(mut self, event_loops: usize) -> Self {
        self.event_loops = event_loops;
        self
    }
}

#[derive(Debug)]
struct Inner {
    config: ServerConfig,
    exports: Mutex<BTreeMap<String, Arc<Export>>>,
    stop: watch::Sender<bool>,
    slots: Option<Arc<Semaphore>>,
    loops: Option<Loops>,
}

impl ExportSource for Inner {
    fn find(&self, name: &str) -> Option<Arc<Export>> {
        self.lock().get(name).cloned()
    }

    fn all(&self) -> Vec<Arc<Export>> {
        self.lock().values().cloned().collect()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Export>>> {
        self.exports.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An NBD server: a set of named exports served on any number of listeners.
///
/// Cheap to clone (an `Arc` inside); every clone is the same server.
#[derive(Debug, Clone)]
pub struct NbdServer {
    inner: Arc<Inner>,
}

/// The send buffer asked for unix sockets (the kernel doubles it for its bookkeeping).
const UNIX_SEND_BUFFER: usize = 1 << 20;

/// A listening socket the server can accept clients from.
trait Listener {
    fn accept_socket(&self) -> impl Future<Output = io::Result<Socket>> + Send;
}

impl Listener for UnixListener {
    async fn accept_socket(&self) -> io::Result<Socket> {
        let (stream, _) = self.accept().await?;
        // A unix socket's send buffer is fixed (no autotuning as for TCP) at
        // `net.core.wmem_default`, usually 208 KiB: less than one 256 KiB read reply. A larger
        // one lets a reply leave in one call and the client take it in one wake-up (nbdcopy
        // with one connection: 2.0 -> 3.5 GiB/s here). Best effort: the kernel caps it at
        // `net.core.wmem_max`.
        crate::splice::set_send_buffer(stream.as_raw_fd(), UNIX_SEND_BUFFER);
        Ok(Socket::Unix(stream))
    }
}

impl Listener for TcpListener {
    async fn accept_socket(&self) -> io::Result<Socket> {
        let (stream, _) = self.accept().await?;
        // Small replies must leave at once: no Nagle delay.
        stream.set_nodelay(true)?;
        Ok(Socket::Tcp(stream))
    }
}

impl NbdServer {
    /// A server with no export and no listener yet.
    pub fn new(config: ServerConfig) -> Self {
        let slots = match config.max_connections {
            0 => None,
            n => Some(Arc::new(Semaphore::new(n as usize))),
        };
        let loops = match config.event_loops {
            0 => None,
            n => match Loops::start(n) {
                Ok(loops) => Some(loops),
                Err(e) => {
                    // Still a working server: connections stay where they were accepted.
                    tracing::warn!(error = %e, "cannot start the NBD event loops");
                    None
                }
            },
        };
        NbdServer {
            inner: Arc::new(Inner {
                config,
                exports: Mutex::new(BTreeMap::new()),
                stop: watch::channel(false).0,
                slots,
                loops,
            }),
        }
    }

    /// The server's settings.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// Accepts clients on a unix socket until [`stop`](Self::stop).
    pub async fn serve_unix(&self, listener: UnixListener) {
        self.accept_loop(listener).await
    }

    /// Accepts clients on a TCP socket until [`stop`](Self::stop); sets `TCP_NODELAY`.
    pub async fn serve_tcp(&self, listener: TcpListener) {
        self.accept_loop(listener).await
    }

    async fn accept_loop<L: Listener>(&self, listener: L) {
        let mut stop = self.inner.stop.subscribe();
        loop {
            if *stop.borrow() {
                return;
            }
            // At the connection limit, stop accepting until a slot frees.
            let permit = match &self.inner.slots {
                None => None,
                Some(slots) => tokio::select! {
                    p = Arc::clone(slots).acquire_owned() => match p {
                        Ok(p) => Some(p),
                        Err(_) => return,
                    },
                    _ = stop.changed() => continue,
                },
            };
            let stream = tokio::select! {
                s = listener.accept_socket() => s,
                _ = stop.changed() => continue,
            };
            match stream {
                Ok(stream) => {
                    let server = self.clone();
                    tokio::spawn(async move { server.run_client(stream, permit).await });
                }
                Err(e) => {
                    // E.g. EMFILE: do not spin; accept again a little later.
                    tracing::warn!(error = %e, "NBD accept failed");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }
    }

    /// Serves one already-connected client (any byte stream, e.g. a socket from an
    /// inherited fd) until it disconnects or the server stops; with TLS configured the
    /// client must start TLS on it. Such a client is not counted against
    /// `max_connections`. If the export it picks has a [`runtime`](ExportConfig::runtime),
    /// the transmission phase runs there, but the stream stays registered with the reactor
    /// it was made in (the server cannot move a stream it does not know).
    pub async fn serve_connection<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.run_client(Fixed(stream), None).await
    }

    /// The handshake here; then the transmission phase here or, if the export has a
    /// runtime, in a task there with the stream moved to that runtime's reactor. Returns
    /// when the connection is over either way, so that the permit and the export lease are
    /// held (by the task that serves the connection) exactly as long as it lives.
    async fn run_client<S>(&self, stream: S, permit: Option<OwnedSemaphorePermit>)
    where
        S: AsyncRead + AsyncWrite + Rebind + Unpin + Send + 'static,
    {
        let mut stop = self.inner.stop.subscribe();
        if *stop.borrow() {
            return;
        }
        let handshake = async {
            let negotiation =
                handshake::negotiate(stream, &*self.inner, self.inner.config.tls.as_ref());
            match self.inner.config.handshake_max {
                Some(limit) => tokio::time::timeout(limit, negotiation)
                    .await
                    .unwrap_or(Err(HandshakeError::Timeout)),
                None => negotiation.await,
            }
        };
        let session = tokio::select! {
            r = handshake => r,
            _ = stop.changed() => Err(HandshakeError::Shutdown),
        };
        let (stream, session) = match session {
            Ok(s) => s,
            Err(HandshakeError::Aborted) => return,
            Err(HandshakeError::Unauthorized(reason)) => {
                // QEMU fails the TLS negotiation: the client sees the connection closed.
                tracing::warn!(reason = reason.message(), "NBD client refused by tls-authz");
                return;
            }
            Err(e) => {
                tracing::info!(error = %e, "NBD handshake failed");
                return;
            }
        };
        let lease = session.export.lease();
        let name = session.export.name.clone();
        // Where the transmission runs: the export's runtime, else one of the server's loops
        // (for a stream that can move there), else here.
        let target = match session.export.runtime.clone() {
            Some(runtime) => Some((runtime, None)),
            None if stream.movable() => self
                .inner
                .loops
                .as_ref()
                .and_then(Loops::pick)
                .map(|(handle, lease)| (handle, Some(lease))),
            None => None,
        };
        let served = match target {
            None => {
                let _held = (permit, lease);
                transmission::run(stream, session, stop).await
            }
            Some((runtime, on_loop)) => {
                let mut stream = stream;
                if let Err(e) = stream.rebind(&runtime) {
                    tracing::warn!(export = %name, error = %e, "NBD client could not move to its event loop");
                    return;
                }
                // The task owns what the connection holds: if this future is dropped (its
                // runtime shutting down), the connection still ends with its requests
                // answered and only then releases the export.
                let task = runtime.spawn(async move {
                    let _held = (permit, lease, on_loop);
                    transmission::run(stream, session, stop).await
                });
                match task.await {
                    Ok(served) => served,
                    Err(e) => {
                        // The iothread's runtime was shut down under the connection.
                        tracing::info!(export = %name, error = %e, "NBD client dropped");
                        return;
                    }
                }
            }
        };
        if let Err(e) = served {
            tracing::info!(export = %name, error = %e, "NBD client disconnected");
        }
    }

    /// Adds an export. Its name must be unique and at most 4096 bytes long, as must its
    /// description. Its bitmaps must not be busy or inconsistent, nor enabled if the export
    /// is read-only and the node writable (QEMU's checks and messages); they are busy until
    /// the export is gone.
    pub fn add_export(&self, cfg: ExportConfig) -> Result<(), NbdError> {
        if cfg.name.len() > MAX_STRING_SIZE {
            return Err(NbdError::NameTooLong(cfg.name));
        }
        if let Some(desc) = &cfg.description {
            if desc.len() > MAX_STRING_SIZE {
                return Err(NbdError::DescriptionTooLong(desc.clone()));
            }
        }
        // QEMU's nbd_export_create: bitmaps are checked with BDRV_BITMAP_ALLOW_RO (not busy,
        // not inconsistent), and an enabled one refused on a read-only export of a writable
        // node (it would keep changing under the export).
        let writable_node = !cfg.attachment.node().read_only();
        for bitmap in &cfg.bitmaps {
            let name = bitmap.name().to_string();
            if bitmap.busy() {
                return Err(NbdError::BitmapBusy(name));
            }
            if bitmap.inconsistent() {
                return Err(NbdError::BitmapInconsistent(name));
            }
            if !cfg.attachment.writable() && writable_node && bitmap.enabled() {
                return Err(NbdError::BitmapEnabled(name));
            }
        }
        let mut exports = self.inner.lock();
        if exports.contains_key(&cfg.name) {
            return Err(NbdError::ExportExists(cfg.name));
        }
        let multi_conn = self.inner.config.max_connections != 1;
        let name = cfg.name.clone();
        exports.insert(name, Export::new(cfg, multi_conn));
        Ok(())
    }

    /// Removes an export: new clients no longer see it. [`RemoveMode::Safe`] fails while
    /// clients are connected; [`RemoveMode::Hard`] disconnects them once their requests in
    /// flight are done. The returned future resolves when the last of them is gone and the
    /// export's attachment is released.
    pub fn remove_export(&self, name: &str, mode: RemoveMode) -> Result<ExportGone, NbdError> {
        let export = {
            let mut exports = self.inner.lock();
            let Some(export) = exports.get(name) else {
                return Err(NbdError::NoSuchExport(name.to_string()));
            };
            if mode == RemoveMode::Safe && export.client_count() > 0 {
                return Err(NbdError::InUse(name.to_string()));
            }
            exports
                .remove(name)
                .ok_or_else(|| NbdError::NoSuchExport(name.to_string()))?
        };
        // Hard: the clients end once their requests are done. Safe: there is no client,
        // but one may be between its handshake and its first request: it ends too.
        export.close();
        Ok(export.gone())
    }

    /// The names of the exports, sorted.
    pub fn export_names(&self) -> Vec<String> {
        self.inner.lock().keys().cloned().collect()
    }

    /// How many clients are in the transmission phase on the export (0 if it does not
    /// exist).
    pub fn client_count(&self, export: &str) -> usize {
        self.inner
            .lock()
            .get(export)
            .map_or(0, |e| e.client_count())
    }

    /// Stops the server: every listener stops accepting, clients in the handshake are
    /// dropped, and clients in transmission are disconnected once their requests in flight
    /// are done. Exports stay registered (remove them to release their nodes). A stopped
    /// server does not start again.
    pub fn stop(&self) {
        self.inner.stop.send_replace(true);
    }
}
