//! Requests from plain threads, and buffers the block layer does not own.

use block_core::drivers::file::{FileDriver, FileOptions, Locking};
use block_core::{
    open, BlockDriver, CompletionQueue, Node, NodeGraph, Request, SgList, Submitter, WriteFlags,
};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const BLOCK: usize = 4096;

fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i / BLOCK * 7 + i % 251 + seed) as u8)
        .collect()
}

#[test]
fn a_plain_thread_keeps_32_reads_in_flight_in_the_file_driver() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("img");
    let data = pattern(32 * BLOCK, 0);
    std::fs::write(&path, &data).expect("write image");
    // One blocking thread, which the test holds: no read can complete until all 32 are in
    // the driver.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let driver = Arc::new(
        FileDriver::open(&FileOptions {
            filename: path,
            locking: Locking::Off,
            // Every read goes to the blocking pool (a page-cache hit would complete inline).
            no_inline: true,
            ..FileOptions::default()
        })
        .expect("open"),
    );
    let node = Node::new(
        "disk",
        Arc::clone(&driver) as Arc<dyn BlockDriver>,
        Vec::new(),
    );
    let submitter = Submitter::new(
        node.attach("test", false).expect("attach"),
        runtime.handle().clone(),
    );
    let (release, released) = mpsc::channel::<()>();
    let (held, holding) = mpsc::channel::<()>();
    runtime.spawn_blocking(move || {
        held.send(()).expect("tell the test");
        let _ = released.recv();
    });
    holding.recv().expect("the blocking thread is held");

    let queue = CompletionQueue::new().expect("eventfd");
    let q = queue.clone();
    std::thread::spawn(move || {
        for tag in 0..32u64 {
            let buf = SgList::zeroed(BLOCK);
            submitter.submit_to(
                Request::Read {
                    offset: tag * BLOCK as u64,
                    buf,
                },
                tag,
                &q,
            );
        }
    })
    .join()
    .expect("every submission returned while no read could complete");

    let deadline = Instant::now() + Duration::from_secs(20);
    while driver.in_flight().0 < 32 {
        assert!(
            Instant::now() < deadline,
            "only {:?} (now, most) reads reached the driver",
            driver.in_flight()
        );
        std::thread::yield_now();
    }
    let mut done = Vec::new();
    assert_eq!(queue.drain(&mut done), 0, "nothing completed yet");
    release.send(()).expect("release the pool");

    let waiter = std::thread::spawn(move || {
        let mut done = Vec::new();
        while done.len() < 32 {
            queue.wait().expect("wait");
            queue.drain(&mut done);
        }
        done
    });
    let done = waiter.join().expect("completions");
    assert_eq!(done.len(), 32);
    for (tag, c) in done {
        c.result.expect("read");
        let at = tag as usize * BLOCK;
        let buf = c.buf.expect("the buffer comes back");
        assert_eq!(
            buf.into_vec().expect("no clone left"),
            &data[at..at + BLOCK],
            "read {tag}"
        );
    }
    assert_eq!(driver.in_flight(), (0, 32));
}

/// Anonymous memory mapped for the test, standing in for a guest's: lists over it are
/// foreign (`SgList::from_raw`).
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a private mapping that only this struct unmaps; the tests touch it through raw
// pointers and lists.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(len: usize) -> Arc<Mapping> {
        // SAFETY: a fresh anonymous mapping; no memory of ours is involved.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Arc::new(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    /// A list of `segments` (offset, length) of the mapping.
    fn list(self: &Arc<Self>, segments: &[(usize, usize)]) -> SgList {
        let segs: Vec<(*mut u8, usize)> = segments
            .iter()
            .map(|&(at, len)| {
                assert!(at + len <= self.len);
                // SAFETY: inside the mapping (checked).
                (unsafe { self.ptr.add(at) }, len)
            })
            .collect();
        // SAFETY: the segments lie in the mapping, which the owner (a clone of the Arc)
        // keeps mapped until the list and its clones are gone.
        unsafe { SgList::from_raw(&segs, Arc::clone(self) as _) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`, once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[tokio::test]
async fn scattered_foreign_buffers_round_trip_on_every_driver() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).expect("image");
    let mut stacks = vec![
        serde_json::json!({"driver": "file", "node-name": "top", "filename": raw}),
        serde_json::json!({"driver": "raw", "node-name": "top", "offset": 65536,
            "file": {"driver": "file", "filename": raw}}),
    ];
    if test_support::require_runs("qemu-img") {
        let qcow2 = dir.path().join("disk.qcow2");
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096"])
            .arg(&qcow2)
            .arg("1M")
            .status()
            .expect("qemu-img");
        assert!(st.success());
        stacks.push(serde_json::json!({"driver": "qcow2", "node-name": "top",
            "file": {"driver": "file", "filename": qcow2}}));
    }
    // Three pieces of odd sizes, out of order in the mapping.
    let segments = [(8192, 1000), (100, 3000), (20_000, 4192)];
    let len: usize = segments.iter().map(|s| s.1).sum();
    let data = pattern(len, 3);
    for options in stacks {
        let graph = NodeGraph::new();
        let node = open::blockdev_add(
            &graph,
            block_core::BlockdevOptions::from_json(options.clone()).expect("options"),
        )
        .await
        .expect("open");
        let io = node.attach("test", true).expect("attach");
        let source = Mapping::new(32768);
        let out = source.list(&segments);
        assert!(!out.is_private());
        out.copy_from_slice(0, &data);
        io.writev(4096 + 17, &out, WriteFlags::default())
            .await
            .expect("write");
        let target = Mapping::new(32768);
        let back = target.list(&[(30_000, 500), (0, len - 500)]);
        io.readv(4096 + 17, &back).await.expect("read");
        assert_eq!(back.to_vec(), data, "{options}");
        let mut plain = vec![0u8; len];
        io.read(4096 + 17, &mut plain).await.expect("read");
        assert_eq!(plain, data, "{options}");
        drop((io, node));
        for n in graph.drain() {
            n.close().await.expect("close");
        }
    }
}

/// With inline start a request the driver finishes at once completes on the submitting
/// thread before `submit` returns; a request over the inline limit is handed to the runtime
/// and completes on one of its threads.
#[test]
fn inline_start_stops_at_its_limit() {
    use block_core::drivers::null::NullDriver;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let node = Node::new(
        "null",
        Arc::new(NullDriver::new(1 << 20, true, false, 0)) as Arc<dyn BlockDriver>,
        Vec::new(),
    );
    let submitter = Submitter::new(
        node.attach("test", false).expect("attach"),
        runtime.handle().clone(),
    )
    .with_inline_start(true)
    .with_inline_limit(4096);
    let me = std::thread::current().id();
    let (tx, rx) = mpsc::channel();
    for len in [4096usize, 8192] {
        let tx = tx.clone();
        submitter.submit(
            Request::Read {
                offset: 0,
                buf: SgList::from_vec(vec![0xff; len]),
            },
            move |c| {
                c.result.expect("read");
                assert!(c.buf.expect("buffer back").is_zero());
                tx.send((len, std::thread::current().id())).expect("send");
            },
        );
        if len == 4096 {
            assert_eq!(
                rx.try_recv().expect("completed before submit returned"),
                (4096, me)
            );
        }
    }
    let (len, thread) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("completion");
    assert_eq!(len, 8192);
    assert_ne!(thread, me, "over the limit: completed on the runtime");
}
