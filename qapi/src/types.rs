//! QAPI types that several commands and options share, as serde types named and
//! shaped as in QEMU 10.0's schema (`sockets.json`, `block-core.json`,
//! `block-export.json`). [`crate::de`]'s deserializer refuses members a struct does not
//! declare, after checking the declared ones, as QAPI does; the structs have no
//! `deny_unknown_fields`, which would report an unknown member before a missing one.
//!
//! Read them with [`crate::from_value`] or [`crate::from_keyval`]: the flat union
//! [`SocketAddress`] reads its variant in place only with this crate's deserializer
//! (other deserializers work, with serde's messages).

use serde::Deserialize;

use crate::de::{deserialize_flat_union, FlatUnion, NoBase};

/// QAPI `InetSocketAddress`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct InetSocketAddress {
    /// Host name or address.
    pub host: String,
    /// Port number or service name.
    pub port: String,
    /// Do not resolve names.
    pub numeric: Option<bool>,
    /// Try ports up to this one.
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
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
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
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct StrWrapper {
    /// The name or number of the descriptor.
    pub str: String,
}

/// QAPI `SocketAddressType`, the discriminator of [`SocketAddress`] (without `vsock`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SocketAddressType {
    /// TCP.
    Inet,
    /// Unix domain socket.
    Unix,
    /// An inherited descriptor.
    Fd,
}

/// QAPI `SocketAddress`: the flat union on `type` (`--nbd-server addr.type=unix,addr.path=...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAddress {
    /// TCP.
    Inet(InetSocketAddress),
    /// Unix domain socket.
    Unix(UnixSocketAddress),
    /// An inherited descriptor.
    Fd(StrWrapper),
}

impl FlatUnion for SocketAddress {
    const MEMBERS: &'static [&'static str] = &["type"];
    type Tag = SocketAddressType;
    type Base = NoBase;

    fn variant<'de, D: serde::Deserializer<'de>>(
        tag: SocketAddressType,
        _base: NoBase,
        rest: D,
    ) -> Result<Self, D::Error> {
        match tag {
            SocketAddressType::Inet => InetSocketAddress::deserialize(rest).map(Self::Inet),
            SocketAddressType::Unix => UnixSocketAddress::deserialize(rest).map(Self::Unix),
            SocketAddressType::Fd => StrWrapper::deserialize(rest).map(Self::Fd),
        }
    }
}

impl<'de> Deserialize<'de> for SocketAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_flat_union(d)
    }
}

/// QAPI `SocketAddressLegacy`: the `{"type": ..., "data": {...}}` form of `nbd-server-start`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
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

/// QAPI `BlockDirtyBitmapOrStr`: a bitmap named alone (of the node at hand) or with its
/// node. The Rust name is QAPI's, so that a value of neither shape is refused with
/// QEMU's text (`Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr` for
/// a list element, which QEMU names `null`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum BlockDirtyBitmapOrStr {
    /// A bitmap of the node at hand.
    Name(String),
    /// A bitmap of any node (QAPI `BlockDirtyBitmap`).
    Qualified {
        /// The node.
        node: String,
        /// The bitmap.
        name: String,
    },
}

/// QAPI `BlockExportRemoveMode`: how an export treats its connected clients when it is
/// removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockExportRemoveMode {
    /// Refuse to remove the export while clients are connected to it (QEMU's default).
    #[default]
    Safe,
    /// Disconnect the clients (after their requests in flight are done).
    Hard,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{from_keyval, from_value};
    use serde_json::json;

    fn err<T: serde::de::DeserializeOwned + std::fmt::Debug>(v: serde_json::Value) -> String {
        from_value::<T>(v).unwrap_err().to_string()
    }

    #[test]
    fn socket_addresses() {
        let legacy: SocketAddressLegacy =
            from_value(json!({"type": "unix", "data": {"path": "/x"}})).unwrap();
        assert_eq!(
            SocketAddress::from(legacy),
            from_value::<SocketAddress>(json!({"type": "unix", "path": "/x"})).unwrap()
        );
        // Any other deserializer reads it too.
        assert_eq!(
            serde_json::from_value::<SocketAddress>(json!({"path": "/x", "type": "unix"})).ok(),
            from_value::<SocketAddress>(json!({"type": "unix", "path": "/x"})).ok()
        );
        assert!(
            serde_json::from_value::<SocketAddress>(json!({"type": "unix", "bogus": 1})).is_err()
        );
    }

    #[test]
    fn socket_address_errors_as_qsd_gives_them() {
        // Checked against qemu-storage-daemon 10.0 (`--nbd-server addr.*=...`, QMP).
        let cases = [
            (json!({"path": "/x"}), "Parameter 'type' is missing"),
            (
                json!({"type": "x"}),
                "Parameter 'type' does not accept value 'x'",
            ),
            (
                json!({"type": "unix", "bogus": 1}),
                "Parameter 'path' is missing",
            ),
            (
                json!({"type": "inet", "path": "1", "host": "h"}),
                "Parameter 'port' is missing",
            ),
            (
                json!({"type": "inet", "port": "1", "host": "h", "path": "p"}),
                "Parameter 'path' is unexpected",
            ),
            (
                json!({"type": "unix", "path": 1}),
                "Invalid parameter type for 'path', expected: string",
            ),
        ];
        for (v, msg) in cases {
            assert_eq!(err::<SocketAddress>(v.clone()), msg, "{v}");
        }
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Opts {
            addr: SocketAddress,
        }
        assert_eq!(
            err::<Opts>(json!({"addr": {"type": "unix", "bogus": 1}})),
            "Parameter 'addr.path' is missing"
        );
        assert_eq!(
            from_keyval::<Opts>(json!({"addr": {"type": "unix", "path": "/x", "abstract": "x"}}))
                .unwrap_err()
                .to_string(),
            "Parameter 'addr.abstract' expects 'on' or 'off'"
        );
        let o: Opts = from_keyval(
            json!({"addr": {"type": "inet", "host": "h", "port": "1", "to": "0x10", "ipv4": "on"}}),
        )
        .unwrap();
        let SocketAddress::Inet(inet) = o.addr else {
            panic!("not inet")
        };
        assert_eq!((inet.to, inet.ipv4), (Some(16), Some(true)));
        assert_eq!(
            from_keyval::<Opts>(
                json!({"addr": {"type": "inet", "host": "h", "port": "1", "to": "99999"}})
            )
            .unwrap_err()
            .to_string(),
            "Parameter 'to' expects uint16_t"
        );
    }

    #[test]
    fn bitmap_or_str_is_named_as_in_qapi() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Export {
            bitmaps: Vec<BlockDirtyBitmapOrStr>,
        }
        let e: Export =
            from_value(json!({"bitmaps": ["b0", {"node": "n", "name": "b1"}]})).unwrap();
        assert_eq!(e.bitmaps[0], BlockDirtyBitmapOrStr::Name("b0".into()));
        assert_eq!(
            err::<Export>(json!({"bitmaps": ["b0", 1]})),
            "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"
        );
    }

    #[test]
    fn remove_mode() {
        assert_eq!(
            from_value::<BlockExportRemoveMode>(json!("hard")).unwrap(),
            BlockExportRemoveMode::Hard
        );
        assert_eq!(
            BlockExportRemoveMode::default(),
            BlockExportRemoveMode::Safe
        );
        assert_eq!(
            err::<BlockExportRemoveMode>(json!("x")),
            "Parameter 'null' does not accept value 'x'"
        );
    }
}
