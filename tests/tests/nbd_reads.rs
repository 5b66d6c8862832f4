//! Structured read replies, chunk by chunk, against qemu-storage-daemon on the same image:
//! holes at the image's own granularity, and the errors of reads over the 32 MiB maximum.

use blockexportd_tests::{
    qemu_img_create, qemu_io, require_python_nbd, require_tools, run_ok, Daemon, Flavor,
};
use serde_json::{json, Value};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;

/// Reads each `[offset, length, df]` of argv[2] (JSON) with `pread_structured` and prints,
/// for each, the chunks the callback saw (`[status, offset, length]`, status 1 for data and
/// 2 for a hole) or the error's name.
const CHUNKS: &str = r#"
import json, nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.set_strict_mode(0)  # let oversized requests reach the server
out = []
for off, n, df in json.loads(sys.argv[2]):
    chunks = []
    def cb(buf, offset, status, err):
        chunks.append([status, offset, len(buf)])
        return 0
    try:
        h.pread_structured(n, off, cb, flags=nbd.CMD_FLAG_DF if df else 0)
        out.append(chunks)
    except nbd.Error as e:
        out.append({"error": e.errno, "chunks": chunks})
print(json.dumps(out))
"#;

fn chunks(flavor: Flavor, blockdevs: &[String], node: &str, reads: &Value) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let mut args: Vec<String> = Vec::new();
    for b in blockdevs {
        args.push("--blockdev".into());
        args.push(b.clone());
    }
    args.push("--nbd-server".into());
    args.push(format!("addr.type=unix,addr.path={}", sock.display()));
    args.push("--export".into());
    args.push(format!("type=nbd,id=e0,node-name={node},name=disk"));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start_in(flavor, dir, &argv);
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let out = Command::new("/usr/bin/python3")
        .args(["-c", CHUNKS, &uri, &reads.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{flavor:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(d);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().unwrap().clone()
}

fn both(blockdevs: &[String], node: &str, reads: &Value) -> (Vec<Value>, Vec<Value>) {
    (
        chunks(Flavor::Blockexportd, blockdevs, node, reads),
        chunks(Flavor::Qsd, blockdevs, node, reads),
    )
}

fn file_node(image: &Path) -> String {
    format!("driver=file,filename={},node-name=f0", image.display())
}

const DATA: i64 = 1;
const HOLE: i64 = 2;

#[test]
fn sparse_reads_match_qsd_at_the_cluster_granularity() {
    if !require_tools(&["qemu-img", "qemu-io", "qemu-storage-daemon"]) || !require_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("c512.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512"])
            .arg(&image)
            .arg("1M"),
    );
    qemu_io(
        &["-f", "qcow2", image.to_str().unwrap()],
        &[
            "write -P 1 0 2048",
            "write -P 2 2560 1024",
            "write -P 3 64k 128k",
            "write -z 300k 4k",
        ],
    );
    let blockdevs = [
        file_node(&image),
        "driver=qcow2,file=f0,node-name=q0".into(),
    ];
    let reads = json!([
        [2048, 1024, false],
        [0, 4096, false],
        [4096, 512, false],
        [300 * 1024, 4096, false],
        [64 * 1024, 128 * 1024, false],
        [0, 1 << 20, false],
        [2048, 1024, true],
    ]);
    let (ours, qsd) = both(&blockdevs, "q0", &reads);
    // The case of the issue: a zero cluster at 2048, data at 2560.
    assert_eq!(ours[0], json!([[HOLE, 2048, 512], [DATA, 2560, 512]]));
    // All data: one chunk. With DF: one data chunk whatever the range holds.
    assert_eq!(ours[4].as_array().unwrap().len(), 4, "{}", ours[4]);
    assert_eq!(ours[6], json!([[DATA, 2048, 1024]]));
    for (i, (a, b)) in ours.iter().zip(&qsd).enumerate() {
        assert_eq!(a, b, "read {} differs from QSD", reads[i]);
    }
}

#[test]
fn sparse_reads_of_a_raw_file_match_qsd() {
    if !require_tools(&["qemu-img", "qemu-io", "qemu-storage-daemon"]) || !require_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    qemu_img_create(&image, "raw", "1M");
    qemu_io(
        &["-f", "raw", image.to_str().unwrap()],
        &["write -P 1 0 4k", "write -P 2 64k 8k", "write -P 3 200k 4k"],
    );
    let reads = json!([
        [0, 8192, false],
        [60 * 1024, 8192, false],
        [1000, 5000, false],
        [64 * 1024, 8192, false],
        [0, 1 << 20, false],
    ]);
    let file = std::fs::File::open(&image).unwrap();
    // SAFETY: lseek on a descriptor that `file` keeps open; no memory is involved.
    let hole = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_HOLE) };
    if hole != 4096 {
        // A file system without holes (or without SEEK_HOLE) reports data everywhere.
        eprintln!(
            "skipping: the file system of {} keeps no holes",
            image.display()
        );
        return;
    }
    let (ours, qsd) = both(&[file_node(&image)], "f0", &reads);
    assert_eq!(ours[0], json!([[DATA, 0, 4096], [HOLE, 4096, 4096]]));
    assert_eq!(ours[3], json!([[DATA, 64 * 1024, 8192]]));
    for (i, (a, b)) in ours.iter().zip(&qsd).enumerate() {
        assert_eq!(a, b, "read {} differs from QSD", reads[i]);
    }
}

#[test]
fn reads_over_32_mib_get_einval_and_eoverflow_only_with_df() {
    if !require_tools(&["qemu-img", "qemu-storage-daemon"]) || !require_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    qemu_img_create(&image, "raw", "64M");
    let reads = json!([
        [0, 33 << 20, false],
        [0, 33 << 20, true],
        [0, 32 << 20, false],
    ]);
    let (ours, qsd) = both(&[file_node(&image)], "f0", &reads);
    assert_eq!(ours[0], json!({"error": "EINVAL", "chunks": []}));
    assert_eq!(qsd[0], ours[0]);
    // "A server MAY reject a client's request with the error NBD_EOVERFLOW if the length is
    // too large to send without fragmentation" (QSD 10 answers EINVAL there too).
    assert_eq!(ours[1], json!({"error": "EOVERFLOW", "chunks": []}));
    assert!(
        qsd[1] == ours[1] || qsd[1] == json!({"error": "EINVAL", "chunks": []}),
        "{}",
        qsd[1]
    );
    // The maximum itself is served (a hole, in one chunk, on both).
    assert_eq!(ours[2], qsd[2]);
    assert!(ours[2].is_array(), "{}", ours[2]);
}
