//! The QAPI types of the commands blockexportd serves, as serde types.
//!
//! Member names and optionality follow QEMU 10.0's schema (`block-export.json`,
//! `sockets.json`, `block-core.json`, `qom.json`). Unknown members are refused, as QAPI does.

pub use block_core::RemoveMode;
use serde::Deserialize;

/// QAPI `InetSocketAddress`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct InetSocketAddress {
    /// Host name or address.
    pub host: String,
    /// Port number or service name.
    pub port: String,
    /// Do not resolve names.
    pub numeric: Option<bool>,
    /// Try ports up to this one (refused: not supported).
    pub to: Option<u16>,
    /// Use IPv4 only.
    pub ipv4: Option<bool>,
    /// Use IPv6 only.
    pub ipv6: Option<bool>,
    /// TCP keep-alive.
    pub keep_alive: Option<bool>,
    /// Multipath TCP.
    pub mptcp: Option<bool>,
}

/// QAPI `UnixSocketAddress`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct UnixSocketAddress {
    /// Path of the socket.
    pub path: String,
    /// Abstract socket namespace.
    #[serde(rename = "abstract")]
    pub abstract_: Option<bool>,
    /// Abstract name without padding.
    pub tight: Option<bool>,
}

/// QAPI `String` (a struct with one member `str`), used by the `fd` address type.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StrWrapper {
    /// The name or number of the descriptor.
    pub str: String,
}

/// QAPI `SocketAddress`: the flat form of `--nbd-server` and `NbdServerOptions`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SocketAddress {
    /// TCP.
    Inet(InetSocketAddress),
    /// Unix domain socket.
    Unix(UnixSocketAddress),
    /// An inherited descriptor.
    Fd(StrWrapper),
}

/// QAPI `SocketAddressLegacy`: the `{"type": ..., "data": {...}}` form of `nbd-server-start`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub enum SocketAddressLegacy {
    /// TCP.
    Inet(InetSocketAddress),
    /// Unix domain socket.
    Unix(UnixSocketAddress),
    /// An inherited descriptor.
    Fd(StrWrapper),
}

impl From<SocketAddressLegacy> for SocketAddress {
    fn from(a: SocketAddressLegacy) -> Self {
        match a {
            SocketAddressLegacy::Inet(i) => SocketAddress::Inet(i),
            SocketAddressLegacy::Unix(u) => SocketAddress::Unix(u),
            SocketAddressLegacy::Fd(f) => SocketAddress::Fd(f),
        }
    }
}

/// `nbd-server-start` arguments.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NbdServerStart {
    /// Where to listen.
    pub addr: SocketAddressLegacy,
    /// Id of a `tls-creds-*` object.
    pub tls_creds: Option<String>,
    /// Id of an `authz-*` object.
    pub tls_authz: Option<String>,
    /// Connection limit, 0 for none.
    pub max_connections: Option<u32>,
    /// Seconds a client may take for the handshake, 0 for no limit.
    pub handshake_max_seconds: Option<u32>,
}

/// `--nbd-server` (QAPI `NbdServerOptions`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NbdServerOptions {
    /// Where to listen.
    pub addr: SocketAddress,
    /// Id of a `tls-creds-*` object.
    pub tls_creds: Option<String>,
    /// Id of an `authz-*` object.
    pub tls_authz: Option<String>,
    /// Connection limit, 0 for none.
    pub max_connections: Option<u32>,
    /// Seconds a client may take for the handshake, 0 for no limit.
    pub handshake_max_seconds: Option<u32>,
}

impl From<NbdServerStart> for NbdServerOptions {
    fn from(s: NbdServerStart) -> Self {
        NbdServerOptions {
            addr: s.addr.into(),
            tls_creds: s.tls_creds,
            tls_authz: s.tls_authz,
            max_connections: s.max_connections,
            handshake_max_seconds: s.handshake_max_seconds,
        }
    }
}

/// A bitmap named alone or with its node (QAPI `BlockDirtyBitmapOrStr`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum BitmapRef {
    /// A bitmap of the exported node.
    Name(String),
    /// A bitmap of any node.
    Qualified {
        /// The node.
        node: String,
        /// The bitmap.
        name: String,
    },
}

/// `block-export-del` arguments.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockExportDel {
    /// Export id.
    pub id: String,
    /// `safe` (default) or `hard`.
    pub mode: Option<RemoveMode>,
}

/// `nbd-server-add` arguments (deprecated).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdServerAdd {
    /// Node to export.
    pub device: String,
    /// Export name (default: the node name).
    pub name: Option<String>,
    /// Free-form description.
    pub description: Option<String>,
    /// Allow writes.
    pub writable: Option<bool>,
    /// A dirty bitmap to export.
    pub bitmap: Option<String>,
}

/// `nbd-server-remove` arguments (deprecated).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdServerRemove {
    /// Export name.
    pub name: String,
    /// `safe` (default) or `hard`.
    pub mode: Option<RemoveMode>,
}

/// `blockdev-del` arguments.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockdevDel {
    /// Node to remove.
    pub node_name: String,
}

/// `blockdev-set-active` arguments.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockdevSetActive {
    /// The node (and its children) to change; every node without it.
    pub node_name: Option<String>,
    /// Active (`true`) or inactive.
    pub active: bool,
}

/// `block_resize` arguments.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockResize {
    /// Device (block backend) name; this daemon has none, so only `node-name` finds a node.
    pub device: Option<String>,
    /// Node to resize.
    pub node_name: Option<String>,
    /// New size in bytes.
    pub size: i64,
}

/// `query-named-block-nodes` arguments.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct QueryNamedBlockNodes {
    /// Omit the nested `backing-image` chains.
    pub flat: Option<bool>,
}

/// `object-del` arguments.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectDel {
    /// Object id.
    pub id: String,
}

/// `iothread` object properties.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct IothreadProps {
    /// Object id.
    pub id: String,
    /// Polling time (accepted; the event loop does not busy-poll).
    pub poll_max_ns: Option<i64>,
    /// Accepted for compatibility.
    pub poll_grow: Option<i64>,
    /// Accepted for compatibility.
    pub poll_shrink: Option<i64>,
    /// Accepted for compatibility.
    pub aio_max_batch: Option<i64>,
    /// Accepted for compatibility.
    pub thread_pool_min: Option<i64>,
    /// Accepted for compatibility.
    pub thread_pool_max: Option<i64>,
}

/// `--chardev` options of the backends this daemon has.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ChardevOptions {
    /// `socket`, `stdio` or `pipe`.
    pub backend: String,
    /// Chardev id.
    pub id: String,
    /// Unix socket path; for `pipe`, the FIFOs' name without `.in`/`.out` (or the file).
    pub path: Option<String>,
    /// TCP host.
    pub host: Option<String>,
    /// TCP port.
    pub port: Option<String>,
    /// Listen (`on`), or connect to a listening peer (`off`, the default).
    pub server: Option<bool>,
    /// Wait for a client before going on.
    pub wait: Option<bool>,
    /// A client socket: reconnect this many seconds after the connection ends or fails.
    pub reconnect: Option<i64>,
    /// A client socket: reconnect this many milliseconds after the connection ends or fails.
    pub reconnect_ms: Option<i64>,
    /// Use IPv4 only.
    pub ipv4: Option<bool>,
    /// Use IPv6 only.
    pub ipv6: Option<bool>,
    /// Disable Nagle's algorithm (accepted).
    pub nodelay: Option<bool>,
    /// Accepted for compatibility (stdio).
    pub signal: Option<bool>,
    /// Accepted for compatibility.
    pub mux: Option<bool>,
    /// Accepted for compatibility.
    pub logfile: Option<String>,
    /// Accepted for compatibility.
    pub logappend: Option<bool>,
}

/// `--monitor` options.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorOptions {
    /// Chardev id.
    pub chardev: String,
    /// Must be `control`.
    pub mode: Option<String>,
    /// Pretty-print replies.
    pub pretty: Option<bool>,
    /// Accepted and ignored (QEMU's monitor `id`).
    pub id: Option<String>,
}

use crate::keyval::Kind;

/// The typed members of `--nbd-server`: keyval gives every scalar as a string, and QEMU's
/// keyval visitor types them by the schema; [`crate::keyval::coerce_paths`] does the same
/// with these tables.
pub const NBD_SERVER_TYPES: &[(&str, Kind)] = &[
    ("addr.numeric", Kind::Bool),
    ("addr.ipv4", Kind::Bool),
    ("addr.ipv6", Kind::Bool),
    ("addr.keep-alive", Kind::Bool),
    ("addr.mptcp", Kind::Bool),
    ("addr.abstract", Kind::Bool),
    ("addr.tight", Kind::Bool),
    ("addr.to", Kind::Uint16),
    ("max-connections", Kind::Uint32),
    ("handshake-max-seconds", Kind::Uint32),
];

/// The typed members of `--chardev`.
pub const CHARDEV_TYPES: &[(&str, Kind)] = &[
    ("server", Kind::Bool),
    ("wait", Kind::Bool),
    ("reconnect", Kind::Int64),
    ("reconnect-ms", Kind::Int64),
    ("ipv4", Kind::Bool),
    ("ipv6", Kind::Bool),
    ("nodelay", Kind::Bool),
    ("signal", Kind::Bool),
    ("mux", Kind::Bool),
    ("logappend", Kind::Bool),
];

/// The typed members of `--monitor`.
pub const MONITOR_TYPES: &[(&str, Kind)] = &[("pretty", Kind::Bool)];

/// The typed members of `--object iothread`.
pub const IOTHREAD_TYPES: &[(&str, Kind)] = &[
    ("poll-max-ns", Kind::Int64),
    ("poll-grow", Kind::Int64),
    ("poll-shrink", Kind::Int64),
    ("aio-max-batch", Kind::Int64),
    ("thread-pool-min", Kind::Int64),
    ("thread-pool-max", Kind::Int64),
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn socket_addresses() {
        let legacy: SocketAddressLegacy =
            serde_json::from_value(json!({"type": "unix", "data": {"path": "/x"}})).unwrap();
        assert_eq!(
            SocketAddress::from(legacy),
            serde_json::from_value::<SocketAddress>(json!({"type": "unix", "path": "/x"})).unwrap()
        );
        assert!(serde_json::from_value::<SocketAddress>(
            json!({"type": "unix", "path": "/x", "bogus": 1})
        )
        .is_err());
    }
}
