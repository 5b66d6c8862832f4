//! NBD exports of the real blockexportd binary, checked with the real clients.

use blockexportd_tests::{
    daemon_binary, qemu_img_create, qemu_io, require_tools, run_ok, Daemon, Qmp,
};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn nbd_uri(d: &Daemon, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", d.path("nbd.sock").display())
}

fn start_with_image(format: &str, writable: bool) -> (Daemon, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join(format!("disk.{format}"));
    qemu_img_create(&image, format, "16M");
    qemu_io(
        &["-f", format, image.to_str().unwrap()],
        &["write -P 0x5a 0 1M", "write -P 0xa5 4M 64k"],
    );
    let sock = dir.path().join("nbd.sock");
    let mut args = vec![
        "--blockdev".to_string(),
        format!("driver=file,filename={},node-name=file0", image.display()),
    ];
    let mut node = "file0";
    if format == "qcow2" {
        args.push("--blockdev".into());
        args.push("driver=qcow2,file=file0,node-name=fmt0".into());
        node = "fmt0";
    }
    args.push("--nbd-server".into());
    args.push(format!("addr.type=unix,addr.path={}", sock.display()));
    args.push("--export".into());
    args.push(format!(
        "type=nbd,id=exp0,node-name={node},name=disk,writable={}",
        if writable { "on" } else { "off" }
    ));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start_in(blockexportd_tests::Flavor::Blockexportd, dir, &argv);
    (d, image)
}

#[test]
fn raw_export_reads_and_writes_byte_for_byte() {
    if !require_tools(&["qemu-img", "qemu-io", "nbdinfo"]) {
        return;
    }
    let (d, image) = start_with_image("raw", true);
    let uri = nbd_uri(&d, "disk");
    qemu_io(
        &["-f", "raw", &uri],
        &[
            "read -P 0x5a 0 1M",
            "read -P 0xa5 4M 64k",
            "write -P 0x11 8M 256k",
            "write -z 1M 64k",
            "discard 2M 64k",
            "flush",
            "read -P 0x11 8M 256k",
            "read -P 0 1M 64k",
        ],
    );
    let out = run_ok(Command::new("nbdinfo").args(["--json", &uri]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["exports"][0]["export-size"], 16 << 20, "{info}");
    assert_eq!(info["exports"][0]["is_read_only"], false, "{info}");
    // Writes through NBD are in the file: compare the export with the image itself.
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&image)
            .arg(&uri),
    );
    let mut q = d.qmp();
    assert_eq!(
        q.ok("query-block-exports", json!({})),
        json!([{"id": "exp0", "type": "nbd", "node-name": "file0", "shutting-down": false}])
    );
}

/// The daemon raises its soft descriptor limit to the hard one (NBD clients hold pipes for
/// zero-copy reads).
#[test]
fn descriptor_limit_is_raised_to_the_hard_limit() {
    // Start it with a soft limit below the hard one (inherited from this test process; the
    // other tests here need few descriptors).
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or write one `rlimit` through a pointer to `lim`.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
    }
    let original = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max.min(256);
    // SAFETY: as above.
    unsafe {
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    let soft = lim.rlim_cur;
    let (d, _image) = start_with_image("raw", false);
    // Back to what it was for the other tests of this process.
    lim.rlim_cur = original;
    // SAFETY: as above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    if soft == lim.rlim_max {
        eprintln!("the hard descriptor limit is {soft}: nothing to raise");
    }
    let pid = d.child.as_ref().expect("running").id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let v: Vec<&str> = line.split_whitespace().collect();
    // "Max open files  SOFT  HARD  files"
    assert_eq!(v[3], v[4], "{line}");
}

#[test]
fn qcow2_export_matches_the_image() {
    if !require_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let (mut d, image) = start_with_image("qcow2", true);
    let uri = nbd_uri(&d, "disk");
    qemu_io(
        &["-f", "raw", &uri],
        &["read -P 0x5a 0 1M", "write -P 0x33 12M 1M", "flush"],
    );
    let mut q = d.qmp();
    // qemu-io has exited, but the daemon may not have seen its connection end yet: a safe
    // removal is refused until it has (as in QEMU).
    loop {
        let r = q.execute("block-export-del", json!({"id": "exp0"}));
        match r["error"]["desc"].as_str() {
            None => break,
            Some("export 'exp0' still in use") => std::thread::yield_now(),
            Some(other) => panic!("block-export-del: {other}"),
        }
    }
    q.wait_event("BLOCK_EXPORT_DELETED");
    q.ok("quit", json!({}));
    let out = d.wait();
    assert!(out.status.success());
    // After a clean shutdown the qcow2 holds the write and is consistent.
    qemu_io(
        &["-f", "qcow2", "-r", image.to_str().unwrap()],
        &["read -P 0x33 12M 1M", "read -P 0x5a 0 1M"],
    );
    run_ok(
        Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&image),
    );
}

#[test]
fn read_only_export_refuses_writes() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let (d, _image) = start_with_image("raw", false);
    let uri = nbd_uri(&d, "disk");
    qemu_io(&["-r", "-f", "raw", &uri], &["read -P 0x5a 0 1M"]);
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "write 0 4k"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            || text.contains("denied")
            || text.contains("read-only")
            || text.contains("Operation not permitted"),
        "a write to a read-only export must fail: {text}"
    );
}

#[test]
fn export_lifecycle_over_qmp() {
    if !require_tools(&["qemu-io", "nbdinfo"]) {
        return;
    }
    let d = Daemon::start(&[
        "--blockdev",
        "driver=null-co,node-name=n0,size=1048576,read-zeroes=on",
    ]);
    let mut q = d.qmp();
    let sock = d.path("nbd2.sock");
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock.to_str().unwrap()}}}),
    );
    let (_, desc) = q.err(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock.to_str().unwrap()}}}),
    );
    assert_eq!(desc, "NBD server already running");
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "n0", "name": "zero"}),
    );
    let uri = format!("nbd+unix:///zero?socket={}", sock.display());
    qemu_io(&["-r", "-f", "raw", &uri], &["read -P 0 0 1M"]);
    // blockdev-del refuses a node in use by an export.
    let (_, desc) = q.err("blockdev-del", json!({"node-name": "n0"}));
    assert_eq!(desc, "Node n0 is in use");

    // A connected client makes `safe` fail and `hard` succeed.
    let mut client = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import nbd,sys; h=nbd.NBD(); h.connect_uri(sys.argv[1]); print('connected', flush=True); sys.stdin.read()",
            &uri,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(client.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "connected", "libnbd client failed to connect");
    let (_, desc) = q.err("block-export-del", json!({"id": "e0"}));
    assert_eq!(desc, "export 'e0' still in use");
    q.ok("block-export-del", json!({"id": "e0", "mode": "hard"}));
    let ev = q.wait_event("BLOCK_EXPORT_DELETED");
    assert_eq!(ev["data"], json!({"id": "e0"}));
    assert!(ev["timestamp"]["seconds"].is_u64());
    assert_eq!(q.ok("query-block-exports", json!({})), json!([]));
    drop(client.stdin.take());
    let _ = client.wait();

    // The deprecated commands, then nbd-server-stop ends every NBD export.
    q.ok("nbd-server-add", json!({"device": "n0"}));
    q.ok("nbd-server-add", json!({"device": "n0", "name": "second"}));
    q.ok("nbd-server-remove", json!({"name": "second"}));
    q.wait_event("BLOCK_EXPORT_DELETED");
    q.ok("nbd-server-stop", json!({}));
    let ev = q.wait_event("BLOCK_EXPORT_DELETED");
    assert_eq!(ev["data"], json!({"id": "n0"}));
    assert_eq!(q.ok("query-block-exports", json!({})), json!([]));
    let (_, desc) = q.err("nbd-server-stop", json!({}));
    assert_eq!(desc, "NBD server not running");
    q.ok("blockdev-del", json!({"node-name": "n0"}));
}

#[test]
fn short_form_exports_an_image_and_prints_the_uri() {
    if !require_tools(&["qemu-img", "qemu-io", "nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    qemu_img_create(&image, "qcow2", "8M");
    qemu_io(
        &["-f", "qcow2", image.to_str().unwrap()],
        &["write -P 0x42 64k 64k"],
    );
    let sock = dir.path().join("quick.sock");
    let mut child = Command::new(daemon_binary())
        .arg(&image)
        .args(["--socket", sock.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let uri = line
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        uri,
        format!("nbd+unix:///?socket={}", sock.display()),
        "{line}"
    );
    assert!(
        line.contains("qcow2") && line.contains("read-only"),
        "{line}"
    );
    qemu_io(
        &["-r", "-f", "raw", &uri],
        &["read -P 0x42 64k 64k", "read -P 0 0 64k"],
    );
    let out = run_ok(Command::new("nbdinfo").args(["--size", &uri]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (8 << 20).to_string()
    );
    blockexportd_tests::signal(child.id(), libc::SIGINT);
    assert!(child.wait().unwrap().success());
}

#[test]
fn nbd_server_on_tcp() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let port = blockexportd_tests::free_port().to_string();
    let d = Daemon::start(&[
        "--blockdev",
        "driver=null-co,node-name=n0,size=65536,read-zeroes=on",
        "--nbd-server",
        &format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
        "--export",
        "nbd,id=e,node-name=n0",
    ]);
    qemu_io(
        &["-r", "-f", "raw", &format!("nbd://127.0.0.1:{port}/n0")],
        &["read -P 0 0 64k"],
    );
    let mut q: Qmp = d.qmp();
    assert_eq!(q.ok("query-block-exports", json!({}))[0]["id"], "e");
}

#[test]
fn nbd_server_on_ipv6_and_inherited_fd() {
    use std::os::fd::AsRawFd;
    if !require_tools(&["qemu-io"]) {
        return;
    }
    // IPv6 loopback, when the machine has it.
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        let port = blockexportd_tests::free_port().to_string();
        let d = Daemon::start(&[
            "--blockdev",
            "driver=null-co,node-name=n0,size=65536,read-zeroes=on",
            "--nbd-server",
            &format!("addr.type=inet,addr.host=::1,addr.port={port}"),
            "--export",
            "nbd,id=e,node-name=n0",
        ]);
        qemu_io(
            &["-r", "-f", "raw", &format!("nbd://[::1]:{port}/n0")],
            &["read -P 0 0 64k"],
        );
        drop(d);
    }
    // A listening socket handed over as a descriptor (`addr.type=fd`).
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("inherited.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fd = listener.as_raw_fd();
    blockexportd_tests::clear_cloexec(fd);
    let d = Daemon::start_in(
        blockexportd_tests::Flavor::Blockexportd,
        tempfile::tempdir().unwrap(),
        &[
            "--blockdev",
            "driver=null-co,node-name=n0,size=65536,read-zeroes=on",
            "--nbd-server",
            &format!("addr.type=fd,addr.str={fd}"),
            "--export",
            "nbd,id=e,node-name=n0",
        ],
    );
    drop(listener);
    qemu_io(
        &[
            "-r",
            "-f",
            "raw",
            &format!("nbd+unix:///n0?socket={}", sock.display()),
        ],
        &["read -P 0 0 64k"],
    );
    drop(d);
}
