//! Shows an image file's bytes as another regular file, until Ctrl-C:
//!
//! ```sh
//! touch /tmp/view.raw
//! cargo run -p fuse-export --example mount_image -- IMAGE /tmp/view.raw [readonly]
//! ```
//!
//! Then `qemu-img info /tmp/view.raw`, `cmp IMAGE /tmp/view.raw` or `dd` in another shell; on
//! Ctrl-C the file is unmounted (which flushes the node). Needs `/dev/fuse` and root (or
//! `fusermount3`).

use block_core::{open, NodeGraph};
use fuse_export::{FuseExport, FuseExportConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [image, mountpoint, rest @ ..] = args.as_slice() else {
        return Err("usage: mount_image IMAGE MOUNTPOINT [readonly]".into());
    };
    let writable = rest.first().map(String::as_str) != Some("readonly");
    let runtime = tokio::runtime::Runtime::new()?;
    let graph = NodeGraph::new();
    let node = runtime.block_on(open::blockdev_add(
        &graph,
        block_core::BlockdevOptions::from_json(
            serde_json::json!({"driver": "file", "node-name": "disk0", "filename": image}),
        )?,
    ))?;
    let config = FuseExportConfig::new(mountpoint).writable(writable);
    let export = FuseExport::mount(
        config,
        node.attach("export 'fuse0'", writable)?,
        runtime.handle().clone(),
    )?;
    println!("{image} is mounted on {mountpoint}; Ctrl-C unmounts it");
    runtime.block_on(tokio::signal::ctrl_c())?;
    export.unmount()?;
    Ok(())
}
