//! One conformance suite over every stack, only the constructor differing:
//! `file`; `raw` over `file` with an offset; `qcow2`; `qcow2` over a backing `qcow2`
//! (opened from the header's backing file name); `null-co` (the subset that applies).
//!
//! Images are made, written and checked with the real `qemu-img` and `qemu-io`. Without
//! them the tests print why and pass, unless `CI=true`, where they fail.

use block_core::{open, Attachment, BlockError, Extent, Node, NodeGraph, WriteFlags, ZeroFlags};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

/// The tests' I/O goes through an attachment, as an export's does: writable where the node
/// allows a writer, read-only otherwise (writes then fail with EPERM).
trait NodeIo {
    fn io(&self) -> Attachment;
}

impl NodeIo for Arc<Node> {
    fn io(&self) -> Attachment {
        self.attach("conformance test", !self.read_only())
            .or_else(|_| self.attach("conformance test", false))
            .expect("attach")
    }
}

const MIB: u64 = 1 << 20;
const SIZE: u64 = 4 * MIB;
const RAW_OFFSET: u64 = MIB;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    RawOffset,
    Qcow2,
    Qcow2Backing,
    Null,
    /// `file` with `cache.direct=on` (O_DIRECT, bounce buffers).
    FileDirect,
    /// `qcow2` over a `file` with `cache.direct=on` (imago's unaligned metadata I/O).
    Qcow2Direct,
}

impl Kind {
    /// The image layout this stack uses.
    fn base(self) -> Kind {
        match self {
            Kind::FileDirect => Kind::File,
            Kind::Qcow2Direct => Kind::Qcow2,
            k => k,
        }
    }

    fn direct(self) -> bool {
        matches!(self, Kind::FileDirect | Kind::Qcow2Direct)
    }

    fn is_qcow2(self) -> bool {
        matches!(self.base(), Kind::Qcow2 | Kind::Qcow2Backing)
    }
}

const IMAGE_KINDS: [Kind; 6] = [
    Kind::File,
    Kind::RawOffset,
    Kind::Qcow2,
    Kind::Qcow2Backing,
    Kind::FileDirect,
    Kind::Qcow2Direct,
];
const ALL_KINDS: [Kind; 7] = [
    Kind::File,
    Kind::RawOffset,
    Kind::Qcow2,
    Kind::Qcow2Backing,
    Kind::Null,
    Kind::FileDirect,
    Kind::Qcow2Direct,
];

/// Whether the QEMU tools are here; fails loudly under `CI=true` when they are not.
fn have_tools() -> bool {
    ["qemu-img", "qemu-io", "qemu-storage-daemon"]
        .iter()
        .all(|tool| test_support::require_runs(tool))
}

/// Tests run one at a time: a child process forked by one test holds copies of the other
/// tests' open files until it execs, and with them their image locks, which would make a
/// close-then-reopen in another test fail at random.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts a test: `None` (the test passes without running) when the tools are missing and
/// `CI` is not `true`; otherwise the guard that serializes the tests.
async fn begin() -> Option<tokio::sync::MutexGuard<'static, ()>> {
    let serial = SERIAL.lock().await;
    static TOOLS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*TOOLS.get_or_init(have_tools) {
        return None;
    }
    Some(serial)
}

fn run(program: &str, args: &[&str]) -> Output {
    test_support::run_ok(Command::new(program).args(args))
}

/// One stack's images on disk.
struct Images {
    kind: Kind,
    dir: tempfile::TempDir,
}

impl Images {
    fn create(kind: Kind) -> Images {
        let dir = tempfile::tempdir().expect("tempdir");
        let images = Images { kind, dir };
        let size = SIZE.to_string();
        match kind.base() {
            Kind::FileDirect | Kind::Qcow2Direct => unreachable!("base() is never a direct kind"),
            Kind::File => {
                run(
                    "qemu-img",
                    &["create", "-q", "-f", "raw", &images.top(), &size],
                );
            }
            Kind::RawOffset => {
                let total = (SIZE + 2 * RAW_OFFSET).to_string();
                run(
                    "qemu-img",
                    &["create", "-q", "-f", "raw", &images.top(), &total],
                );
                // Bytes outside the window, which must never show through.
                let img = images.top();
                run(
                    "qemu-io",
                    &[
                        "-f",
                        "raw",
                        "-c",
                        "write -P 0xee 0 1M",
                        "-c",
                        "write -P 0xee 5M 1M",
                        &img,
                    ],
                );
            }
            Kind::Qcow2 => {
                run(
                    "qemu-img",
                    &["create", "-q", "-f", "qcow2", &images.top(), &size],
                );
            }
            Kind::Qcow2Backing => {
                let base = images.path("base.qcow2");
                run("qemu-img", &["create", "-q", "-f", "qcow2", &base, &size]);
                run(
                    "qemu-io",
                    &[
                        "-f",
                        "qcow2",
                        "-c",
                        "write -P 0x11 1M 1M",
                        "-c",
                        "write -z 2M 64k",
                        &base,
                    ],
                );
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
                        &images.top(),
                        &size,
                    ],
                );
            }
            Kind::Null => {}
        }
        images
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    fn top(&self) -> String {
        self.path(match self.kind.base() {
            Kind::Qcow2 | Kind::Qcow2Backing => "top.qcow2",
            _ => "top.raw",
        })
    }

    /// The image as `qemu-io`/`qemu-img` should open it (`--image-opts` syntax).
    fn image_opts(&self) -> String {
        match self.kind.base() {
            Kind::FileDirect | Kind::Qcow2Direct => unreachable!("base() is never a direct kind"),
            Kind::File => format!("driver=raw,file.driver=file,file.filename={}", self.top()),
            Kind::RawOffset => format!(
                "driver=raw,offset={RAW_OFFSET},size={SIZE},file.driver=file,file.filename={}",
                self.top()
            ),
            Kind::Qcow2 | Kind::Qcow2Backing => {
                format!("driver=qcow2,file.driver=file,file.filename={}", self.top())
            }
            Kind::Null => format!("driver=null-co,size={SIZE},read-zeroes=on"),
        }
    }

    fn qemu_io(&self, commands: &[&str]) -> Output {
        let mut args = vec!["--image-opts"];
        for c in commands {
            args.push("-c");
            args.push(c);
        }
        let opts = self.image_opts();
        args.push(&opts);
        let out = run("qemu-io", &args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            !text.contains("Pattern verification failed") && !text.contains("failed:"),
            "qemu-io {commands:?} on {:?}: {text}",
            self.kind
        );
        out
    }

    fn options(&self, read_only: bool) -> Value {
        let file = json!({"driver": "file", "filename": self.top()});
        let mut v = match self.kind.base() {
            Kind::FileDirect | Kind::Qcow2Direct => unreachable!("base() is never a direct kind"),
            Kind::File => json!({"driver": "file", "filename": self.top()}),
            Kind::RawOffset => {
                json!({"driver": "raw", "offset": RAW_OFFSET, "size": SIZE, "file": file})
            }
            Kind::Qcow2 | Kind::Qcow2Backing => json!({"driver": "qcow2", "file": file}),
            Kind::Null => json!({"driver": "null-co", "size": SIZE, "read-zeroes": true}),
        };
        let obj = v.as_object_mut().expect("object");
        obj.insert("node-name".into(), json!("top"));
        obj.insert("read-only".into(), json!(read_only));
        obj.insert("discard".into(), json!("unmap"));
        if self.kind.direct() {
            obj.insert("cache".into(), json!({"direct": true}));
        }
        v
    }

    async fn open(&self, read_only: bool) -> Stack {
        let graph = NodeGraph::new();
        let node = open::blockdev_add(
            &graph,
            block_core::BlockdevOptions::from_json(self.options(read_only)).expect("options"),
        )
        .await
        .unwrap_or_else(|e| panic!("opening {:?}: {e}", self.kind));
        Stack { graph, node }
    }
}

struct Stack {
    graph: NodeGraph,
    node: Arc<Node>,
}

impl Stack {
    /// Flushes and closes every node (releasing the image locks).
    async fn close(self) {
        drop(self.node);
        for node in self.graph.drain() {
            node.close().await.expect("close");
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn reads_what_qemu_io_wrote() {
    let Some(_serial) = begin().await else {
        return;
    };
    for kind in IMAGE_KINDS {
        let images = Images::create(kind);
        images.qemu_io(&["write -P 0xab 0 64k", "write -P 0xcd 3M 4k"]);
        let stack = images.open(true).await;
        if kind.direct() {
            // The file layer (the node itself, or the qcow2's file child) is O_DIRECT.
            let file = stack
                .node
                .child(block_core::ChildRole::File)
                .cloned()
                .unwrap_or_else(|| Arc::clone(&stack.node));
            assert!(file.request_alignment() >= 512, "{kind:?}");
            assert_eq!(open::node_info(&file, false)["cache"]["direct"], true);
        }
        let mut buf = vec![0u8; 64 * 1024];
        stack.node.io().read(0, &mut buf).await.expect("read");
        assert!(buf.iter().all(|&b| b == 0xab), "{kind:?}: data at 0");
        let mut buf = vec![1u8; 8192];
        stack
            .node
            .io()
            .read(3 * MIB - 4096, &mut buf)
            .await
            .expect("read");
        assert!(
            buf[..4096].iter().all(|&b| b == 0),
            "{kind:?}: zeroes before"
        );
        assert!(
            buf[4096..].iter().all(|&b| b == 0xcd),
            "{kind:?}: data at 3M"
        );
        if kind == Kind::Qcow2Backing {
            let mut buf = vec![0u8; 4096];
            stack
                .node
                .io()
                .read(MIB + 512, &mut buf)
                .await
                .expect("read");
            assert!(buf.iter().all(|&b| b == 0x11), "backing data shows through");
        }
        stack.close().await;
    }
}

#[tokio::test]
async fn qemu_reads_what_we_wrote() {
    let Some(_serial) = begin().await else {
        return;
    };
    for kind in IMAGE_KINDS {
        let images = Images::create(kind);
        let stack = images.open(false).await;
        let node = &stack.node;
        node.io()
            .write(0, &[0xab; 65536], WriteFlags::default())
            .await
            .expect("write");
        // Unaligned, crossing a cluster boundary.
        let odd = pattern(70_000, 7);
        node.io()
            .write(2 * MIB - 1000, &odd, WriteFlags { fua: true })
            .await
            .expect("write unaligned");
        node.io()
            .write(SIZE - 512, &[0x5a; 512], WriteFlags::default())
            .await
            .expect("write last sector");
        node.io().flush().await.expect("flush");
        stack.close().await;

        images.qemu_io(&[
            "read -P 0xab 0 64k",
            "read -P 0x5a 4193792 512",
            "read -P 0 64k 64k",
        ]);
        // The whole content, compared with `qemu-img compare` against a raw reference.
        let mut reference = vec![0u8; SIZE as usize];
        if kind == Kind::Qcow2Backing {
            reference[MIB as usize..2 * MIB as usize].fill(0x11);
        }
        reference[..65536].fill(0xab);
        let at = (2 * MIB - 1000) as usize;
        reference[at..at + odd.len()].copy_from_slice(&odd);
        reference[(SIZE - 512) as usize..].fill(0x5a);
        let reference_path = images.path("reference.raw");
        std::fs::write(&reference_path, &reference).expect("write reference");
        let opts = images.image_opts();
        let out = Command::new("qemu-img")
            .args(["compare", "--image-opts", &opts])
            .arg(format!(
                "driver=raw,file.driver=file,file.filename={reference_path}"
            ))
            .output()
            .expect("qemu-img compare");
        assert!(
            out.status.success(),
            "{kind:?}: qemu-img compare: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        if kind.is_qcow2() {
            run("qemu-img", &["check", "-q", &images.top()]);
        }
        if kind == Kind::RawOffset {
            // Nothing leaked outside the window.
            let all = std::fs::read(images.top()).expect("read image");
            assert!(all[..RAW_OFFSET as usize].iter().all(|&b| b == 0xee));
            assert!(all[(RAW_OFFSET + SIZE) as usize..]
                .iter()
                .all(|&b| b == 0xee));
        }
    }
}

#[tokio::test]
async fn zeroes_and_discard_read_back_as_zeroes() {
    let Some(_serial) = begin().await else {
        return;
    };
    for kind in IMAGE_KINDS {
        let images = Images::create(kind);
        let stack = images.open(false).await;
        let node = &stack.node;
        node.io()
            .write(0, &vec![0xff; 2 * MIB as usize], WriteFlags::default())
            .await
            .expect("fill");
        node.io()
            .write_zeroes(65536, 131072, ZeroFlags::default())
            .await
            .expect("write zeroes");
        let unmap = ZeroFlags {
            may_unmap: true,
            ..ZeroFlags::default()
        };
        node.io()
            .write_zeroes(300_000, 100_000, unmap)
            .await
            .expect("write zeroes, may unmap");
        node.io().discard(MIB, 131072).await.expect("discard");
        let mut buf = vec![1u8; 2 * MIB as usize];
        node.io().read(0, &mut buf).await.expect("read");
        let zero_ranges = [
            (65536, 196608),
            (300_000, 400_000),
            (MIB as usize, MIB as usize + 131072),
        ];
        for (start, end) in zero_ranges {
            assert!(
                buf[start..end].iter().all(|&b| b == 0),
                "{kind:?}: {start}..{end} is not zero"
            );
        }
        assert!(
            buf[..65536].iter().all(|&b| b == 0xff),
            "{kind:?}: head kept"
        );
        assert!(
            buf[196608..300_000].iter().all(|&b| b == 0xff),
            "{kind:?}: middle kept"
        );
        stack.close().await;
        if kind.is_qcow2() {
            run("qemu-img", &["check", "-q", &images.top()]);
        }
        images.qemu_io(&["read -P 0 1M 128k", "read -P 0xff 0 64k"]);
    }
}

/// Extents as `(start, len, data, zero, depth)`, adjacent equal ones merged.
fn merge(extents: Vec<(u64, u64, bool, bool, u32)>) -> Vec<(u64, u64, bool, bool, u32)> {
    let mut out: Vec<(u64, u64, bool, bool, u32)> = Vec::new();
    for e in extents {
        match out.last_mut() {
            Some(last)
                if last.2 == e.2 && last.3 == e.3 && last.4 == e.4 && last.0 + last.1 == e.0 =>
            {
                last.1 += e.1
            }
            _ => out.push(e),
        }
    }
    out
}

#[tokio::test]
async fn block_status_matches_qemu_img_map() {
    let Some(_serial) = begin().await else {
        return;
    };
    for kind in ALL_KINDS {
        let images = Images::create(kind);
        let mut commands = vec!["write -P 0xab 0 64k", "write -P 1 3M 4k"];
        if kind.is_qcow2() {
            commands.push("write -z 512k 64k");
        }
        if kind != Kind::Null {
            images.qemu_io(&commands);
        }
        let opts = images.image_opts();
        let out = run("qemu-img", &["map", "--output=json", "--image-opts", &opts]);
        let map: Value = serde_json::from_slice(&out.stdout).expect("qemu-img map JSON");
        let expected = merge(
            map.as_array()
                .expect("array")
                .iter()
                .map(|e| {
                    let present = e["present"].as_bool().expect("present");
                    let depth = e["depth"].as_u64().expect("depth") as u32;
                    (
                        e["start"].as_u64().expect("start"),
                        e["length"].as_u64().expect("length"),
                        e["data"].as_bool().expect("data"),
                        e["zero"].as_bool().expect("zero"),
                        if present { depth + 1 } else { 0 },
                    )
                })
                .collect(),
        );

        let stack = images.open(true).await;
        let mut ours = Vec::new();
        let mut offset = 0;
        while offset < SIZE {
            let Extent {
                len,
                data,
                zero,
                depth,
                ..
            } = stack
                .node
                .io()
                .block_status(offset, SIZE - offset)
                .await
                .expect("block status");
            assert!(len > 0 && len <= SIZE - offset);
            ours.push((offset, len, data, zero, depth));
            offset += len;
        }
        assert_eq!(merge(ours), expected, "{kind:?}");
        stack.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_requests_in_flight_from_many_tasks() {
    let Some(_serial) = begin().await else {
        return;
    };
    for kind in ALL_KINDS {
        let images = Images::create(kind);
        let stack = images.open(false).await;
        const TASKS: u64 = 16;
        const PER_TASK: u64 = 32;
        const CHUNK: u64 = 4096 + 512;
        let mut handles = Vec::new();
        for t in 0..TASKS {
            let node = Arc::clone(&stack.node);
            handles.push(tokio::spawn(async move {
                for i in 0..PER_TASK {
                    let offset = (i * TASKS + t) * CHUNK;
                    let data = pattern(CHUNK as usize, (t * 7 + i) as u8);
                    node.io()
                        .write(offset, &data, WriteFlags::default())
                        .await
                        .expect("concurrent write");
                }
            }));
        }
        for h in handles {
            h.await.expect("writer task");
        }
        if kind != Kind::Null {
            let mut handles = Vec::new();
            for t in 0..TASKS {
                let node = Arc::clone(&stack.node);
                handles.push(tokio::spawn(async move {
                    for i in 0..PER_TASK {
                        let offset = (i * TASKS + t) * CHUNK;
                        let mut buf = vec![0u8; CHUNK as usize];
                        node.io()
                            .read(offset, &mut buf)
                            .await
                            .expect("concurrent read");
                        assert_eq!(
                            buf,
                            pattern(CHUNK as usize, (t * 7 + i) as u8),
                            "at {offset}"
                        );
                    }
                }));
            }
            for h in handles {
                h.await.expect("reader task");
            }
        }
        stack.close().await;
        if kind.is_qcow2() {
            run("qemu-img", &["check", "-q", &images.top()]);
        }
    }
}

fn errno(r: Result<(), BlockError>) -> i32 {
    r.expect_err("request should fail").errno()
}

#[tokio::test]
async fn out_of_range_is_einval_and_read_only_is_eperm() {
    let Some(_serial) = begin().await else {
        return;
    };
    for kind in ALL_KINDS {
        let images = Images::create(kind);
        let stack = images.open(false).await;
        let node = &stack.node;
        let mut buf = vec![0u8; 1024];
        assert_eq!(
            errno(node.io().read(SIZE - 512, &mut buf).await),
            libc::EINVAL
        );
        assert_eq!(
            errno(node.io().write(SIZE, &buf, WriteFlags::default()).await),
            libc::EINVAL
        );
        assert_eq!(
            errno(
                node.io()
                    .write_zeroes(u64::MAX - 1, 4096, ZeroFlags::default())
                    .await
            ),
            libc::EINVAL
        );
        assert_eq!(errno(node.io().discard(SIZE - 1, 2).await), libc::EINVAL);
        stack.close().await;

        let stack = images.open(true).await;
        let node = &stack.node;
        assert!(node.read_only());
        assert_eq!(
            errno(node.io().write(0, &buf, WriteFlags::default()).await),
            libc::EPERM
        );
        assert_eq!(
            errno(node.io().write_zeroes(0, 4096, ZeroFlags::default()).await),
            libc::EPERM
        );
        assert_eq!(errno(node.io().discard(0, 4096).await), libc::EPERM);
        node.io().read(0, &mut buf).await.expect("reads still work");
        assert!(
            node.attach("export 'e'", true).is_err(),
            "{kind:?}: writable user refused"
        );
        stack.close().await;
    }
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
}

/// Starts a daemonized qemu-storage-daemon holding `image` writable through an NBD export;
/// returns its pid once it is fully set up (the daemonizing parent exits only then).
fn start_qsd(dir: &Path, image: &str) -> Result<i32, String> {
    let pidfile = dir.join("qsd.pid");
    let sock = dir.join("qsd.sock");
    let out = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=f,filename={image}"))
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", sock.display()))
        .args(["--export", "type=nbd,id=e,node-name=f,writable=on"])
        .arg("--pidfile")
        .arg(&pidfile)
        .arg("--daemonize")
        .output()
        .expect("run qemu-storage-daemon");
    if !out.status.success() {
        return Err(stderr_of(&out));
    }
    let pid = std::fs::read_to_string(&pidfile).expect("pidfile");
    Ok(pid.trim().parse().expect("pid"))
}

struct Qsd(i32);

impl Drop for Qsd {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of the daemon this test started.
        unsafe { libc::kill(self.0, libc::SIGTERM) };
    }
}

#[tokio::test]
async fn locking_against_qemu() {
    let Some(_serial) = begin().await else {
        return;
    };
    for kind in [Kind::File, Kind::Qcow2] {
        let images = Images::create(kind);
        let stack = images.open(false).await;

        // qemu-io cannot write an image we hold writable.
        let out = Command::new("qemu-io")
            .args(["-f", if kind == Kind::File { "raw" } else { "qcow2" }])
            .args(["-c", "write 0 4k", &images.top()])
            .output()
            .expect("qemu-io");
        let text = stderr_of(&out);
        assert!(
            !out.status.success() && text.contains("Failed to get \"write\" lock"),
            "{kind:?}: qemu-io was not refused: {text}"
        );
        // Neither can qemu-storage-daemon.
        match start_qsd(images.dir.path(), &images.top()) {
            Ok(pid) => {
                drop(Qsd(pid));
                panic!("{kind:?}: qemu-storage-daemon opened an image we hold");
            }
            Err(text) => assert!(text.contains("Failed to get \"write\" lock"), "{text}"),
        }
        // A read-only, force-share reader is fine (qemu-img info -U).
        run("qemu-img", &["info", "-U", &images.top()]);
        stack.close().await;

        // The other way round: a running QSD holds the image writable.
        let qsd = Qsd(start_qsd(images.dir.path(), &images.top()).expect("start qsd"));
        let graph = NodeGraph::new();
        let err = open::blockdev_add(
            &graph,
            block_core::BlockdevOptions::from_json(images.options(false)).expect("options"),
        )
        .await
        .expect_err("open while QSD holds the image");
        assert!(
            err.to_string()
                .contains("Failed to get shared \"write\" lock"),
            "{kind:?}: {err}"
        );
        assert!(graph.all().is_empty());
        // Read-only with force-share works.
        let mut ro = images.options(true);
        ro["force-share"] = json!(true);
        if let Some(file) = ro.get_mut("file") {
            file["force-share"] = json!(true);
            file["read-only"] = json!(true);
        }
        let node = open::blockdev_add(
            &graph,
            block_core::BlockdevOptions::from_json(ro).expect("options"),
        )
        .await
        .expect("force-share reader");
        drop(node);
        for n in graph.drain() {
            n.close().await.expect("close");
        }
        drop(qsd);
    }
}

#[tokio::test]
async fn node_info_has_the_shape_of_qsd() {
    let Some(_serial) = begin().await else {
        return;
    };
    let images = Images::create(Kind::Qcow2Backing);
    let stack = images.open(false).await;
    let info = open::node_info(&stack.node, false);
    assert_eq!(info["drv"], "qcow2");
    assert_eq!(info["node-name"], "top");
    assert_eq!(info["backing_file_depth"], 1);
    assert_eq!(info["image"]["virtual-size"], SIZE);
    assert_eq!(info["image"]["cluster-size"], 65536);
    assert_eq!(info["image"]["backing-filename"], "base.qcow2");
    assert_eq!(info["image"]["backing-filename-format"], "qcow2");
    assert_eq!(
        info["image"]["full-backing-filename"],
        images.path("base.qcow2")
    );
    assert_eq!(info["image"]["backing-image"]["format"], "qcow2");
    assert_eq!(info["backing_file"], images.path("base.qcow2"));
    let out = run("qemu-img", &["info", "-U", "--output=json", &images.top()]);
    let qemu: Value = serde_json::from_slice(&out.stdout).expect("qemu-img info JSON");
    assert_eq!(info["image"]["format-specific"], qemu["format-specific"]);
    assert_eq!(info["image"]["dirty-flag"], qemu["dirty-flag"]);
    let flat = open::node_info(&stack.node, true);
    assert!(flat["image"].get("backing-image").is_none());
    assert_eq!(flat["backing_file_depth"], 0);
    // The implicitly opened backing chain is read-only and named by the graph.
    let names: Vec<String> = stack
        .graph
        .all()
        .iter()
        .map(|n| n.name().to_string())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    for n in stack.graph.all() {
        if n.name() != "top" && n.name() != stack.node.children()[0].1.name() {
            assert!(n.read_only(), "{} should be read-only", n.name());
        }
    }
    stack.close().await;
}

#[tokio::test]
async fn resize_where_the_format_allows_it() {
    let Some(_serial) = begin().await else {
        return;
    };
    let new_size = SIZE + MIB;
    for kind in ALL_KINDS {
        let images = Images::create(kind);
        let stack = images.open(false).await;
        let node = &stack.node;
        let mut sizes = node.watch_size();
        assert_eq!(
            *sizes.borrow_and_update(),
            node.size(),
            "{kind:?}: the size watched"
        );
        let result = node.resize(new_size).await;
        assert_eq!(
            sizes.has_changed().expect("the node lives"),
            result.is_ok(),
            "{kind:?}: a resize, and only a successful one, is seen"
        );
        match kind {
            Kind::RawOffset => {
                let err = result.expect_err("fixed-size raw");
                assert_eq!(err.to_string(), "Cannot resize fixed-size raw disks");
                stack.close().await;
                continue;
            }
            Kind::Null => {
                assert_eq!(result.expect_err("null-co").errno(), libc::ENOTSUP);
                stack.close().await;
                continue;
            }
            _ => result.unwrap_or_else(|e| panic!("{kind:?}: resize: {e}")),
        }
        assert_eq!(node.size(), new_size, "{kind:?}");
        assert_eq!(
            *sizes.borrow_and_update(),
            new_size,
            "{kind:?}: the size watched"
        );
        node.io()
            .write(new_size - 4096, &[0x77; 4096], WriteFlags::default())
            .await
            .expect("write in the new area");
        let mut buf = vec![1u8; 4096];
        node.io().read(SIZE, &mut buf).await.expect("read new area");
        assert!(
            buf.iter().all(|&b| b == 0),
            "{kind:?}: new area reads zeroes"
        );
        stack.close().await;
        let opts = images.image_opts();
        let out = run(
            "qemu-img",
            &["info", "--output=json", "--image-opts", &opts],
        );
        let info: Value = serde_json::from_slice(&out.stdout).expect("qemu-img info JSON");
        assert_eq!(info["virtual-size"], new_size, "{kind:?}");
        images.qemu_io(&["read -P 0x77 5238784 4096"]);
        if kind.is_qcow2() {
            run("qemu-img", &["check", "-q", &images.top()]);
        }
    }
}

#[tokio::test]
async fn growing_after_a_shrink_shows_no_old_data() {
    let Some(_serial) = begin().await else {
        return;
    };
    // The backing file holds 0x11 at 1M..2M (see `Images::create`); QEMU zeroes a grown
    // area where the backing file reaches into it.
    let images = Images::create(Kind::Qcow2Backing);
    let stack = images.open(false).await;
    let node = &stack.node;
    node.resize(MIB + 4096).await.expect("shrink");
    node.resize(SIZE).await.expect("grow");
    let mut buf = vec![1u8; MIB as usize];
    node.io().read(MIB, &mut buf).await.expect("read");
    assert_eq!(buf[..4096], [0x11; 4096], "kept before the shrink point");
    assert!(
        buf[4096..].iter().all(|&b| b == 0),
        "grown area reads zeroes"
    );
    stack.close().await;
    images.qemu_io(&["read -P 0x11 1M 4k", "read -P 0 1052672 1044480"]);
    run("qemu-img", &["check", "-q", &images.top()]);

    // Without a backing file: the rest of the cluster that the shrink cut in two must not
    // show its old bytes again (qemu-img resize of QEMU 10 shows them).
    let images = Images::create(Kind::Qcow2);
    let stack = images.open(false).await;
    let node = &stack.node;
    node.io()
        .write(MIB, &[0xaa; 65536], WriteFlags::default())
        .await
        .expect("write");
    node.resize(MIB + 512).await.expect("shrink");
    node.resize(SIZE).await.expect("grow");
    let mut buf = vec![1u8; 65536];
    node.io().read(MIB, &mut buf).await.expect("read");
    assert_eq!(buf[..512], [0xaa; 512], "kept before the shrink point");
    assert!(
        buf[512..].iter().all(|&b| b == 0),
        "grown area reads zeroes"
    );
    stack.close().await;
    images.qemu_io(&["read -P 0xaa 1M 512", "read -P 0 1049088 65024"]);
    run("qemu-img", &["check", "-q", &images.top()]);
}

#[tokio::test]
async fn detect_zeroes_unmap_punches_holes() {
    let Some(_serial) = begin().await else {
        return;
    };
    for kind in [Kind::File, Kind::Qcow2] {
        let images = Images::create(kind);
        images.qemu_io(&["write -P 0xab 0 1M"]);
        let mut options = images.options(false);
        options["detect-zeroes"] = json!("unmap");
        let graph = NodeGraph::new();
        let node = open::blockdev_add(
            &graph,
            block_core::BlockdevOptions::from_json(options).expect("options"),
        )
        .await
        .expect("open");
        assert_eq!(open::node_info(&node, false)["detect_zeroes"], "unmap");
        node.io()
            .write(0, &[0u8; 65536], WriteFlags::default())
            .await
            .expect("zero write");
        let e = node.io().block_status(0, 65536).await.expect("status");
        assert!(!e.data && e.zero, "{kind:?}: {e:?}");
        let mut buf = vec![1u8; 65536];
        node.io().read(0, &mut buf).await.expect("read");
        assert!(buf.iter().all(|&b| b == 0));
        drop(node);
        for n in graph.drain() {
            n.close().await.expect("close");
        }
        images.qemu_io(&["read -P 0 0 64k", "read -P 0xab 64k 960k"]);
    }
}

#[tokio::test]
async fn a_qcow2_file_has_one_writer() {
    let Some(_serial) = begin().await else {
        return;
    };
    let images = Images::create(Kind::Qcow2);
    let graph = NodeGraph::new();
    open::blockdev_add(
        &graph,
        block_core::BlockdevOptions::from_json(
            json!({"driver": "file", "node-name": "f", "filename": images.top()}),
        )
        .expect("options"),
    )
    .await
    .expect("file");
    open::blockdev_add(
        &graph,
        block_core::BlockdevOptions::from_json(
            json!({"driver": "qcow2", "node-name": "q1", "file": "f"}),
        )
        .expect("options"),
    )
    .await
    .expect("first qcow2");
    let err = open::blockdev_add(
        &graph,
        block_core::BlockdevOptions::from_json(
            json!({"driver": "qcow2", "node-name": "q2", "file": "f"}),
        )
        .expect("options"),
    )
    .await
    .expect_err("second writer");
    // qemu-storage-daemon's message for the same command line.
    assert_eq!(
        err.to_string(),
        "Permission conflict on node 'f': permissions 'write, resize' are both required by node 'q1' (uses node 'f' as 'file' child) and unshared by node 'q2' (uses node 'f' as 'file' child)."
    );
    let f = graph.get("f").expect("f");
    assert!(
        f.attach("export 'e'", true).is_err(),
        "writable export on the file"
    );
    let reader = f
        .attach("export 'e'", false)
        .expect("read-only export on the file");
    drop(reader);
    // Once q1 is gone the file is free again.
    let q1 = graph.remove("q1").expect("remove q1");
    q1.close().await.expect("close q1");
    open::blockdev_add(
        &graph,
        block_core::BlockdevOptions::from_json(
            json!({"driver": "qcow2", "node-name": "q2", "file": "f"}),
        )
        .expect("options"),
    )
    .await
    .expect("second qcow2 after the first left");
    for n in graph.drain() {
        n.close().await.expect("close");
    }
}

/// Attaches `image` to a free loop device; `None` (after saying why) when this host cannot.
fn loop_device(image: &str) -> Option<String> {
    let out = Command::new("losetup")
        .args(["-f", "--show", image])
        .output();
    match out {
        Ok(out) if out.status.success() => {
            Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
        }
        other => {
            let why = match other {
                Ok(out) => String::from_utf8_lossy(&out.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            test_support::require(Some(format!(
                "no loop device for the host_device test: {why}"
            )));
            None
        }
    }
}

struct LoopDevice(String);

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[tokio::test]
async fn host_device_on_a_loop_device() {
    let Some(_serial) = begin().await else {
        return;
    };
    let images = Images::create(Kind::File);
    let Some(dev) = loop_device(&images.top()) else {
        return;
    };
    let dev = LoopDevice(dev);
    let graph = NodeGraph::new();
    let err = open::blockdev_add(
        &graph,
        block_core::BlockdevOptions::from_json(json!({"driver": "file", "filename": dev.0}))
            .expect("options"),
    )
    .await
    .expect_err("file driver on a device");
    assert_eq!(
        err.to_string(),
        format!("'file' driver requires '{}' to be a regular file", dev.0)
    );
    let err = open::blockdev_add(
        &graph,
        block_core::BlockdevOptions::from_json(
            json!({"driver": "host_device", "filename": images.top()}),
        )
        .expect("options"),
    )
    .await
    .expect_err("host_device on a regular file");
    assert_eq!(
        err.to_string(),
        format!(
            "'host_device' driver requires '{}' to be either a character or block device",
            images.top()
        )
    );
    let node = open::blockdev_add(
        &graph,
        block_core::BlockdevOptions::from_json(
            json!({"driver": "host_device", "filename": dev.0, "node-name": "dev"}),
        )
        .expect("options"),
    )
    .await
    .expect("host_device");
    assert_eq!(node.size(), SIZE, "size from BLKGETSIZE64");
    assert_eq!(node.driver_name(), "host_device");
    node.io()
        .write(4096, &[0x3c; 8192], WriteFlags { fua: true })
        .await
        .expect("write");
    let mut buf = vec![0u8; 8192];
    node.io().read(4096, &mut buf).await.expect("read");
    assert!(buf.iter().all(|&b| b == 0x3c));
    assert_eq!(
        node.resize(SIZE + MIB).await.expect_err("grow").to_string(),
        "Cannot grow device files"
    );
    // qemu-io cannot write the device while we hold it.
    let out = Command::new("qemu-io")
        .args(["--image-opts", "-c", "write 0 4k"])
        .arg(format!(
            "driver=raw,file.driver=host_device,file.filename={}",
            dev.0
        ))
        .output()
        .expect("qemu-io");
    assert!(
        stderr_of(&out).contains("Failed to get \"write\" lock"),
        "{}",
        stderr_of(&out)
    );
    drop(node);
    for n in graph.drain() {
        n.close().await.expect("close");
    }
    // What we wrote reached the backing file.
    images.qemu_io(&["read -P 0x3c 4k 8k"]);
}

/// `query-named-block-nodes` of a daemonized qemu-storage-daemon started with `blockdev`.
fn qsd_named_block_nodes(dir: &Path, blockdev: &str) -> Value {
    use std::io::{BufRead, BufReader, Write};
    let sock = dir.join("qmp.sock");
    let pidfile = dir.join("qmp.pid");
    let out = Command::new("qemu-storage-daemon")
        .args(["--blockdev", blockdev])
        .arg("--chardev")
        .arg(format!(
            "socket,id=m,path={},server=on,wait=off",
            sock.display()
        ))
        .args(["--monitor", "chardev=m"])
        .arg("--pidfile")
        .arg(&pidfile)
        .arg("--daemonize")
        .output()
        .expect("run qemu-storage-daemon");
    assert!(out.status.success(), "{}", stderr_of(&out));
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid");
    let _qsd = Qsd(pid);
    let stream = std::os::unix::net::UnixStream::connect(&sock).expect("connect QMP");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    let mut line = String::new();
    let mut next = |reader: &mut BufReader<_>| -> Value {
        loop {
            line.clear();
            reader.read_line(&mut line).expect("QMP line");
            let v: Value = serde_json::from_str(&line).expect("QMP JSON");
            if v.get("event").is_none() {
                return v;
            }
        }
    };
    next(&mut reader); // greeting
    for cmd in ["qmp_capabilities", "query-named-block-nodes"] {
        writeln!(writer, "{}", json!({ "execute": cmd })).expect("send");
        let reply = next(&mut reader);
        if cmd == "query-named-block-nodes" {
            return reply["return"].clone();
        }
    }
    unreachable!()
}

/// The entries without their node names (generated names differ), ordered.
fn comparable(nodes: Vec<Value>) -> Vec<Value> {
    let mut nodes: Vec<Value> = nodes
        .into_iter()
        .map(|mut n| {
            n.as_object_mut().expect("object").remove("node-name");
            n
        })
        .collect();
    nodes.sort_by_key(|n| n.to_string());
    nodes
}

#[tokio::test]
async fn query_named_block_nodes_matches_qsd() {
    let Some(_serial) = begin().await else {
        return;
    };
    for kind in [Kind::File, Kind::Qcow2, Kind::Qcow2Backing, Kind::Null] {
        let images = Images::create(kind);
        let blockdev = match kind {
            Kind::File => format!(
                "driver=file,node-name=top,read-only=on,filename={}",
                images.top()
            ),
            Kind::Null => "driver=null-co,node-name=top,read-only=on".to_string(),
            _ => format!(
                "driver=qcow2,node-name=top,read-only=on,file.driver=file,file.filename={}",
                images.top()
            ),
        };
        let theirs = qsd_named_block_nodes(images.dir.path(), &blockdev);
        let options = match kind {
            Kind::File => json!({"driver": "file", "filename": images.top()}),
            Kind::Null => json!({"driver": "null-co"}),
            _ => json!({"driver": "qcow2", "file": {"driver": "file", "filename": images.top()}}),
        };
        let mut options = options;
        options["node-name"] = json!("top");
        options["read-only"] = json!(true);
        let graph = NodeGraph::new();
        open::blockdev_add(
            &graph,
            block_core::BlockdevOptions::from_json(options).expect("options"),
        )
        .await
        .expect("open");
        for flat in [false, true] {
            let ours: Vec<Value> = graph
                .all()
                .iter()
                .map(|n| open::node_info(n, flat))
                .collect();
            let theirs = if flat {
                // QSD's flat form, rebuilt from the same daemon state: no backing-image, no
                // depth (asking it again would need a second daemon; the rule is QAPI's).
                theirs
                    .as_array()
                    .expect("array")
                    .iter()
                    .map(|n| {
                        let mut n = n.clone();
                        n["backing_file_depth"] = json!(0);
                        if let Some(image) = n["image"].as_object_mut() {
                            image.remove("backing-image");
                        }
                        n
                    })
                    .collect()
            } else {
                theirs.as_array().expect("array").clone()
            };
            assert_eq!(
                comparable(ours),
                comparable(theirs),
                "{kind:?}, flat={flat}"
            );
        }
        for n in graph.drain() {
            n.close().await.expect("close");
        }
    }
}

#[tokio::test]
async fn fast_zeroes_and_a_dropped_qcow2_keeps_its_data() {
    let Some(_serial) = begin().await else {
        return;
    };
    // fast write-zeroes: file (fallocate) and aligned qcow2 ranges are fast; an unaligned
    // qcow2 range would need writing zeroes, so it is refused with NotFast (ENOTSUP).
    let fast = ZeroFlags {
        fast: true,
        ..ZeroFlags::default()
    };
    for kind in [Kind::File, Kind::Qcow2] {
        let images = Images::create(kind);
        let stack = images.open(false).await;
        stack
            .node
            .io()
            .write_zeroes(65536, 65536, fast)
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: aligned fast zeroes: {e}"));
        if kind == Kind::Qcow2 {
            let err = stack
                .node
                .io()
                .write_zeroes(1000, 4096, fast)
                .await
                .expect_err("unaligned fast zeroes on qcow2");
            assert!(matches!(err, BlockError::NotFast), "{err}");
            assert_eq!(err.errno(), libc::ENOTSUP);
        }
        stack.close().await;
    }

    // A writable qcow2 node dropped without close still gets its metadata written.
    let images = Images::create(Kind::Qcow2);
    {
        let stack = images.open(false).await;
        stack
            .node
            .io()
            .write(0, &[0x42; 131072], WriteFlags::default())
            .await
            .expect("write");
        drop(stack);
    }
    // Dropping waited for the flush, and closed the file (releasing its lock).
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0x42 0 128k", &images.top()])
        .output()
        .expect("qemu-io");
    let ok = out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed");
    assert!(ok, "data written before the drop is readable by qemu-io");
    run("qemu-img", &["check", "-q", &images.top()]);
}

#[tokio::test]
async fn explicit_backing_choices() {
    let Some(_serial) = begin().await else {
        return;
    };
    let images = Images::create(Kind::Qcow2Backing);
    let file = json!({"driver": "file", "filename": images.top()});
    let read_at_1m = |node: Arc<Node>| async move {
        let mut buf = vec![0u8; 4096];
        node.io().read(MIB, &mut buf).await.expect("read");
        buf[0]
    };

    // `backing: null` (and keyval's "") opens no backing: the backing data is gone.
    for backing in [Value::Null, json!("")] {
        let graph = NodeGraph::new();
        let node = open::blockdev_add(
            &graph,
            block_core::BlockdevOptions::from_json(
                json!({"driver": "qcow2", "read-only": true, "file": file, "backing": backing}),
            )
            .expect("options"),
        )
        .await
        .expect("no backing");
        assert_eq!(graph.all().len(), 2, "no backing nodes opened");
        assert_eq!(read_at_1m(node).await, 0);
    }

    // Backing by node name.
    let graph = NodeGraph::new();
    open::blockdev_add(
        &graph,
        block_core::BlockdevOptions::from_json(
            json!({"driver": "qcow2", "node-name": "base", "read-only": true,
               "file": {"driver": "file", "filename": images.path("base.qcow2")}}),
        )
        .expect("options"),
    )
    .await
    .expect("base");
    let node = open::blockdev_add(
        &graph,
        block_core::BlockdevOptions::from_json(
            json!({"driver": "qcow2", "node-name": "top", "file": file, "backing": "base"}),
        )
        .expect("options"),
    )
    .await
    .expect("top over base");
    assert_eq!(read_at_1m(Arc::clone(&node)).await, 0x11);
    let users = graph.get("base").expect("base").users();
    assert_eq!(users.len(), 1);
    assert!(!users[0].writable, "a backing is attached read-only");
    assert_eq!(open::node_info(&node, false)["backing_file_depth"], 1);
    drop(node);
    for n in graph.drain() {
        n.close().await.expect("close");
    }

    // A missing backing file: QEMU's message.
    std::fs::remove_file(images.path("base.qcow2")).expect("remove base");
    let graph = NodeGraph::new();
    let err = open::blockdev_add(
        &graph,
        block_core::BlockdevOptions::from_json(json!({"driver": "qcow2", "file": file}))
            .expect("options"),
    )
    .await
    .expect_err("missing backing file");
    assert_eq!(
        err.to_string(),
        format!(
            "Could not open backing file: Could not open '{}': No such file or directory",
            images.path("base.qcow2")
        )
    );
    assert!(graph.all().is_empty(), "nothing left behind");
}

#[tokio::test]
async fn persistent_bitmaps_survive_a_close() {
    let Some(_serial) = begin().await else {
        return;
    };
    let images = Images::create(Kind::Qcow2);
    run("qemu-img", &["bitmap", "--add", &images.top(), "b0"]);
    let bitmap_flags = |name: &str| -> Option<Vec<String>> {
        let out = run("qemu-img", &["info", "-U", "--output=json", &images.top()]);
        let info: Value = serde_json::from_slice(&out.stdout).expect("qemu-img info JSON");
        let bitmaps = info["format-specific"]["data"]["bitmaps"]
            .as_array()?
            .clone();
        bitmaps.iter().find(|b| b["name"] == name).map(|b| {
            b["flags"]
                .as_array()
                .expect("flags")
                .iter()
                .map(|f| f.as_str().expect("flag").to_string())
                .collect()
        })
    };

    let stack = images.open(false).await;
    assert!(stack.node.supports_persistent_bitmaps());
    let b0 = stack.node.bitmap("b0").expect("b0 loaded from the image");
    assert!(b0.persistent() && b0.enabled() && !b0.inconsistent());
    assert_eq!(b0.granularity(), 65536);
    // While we hold the image, QEMU sees the bitmap in use.
    assert_eq!(
        bitmap_flags("b0"),
        Some(vec!["in-use".to_string(), "auto".to_string()])
    );
    stack
        .node
        .io()
        .write(MIB, &[1; 4096], WriteFlags::default())
        .await
        .expect("write");
    let new = block_core::DirtyBitmap::new("b1", SIZE, 131072, true);
    new.set_enabled(false);
    new.set_range(2 * MIB, 1);
    stack.node.add_bitmap(Arc::new(new)).expect("add b1");
    stack
        .node
        .add_bitmap(Arc::new(block_core::DirtyBitmap::new(
            "temp", SIZE, 65536, false,
        )))
        .expect("add a transient bitmap");
    stack.close().await;

    assert_eq!(bitmap_flags("b0"), Some(vec!["auto".to_string()]));
    assert_eq!(bitmap_flags("b1"), Some(vec![]));
    assert_eq!(
        bitmap_flags("temp"),
        None,
        "transient bitmaps are not stored"
    );
    run("qemu-img", &["check", "-q", &images.top()]);

    // Read back: the dirty chunks are where the writes were.
    let stack = images.open(true).await;
    let b0 = stack.node.bitmap("b0").expect("b0");
    assert_eq!(b0.extent(0, MIB), (MIB, false));
    assert!(b0.extent(MIB, SIZE - MIB).1);
    let b1 = stack.node.bitmap("b1").expect("b1");
    assert!(!b1.enabled());
    assert_eq!(b1.granularity(), 131072);
    assert!(b1.extent(2 * MIB, 1).1);
    stack.close().await;
}

#[tokio::test]
async fn compressed_qcow2_reads_back() {
    let Some(_serial) = begin().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("src.raw");
    let mut data = vec![0u8; SIZE as usize];
    for (i, chunk) in data
        .chunks_mut(65536)
        .enumerate()
        .filter(|(i, _)| i % 3 == 0)
    {
        chunk.copy_from_slice(&pattern(65536, i as u8));
    }
    std::fs::write(&raw, &data).expect("write source");
    let qcow2 = dir.path().join("c.qcow2").to_string_lossy().into_owned();
    let raw = raw.to_string_lossy().into_owned();
    run(
        "qemu-img",
        &["convert", "-c", "-f", "raw", "-O", "qcow2", &raw, &qcow2],
    );
    let graph = NodeGraph::new();
    let node = open::blockdev_add(
        &graph,
        block_core::BlockdevOptions::from_json(json!({"driver": "qcow2", "read-only": true,
               "file": {"driver": "file", "filename": qcow2}}))
        .expect("options"),
    )
    .await
    .expect("open compressed image");
    let mut buf = vec![0u8; SIZE as usize];
    node.io().read(0, &mut buf).await.expect("read");
    assert!(buf == data, "compressed clusters decompress to the source");
    let e = node.io().block_status(0, 65536).await.expect("status");
    assert!(e.data && e.depth == 1, "{e:?}");
    drop(node);
    for n in graph.drain() {
        n.close().await.expect("close");
    }

    // Overwriting part of a compressed cluster rewrites it uncompressed.
    let node = open::blockdev_add(
        &graph,
        block_core::BlockdevOptions::from_json(
            json!({"driver": "qcow2", "file": {"driver": "file", "filename": qcow2}}),
        )
        .expect("options"),
    )
    .await
    .expect("open writable");
    node.io()
        .write(8192, &[0x99; 4096], WriteFlags::default())
        .await
        .expect("write into a compressed cluster");
    drop(node);
    for n in graph.drain() {
        n.close().await.expect("close");
    }
    run("qemu-img", &["check", "-q", &qcow2]);
    data[8192..12288].fill(0x99);
    std::fs::write(&raw, &data).expect("write expected");
    run(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", &qcow2, &raw],
    );
}

mod random;
mod zeroes_race;
