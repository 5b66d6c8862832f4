//! Building nodes from QAPI [`BlockdevOptions`] (the arguments of `blockdev-add` and
//! `--blockdev`), and describing them as `query-named-block-nodes` does.
//!
//! Every option is validated before anything is opened: unknown members and wrong types
//! when the options are read ([`crate::qapi`]), bad values here, with QEMU's messages. Children may be given by node name or inline;
//! inline children inherit `read-only`, `auto-read-only`, `discard` and `cache.*` from their
//! parent unless they set them, get generated names when they have none, and are removed
//! again when their parent fails to open. A qcow2 node whose `backing` is omitted opens the
//! backing file named in its header, read-only, relative to the image's directory.

// A build without every driver leaves parts of the option handling unused.
#![cfg_attr(
    not(all(
        feature = "file",
        feature = "raw",
        feature = "qcow2",
        feature = "null",
        feature = "nbd"
    )),
    allow(unused)
)]

use crate::graph::{GraphError, NodeGraph};
use crate::node::{ChildRole, DetectZeroes, Node, NodeConfig};
use crate::qapi::{
    BlockdevAioOptions, BlockdevDetectZeroesOptions, BlockdevDiscardOptions, BlockdevOptions,
    BlockdevOptionsBase, BlockdevOptionsFile, BlockdevRef, BlockdevRefOrNull, DriverOptions,
    OnOffAuto, OptionError,
};
use crate::{BlockDriver, DirtyBitmap};
use serde_json::{json, Value};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

/// Opens the node described by `options` (QAPI `BlockdevOptions`), adds it to `graph` and
/// returns it. Nested child definitions are opened and added first, as implicit children of
/// the new node (see [`NodeGraph::delete`]); on failure nothing that this call added stays in
/// the graph.
pub async fn blockdev_add(
    graph: &NodeGraph,
    options: BlockdevOptions,
) -> Result<Arc<Node>, GraphError> {
    let mut created = Vec::new();
    let result = open_node(
        graph,
        options,
        Inherited::default(),
        String::new(),
        &mut created,
    )
    .await;
    if let Ok(node) = &result {
        // Everything else that this command opened belongs to the new node.
        created.retain(|name| name != node.name());
        graph.set_implicit(&created);
    } else {
        for name in created.iter().rev() {
            if let Ok(node) = graph.remove(name) {
                if let Err(e) = node.driver().close().await {
                    tracing::warn!("closing node '{name}' after a failed blockdev-add: {e}");
                }
            }
        }
    }
    result
}

/// The drivers this build knows.
pub fn drivers() -> Vec<&'static str> {
    let mut d = Vec::new();
    if cfg!(feature = "file") {
        d.extend(["file", "host_device"]);
    }
    if cfg!(feature = "nbd") {
        d.push("nbd");
    }
    if cfg!(feature = "null") {
        d.push("null-co");
    }
    if cfg!(feature = "qcow2") {
        d.push("qcow2");
    }
    if cfg!(feature = "raw") {
        d.push("raw");
    }
    if cfg!(all(feature = "rbd", librbd)) {
        d.push("rbd");
    }
    d
}

/// What a child takes from its parent unless it sets it itself.
#[derive(Debug, Clone, Copy, Default)]
struct Inherited {
    read_only: bool,
    auto_read_only: bool,
    discard_unmap: Option<bool>,
    direct: Option<bool>,
    no_flush: Option<bool>,
    /// Opened for an inactive parent: nobody needs the image yet, so no locks are taken and
    /// nothing is written (QEMU gives such a child no permissions).
    idle: bool,
}

/// `BlockdevOptionsBase`.
#[derive(Debug)]
struct Common {
    node_name: Option<String>,
    read_only: bool,
    auto_read_only: bool,
    force_share: bool,
    /// QEMU 10's `active` (default on): off opens the node inactive.
    active: bool,
    config: NodeConfig,
}

fn parse_common(base: BlockdevOptionsBase, inh: &Inherited) -> Common {
    let cache = base.cache.unwrap_or_default();
    let detect_zeroes = match base.detect_zeroes {
        Some(BlockdevDetectZeroesOptions::On) => DetectZeroes::On,
        Some(BlockdevDetectZeroesOptions::Unmap) => DetectZeroes::Unmap,
        _ => DetectZeroes::Off,
    };
    Common {
        node_name: base.node_name,
        read_only: base.read_only.unwrap_or(inh.read_only),
        auto_read_only: base.auto_read_only.unwrap_or(inh.auto_read_only),
        force_share: base.force_share.unwrap_or(false),
        active: base.active.unwrap_or(true),
        config: NodeConfig {
            discard_unmap: base
                .discard
                .map(|d| d == BlockdevDiscardOptions::Unmap)
                .or(inh.discard_unmap)
                .unwrap_or(false),
            detect_zeroes,
            cache_direct: cache.direct.or(inh.direct).unwrap_or(false),
            cache_no_flush: cache.no_flush.or(inh.no_flush).unwrap_or(false),
        },
    }
}

/// The driver-specific part of the options, checked.
#[derive(Debug)]
enum Spec {
    File {
        filename: String,
        locking: OnOffAuto,
        host_device: bool,
    },
    Raw {
        file: BlockdevRef,
        offset: u64,
        size: Option<u64>,
    },
    Qcow2 {
        file: BlockdevRef,
        backing: Option<BlockdevRefOrNull>,
    },
    Null {
        size: u64,
        read_zeroes: bool,
        latency_ns: u64,
    },
    Nbd(Box<crate::qapi::BlockdevOptionsNbd>),
    #[cfg_attr(not(all(feature = "rbd", librbd)), allow(dead_code))]
    Rbd(crate::qapi::BlockdevOptionsRbd),
}

/// The path of member `key` of the options at `prefix`, in messages.
fn member_path(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// An integer member that must not be negative.
fn non_negative(prefix: &str, key: &str, v: Option<i64>) -> Result<Option<u64>, OptionError> {
    match v {
        None => Ok(None),
        Some(v) => u64::try_from(v)
            .map(Some)
            .map_err(|_| OptionError::OutOfRange {
                value: v,
                path: member_path(prefix, key),
            }),
    }
}

fn file_spec(
    o: BlockdevOptionsFile,
    common: &Common,
    prefix: &str,
    host_device: bool,
) -> Result<Spec, OptionError> {
    non_negative(prefix, "aio-max-batch", o.aio_max_batch)?;
    if o.pr_manager.is_some() {
        return Err(OptionError::NotSupported(
            "pr-manager is not supported by blockexportd",
        ));
    }
    match o.aio {
        Some(BlockdevAioOptions::Native) if !common.config.cache_direct => {
            Err(OptionError::AioNativeWithoutDirect)
        }
        Some(BlockdevAioOptions::IoUring) => Err(OptionError::NotSupported(
            "aio=io_uring is not supported by blockexportd; use aio=threads",
        )),
        _ => Ok(Spec::File {
            filename: o.filename,
            locking: o.locking.unwrap_or(OnOffAuto::Auto),
            host_device,
        }),
    }
}

fn parse_spec(options: DriverOptions, common: &Common, prefix: &str) -> Result<Spec, OptionError> {
    Ok(match options {
        DriverOptions::File(o) => file_spec(o, common, prefix, false)?,
        DriverOptions::HostDevice(o) => file_spec(o, common, prefix, true)?,
        DriverOptions::Raw(o) => Spec::Raw {
            offset: non_negative(prefix, "offset", o.offset)?.unwrap_or(0),
            size: non_negative(prefix, "size", o.size)?,
            file: o.file,
        },
        DriverOptions::Qcow2(o) => {
            for (key, v) in [
                ("cache-size", o.cache_size),
                ("l2-cache-size", o.l2_cache_size),
                ("l2-cache-entry-size", o.l2_cache_entry_size),
                ("refcount-cache-size", o.refcount_cache_size),
                ("cache-clean-interval", o.cache_clean_interval),
            ] {
                non_negative(prefix, key, v)?;
            }
            if o.encrypt.is_some() {
                return Err(OptionError::NotSupported(
                    "Encrypted qcow2 images are not supported by blockexportd",
                ));
            }
            if o.data_file.is_some() {
                return Err(OptionError::NotSupported(
                    "qcow2 external data files are not supported by blockexportd",
                ));
            }
            Spec::Qcow2 {
                file: o.file,
                backing: o.backing,
            }
        }
        DriverOptions::Nbd(o) => {
            if o.export.as_ref().is_some_and(|e| e.len() > 4096) {
                return Err(OptionError::TooLong("export name"));
            }
            if o.x_dirty_bitmap.as_ref().is_some_and(|e| e.len() > 4096) {
                return Err(OptionError::TooLong("x-dirty-bitmap query"));
            }
            Spec::Nbd(Box::new(o))
        }
        DriverOptions::Rbd(o) => {
            if o.encrypt.is_some() {
                return Err(OptionError::NotSupported(
                    "RBD image encryption is not supported by blockexportd",
                ));
            }
            Spec::Rbd(o)
        }
        DriverOptions::NullCo(o) => Spec::Null {
            size: non_negative(prefix, "size", o.size)?.unwrap_or(1 << 30),
            latency_ns: non_negative(prefix, "latency-ns", o.latency_ns)?.unwrap_or(0),
            read_zeroes: o.read_zeroes.unwrap_or(false),
        },
    })
}

pub use qsd_qapi::error_text;

/// Standard base64 with padding (QEMU's `qcrypto_secret_lookup_as_base64`).
#[cfg(all(feature = "rbd", librbd))]
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn failed(e: impl std::error::Error + Send + Sync + 'static) -> GraphError {
    GraphError::Open(Box::new(e))
}

type Children = Vec<(ChildRole, Arc<Node>)>;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

fn open_node<'a>(
    graph: &'a NodeGraph,
    options: BlockdevOptions,
    inh: Inherited,
    prefix: String,
    created: &'a mut Vec<String>,
) -> BoxFuture<'a, Result<Arc<Node>, GraphError>> {
    Box::pin(async move {
        let driver = options.options.driver().name();
        let common = parse_common(options.base, &inh);
        let spec = parse_spec(options.options, &common, &prefix)?;
        if let Some(name) = &common.node_name {
            graph.check_new_name(name)?;
        }
        if common.config.detect_zeroes == DetectZeroes::Unmap && !common.config.discard_unmap {
            return Err(GraphError::DetectZeroesUnmapWithoutDiscard);
        }
        if common.force_share && !common.read_only {
            return Err(GraphError::ForceShareWritable);
        }
        let child_inh = Inherited {
            read_only: common.read_only,
            auto_read_only: common.auto_read_only,
            discard_unmap: Some(common.config.discard_unmap),
            direct: Some(common.config.cache_direct),
            no_flush: Some(common.config.cache_no_flush),
            idle: !common.active || inh.idle,
        };
        let child_prefix = |key: &str| {
            if prefix.is_empty() {
                key.to_string()
            } else {
                format!("{prefix}.{key}")
            }
        };

        // The driver, its children, and persistent dirty bitmaps found in the image for the
        // node to adopt.
        let (drv, children, loaded_bitmaps): (Arc<dyn BlockDriver>, Children, Vec<DirtyBitmap>) =
            match spec {
                #[cfg(feature = "file")]
                Spec::File {
                    filename,
                    locking,
                    host_device,
                } => {
                    use crate::drivers::file::{FileDriver, FileOptions, Locking};
                    let opts = FileOptions {
                        filename: PathBuf::from(filename),
                        read_only: common.read_only,
                        auto_read_only: common.auto_read_only,
                        direct: common.config.cache_direct,
                        no_flush: common.config.cache_no_flush,
                        locking: match locking {
                            OnOffAuto::On => Locking::On,
                            OnOffAuto::Off => Locking::Off,
                            OnOffAuto::Auto => Locking::Auto,
                        },
                        force_share: common.force_share,
                        host_device,
                        no_inline: false,
                        defer_locks: !common.active || inh.idle,
                    };
                    let drv = tokio::task::spawn_blocking(move || FileDriver::open(&opts))
                        .await
                        .map_err(failed)?
                        .map_err(failed)?;
                    (Arc::new(drv), Vec::new(), Vec::new())
                }
                #[cfg(feature = "null")]
                Spec::Null {
                    size,
                    read_zeroes,
                    latency_ns,
                } => (
                    Arc::new(crate::drivers::null::NullDriver::new(
                        size,
                        read_zeroes,
                        common.read_only,
                        latency_ns,
                    )),
                    Vec::new(),
                    Vec::new(),
                ),
                #[cfg(feature = "nbd")]
                Spec::Nbd(o) => {
                    let cfg = nbd_config(graph, *o)?;
                    let drv = crate::drivers::nbd::NbdDriver::open(
                        cfg,
                        common.read_only,
                        common.auto_read_only,
                    )
                    .await
                    .map_err(failed)?;
                    (Arc::new(drv), Vec::new(), Vec::new())
                }
                #[cfg(feature = "raw")]
                Spec::Raw { file, offset, size } => {
                    let child =
                        child_node(graph, file, child_inh, child_prefix("file"), created).await?;
                    let read_only = common.read_only || child.read_only();
                    let drv = crate::drivers::raw::RawDriver::open(
                        Arc::clone(&child),
                        offset,
                        size,
                        read_only,
                    )
                    .map_err(failed)?;
                    (Arc::new(drv), vec![(ChildRole::File, child)], Vec::new())
                }
                #[cfg(feature = "qcow2")]
                Spec::Qcow2 { file, backing } => {
                    use crate::drivers::qcow2::Qcow2Driver;
                    let child =
                        child_node(graph, file, child_inh, child_prefix("file"), created).await?;
                    let read_only = common.read_only || child.read_only();
                    let opener =
                        Qcow2Driver::open_with(Arc::clone(&child), read_only, child_inh.idle)
                            .await
                            .map_err(failed)?;
                    let backing_inh = Inherited {
                        read_only: true,
                        auto_read_only: false,
                        ..child_inh
                    };
                    let backing = match backing {
                        // QEMU still takes "" for null (the only spelling keyval has).
                        Some(BlockdevRefOrNull::Ref(BlockdevRef::Name(n))) if n.is_empty() => {
                            let path = child_prefix("backing");
                            tracing::warn!(
                                "Use of \"{path}\": \"\" is deprecated; use \"{path}\": null instead"
                            );
                            Some(BlockdevRefOrNull::Null)
                        }
                        other => other,
                    };
                    let backing_node = match backing {
                        Some(BlockdevRefOrNull::Null) => None,
                        Some(BlockdevRefOrNull::Ref(r)) => Some(
                            child_node(graph, r, backing_inh, child_prefix("backing"), created)
                                .await?,
                        ),
                        None => match opener.backing_file() {
                            None => None,
                            Some(name) => {
                                let backing_file =
                                    |e: GraphError| GraphError::BackingFile(Box::new(e));
                                let options = implicit_backing(
                                    &name,
                                    opener.backing_format().as_deref(),
                                    opener.base_dir().as_deref(),
                                    &child_prefix("backing"),
                                )
                                .map_err(|e| backing_file(OptionError::from(e).into()))?;
                                let node = open_node(
                                    graph,
                                    options,
                                    backing_inh,
                                    child_prefix("backing"),
                                    created,
                                )
                                .await
                                .map_err(backing_file)?;
                                Some(node)
                            }
                        },
                    };
                    let drv = opener.finish(backing_node.clone()).await.map_err(failed)?;
                    let loaded = drv.take_loaded_bitmaps();
                    let mut children = vec![(ChildRole::File, child)];
                    if let Some(b) = backing_node {
                        children.push((ChildRole::Backing, b));
                    }
                    (Arc::new(drv), children, loaded)
                }
                #[cfg(all(feature = "rbd", librbd))]
                Spec::Rbd(o) => {
                    use crate::drivers::rbd::{RbdDriver, RbdOptions};
                    let key = match &o.key_secret {
                        None => None,
                        Some(id) => {
                            let bytes = graph.objects().secret(id).map_err(GraphError::Open)?;
                            Some(base64(&bytes))
                        }
                    };
                    let opts = RbdOptions {
                        pool: o.pool,
                        namespace: o.namespace,
                        image: o.image,
                        conf: o.conf,
                        snapshot: o.snapshot,
                        user: o.user,
                        auth_client_required: o
                            .auth_client_required
                            .map(|m| m.iter().map(|a| a.name().to_string()).collect()),
                        key,
                        server: o
                            .server
                            .unwrap_or_default()
                            .into_iter()
                            .map(|s| (s.host, s.port))
                            .collect(),
                        read_only: common.read_only,
                        auto_read_only: common.auto_read_only,
                        no_cache: common.config.cache_direct,
                        inactive: !common.active || inh.idle,
                    };
                    let drv = tokio::task::spawn_blocking(move || RbdDriver::open(&opts))
                        .await
                        .map_err(failed)?
                        .map_err(failed)?;
                    (Arc::new(drv), Vec::new(), Vec::new())
                }
                #[allow(unreachable_patterns)]
                _ => return Err(GraphError::NotBuilt(driver)),
            };

        let name = common.node_name.unwrap_or_else(|| graph.generate_name());
        let node = Node::with_config(name, drv, children, common.config);
        if let Err(e) = graph.insert(Arc::clone(&node)) {
            let _ = node.driver().close().await;
            return Err(e);
        }
        created.push(node.name().to_string());
        if !common.active {
            // As QEMU opens it with BDRV_O_INACTIVE: this node only, not its children.
            node.set_active_flag(false);
            node.driver().set_active(false).await.map_err(failed)?;
        }
        for bitmap in loaded_bitmaps {
            node.add_bitmap(Arc::new(bitmap))?;
        }
        Ok(node)
    })
}

/// The `nbd` driver's configuration from its options, with the TLS credentials looked up.
#[cfg(feature = "nbd")]
fn nbd_config(
    graph: &NodeGraph,
    o: crate::qapi::BlockdevOptionsNbd,
) -> Result<crate::drivers::nbd::Config, GraphError> {
    use crate::drivers::nbd::{Addr, Config, Tls};
    use qsd_qapi::types::SocketAddress;
    let (addr, host) = match o.server {
        SocketAddress::Inet(i) => {
            let port = i.port.parse::<u16>().map_err(|_| OptionError::BadPort {
                host: i.host.clone(),
                port: i.port.clone(),
            })?;
            (
                Addr::Inet {
                    host: i.host.clone(),
                    port,
                },
                Some(i.host),
            )
        }
        SocketAddress::Unix(u) => {
            if u.abstract_ == Some(true) {
                return Err(OptionError::NotSupported(
                    "Abstract unix sockets are not supported by the nbd driver of blockexportd",
                )
                .into());
            }
            (Addr::Unix(PathBuf::from(u.path)), None)
        }
        SocketAddress::Fd(_) => {
            return Err(OptionError::NotSupported(
                "fd socket addresses are not supported by the nbd driver of blockexportd",
            )
            .into())
        }
    };
    let tls = match &o.tls_creds {
        None => None,
        Some(id) => {
            // QEMU checks the certificate against tls-hostname, else the inet host; with
            // neither (a unix socket) it checks the chain alone. rustls wants a name all the
            // same: "localhost", which the nameless configuration does not check.
            let name = o.tls_hostname.clone().or(host);
            let config = graph
                .objects()
                .tls_client(id, name.is_some())
                .map_err(GraphError::Open)?;
            let name = name.unwrap_or_else(|| "localhost".to_string());
            let server_name = rustls::pki_types::ServerName::try_from(name.clone())
                .map_err(|_| OptionError::BadTlsHostname(name))?;
            Some(Tls {
                config,
                server_name,
            })
        }
    };
    Ok(Config {
        addr,
        export: o.export.unwrap_or_default(),
        tls,
        dirty_bitmap: o.x_dirty_bitmap,
        reconnect_delay: std::time::Duration::from_secs(o.reconnect_delay.unwrap_or(0).into()),
        open_timeout: std::time::Duration::from_secs(o.open_timeout.unwrap_or(0).into()),
    })
}

async fn child_node(
    graph: &NodeGraph,
    r: BlockdevRef,
    inh: Inherited,
    prefix: String,
    created: &mut Vec<String>,
) -> Result<Arc<Node>, GraphError> {
    match r {
        // QEMU reports a missing child with class GenericError.
        BlockdevRef::Name(name) => graph.get(&name),
        BlockdevRef::Inline(options) => open_node(graph, *options, inh, prefix, created).await,
    }
}

/// The options QEMU would use to open a backing file named in an image header (`prefix`:
/// where they stand, for messages).
fn implicit_backing(
    name: &str,
    format: Option<&str>,
    base_dir: Option<&Path>,
    prefix: &str,
) -> Result<BlockdevOptions, qsd_qapi::ArgumentError> {
    let path = match base_dir {
        Some(dir) if !Path::new(name).is_absolute() => dir.join(name),
        _ => PathBuf::from(name),
    };
    let filename = path.to_string_lossy().into_owned();
    let format = match format {
        Some(f) => f.to_string(),
        None => probe_format(&path).to_string(),
    };
    let file = json!({"driver": "file", "filename": filename});
    let options = if format == "file" {
        file
    } else {
        json!({"driver": format, "file": file})
    };
    qsd_qapi::from_value_at(options, prefix)
}

fn probe_format(path: &Path) -> &'static str {
    use std::io::Read;
    let mut magic = [0u8; 4];
    match std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)) {
        Ok(()) if &magic == b"QFI\xfb" => "qcow2",
        _ => "raw",
    }
}

/// The `query-named-block-nodes` entry of `node` (QAPI `BlockDeviceInfo`). With `flat`, the
/// `image` member does not describe the backing chain (`backing-image`), and
/// `backing_file_depth` is 0, as QEMU does.
pub fn node_info(node: &Node, flat: bool) -> Value {
    let drv = node.driver();
    let config = node.config();
    let filename = drv.filename().unwrap_or_default();
    let mut info = json!({
        "node-name": node.name(),
        "drv": drv.driver_name(),
        "ro": node.read_only(),
        "file": filename,
        "backing_file_depth": if flat { 0 } else { backing_depth(node) },
        "encrypted": false,
        "detect_zeroes": config.detect_zeroes.as_str(),
        "bps": 0, "bps_rd": 0, "bps_wr": 0,
        "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "write_threshold": 0,
        "active": node.is_active(),
        "cache": {
            "writeback": true,
            "direct": config.cache_direct,
            "no-flush": config.cache_no_flush,
        },
        "image": image_info(node, flat),
    });
    if let Some(backing) = node.child(ChildRole::Backing) {
        if let (Some(obj), Some(f)) = (info.as_object_mut(), backing.driver().filename()) {
            obj.insert("backing_file".into(), Value::String(f));
        }
    }
    info
}

fn backing_depth(node: &Node) -> u64 {
    match node.child(ChildRole::Backing) {
        Some(b) => 1 + backing_depth(b),
        None => 0,
    }
}

/// QAPI `ImageInfo` of a node.
fn image_info(node: &Node, flat: bool) -> Value {
    let drv = node.driver();
    let details = drv.image_details();
    let mut image = serde_json::Map::new();
    image.insert(
        "filename".into(),
        Value::String(drv.filename().unwrap_or_default()),
    );
    image.insert("format".into(), Value::String(drv.driver_name().into()));
    image.insert("virtual-size".into(), json!(node.size()));
    if let Some(a) = details.actual_size {
        image.insert("actual-size".into(), json!(a));
    }
    if let Some(c) = details.cluster_size {
        image.insert("cluster-size".into(), json!(c));
    }
    if let Some(d) = details.dirty_flag {
        image.insert("dirty-flag".into(), json!(d));
    }
    if let Some(f) = details.format_specific {
        image.insert("format-specific".into(), f);
    }
    if let Some(b) = &details.backing_filename {
        image.insert("backing-filename".into(), json!(b));
        if let Some(full) = node
            .child(ChildRole::Backing)
            .and_then(|n| n.driver().filename())
        {
            image.insert("full-backing-filename".into(), json!(full));
        }
        if let Some(f) = &details.backing_format {
            image.insert("backing-filename-format".into(), json!(f));
        }
    }
    if !flat {
        if let Some(backing) = node.child(ChildRole::Backing) {
            image.insert("backing-image".into(), image_info(backing, false));
        }
    }
    Value::Object(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `blockdev-add` with JSON options: parsing, then opening.
    async fn add(g: &NodeGraph, options: Value) -> Result<Arc<Node>, GraphError> {
        match BlockdevOptions::from_json(options) {
            Ok(o) => blockdev_add(g, o).await,
            Err(e) => Err(e.into()),
        }
    }

    fn failure(r: Result<Arc<Node>, GraphError>) -> String {
        match r {
            Err(e) => e.to_string(),
            Ok(n) => panic!("unexpectedly opened {n:?}"),
        }
    }

    #[tokio::test]
    async fn validation_messages_match_qemu() {
        let g = NodeGraph::new();
        let cases = [
            (json!({"node-name": "a"}), "Parameter 'driver' is missing"),
            (
                json!({"driver": "xyz", "node-name": "a"}),
                "Parameter 'driver' does not accept value 'xyz'",
            ),
            (
                json!({"driver": "file", "node-name": "a", "filename": "x", "bogus": 1}),
                "Parameter 'bogus' is unexpected",
            ),
            (
                json!({"driver": "file", "node-name": "a"}),
                "Parameter 'filename' is missing",
            ),
            (
                json!({"driver": "file", "node-name": "a", "filename": 5}),
                "Invalid parameter type for 'filename', expected: string",
            ),
            (
                json!({"driver": "null-co", "node-name": "a", "size": "abc"}),
                "Invalid parameter type for 'size', expected: integer",
            ),
            (
                json!({"driver": "null-co", "node-name": "a", "size": -1}),
                "Value '-1' is out of range for parameter 'size'",
            ),
            (
                json!({"driver": "raw", "node-name": "a", "file": {"driver": "null-co", "latency-ns": -1}}),
                "Value '-1' is out of range for parameter 'file.latency-ns'",
            ),
            (
                json!({"driver": "raw", "node-name": "a", "file": {"driver": "file", "filename": "/x", "bogus": 1}}),
                "Parameter 'file.bogus' is unexpected",
            ),
            (
                json!({"driver": "raw", "node-name": "a", "file": "nope"}),
                "Cannot find device='nope' nor node-name='nope'",
            ),
            (
                json!({"driver": "null-co", "node-name": "9x"}),
                "Invalid node-name: '9x'",
            ),
            (
                json!({"driver": "null-co", "node-name": "a", "detect-zeroes": "unmap"}),
                "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
            ),
            (
                json!({"driver": "null-co", "node-name": "a", "force-share": true}),
                "force-share=on can only be used with read-only images",
            ),
            (
                json!({"driver": "file", "node-name": "a", "filename": "/nonexistent/x"}),
                "Could not open '/nonexistent/x': No such file or directory",
            ),
            (
                json!({"driver": "file", "node-name": "a", "filename": "/x", "locking": "maybe"}),
                "Parameter 'locking' does not accept value 'maybe'",
            ),
        ];
        for (options, message) in cases {
            assert_eq!(
                failure(add(&g, options.clone()).await),
                message,
                "{options}"
            );
        }
        assert!(g.all().is_empty());
    }

    #[tokio::test]
    async fn null_defaults_and_info() {
        let g = NodeGraph::new();
        let n = add(&g, json!({"driver": "null-co", "read-zeroes": true}))
            .await
            .expect("open null-co");
        assert_eq!(n.size(), 1 << 30);
        assert!(n.name().starts_with('#'));
        let info = node_info(&n, false);
        assert_eq!(info["drv"], "null-co");
        assert_eq!(info["file"], "null-co://");
        assert_eq!(info["image"]["virtual-size"], 1u64 << 30);
        assert_eq!(info["cache"]["direct"], false);
        let dup = add(&g, json!({"driver": "null-co", "node-name": n.name()})).await;
        assert!(failure(dup).starts_with("Invalid node-name"));
    }

    #[tokio::test]
    async fn failed_parent_removes_its_inline_children() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 4096]).expect("image");
        let g = NodeGraph::new();
        let err = add(
            &g,
            json!({"driver": "raw", "node-name": "r", "size": 8192,
                   "file": {"driver": "file", "filename": path, "node-name": "f", "locking": "off"}}),
        )
        .await;
        assert_eq!(
            failure(err),
            "The sum of offset (0) and size (8192) has to be smaller or equal to the  actual size of the containing file (4096)"
        );
        assert!(g.all().is_empty(), "inline child left behind");
        // The name is free again. (Locks are off here: other unit tests fork processes,
        // whose copies of our descriptions hold OFD locks until they exec; the conformance
        // suite, which runs serially, checks that closing releases the locks.)
        add(
            &g,
            json!({"driver": "file", "filename": path, "node-name": "f", "locking": "off"}),
        )
        .await
        .expect("reopen");
    }
}
