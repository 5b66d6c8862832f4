//! An image over a vhost-user socket: `cargo run -p vhost-user-blk --example serve -- IMAGE
//! SOCKET`, then attach a VM (its memory shared) with `-chardev socket,id=c0,path=SOCKET
//! -device vhost-user-blk-pci,chardev=c0`, or any libblkio program.

use block_core::{open, NodeGraph, Submitter};
use serde_json::json;
use vhost_user_blk::{Listen, Options, VhostUserBlk};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(image), Some(socket)) = (args.next(), args.next()) else {
        return Err("usage: serve IMAGE SOCKET".into());
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let graph = NodeGraph::new();
    let node = runtime.block_on(open::blockdev_add(
        &graph,
        block_core::BlockdevOptions::from_json(
            json!({"driver": "file", "node-name": "disk0", "filename": image}),
        )?,
    ))?;
    let submitter = Submitter::new(node.attach("example", true)?, runtime.handle().clone());
    let server = VhostUserBlk::start(
        submitter,
        Options {
            writable: true,
            ..Options::new(Listen::Path(socket.clone().into()))
        },
    )?;
    println!("serving {image} on {socket}");
    server.wait_closed();
    Ok(())
}
