//! QOM-style objects: `iothread`, `tls-creds-x509` and the `authz-*` types.

use std::thread::JoinHandle;
use tokio::sync::oneshot;

/// An `iothread` object: a dedicated OS thread running its own event loop.
#[derive(Debug)]
pub struct IoThread {
    handle: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl IoThread {
    /// Starts the thread `id` and its event loop.
    pub fn spawn(id: &str) -> std::io::Result<IoThread> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("iothread-{id}"))
            .spawn(move || {
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(IoThread {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The event loop's handle, to run an export's I/O there.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An object with what it was created with, for `qom-list` and `qom-get`.
#[derive(Debug)]
pub struct ObjectEntry {
    /// The object.
    pub object: Object,
    /// Its QOM type as created (`authz-list-file`, `iothread`, ...).
    pub qom_type: String,
    /// The properties it was created with (without `qom-type` and `id`).
    pub props: serde_json::Map<String, serde_json::Value>,
}

/// The properties of a QOM type of this daemon: name, QOM type name, and the value
/// `qom-get` answers when the object was created without it (QEMU's defaults).
pub fn properties(qom_type: &str) -> Vec<(&'static str, &'static str, serde_json::Value)> {
    use serde_json::{json, Value};
    match qom_type {
        "iothread" => vec![
            ("thread-pool-min", "int", json!(0)),
            ("aio-max-batch", "int", json!(0)),
            ("thread-pool-max", "int", json!(64)),
            ("poll-max-ns", "int", json!(32768)),
            ("poll-grow", "int", json!(0)),
            ("poll-shrink", "int", json!(0)),
        ],
        "tls-creds-x509" => vec![
            ("loaded", "bool", json!(true)),
            ("sanity-check", "bool", json!(true)),
            ("passwordid", "string", Value::Null),
            ("dir", "string", Value::Null),
            ("endpoint", "QCryptoTLSCredsEndpoint", json!("server")),
            ("priority", "string", Value::Null),
            ("verify-peer", "bool", json!(true)),
        ],
        "authz-simple" => vec![("identity", "string", Value::Null)],
        "authz-list" => vec![
            ("policy", "QAuthZListPolicy", json!("deny")),
            ("rules", "QAuthZListRule", json!([])),
        ],
        "authz-list-file" | "authz-listfile" => vec![
            ("filename", "string", Value::Null),
            ("refresh", "bool", json!(true)),
        ],
        _ => Vec::new(),
    }
}

/// The QOM types `object-add` creates here, with their parents, for `qom-list-types`.
pub const TYPES: [(&str, &str); 5] = [
    ("iothread", "object"),
    ("tls-creds-x509", "tls-creds"),
    ("authz-simple", "authz"),
    ("authz-list", "authz"),
    ("authz-list-file", "authz"),
];

/// An object of the daemon, by type.
#[derive(Debug)]
pub enum Object {
    /// `iothread`.
    IoThread(IoThread),
    /// `tls-creds-x509`.
    TlsCreds(std::sync::Arc<crate::tls::TlsCredsX509>),
    /// `authz-simple`, `authz-list`, `authz-list-file`.
    Authz(std::sync::Arc<dyn crate::authz::Authz>),
}

impl Object {
    /// The QOM type name.
    pub fn type_name(&self) -> &'static str {
        match self {
            Object::IoThread(_) => "iothread",
            Object::TlsCreds(_) => "tls-creds-x509",
            Object::Authz(a) => a.qom_type(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iothread_runs_tasks_on_its_own_thread() {
        let io = IoThread::spawn("t").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        io.handle().spawn(async move {
            let _ = tx.send(std::thread::current().name().map(str::to_string));
        });
        assert_eq!(rx.recv().unwrap().as_deref(), Some("iothread-t"));
        drop(io);
    }
}
