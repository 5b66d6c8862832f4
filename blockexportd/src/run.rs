//! Running the daemon: startup in command-line order, the main loop, and shutdown.

use crate::cli::{Item, ItemKind, QuickExport, RunOptions};
use crate::daemon::Daemon;
use crate::qapi;
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

/// An error that ends startup; printed as `blockexportd: MESSAGE`, QSD's text.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A command-line option was refused: `--blockdev driver=file: Parameter 'filename' is
    /// missing` (QSD names the option and its text before the error).
    #[error("{option} {text}: {}", error.desc)]
    Option {
        /// The option (`--blockdev`).
        option: &'static str,
        /// Its argument as given.
        text: String,
        /// Why it was refused.
        error: qmp_server::QmpError,
    },
    /// The short form's image cannot be read (QEMU's text names the file, then the cause).
    #[error("Could not open '{image}': {source}")]
    Image {
        /// The image as given.
        image: String,
        /// Why it cannot be read.
        source: std::io::Error,
    },
    /// The short form's node, server or export was refused.
    #[error("{}", .0.desc)]
    QuickExport(qmp_server::QmpError),
}

/// The version the daemon reports over QMP: the QEMU release whose interface it follows.
pub fn qmp_version() -> qmp_server::VersionInfo {
    qmp_server::VersionInfo {
        major: 10,
        minor: 0,
        micro: 0,
        package: format!("blockexportd {}", env!("CARGO_PKG_VERSION")),
    }
}

/// Applies one command-line option.
async fn apply(daemon: &Arc<Daemon>, item: &Item) -> Result<(), qmp_server::QmpError> {
    let args = item.args.clone();
    let result = match item.kind {
        ItemKind::Blockdev => daemon.blockdev_add_in(args, item.keyval).await,
        ItemKind::Object => daemon.object_add(args, item.keyval).await,
        ItemKind::Chardev => daemon.chardev_add(args).await,
        ItemKind::Monitor => daemon.monitor_add(args, item.keyval).await,
        ItemKind::NbdServer => {
            let syntax = qsd_qapi::Syntax::keyval_if(item.keyval);
            match qsd_qapi::from_value_in::<qapi::NbdServerOptions>(Value::Object(args), "", syntax)
            {
                Ok(opts) => daemon.nbd_server_start(opts).await,
                Err(e) => Err(e.into()),
            }
        }
        ItemKind::Export => match daemon.parse_export(args, item.keyval) {
            Ok(opts) => daemon.block_export_add(opts).await,
            Err(e) => Err(e),
        },
    };
    result.map(|_| ())
}

/// Builds everything the command line asks for, in order. On error, the message names the
/// option as QSD does (`--blockdev driver=file: Parameter 'filename' is missing`).
pub async fn startup(daemon: &Arc<Daemon>, opts: &RunOptions) -> Result<(), StartupError> {
    for item in &opts.items {
        apply(daemon, item)
            .await
            .map_err(|error| StartupError::Option {
                option: item.kind.option(),
                text: item.text.clone(),
                error,
            })?;
    }
    if let Some(quick) = &opts.quick {
        quick_export(daemon, quick).await?;
    }
    Ok(())
}

/// Whether the image starts with the qcow2 magic.
fn is_qcow2(path: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path)?;
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == b"QFI\xfb"),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// The short form: probe the image, export it over NBD and print the URI.
async fn quick_export(daemon: &Arc<Daemon>, q: &QuickExport) -> Result<(), StartupError> {
    let err = StartupError::QuickExport;
    let image = q.image.to_string_lossy().to_string();
    let qcow2 = is_qcow2(&q.image).map_err(|source| StartupError::Image {
        image: image.clone(),
        source,
    })?;
    let read_only = !q.writable;
    let file =
        json!({"driver": "file", "filename": image, "node-name": "file0", "read-only": read_only});
    let mut node = "file0";
    daemon.blockdev_add(object(file)).await.map_err(err)?;
    if qcow2 {
        let fmt = json!({"driver": "qcow2", "file": "file0", "node-name": "disk0", "read-only": read_only});
        daemon.blockdev_add(object(fmt)).await.map_err(err)?;
        node = "disk0";
    }
    let kind = if qcow2 { "qcow2" } else { "raw" };
    let access = if q.writable { "writable" } else { "read-only" };
    if let Some(path) = &q.vhost_user_blk {
        let export = object(json!({
            "type": "vhost-user-blk", "id": "export0", "node-name": node, "writable": q.writable,
            "addr": {"type": "unix", "path": path.to_string_lossy()},
        }));
        daemon
            .block_export_add(daemon.parse_export(export, false).map_err(err)?)
            .await
            .map_err(err)?;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "Exporting {image} ({kind}, {access}) over vhost-user-blk at {path}; attach it to a \
             QEMU guest (whose memory must be shared) with:\n  \
             -object memory-backend-memfd,id=mem0,size=<guest RAM>,share=on -numa node,memdev=mem0\n  \
             -chardev socket,id=vub0,path={path} -device vhost-user-blk-pci,chardev=vub0",
            path = path.display()
        );
        let _ = out.flush();
        return Ok(());
    }
    let addr = match &q.socket {
        Some(path) => json!({"type": "unix", "path": path.to_string_lossy()}),
        None => json!({"type": "inet", "host": "127.0.0.1", "port": q.port.to_string()}),
    };
    let server: qapi::NbdServerOptions =
        qmp_server::parse_arguments(object(json!({ "addr": addr }))).map_err(err)?;
    daemon.nbd_server_start(server).await.map_err(err)?;
    let export = object(json!({
        "type": "nbd", "id": "export0", "node-name": node, "name": "", "writable": q.writable,
    }));
    daemon
        .block_export_add(daemon.parse_export(export, false).map_err(err)?)
        .await
        .map_err(err)?;
    let uri = match &q.socket {
        Some(path) => format!("nbd+unix:///?socket={}", path.display()),
        None => format!("nbd://127.0.0.1:{}", q.port),
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "Exporting {image} ({kind}, {access}) at {uri}");
    let _ = out.flush();
    Ok(())
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Waits for `quit`, SIGINT or SIGTERM.
pub async fn wait_for_shutdown(daemon: &Arc<Daemon>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    let mut hup = signal(SignalKind::hangup()).ok();
    tokio::select! {
        _ = daemon.qmp().quit_requested() => {}
        Some(_) = async { term.as_mut()?.recv().await } => {}
        Some(_) = async { int.as_mut()?.recv().await } => {}
        Some(_) = async { hup.as_mut()?.recv().await } => {}
    }
}
