//! `type: vhost-user-blk` (QAPI `BlockExportOptionsVhostUserBlk`): the node as a VM's
//! virtio-blk disk over a vhost-user socket.

use super::{BoxFuture, Export, ExportContext, ExportOptions, ExportType, ShutdownError};
use crate::daemon::{listener_from_fd, CmdResult, InheritedListener};
use crate::qapi::SocketAddress;
use block_core::{ExportGone, RemoveMode, Submitter};
use qmp_server::QmpError;
use qsd_qapi::{Size, Syntax};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use vhost_user_blk::{Listen, Options, VhostUserBlk as Server};

/// Requests larger than this start on a thread of the runtime's blocking pool rather than on
/// the queue's thread.
const INLINE_LIMIT: usize = 128 * 1024;

/// The serial `GET_ID` answers, QSD's.
const SERIAL: &str = "vhost_user_blk";

/// The vhost-user-blk export type.
pub struct VhostUserBlk;

/// The members of `BlockExportOptionsVhostUserBlk`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct VhostUserBlkOptions {
    addr: SocketAddress,
    logical_block_size: Option<Size>,
    num_queues: Option<u16>,
}

impl ExportType for VhostUserBlk {
    fn name(&self) -> &'static str {
        "vhost-user-blk"
    }

    fn parse(&self, args: Map<String, Value>, syntax: Syntax) -> CmdResult<Box<dyn ExportOptions>> {
        let o: VhostUserBlkOptions = qsd_qapi::from_value_in(Value::Object(args), "", syntax)?;
        Ok(Box::new(o))
    }
}

fn generic(msg: impl Into<String>) -> QmpError {
    QmpError::generic(msg.into())
}

impl ExportOptions for VhostUserBlkOptions {
    fn start(self: Box<Self>, ctx: ExportContext<'_>) -> BoxFuture<'_, CmdResult<Box<dyn Export>>> {
        Box::pin(async move {
            // QEMU's order: the block size, the queue count, then the address.
            let lbs = self.logical_block_size.map_or(512, |s| s.0);
            let mut options = Options::new(Listen::Path(Default::default()));
            // Above u32 it cannot be valid: 0 gets QEMU's message from the check.
            options.logical_block_size = u32::try_from(lbs).unwrap_or(0);
            options.num_queues = self.num_queues.unwrap_or(1);
            options.writable = ctx.writable;
            options.writethrough = ctx.writethrough;
            options.serial = Some(SERIAL.to_string());
            options.check().map_err(generic)?;
            let fd: OwnedFd = match &self.addr {
                SocketAddress::Unix(u) => {
                    if u.abstract_ == Some(true) {
                        return Err(generic("abstract unix sockets are not supported"));
                    }
                    let l = qmp_server::sockets::listen_unix(std::path::Path::new(&u.path))
                        .map_err(|e| generic(e.qemu_message()))?;
                    l.into_std()
                        .map_err(|e| generic(format!("Failed to listen on {}: {e}", u.path)))?
                        .into()
                }
                SocketAddress::Fd(f) => match listener_from_fd(&f.str)? {
                    InheritedListener::Unix(l) => l
                        .into_std()
                        .map_err(|e| generic(format!("fd {}: {e}", f.str)))?
                        .into(),
                    InheritedListener::Tcp(_) => {
                        return Err(generic(
                            "Only socket address types 'unix' and 'fd' are supported",
                        ))
                    }
                },
                SocketAddress::Inet(_) => {
                    return Err(generic(
                        "Only socket address types 'unix' and 'fd' are supported",
                    ))
                }
            };
            options.addr = Listen::Fd(fd);
            // Queue workers submit from their own threads; the requests run in the export's
            // iothread when it names one. A request the driver can finish without blocking
            // (a page-cache read) completes on the queue's thread.
            let runtime = ctx.iothread.unwrap_or_else(|| ctx.runtime.clone());
            // Large requests go to the runtime at once, whose threads copy them side by side
            // (1 MiB reads from one queue: 4.7 GiB/s copied on the queue's thread alone).
            let submitter = Submitter::new(ctx.attachment, runtime)
                .with_inline_start(true)
                .with_inline_limit(INLINE_LIMIT);
            let server = Server::start(submitter, options).map_err(|e| generic(e.to_string()))?;
            Ok(Box::new(Running(Some(Arc::new(server)))) as Box<dyn Export>)
        })
    }
}

/// A running vhost-user-blk export.
struct Running(Option<Arc<Server>>);

impl Export for Running {
    fn has_clients(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.has_client())
    }

    fn shutdown(&mut self, mode: RemoveMode) -> Result<ExportGone, ShutdownError> {
        if mode == RemoveMode::Safe && self.has_clients() {
            return Err(ShutdownError::InUse);
        }
        let Some(server) = self.0.take() else {
            return Ok(ExportGone::done());
        };
        // Stopping joins the queue threads once their requests are done: off the event loop.
        let stopped = tokio::task::spawn_blocking(move || server.stop());
        Ok(ExportGone::new(async move {
            let _ = stopped.await;
        }))
    }
}
