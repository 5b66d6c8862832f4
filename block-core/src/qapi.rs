//! QAPI `BlockdevOptions` (the arguments of `blockdev-add` and `--blockdev`) as serde
//! types, named and shaped as in QEMU 10.0's `block-core.json`, for the drivers this
//! crate has.
//!
//! Read them with [`qsd_qapi::from_value`] (QMP, JSON) or [`qsd_qapi::from_keyval`]
//! (the command line's keyval syntax, whose scalars are strings): errors are QEMU's
//! (`Parameter 'file.filename' is missing`, `Parameter 'cache.direct' expects 'on' or
//! 'off'`, `Invalid parameter type for 'file', expected: BlockdevRef`). The flat union
//! on `driver` and the `BlockdevRef` alternate read their members in place only with
//! that deserializer.

use qsd_qapi::de::{deserialize_flat_union, deserialize_object_alternate, FlatUnion};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use serde_json::Value;
use std::fmt;

/// Why a node's options were refused, with the message QEMU gives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// QAPI's own checks: a member missing, unexpected or of the wrong type, a value an enum
    /// does not have.
    #[error(transparent)]
    Argument(#[from] qsd_qapi::ArgumentError),
    /// A negative value where the driver takes none (QEMU's `QERR_INVALID_PARAMETER_VALUE`
    /// wording for its unsigned options).
    #[error("Value '{value}' is out of range for parameter '{path}'")]
    OutOfRange {
        /// The value given.
        value: i64,
        /// The member, by its full path (`file.aio-max-batch`).
        path: String,
    },
    /// `aio=native` without `cache.direct=on`.
    #[error("aio=native was specified, but it requires cache.direct=on, which was not specified.")]
    AioNativeWithoutDirect,
    /// A string longer than the protocol allows (QEMU's NBD client: `export name`,
    /// `x-dirty-bitmap query`).
    #[error("{0} too long to send to server")]
    TooLong(&'static str),
    /// A TCP port that is not a number.
    #[error("address resolution failed for {host}:{port}: Servname not supported for ai_socktype")]
    BadPort {
        /// The host.
        host: String,
        /// The port given.
        port: String,
    },
    /// A `tls-hostname` that is neither a DNS name nor an IP address.
    #[error("Invalid TLS hostname '{0}'")]
    BadTlsHostname(String),
    /// An option or image feature QEMU has and blockexportd does not: the whole message.
    #[error("{0}")]
    NotSupported(&'static str),
}

/// QAPI `BlockdevDriver`, the drivers this crate knows (whether built or not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum BlockdevDriver {
    /// A host file.
    #[serde(rename = "file")]
    File,
    /// A host block device.
    #[serde(rename = "host_device")]
    HostDevice,
    /// An export of an NBD server.
    #[serde(rename = "nbd")]
    Nbd,
    /// Reads nothing, writes nowhere.
    #[serde(rename = "null-co")]
    NullCo,
    /// The qcow2 format.
    #[serde(rename = "qcow2")]
    Qcow2,
    /// The raw format.
    #[serde(rename = "raw")]
    Raw,
    /// An image in a Ceph cluster (librbd).
    #[serde(rename = "rbd")]
    Rbd,
}

impl BlockdevDriver {
    /// The QAPI name (`file`, `null-co`, ...).
    pub fn name(self) -> &'static str {
        match self {
            BlockdevDriver::File => "file",
            BlockdevDriver::HostDevice => "host_device",
            BlockdevDriver::Nbd => "nbd",
            BlockdevDriver::NullCo => "null-co",
            BlockdevDriver::Qcow2 => "qcow2",
            BlockdevDriver::Raw => "raw",
            BlockdevDriver::Rbd => "rbd",
        }
    }
}

/// QAPI `BlockdevDiscardOptions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockdevDiscardOptions {
    /// Discard requests are ignored.
    Ignore,
    /// Discard requests are passed on.
    Unmap,
}

/// QAPI `BlockdevDetectZeroesOptions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockdevDetectZeroesOptions {
    /// No detection.
    Off,
    /// Zero writes become write-zeroes requests.
    On,
    /// Zero writes become discards where allowed.
    Unmap,
}

/// QAPI `OnOffAuto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnOffAuto {
    /// Off.
    Off,
    /// On.
    On,
    /// As the host allows.
    Auto,
}

/// QAPI `BlockdevAioOptions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum BlockdevAioOptions {
    /// A thread pool.
    #[serde(rename = "threads")]
    Threads,
    /// Linux AIO.
    #[serde(rename = "native")]
    Native,
    /// io_uring.
    #[serde(rename = "io_uring")]
    IoUring,
}

/// QAPI `BlockdevCacheOptions`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevCacheOptions {
    /// `O_DIRECT`.
    pub direct: Option<bool>,
    /// Ignore flush requests.
    pub no_flush: Option<bool>,
}

/// The base of QAPI `BlockdevOptions` without `driver`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevOptionsBase {
    /// The node's name (generated when absent).
    pub node_name: Option<String>,
    /// What to do with discard requests.
    pub discard: Option<BlockdevDiscardOptions>,
    /// Cache modes.
    pub cache: Option<BlockdevCacheOptions>,
    /// Read-only.
    pub read_only: Option<bool>,
    /// Read-only where writing is not possible.
    pub auto_read_only: Option<bool>,
    /// Share the image with writers (read-only nodes).
    pub force_share: Option<bool>,
    /// Opened active (QEMU 10; default on).
    pub active: Option<bool>,
    /// Zero detection on writes.
    pub detect_zeroes: Option<BlockdevDetectZeroesOptions>,
}

/// QAPI `BlockdevOptionsFile` (drivers `file` and `host_device`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevOptionsFile {
    /// The host file or device.
    pub filename: String,
    /// Refused: persistent reservations.
    pub pr_manager: Option<String>,
    /// Image locking.
    pub locking: Option<OnOffAuto>,
    /// The I/O backend.
    pub aio: Option<BlockdevAioOptions>,
    /// Accepted.
    pub aio_max_batch: Option<i64>,
    /// Accepted.
    pub drop_cache: Option<bool>,
    /// Accepted.
    pub x_check_cache_dropped: Option<bool>,
}

/// QAPI `BlockdevOptionsRaw`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevOptionsRaw {
    /// The child holding the data.
    pub file: BlockdevRef,
    /// Where the data starts in the child.
    pub offset: Option<i64>,
    /// How much of the child is exported.
    pub size: Option<i64>,
}

/// QAPI `BlockdevOptionsQcow2`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevOptionsQcow2 {
    /// The child holding the image.
    pub file: BlockdevRef,
    /// The backing node; absent: the one the header names; `null`: none.
    pub backing: Option<BlockdevRefOrNull>,
    /// Accepted.
    pub lazy_refcounts: Option<bool>,
    /// Accepted.
    pub pass_discard_request: Option<bool>,
    /// Accepted.
    pub pass_discard_snapshot: Option<bool>,
    /// Accepted.
    pub pass_discard_other: Option<bool>,
    /// Accepted.
    pub discard_no_unref: Option<bool>,
    /// Accepted and ignored, whatever it holds.
    pub overlap_check: Option<Value>,
    /// Accepted.
    pub cache_size: Option<i64>,
    /// Accepted.
    pub l2_cache_size: Option<i64>,
    /// Accepted.
    pub l2_cache_entry_size: Option<i64>,
    /// Accepted.
    pub refcount_cache_size: Option<i64>,
    /// Accepted.
    pub cache_clean_interval: Option<i64>,
    /// Refused: encrypted images.
    pub encrypt: Option<Value>,
    /// Refused: external data files.
    pub data_file: Option<Value>,
}

/// QAPI `BlockdevOptionsNull` (driver `null-co`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevOptionsNull {
    /// Size in bytes (default 1 GiB).
    pub size: Option<i64>,
    /// Delay of every request.
    pub latency_ns: Option<i64>,
    /// Reads return zeroes.
    pub read_zeroes: Option<bool>,
}

/// QAPI `BlockdevOptionsNbd` (driver `nbd`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevOptionsNbd {
    /// The server (`inet` or `unix`).
    pub server: qsd_qapi::types::SocketAddress,
    /// The export name (absent: the server's default export, `""`).
    pub export: Option<String>,
    /// The id of `tls-creds-x509` object with the client endpoint.
    pub tls_creds: Option<String>,
    /// The name the server's certificate is checked against (default: the inet host).
    pub tls_hostname: Option<String>,
    /// The metadata context block status reports instead of `base:allocation` (unstable).
    pub x_dirty_bitmap: Option<String>,
    /// Seconds that requests wait for a lost connection to come back (default 0).
    pub reconnect_delay: Option<u32>,
    /// Seconds that opening retries the connection (default 0: one attempt).
    pub open_timeout: Option<u32>,
}

/// QAPI `RbdAuthMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RbdAuthMode {
    /// Ceph's cephx.
    Cephx,
    /// No authentication.
    None,
}

impl RbdAuthMode {
    /// The QAPI (and librados) name.
    pub fn name(self) -> &'static str {
        match self {
            RbdAuthMode::Cephx => "cephx",
            RbdAuthMode::None => "none",
        }
    }
}

/// QAPI `InetSocketAddressBase`: a host and a port (a number or a service name).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct InetSocketAddressBase {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: String,
}

/// QAPI `BlockdevOptionsRbd`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevOptionsRbd {
    /// The Ceph pool.
    pub pool: String,
    /// The RADOS namespace in the pool.
    pub namespace: Option<String>,
    /// The image.
    pub image: String,
    /// The Ceph configuration file.
    pub conf: Option<String>,
    /// A snapshot to open (read-only).
    pub snapshot: Option<String>,
    /// Refused: librbd's image encryption.
    pub encrypt: Option<Value>,
    /// The Ceph user.
    pub user: Option<String>,
    /// Acceptable authentication modes.
    pub auth_client_required: Option<Vec<RbdAuthMode>>,
    /// A `secret` object holding the user's key.
    pub key_secret: Option<String>,
    /// The monitors.
    pub server: Option<Vec<InetSocketAddressBase>>,
}

/// The driver's own members of [`BlockdevOptions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverOptions {
    /// `file`.
    File(BlockdevOptionsFile),
    /// `host_device`.
    HostDevice(BlockdevOptionsFile),
    /// `nbd`.
    Nbd(BlockdevOptionsNbd),
    /// `null-co`.
    NullCo(BlockdevOptionsNull),
    /// `qcow2`.
    Qcow2(BlockdevOptionsQcow2),
    /// `raw`.
    Raw(BlockdevOptionsRaw),
    /// `rbd`.
    Rbd(BlockdevOptionsRbd),
}

impl DriverOptions {
    /// The driver.
    pub fn driver(&self) -> BlockdevDriver {
        match self {
            DriverOptions::File(_) => BlockdevDriver::File,
            DriverOptions::HostDevice(_) => BlockdevDriver::HostDevice,
            DriverOptions::Nbd(_) => BlockdevDriver::Nbd,
            DriverOptions::NullCo(_) => BlockdevDriver::NullCo,
            DriverOptions::Qcow2(_) => BlockdevDriver::Qcow2,
            DriverOptions::Raw(_) => BlockdevDriver::Raw,
            DriverOptions::Rbd(_) => BlockdevDriver::Rbd,
        }
    }
}

/// QAPI `BlockdevOptions`: the flat union on `driver`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockdevOptions {
    /// The members every driver has.
    pub base: BlockdevOptionsBase,
    /// The driver and its own members.
    pub options: DriverOptions,
}

impl BlockdevOptions {
    /// Options of `driver` with defaults for everything else.
    pub fn new(options: DriverOptions) -> Self {
        BlockdevOptions {
            base: BlockdevOptionsBase::default(),
            options,
        }
    }

    /// Reads options from JSON (QMP's syntax), with QEMU's messages.
    pub fn from_json(value: Value) -> Result<Self, OptionError> {
        Ok(qsd_qapi::from_value(value)?)
    }
}

impl FlatUnion for BlockdevOptions {
    const MEMBERS: &'static [&'static str] = &[
        "driver",
        "node-name",
        "discard",
        "cache",
        "read-only",
        "auto-read-only",
        "force-share",
        "active",
        "detect-zeroes",
    ];
    type Tag = BlockdevDriver;
    type Base = BlockdevOptionsBase;

    fn variant<'de, D: Deserializer<'de>>(
        tag: BlockdevDriver,
        base: BlockdevOptionsBase,
        rest: D,
    ) -> Result<Self, D::Error> {
        if !crate::open::drivers().contains(&tag.name()) {
            return Err(de::Error::custom(format!(
                "Driver '{}' is not built into this version of blockexportd",
                tag.name()
            )));
        }
        let options = match tag {
            BlockdevDriver::File => DriverOptions::File(Deserialize::deserialize(rest)?),
            BlockdevDriver::HostDevice => {
                DriverOptions::HostDevice(Deserialize::deserialize(rest)?)
            }
            BlockdevDriver::Nbd => DriverOptions::Nbd(Deserialize::deserialize(rest)?),
            BlockdevDriver::NullCo => DriverOptions::NullCo(Deserialize::deserialize(rest)?),
            BlockdevDriver::Qcow2 => DriverOptions::Qcow2(Deserialize::deserialize(rest)?),
            BlockdevDriver::Raw => DriverOptions::Raw(Deserialize::deserialize(rest)?),
            BlockdevDriver::Rbd => DriverOptions::Rbd(Deserialize::deserialize(rest)?),
        };
        Ok(BlockdevOptions { base, options })
    }
}

impl<'de> Deserialize<'de> for BlockdevOptions {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_flat_union(d)
    }
}

/// QAPI `BlockdevRef`: a node by name, or one defined inline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockdevRef {
    /// An existing node, by name.
    Name(String),
    /// A node defined inline.
    Inline(Box<BlockdevOptions>),
}

/// QAPI `BlockdevRefOrNull`: a [`BlockdevRef`] or `null` (none). QEMU still takes `""`
/// for `null`, the only spelling keyval has, with a warning: it is read as
/// `Ref(Name(""))` here, for the user to treat so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockdevRefOrNull {
    /// A node.
    Ref(BlockdevRef),
    /// `null`: no node.
    Null,
}

/// Reads either alternate; `None` is `null` (offered when `nullable`).
struct RefVisitor {
    nullable: bool,
}

impl<'de> Visitor<'de> for RefVisitor {
    type Value = Option<BlockdevRef>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.nullable {
            "BlockdevRefOrNull"
        } else {
            "BlockdevRef"
        })
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(BlockdevRef::Name(v.to_string())))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        if self.nullable {
            Ok(None)
        } else {
            Err(de::Error::invalid_type(de::Unexpected::Unit, &self))
        }
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        BlockdevOptions::deserialize(d).map(|o| Some(BlockdevRef::Inline(Box::new(o))))
    }
}

impl<'de> Deserialize<'de> for BlockdevRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = RefVisitor { nullable: false };
        deserialize_object_alternate(d, v)?
            .ok_or_else(|| de::Error::invalid_type(de::Unexpected::Unit, &"BlockdevRef"))
    }
}

impl<'de> Deserialize<'de> for BlockdevRefOrNull {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = RefVisitor { nullable: true };
        Ok(match deserialize_object_alternate(d, v)? {
            Some(r) => BlockdevRefOrNull::Ref(r),
            None => BlockdevRefOrNull::Null,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn json_err(v: Value) -> String {
        qsd_qapi::from_value::<BlockdevOptions>(v)
            .expect_err("should fail")
            .to_string()
    }

    fn keyval(s: &str) -> Result<BlockdevOptions, String> {
        let map = qsd_qapi::keyval::parse(s, Some("driver")).map_err(|e| e.to_string())?;
        qsd_qapi::from_keyval(Value::Object(map)).map_err(|e| e.to_string())
    }

    #[test]
    fn typed_and_keyval_scalars() {
        let o = keyval("null-co,size=0x100,read-zeroes=on,cache.direct=off,read-only=yes")
            .expect("options");
        assert_eq!(o.base.read_only, Some(true));
        assert_eq!(
            o.base.cache,
            Some(BlockdevCacheOptions {
                direct: Some(false),
                no_flush: None
            })
        );
        let DriverOptions::NullCo(n) = o.options else {
            panic!("not null-co")
        };
        assert_eq!((n.size, n.read_zeroes), (Some(256), Some(true)));
        assert_eq!(
            keyval("null-co,size=1G").unwrap_err(),
            "Parameter 'size' expects integer"
        );
        assert_eq!(
            json_err(json!({"driver": "null-co", "size": 1.5})),
            "Invalid parameter type for 'size', expected: integer"
        );
        assert_eq!(
            json_err(json!({"driver": "null-co", "read-zeroes": "on"})),
            "Invalid parameter type for 'read-zeroes', expected: boolean"
        );
    }

    #[test]
    fn messages_follow_qapi() {
        let cases = [
            (json!({"node-name": "a"}), "Parameter 'driver' is missing"),
            (
                json!({"driver": "xyz"}),
                "Parameter 'driver' does not accept value 'xyz'",
            ),
            (
                json!({"driver": "raw", "file": {"driver": "file", "filename": "/x", "bogus": 1}}),
                "Parameter 'file.bogus' is unexpected",
            ),
            (
                json!({"driver": "raw", "file": {"driver": "null-co", "bogus": 1}, "offset": "x"}),
                "Parameter 'file.bogus' is unexpected",
            ),
            (
                json!({"driver": "raw", "file": {"driver": "file"}}),
                "Parameter 'file.filename' is missing",
            ),
            (
                json!({"driver": "raw", "file": 5}),
                "Invalid parameter type for 'file', expected: BlockdevRef",
            ),
            (
                json!({"driver": "raw", "file": null}),
                "Invalid parameter type for 'file', expected: BlockdevRef",
            ),
            (
                json!({"driver": "qcow2", "file": "f", "backing": 5}),
                "Invalid parameter type for 'backing', expected: BlockdevRefOrNull",
            ),
            (
                json!({"driver": "null-co", "cache": {"direct": true, "x": 1}}),
                "Parameter 'cache.x' is unexpected",
            ),
            (
                json!({"driver": "file", "filename": "f", "locking": "maybe"}),
                "Parameter 'locking' does not accept value 'maybe'",
            ),
            (
                json!(3),
                "Invalid parameter type for 'null', expected: object",
            ),
        ];
        for (v, msg) in cases {
            assert_eq!(json_err(v.clone()), msg, "{v}");
        }
        assert_eq!(
            keyval("raw,file.driver=file,file.filename=/x,cache.direct=maybe").unwrap_err(),
            "Parameter 'cache.direct' expects 'on' or 'off'"
        );
    }

    #[test]
    fn references() {
        let o = keyval("qcow2,file=f,backing=").expect("options");
        let DriverOptions::Qcow2(q) = o.options else {
            panic!("not qcow2")
        };
        assert_eq!(q.file, BlockdevRef::Name("f".into()));
        assert_eq!(
            q.backing,
            Some(BlockdevRefOrNull::Ref(BlockdevRef::Name(String::new())))
        );
        let o = BlockdevOptions::from_json(json!({"driver": "qcow2", "backing": null,
            "file": {"driver": "file", "filename": "/x", "node-name": "f"}}))
        .expect("options");
        let DriverOptions::Qcow2(q) = o.options else {
            panic!("not qcow2")
        };
        assert_eq!(q.backing, Some(BlockdevRefOrNull::Null));
        let BlockdevRef::Inline(file) = q.file else {
            panic!("not inline")
        };
        assert_eq!(file.base.node_name.as_deref(), Some("f"));
    }
}
