//! The daemon: nodes, objects, chardevs, monitors, the NBD server and exports, and the
//! commands that change them. Both the command line and QMP go through the methods here.

use crate::errors;
use crate::exports::{self, ExportContext, ExportRequest, Exports, Registry, RunningExport};
use crate::objects::{IoThread, ObjectEntry, Objects};
use crate::qapi::{self, SocketAddress};
use block_core::{GraphError, Node, NodeGraph, RemoveMode};
use qmp_server::{EventSender, QmpError, QmpServer};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

/// A command's error: a QMP error class and QEMU's message.
pub type CmdResult<T = Value> = Result<T, QmpError>;

fn generic(msg: impl Into<String>) -> QmpError {
    QmpError::generic(msg)
}

/// A `--chardev` that a monitor has not taken yet. With `wait=on` (QEMU's default for
/// server sockets) its first client was accepted before startup went on.
#[derive(Debug)]
enum Chardev {
    Unix(UnixListener, PathBuf, Option<tokio::net::UnixStream>),
    Tcp(TcpListener, Option<tokio::net::TcpStream>),
    /// A client socket (no `server=on`): the daemon connects to its peer.
    Client(ClientChardev),
    Stdio,
    /// `pipe`: FIFOs `PATH.in` and `PATH.out`, or `PATH` itself, open since creation.
    Pipe(qmp_server::pipe::PipeChardev),
    /// Taken by a monitor.
    Used,
}

/// A client chardev. Without a reconnect delay the connection was made when the chardev
/// was created (a failure ends startup, as in QEMU); with one, connecting starts when a
/// monitor takes the chardev and a failure is reported and retried.
#[derive(Debug)]
struct ClientChardev {
    id: String,
    addr: ClientAddr,
    reconnect: Option<Duration>,
}

#[derive(Debug)]
enum ClientAddr {
    Unix(PathBuf, Option<tokio::net::UnixStream>),
    Tcp(String, String, Option<tokio::net::TcpStream>),
}

impl ClientChardev {
    async fn new(opts: &qapi::ChardevOptions, reconnect_ms: Option<i64>) -> CmdResult<Self> {
        if opts.wait.is_some() {
            return Err(generic(
                "'wait' option is incompatible with socket in client connect mode",
            ));
        }
        // QEMU reconnects only for a positive delay; `reconnect=0` is a plain client.
        let reconnect = reconnect_ms
            .and_then(|ms| u64::try_from(ms).ok())
            .filter(|&ms| ms > 0)
            .map(Duration::from_millis);
        let connect_now = reconnect.is_none();
        let err = |e: qmp_server::sockets::SocketError| generic(e.qemu_message());
        let addr = if let Some(path) = &opts.path {
            let path = PathBuf::from(path);
            let first = if connect_now {
                Some(
                    qmp_server::sockets::connect_unix(&path)
                        .await
                        .map_err(err)?,
                )
            } else {
                None
            };
            ClientAddr::Unix(path, first)
        } else if let Some(host) = &opts.host {
            let port = opts
                .port
                .clone()
                .ok_or_else(|| generic("chardev: socket: no port given"))?;
            let first = if connect_now {
                Some(
                    qmp_server::sockets::connect_tcp(host, &port)
                        .await
                        .map_err(err)?,
                )
            } else {
                None
            };
            ClientAddr::Tcp(host.clone(), port, first)
        } else {
            return Err(generic("chardev: socket: no host given"));
        };
        Ok(ClientChardev {
            id: opts.id.clone(),
            addr,
            reconnect,
        })
    }

    /// Serves monitors over this chardev's connections until the server shuts down (or, with
    /// no reconnect delay, until the one connection ends).
    async fn serve(self, qmp: QmpServer, opts: qmp_server::MonitorOptions) {
        let reporter = Arc::new(ConnectReporter {
            id: self.id,
            reported: AtomicBool::new(false),
        });
        match self.addr {
            ClientAddr::Unix(path, first) => {
                let connect = move || {
                    let (path, reporter) = (path.clone(), Arc::clone(&reporter));
                    async move { reporter.note(qmp_server::sockets::connect_unix(&path).await) }
                };
                qmp.serve_client(connect, first, self.reconnect, opts).await
            }
            ClientAddr::Tcp(host, port, first) => {
                let connect = move || {
                    let (host, port) = (host.clone(), port.clone());
                    let reporter = Arc::clone(&reporter);
                    async move { reporter.note(qmp_server::sockets::connect_tcp(&host, &port).await) }
                };
                qmp.serve_client(connect, first, self.reconnect, opts).await
            }
        }
    }
}

/// Reports a client chardev's failed connect once until a connect succeeds again, as QEMU
/// does (`Unable to connect character device ID: Failed to connect to 'P': ...`).
struct ConnectReporter {
    id: String,
    reported: AtomicBool,
}

impl ConnectReporter {
    fn note<S>(&self, r: Result<S, qmp_server::sockets::SocketError>) -> std::io::Result<S> {
        match r {
            Ok(s) => {
                self.reported.store(false, Ordering::Relaxed);
                Ok(s)
            }
            Err(e) => {
                if !self.reported.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        target: crate::logging::OPERATOR,
                        "Unable to connect character device {}: {}",
                        self.id,
                        e.qemu_message()
                    );
                }
                Err(std::io::Error::other(e))
            }
        }
    }
}

/// The NBD server's listeners while it runs (the server itself is in [`Daemon::nbd_server`]).
struct NbdState {
    listeners: Vec<JoinHandle<()>>,
    unix_path: Option<PathBuf>,
}

#[derive(Default)]
struct State {
    chardevs: BTreeMap<String, Chardev>,
    monitors: Vec<JoinHandle<()>>,
    nbd: Option<NbdState>,
    exports: Exports,
}

/// The daemon's state, shared by the command line, every monitor and the signal handlers.
pub struct Daemon {
    graph: NodeGraph,
    qmp: QmpServer,
    events: EventSender,
    state: Mutex<State>,
    /// Objects by id. A plain mutex: the NBD server looks authz objects up from
    /// synchronous code when a client connects.
    objects: Arc<Objects>,
    runtime: tokio::runtime::Handle,
    /// The export types.
    export_types: Registry,
    /// The NBD server while it runs; NBD exports are added to it.
    nbd_server: exports::nbd::ServerSlot,
    /// Bumped whenever an export is gone, for those waiting for draining exports to end.
    export_removed: tokio::sync::watch::Sender<u64>,
}

impl Daemon {
    /// A daemon with no nodes, exports or monitors, answering QMP through `qmp`.
    pub fn new(qmp: QmpServer, runtime: tokio::runtime::Handle) -> Arc<Daemon> {
        let events = qmp.events();
        let nbd_server = exports::nbd::ServerSlot::default();
        let objects: Arc<Objects> = Arc::default();
        let graph = NodeGraph::new();
        graph.set_objects(Arc::new(crate::objects::DriverObjects(Arc::clone(
            &objects,
        ))));
        Arc::new(Daemon {
            graph,
            qmp,
            events,
            state: Mutex::new(State::default()),
            objects,
            runtime,
            export_types: exports::registry(&nbd_server),
            nbd_server,
            export_removed: tokio::sync::watch::channel(0).0,
        })
    }

    /// The QMP server of the daemon.
    pub fn qmp(&self) -> &QmpServer {
        &self.qmp
    }

    /// The node graph.
    pub fn graph(&self) -> &NodeGraph {
        &self.graph
    }

    // ----- nodes -----

    /// `blockdev-add` (JSON).
    pub async fn blockdev_add(&self, options: Map<String, Value>) -> CmdResult {
        self.blockdev_add_in(options, false).await
    }

    /// `blockdev-add` / `--blockdev`, from JSON or from keyval syntax (`keyval`).
    pub async fn blockdev_add_in(&self, options: Map<String, Value>, keyval: bool) -> CmdResult {
        let syntax = qsd_qapi::Syntax::keyval_if(keyval);
        let options = qsd_qapi::from_value_in(Value::Object(options), "", syntax)?;
        block_core::open::blockdev_add(&self.graph, options)
            .await
            .map_err(errors::graph)?;
        Ok(json!({}))
    }

    /// `blockdev-del`: the node and the children its `blockdev-add` opened, as QEMU.
    pub async fn blockdev_del(&self, args: qapi::BlockdevDel) -> CmdResult {
        for node in self.graph.delete(&args.node_name).map_err(errors::graph)? {
            close_node(&node).await;
        }
        Ok(json!({}))
    }

    /// `blockdev-set-active`.
    pub async fn blockdev_set_active(&self, args: qapi::BlockdevSetActive) -> CmdResult {
        self.graph
            .set_active(args.node_name.as_deref(), args.active)
            .await
            .map_err(errors::graph)?;
        Ok(json!({}))
    }

    /// Closes the implicit children that were only kept by an export that is gone.
    async fn close_unused_nodes(&self) {
        for node in self.graph.sweep() {
            close_node(&node).await;
        }
    }

    /// `query-named-block-nodes`.
    pub fn query_named_block_nodes(&self, args: qapi::QueryNamedBlockNodes) -> CmdResult {
        let flat = args.flat.unwrap_or(false);
        Ok(Value::Array(
            self.graph
                .all()
                .iter()
                .map(|n| {
                    let mut info = block_core::open::node_info(n, flat);
                    if let (Some(bitmaps), Some(obj)) =
                        (crate::bitmaps::info(n), info.as_object_mut())
                    {
                        obj.insert("dirty-bitmaps".into(), bitmaps);
                    }
                    info
                })
                .collect(),
        ))
    }

    /// `block_resize`.
    pub async fn block_resize(&self, args: qapi::BlockResize) -> CmdResult {
        let name = args.node_name.or(args.device).unwrap_or_default();
        let node = self.find_node(&name)?;
        if args.size < 0 {
            return Err(generic("Parameter 'size' expects a >0 size"));
        }
        if !node.is_active() {
            return Err(generic("Permission 'resize' unavailable on inactive node"));
        }
        node.resize(args.size as u64).await.map_err(|e| match e {
            block_core::BlockError::Unsupported(_) => {
                generic("Image format driver does not support resize")
            }
            block_core::BlockError::ReadOnly => generic("Image is read-only"),
            // The driver's own words, as QEMU's drivers set them ("Cannot grow NBD nodes").
            block_core::BlockError::Invalid(m) => generic(m),
            e => generic(format!("Could not resize: {e}")),
        })?;
        Ok(json!({}))
    }

    fn find_node(&self, name: &str) -> CmdResult<Arc<Node>> {
        find_node(&self.graph, name)
    }

    // ----- objects -----

    /// `object-add` / `--object`.
    pub async fn object_add(&self, mut props: Map<String, Value>, keyval: bool) -> CmdResult {
        let qom_type = match props.remove("qom-type") {
            Some(Value::String(t)) => t,
            Some(_) => {
                return Err(generic(
                    "Invalid parameter type for 'qom-type', expected: string",
                ))
            }
            None => return Err(generic("Parameter 'qom-type' is missing")),
        };
        let id = match props.get("id") {
            Some(Value::String(id)) => id.clone(),
            Some(_) => return Err(generic("Invalid parameter type for 'id', expected: string")),
            None => return Err(generic("Parameter 'id' is missing")),
        };
        let ty = crate::objects::find_type(&qom_type)?;
        props.remove("id");
        let check_id = || self.check_object_id(&id);
        let cx = crate::objects::CreateContext {
            id: &id,
            check_id: &check_id,
            objects: &self.objects,
        };
        let entry = ty.create(&id, props, keyval, &cx)?;
        let mut objects = self.lock_objects();
        self.check_object_id_locked(&objects, &id)?;
        objects.insert(id, entry);
        Ok(json!({}))
    }

    fn lock_objects(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ObjectEntry>> {
        crate::objects::lock(&self.objects)
    }

    fn check_object_id(&self, id: &str) -> CmdResult<()> {
        self.check_object_id_locked(&self.lock_objects(), id)
    }

    fn check_object_id_locked(
        &self,
        objects: &BTreeMap<String, ObjectEntry>,
        id: &str,
    ) -> CmdResult<()> {
        if !block_core::graph::id_wellformed(id) {
            return Err(generic("Parameter 'id' expects an identifier"));
        }
        if objects.contains_key(id) {
            return Err(generic(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        Ok(())
    }

    /// `qom-list`: the children of `/` and `/objects`, the properties of `/objects/ID`.
    pub fn qom_list(&self, path: &str) -> CmdResult {
        let prop = |name: &str, ty: &str| json!({"name": name, "type": ty});
        let objects = self.lock_objects();
        match path.trim_end_matches('/') {
            "" => Ok(json!([
                prop("type", "string"),
                prop("objects", "child<container>"),
                prop("chardevs", "child<container>"),
            ])),
            "/objects" => {
                let mut list = vec![prop("type", "string")];
                list.extend(
                    objects
                        .iter()
                        .map(|(id, e)| prop(id, &format!("child<{}>", e.ty.name()))),
                );
                Ok(Value::Array(list))
            }
            p => match p.strip_prefix("/objects/").and_then(|id| objects.get(id)) {
                Some(e) => {
                    let mut list = vec![prop("type", "string")];
                    list.extend(e.ty.properties().iter().map(|(name, ty, _)| prop(name, ty)));
                    Ok(Value::Array(list))
                }
                None => Err(QmpError::device_not_found(format!(
                    "Device '{path}' not found"
                ))),
            },
        }
    }

    /// `qom-get` of an object's property.
    pub fn qom_get(&self, path: &str, property: &str) -> CmdResult {
        let objects = self.lock_objects();
        let entry = path
            .trim_end_matches('/')
            .strip_prefix("/objects/")
            .and_then(|id| objects.get(id))
            .ok_or_else(|| QmpError::device_not_found(format!("Device '{path}' not found")))?;
        if property == "type" {
            return Ok(json!(entry.ty.name()));
        }
        entry.property(property).ok_or_else(|| {
            generic(format!(
                "Property '{}.{property}' not found",
                entry.ty.name()
            ))
        })
    }

    /// The bytes of the `secret` object `id` (for TLS keys and drivers), with QEMU's errors
    /// (`No secret with id 'ID'`, `Object with id 'ID' is not a secret`).
    pub fn secret(&self, id: &str) -> Result<Vec<u8>, qsd_crypto::SecretError> {
        crate::objects::secret(&self.objects, id)
    }

    /// `object-del`.
    pub async fn object_del(&self, args: qapi::ObjectDel) -> CmdResult {
        if let Some(id) = self.state.lock().await.exports.using_iothread(&args.id) {
            return Err(generic(format!(
                "object '{}' is in use by export '{id}' and cannot be deleted",
                args.id
            )));
        }
        let object = self
            .lock_objects()
            .remove(&args.id)
            .ok_or_else(|| generic(format!("object '{}' not found", args.id)))?;
        // Joining an iothread blocks: do it off the runtime.
        let _ = tokio::task::spawn_blocking(move || drop(object)).await;
        Ok(json!({}))
    }

    // ----- chardevs and monitors -----

    /// `--chardev`.
    pub async fn chardev_add(&self, args: Map<String, Value>) -> CmdResult {
        let opts: qapi::ChardevOptions = qsd_qapi::from_keyval(Value::Object(args))?;
        let mut state = self.state.lock().await;
        // QEMU opens a pipe before it looks at the id (a socket is checked first here).
        if opts.backend != "pipe" && state.chardevs.contains_key(&opts.id) {
            return Err(duplicate_chardev(&opts.id));
        }
        let chardev = match opts.backend.as_str() {
            "stdio" => Chardev::Stdio,
            "pipe" => {
                let pipe = qmp_server::pipe::open(opts.path.as_deref())
                    .map_err(|e| generic(e.qemu_message()))?;
                if state.chardevs.contains_key(&opts.id) {
                    return Err(duplicate_chardev(&opts.id));
                }
                Chardev::Pipe(pipe)
            }
            "socket" => {
                if opts.reconnect.is_some() && opts.reconnect_ms.is_some() {
                    return Err(generic(
                        "'reconnect' and 'reconnect-ms' are mutually exclusive",
                    ));
                }
                let reconnect_ms = opts
                    .reconnect
                    .map(|s| s.saturating_mul(1000))
                    .or(opts.reconnect_ms);
                if opts.server != Some(true) {
                    let client = ClientChardev::new(&opts, reconnect_ms).await?;
                    state.chardevs.insert(opts.id, Chardev::Client(client));
                    return Ok(json!({}));
                }
                // QEMU 10.0 refuses `reconnect` on a server socket but lets `reconnect-ms` by.
                if opts.reconnect.is_some() {
                    return Err(generic(
                        "'reconnect' option is incompatible with socket in server listen mode",
                    ));
                }
                let chardev = if let Some(path) = &opts.path {
                    let path = PathBuf::from(path);
                    let listener = qmp_server::sockets::listen_unix(&path)
                        .map_err(|e| generic(e.qemu_message()))?;
                    let first = if opts.wait == Some(false) {
                        None
                    } else {
                        tracing::info!(
                            target: crate::logging::OPERATOR,
                            "waiting for connection on: disconnected:unix:{},server=on",
                            path.display()
                        );
                        let (stream, _) = listener.accept().await.map_err(|e| {
                            generic(format!("Failed to accept on {}: {e}", path.display()))
                        })?;
                        Some(stream)
                    };
                    Chardev::Unix(listener, path, first)
                } else if let (Some(host), Some(port)) = (&opts.host, &opts.port) {
                    let listener = bind_tcp(host, port).await?;
                    let first = if opts.wait == Some(false) {
                        None
                    } else {
                        tracing::info!(
                            target: crate::logging::OPERATOR,
                            "waiting for connection on: disconnected:tcp:{host}:{port},server=on"
                        );
                        let (stream, _) = listener.accept().await.map_err(|e| {
                            generic(format!("Failed to accept on {host}:{port}: {e}"))
                        })?;
                        Some(stream)
                    };
                    Chardev::Tcp(listener, first)
                } else {
                    return Err(generic("chardev: socket: no host given"));
                };
                chardev
            }
            other => {
                return Err(generic(format!(
                    "'{other}' is not a valid char driver name"
                )))
            }
        };
        state.chardevs.insert(opts.id, chardev);
        Ok(json!({}))
    }

    /// `--monitor`.
    pub async fn monitor_add(
        self: &Arc<Self>,
        args: Map<String, Value>,
        keyval: bool,
    ) -> CmdResult {
        let opts: qapi::MonitorOptions =
            qsd_qapi::from_value_in(Value::Object(args), "", qsd_qapi::Syntax::keyval_if(keyval))?;
        if opts.mode.as_deref().is_some_and(|m| m != "control") {
            return Err(generic("Only QMP is supported"));
        }
        let mon_opts = qmp_server::MonitorOptions {
            pretty: opts.pretty.unwrap_or(false),
        };
        let mut state = self.state.lock().await;
        let chardev = state
            .chardevs
            .get_mut(&opts.chardev)
            .ok_or_else(|| generic(format!("chardev \"{}\" not found", opts.chardev)))?;
        let qmp = self.qmp.clone();
        let task = match std::mem::replace(chardev, Chardev::Used) {
            Chardev::Unix(listener, _path, first) => tokio::spawn(async move {
                if let Some(stream) = first {
                    qmp.serve_stream(stream, mon_opts).await;
                }
                qmp.serve_unix(listener, mon_opts).await
            }),
            Chardev::Tcp(listener, first) => tokio::spawn(async move {
                if let Some(stream) = first {
                    qmp.serve_stream(stream, mon_opts).await;
                }
                qmp.serve_tcp(listener, mon_opts).await
            }),
            Chardev::Client(client) => tokio::spawn(client.serve(qmp, mon_opts)),
            Chardev::Stdio => tokio::spawn(async move { qmp.serve_stdio(mon_opts).await }),
            Chardev::Pipe(pipe) => {
                let (reader, writer) = pipe.into_async().map_err(|e| {
                    generic(format!(
                        "chardev '{}': {}",
                        opts.chardev,
                        qsd_qapi::strerror(&e)
                    ))
                })?;
                tokio::spawn(async move { qmp.serve_session(reader, writer, mon_opts).await })
            }
            Chardev::Used => {
                return Err(generic(format!(
                    "chardev '{}' is already in use",
                    opts.chardev
                )))
            }
        };
        state.monitors.push(task);
        Ok(json!({}))
    }

    // ----- NBD server -----

    /// `nbd-server-start` / `--nbd-server`.
    pub async fn nbd_server_start(&self, opts: qapi::NbdServerOptions) -> CmdResult {
        let mut state = self.state.lock().await;
        if state.nbd.is_some() {
            return Err(generic("NBD server already running"));
        }
        let tls = self.nbd_tls_config(&opts)?;
        let config = nbd_server::ServerConfig::default()
            .max_connections(
                opts.max_connections
                    .unwrap_or(nbd_server::DEFAULT_MAX_CONNECTIONS),
            )
            .handshake_max(
                match opts
                    .handshake_max_seconds
                    .unwrap_or(nbd_server::DEFAULT_HANDSHAKE_MAX_SECONDS)
                {
                    0 => None,
                    s => Some(Duration::from_secs(u64::from(s))),
                },
            )
            .tls(tls)
            // Connections of exports without an iothread: one event loop per core.
            .event_loops(std::thread::available_parallelism().map_or(1, |n| n.get()));
        let server = nbd_server::NbdServer::new(config);
        let mut unix_path = None;
        let task = match &opts.addr {
            SocketAddress::Unix(u) => {
                if u.abstract_ == Some(true) {
                    return Err(generic("abstract unix sockets are not supported"));
                }
                let path = PathBuf::from(&u.path);
                let listener = qmp_server::sockets::listen_unix(&path)
                    .map_err(|e| generic(e.qemu_message()))?;
                unix_path = Some(path);
                let s = server.clone();
                tokio::spawn(async move { s.serve_unix(listener).await })
            }
            SocketAddress::Inet(i) => {
                if i.to.is_some() {
                    return Err(generic("'to' is not supported for the NBD server address"));
                }
                let listener = bind_tcp(&i.host, &i.port).await?;
                let s = server.clone();
                tokio::spawn(async move { s.serve_tcp(listener).await })
            }
            SocketAddress::Fd(f) => {
                let listener = listener_from_fd(&f.str)?;
                let s = server.clone();
                match listener {
                    InheritedListener::Unix(l) => {
                        tokio::spawn(async move { s.serve_unix(l).await })
                    }
                    InheritedListener::Tcp(l) => tokio::spawn(async move { s.serve_tcp(l).await }),
                }
            }
        };
        *self.lock_nbd_server() = Some(server);
        state.nbd = Some(NbdState {
            listeners: vec![task],
            unix_path,
        });
        Ok(json!({}))
    }

    /// The TLS configuration of the NBD server: the server credentials now, the authz object
    /// by id whenever a client connects (so that it can be deleted and recreated while the
    /// server runs, as in QEMU).
    fn nbd_tls_config(
        &self,
        opts: &qapi::NbdServerOptions,
    ) -> CmdResult<Option<nbd_server::TlsConfig>> {
        let Some(creds_id) = &opts.tls_creds else {
            return Ok(None);
        };
        // QEMU checks the client's name only when it verified the client's certificate; a
        // PSK client's username is always checked (QEMU 10.0 ignores tls-authz with PSK).
        let (acceptor, check) = self.tls_acceptor(creds_id)?;
        let authorize: Option<Arc<dyn nbd_server::Authorize>> = match &opts.tls_authz {
            Some(authz_id) if check => Some(Arc::new(AuthzById {
                objects: Arc::downgrade(&self.objects),
                id: authz_id.clone(),
            })),
            _ => None,
        };
        Ok(Some(nbd_server::TlsConfig {
            acceptor,
            authorize,
        }))
    }

    /// The server side of the TLS credentials object `id`, and whether `tls-authz` applies.
    fn tls_acceptor(&self, id: &str) -> CmdResult<(nbd_server::TlsAcceptor, bool)> {
        let objects = self.lock_objects();
        let entry = objects.get(id);
        if let Some(c) = entry.and_then(|e| e.get::<qsd_crypto::TlsCredsX509>()) {
            let config = c.server_config().map_err(|e| generic(e.qemu_message()))?;
            return Ok((nbd_server::TlsAcceptor::Rustls(config), c.verify_peer()));
        }
        #[cfg(feature = "psk")]
        if let Some(c) = entry.and_then(|e| e.get::<qsd_crypto::TlsCredsPsk>()) {
            let acceptor = c.acceptor().map_err(|e| generic(e.qemu_message()))?;
            return Ok((nbd_server::TlsAcceptor::Psk(acceptor), true));
        }
        Err(generic(format!("No TLS credentials with id '{id}'")))
    }

    fn lock_nbd_server(&self) -> std::sync::MutexGuard<'_, Option<nbd_server::NbdServer>> {
        self.nbd_server.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `nbd-server-stop`: ends every NBD export and every client.
    pub async fn nbd_server_stop(&self) -> CmdResult {
        let mut state = self.state.lock().await;
        let nbd = state
            .nbd
            .take()
            .ok_or_else(|| generic("NBD server not running"))?;
        // No NBD export can be added from here on.
        let server = self.lock_nbd_server().take();
        drop(state);
        self.end_exports(|e| e.type_name == exports::nbd::TYPE_NAME)
            .await;
        stop_nbd_server(nbd, server);
        Ok(json!({}))
    }

    // ----- exports -----

    /// Parses `block-export-add` arguments (`--export` with `keyval`): the common base, the
    /// type, and the type's own members (see [`exports`]).
    pub fn parse_export(&self, args: Map<String, Value>, keyval: bool) -> CmdResult<ExportRequest> {
        self.export_types.parse(args, keyval)
    }

    /// `block-export-add` / `--export`: the checks every type shares, in QEMU's order
    /// (`blk_exp_add`), then the type checks its own options and starts the export.
    pub async fn block_export_add(&self, request: ExportRequest) -> CmdResult {
        let ExportRequest {
            common: o,
            ty,
            options,
        } = request;
        let mut state = self.state.lock().await;
        if !block_core::graph::id_wellformed(&o.id) {
            return Err(generic("Invalid block export id"));
        }
        if state.exports.contains(&o.id) {
            return Err(generic(format!(
                "Block export id '{}' is already in use",
                o.id
            )));
        }
        let node = self.find_node(&o.node_name)?;
        let writable = o.writable.unwrap_or(false);
        if writable && node.read_only() {
            return Err(generic("Cannot export read-only node as writable"));
        }
        let iothread = match o.iothread.as_deref() {
            Some(name) => match self
                .lock_objects()
                .get(name)
                .and_then(|e| e.get::<IoThread>())
            {
                Some(t) => Some(t.handle().clone()),
                _ => return Err(generic(format!("iothread \"{name}\" not found"))),
            },
            None => None,
        };
        // As QEMU, the export's node is activated unless the export may serve it inactive.
        let allow_inactive = o.allow_inactive == Some(true);
        if allow_inactive {
            if !ty.supports_inactive() {
                return Err(generic("Export type does not support inactive exports"));
            }
        } else {
            self.graph
                .activate(&node)
                .await
                .map_err(|e| generic(e.to_string()))?;
        }
        let attachment = node
            .attach(format!("export '{}'", o.id), writable)
            .map_err(errors::attach)?;
        if allow_inactive {
            node.allow_inactive(attachment.id());
        }
        // `fixed-iothread` needs nothing here: nodes have no iothread to move (see
        // `CommonOptions::fixed_iothread`).
        let ctx = ExportContext {
            id: &o.id,
            attachment,
            writable,
            writethrough: o.writethrough.unwrap_or(false),
            iothread,
            runtime: &self.runtime,
            graph: &self.graph,
        };
        let export = options.start(ctx).await?;
        state
            .exports
            .insert(o.id, ty.name(), o.node_name, o.iothread, export);
        Ok(json!({}))
    }

    /// `block-export-del`. A removal without clients finishes
    /// before the reply, its event first, as in QEMU; with clients (`mode: hard`), the export
    /// shows `shutting-down` until its last request is done.
    pub async fn block_export_del(self: &Arc<Self>, id: &str, mode: RemoveMode) -> CmdResult {
        self.export_del(id, mode, false).await
    }

    /// `nbd-server-remove` (deprecated): `block-export-del` of an NBD export.
    pub async fn nbd_server_remove(self: &Arc<Self>, name: &str, mode: RemoveMode) -> CmdResult {
        self.export_del(name, mode, true).await
    }

    /// Removes the export `id`, which must be an NBD export if `nbd_only`.
    async fn export_del(self: &Arc<Self>, id: &str, mode: RemoveMode, nbd_only: bool) -> CmdResult {
        let mut state = self.state.lock().await;
        let export = state
            .exports
            .get_mut(id)
            .ok_or_else(|| generic(format!("Export '{id}' is not found")))?;
        if nbd_only && export.type_name != exports::nbd::TYPE_NAME {
            return Err(generic(format!("Block export '{id}' is not an NBD export")));
        }
        if export.shutting_down {
            return Err(generic(format!("Export '{id}' is already shutting down")));
        }
        let clients = export.export.has_clients();
        let gone = export.export.shutdown(mode).map_err(|e| match e {
            exports::ShutdownError::InUse => generic(format!("export '{id}' still in use")),
            exports::ShutdownError::Failed(msg) => generic(msg),
        })?;
        export.shutting_down = true;
        drop(state);
        if clients {
            let daemon = Arc::clone(self);
            let id = id.to_string();
            tokio::spawn(async move {
                gone.await;
                daemon.finish_delete(&id).await;
            });
        } else {
            gone.await;
            self.finish_delete(id).await;
        }
        Ok(json!({}))
    }

    /// An export is gone: its id is free, its implicit nodes closed, its event sent.
    async fn finish_delete(&self, id: &str) {
        let removed = self.state.lock().await.exports.remove(id);
        if removed.is_some() {
            self.close_unused_nodes().await;
            self.emit_deleted(id);
            self.export_removed.send_modify(|n| *n += 1);
        }
    }

    fn emit_deleted(&self, id: &str) {
        self.events
            .emit("BLOCK_EXPORT_DELETED", json!({ "id": id }));
    }

    /// Ends the exports `which` selects, newest first as QEMU does (`blk_exp_close_all_type`),
    /// disconnecting their clients, and waits until each is gone (those already draining
    /// too).
    async fn end_exports(&self, which: impl Fn(&RunningExport) -> bool) {
        let mut removed = self.export_removed.subscribe();
        let mut state = self.state.lock().await;
        let mut ending = Vec::new();
        for id in state.exports.newest_first(|e| which(e) && !e.shutting_down) {
            let Some(export) = state.exports.get_mut(&id) else {
                continue;
            };
            match export.export.shutdown(RemoveMode::Hard) {
                Ok(gone) => {
                    export.shutting_down = true;
                    ending.push((id, gone));
                }
                Err(e) => tracing::warn!("ending export '{id}': {e}"),
            }
        }
        drop(state);
        for (id, gone) in ending {
            gone.await;
            self.finish_delete(&id).await;
        }
        // Exports removed earlier whose clients are still finishing.
        loop {
            removed.borrow_and_update();
            if self
                .state
                .lock()
                .await
                .exports
                .newest_first(&which)
                .is_empty()
            {
                return;
            }
            if removed.changed().await.is_err() {
                return;
            }
        }
    }

    /// `query-block-exports`.
    pub async fn query_block_exports(&self) -> CmdResult {
        Ok(self.state.lock().await.exports.query())
    }

    /// `nbd-server-add` (deprecated): an NBD export whose id is its name, added as
    /// `block-export-add` adds it.
    pub async fn nbd_server_add(&self, a: qapi::NbdServerAdd) -> CmdResult {
        let name = a.name.clone().unwrap_or_else(|| a.device.clone());
        // QEMU looks the device up first, by device and node name, then adds the export as
        // `block-export-add` does (which checks the id, then that the server runs).
        self.graph.get(&a.device).map_err(errors::graph)?;
        let mut args = json!({
            "type": exports::nbd::TYPE_NAME, "id": name, "node-name": a.device, "name": name,
        });
        let fields = [
            ("writable", a.writable.map(Value::from)),
            ("description", a.description.map(Value::from)),
            ("bitmaps", a.bitmap.map(|b| json!([b]))),
        ];
        for (key, value) in fields {
            if let Some(value) = value {
                args[key] = value;
            }
        }
        let Value::Object(args) = args else {
            unreachable!("a JSON object")
        };
        self.block_export_add(self.parse_export(args, false)?).await
    }

    // ----- shutdown -----

    /// Ends every export, newest first as QEMU does, and sends their `BLOCK_EXPORT_DELETED`
    /// (the `quit` command does this before it replies; [`Daemon::shutdown`] again, for
    /// signals).
    pub async fn close_all_exports(&self) {
        self.end_exports(|_| true).await;
    }

    /// Ends every export (unmounting FUSE mountpoints), stops the NBD server and the monitors,
    /// then flushes and closes every node. No acknowledged write is lost.
    pub async fn shutdown(&self) {
        self.close_all_exports().await;
        let mut state = self.state.lock().await;
        if let Some(nbd) = state.nbd.take() {
            stop_nbd_server(nbd, self.lock_nbd_server().take());
        }
        let objects = std::mem::take(&mut *self.lock_objects());
        let chardevs = std::mem::take(&mut state.chardevs);
        let monitors = std::mem::take(&mut state.monitors);
        drop(state);
        self.qmp.shutdown();
        for task in monitors {
            task.abort();
        }
        for chardev in chardevs.into_values() {
            if let Chardev::Unix(_, path, _) = chardev {
                let _ = std::fs::remove_file(path);
            }
        }
        for node in self.graph.drain() {
            close_node(&node).await;
        }
        let _ = tokio::task::spawn_blocking(move || drop(objects)).await;
    }
}

/// Stops the NBD server: its listeners, and the clients still connected.
fn stop_nbd_server(nbd: NbdState, server: Option<nbd_server::NbdServer>) {
    if let Some(server) = server {
        server.stop();
    }
    for task in nbd.listeners {
        task.abort();
    }
    if let Some(path) = nbd.unix_path {
        let _ = std::fs::remove_file(path);
    }
}

/// A chardev id that is taken, in QEMU's words.
fn duplicate_chardev(id: &str) -> QmpError {
    generic(format!(
        "attempt to add duplicate property '{id}' to object (type 'container')"
    ))
}

/// The node `name`, with QEMU's message when there is none.
pub(crate) fn find_node(graph: &NodeGraph, name: &str) -> CmdResult<Arc<Node>> {
    graph
        .get(name)
        .map_err(|_| errors::graph(GraphError::not_found(name)))
}

async fn close_node(node: &Node) {
    if let Err(e) = node.close().await {
        tracing::error!("closing node '{}': {e}", node.name());
    }
}

async fn bind_tcp(host: &str, port: &str) -> CmdResult<TcpListener> {
    let port: u16 = port
        .parse()
        .map_err(|_| generic(format!("Parameter 'port' expects a port number: '{port}'")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    TcpListener::bind((host, port))
        .await
        .map_err(|e| generic(format!("Failed to bind socket: {e}")))
}

pub(crate) enum InheritedListener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// A listening socket inherited as a file descriptor (QAPI address type `fd`).
pub(crate) fn listener_from_fd(s: &str) -> CmdResult<InheritedListener> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let fd: i32 = s
        .parse()
        .map_err(|_| generic(format!("File descriptor named '{s}' has not been found")))?;
    // SAFETY: fcntl(F_GETFD) only queries whether `fd` is open; it touches no memory.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(generic(format!(
            "File descriptor named '{s}' has not been found"
        )));
    }
    // SAFETY: the descriptor is open (checked above) and was handed to this process for
    // the server to own, as QEMU's `fd` address type means.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `domain`, which is a c_int.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut domain as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(generic(format!("File descriptor '{s}' is not a socket")));
    }
    if domain == libc::AF_UNIX {
        let l = std::os::unix::net::UnixListener::from(owned);
        l.set_nonblocking(true)
            .map_err(|e| generic(format!("fd {s}: {e}")))?;
        UnixListener::from_std(l)
            .map(InheritedListener::Unix)
            .map_err(|e| generic(format!("fd {s}: {e}")))
    } else {
        let l = std::net::TcpListener::from(owned);
        l.set_nonblocking(true)
            .map_err(|e| generic(format!("fd {s}: {e}")))?;
        TcpListener::from_std(l)
            .map(InheritedListener::Tcp)
            .map_err(|e| generic(format!("fd {s}: {e}")))
    }
}

/// `tls-authz`: the authz object is looked up by id when a client connects, so that it can be
/// deleted and recreated while the server runs, as in QEMU; no such object denies.
struct AuthzById {
    objects: std::sync::Weak<Objects>,
    id: String,
}

impl nbd_server::Authorize for AuthzById {
    fn authorize(&self, peer: nbd_server::Peer<'_>) -> Result<String, nbd_server::Refusal> {
        let authz = self.objects.upgrade().and_then(|objects| {
            crate::objects::lock(&objects)
                .get(&self.id)
                .and_then(|e| e.get::<Arc<crate::objects::Authz>>())
        });
        qsd_crypto::authorize(authz.as_deref().map(|a| &**a), peer)
    }
}
