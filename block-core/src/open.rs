//! Building nodes from QAPI `BlockdevOptions` (the JSON of `blockdev-add` and `--blockdev`),
//! and describing them as `query-named-block-nodes` does.
//!
//! Every option is validated before anything is opened: unknown members, wrong types and
//! bad values are refused with QEMU's messages. Children may be given by node name or inline;
//! inline children inherit `read-only`, `auto-read-only`, `discard` and `cache.*` from their
//! parent unless they set them, get generated names when they have none, and are removed
//! again when their parent fails to open. A qcow2 node whose `backing` is omitted opens the
//! backing file named in its header, read-only, relative to the image's directory.

// A build without every driver leaves parts of the option handling unused.
#![cfg_attr(
    not(all(feature = "file", feature = "raw", feature = "qcow2", feature = "null")),
    allow(unused)
)]

use crate::graph::{GraphError, NodeGraph};
use crate::node::{ChildRole, DetectZeroes, Node, NodeConfig};
use crate::qapi::{BlockRef, OptionError, Opts};
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
pub async fn blockdev_add(graph: &NodeGraph, options: Value) -> Result<Arc<Node>, GraphError> {
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
    if cfg!(feature = "null") {
        d.push("null-co");
    }
    if cfg!(feature = "qcow2") {
        d.push("qcow2");
    }
    if cfg!(feature = "raw") {
        d.push("raw");
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

fn parse_common(o: &mut Opts, inh: &Inherited) -> Result<Common, OptionError> {
    let node_name = o.str("node-name")?;
    let discard = o.enumeration("discard", &["ignore", "unmap"])?;
    let (mut direct, mut no_flush) = (None, None);
    if let Some(mut cache) = o.object("cache")? {
        direct = cache.bool("direct")?;
        no_flush = cache.bool("no-flush")?;
        cache.finish()?;
    }
    let read_only = o.bool("read-only")?;
    let auto_read_only = o.bool("auto-read-only")?;
    let force_share = o.bool("force-share")?;
    let active = o.bool("active")?;
    let detect_zeroes = match o.enumeration("detect-zeroes", &["off", "on", "unmap"])? {
        Some("on") => DetectZeroes::On,
        Some("unmap") => DetectZeroes::Unmap,
        _ => DetectZeroes::Off,
    };
    Ok(Common {
        node_name,
        read_only: read_only.unwrap_or(inh.read_only),
        auto_read_only: auto_read_only.unwrap_or(inh.auto_read_only),
        force_share: force_share.unwrap_or(false),
        active: active.unwrap_or(true),
        config: NodeConfig {
            discard_unmap: discard
                .map(|d| d == "unmap")
                .or(inh.discard_unmap)
                .unwrap_or(false),
            detect_zeroes,
            cache_direct: direct.or(inh.direct).unwrap_or(false),
            cache_no_flush: no_flush.or(inh.no_flush).unwrap_or(false),
        },
    })
}

/// The driver-specific part of the options.
#[derive(Debug)]
enum Spec {
    File {
        filename: String,
        locking: &'static str,
        host_device: bool,
    },
    Raw {
        file: BlockRef,
        offset: u64,
        size: Option<u64>,
    },
    Qcow2 {
        file: BlockRef,
        backing: Option<BlockRef>,
    },
    Null {
        size: u64,
        read_zeroes: bool,
        latency_ns: u64,
    },
}

fn required_ref(o: &mut Opts, key: &str) -> Result<BlockRef, OptionError> {
    match o.block_ref(key, false)? {
        Some(r) => Ok(r),
        None => Err(OptionError(format!(
            "Parameter '{}' is missing",
            o.path(key)
        ))),
    }
}

fn parse_spec(driver: &str, o: &mut Opts, common: &Common) -> Result<Spec, OptionError> {
    Ok(match driver {
        "file" | "host_device" => {
            let filename = o.req_str("filename")?;
            if o.str("pr-manager")?.is_some() {
                return Err(OptionError(
                    "pr-manager is not supported by blockexportd".into(),
                ));
            }
            let locking = o.enumeration("locking", &["off", "on", "auto"])?;
            let aio = o.enumeration("aio", &["threads", "native", "io_uring"])?;
            o.uint("aio-max-batch")?;
            o.bool("drop-cache")?;
            o.bool("x-check-cache-dropped")?;
            match aio {
                Some("native") if !common.config.cache_direct => {
                    return Err(OptionError(
                        "aio=native was specified, but it requires cache.direct=on, which was not specified.".into(),
                    ))
                }
                Some("io_uring") => {
                    return Err(OptionError(
                        "aio=io_uring is not supported by blockexportd; use aio=threads".into(),
                    ))
                }
                _ => {}
            }
            Spec::File {
                filename,
                locking: locking.unwrap_or("auto"),
                host_device: driver == "host_device",
            }
        }
        "raw" => {
            let file = required_ref(o, "file")?;
            let offset = o.uint("offset")?.unwrap_or(0);
            let size = o.uint("size")?;
            Spec::Raw { file, offset, size }
        }
        "qcow2" => {
            let file = required_ref(o, "file")?;
            let backing = o.block_ref("backing", true)?;
            for tuning in [
                "lazy-refcounts",
                "pass-discard-request",
                "pass-discard-snapshot",
                "pass-discard-other",
                "discard-no-unref",
            ] {
                o.bool(tuning)?;
            }
            for tuning in [
                "cache-size",
                "l2-cache-size",
                "l2-cache-entry-size",
                "refcount-cache-size",
                "cache-clean-interval",
            ] {
                o.uint(tuning)?;
            }
            o.ignore("overlap-check");
            if o.has("encrypt") {
                return Err(OptionError(
                    "Encrypted qcow2 images are not supported by blockexportd".into(),
                ));
            }
            if o.has("data-file") {
                return Err(OptionError(
                    "qcow2 external data files are not supported by blockexportd".into(),
                ));
            }
            Spec::Qcow2 { file, backing }
        }
        "null-co" => {
            let size = o.uint("size")?.unwrap_or(1 << 30);
            let latency_ns = o.uint("latency-ns")?.unwrap_or(0);
            let read_zeroes = o.bool("read-zeroes")?.unwrap_or(false);
            Spec::Null {
                size,
                read_zeroes,
                latency_ns,
            }
        }
        other => {
            return Err(OptionError(format!(
                "Parameter '{}' does not accept value '{other}'",
                o.path("driver")
            )))
        }
    })
}

/// An error and its causes in one line, as QEMU prints them ("Could not open 'x': No such
/// file or directory").
pub fn error_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let msg = s.to_string();
        let msg = match msg.rfind(" (os error ") {
            Some(i) if msg.ends_with(')') => msg[..i].to_string(),
            _ => msg,
        };
        if !msg.is_empty() && !text.ends_with(&msg) {
            text.push_str(": ");
            text.push_str(&msg);
        }
        source = s.source();
    }
    text
}

fn failed(e: &dyn std::error::Error) -> GraphError {
    GraphError::Failed(error_text(e))
}

impl From<OptionError> for GraphError {
    fn from(e: OptionError) -> Self {
        GraphError::Failed(e.0)
    }
}

type Children = Vec<(ChildRole, Arc<Node>)>;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

fn open_node<'a>(
    graph: &'a NodeGraph,
    options: Value,
    inh: Inherited,
    prefix: String,
    created: &'a mut Vec<String>,
) -> BoxFuture<'a, Result<Arc<Node>, GraphError>> {
    Box::pin(async move {
        let mut o = Opts::new(options, &prefix)?;
        let driver = o.req_str("driver")?;
        if !drivers().contains(&driver.as_str()) {
            return Err(GraphError::Failed(format!(
                "Parameter '{}' does not accept value '{driver}'",
                o.path("driver")
            )));
        }
        let common = parse_common(&mut o, &inh)?;
        let spec = parse_spec(&driver, &mut o, &common)?;
        o.finish()?;
        if let Some(name) = &common.node_name {
            graph.check_new_name(name)?;
        }
        if common.config.detect_zeroes == DetectZeroes::Unmap && !common.config.discard_unmap {
            return Err(GraphError::Failed(
                "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap".into(),
            ));
        }
        if common.force_share && !common.read_only {
            return Err(GraphError::Failed(
                "force-share=on can only be used with read-only images".into(),
            ));
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
                            "on" => Locking::On,
                            "off" => Locking::Off,
                            _ => Locking::Auto,
                        },
                        force_share: common.force_share,
                        host_device,
                        no_inline: false,
                        defer_locks: !common.active || inh.idle,
                    };
                    let drv = tokio::task::spawn_blocking(move || FileDriver::open(&opts))
                        .await
                        .map_err(|e| GraphError::Failed(e.to_string()))?
                        .map_err(|e| failed(&e))?;
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
                    .map_err(|e| failed(&e))?;
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
                            .map_err(|e| failed(&e))?;
                    let backing_inh = Inherited {
                        read_only: true,
                        auto_read_only: false,
                        ..child_inh
                    };
                    let backing_node = match backing {
                        Some(BlockRef::Null) => None,
                        Some(r) => Some(
                            child_node(graph, r, backing_inh, child_prefix("backing"), created)
                                .await?,
                        ),
                        None => match opener.backing_file() {
                            None => None,
                            Some(name) => {
                                let options = implicit_backing(
                                    &name,
                                    opener.backing_format().as_deref(),
                                    opener.base_dir().as_deref(),
                                );
                                let node = open_node(
                                    graph,
                                    options,
                                    backing_inh,
                                    child_prefix("backing"),
                                    created,
                                )
                                .await
                                .map_err(|e| {
                                    GraphError::Failed(format!("Could not open backing file: {e}"))
                                })?;
                                Some(node)
                            }
                        },
                    };
                    let drv = opener
                        .finish(backing_node.clone())
                        .await
                        .map_err(|e| failed(&e))?;
                    let loaded = drv.take_loaded_bitmaps();
                    let mut children = vec![(ChildRole::File, child)];
                    if let Some(b) = backing_node {
                        children.push((ChildRole::Backing, b));
                    }
                    (Arc::new(drv), children, loaded)
                }
                #[allow(unreachable_patterns)]
                _ => {
                    return Err(GraphError::Failed(format!(
                        "Driver '{driver}' is not built into this version of blockexportd"
                    )))
                }
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
            node.driver()
                .set_active(false)
                .await
                .map_err(|e| failed(&e))?;
        }
        for bitmap in loaded_bitmaps {
            node.add_bitmap(Arc::new(bitmap))
                .map_err(|e| GraphError::Failed(e.to_string()))?;
        }
        Ok(node)
    })
}

async fn child_node(
    graph: &NodeGraph,
    r: BlockRef,
    inh: Inherited,
    prefix: String,
    created: &mut Vec<String>,
) -> Result<Arc<Node>, GraphError> {
    match r {
        // QEMU reports a missing child with class GenericError.
        BlockRef::Name(name) => graph
            .get(&name)
            .map_err(|e| GraphError::Failed(e.to_string())),
        BlockRef::Inline(options) => open_node(graph, options, inh, prefix, created).await,
        BlockRef::Null => Err(GraphError::Failed(format!(
            "Invalid parameter type for '{prefix}', expected: BlockdevRef"
        ))),
    }
}

/// The options QEMU would use to open a backing file named in an image header.
fn implicit_backing(name: &str, format: Option<&str>, base_dir: Option<&Path>) -> Value {
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
    if format == "file" {
        file
    } else {
        json!({"driver": format, "file": file})
    }
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

    fn failure(r: Result<Arc<Node>, GraphError>) -> String {
        match r {
            Err(GraphError::Failed(m)) => m,
            Err(e) => panic!("unexpected error kind: {e:?}"),
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
                "Parameter 'size' expects integer",
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
                failure(blockdev_add(&g, options.clone()).await),
                message,
                "{options}"
            );
        }
        assert!(g.all().is_empty());
    }

    #[tokio::test]
    async fn null_defaults_and_info() {
        let g = NodeGraph::new();
        let n = blockdev_add(&g, json!({"driver": "null-co", "read-zeroes": "on"}))
            .await
            .expect("open null-co");
        assert_eq!(n.size(), 1 << 30);
        assert!(n.name().starts_with('#'));
        let info = node_info(&n, false);
        assert_eq!(info["drv"], "null-co");
        assert_eq!(info["file"], "null-co://");
        assert_eq!(info["image"]["virtual-size"], 1u64 << 30);
        assert_eq!(info["cache"]["direct"], false);
        let dup = blockdev_add(&g, json!({"driver": "null-co", "node-name": n.name()})).await;
        assert!(failure(dup).starts_with("Invalid node-name"));
    }

    #[tokio::test]
    async fn failed_parent_removes_its_inline_children() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 4096]).expect("image");
        let g = NodeGraph::new();
        let err = blockdev_add(
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
        blockdev_add(
            &g,
            json!({"driver": "file", "filename": path, "node-name": "f", "locking": "off"}),
        )
        .await
        .expect("reopen");
    }
}
