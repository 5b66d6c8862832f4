//! Writes and write-zeroes on the same fresh qcow2 clusters, all in flight at once.
//!
//! nbdcopy sends a sparse buffer as a write per data run and a write-zeroes per zero run, all
//! at once. When a write allocating a fresh cluster and a write-zeroes covering the rest of
//! that cluster ran together, imago 0.2.6 zero-flagged the whole cluster over the write that
//! had committed in between (its head/tail check was not repeated under the L2 lock). Every
//! way a node reaches that path is tried: `discard=ignore` (the node clears may-unmap),
//! `discard=unmap` with may-unmap off, and `detect-zeroes=on` (a write of zeroes becomes a
//! write-zeroes).

use super::{begin, run, NodeIo};
use block_core::{open, Node, NodeGraph, WriteFlags, ZeroFlags};
use futures::future::join_all;
use serde_json::json;
use std::sync::Arc;

const CLUSTER: u64 = 64 * 1024;
const CLUSTERS: u64 = 192;
const PIECE: u64 = 4096;

#[derive(Debug, Clone, Copy)]
enum Zeroing {
    /// `discard=ignore`: a write-zeroes that may unmap loses may-unmap in the node.
    DiscardIgnore,
    /// `discard=unmap`, a write-zeroes that may not unmap.
    NoUnmap,
    /// `detect-zeroes=on`: a write of a zero buffer.
    DetectZeroes,
}

/// One request of the pattern: data (with its fill byte) or zeroes.
#[derive(Debug, Clone, Copy)]
struct Req {
    offset: u64,
    len: u64,
    fill: Option<u8>,
}

/// Per cluster, one of three shapes: data at the start and zeroes after it; zeroes and data
/// at the end; data in the middle between two zeroed parts.
fn requests() -> Vec<Req> {
    let mut reqs = Vec::new();
    for c in 0..CLUSTERS {
        let base = c * CLUSTER;
        let fill = Some((c % 251) as u8 + 1);
        match c % 3 {
            0 => {
                reqs.push(Req {
                    offset: base,
                    len: PIECE,
                    fill,
                });
                reqs.push(Req {
                    offset: base + PIECE,
                    len: CLUSTER - PIECE,
                    fill: None,
                });
            }
            1 => {
                reqs.push(Req {
                    offset: base,
                    len: CLUSTER - PIECE,
                    fill: None,
                });
                reqs.push(Req {
                    offset: base + CLUSTER - PIECE,
                    len: PIECE,
                    fill,
                });
            }
            _ => {
                let mid = base + CLUSTER / 2;
                reqs.push(Req {
                    offset: base,
                    len: mid - base,
                    fill: None,
                });
                reqs.push(Req {
                    offset: mid,
                    len: PIECE,
                    fill,
                });
                reqs.push(Req {
                    offset: mid + PIECE,
                    len: base + CLUSTER - mid - PIECE,
                    fill: None,
                });
            }
        }
    }
    reqs
}

fn model(reqs: &[Req]) -> Vec<u8> {
    let mut m = vec![0u8; (CLUSTERS * CLUSTER) as usize];
    for r in reqs {
        let range = r.offset as usize..(r.offset + r.len) as usize;
        m[range].fill(r.fill.unwrap_or(0));
    }
    m
}

async fn issue(node: Arc<Node>, r: Req, zeroing: Zeroing) {
    match (r.fill, zeroing) {
        (Some(b), _) => node
            .io()
            .write(r.offset, &vec![b; r.len as usize], WriteFlags::default())
            .await
            .expect("write"),
        (None, Zeroing::DetectZeroes) => node
            .io()
            .write(r.offset, &vec![0; r.len as usize], WriteFlags::default())
            .await
            .expect("write of zeroes"),
        (None, Zeroing::DiscardIgnore) => node
            .io()
            .write_zeroes(
                r.offset,
                r.len,
                ZeroFlags {
                    may_unmap: true,
                    ..ZeroFlags::default()
                },
            )
            .await
            .expect("write-zeroes"),
        (None, Zeroing::NoUnmap) => node
            .io()
            .write_zeroes(r.offset, r.len, ZeroFlags::default())
            .await
            .expect("write-zeroes"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_and_zeroes_on_fresh_clusters_at_once() {
    let Some(_serial) = begin().await else {
        return;
    };
    let reqs = requests();
    let expected = model(&reqs);
    for zeroing in [
        Zeroing::DiscardIgnore,
        Zeroing::NoUnmap,
        Zeroing::DetectZeroes,
    ] {
        for round in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let image = dir.path().join("q.qcow2").to_string_lossy().into_owned();
            let size = (CLUSTERS * CLUSTER).to_string();
            run("qemu-img", &["create", "-q", "-f", "qcow2", &image, &size]);
            let (discard, detect) = match zeroing {
                Zeroing::DiscardIgnore => ("ignore", "off"),
                Zeroing::NoUnmap => ("unmap", "off"),
                Zeroing::DetectZeroes => ("ignore", "on"),
            };
            let graph = NodeGraph::new();
            let node = open::blockdev_add(
                &graph,
                block_core::BlockdevOptions::from_json(
                    json!({"driver": "qcow2", "node-name": "top", "discard": discard,
                       "detect-zeroes": detect,
                       "file": {"driver": "file", "filename": image}}),
                )
                .expect("options"),
            )
            .await
            .expect("open qcow2");
            // Every request in flight at once, in an order that mixes shapes.
            let mut order: Vec<Req> = reqs.clone();
            order.reverse();
            join_all(
                order
                    .iter()
                    .map(|&r| tokio::spawn(issue(Arc::clone(&node), r, zeroing))),
            )
            .await
            .into_iter()
            .for_each(|r| r.expect("request task"));
            let mut back = vec![0xffu8; expected.len()];
            node.io().read(0, &mut back).await.expect("read back");
            let lost = (0..CLUSTERS as usize)
                .filter(|&c| {
                    let r = c * CLUSTER as usize..(c + 1) * CLUSTER as usize;
                    back[r.clone()] != expected[r]
                })
                .count();
            assert_eq!(
                lost, 0,
                "{zeroing:?}, round {round}: {lost} of {CLUSTERS} clusters read back wrong"
            );
            drop(node);
            for n in graph.drain() {
                n.close().await.expect("close");
            }
            let reference = dir.path().join("ref.raw");
            std::fs::write(&reference, &expected).expect("reference");
            run(
                "qemu-img",
                &[
                    "compare",
                    "-q",
                    "-f",
                    "raw",
                    &reference.to_string_lossy(),
                    "-F",
                    "qcow2",
                    &image,
                ],
            );
            run("qemu-img", &["check", "-q", &image]);
        }
    }
}
