//! A randomised differential test: long random sequences of writes, write-zeroes (with and
//! without may-unmap and fast), discards, flushes, resizes and reads, many in flight at once,
//! on every driver stack under every `discard` and `detect-zeroes` setting, checked against
//! an in-memory model, and the image at the end with `qemu-img compare` and `qemu-img check`.
//!
//! Requests in flight together share clusters but never bytes (requests on the same bytes
//! have no defined order). A discarded byte reads as before or as zero (discard may do
//! nothing, and qcow2 discards whole clusters only), and so does a byte of a fast zero that
//! failed; the first read settles which.
//!
//! The seed is printed and every failure names it. Replay or soak:
//! `RANDOM_OPS_SEED=N RANDOM_OPS_BATCHES=5000 cargo test -p block-core --test conformance random`.

use super::{begin, run, NodeIo};
use block_core::{open, BlockError, Node, NodeGraph, WriteFlags, ZeroFlags};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;

/// The image size: not a multiple of 4 KiB, so that the last cluster is short.
const SIZE: u64 = (4 << 20) - 3584;

use test_support::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stack {
    /// `raw` over `file`.
    Raw,
    /// `qcow2` over `file`, with this cluster size.
    Qcow2(u64),
    /// `qcow2` (64 KiB clusters) over a backing `qcow2` holding data.
    Qcow2Backing,
    /// `raw` over `file` with `cache.direct=on` (`O_DIRECT`, bounce buffers).
    RawDirect,
    /// `qcow2` (64 KiB clusters) over `file` with `cache.direct=on`.
    Qcow2Direct,
}

impl Stack {
    /// The unit requests cluster around.
    fn unit(self) -> u64 {
        match self {
            Stack::Raw | Stack::RawDirect => 4096,
            Stack::Qcow2(c) => c,
            Stack::Qcow2Backing | Stack::Qcow2Direct => 65536,
        }
    }
}

/// What the image holds, as far as the test knows.
struct Model {
    data: Vec<u8>,
    /// Discarded bytes: they read as `data` or as zero.
    maybe_zero: Vec<bool>,
}

impl Model {
    fn set(&mut self, offset: u64, bytes: &[u8]) {
        let r = offset as usize..offset as usize + bytes.len();
        self.data[r.clone()].copy_from_slice(bytes);
        self.maybe_zero[r].fill(false);
    }

    fn zero(&mut self, offset: u64, len: u64) {
        let r = offset as usize..(offset + len) as usize;
        self.data[r.clone()].fill(0);
        self.maybe_zero[r].fill(false);
    }

    fn discard(&mut self, offset: u64, len: u64) {
        let r = offset as usize..(offset + len) as usize;
        self.maybe_zero[r].fill(true);
    }

    fn resize(&mut self, size: u64) {
        self.data.resize(size as usize, 0);
        self.maybe_zero.resize(size as usize, false);
    }

    /// Checks what a read at `offset` returned, and settles discarded bytes. Returns the
    /// first offset that is wrong, if any.
    fn check(&mut self, offset: u64, got: &[u8]) -> Option<(u64, u8, u8)> {
        for (i, &b) in got.iter().enumerate() {
            let at = offset as usize + i;
            let want = self.data[at];
            if b == want || (self.maybe_zero[at] && b == 0) {
                self.data[at] = b;
                self.maybe_zero[at] = false;
            } else {
                return Some((at as u64, b, want));
            }
        }
        None
    }
}

#[derive(Debug, Clone)]
enum Op {
    Read {
        offset: u64,
        len: u64,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    Zero {
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    Flush,
}

/// What an op returned.
enum Done {
    Read(Vec<u8>),
    Ok,
    NotFast,
}

async fn execute(node: Arc<Node>, op: Op) -> Result<Done, BlockError> {
    match op {
        Op::Read { offset, len } => {
            let mut buf = vec![0x5cu8; len as usize];
            node.io().read(offset, &mut buf).await?;
            Ok(Done::Read(buf))
        }
        Op::Write { offset, data, fua } => {
            node.io().write(offset, &data, WriteFlags { fua }).await?;
            Ok(Done::Ok)
        }
        Op::Zero { offset, len, flags } => match node.io().write_zeroes(offset, len, flags).await {
            Err(BlockError::NotFast) if flags.fast => Ok(Done::NotFast),
            r => r.map(|()| Done::Ok),
        },
        Op::Discard { offset, len } => node.io().discard(offset, len).await.map(|()| Done::Ok),
        Op::Flush => node.io().flush().await.map(|()| Done::Ok),
    }
}

/// A cut point inside a window: at any byte, or on a 512-byte, 4 KiB or unit boundary.
fn cut(rng: &mut Rng, start: u64, end: u64, unit: u64) -> u64 {
    let align = match rng.below(4) {
        0 => 1,
        1 => 512,
        2 => 4096.min(unit),
        _ => unit,
    };
    let at = start + rng.below(end - start + 1);
    (at - (at - start) % align).clamp(start, end)
}

/// One batch: disjoint requests over a window of a few units (so that they share clusters),
/// now and then at the end of the image, maybe with a flush.
fn batch(rng: &mut Rng, size: u64, unit: u64) -> Vec<Op> {
    let units = 1 + rng.below(8);
    let span = (units * unit).min(size);
    let start = if rng.chance(1, 8) {
        size - span
    } else {
        rng.below((size - span) / unit + 1) * unit
    };
    let end = start + span;
    let pieces = 1 + rng.below(24);
    let mut cuts: Vec<u64> = (0..pieces).map(|_| cut(rng, start, end, unit)).collect();
    cuts.push(start);
    cuts.push(end);
    cuts.sort_unstable();
    cuts.dedup();
    let mut ops = Vec::new();
    for w in cuts.windows(2) {
        let (offset, len) = (w[0], w[1] - w[0]);
        let op = match rng.below(20) {
            0..=6 => {
                let data = if rng.chance(1, 4) {
                    vec![0; len as usize]
                } else {
                    rng.bytes(len as usize)
                };
                Op::Write {
                    offset,
                    data,
                    fua: rng.chance(1, 8),
                }
            }
            7..=11 => Op::Zero {
                offset,
                len,
                flags: ZeroFlags {
                    fua: rng.chance(1, 8),
                    may_unmap: rng.chance(1, 2),
                    fast: rng.chance(1, 4),
                },
            },
            12..=15 => Op::Read { offset, len },
            16..=17 => Op::Discard { offset, len },
            _ => continue,
        };
        ops.push(op);
    }
    if rng.chance(1, 10) {
        ops.push(Op::Flush);
    }
    ops
}

/// Makes the images of `stack` in `dir`; returns the top image's path and the model of what
/// it holds.
fn create(stack: Stack, dir: &Path) -> (String, Model) {
    let size = SIZE.to_string();
    let mut model = Model {
        data: vec![0; SIZE as usize],
        maybe_zero: vec![false; SIZE as usize],
    };
    let top = match stack {
        Stack::Raw | Stack::RawDirect => {
            let top = dir.join("top.raw").to_string_lossy().into_owned();
            run("qemu-img", &["create", "-q", "-f", "raw", &top, &size]);
            top
        }
        Stack::Qcow2(_) | Stack::Qcow2Direct => {
            let top = dir.join("top.qcow2").to_string_lossy().into_owned();
            let opts = format!("cluster_size={}", stack.unit());
            run(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "-o", &opts, &top, &size],
            );
            top
        }
        Stack::Qcow2Backing => {
            let base = dir.join("base.qcow2").to_string_lossy().into_owned();
            run("qemu-img", &["create", "-q", "-f", "qcow2", &base, &size]);
            // Data in the backing file, with its edges off cluster boundaries.
            run(
                "qemu-io",
                &[
                    "-f",
                    "qcow2",
                    "-c",
                    "write -P 0x11 4096 1M",
                    "-c",
                    "write -P 0x22 2M 1028096",
                    &base,
                ],
            );
            model.data[4096..4096 + (1 << 20)].fill(0x11);
            model.data[2 << 20..(2 << 20) + 1_028_096].fill(0x22);
            let top = dir.join("top.qcow2").to_string_lossy().into_owned();
            run(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    "base.qcow2",
                    "-F",
                    "qcow2",
                    &top,
                    &size,
                ],
            );
            top
        }
    };
    (top, model)
}

fn options(stack: Stack, top: &str, discard: &str, detect: &str) -> Value {
    let mut file = json!({"driver": "file", "filename": top});
    if matches!(stack, Stack::RawDirect | Stack::Qcow2Direct) {
        file["cache"] = json!({"direct": true});
    }
    let mut v = match stack {
        Stack::Raw | Stack::RawDirect => json!({"driver": "raw", "file": file}),
        _ => json!({"driver": "qcow2", "file": file}),
    };
    let o = v.as_object_mut().expect("object");
    o.insert("node-name".into(), json!("top"));
    o.insert("discard".into(), json!(discard));
    o.insert("detect-zeroes".into(), json!(detect));
    v
}

/// Runs `batches` random batches on one stack and setting, then checks the image file.
async fn run_one(stack: Stack, discard: &str, detect: &str, seed: u64, index: u64, batches: u64) {
    let what = format!(
        "{stack:?} discard={discard} detect-zeroes={detect} (RANDOM_OPS_SEED={seed}, \
         run {index})"
    );
    // Each run has a seed of its own, derived from the printed one.
    let mut rng = Rng::new(seed.wrapping_add(index.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    let dir = tempfile::tempdir().expect("tempdir");
    let (top, mut model) = create(stack, dir.path());
    let graph = NodeGraph::new();
    let node = open::blockdev_add(
        &graph,
        block_core::BlockdevOptions::from_json(options(stack, &top, discard, detect))
            .expect("options"),
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: open: {e}"));
    let unit = stack.unit();
    // `RANDOM_OPS_TRACE=1` prints every batch, to follow a replayed failure.
    let trace = std::env::var_os("RANDOM_OPS_TRACE").is_some();
    for b in 0..batches {
        if rng.chance(1, 40) {
            // Grow or shrink by up to a quarter, in whole sectors.
            let size = node.size();
            let delta = rng.below(size / 4) / 512 * 512;
            let new_size = if rng.chance(1, 2) || size - delta < 8 * unit {
                size + delta
            } else {
                size - delta
            };
            node.resize(new_size)
                .await
                .unwrap_or_else(|e| panic!("{what}: batch {b}: resize to {new_size}: {e}"));
            assert_eq!(
                node.size(),
                new_size,
                "{what}: batch {b}: size after resize"
            );
            model.resize(new_size);
            if trace {
                eprintln!("batch {b}: resize to {new_size}");
            }
            continue;
        }
        let ops = batch(&mut rng, node.size(), unit);
        if trace {
            for op in &ops {
                match op {
                    Op::Write { offset, data, fua } => eprintln!(
                        "batch {b}: write {offset}+{} fua={fua} zero={}",
                        data.len(),
                        data.iter().all(|&x| x == 0)
                    ),
                    op => eprintln!("batch {b}: {op:?}"),
                }
            }
        }
        let tasks: Vec<_> = ops
            .iter()
            .cloned()
            .map(|op| tokio::spawn(execute(Arc::clone(&node), op)))
            .collect();
        let mut results = Vec::with_capacity(tasks.len());
        for t in tasks {
            results.push(t.await.expect("request task"));
        }
        for (op, result) in ops.iter().zip(results) {
            let done = result.unwrap_or_else(|e| panic!("{what}: batch {b}: {op:?}: {e}"));
            match (op, done) {
                (Op::Read { offset, .. }, Done::Read(got)) => {
                    if let Some((at, got, want)) = model.check(*offset, &got) {
                        panic!(
                            "{what}: batch {b}: read at {offset}: byte {at} is {got:#04x}, \
                             expected {want:#04x}"
                        );
                    }
                }
                (Op::Write { offset, data, .. }, Done::Ok) => model.set(*offset, data),
                (Op::Zero { offset, len, .. }, Done::Ok) => model.zero(*offset, *len),
                // A fast zero that failed may have zeroed part of the range (QEMU's does).
                (Op::Zero { offset, len, .. }, Done::NotFast) => model.discard(*offset, *len),
                (Op::Discard { offset, len }, Done::Ok) => model.discard(*offset, *len),
                (Op::Flush, Done::Ok) => {}
                (op, _) => panic!("{what}: batch {b}: {op:?}: unexpected completion"),
            }
        }
    }
    // Read everything back (settling the discarded bytes), then compare the file itself.
    let size = node.size();
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(1 << 20);
        let mut buf = vec![0u8; len as usize];
        node.io()
            .read(offset, &mut buf)
            .await
            .unwrap_or_else(|e| panic!("{what}: final read: {e}"));
        if let Some((at, got, want)) = model.check(offset, &buf) {
            panic!("{what}: final read: byte {at} is {got:#04x}, expected {want:#04x}");
        }
        offset += len;
    }
    drop(node);
    for n in graph.drain() {
        n.close()
            .await
            .unwrap_or_else(|e| panic!("{what}: close: {e}"));
    }
    let reference = dir.path().join("model.raw");
    std::fs::write(&reference, &model.data).expect("write the model");
    let (format, check) = match stack {
        Stack::Raw | Stack::RawDirect => ("raw", false),
        _ => ("qcow2", true),
    };
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", format])
        .arg(&reference)
        .arg(&top)
        .output()
        .expect("qemu-img compare");
    assert!(
        out.status.success(),
        "{what}: qemu-img compare with the model: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if check {
        let out = std::process::Command::new("qemu-img")
            .args(["check", &top])
            .output()
            .expect("qemu-img check");
        assert!(
            out.status.success(),
            "{what}: qemu-img check: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// The seed of this run: `RANDOM_OPS_SEED`, or a new one (printed).
fn seed() -> u64 {
    let seed = test_support::seed_from_env("RANDOM_OPS_SEED");
    eprintln!("random ops: RANDOM_OPS_SEED={seed}");
    seed
}

/// Batches per stack and setting: `RANDOM_OPS_BATCHES`, or enough for CI.
fn batches() -> u64 {
    test_support::count_from_env("RANDOM_OPS_BATCHES", 150) as u64
}

/// The `discard` and `detect-zeroes` settings QEMU allows (`detect-zeroes=unmap` needs
/// `discard=unmap`).
const SETTINGS: [(&str, &str); 5] = [
    ("ignore", "off"),
    ("ignore", "on"),
    ("unmap", "off"),
    ("unmap", "on"),
    ("unmap", "unmap"),
];

const STACKS: [Stack; 7] = [
    Stack::Raw,
    Stack::Qcow2(512),
    Stack::Qcow2(4096),
    Stack::Qcow2(65536),
    Stack::Qcow2Backing,
    Stack::RawDirect,
    Stack::Qcow2Direct,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_ops_match_the_model_on_every_stack() {
    let Some(_serial) = begin().await else {
        return;
    };
    let seed = seed();
    let batches = batches();
    let mut i = 0u64;
    for stack in STACKS {
        for (discard, detect) in SETTINGS {
            run_one(stack, discard, detect, seed, i, batches).await;
            i += 1;
        }
    }
}
