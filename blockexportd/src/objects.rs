//! QOM-style objects: `iothread`, `tls-creds-x509`, `tls-creds-psk` and the `authz-*` types.

/// An `iothread` object: a dedicated OS thread running its own event loop, named
/// `iothread-ID`.
pub use block_core::IoThread;

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
        // qemu-storage-daemon 10.0's order; unset strings read as "".
        "tls-creds-psk" => vec![
            ("endpoint", "QCryptoTLSCredsEndpoint", json!("server")),
            ("dir", "string", Value::Null),
            ("verify-peer", "bool", json!(true)),
            ("priority", "string", json!("")),
            ("username", "string", json!("")),
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
#[cfg(feature = "psk")]
pub const TYPES: &[(&str, &str)] = &[
    ("iothread", "object"),
    ("tls-creds-x509", "tls-creds"),
    ("tls-creds-psk", "tls-creds"),
    ("authz-simple", "authz"),
    ("authz-list", "authz"),
    ("authz-list-file", "authz"),
];

/// The QOM types `object-add` creates here, with their parents, for `qom-list-types`.
#[cfg(not(feature = "psk"))]
pub const TYPES: &[(&str, &str)] = &[
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
    /// `tls-creds-psk`.
    TlsCredsPsk(std::sync::Arc<crate::tls::TlsCredsPsk>),
    /// `authz-simple`, `authz-list`, `authz-list-file`.
    Authz(std::sync::Arc<dyn crate::authz::Authz>),
}

impl Object {
    /// The QOM type name.
    pub fn type_name(&self) -> &'static str {
        match self {
            Object::IoThread(_) => "iothread",
            Object::TlsCreds(_) => "tls-creds-x509",
            Object::TlsCredsPsk(_) => "tls-creds-psk",
            Object::Authz(a) => a.qom_type(),
        }
    }
}
