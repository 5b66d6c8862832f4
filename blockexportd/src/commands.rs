//! The QMP commands of blockexportd, registered on the daemon's QMP server.

use crate::bitmaps;
use crate::daemon::Daemon;
use crate::qapi;
use qmp_server::parse_arguments;
use serde_json::{Map, Value};
use std::sync::Arc;

/// Registers every command the daemon serves.
pub fn register(daemon: &Arc<Daemon>) {
    let qmp = daemon.qmp().clone();
    // As QSD: `quit` ends every export (each BLOCK_EXPORT_DELETED is sent) before it replies.
    let d = Arc::clone(daemon);
    qmp.on_quit(move || {
        let d = Arc::clone(&d);
        async move { d.close_all_exports().await }
    });

    macro_rules! command {
        ($name:expr, |$d:ident, $args:ident| $body:expr) => {{
            let daemon = Arc::clone(daemon);
            qmp.register($name, move |$args: Map<String, Value>| {
                let $d = Arc::clone(&daemon);
                async move { $body }
            });
        }};
    }

    command!("blockdev-add", |d, args| d.blockdev_add(args).await);
    command!("blockdev-del", |d, args| {
        d.blockdev_del(parse_arguments(args)?).await
    });
    command!("blockdev-set-active", |d, args| {
        d.blockdev_set_active(parse_arguments(args)?).await
    });
    command!("query-named-block-nodes", |d, args| {
        d.query_named_block_nodes(parse_arguments(args)?)
    });
    command!("block_resize", |d, args| {
        d.block_resize(parse_arguments(args)?).await
    });
    command!("object-add", |d, args| d.object_add(args, false).await);
    command!("object-del", |d, args| {
        d.object_del(parse_arguments(args)?).await
    });
    command!("nbd-server-start", |d, args| {
        let start: qapi::NbdServerStart = parse_arguments(args)?;
        d.nbd_server_start(start.into()).await
    });
    command!("nbd-server-stop", |d, args| {
        let _: Empty = parse_arguments(args)?;
        d.nbd_server_stop().await
    });
    command!("nbd-server-add", |d, args| {
        d.nbd_server_add(parse_arguments(args)?).await
    });
    command!("nbd-server-remove", |d, args| {
        let a: qapi::NbdServerRemove = parse_arguments(args)?;
        d.nbd_server_remove(&a.name, a.mode.unwrap_or_default())
            .await
    });
    command!("block-export-add", |d, args| {
        d.block_export_add(d.parse_export(args, false)?).await
    });
    command!("block-export-del", |d, args| {
        let a: qapi::BlockExportDel = parse_arguments(args)?;
        d.block_export_del(&a.id, a.mode.unwrap_or_default()).await
    });
    command!("block-dirty-bitmap-add", |d, args| {
        bitmaps::add(d.graph(), parse_arguments(args)?)
    });
    command!("block-dirty-bitmap-remove", |d, args| {
        bitmaps::remove(d.graph(), parse_arguments(args)?)
    });
    command!("block-dirty-bitmap-clear", |d, args| {
        bitmaps::clear(d.graph(), parse_arguments(args)?)
    });
    command!("block-dirty-bitmap-enable", |d, args| {
        bitmaps::set_enabled(d.graph(), parse_arguments(args)?, true)
    });
    command!("block-dirty-bitmap-disable", |d, args| {
        bitmaps::set_enabled(d.graph(), parse_arguments(args)?, false)
    });
    command!("block-dirty-bitmap-merge", |d, args| {
        bitmaps::merge(d.graph(), parse_arguments(args)?)
    });
    command!("qom-list", |d, args| {
        let a: QomList = parse_arguments(args)?;
        d.qom_list(&a.path)
    });
    command!("qom-get", |d, args| {
        let a: QomGet = parse_arguments(args)?;
        d.qom_get(&a.path, &a.property)
    });
    command!("qom-list-types", |_d, args| {
        let a: QomListTypes = parse_arguments(args)?;
        Ok(Value::Array(
            crate::objects::TYPES
                .iter()
                .map(|t| (t.name(), t.parent()))
                .filter(|(name, parent)| {
                    a.implements
                        .as_deref()
                        .is_none_or(|i| i == *name || i == *parent || i == "object")
                })
                .map(|(name, parent)| serde_json::json!({"name": name, "parent": parent}))
                .collect(),
        ))
    });
    command!("query-block-exports", |d, args| {
        let _: Empty = parse_arguments(args)?;
        d.query_block_exports().await
    });
}

/// `qom-list` arguments.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct QomList {
    path: String,
}

/// `qom-get` arguments.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct QomGet {
    path: String,
    property: String,
}

/// `qom-list-types` arguments.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct QomListTypes {
    implements: Option<String>,
    #[serde(rename = "abstract")]
    _abstract: Option<bool>,
}

/// The arguments of a command that takes none.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}
