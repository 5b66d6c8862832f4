//! The QAPI types of the commands blockexportd serves, as serde types.
//!
//! Member names and optionality follow QEMU 10.0's schema (`block-export.json`,
//! `sockets.json`, `block-core.json`, `qom.json`). Unknown members are refused, as QAPI does.
//! The types several commands share are in [`qsd_qapi::types`]. Read them with
//! [`qsd_qapi::from_value`] (or `qmp_server::parse_arguments`), which refuses members a struct
//! does not declare after checking the declared ones, as QAPI does (no `deny_unknown_fields`,
//! which would report an unknown member before a missing one).

pub use qsd_qapi::types::{
    BlockDirtyBitmapOrStr, BlockExportRemoveMode, InetSocketAddress, SocketAddress,
    SocketAddressLegacy, StrWrapper, UnixSocketAddress,
};
use serde::Deserialize;

/// `nbd-server-start` arguments.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
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
#[serde(rename_all = "kebab-case")]
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

/// `block-export-del` arguments.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockExportDel {
    /// Export id.
    pub id: String,
    /// `safe` (default) or `hard`.
    pub mode: Option<BlockExportRemoveMode>,
}

/// `nbd-server-add` arguments (deprecated).
#[derive(Debug, Clone, Deserialize)]
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
pub struct NbdServerRemove {
    /// Export name.
    pub name: String,
    /// `safe` (default) or `hard`.
    pub mode: Option<BlockExportRemoveMode>,
}

/// `blockdev-del` arguments.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevDel {
    /// Node to remove.
    pub node_name: String,
}

/// `blockdev-set-active` arguments.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevSetActive {
    /// The node (and its children) to change; every node without it.
    pub node_name: Option<String>,
    /// Active (`true`) or inactive.
    pub active: bool,
}

/// `block_resize` arguments.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
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
pub struct QueryNamedBlockNodes {
    /// Omit the nested `backing-image` chains.
    pub flat: Option<bool>,
}

/// `object-del` arguments.
#[derive(Debug, Clone, Deserialize)]
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
#[serde(rename_all = "kebab-case")]
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
