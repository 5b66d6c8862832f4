//! `type: nbd` (QAPI `BlockExportOptionsNbd`): an export of the daemon's NBD server.

use super::{BoxFuture, Export, ExportContext, ExportOptions, ExportType, ShutdownError};
use crate::daemon::{find_node, CmdResult};
use crate::qapi::BlockDirtyBitmapOrStr;
use block_core::{DirtyBitmap, ExportGone, Node, NodeGraph, RemoveMode};
use nbd_server::{NbdError, NbdServer};
use qmp_server::QmpError;
use qsd_qapi::Syntax;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::sync::{Arc, Mutex};

/// The QAPI name of the type.
pub const TYPE_NAME: &str = "nbd";

/// The NBD server while it runs (`nbd-server-start` to `nbd-server-stop`), shared by the
/// daemon, which starts and stops it, and the export type, which adds exports to it.
pub type ServerSlot = Arc<Mutex<Option<NbdServer>>>;

/// The NBD export type.
pub struct Nbd {
    server: ServerSlot,
}

impl Nbd {
    /// The type, adding its exports to the server in `server` when one runs.
    pub fn new(server: ServerSlot) -> Self {
        Nbd { server }
    }
}

/// The members of `BlockExportOptionsNbd` (the common base aside).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct NbdOptions {
    /// Export name (default: the node name).
    name: Option<String>,
    /// Free-form description.
    description: Option<String>,
    /// Dirty bitmaps to export.
    bitmaps: Option<Vec<BlockDirtyBitmapOrStr>>,
    /// Export the `qemu:allocation-depth` context.
    allocation_depth: Option<bool>,
}

impl ExportType for Nbd {
    fn name(&self) -> &'static str {
        TYPE_NAME
    }

    fn supports_inactive(&self) -> bool {
        true
    }

    fn parse(&self, args: Map<String, Value>, syntax: Syntax) -> CmdResult<Box<dyn ExportOptions>> {
        let options: NbdOptions = qsd_qapi::from_value_in(Value::Object(args), "", syntax)?;
        Ok(Box::new(Start {
            options,
            server: Arc::clone(&self.server),
        }))
    }
}

struct Start {
    options: NbdOptions,
    server: ServerSlot,
}

impl ExportOptions for Start {
    fn start(self: Box<Self>, ctx: ExportContext<'_>) -> BoxFuture<'_, CmdResult<Box<dyn Export>>> {
        Box::pin(async move {
            let server = self
                .server
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .ok_or_else(|| QmpError::generic("NBD server not running"))?;
            let o = self.options;
            let node = Arc::clone(ctx.attachment.node());
            let name = o.name.unwrap_or_else(|| node.name().to_string());
            let bitmaps = o
                .bitmaps
                .iter()
                .flatten()
                .map(|b| export_bitmap(ctx.graph, &node, b))
                .collect::<CmdResult<Vec<_>>>()?;
            let mut config = nbd_server::ExportConfig::new(name.clone(), ctx.attachment);
            config.description = o.description;
            config.writethrough = ctx.writethrough;
            config.bitmaps = bitmaps;
            config.allocation_depth = o.allocation_depth.unwrap_or(false);
            // As QEMU: the listener and the handshake stay on the main loop; a client that
            // picked this export moves to its iothread, where all of its requests run.
            config.runtime = ctx.iothread;
            // The server checks, as QEMU does, that each bitmap may be exported (not busy,
            // not inconsistent, not recording on a read-only export) and marks them busy.
            server
                .add_export(config)
                .map_err(|e| QmpError::generic(e.to_string()))?;
            Ok(Box::new(NbdExport { server, name }) as Box<dyn Export>)
        })
    }
}

/// Finds a bitmap named by an export: by name on the exported node or down its chain of
/// children (as QEMU looks through filters and backing files), or on a named node.
fn export_bitmap(
    graph: &NodeGraph,
    node: &Arc<Node>,
    bitmap: &BlockDirtyBitmapOrStr,
) -> CmdResult<Arc<DirtyBitmap>> {
    let not_found = |name: &str| QmpError::generic(format!("Bitmap '{name}' is not found"));
    match bitmap {
        BlockDirtyBitmapOrStr::Name(name) => {
            let mut layer = Some(Arc::clone(node));
            while let Some(n) = layer {
                if let Some(b) = n.bitmap(name) {
                    return Ok(b);
                }
                layer = n
                    .child(block_core::ChildRole::Backing)
                    .or_else(|| n.child(block_core::ChildRole::File))
                    .cloned();
            }
            Err(not_found(name))
        }
        BlockDirtyBitmapOrStr::Qualified { node, name } => find_node(graph, node)?
            .bitmap(name)
            .ok_or_else(|| not_found(name)),
    }
}

/// A running NBD export: its name on the server.
struct NbdExport {
    server: NbdServer,
    name: String,
}

impl Export for NbdExport {
    fn has_clients(&self) -> bool {
        self.server.client_count(&self.name) > 0
    }

    fn shutdown(&mut self, mode: RemoveMode) -> Result<ExportGone, ShutdownError> {
        self.server
            .remove_export(&self.name, mode)
            .map_err(|e| match e {
                NbdError::InUse(_) => ShutdownError::InUse,
                e => ShutdownError::Failed(e.to_string()),
            })
    }
}
