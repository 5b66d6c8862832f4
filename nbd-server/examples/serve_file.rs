//! Serves one image file over NBD on a unix socket (for manual tests and benchmarks).
//!
//! `cargo run --release -p nbd-server --example serve_file -- IMAGE SOCKET [readonly]`

use block_core::NodeGraph;
use nbd_server::{ExportConfig, NbdServer, ServerConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: serve_file IMAGE SOCKET [readonly]".into());
    }
    let writable = args.get(3).map(String::as_str) != Some("readonly");
    let graph = NodeGraph::new();
    let node = block_core::open::blockdev_add(
        &graph,
        block_core::BlockdevOptions::from_json(
            serde_json::json!({"driver": "file", "filename": args[1], "node-name": "n"}),
        )?,
    )
    .await?;
    let server = NbdServer::new(ServerConfig::default());
    server.add_export(ExportConfig::new("e", node.attach("export 'e'", writable)?))?;
    let _ = std::fs::remove_file(&args[2]);
    let listener = tokio::net::UnixListener::bind(&args[2])?;
    let s = server.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        s.stop();
    });
    server.serve_unix(listener).await;
    Ok(())
}
