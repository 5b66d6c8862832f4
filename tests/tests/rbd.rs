//! The `rbd` driver against a real (throwaway, one-node) Ceph cluster (`tests/src/ceph.rs`):
//! RBD images exported over NBD, FUSE and vhost-user-blk, written and read by real clients and
//! checked byte for byte with `rbd export`; discard and write-zeroes seen by `rbd diff`;
//! `block_resize`; snapshots; cephx with a `secret` object; the exclusive lock between two
//! daemons; QEMU's error messages and `query-named-block-nodes`, compared with
//! qemu-storage-daemon on the same cluster; and the random-request model run over NBD.
//!
//! Needs Ceph (`ceph-mon ceph-osd ceph-common`) by the tool rule: skipped without, a failure
//! under `CI=true`.

use blockexportd_tests::ceph::{Cluster, POOL};
use blockexportd_tests::vhost_client::{ConnectOptions, VhostClient};
use blockexportd_tests::{pattern, qemu_io, require_python_nbd, require_tools, run_ok, under_ci};
use blockexportd_tests::{Daemon, Flavor};
use serde_json::{json, Value};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn cluster() -> Option<&'static Cluster> {
    if !require_tools(&[
        "qemu-io",
        "qemu-img",
        "nbdinfo",
        "nbdcopy",
        "qemu-storage-daemon",
    ]) {
        return None;
    }
    Cluster::shared()
}

/// The `--blockdev` of an rbd node `n0` on `image`, with `extra` options appended.
fn blockdev(c: &Cluster, image: &str, extra: &str) -> String {
    format!(
        "driver=rbd,node-name=n0,conf={},pool={POOL},image={image}{extra}",
        c.conf.display()
    )
}

/// A daemon serving node `n0` (`blockdev`) as NBD export `disk`; returns it and the URI.
fn nbd_daemon(flavor: Flavor, blockdev: &str, writable: bool) -> (Daemon, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("nbd.sock");
    let server = format!("addr.type=unix,addr.path={}", sock.display());
    let export = format!(
        "type=nbd,id=exp0,node-name=n0,name=disk,writable={}",
        if writable { "on" } else { "off" }
    );
    let d = Daemon::start_in(
        flavor,
        dir,
        &[
            "--blockdev",
            blockdev,
            "--nbd-server",
            &server,
            "--export",
            &export,
        ],
    );
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    (d, uri)
}

/// Stops the daemon, which must exit cleanly and quietly.
fn stop(mut d: Daemon) {
    let out = d.terminate();
    assert!(out.status.success(), "daemon exit: {out:?}");
    assert!(
        out.stderr.is_empty(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_file(dir: &Path, name: &str, data: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, data).expect("write");
    path.to_string_lossy().into_owned()
}

/// Asserts equality of two large byte strings without printing them.
fn assert_bytes(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}");
    }
}

#[test]
fn nbd_writes_reach_the_image_byte_for_byte() {
    let Some(c) = cluster() else { return };
    let size = 16 * MIB;
    let image = c.create_image("nbd", size);
    let (d, uri) = nbd_daemon(Flavor::Blockexportd, &blockdev(c, &image, ""), true);
    let tmp = tempfile::tempdir().expect("tempdir");
    // A whole image of data through nbdcopy, then patterns at unaligned places by qemu-io.
    let mut model = pattern(size as usize, 11);
    let src = write_file(tmp.path(), "src.raw", &model);
    run_ok(Command::new("nbdcopy").args([&src, &uri]));
    qemu_io(
        &["-f", "raw", &uri],
        &[
            "write -P 0x5a 4095 513",
            "write -P 0xa5 3M 64k",
            "write -P 0x33 15M 1M",
            // A FUA write (a write then a flush in the driver) lands like the others.
            "write -f -P 0x66 8M 4k",
            "read -P 0x5a 4095 513",
            "read -P 0xa5 3M 64k",
            "flush",
        ],
    );
    model[4095..4095 + 513].fill(0x5a);
    model[3 << 20..(3 << 20) + (64 << 10)].fill(0xa5);
    model[15 << 20..].fill(0x33);
    model[8 << 20..(8 << 20) + 4096].fill(0x66);
    let back = tmp.path().join("back.raw");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&back));
    assert_bytes(&std::fs::read(&back).expect("read"), &model, "nbdcopy back");
    stop(d);
    assert_bytes(&c.export(&image), &model, "rbd export");
}

#[test]
fn fuse_export_of_an_rbd_image() {
    let Some(c) = cluster() else { return };
    if !Path::new("/dev/fuse").exists() {
        assert!(!under_ci(), "/dev/fuse is missing (CI=true)");
        eprintln!("skipping: /dev/fuse is missing");
        return;
    }
    let size = 8 * MIB;
    let image = c.create_image("fuse", size);
    let d = Daemon::start(&["--blockdev", &blockdev(c, &image, "")]);
    let mountpoint = d.path("mnt");
    std::fs::write(&mountpoint, b"").expect("mountpoint");
    let mut q = d.qmp();
    q.ok(
        "block-export-add",
        json!({"type": "fuse", "id": "fx", "node-name": "n0", "writable": true,
               "mountpoint": mountpoint.to_str().expect("utf-8")}),
    );
    let mut model = vec![0u8; size as usize];
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&mountpoint)
        .expect("open the mounted image");
    assert_eq!(f.metadata().expect("stat").len(), size);
    for (i, at) in [0u64, 5 * MIB + 777, size - 4096].into_iter().enumerate() {
        let data = pattern(4096, 20 + i as u64);
        f.seek(SeekFrom::Start(at)).expect("seek");
        f.write_all(&data).expect("write");
        model[at as usize..at as usize + 4096].copy_from_slice(&data);
    }
    f.sync_all().expect("fsync");
    let mut all = Vec::new();
    f.seek(SeekFrom::Start(0)).expect("seek");
    f.read_to_end(&mut all).expect("read");
    assert_bytes(&all, &model, "read through FUSE");
    drop(f);
    q.ok("block-export-del", json!({"id": "fx"}));
    q.wait_event("BLOCK_EXPORT_DELETED");
    drop(q);
    stop(d);
    assert_bytes(&c.export(&image), &model, "rbd export");
}

#[test]
fn vhost_user_blk_export_of_an_rbd_image() {
    let Some(c) = cluster() else { return };
    let size = 8 * MIB;
    let image = c.create_image("vhost", size);
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("vhost.sock");
    let export = format!(
        "type=vhost-user-blk,id=v0,node-name=n0,writable=on,num-queues=2,\
         addr.type=unix,addr.path={}",
        sock.display()
    );
    let d = Daemon::start_in(
        Flavor::Blockexportd,
        dir,
        &["--blockdev", &blockdev(c, &image, ""), "--export", &export],
    );
    let opts = ConnectOptions {
        num_queues: 2,
        ..ConnectOptions::default()
    };
    let mut client = VhostClient::connect_wait(&sock, &opts, Duration::from_secs(20));
    assert_eq!(client.capacity(), size);
    let mut model = vec![0u8; size as usize];
    for (i, at) in [0u64, 4 * MIB - 4096, 7 * MIB].into_iter().enumerate() {
        let data = pattern(64 << 10, 40 + i as u64);
        client.write(at, &data);
        model[at as usize..at as usize + data.len()].copy_from_slice(&data);
    }
    client.flush();
    assert_bytes(&client.read(0, 1 << 20), &model[..1 << 20], "read");
    assert_bytes(
        &client.read(4 * MIB - 4096, 64 << 10),
        &model[(4 * MIB - 4096) as usize..(4 * MIB - 4096) as usize + (64 << 10)],
        "read across two objects",
    );
    drop(client);
    stop(d);
    assert_bytes(&c.export(&image), &model, "rbd export");
}

#[test]
fn discard_and_write_zeroes_reach_the_image() {
    let Some(c) = cluster() else { return };
    let size = 16 * MIB;
    let image = c.create_image("zero", size);
    let (d, uri) = nbd_daemon(
        Flavor::Blockexportd,
        &blockdev(c, &image, ",discard=unmap"),
        true,
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut model = pattern(size as usize, 3);
    let src = write_file(tmp.path(), "src.raw", &model);
    run_ok(Command::new("nbdcopy").args([&src, &uri]));
    assert_eq!(c.diff(&image), vec![(0, size)], "all written");
    // Object 0 discarded, object 1 zeroed with unmap allowed, object 2 zeroed thick.
    qemu_io(
        &["-f", "raw", &uri],
        &[
            "discard 0 4M",
            "write -z -u 4M 4M",
            "write -z 8M 4M",
            "flush",
        ],
    );
    model[..12 << 20].fill(0);
    let extents = c.diff(&image);
    assert!(
        extents.iter().all(|&(off, _)| off >= 8 * MIB),
        "discarded and unmapped objects are gone: {extents:?}"
    );
    assert_eq!(
        extents.iter().map(|e| e.1).sum::<u64>(),
        8 * MIB,
        "the thick zeroes and the data stay allocated: {extents:?}"
    );
    // Block status shows the holes (fast-diff), and they read as zeroes.
    let map = run_ok(
        Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "raw"])
            .arg(&uri),
    );
    let map: Value = serde_json::from_slice(&map.stdout).expect("map json");
    let first = &map[0];
    assert_eq!(
        (
            first["start"].as_u64(),
            first["length"].as_u64(),
            &first["data"],
            &first["zero"]
        ),
        (Some(0), Some(8 * MIB), &json!(false), &json!(true)),
        "{map}"
    );
    stop(d);
    assert_bytes(&c.export(&image), &model, "rbd export");
}

#[test]
fn block_resize_grows_the_image() {
    let Some(c) = cluster() else { return };
    let image = c.create_image("resize", 4 * MIB);
    let (d, uri) = nbd_daemon(Flavor::Blockexportd, &blockdev(c, &image, ""), true);
    let mut q = d.qmp();
    q.ok("block_resize", json!({"node-name": "n0", "size": 12 * MIB}));
    assert_eq!(c.size(&image), 12 * MIB, "rbd info");
    let out = run_ok(Command::new("nbdinfo").args(["--size", &uri]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (12 * MIB).to_string()
    );
    qemu_io(
        &["-f", "raw", &uri],
        &["write -P 0x42 11M 1M", "read -P 0x42 11M 1M"],
    );
    drop(q);
    stop(d);
    assert!(c.export(&image)[11 << 20..].iter().all(|&b| b == 0x42));
}

#[test]
fn a_snapshot_is_exported_read_only() {
    let Some(c) = cluster() else { return };
    let size = 4 * MIB;
    let tmp = tempfile::tempdir().expect("tempdir");
    let before = pattern(size as usize, 5);
    let src = write_file(tmp.path(), "before.raw", &before);
    let image = c.create_image("snap", size);
    let (d, uri) = nbd_daemon(Flavor::Blockexportd, &blockdev(c, &image, ""), true);
    run_ok(Command::new("nbdcopy").args([&src, &uri]));
    stop(d);
    c.rbd(&["snap", "create", &format!("{POOL}/{image}@s1")]);
    // The image moves on; the snapshot keeps the old bytes.
    let (d, uri) = nbd_daemon(Flavor::Blockexportd, &blockdev(c, &image, ""), true);
    qemu_io(&["-f", "raw", &uri], &["write -P 0x99 0 1M"]);
    stop(d);

    // Writable: refused with QEMU's message, by both daemons.
    for flavor in [Flavor::Blockexportd, Flavor::Qsd] {
        let d = Daemon::start_flavor(flavor, &[]);
        let mut q = d.qmp();
        let options = json!({"driver": "rbd", "node-name": "s", "conf": c.conf, "pool": POOL,
                             "image": image, "snapshot": "s1"});
        let (class, desc) = q.err("blockdev-add", options);
        assert_eq!(
            (class.as_str(), desc.as_str()),
            ("GenericError", "rbd snapshots are read-only"),
            "{flavor:?}"
        );
        let auto = json!({"driver": "rbd", "node-name": "s", "conf": c.conf, "pool": POOL,
                          "image": image, "snapshot": "s1", "auto-read-only": true});
        q.ok("blockdev-add", auto);
        let nodes = q.ok("query-named-block-nodes", json!({}));
        assert_eq!(nodes[0]["ro"], true, "{flavor:?}: {nodes}");
    }
    let (d, uri) = nbd_daemon(
        Flavor::Blockexportd,
        &blockdev(c, &image, ",snapshot=s1,read-only=on"),
        false,
    );
    let back = tmp.path().join("back.raw");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&back));
    assert_bytes(
        &std::fs::read(&back).expect("read"),
        &before,
        "the snapshot",
    );
    stop(d);
    assert_bytes(
        &c.export(&format!("{image}@s1")),
        &before,
        "rbd export of the snapshot",
    );
}

/// cephx with the key in a `secret` object, the monitors from `server`, and a configuration
/// file that names neither: both daemons open the image.
#[test]
fn cephx_with_a_secret_object() {
    let Some(c) = cluster() else { return };
    let image = c.create_image("cephx", 4 * MIB);
    let empty = c.path("empty.conf");
    std::fs::write(&empty, "[global]\n").expect("conf");
    let secret = format!("secret,id=sec0,data={},format=base64", c.admin_key);
    let node = format!(
        "driver=rbd,node-name=n0,conf={},pool={POOL},image={image},user=admin,key-secret=sec0,\
         auth-client-required.0=cephx,server.0.host=127.0.0.1,server.0.port={}",
        empty.display(),
        c.port
    );
    for flavor in [Flavor::Blockexportd, Flavor::Qsd] {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("nbd.sock");
        let server = format!("addr.type=unix,addr.path={}", sock.display());
        let d = Daemon::start_in(
            flavor,
            dir,
            &[
                "--object",
                &secret,
                "--blockdev",
                &node,
                "--nbd-server",
                &server,
                "--export",
                "type=nbd,id=exp0,node-name=n0,name=disk,writable=on",
            ],
        );
        let uri = format!("nbd+unix:///disk?socket={}", sock.display());
        qemu_io(
            &["-f", "raw", &uri],
            &["write -P 7 0 64k", "read -P 7 0 64k"],
        );
        drop(d);
    }
}

/// A missing pool and a missing image: QEMU's messages, compared with QSD on the same
/// cluster. A wrong key and a cluster that does not answer fail within librados' timeouts,
/// which the driver sets (QSD waits for `client_mount_timeout`, 300 s by default, and is not
/// run on those).
#[test]
fn errors_are_qemus_and_bounded() {
    let Some(c) = cluster() else { return };
    let image = c.create_image("err", MIB);
    let base = json!({"driver": "rbd", "node-name": "n0", "conf": c.conf, "pool": POOL,
                      "image": image});
    let with = |extra: Value| {
        let mut o = base.clone();
        for (k, v) in extra.as_object().expect("object") {
            o[k] = v.clone();
        }
        o
    };
    let cases = [
        (
            with(json!({"pool": "nopool"})),
            "error opening pool nopool: No such file or directory".to_string(),
        ),
        (
            with(json!({"image": "noimage"})),
            "error reading header from noimage: No such file or directory".to_string(),
        ),
        (
            with(json!({"encrypt": {"format": "luks", "key-secret": "x"}})),
            String::new(),
        ),
    ];
    for flavor in [Flavor::Blockexportd, Flavor::Qsd] {
        let d = Daemon::start_flavor(flavor, &[]);
        let mut q = d.qmp();
        for (options, want) in &cases {
            let (class, desc) = q.err("blockdev-add", options.clone());
            assert_eq!(class, "GenericError", "{flavor:?} {options}");
            if !want.is_empty() {
                assert_eq!(&desc, want, "{flavor:?} {options}");
            } else if flavor == Flavor::Blockexportd {
                assert_eq!(
                    desc,
                    "RBD image encryption is not supported by blockexportd"
                );
            }
        }
    }
    let empty = c.path("empty-err.conf");
    std::fs::write(&empty, "[global]\n").expect("conf");
    let dead_port = blockexportd_tests::free_port();
    let wrong_key =
        String::from_utf8(run_ok(Command::new("ceph-authtool").arg("--gen-print-key")).stdout)
            .expect("key");
    let d = Daemon::start(&[
        "--object",
        &format!("secret,id=bad,data={},format=base64", wrong_key.trim()),
    ]);
    let stopped = json!({"driver": "rbd", "node-name": "n1", "conf": empty, "pool": POOL,
                         "image": image,
                         "server": [{"host": "127.0.0.1", "port": dead_port.to_string()}]});
    let refused = json!({"driver": "rbd", "node-name": "n2", "conf": empty, "pool": POOL,
                         "image": image, "user": "admin", "key-secret": "bad",
                         "server": [{"host": "127.0.0.1", "port": c.port.to_string()}]});
    let handles: Vec<_> = [stopped, refused]
        .into_iter()
        .map(|options| {
            let mut q = d.qmp();
            std::thread::spawn(move || q.err("blockdev-add", options))
        })
        .collect();
    for h in handles {
        let (class, desc) = h.join().expect("thread");
        assert_eq!(
            (class.as_str(), desc.as_str()),
            ("GenericError", "error connecting: Connection timed out")
        );
    }
}

/// Two daemons never both write one image: the second writable open fails while the first
/// holds the exclusive lock; a reader may open; after the first is gone, the lock is free.
#[test]
fn the_exclusive_lock_keeps_a_second_writer_out() {
    let Some(c) = cluster() else { return };
    let image = c.create_image("lock", 4 * MIB);
    let (first, uri) = nbd_daemon(Flavor::Blockexportd, &blockdev(c, &image, ""), true);
    qemu_io(&["-f", "raw", &uri], &["write -P 1 0 64k"]);
    let second = Daemon::start(&[]);
    let mut q = second.qmp();
    let options = json!({"driver": "rbd", "node-name": "n0", "conf": c.conf, "pool": POOL,
                         "image": image});
    let (class, desc) = q.err("blockdev-add", options.clone());
    assert_eq!(
        (class.as_str(), desc.as_str()),
        (
            "GenericError",
            format!("error acquiring the exclusive lock of {image}: Read-only file system")
                .as_str()
        )
    );
    let mut reader = options.clone();
    reader["read-only"] = json!(true);
    reader["node-name"] = json!("r0");
    q.ok("blockdev-add", reader);
    // An inactive node (migration hand-off) holds no lock; activating it takes the lock,
    // which is refused while the first writer holds it.
    let mut inactive = options.clone();
    inactive["node-name"] = json!("i0");
    inactive["active"] = json!(false);
    q.ok("blockdev-add", inactive);
    let (class, desc) = q.err(
        "blockdev-set-active",
        json!({"node-name": "i0", "active": true}),
    );
    assert_eq!(class, "GenericError");
    assert!(desc.contains("Read-only file system"), "{desc}");
    // The first writer goes on writing.
    qemu_io(
        &["-f", "raw", &uri],
        &["write -P 2 64k 64k", "read -P 1 0 64k"],
    );
    stop(first);
    q.ok("blockdev-add", options);
    q.ok("blockdev-del", json!({"node-name": "n0"}));
    q.ok(
        "blockdev-set-active",
        json!({"node-name": "i0", "active": true}),
    );
    drop(q);
    stop(second);
    let data = c.export(&image);
    assert!(data[..64 << 10].iter().all(|&b| b == 1));
    assert!(data[64 << 10..128 << 10].iter().all(|&b| b == 2));
}

/// A writer killed with its lock held: the next writer's open waits for the dead client's
/// watch to expire (the OSD's `osd_client_watch_timeout`, 30 s), breaks the lock and writes.
#[test]
fn a_dead_writers_lock_is_broken_by_the_next() {
    let Some(c) = cluster() else { return };
    let image = c.create_image("deadlock", 4 * MIB);
    let (mut first, uri) = nbd_daemon(Flavor::Blockexportd, &blockdev(c, &image, ""), true);
    qemu_io(&["-f", "raw", &uri], &["write -P 3 0 64k", "flush"]);
    let mut child = first.child.take().expect("running");
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    // blockdev-add waits (QMP, whose replies the helper waits 60 s for) rather than
    // --blockdev, whose startup the helper gives 20 s.
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("nbd.sock");
    let server = format!("addr.type=unix,addr.path={}", sock.display());
    let second = Daemon::start_in(Flavor::Blockexportd, dir, &["--nbd-server", &server]);
    let mut q = second.qmp();
    q.ok(
        "blockdev-add",
        json!({"driver": "rbd", "node-name": "n0", "conf": c.conf, "pool": POOL, "image": image}),
    );
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "n0", "name": "disk", "writable": true}),
    );
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    qemu_io(
        &["-f", "raw", &uri],
        &["read -P 3 0 64k", "write -P 4 64k 64k"],
    );
    drop(q);
    stop(second);
    assert!(c.export(&image)[64 << 10..128 << 10]
        .iter()
        .all(|&b| b == 4));
}

/// `query-named-block-nodes` shows an rbd node as QSD does.
#[test]
fn named_block_nodes_as_qsd() {
    let Some(c) = cluster() else { return };
    let image = c.create_image("info", 8 * MIB);
    let mut seen = Vec::new();
    for flavor in [Flavor::Blockexportd, Flavor::Qsd] {
        let d = Daemon::start_flavor(
            flavor,
            &["--blockdev", &blockdev(c, &image, ",read-only=on")],
        );
        let mut q = d.qmp();
        seen.push(q.ok("query-named-block-nodes", json!({})));
    }
    assert_eq!(seen[0], seen[1]);
    assert_eq!(seen[0][0]["image"]["cluster-size"], 4 * MIB);
}

/// The random write/zero/discard/flush/read batches of `random_ops.rs`, checked against the
/// model as they run, on an rbd-backed NBD export; the image afterwards by `rbd export`.
#[test]
fn random_ops_on_an_rbd_export_match_the_model() {
    let Some(c) = cluster() else { return };
    if !require_python_nbd() {
        return;
    }
    let seed = blockexportd_tests::model::seed_from_env("RANDOM_OPS_SEED");
    let batches = blockexportd_tests::model::count_from_env("RANDOM_OPS_BATCHES", 100);
    eprintln!("random ops on rbd: RANDOM_OPS_SEED={seed}");
    let size = 4 * MIB;
    for (i, (discard, detect)) in [("ignore", "off"), ("unmap", "unmap")]
        .into_iter()
        .enumerate()
    {
        let image = c.create_image("random", size);
        let tmp = tempfile::tempdir().expect("tempdir");
        let model_in = tmp.path().join("model-in.raw");
        let model_out = tmp.path().join("model-out.raw");
        std::fs::write(&model_in, vec![0u8; size as usize]).expect("model");
        let (d, uri) = nbd_daemon(
            Flavor::Blockexportd,
            &blockdev(
                c,
                &image,
                &format!(",discard={discard},detect-zeroes={detect}"),
            ),
            true,
        );
        let out = Command::new("/usr/bin/python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("random_ops.py"))
            .arg(&uri)
            .arg(seed.wrapping_add(i as u64).to_string())
            .arg(batches.to_string())
            .arg("4096")
            .arg(&model_in)
            .arg(&model_out)
            .output()
            .expect("run random_ops.py");
        assert!(
            out.status.success(),
            "discard={discard} detect-zeroes={detect} (RANDOM_OPS_SEED={seed}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        stop(d);
        let model = std::fs::read(&model_out).expect("model");
        assert_bytes(&c.export(&image), &model, "rbd export against the model");
    }
}

/// The cluster goes away under a running export: requests fail (within librados' 30 s
/// operation timeout, which the driver sets) instead of hanging, and the daemon still shuts
/// down, in bounded time.
#[test]
fn a_cluster_stopped_under_an_export_fails_requests_in_bounded_time() {
    if cluster().is_none() {
        return;
    }
    // A cluster of its own: this one is killed.
    let c = Cluster::start();
    let image = c.create_image("gone", 16 * MIB);
    let (mut d, uri) = nbd_daemon(Flavor::Blockexportd, &blockdev(&c, &image, ""), true);
    qemu_io(
        &["-f", "raw", &uri],
        &["write -P 0x3c 0 64k", "read -P 0x3c 0 64k"],
    );
    c.kill();
    let started = std::time::Instant::now();
    let out = Command::new("timeout")
        .args([
            "-k",
            "5",
            "150",
            "qemu-io",
            "-f",
            "raw",
            &uri,
            "-c",
            "read 1M 4k",
        ])
        .output()
        .expect("qemu-io");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(124), "the read hung: {text}");
    assert!(text.contains("read failed"), "the read fails: {text}");
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "bounded: {:?}",
        started.elapsed()
    );
    // SIGTERM: the flush and close wait for the same timeouts, then the daemon exits.
    let started = std::time::Instant::now();
    let mut child = d.child.take().expect("running");
    blockexportd_tests::signal(child.id(), libc::SIGTERM);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            panic!("the daemon did not exit within 300 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.code().is_some(), "the daemon exited: {status:?}");
}
