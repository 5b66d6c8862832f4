//! Times 4 KiB requests on a `file` node whose image is in the page cache.
//!
//! ```text
//! cargo run --release -p block-core --example file_bench -- [inline|pool] [read|write] [COUNT] [TASKS]
//! ```
//!
//! `inline` (the default) lets the driver try `RWF_NOWAIT` on the calling task first; `pool`
//! sends every request to the blocking thread pool; `qcow2` runs the requests on a fully
//! allocated qcow2 image (made with `qemu-img`) over an `inline` file node. The runtime has
//! two worker threads.

use block_core::drivers::file::{FileDriver, FileOptions, Locking};
use block_core::{BlockDriver, Node, WriteFlags};
use std::sync::Arc;
use std::time::Instant;

const IMAGE_SIZE: u64 = 256 << 20;
const BLOCK: u64 = 4096;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("inline");
    let op = args.get(1).map(String::as_str).unwrap_or("read");
    let count: u64 = args
        .get(2)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let tasks: u64 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(32);

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench.img");
    // Written through the page cache, so that reads hit it.
    std::fs::write(&path, vec![0x5au8; IMAGE_SIZE as usize])?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let graph = block_core::NodeGraph::new();
        let node = if mode == "qcow2" {
            let qcow2 = dir.path().join("bench.qcow2");
            let status = std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&qcow2)
                .arg(IMAGE_SIZE.to_string())
                .status()?;
            if !status.success() {
                return Err("qemu-img create failed".into());
            }
            let node = block_core::open::blockdev_add(
                &graph,
                serde_json::json!({"driver": "qcow2", "node-name": "bench",
                    "file": {"driver": "file", "filename": qcow2}}),
            )
            .await?;
            let fill = vec![0x5au8; 1 << 20];
            for i in 0..IMAGE_SIZE >> 20 {
                node.write(i << 20, &fill, WriteFlags::default()).await?;
            }
            node
        } else {
            let driver = FileDriver::open(&FileOptions {
                filename: path,
                locking: Locking::Off,
                no_inline: mode == "pool",
                defer_locks: false,
                ..FileOptions::default()
            })?;
            Node::new(
                "bench",
                Arc::new(driver) as Arc<dyn BlockDriver>,
                Vec::new(),
            )
        };
        let start = Instant::now();
        let mut handles = Vec::new();
        for t in 0..tasks {
            let node = Arc::clone(&node);
            let write = op == "write";
            handles.push(tokio::spawn(async move {
                let mut buf = vec![0u8; BLOCK as usize];
                // A simple LCG spreads the offsets over the image.
                let mut x = t.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                for _ in 0..count / tasks {
                    x = x
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    let offset = (x >> 16) % (IMAGE_SIZE / BLOCK) * BLOCK;
                    if write {
                        node.write(offset, &buf, WriteFlags::default()).await?;
                    } else {
                        node.read(offset, &mut buf).await?;
                    }
                }
                Ok::<_, block_core::BlockError>(())
            }));
        }
        for h in handles {
            h.await??;
        }
        let elapsed = start.elapsed();
        let done = count / tasks * tasks;
        println!(
            "{mode} {op}: {done} x 4 KiB in {:.2?}: {:.0} IOPS",
            elapsed,
            done as f64 / elapsed.as_secs_f64()
        );
        for n in graph.drain() {
            n.driver().close().await?;
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
