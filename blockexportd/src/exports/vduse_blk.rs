//! `type: vduse-blk` (QAPI `BlockExportOptionsVduseBlk`): the node as a virtio-blk disk of
//! the host's own kernel, `/dev/vdX`, through VDUSE. Binding the device to the vDPA bus is
//! the administrator's step (`vdpa dev add name NAME mgmtdev vduse`), as with QSD.

use super::{BoxFuture, Export, ExportContext, ExportOptions, ExportType, ShutdownError};
use crate::daemon::CmdResult;
use block_core::{ExportGone, RemoveMode, Submitter};
use qmp_server::QmpError;
use qsd_qapi::{Size, Syntax};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::sync::Arc;
use vduse_blk::{Options, VduseBlk as Device};

/// Requests larger than this start on a thread of the runtime's blocking pool rather than on
/// the queue's thread (as for vhost-user-blk).
const INLINE_LIMIT: usize = 128 * 1024;

/// The vduse-blk export type.
pub struct VduseBlk;

/// The members of `BlockExportOptionsVduseBlk`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct VduseBlkOptions {
    name: String,
    num_queues: Option<u16>,
    queue_size: Option<u16>,
    logical_block_size: Option<Size>,
    serial: Option<String>,
}

impl ExportType for VduseBlk {
    fn name(&self) -> &'static str {
        "vduse-blk"
    }

    fn parse(&self, args: Map<String, Value>, syntax: Syntax) -> CmdResult<Box<dyn ExportOptions>> {
        let o: VduseBlkOptions = qsd_qapi::from_value_in(Value::Object(args), "", syntax)?;
        Ok(Box::new(o))
    }
}

impl ExportOptions for VduseBlkOptions {
    fn start(self: Box<Self>, ctx: ExportContext<'_>) -> BoxFuture<'_, CmdResult<Box<dyn Export>>> {
        Box::pin(async move {
            let mut options = Options::new(&self.name);
            options.num_queues = self.num_queues.unwrap_or(1);
            options.queue_size = self.queue_size.unwrap_or(256);
            options.logical_block_size = self.logical_block_size.map_or(512, |s| s.0);
            // QSD's default serial is the empty string: GET_ID answers it.
            options.serial = Some(self.serial.unwrap_or_default());
            options.writable = ctx.writable;
            options.writethrough = ctx.writethrough;
            options
                .check()
                .map_err(|e| QmpError::generic(e.to_string()))?;
            let runtime = ctx.iothread.unwrap_or_else(|| ctx.runtime.clone());
            let submitter = Submitter::new(ctx.attachment, runtime)
                .with_inline_start(true)
                .with_inline_limit(INLINE_LIMIT);
            // Creating the device waits for the kernel (and, taking a device over, for its
            // queues to start): off the event loop.
            let device = tokio::task::spawn_blocking(move || Device::start(submitter, options))
                .await
                .map_err(|e| QmpError::generic(e.to_string()))?
                .map_err(|e| QmpError::generic(e.to_string()))?;
            Ok(Box::new(Running(Some(Arc::new(device)))) as Box<dyn Export>)
        })
    }
}

/// A running vduse-blk export.
struct Running(Option<Arc<Device>>);

impl Export for Running {
    /// The kernel is the one client, and QSD lets `mode: safe` remove the export while the
    /// device is bound: the device then stays, its I/O waiting for a daemon that exports the
    /// same name again.
    fn has_clients(&self) -> bool {
        false
    }

    fn shutdown(&mut self, _mode: RemoveMode) -> Result<ExportGone, ShutdownError> {
        let Some(device) = self.0.take() else {
            return Ok(ExportGone::done());
        };
        // Stopping joins the queue threads once their requests are done: off the event loop.
        let stopped = tokio::task::spawn_blocking(move || device.stop());
        Ok(ExportGone::new(async move {
            let _ = stopped.await;
        }))
    }
}
