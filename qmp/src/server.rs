//! The server: command registry, monitors (sessions), transports and events.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot, watch};

use crate::args::parse_arguments;
use crate::dispatch::{check_request, negotiation_rewrite, response, Phase, Request};
use crate::error::QmpError;
use crate::stream::{JsonStream, StreamLimits};
use crate::writer::to_wire;

/// The version the greeting and `query-version` report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
    /// Free-form package string (may be empty).
    pub package: String,
}

impl VersionInfo {
    /// `{"qemu": {"micro": .., "minor": .., "major": ..}, "package": ..}`.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "qemu": {"major": self.major, "minor": self.minor, "micro": self.micro},
            "package": self.package,
        })
    }
}

/// Per-monitor options (QEMU's `--monitor chardev=..,pretty=on`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MonitorOptions {
    /// Pretty-print every message (QEMU's layout) instead of one line each.
    pub pretty: bool,
}

/// Resource limits of every monitor of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Limits on one incoming message.
    pub stream: StreamLimits,
    /// The most bytes of replies and events queued for one client that does
    /// not read them. Replies are paced: once half of it is queued, the
    /// monitor reads and runs nothing more until the client has read enough
    /// (QEMU suspends a monitor the same way), so a client that sends faster
    /// than it reads is slowed down, not dropped. Events are not paced: a
    /// client whose queue goes over the limit with them is disconnected (one
    /// message larger than this is still sent to a client whose queue is
    /// otherwise empty).
    pub max_queued_output: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            stream: StreamLimits::default(),
            max_queued_output: 16 << 20,
        }
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Value, QmpError>> + Send>>;
type Handler = Arc<dyn Fn(Map<String, Value>) -> BoxFuture + Send + Sync>;
type QuitHook = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The commands the server implements itself.
const BUILTINS: [&str; 4] = [
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "quit",
];

/// Read chunk size: what one read may add before the stream reader bounds it.
const READ_CHUNK: usize = 64 * 1024;

struct Inner {
    version: VersionInfo,
    limits: ServerLimits,
    commands: RwLock<Vec<(String, Handler)>>,
    monitors: Mutex<HashMap<u64, Arc<Monitor>>>,
    next_id: AtomicU64,
    quit: watch::Sender<bool>,
    /// Run by `quit` before its reply.
    quit_hook: RwLock<Option<QuitHook>>,
    shutdown: watch::Sender<bool>,
}

/// A QMP server. Cheap to clone (all clones are the same server).
///
/// Register commands with [`register`](Self::register), then serve
/// monitors on any number of transports; each monitor (client session) is
/// independent: its own negotiation, its own commands run one at a time in
/// order, its own output queue.
#[derive(Clone)]
pub struct QmpServer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for QmpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpServer")
            .field("version", &self.inner.version)
            .finish_non_exhaustive()
    }
}

/// Emits events to every monitor that has completed capabilities
/// negotiation. Cheap to clone; never blocks; usable from any thread (also
/// outside the tokio runtime, e.g. from an I/O thread).
#[derive(Clone)]
pub struct EventSender {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EventSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSender").finish_non_exhaustive()
    }
}

enum Out {
    Data(Vec<u8>),
    /// Answered once everything queued before it was written.
    Flushed(oneshot::Sender<()>),
    /// The session's input ended: write what is queued, then stop.
    Close,
}

/// One client session.
struct Monitor {
    pretty: bool,
    negotiated: AtomicBool,
    out: mpsc::UnboundedSender<Out>,
    queued: AtomicUsize,
    max_queued: usize,
    /// Told whenever the writer has written a message (`queued` went down).
    drained: tokio::sync::Notify,
    dead: watch::Sender<bool>,
}

impl Monitor {
    fn kill(&self) {
        self.dead.send_replace(true);
    }

    fn is_dead(&self) -> bool {
        *self.dead.borrow()
    }

    /// Queues a message; a client whose queue is over the limit is dropped.
    fn send_bytes(&self, bytes: Vec<u8>) -> bool {
        if self.is_dead() {
            return false;
        }
        let len = bytes.len();
        let total = self.queued.fetch_add(len, Ordering::AcqRel) + len;
        if total > self.max_queued && total != len {
            tracing::warn!(
                queued = total,
                "QMP client does not read its output; dropping it"
            );
            self.kill();
            return false;
        }
        self.out.send(Out::Data(bytes)).is_ok()
    }

    fn send(&self, v: &Value) -> bool {
        self.send_bytes(to_wire(v, self.pretty))
    }

    /// Queues a reply, which [`Monitor::wait_for_room`] made room for.
    fn send_reply(&self, v: &Value) -> bool {
        if self.is_dead() {
            return false;
        }
        let bytes = to_wire(v, self.pretty);
        self.queued.fetch_add(bytes.len(), Ordering::AcqRel);
        self.out.send(Out::Data(bytes)).is_ok()
    }

    /// Waits until at most half of the output limit is queued (or the client is gone), so
    /// that the next reply fits.
    async fn wait_for_room(&self) {
        let mut dead = self.dead.subscribe();
        loop {
            // Created before the check, so that a write completing in between wakes it.
            let drained = self.drained.notified();
            if self.queued.load(Ordering::Acquire) <= self.max_queued / 2 || self.is_dead() {
                return;
            }
            tokio::select! {
                _ = drained => {}
                _ = until_dead(&mut dead) => return,
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArguments {}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Capability {
    Oob,
}

#[derive(Deserialize)]
struct CapabilitiesArgs {
    enable: Option<Vec<Capability>>,
}

/// What the session must do after sending a reply.
enum After {
    Nothing,
    Quit,
}

pub(crate) async fn until_dead(dead: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens with the
    // monitor: treat as dead.
    let _ = dead.wait_for(|d| *d).await;
}

impl QmpServer {
    /// A server reporting `version`, with default limits.
    pub fn new(version: VersionInfo) -> Self {
        Self::with_limits(version, ServerLimits::default())
    }

    /// A server with explicit resource limits.
    pub fn with_limits(version: VersionInfo, limits: ServerLimits) -> Self {
        Self {
            inner: Arc::new(Inner {
                version,
                limits,
                commands: RwLock::new(Vec::new()),
                monitors: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                quit: watch::channel(false).0,
                quit_hook: RwLock::new(None),
                shutdown: watch::channel(false).0,
            }),
        }
    }

    /// Registers (or replaces) a command. The handler gets the `arguments`
    /// object (empty if the client sent none) and returns the `return` value
    /// (`Value::Null` is sent as `{}`) or an error. Check arguments with
    /// [`parse_arguments`](crate::parse_arguments).
    ///
    /// The built-in commands (`qmp_capabilities`, `query-version`,
    /// `query-commands`, `quit`) cannot be replaced; registering one of their
    /// names is ignored with a warning.
    pub fn register<F, Fut>(&self, name: &str, handler: F)
    where
        F: Fn(Map<String, Value>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, QmpError>> + Send + 'static,
    {
        if BUILTINS.contains(&name) {
            tracing::warn!(command = name, "cannot replace a built-in QMP command");
            return;
        }
        let handler: Handler = Arc::new(move |args| Box::pin(handler(args)) as BoxFuture);
        let mut commands = self
            .inner
            .commands
            .write()
            .unwrap_or_else(|e| e.into_inner());
        match commands.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => entry.1 = handler,
            None => commands.push((name.to_string(), handler)),
        }
    }

    /// Sets what `quit` does before it replies: QEMU's storage daemon ends every block
    /// export there, so that the client sees each `BLOCK_EXPORT_DELETED` before the reply.
    /// [`quit_requested`](Self::quit_requested) resolves after the hook and the reply.
    pub fn on_quit<F, Fut>(&self, hook: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let hook: QuitHook = Arc::new(move || Box::pin(hook()));
        *self
            .inner
            .quit_hook
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// A handle to emit events with.
    pub fn events(&self) -> EventSender {
        EventSender {
            inner: self.inner.clone(),
        }
    }

    /// Resolves once a client executed `quit` (after its reply was written).
    pub async fn quit_requested(&self) {
        let mut rx = self.inner.quit.subscribe();
        let _ = rx.wait_for(|q| *q).await;
    }

    /// Closes every monitor and makes every `serve_*` return. Commands being
    /// executed run to completion first (their replies are not sent).
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        let monitors = self
            .inner
            .monitors
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for m in monitors.values() {
            m.kill();
        }
    }

    /// How many monitors are connected right now (negotiated or not).
    pub fn monitor_count(&self) -> usize {
        self.inner
            .monitors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Changes to `true` at [`shutdown`](Self::shutdown).
    pub(crate) fn shutdown_receiver(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.subscribe()
    }

    fn is_shut_down(&self) -> bool {
        *self.inner.shutdown.borrow()
    }

    /// Serves monitors on a unix socket listener until [`shutdown`](Self::shutdown).
    ///
    /// Like a QEMU `--chardev socket,server=on` monitor, one client is served
    /// at a time: a second client's connection waits (in the listen backlog,
    /// without a greeting) until the first one disconnects.
    pub async fn serve_unix(&self, listener: UnixListener, opts: MonitorOptions) {
        let mut shutdown = self.inner.shutdown.subscribe();
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = until_dead(&mut shutdown) => return,
            };
            match accepted {
                Ok((stream, _)) => {
                    let (r, w) = stream.into_split();
                    self.serve_session(r, w, opts).await
                }
                Err(e) => self.accept_failed(e, &mut shutdown).await,
            }
        }
    }

    /// Serves monitors on a TCP listener until [`shutdown`](Self::shutdown),
    /// one client at a time (see [`serve_unix`](Self::serve_unix)).
    pub async fn serve_tcp(&self, listener: TcpListener, opts: MonitorOptions) {
        let mut shutdown = self.inner.shutdown.subscribe();
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = until_dead(&mut shutdown) => return,
            };
            match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let (r, w) = stream.into_split();
                    self.serve_session(r, w, opts).await
                }
                Err(e) => self.accept_failed(e, &mut shutdown).await,
            }
        }
    }

    async fn accept_failed(&self, e: std::io::Error, shutdown: &mut watch::Receiver<bool>) {
        tracing::warn!(error = %e, "QMP listener: accept failed");
        // Out of file descriptors and the like: do not spin.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = until_dead(shutdown) => {}
        }
    }

    /// Serves one monitor on an already-connected stream, until the client
    /// disconnects or the server shuts down.
    pub async fn serve_stream<S>(&self, stream: S, opts: MonitorOptions)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (r, w) = tokio::io::split(stream);
        self.serve_session(r, w, opts).await
    }

    /// Serves one monitor on stdin/stdout, until stdin ends or the server
    /// shuts down.
    ///
    /// Tokio reads stdin on a blocking thread that cannot be interrupted:
    /// after [`shutdown`](Self::shutdown) the runtime should be dropped with
    /// `Runtime::shutdown_background` (or `shutdown_timeout`) so that it does
    /// not wait for one more line of input.
    pub async fn serve_stdio(&self, opts: MonitorOptions) {
        self.serve_session(tokio::io::stdin(), tokio::io::stdout(), opts)
            .await
    }

    /// Serves one monitor on a separate reader and writer.
    pub async fn serve_session<R, W>(&self, reader: R, writer: W, opts: MonitorOptions)
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send,
    {
        if self.is_shut_down() {
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let mon = Arc::new(Monitor {
            pretty: opts.pretty,
            negotiated: AtomicBool::new(false),
            out: tx,
            queued: AtomicUsize::new(0),
            max_queued: self.inner.limits.max_queued_output,
            drained: tokio::sync::Notify::new(),
            dead: watch::channel(false).0,
        });
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner
            .monitors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, mon.clone());
        if self.is_shut_down() {
            mon.kill();
        }
        mon.send(&self.greeting());
        let input = async {
            self.input_loop(reader, &mon).await;
            self.unregister(id);
            let _ = mon.out.send(Out::Close);
        };
        tokio::join!(input, write_loop(writer, rx, &mon));
        self.unregister(id);
    }

    fn unregister(&self, id: u64) {
        self.inner
            .monitors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    fn greeting(&self) -> Value {
        serde_json::json!({"QMP": {"version": self.inner.version.to_json(), "capabilities": ["oob"]}})
    }

    async fn input_loop<R: AsyncRead + Unpin>(&self, mut reader: R, mon: &Monitor) {
        let mut dead = mon.dead.subscribe();
        let mut stream = JsonStream::new(self.inner.limits.stream);
        let mut buf = vec![0u8; READ_CHUNK];
        let mut phase = Phase::Negotiating;
        loop {
            let n = tokio::select! {
                r = reader.read(&mut buf) => r,
                _ = until_dead(&mut dead) => return,
            };
            let n = match n {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(error = %e, "QMP client read failed");
                    return;
                }
            };
            let mut messages = Vec::new();
            stream.feed(&buf[..n], |m| messages.push(m));
            for msg in messages {
                // A client that does not read its replies gets no more of them (and no
                // more input is read) until it does.
                mon.wait_for_room().await;
                // Commands run to completion even if the client goes away
                // (a half-done command would leave the daemon inconsistent).
                let (reply, after) = self.handle(msg, &mut phase, mon).await;
                let sent = !mon.is_dead() && mon.send_reply(&reply);
                if let After::Quit = after {
                    // `quit` ran: signal it even if its client is gone, but
                    // after its reply was written if the client is there.
                    let (tx, rx) = oneshot::channel();
                    if sent && mon.out.send(Out::Flushed(tx)).is_ok() {
                        tokio::select! {
                            _ = rx => {}
                            _ = until_dead(&mut dead) => {}
                        }
                    }
                    self.inner.quit.send_replace(true);
                }
                if !sent {
                    return;
                }
            }
        }
    }

    async fn handle(
        &self,
        msg: Result<Value, crate::stream::StreamError>,
        phase: &mut Phase,
        mon: &Monitor,
    ) -> (Value, After) {
        let (id, request) = check_request(msg, *phase);
        let ran_in = *phase;
        let mut after = After::Nothing;
        let result = match request {
            Err(e) => Err(e),
            Ok(req) => self.execute(req, phase, mon, &mut after).await,
        };
        let result = negotiation_rewrite(ran_in, result);
        (response(id, result), after)
    }

    async fn execute(
        &self,
        req: Request,
        phase: &mut Phase,
        mon: &Monitor,
        after: &mut After,
    ) -> Result<Value, QmpError> {
        let not_found = || {
            QmpError::command_not_found(format!("The command {} has not been found", req.command))
        };
        let handler = if *phase == Phase::Negotiating {
            if req.command != "qmp_capabilities" {
                return Err(not_found());
            }
            None
        } else if BUILTINS.contains(&req.command.as_str()) {
            None
        } else {
            let commands = self
                .inner
                .commands
                .read()
                .unwrap_or_else(|e| e.into_inner());
            match commands.iter().find(|(n, _)| *n == req.command) {
                Some((_, h)) => Some(h.clone()),
                None => return Err(not_found()),
            }
        };
        if req.oob {
            // No command of ours can run out of band (QSD has none either).
            return Err(QmpError::generic(format!(
                "The command {} does not support OOB",
                req.command
            )));
        }
        if let Some(h) = handler {
            // A task of its own: the command completes even if this session
            // is dropped, and a panicking handler costs one error reply, not
            // the monitor (or the listener serving it).
            return match tokio::spawn(h(req.args)).await {
                Ok(result) => result,
                Err(e) => {
                    tracing::error!(command = %req.command, error = %e, "QMP command handler failed");
                    Err(QmpError::generic(format!(
                        "Command {} failed unexpectedly",
                        req.command
                    )))
                }
            };
        }
        match req.command.as_str() {
            "qmp_capabilities" => {
                let args: CapabilitiesArgs = parse_arguments(req.args)?;
                if *phase != Phase::Negotiating {
                    return Err(QmpError::command_not_found(
                        "Capabilities negotiation is already complete, command ignored",
                    ));
                }
                let oob = args
                    .enable
                    .unwrap_or_default()
                    .iter()
                    .any(|c| matches!(c, Capability::Oob));
                *phase = Phase::Commands { oob };
                mon.negotiated.store(true, Ordering::Release);
                Ok(Value::Object(Map::new()))
            }
            "query-version" => {
                parse_arguments::<NoArguments>(req.args)?;
                Ok(self.inner.version.to_json())
            }
            "query-commands" => {
                parse_arguments::<NoArguments>(req.args)?;
                Ok(Value::Array(
                    self.command_names()
                        .into_iter()
                        .map(|n| serde_json::json!({ "name": n }))
                        .collect(),
                ))
            }
            "quit" => {
                parse_arguments::<NoArguments>(req.args)?;
                let hook = self
                    .inner
                    .quit_hook
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                if let Some(hook) = hook {
                    hook().await;
                }
                *after = After::Quit;
                Ok(Value::Object(Map::new()))
            }
            _ => Err(not_found()),
        }
    }

    /// Every command a negotiated client can run, in QEMU's order (the last
    /// registered first, the built-ins last).
    pub fn command_names(&self) -> Vec<String> {
        let commands = self
            .inner
            .commands
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<String> = commands.iter().rev().map(|(n, _)| n.clone()).collect();
        names.extend(BUILTINS.iter().rev().map(|n| n.to_string()));
        names
    }
}

impl EventSender {
    /// Sends `{"event": name, "data": data, "timestamp": {...}}` to every
    /// monitor that completed negotiation. `data` that is `null` or an empty
    /// object is left out, as QEMU does for events without data. A client too
    /// slow to take it is disconnected; this never waits.
    pub fn emit(&self, name: &str, data: Value) {
        // qmp-spec.rst: "if there is a failure to retrieve host time, both
        // members of the timestamp will be set to -1".
        let timestamp = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(now) => {
                serde_json::json!({"seconds": now.as_secs(), "microseconds": now.subsec_micros()})
            }
            Err(_) => serde_json::json!({"seconds": -1, "microseconds": -1}),
        };
        let mut ev = Map::new();
        ev.insert("event".into(), name.into());
        let empty = match &data {
            Value::Null => true,
            Value::Object(m) => m.is_empty(),
            _ => false,
        };
        if !empty {
            ev.insert("data".into(), data);
        }
        ev.insert("timestamp".into(), timestamp);
        let ev = Value::Object(ev);
        let (mut compact, mut pretty) = (None, None);
        let monitors = self
            .inner
            .monitors
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for mon in monitors.values() {
            if !mon.negotiated.load(Ordering::Acquire) {
                continue;
            }
            let slot = if mon.pretty {
                &mut pretty
            } else {
                &mut compact
            };
            let bytes = slot.get_or_insert_with(|| to_wire(&ev, mon.pretty)).clone();
            mon.send_bytes(bytes);
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::UnboundedReceiver<Out>,
    mon: &Monitor,
) {
    let mut dead = mon.dead.subscribe();
    loop {
        let item = tokio::select! {
            item = rx.recv() => item,
            _ = until_dead(&mut dead) => break,
        };
        match item {
            None | Some(Out::Close) => break,
            Some(Out::Flushed(tx)) => {
                let _ = tx.send(());
            }
            Some(Out::Data(bytes)) => {
                let len = bytes.len();
                let written = tokio::select! {
                    r = async {
                        writer.write_all(&bytes).await?;
                        writer.flush().await
                    } => r,
                    _ = until_dead(&mut dead) => break,
                };
                mon.queued.fetch_sub(len, Ordering::AcqRel);
                mon.drained.notify_waiters();
                if let Err(e) = written {
                    tracing::debug!(error = %e, "QMP client write failed");
                    mon.kill();
                    break;
                }
            }
        }
    }
    let _ = writer.shutdown().await;
}
