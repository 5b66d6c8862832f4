//! The daemon: nodes, objects, chardevs, monitors, the NBD server and exports, and the
//! commands that change them. Both the command line and QMP go through the methods here.

use crate::objects::{IoThread, Object, ObjectEntry};
use crate::qapi::{self, BlockExportOptions, RemoveMode, SocketAddress};
use block_core::{GraphError, Node, NodeGraph};
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

/// QEMU's default connection limit of the NBD server (`NBD_DEFAULT_MAX_CONNECTIONS`).
pub const NBD_DEFAULT_MAX_CONNECTIONS: u32 = 100;
/// QEMU's default handshake limit of the NBD server, in seconds.
pub const NBD_DEFAULT_HANDSHAKE_MAX_SECONDS: u32 = 10;

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
        let err = |e: crate::sockets::SocketError| generic(e.qemu_message());
        let addr = if let Some(path) = &opts.path {
            let path = PathBuf::from(path);
            let first = if connect_now {
                Some(crate::sockets::connect_unix(&path).await.map_err(err)?)
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
                    crate::sockets::connect_tcp(host, &port)
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
                    async move { reporter.note(crate::sockets::connect_unix(&path).await) }
                };
                qmp.serve_client(connect, first, self.reconnect, opts).await
            }
            ClientAddr::Tcp(host, port, first) => {
                let connect = move || {
                    let (host, port) = (host.clone(), port.clone());
                    let reporter = Arc::clone(&reporter);
                    async move { reporter.note(crate::sockets::connect_tcp(&host, &port).await) }
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
    fn note<S>(&self, r: Result<S, crate::sockets::SocketError>) -> std::io::Result<S> {
        match r {
            Ok(s) => {
                self.reported.store(false, Ordering::Relaxed);
                Ok(s)
            }
            Err(e) => {
                if !self.reported.swap(true, Ordering::Relaxed) {
                    eprintln!(
                        "blockexportd: Unable to connect character device {}: {}",
                        self.id,
                        e.qemu_message()
                    );
                }
                Err(std::io::Error::other(e))
            }
        }
    }
}

struct NbdState {
    server: nbd_server::NbdServer,
    listeners: Vec<JoinHandle<()>>,
    unix_path: Option<PathBuf>,
}

enum ExportKind {
    Nbd { name: String },
    Fuse(Option<fuse_export::FuseExport>),
}

struct Export {
    node_name: String,
    kind: ExportKind,
    shutting_down: Arc<AtomicBool>,
    /// The iothread the export's I/O runs in (NBD and FUSE exports), which may not be deleted
    /// while the export lives.
    iothread: Option<String>,
    /// Creation order: QEMU ends exports newest first.
    created: u64,
}

impl Export {
    fn type_name(&self) -> &'static str {
        match self.kind {
            ExportKind::Nbd { .. } => "nbd",
            ExportKind::Fuse(_) => "fuse",
        }
    }
}

#[derive(Default)]
struct State {
    chardevs: BTreeMap<String, Chardev>,
    monitors: Vec<JoinHandle<()>>,
    nbd: Option<NbdState>,
    exports: BTreeMap<String, Export>,
    exports_created: u64,
}

impl State {
    /// The creation stamp of a new export.
    fn next_export(&mut self) -> u64 {
        self.exports_created += 1;
        self.exports_created
    }
}

/// The daemon's state, shared by the command line, every monitor and the signal handlers.
pub struct Daemon {
    graph: NodeGraph,
    qmp: QmpServer,
    events: EventSender,
    state: Mutex<State>,
    /// Objects by id. A plain mutex: the NBD server looks authz objects up from
    /// synchronous code when a client connects.
    objects: Arc<std::sync::Mutex<BTreeMap<String, ObjectEntry>>>,
    runtime: tokio::runtime::Handle,
}

impl Daemon {
    /// A daemon with no nodes, exports or monitors, answering QMP through `qmp`.
    pub fn new(qmp: QmpServer, runtime: tokio::runtime::Handle) -> Arc<Daemon> {
        let events = qmp.events();
        Arc::new(Daemon {
            graph: NodeGraph::new(),
            qmp,
            events,
            state: Mutex::new(State::default()),
            objects: Arc::default(),
            runtime,
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

    /// `blockdev-add` / `--blockdev`.
    pub async fn blockdev_add(&self, options: Map<String, Value>) -> CmdResult {
        block_core::open::blockdev_add(&self.graph, Value::Object(options))
            .await
            .map_err(graph_error)?;
        Ok(json!({}))
    }

    /// `blockdev-del`: the node and the children its `blockdev-add` opened, as QEMU.
    pub async fn blockdev_del(&self, args: qapi::BlockdevDel) -> CmdResult {
        for node in self.graph.delete(&args.node_name).map_err(graph_error)? {
            close_node(&node).await;
        }
        Ok(json!({}))
    }

    /// `blockdev-set-active`.
    pub async fn blockdev_set_active(&self, args: qapi::BlockdevSetActive) -> CmdResult {
        self.graph
            .set_active(args.node_name.as_deref(), args.active)
            .await
            .map_err(graph_error)?;
        Ok(json!({}))
    }

    /// An export's node: active, as QEMU activates the node of an export, unless the
    /// export allows it to be inactive (which only NBD exports can).
    async fn export_activation(
        &self,
        node: &Arc<Node>,
        allow_inactive: Option<bool>,
        supports_inactive: bool,
    ) -> CmdResult<bool> {
        if allow_inactive == Some(true) {
            if !supports_inactive {
                return Err(generic("Export type does not support inactive exports"));
            }
            return Ok(true);
        }
        self.graph
            .activate(node)
            .await
            .map_err(|e| generic(e.to_string()))?;
        Ok(false)
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
            e => generic(format!("Could not resize: {e}")),
        })?;
        Ok(json!({}))
    }

    fn find_node(&self, name: &str) -> CmdResult<Arc<Node>> {
        self.graph
            .get(name)
            .map_err(|_| generic(format!("Cannot find device='' nor node-name='{name}'")))
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
        let mut stored = props.clone();
        stored.remove("id");
        let object = match qom_type.as_str() {
            "iothread" => {
                if keyval {
                    crate::keyval::coerce_paths(&mut props, qapi::IOTHREAD_TYPES)
                        .map_err(|e| generic(e.to_string()))?;
                }
                let _: qapi::IothreadProps = qmp_server::parse_arguments(props)?;
                self.check_object_id(&id)?;
                let thread = IoThread::spawn(format!("iothread-{id}"))
                    .map_err(|e| generic(format!("Failed to create iothread: {e}")))?;
                Object::IoThread(thread)
            }
            "tls-creds-psk" if cfg!(feature = "psk") => {
                let creds = crate::tls::TlsCredsPsk::from_props(&props, keyval)
                    .map_err(|e| generic(e.qemu_message()))?;
                self.check_object_id(&id)?;
                Object::TlsCredsPsk(Arc::new(creds))
            }
            t if t.starts_with("tls-creds") => {
                crate::tls::check_creds_type(t).map_err(|e| generic(e.qemu_message()))?;
                // As QEMU: the properties, then the id, then the files are loaded.
                let options = crate::tls::TlsCredsX509Options::from_props(&props, keyval)
                    .map_err(|e| generic(e.qemu_message()))?;
                self.check_object_id(&id)?;
                let creds = crate::tls::TlsCredsX509::new(options)
                    .map_err(|e| generic(e.qemu_message()))?;
                Object::TlsCreds(Arc::new(creds))
            }
            t if crate::authz::is_authz_type(t) => {
                let authz = crate::authz::create(t, &props, keyval)
                    .map_err(|e| generic(e.qemu_message()))?;
                self.check_object_id(&id)?;
                Object::Authz(authz)
            }
            other => {
                return Err(generic(format!(
                    "Parameter 'qom-type' does not accept value '{other}'"
                )))
            }
        };
        let mut objects = self.lock_objects();
        self.check_object_id_locked(&objects, &id)?;
        objects.insert(
            id,
            ObjectEntry {
                object,
                qom_type,
                props: stored,
            },
        );
        Ok(json!({}))
    }

    fn lock_objects(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ObjectEntry>> {
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
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
                        .map(|(id, e)| prop(id, &format!("child<{}>", e.qom_type))),
                );
                Ok(Value::Array(list))
            }
            p => match p.strip_prefix("/objects/").and_then(|id| objects.get(id)) {
                Some(e) => {
                    let mut list = vec![prop("type", "string")];
                    list.extend(
                        crate::objects::properties(&e.qom_type)
                            .iter()
                            .map(|(name, ty, _)| prop(name, ty)),
                    );
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
            return Ok(json!(entry.qom_type));
        }
        let (_, _, default) = crate::objects::properties(&entry.qom_type)
            .into_iter()
            .find(|(name, _, _)| *name == property)
            .ok_or_else(|| {
                generic(format!(
                    "Property '{}.{property}' not found",
                    entry.qom_type
                ))
            })?;
        Ok(entry
            .props
            .get(property)
            .cloned()
            .unwrap_or_else(|| default.clone()))
    }

    /// `object-del`.
    pub async fn object_del(&self, args: qapi::ObjectDel) -> CmdResult {
        if let Some((id, _)) = self
            .state
            .lock()
            .await
            .exports
            .iter()
            .find(|(_, e)| e.iothread.as_deref() == Some(args.id.as_str()))
        {
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
    pub async fn chardev_add(&self, mut args: Map<String, Value>) -> CmdResult {
        crate::keyval::coerce_paths(&mut args, qapi::CHARDEV_TYPES)
            .map_err(|e| generic(e.to_string()))?;
        let opts: qapi::ChardevOptions = qmp_server::parse_arguments(args)?;
        let mut state = self.state.lock().await;
        if state.chardevs.contains_key(&opts.id) {
            return Err(generic(format!(
                "attempt to add duplicate property '{}' to object (type 'container')",
                opts.id
            )));
        }
        let chardev = match opts.backend.as_str() {
            "stdio" => Chardev::Stdio,
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
                    let listener = crate::sockets::listen_unix(&path)
                        .map_err(|e| generic(e.qemu_message()))?;
                    let first = if opts.wait == Some(false) {
                        None
                    } else {
                        eprintln!(
                            "blockexportd: waiting for connection on: disconnected:unix:{},server=on",
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
                        eprintln!(
                            "blockexportd: waiting for connection on: disconnected:tcp:{host}:{port},server=on"
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
        mut args: Map<String, Value>,
        keyval: bool,
    ) -> CmdResult {
        if keyval {
            crate::keyval::coerce_paths(&mut args, qapi::MONITOR_TYPES)
                .map_err(|e| generic(e.to_string()))?;
        }
        let opts: qapi::MonitorOptions = qmp_server::parse_arguments(args)?;
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
            Chardev::Used => return Err(generic(format!("Device '{}' is in use", opts.chardev))),
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
        let config = nbd_server::ServerConfig {
            max_connections: opts.max_connections.unwrap_or(NBD_DEFAULT_MAX_CONNECTIONS),
            handshake_max: match opts
                .handshake_max_seconds
                .unwrap_or(NBD_DEFAULT_HANDSHAKE_MAX_SECONDS)
            {
                0 => None,
                s => Some(Duration::from_secs(u64::from(s))),
            },
            tls,
            // Connections of exports without an iothread: one event loop per core.
            event_loops: std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let server = nbd_server::NbdServer::new(config);
        let mut unix_path = None;
        let task = match &opts.addr {
            SocketAddress::Unix(u) => {
                if u.abstract_ == Some(true) {
                    return Err(generic("abstract unix sockets are not supported"));
                }
                let path = PathBuf::from(&u.path);
                let listener =
                    crate::sockets::listen_unix(&path).map_err(|e| generic(e.qemu_message()))?;
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
        state.nbd = Some(NbdState {
            server,
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
        let (acceptor, check) = match self.lock_objects().get(creds_id).map(|e| &e.object) {
            Some(Object::TlsCreds(c)) => (
                nbd_server::TlsAcceptor::Rustls(
                    c.server_config().map_err(|e| generic(e.qemu_message()))?,
                ),
                c.verify_peer(),
            ),
            #[cfg(feature = "psk")]
            Some(Object::TlsCredsPsk(c)) => (
                nbd_server::TlsAcceptor::Psk(c.acceptor().map_err(|e| generic(e.qemu_message()))?),
                true,
            ),
            _ => return Err(generic(format!("No TLS credentials with id '{creds_id}'"))),
        };
        let authorize: Option<Arc<nbd_server::Authorize>> = match &opts.tls_authz {
            Some(authz_id) if check => {
                let objects = Arc::downgrade(&self.objects);
                let authz_id = authz_id.clone();
                Some(Arc::new(move |peer: nbd_server::Peer<'_>| {
                    let authz = objects.upgrade().and_then(|objects| {
                        match objects
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get(&authz_id)
                            .map(|e| &e.object)
                        {
                            Some(Object::Authz(a)) => Some(Arc::clone(a)),
                            _ => None,
                        }
                    });
                    crate::authz::authorize(authz.as_deref(), peer)
                }))
            }
            _ => None,
        };
        Ok(Some(nbd_server::TlsConfig {
            acceptor,
            authorize,
        }))
    }

    /// `nbd-server-stop`: ends every NBD export and every client.
    pub async fn nbd_server_stop(&self) -> CmdResult {
        let mut state = self.state.lock().await;
        let nbd = state
            .nbd
            .take()
            .ok_or_else(|| generic("NBD server not running"))?;
        let ids: Vec<String> = state
            .exports
            .iter()
            .filter(|(_, e)| matches!(e.kind, ExportKind::Nbd { .. }))
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            if let Some(export) = state.exports.remove(&id) {
                if let ExportKind::Nbd { name } = &export.kind {
                    if let Ok(gone) = nbd.server.remove_export(name, nbd_server::RemoveMode::Hard) {
                        gone.await;
                    }
                }
                self.emit_deleted(&id);
            }
        }
        self.close_unused_nodes().await;
        nbd.server.stop();
        for task in nbd.listeners {
            task.abort();
        }
        if let Some(path) = nbd.unix_path {
            let _ = std::fs::remove_file(path);
        }
        Ok(json!({}))
    }

    // ----- exports -----

    /// Parses `block-export-add` arguments, typed by `type`.
    pub fn parse_export(
        mut args: Map<String, Value>,
        keyval: bool,
    ) -> CmdResult<BlockExportOptions> {
        if keyval {
            crate::keyval::coerce_paths(&mut args, qapi::EXPORT_TYPES_KEYVAL)
                .map_err(|e| generic(e.to_string()))?;
        }
        let ty = match args.remove("type") {
            Some(Value::String(t)) => t,
            Some(_) => {
                return Err(generic(
                    "Invalid parameter type for 'type', expected: string",
                ))
            }
            None => return Err(generic("Parameter 'type' is missing")),
        };
        Ok(match ty.as_str() {
            "nbd" => BlockExportOptions::Nbd(qmp_server::parse_arguments(args)?),
            "fuse" => BlockExportOptions::Fuse(qmp_server::parse_arguments(args)?),
            t if qapi::EXPORT_TYPES.contains(&t) => BlockExportOptions::Unserved(t.to_string()),
            t => {
                return Err(generic(format!(
                    "Parameter 'type' does not accept value '{t}'"
                )))
            }
        })
    }

    /// `block-export-add` / `--export`: validates everything, then starts the export.
    pub async fn block_export_add(&self, options: BlockExportOptions) -> CmdResult {
        match options {
            BlockExportOptions::Nbd(o) => self.nbd_export_add(o).await,
            BlockExportOptions::Fuse(o) => self.fuse_export_add(o).await,
            BlockExportOptions::Unserved(t) => Err(generic(format!(
                "Export type '{t}' is not supported by this version of blockexportd"
            ))),
        }
    }

    fn check_common(
        &self,
        state: &State,
        id: &str,
        node_name: &str,
        iothread: Option<&str>,
    ) -> CmdResult<Arc<Node>> {
        // QEMU's checks of every export type, in its order (`blk_exp_add`).
        if !block_core::graph::id_wellformed(id) {
            return Err(generic("Invalid block export id"));
        }
        if state.exports.contains_key(id) {
            return Err(generic(format!("Block export id '{id}' is already in use")));
        }
        let node = self.find_node(node_name)?;
        if let Some(iothread) = iothread {
            if !matches!(
                self.lock_objects().get(iothread).map(|e| &e.object),
                Some(Object::IoThread(_))
            ) {
                return Err(generic(format!("iothread \"{iothread}\" not found")));
            }
        }
        Ok(node)
    }

    async fn nbd_export_add(&self, o: qapi::NbdExport) -> CmdResult {
        let mut state = self.state.lock().await;
        let node = self.check_common(&state, &o.id, &o.node_name, o.iothread.as_deref())?;
        let allow_inactive = self
            .export_activation(&node, o.allow_inactive, true)
            .await?;
        let server = state
            .nbd
            .as_ref()
            .map(|nbd| nbd.server.clone())
            .ok_or_else(|| generic("NBD server not running"))?;
        let name = o.name.clone().unwrap_or_else(|| o.node_name.clone());
        let bitmaps = o
            .bitmaps
            .iter()
            .flatten()
            .map(|b| self.export_bitmap(&node, b))
            .collect::<CmdResult<Vec<_>>>()?;
        let writable = o.writable.unwrap_or(false);
        let attachment = node
            .attach(format!("export '{}'", o.id), writable)
            .map_err(|e| generic(e.to_string()))?;
        if allow_inactive {
            node.allow_inactive(attachment.id());
        }
        let mut config = nbd_server::ExportConfig::new(name.clone(), attachment);
        config.description = o.description.clone();
        config.writethrough = o.writethrough.unwrap_or(false);
        config.bitmaps = bitmaps;
        config.allocation_depth = o.allocation_depth.unwrap_or(false);
        // As QEMU: the listener and the handshake stay on the main loop; a client that picked
        // this export moves to its iothread, where all of its requests run. `fixed-iothread`
        // needs nothing here: nodes have no AioContext to move, so the export always gets
        // the iothread it asked for.
        config.runtime = match o.iothread.as_deref() {
            Some(name) => match self.lock_objects().get(name).map(|e| &e.object) {
                Some(Object::IoThread(t)) => Some(t.handle().clone()),
                _ => return Err(generic(format!("iothread \"{name}\" not found"))),
            },
            None => None,
        };
        // The server checks, as QEMU does, that each bitmap may be exported (not busy, not
        // inconsistent, not recording on a read-only export) and marks them busy.
        server
            .add_export(config)
            .map_err(|e| generic(e.to_string()))?;
        let created = state.next_export();
        state.exports.insert(
            o.id.clone(),
            Export {
                created,
                node_name: o.node_name,
                kind: ExportKind::Nbd { name },
                shutting_down: Arc::new(AtomicBool::new(false)),
                // `object-del` refuses to end an iothread an export runs in.
                iothread: o.iothread,
            },
        );
        Ok(json!({}))
    }

    /// Finds a bitmap named by an export: by name on the exported node or down its chain of
    /// children (as QEMU looks through filters and backing files), or on a named node.
    fn export_bitmap(
        &self,
        node: &Arc<Node>,
        bitmap: &qapi::BitmapRef,
    ) -> CmdResult<Arc<block_core::DirtyBitmap>> {
        let not_found = |name: &str| generic(format!("Bitmap '{name}' is not found"));
        match bitmap {
            qapi::BitmapRef::Name(name) => {
                let mut layer = Some(Arc::clone(node));
                while let Some(n) = layer {
                    if let Some(b) = n.bitmap(name) {
                        return Ok(b);
                    }
                    layer = n
                        .child(block_core::ChildRole::Backing)
                        .or_else(|| n.child(block_core::ChildRole::File))
                        .cloned();
                }
                Err(not_found(name))
            }
            qapi::BitmapRef::Qualified { node, name } => self
                .find_node(node)?
                .bitmap(name)
                .ok_or_else(|| not_found(name)),
        }
    }

    async fn fuse_export_add(&self, o: qapi::FuseExport) -> CmdResult {
        let mut state = self.state.lock().await;
        let node = self.check_common(&state, &o.id, &o.node_name, o.iothread.as_deref())?;
        self.export_activation(&node, o.allow_inactive, false)
            .await?;
        let allow_other = match o.allow_other.as_deref() {
            None | Some("auto") => fuse_export::AllowOther::Auto,
            Some("on") => fuse_export::AllowOther::On,
            Some("off") => fuse_export::AllowOther::Off,
            Some(v) => {
                return Err(generic(format!(
                    "Parameter 'allow-other' does not accept value '{v}'"
                )))
            }
        };
        let writable = o.writable.unwrap_or(false);
        let attachment = node
            .attach(format!("export '{}'", o.id), writable)
            .map_err(|e| generic(e.to_string()))?;
        let config = fuse_export::FuseExportConfig {
            mountpoint: PathBuf::from(&o.mountpoint),
            growable: o.growable.unwrap_or(false),
            writable,
            writethrough: o.writethrough.unwrap_or(false),
            allow_other,
        };
        // The export's requests run in its iothread's event loop when it names one.
        let runtime = match o.iothread.as_deref() {
            Some(name) => match self.lock_objects().get(name).map(|e| &e.object) {
                Some(Object::IoThread(t)) => t.handle().clone(),
                _ => return Err(generic(format!("iothread \"{name}\" not found"))),
            },
            None => self.runtime.clone(),
        };
        let export = tokio::task::spawn_blocking(move || {
            fuse_export::FuseExport::mount(config, attachment, runtime)
        })
        .await
        .map_err(|e| generic(format!("FUSE mount failed: {e}")))?
        .map_err(|e| generic(e.to_string()))?;
        let created = state.next_export();
        state.exports.insert(
            o.id.clone(),
            Export {
                created,
                node_name: o.node_name,
                kind: ExportKind::Fuse(Some(export)),
                shutting_down: Arc::new(AtomicBool::new(false)),
                iothread: o.iothread,
            },
        );
        Ok(json!({}))
    }

    /// `block-export-del`.
    pub async fn block_export_del(self: &Arc<Self>, id: &str, mode: RemoveMode) -> CmdResult {
        let mut state = self.state.lock().await;
        let export = state
            .exports
            .get_mut(id)
            .ok_or_else(|| generic(format!("Export '{id}' is not found")))?;
        if export.shutting_down.load(Ordering::Acquire) {
            return Err(generic(format!("Export '{id}' is already shutting down")));
        }
        match &mut export.kind {
            ExportKind::Nbd { name } => {
                let name = name.clone();
                let server = state
                    .nbd
                    .as_ref()
                    .map(|n| n.server.clone())
                    .ok_or_else(|| generic("NBD server not running"))?;
                let nbd_mode = match mode {
                    RemoveMode::Safe => nbd_server::RemoveMode::Safe,
                    RemoveMode::Hard => nbd_server::RemoveMode::Hard,
                };
                let gone = server.remove_export(&name, nbd_mode).map_err(|e| match e {
                    // QEMU names the export by its id here.
                    nbd_server::NbdError::InUse(_) => {
                        generic(format!("export '{id}' still in use"))
                    }
                    e => generic(e.to_string()),
                })?;
                if let Some(export) = state.exports.get(id) {
                    export.shutting_down.store(true, Ordering::Release);
                }
                drop(state);
                // Most removals finish at once: then the event comes before the reply, as in
                // QEMU. Otherwise the export shows `shutting-down` until its last request is done.
                let mut gone = Box::pin(gone);
                let finished = futures_now(&mut gone).await;
                let daemon = Arc::clone(self);
                let id = id.to_string();
                if finished {
                    daemon.finish_delete(&id).await;
                } else {
                    tokio::spawn(async move {
                        gone.await;
                        daemon.finish_delete(&id).await;
                    });
                }
            }
            ExportKind::Fuse(fuse) => {
                let fuse = fuse.take();
                state.exports.remove(id);
                drop(state);
                if let Some(fuse) = fuse {
                    fuse.unmount_async()
                        .await
                        .map_err(|e| generic(e.to_string()))?;
                }
                self.close_unused_nodes().await;
                self.emit_deleted(id);
            }
        }
        Ok(json!({}))
    }

    async fn finish_delete(&self, id: &str) {
        self.state.lock().await.exports.remove(id);
        self.close_unused_nodes().await;
        self.emit_deleted(id);
    }

    fn emit_deleted(&self, id: &str) {
        self.events
            .emit("BLOCK_EXPORT_DELETED", json!({ "id": id }));
    }

    /// `query-block-exports`.
    pub async fn query_block_exports(&self) -> CmdResult {
        let state = self.state.lock().await;
        Ok(Value::Array(
            state
                .exports
                .iter()
                .map(|(id, e)| {
                    json!({
                        "id": id,
                        "type": e.type_name(),
                        "node-name": e.node_name,
                        "shutting-down": e.shutting_down.load(Ordering::Acquire),
                    })
                })
                .collect(),
        ))
    }

    /// `nbd-server-add` (deprecated): an NBD export whose id is its name.
    pub async fn nbd_server_add(&self, a: qapi::NbdServerAdd) -> CmdResult {
        let name = a.name.clone().unwrap_or_else(|| a.device.clone());
        // QEMU looks the device up first, by device and node name, then adds the export as
        // `block-export-add` does (which checks the id, then that the server runs).
        self.graph.get(&a.device).map_err(|_| {
            generic(format!(
                "Cannot find device='{0}' nor node-name='{0}'",
                a.device
            ))
        })?;
        self.nbd_export_add(qapi::NbdExport {
            id: name.clone(),
            node_name: a.device,
            fixed_iothread: None,
            iothread: None,
            writable: a.writable,
            writethrough: None,
            allow_inactive: None,
            name: Some(name),
            description: a.description,
            bitmaps: a.bitmap.map(|b| vec![qapi::BitmapRef::Name(b)]),
            allocation_depth: None,
        })
        .await
    }

    // ----- shutdown -----

    /// Ends every export, newest first as QEMU does, and sends their `BLOCK_EXPORT_DELETED`
    /// (the `quit` command does this before it replies; [`Daemon::shutdown`] again, for
    /// signals).
    pub async fn close_all_exports(&self) {
        let mut state = self.state.lock().await;
        let mut exports: Vec<_> = std::mem::take(&mut state.exports).into_iter().collect();
        exports.sort_by_key(|(_, e)| std::cmp::Reverse(e.created));
        let server = state.nbd.as_ref().map(|nbd| nbd.server.clone());
        drop(state);
        for (id, mut export) in exports {
            match &mut export.kind {
                ExportKind::Nbd { name } => {
                    if let Some(server) = &server {
                        if let Ok(gone) = server.remove_export(name, nbd_server::RemoveMode::Hard) {
                            gone.await;
                        }
                    }
                }
                ExportKind::Fuse(fuse) => {
                    if let Some(fuse) = fuse.take() {
                        if let Err(e) = fuse.unmount_async().await {
                            tracing::warn!("unmounting export '{id}': {e}");
                        }
                    }
                }
            }
            self.emit_deleted(&id);
        }
    }

    /// Ends every export (unmounting FUSE mountpoints), stops the NBD server and the monitors,
    /// then flushes and closes every node. No acknowledged write is lost.
    pub async fn shutdown(&self) {
        self.close_all_exports().await;
        let mut state = self.state.lock().await;
        let nbd = state.nbd.take();
        if let Some(nbd) = nbd {
            nbd.server.stop();
            for task in nbd.listeners {
                task.abort();
            }
            if let Some(path) = nbd.unix_path {
                let _ = std::fs::remove_file(path);
            }
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

/// Resolves to whether `fut` finishes without waiting.
async fn futures_now<F: std::future::Future<Output = ()> + Unpin>(fut: &mut F) -> bool {
    use std::task::Poll;
    std::future::poll_fn(|cx| match std::pin::Pin::new(&mut *fut).poll(cx) {
        Poll::Ready(()) => Poll::Ready(true),
        Poll::Pending => Poll::Ready(false),
    })
    .await
}

async fn close_node(node: &Node) {
    if let Err(e) = node.close().await {
        tracing::error!("closing node '{}': {e}", node.name());
    }
}

fn graph_error(e: GraphError) -> QmpError {
    match e {
        GraphError::NotFound(name) => {
            generic(format!("Cannot find device='' nor node-name='{name}'"))
        }
        GraphError::Failed(msg) => generic(msg),
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

enum InheritedListener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// A listening socket inherited as a file descriptor (QAPI address type `fd`).
fn listener_from_fd(s: &str) -> CmdResult<InheritedListener> {
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
