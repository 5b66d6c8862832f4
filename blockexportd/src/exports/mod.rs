//! The export model, QEMU's `BlockExportDriver`: one [`ExportType`] per export type, a
//! [`Registry`] of them, and the [`Export`] each one starts.
//!
//! `block-export-add` goes one way for every type ([`Daemon::block_export_add`]):
//!
//! 1. [`Registry::parse`] finds the type (`type`; the registry refuses types QEMU has and
//!    this daemon does not serve yet), takes the common QAPI base ([`CommonOptions`]: `id`,
//!    `node-name`, `writable`, `writethrough`, `iothread`, `fixed-iothread`,
//!    `allow-inactive`), and lets the type parse the rest of the arguments
//!    ([`ExportType::parse`]). Nothing is checked against the daemon yet, so that syntax
//!    errors come first, as with QEMU's QAPI visitor.
//! 2. The daemon checks what is common, once, in QEMU's order (`blk_exp_add`): the id is well
//!    formed and unused by any export of any type, the node exists, a read-only node is not
//!    exported writable, the iothread exists, the node is activated (or the type supports
//!    inactive exports), and the node is attached as asked (`writable`).
//! 3. The type starts the export from that [`ExportContext`] ([`ExportOptions::start`]).
//!
//! `block-export-del`, `query-block-exports`, `BLOCK_EXPORT_DELETED`, `nbd-server-stop`,
//! `quit` and the signals then handle every running export alike: the daemon keeps what
//! every type has ([`RunningExport`]: type, id, node, iothread, `shutting-down`, creation
//! order) and asks the type's [`Export`] only whether clients are connected and to
//! [`shutdown`](Export::shutdown) in a [`RemoveMode`], which hands back the [`ExportGone`]
//! that resolves when its last request is done. A removal without clients is over before
//! `block-export-del` replies (its event first, as with QSD); one with clients (`mode:
//! hard`) drains in the background. `quit` and `nbd-server-stop` end exports newest first
//! and wait for those already draining.
//!
//! Adding an export type is one module here that implements [`ExportType`] and one line in
//! [`registry`].
//!
//! [`Daemon::block_export_add`]: crate::daemon::Daemon::block_export_add

pub mod fuse;
pub mod nbd;
pub mod vduse_blk;
pub mod vhost_user_blk;

use crate::daemon::CmdResult;
use block_core::{Attachment, ExportGone, NodeGraph, RemoveMode};
use qmp_server::QmpError;
use qsd_qapi::Syntax;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::runtime::Handle;

/// The export types of QEMU's `BlockExportType`, in schema order. A type here that is not
/// registered is refused as not supported by this version; any other is not a QAPI value.
pub const QAPI_TYPES: [&str; 4] = ["nbd", "vhost-user-blk", "fuse", "vduse-blk"];

/// A boxed future, as the object-safe traits here return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An export type: its QAPI name, and how it reads its own options.
pub trait ExportType: Send + Sync {
    /// The QAPI `BlockExportType` value (`nbd`, `fuse`, ...).
    fn name(&self) -> &'static str;

    /// Whether an export of this type may serve an inactive node (`allow-inactive`).
    fn supports_inactive(&self) -> bool {
        false
    }

    /// Parses the type's own members of `block-export-add` (the arguments without the common
    /// base), from QMP or `--export` JSON ([`Syntax::Json`]) or `--export` keyval
    /// ([`Syntax::Keyval`]). Only the syntax is checked here; the daemon's state is looked at
    /// by [`ExportOptions::start`].
    fn parse(&self, args: Map<String, Value>, syntax: Syntax) -> CmdResult<Box<dyn ExportOptions>>;
}

/// A type's parsed options, ready to start an export once the common checks are done.
pub trait ExportOptions: Send {
    /// Checks what only this type knows, then starts the export. Dropping `ctx.attachment`
    /// (on an error) releases the node again.
    fn start(self: Box<Self>, ctx: ExportContext<'_>) -> BoxFuture<'_, CmdResult<Box<dyn Export>>>;
}

/// A running export, as the daemon sees every type.
pub trait Export: Send + Sync {
    /// Whether clients are connected, which `mode: safe` refuses to drop. A removal without
    /// clients finishes before `block-export-del` replies; one with clients drains in the
    /// background, the export showing `shutting-down: true` meanwhile.
    fn has_clients(&self) -> bool;

    /// Starts ending the export; the future resolves when its last request is done and its
    /// attachment is released. Refuses ([`ShutdownError::InUse`]) where `mode` does not allow
    /// the export to go now; the export then runs on. Called at most once.
    fn shutdown(&mut self, mode: RemoveMode) -> Result<ExportGone, ShutdownError>;
}

/// Why an export refused to shut down.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    /// `mode: safe` while clients are connected.
    #[error("export still in use")]
    InUse,
    /// Anything else, with QEMU's message.
    #[error("{0}")]
    Failed(String),
}

/// What a type gets to start an export: the common options, checked.
pub struct ExportContext<'a> {
    /// The export id (well formed, unused).
    pub id: &'a str,
    /// The node, attached as the export asked (`writable`); the attachment's id is allowed
    /// on an inactive node when `allow-inactive` asked for that.
    pub attachment: Attachment,
    /// Clients may write (`writable`).
    pub writable: bool,
    /// Every write is FUA (`writethrough`).
    pub writethrough: bool,
    /// The event loop of the export's iothread (`iothread`), if it names one.
    pub iothread: Option<Handle>,
    /// The daemon's main event loop.
    pub runtime: &'a Handle,
    /// The node graph, to find other nodes the options name.
    pub graph: &'a NodeGraph,
}

/// The base of QAPI `BlockExportOptions`: the members every export type has.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CommonOptions {
    /// Export id.
    pub id: String,
    /// Node to export.
    pub node_name: String,
    /// Refuse to move the node to another iothread. Nodes here have no iothread of their own
    /// to move, so an export always gets the iothread it asks for, as with QSD when nothing
    /// else holds the node in another one.
    pub fixed_iothread: Option<bool>,
    /// Run the export's I/O in this iothread.
    pub iothread: Option<String>,
    /// Allow writes.
    pub writable: Option<bool>,
    /// Every write is FUA.
    pub writethrough: Option<bool>,
    /// Serve the node while it is inactive (QEMU 10); otherwise adding the export activates
    /// it.
    pub allow_inactive: Option<bool>,
}

impl CommonOptions {
    /// The members of the common base, as QAPI spells them (`type` aside).
    const MEMBERS: [&'static str; 7] = [
        "id",
        "node-name",
        "fixed-iothread",
        "iothread",
        "writable",
        "writethrough",
        "allow-inactive",
    ];
}

/// A parsed `block-export-add`: the common base, the type, and the type's own options.
pub struct ExportRequest {
    /// The common members.
    pub common: CommonOptions,
    /// The type (`BlockExportType`).
    pub ty: Arc<dyn ExportType>,
    /// The type's own options.
    pub options: Box<dyn ExportOptions>,
}

/// The export types this daemon serves, by QAPI name.
#[derive(Default)]
pub struct Registry {
    types: BTreeMap<&'static str, Arc<dyn ExportType>>,
}

impl Registry {
    /// Adds an export type. Its name must be one of [`QAPI_TYPES`].
    pub fn register(&mut self, ty: impl ExportType + 'static) {
        debug_assert!(
            QAPI_TYPES.contains(&ty.name()),
            "{} is no QAPI type",
            ty.name()
        );
        self.types.insert(ty.name(), Arc::new(ty));
    }

    /// The type named `name`: refused, with QEMU's messages, when it is no QAPI export type,
    /// and with ours when it is one this daemon does not serve yet.
    pub fn find(&self, name: &str) -> CmdResult<&Arc<dyn ExportType>> {
        if let Some(ty) = self.types.get(name) {
            return Ok(ty);
        }
        Err(QmpError::generic(if QAPI_TYPES.contains(&name) {
            format!("Export type '{name}' is not supported by this version of blockexportd")
        } else {
            format!("Parameter 'type' does not accept value '{name}'")
        }))
    }

    /// Parses `block-export-add` arguments (or `--export`, `keyval`: every scalar a string):
    /// the type, the common base, then the type's own members.
    pub fn parse(&self, mut args: Map<String, Value>, keyval: bool) -> CmdResult<ExportRequest> {
        let name = match args.remove("type") {
            Some(Value::String(t)) => t,
            Some(_) => {
                return Err(QmpError::generic(
                    "Invalid parameter type for 'type', expected: string",
                ))
            }
            None => return Err(QmpError::generic("Parameter 'type' is missing")),
        };
        let ty = Arc::clone(self.find(&name)?);
        let syntax = Syntax::keyval_if(keyval);
        let common: Map<String, Value> = CommonOptions::MEMBERS
            .iter()
            .filter_map(|&m| args.remove_entry(m))
            .collect();
        let common: CommonOptions = qsd_qapi::from_value_in(Value::Object(common), "", syntax)?;
        let options = ty.parse(args, syntax)?;
        Ok(ExportRequest {
            common,
            ty,
            options,
        })
    }
}

/// The registry of every export type this daemon serves: one line per type.
pub fn registry(nbd_server: &nbd::ServerSlot) -> Registry {
    let mut registry = Registry::default();
    registry.register(nbd::Nbd::new(nbd_server.clone()));
    registry.register(fuse::Fuse);
    registry.register(vhost_user_blk::VhostUserBlk);
    registry.register(vduse_blk::VduseBlk);
    registry
}

/// An export the daemon runs: what every type has, and the type's own part.
pub struct RunningExport {
    /// QAPI type name.
    pub type_name: &'static str,
    /// The exported node.
    pub node_name: String,
    /// The iothread its I/O runs in, which `object-del` refuses to end while it runs.
    pub iothread: Option<String>,
    /// Set once a removal started: `query-block-exports` shows `shutting-down`.
    pub shutting_down: bool,
    /// Creation order: QEMU ends exports newest first.
    pub created: u64,
    /// The type's part.
    pub export: Box<dyn Export>,
}

/// The running exports by id, of every type.
#[derive(Default)]
pub struct Exports {
    by_id: BTreeMap<String, RunningExport>,
    created: u64,
}

impl Exports {
    /// The export `id`.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut RunningExport> {
        self.by_id.get_mut(id)
    }

    /// Whether an export of any type has this id.
    pub fn contains(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    /// Adds a started export of type `type_name`, the newest.
    pub fn insert(
        &mut self,
        id: String,
        type_name: &'static str,
        node_name: String,
        iothread: Option<String>,
        export: Box<dyn Export>,
    ) {
        self.created += 1;
        let running = RunningExport {
            type_name,
            node_name,
            iothread,
            shutting_down: false,
            created: self.created,
            export,
        };
        self.by_id.insert(id, running);
    }

    /// Removes the export `id` (once it is gone).
    pub fn remove(&mut self, id: &str) -> Option<RunningExport> {
        self.by_id.remove(id)
    }

    /// Every export, newest first: the order QEMU keeps them in (it adds each at the head
    /// of its list).
    fn by_age(&self) -> Vec<(&String, &RunningExport)> {
        let mut all: Vec<_> = self.by_id.iter().collect();
        all.sort_by_key(|(_, e)| std::cmp::Reverse(e.created));
        all
    }

    /// The ids of the exports `which` selects, newest first.
    pub fn newest_first(&self, which: impl Fn(&RunningExport) -> bool) -> Vec<String> {
        self.by_age()
            .into_iter()
            .filter(|(_, e)| which(e))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The export that runs in iothread `name`, if any.
    pub fn using_iothread(&self, name: &str) -> Option<&str> {
        self.by_id
            .iter()
            .find(|(_, e)| e.iothread.as_deref() == Some(name))
            .map(|(id, _)| id.as_str())
    }

    /// `query-block-exports`: QAPI `BlockExportInfo` of each export, newest first as QEMU
    /// lists them.
    pub fn query(&self) -> Value {
        Value::Array(
            self.by_age()
                .into_iter()
                .map(|(id, e)| {
                    serde_json::json!({
                        "id": id,
                        "type": e.type_name,
                        "node-name": e.node_name,
                        "shutting-down": e.shutting_down,
                    })
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests;
