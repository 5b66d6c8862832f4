//! Times 4 KiB random requests at a fixed queue depth on a node whose image is in the page
//! cache, and the CPU each request costs.
//!
//! ```text
//! cargo run --release -p block-core --example file_bench -- \
//!     [inline|pool|qcow2] [read|write] [COUNT] [DEPTH] [tasks|thread|thread-inline]
//! ```
//!
//! Nodes: `inline` (the default) is a `file` node that tries `RWF_NOWAIT` on the calling task
//! first; `pool` a `file` node that sends every request to the blocking thread pool; `qcow2` a
//! fully allocated qcow2 image (made with `qemu-img`) over an `inline` file node.
//!
//! Submission: `tasks` (the default) runs DEPTH tokio tasks, each awaiting one request after
//! the other through an [`Attachment`](block_core::Attachment); `thread` submits from one
//! plain thread through a [`Submitter`](block_core::Submitter), keeping DEPTH requests in
//! flight and reaping completions from a [`CompletionQueue`](block_core::CompletionQueue), as
//! a virtqueue worker does; `thread-inline` does the same with
//! [`Submitter::with_inline_start`](block_core::Submitter::with_inline_start), so that a
//! request the driver completes without blocking completes on the submitting thread. Each
//! request has its own 4 KiB [`SgList`](block_core::SgList),
//! reused from one request to the next. The runtime has two worker threads.
//!
//! Printed: requests per second, and the process's CPU time (user + system, all threads) per
//! request.

use block_core::drivers::file::{FileDriver, FileOptions, Locking};
use block_core::{
    Attachment, BlockDriver, CompletionQueue, Node, Request, SgList, Submitter, WriteFlags,
};
use std::sync::Arc;
use std::time::Instant;

const IMAGE_SIZE: u64 = 256 << 20;
const BLOCK: u64 = 4096;

/// A simple LCG that spreads offsets over the image.
struct Offsets(u64);

impl Offsets {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 16) % (IMAGE_SIZE / BLOCK) * BLOCK
    }
}

/// CPU time of the whole process so far (user + system), in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes one `rusage` into the zeroed struct it is given.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

fn request(write: bool, offset: u64, buf: SgList) -> Request {
    if write {
        Request::Write {
            offset,
            buf,
            flags: WriteFlags::default(),
        }
    } else {
        Request::Read { offset, buf }
    }
}

/// DEPTH tasks, one request at a time each.
async fn run_tasks(io: &Attachment, write: bool, count: u64, depth: u64) -> Result<(), String> {
    let mut handles = Vec::new();
    for t in 0..depth {
        let io = io.clone();
        handles.push(tokio::spawn(async move {
            let buf = SgList::from_vec(vec![0x5a; BLOCK as usize]);
            let mut offsets = Offsets(t.wrapping_mul(6_364_136_223_846_793_005) + 1);
            for _ in 0..count / depth {
                let offset = offsets.next();
                if write {
                    io.writev(offset, &buf, WriteFlags::default()).await?;
                } else {
                    io.readv(offset, &buf).await?;
                }
            }
            Ok::<_, block_core::BlockError>(())
        }));
    }
    for h in handles {
        h.await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// One plain thread keeping DEPTH requests in flight.
fn run_thread(submitter: Submitter, write: bool, count: u64, depth: u64) -> Result<(), String> {
    let queue = CompletionQueue::new().map_err(|e| e.to_string())?;
    let mut offsets = Offsets(1);
    let total = count / depth * depth;
    let mut submitted = 0;
    for tag in 0..depth.min(total) {
        let buf = SgList::from_vec(vec![0x5a; BLOCK as usize]);
        submitter.submit_to(request(write, offsets.next(), buf), tag, &queue);
        submitted += 1;
    }
    let mut done = 0;
    let mut completions = Vec::with_capacity(depth as usize);
    while done < total {
        queue.wait().map_err(|e| e.to_string())?;
        queue.drain(&mut completions);
        for (tag, c) in completions.drain(..) {
            c.result.map_err(|e| e.to_string())?;
            done += 1;
            if submitted < total {
                let buf = c.buf.ok_or("a read or write gives its buffer back")?;
                submitter.submit_to(request(write, offsets.next(), buf), tag, &queue);
                submitted += 1;
            }
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("inline");
    let op = args.get(1).map(String::as_str).unwrap_or("read");
    let count: u64 = args
        .get(2)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let depth: u64 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(32);
    let submit = args.get(4).map(String::as_str).unwrap_or("tasks");
    let write = op == "write";

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench.img");
    // Written through the page cache, so that reads hit it.
    std::fs::write(&path, vec![0x5au8; IMAGE_SIZE as usize])?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let graph = block_core::NodeGraph::new();
    let node = runtime.block_on(async {
        if mode == "qcow2" {
            let qcow2 = dir.path().join("bench.qcow2");
            let status = std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&qcow2)
                .arg(IMAGE_SIZE.to_string())
                .status()?;
            if !status.success() {
                return Err::<_, Box<dyn std::error::Error>>("qemu-img create failed".into());
            }
            let node = block_core::open::blockdev_add(
                &graph,
                block_core::BlockdevOptions::from_json(
                    serde_json::json!({"driver": "qcow2", "node-name": "bench",
                    "file": {"driver": "file", "filename": qcow2}}),
                )
                .expect("options"),
            )
            .await?;
            let fill = node.attach("fill", true)?;
            let chunk = SgList::from_vec(vec![0x5au8; 1 << 20]);
            for i in 0..IMAGE_SIZE >> 20 {
                fill.writev(i << 20, &chunk, WriteFlags::default()).await?;
            }
            Ok(node)
        } else {
            let driver = FileDriver::open(&FileOptions {
                filename: path,
                locking: Locking::Off,
                no_inline: mode == "pool",
                defer_locks: false,
                ..FileOptions::default()
            })?;
            Ok(Node::new(
                "bench",
                Arc::new(driver) as Arc<dyn BlockDriver>,
                Vec::new(),
            ))
        }
    })?;
    let io = node.attach("bench", true)?;

    let cpu = cpu_seconds();
    let start = Instant::now();
    match submit {
        "tasks" => runtime.block_on(run_tasks(&io, write, count, depth))?,
        "thread" | "thread-inline" => {
            let submitter = Submitter::new(io.clone(), runtime.handle().clone())
                .with_inline_start(submit == "thread-inline");
            std::thread::spawn(move || run_thread(submitter, write, count, depth))
                .join()
                .map_err(|_| "the submitting thread panicked")??
        }
        other => {
            return Err(
                format!("unknown submission '{other}': tasks, thread or thread-inline").into(),
            )
        }
    }
    let elapsed = start.elapsed();
    let cpu = cpu_seconds() - cpu;
    let done = count / depth * depth;
    println!(
        "{mode} {op} {submit}: {done} x 4 KiB at depth {depth} in {:.2?}: {:.0} IOPS, {:.2} us CPU per request",
        elapsed,
        done as f64 / elapsed.as_secs_f64(),
        cpu * 1e6 / done as f64
    );
    drop((io, node));
    runtime.block_on(async {
        for n in graph.drain() {
            n.close().await?;
        }
        Ok::<_, block_core::BlockError>(())
    })?;
    Ok(())
}
