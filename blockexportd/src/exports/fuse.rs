//! `type: fuse` (QAPI `BlockExportOptionsFuse`): the node as a regular file.

use super::{BoxFuture, Export, ExportContext, ExportOptions, ExportType, ShutdownError};
use crate::daemon::CmdResult;
use block_core::{ExportGone, RemoveMode};
use fuse_export::{AllowOther, FuseExport, FuseExportConfig};
use qmp_server::QmpError;
use qsd_qapi::Syntax;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::PathBuf;

/// The FUSE export type.
pub struct Fuse;

/// The members of `BlockExportOptionsFuse` (the common base aside).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct FuseOptions {
    /// The regular file to mount on.
    mountpoint: String,
    /// Writes past the end grow the node.
    growable: Option<bool>,
    /// `on`, `off` or `auto`.
    allow_other: Option<String>,
}

impl ExportType for Fuse {
    fn name(&self) -> &'static str {
        "fuse"
    }

    fn parse(&self, args: Map<String, Value>, syntax: Syntax) -> CmdResult<Box<dyn ExportOptions>> {
        let o: FuseOptions = qsd_qapi::from_value_in(Value::Object(args), "", syntax)?;
        let allow_other = match o.allow_other.as_deref() {
            None => AllowOther::Auto,
            Some(v) => AllowOther::from_qapi(v).ok_or_else(|| {
                QmpError::generic(format!(
                    "Parameter 'allow-other' does not accept value '{v}'"
                ))
            })?,
        };
        Ok(Box::new(Start {
            mountpoint: PathBuf::from(o.mountpoint),
            growable: o.growable.unwrap_or(false),
            allow_other,
        }))
    }
}

struct Start {
    mountpoint: PathBuf,
    growable: bool,
    allow_other: AllowOther,
}

impl ExportOptions for Start {
    fn start(self: Box<Self>, ctx: ExportContext<'_>) -> BoxFuture<'_, CmdResult<Box<dyn Export>>> {
        Box::pin(async move {
            let config = FuseExportConfig::new(self.mountpoint)
                .growable(self.growable)
                .writable(ctx.writable)
                .writethrough(ctx.writethrough)
                .allow_other(self.allow_other);
            // The export's requests run in its iothread's event loop when it names one.
            let runtime = ctx.iothread.unwrap_or_else(|| ctx.runtime.clone());
            let attachment = ctx.attachment;
            let export =
                tokio::task::spawn_blocking(move || FuseExport::mount(config, attachment, runtime))
                    .await
                    .map_err(|e| QmpError::generic(format!("FUSE mount failed: {e}")))?
                    .map_err(|e| QmpError::generic(e.to_string()))?;
            Ok(Box::new(Mounted(Some(export))) as Box<dyn Export>)
        })
    }
}

/// A mounted FUSE export, until it is removed.
struct Mounted(Option<FuseExport>);

impl Export for Mounted {
    /// A process holding the file open is no client: QSD removes a FUSE export in `safe`
    /// mode even then.
    fn has_clients(&self) -> bool {
        false
    }

    fn shutdown(&mut self, mode: RemoveMode) -> Result<ExportGone, ShutdownError> {
        Ok(match self.0.take() {
            Some(export) => export.remove(mode),
            None => ExportGone::done(),
        })
    }
}
