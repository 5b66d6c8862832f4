//! An image file as a virtio-blk disk of this host's own kernel, until Ctrl-C:
//!
//! ```sh
//! modprobe vduse virtio_vdpa
//! cargo run -p vduse-blk --example host_disk -- IMAGE NAME
//! vdpa dev add name NAME mgmtdev vduse     # /dev/vdX appears
//! vdpa dev del NAME                        # before Ctrl-C, so that the device can go
//! ```
//!
//! Needs root and a kernel with VDUSE (`CONFIG_VDPA_USER`).

use block_core::{open, NodeGraph, Submitter};
use vduse_blk::{Options, VduseBlk};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [image, name] = args.as_slice() else {
        return Err("usage: host_disk IMAGE NAME".into());
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let graph = NodeGraph::new();
    let node = runtime.block_on(open::blockdev_add(
        &graph,
        block_core::BlockdevOptions::from_json(
            serde_json::json!({"driver": "file", "node-name": "disk0", "filename": image}),
        )?,
    ))?;
    let submitter = Submitter::new(node.attach("vduse-blk", true)?, runtime.handle().clone());
    let device = VduseBlk::start(
        submitter,
        Options {
            writable: true,
            ..Options::new(name.as_str())
        },
    )?;
    println!("VDUSE device {name} is ready: vdpa dev add name {name} mgmtdev vduse");
    runtime.block_on(tokio::signal::ctrl_c())?;
    println!("{:?}", device.stop());
    Ok(())
}
