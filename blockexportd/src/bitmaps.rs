//! The `block-dirty-bitmap-*` commands, with QEMU's rules and messages.

use crate::daemon::CmdResult;
use block_core::{DirtyBitmap, NodeGraph};
use qmp_server::QmpError;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// `block-dirty-bitmap-add` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BitmapAdd {
    /// Node name.
    pub node: String,
    /// Bitmap name.
    pub name: String,
    /// Bytes per bit (default 64 KiB).
    pub granularity: Option<u64>,
    /// Store the bitmap in the image.
    pub persistent: Option<bool>,
    /// Create it disabled.
    pub disabled: Option<bool>,
}

/// Arguments naming one bitmap (`-remove`, `-clear`, `-enable`, `-disable`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BitmapName {
    /// Node name.
    pub node: String,
    /// Bitmap name.
    pub name: String,
}

/// A merge source: a bitmap of the target's node, or of any node.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum BitmapSource {
    /// A bitmap of the target's node.
    Local(String),
    /// A bitmap of any node.
    External {
        /// Its node.
        node: String,
        /// Its name.
        name: String,
    },
}

/// `block-dirty-bitmap-merge` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BitmapMerge {
    /// Node of the target.
    pub node: String,
    /// Target bitmap.
    pub target: String,
    /// Sources.
    pub bitmaps: Vec<BitmapSource>,
}

fn generic(msg: impl Into<String>) -> QmpError {
    QmpError::generic(msg)
}

fn find_node(graph: &NodeGraph, node: &str) -> CmdResult<Arc<block_core::Node>> {
    graph.get(node).map_err(crate::errors::graph)
}

fn find(graph: &NodeGraph, node: &str, name: &str) -> CmdResult<Arc<DirtyBitmap>> {
    find_node(graph, node)?
        .bitmap(name)
        .ok_or_else(|| generic(format!("Dirty bitmap '{name}' not found")))
}

fn check_busy(bitmap: &DirtyBitmap) -> CmdResult<()> {
    if bitmap.busy() {
        return Err(generic(format!(
            "Bitmap '{}' is currently in use by another operation and cannot be used",
            bitmap.name()
        )));
    }
    Ok(())
}

/// The longest bitmap name, in bytes (QEMU's `BDRV_BITMAP_MAX_NAME_SIZE`).
const MAX_NAME_LEN: usize = 1023;

/// `block-dirty-bitmap-add`.
pub fn add(graph: &NodeGraph, a: BitmapAdd) -> CmdResult {
    // QEMU's checks, in its order (`block_dirty_bitmap_add`, then the format's
    // `can_store_new_dirty_bitmap` for a persistent one, then `bdrv_create_dirty_bitmap`).
    if a.name.is_empty() {
        return Err(generic("Bitmap name cannot be empty"));
    }
    let node = find_node(graph, &a.node)?;
    let granularity = a
        .granularity
        .unwrap_or(u64::from(block_core::bitmap::DEFAULT_GRANULARITY));
    if !granularity.is_power_of_two() || !(512..=(1 << 31)).contains(&granularity) {
        return Err(generic("Granularity must be power of 2 and at least 512"));
    }
    let exists = || generic(format!("Bitmap already exists: {}", a.name));
    let persistent = a.persistent.unwrap_or(false);
    if persistent {
        if !node.supports_persistent_bitmaps() {
            return Err(generic(format!(
                "Can't store persistent bitmaps to {}: Operation not supported",
                a.node
            )));
        }
        if node.bitmap(&a.name).is_some() {
            return Err(exists());
        }
        if a.name.len() > MAX_NAME_LEN {
            return Err(generic(format!(
                "Can't make bitmap '{}' persistent in '{}': Name length exceeds maximum ({MAX_NAME_LEN} characters)",
                a.name, a.node
            )));
        }
    }
    if node.bitmap(&a.name).is_some() {
        return Err(exists());
    }
    if a.name.len() > MAX_NAME_LEN {
        return Err(generic(format!("Bitmap name too long: {}", a.name)));
    }
    let bitmap = DirtyBitmap::new(&a.name, node.size(), granularity as u32, persistent);
    bitmap.set_enabled(!a.disabled.unwrap_or(false));
    node.add_bitmap(Arc::new(bitmap))
        .map_err(crate::errors::bitmap_exists)?;
    Ok(json!({}))
}

/// `block-dirty-bitmap-remove`.
pub fn remove(graph: &NodeGraph, a: BitmapName) -> CmdResult {
    let bitmap = find(graph, &a.node, &a.name)?;
    check_busy(&bitmap)?;
    find_node(graph, &a.node)?.remove_bitmap(&a.name);
    Ok(json!({}))
}

/// `block-dirty-bitmap-clear`.
pub fn clear(graph: &NodeGraph, a: BitmapName) -> CmdResult {
    let bitmap = find(graph, &a.node, &a.name)?;
    check_busy(&bitmap)?;
    bitmap.clear();
    Ok(json!({}))
}

/// `block-dirty-bitmap-enable` / `-disable`.
pub fn set_enabled(graph: &NodeGraph, a: BitmapName, enabled: bool) -> CmdResult {
    let bitmap = find(graph, &a.node, &a.name)?;
    check_busy(&bitmap)?;
    bitmap.set_enabled(enabled);
    Ok(json!({}))
}

/// `block-dirty-bitmap-merge`.
pub fn merge(graph: &NodeGraph, a: BitmapMerge) -> CmdResult {
    let target = find(graph, &a.node, &a.target)?;
    check_busy(&target)?;
    let mut sources = Vec::new();
    for s in &a.bitmaps {
        let source = match s {
            BitmapSource::Local(name) => find(graph, &a.node, name)?,
            BitmapSource::External { node, name } => find(graph, node, name)?,
        };
        sources.push(source);
    }
    for source in sources {
        if Arc::ptr_eq(&source, &target) {
            continue;
        }
        target.merge_from(&source);
    }
    Ok(json!({}))
}

/// The `dirty-bitmaps` member of a node's `query-named-block-nodes` entry.
pub fn info(node: &block_core::Node) -> Option<Value> {
    let bitmaps = node.bitmaps();
    if bitmaps.is_empty() {
        return None;
    }
    Some(Value::Array(
        bitmaps
            .iter()
            .map(|b| {
                let mut v = json!({
                    "name": b.name(),
                    "recording": b.enabled(),
                    "persistent": b.persistent(),
                    "busy": b.busy(),
                    "granularity": b.granularity(),
                    "count": b.count(),
                });
                if b.inconsistent() {
                    v["inconsistent"] = json!(true);
                }
                v
            })
            .collect(),
    ))
}
