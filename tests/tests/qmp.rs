//! QMP and command-line behaviour of the real blockexportd binary, and where QSD answers a
//! command, the same shape and error class as QSD.

use blockexportd_tests::{comparable, daemon_binary, require_tool, Daemon, Flavor, Qmp};
use serde_json::{json, Value};
use std::process::Command;

#[test]
fn greeting_and_capabilities_negotiation() {
    let d = Daemon::start(&[]);
    let mut q = Qmp::connect(&d.qmp_path);
    let version = q.greeting["QMP"]["version"].clone();
    assert!(version["qemu"]["major"].is_u64(), "{}", q.greeting);
    assert!(version["package"].is_string());
    assert!(q.greeting["QMP"]["capabilities"].is_array());
    // Before negotiation only qmp_capabilities is allowed.
    let r = q.execute("query-version", json!({}));
    assert_eq!(r["error"]["class"], "CommandNotFound", "{r}");
    assert_eq!(q.ok("qmp_capabilities", json!({})), json!({}));
    let r = q.execute("qmp_capabilities", json!({}));
    assert_eq!(r["error"]["class"], "CommandNotFound", "{r}");
    let v = q.ok("query-version", json!({}));
    assert_eq!(v["qemu"], version["qemu"]);
    let commands = q.ok("query-commands", json!({}));
    let names: Vec<&str> = commands
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for c in [
        "qmp_capabilities",
        "query-version",
        "query-commands",
        "quit",
        "blockdev-add",
        "blockdev-del",
        "query-named-block-nodes",
        "block_resize",
        "object-add",
        "object-del",
        "nbd-server-start",
        "nbd-server-stop",
        "nbd-server-add",
        "nbd-server-remove",
        "block-export-add",
        "block-export-del",
        "query-block-exports",
    ] {
        assert!(names.contains(&c), "query-commands lacks {c}: {names:?}");
    }
}

#[test]
fn id_is_echoed_verbatim() {
    let d = Daemon::start(&[]);
    let mut q = d.qmp();
    for id in [json!(1), json!("abc"), json!({"a": [1, 2]}), json!(null)] {
        q.send_raw(&format!(
            "{}\n",
            json!({"execute": "query-version", "id": id})
        ));
        let r = q.reply();
        assert_eq!(r["id"], id, "{r}");
        assert!(r.get("return").is_some());
    }
    q.send_raw("{\"execute\": \"nope\", \"id\": 7}\n");
    let r = q.reply();
    assert_eq!(r["id"], 7);
    assert_eq!(r["error"]["class"], "CommandNotFound");
}

#[test]
fn bad_json_keeps_the_connection() {
    let d = Daemon::start(&[]);
    let mut q = d.qmp();
    q.send_raw("{\"execute\": }\n");
    let r = q.reply();
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    q.send_raw("[1, 2]\n");
    let r = q.reply();
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    assert!(q.ok("query-version", json!({})).is_object());
}

/// A sequence of commands whose answers must match QSD's in class, message and shape.
/// `image` and `{image}.ro` are raw images of 1 MiB.
fn compat_script(image: &str) -> Vec<(&'static str, Value)> {
    vec![
        (
            "blockdev-add",
            json!({"driver": "file", "node-name": "f", "filename": image}),
        ),
        (
            "blockdev-add",
            json!({"driver": "file", "node-name": "f", "filename": image}),
        ),
        (
            "blockdev-add",
            json!({"driver": "file", "node-name": "g", "filename": "/nonexistent/x"}),
        ),
        ("blockdev-del", json!({"node-name": "nope"})),
        ("block-export-add", json!({"id": "e", "node-name": "f"})),
        (
            "block-export-add",
            json!({"type": "nbdx", "id": "e", "node-name": "f"}),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": 1, "node-name": "f"}),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "f", "bogus": 1}),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "f"}),
        ),
        (
            "block-export-add",
            json!({"type": "fuse", "id": "e", "node-name": "f", "mountpoint": "/tmp"}),
        ),
        ("block-export-del", json!({"id": "zz"})),
        ("block-export-del", json!({})),
        ("query-block-exports", json!({})),
        ("nbd-server-stop", json!({})),
        ("object-add", json!({"qom-type": "iothread", "id": "io0"})),
        ("object-add", json!({"qom-type": "iothread", "id": "io0"})),
        ("qom-list", json!({"path": "/objects/io0"})),
        (
            "qom-get",
            json!({"path": "/objects/io0", "property": "poll-max-ns"}),
        ),
        ("qom-list", json!({"path": "/nope"})),
        ("object-add", json!({"qom-type": "nope", "id": "io1"})),
        ("object-del", json!({"id": "nope"})),
        ("object-del", json!({"id": "io0"})),
        ("block_resize", json!({"node-name": "zz", "size": 1})),
        ("block_resize", json!({"node-name": "f", "size": -1})),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "n", "size": 1048576}),
        ),
        ("block_resize", json!({"node-name": "n", "size": 2097152})),
        (
            "blockdev-add",
            json!({"driver": "file", "node-name": "ro", "filename": format!("{image}.ro"), "read-only": true}),
        ),
        ("block_resize", json!({"node-name": "ro", "size": 2097152})),
        ("block_resize", json!({"node-name": "f", "size": 2097152})),
        ("blockdev-del", json!({"node-name": "ro"})),
        ("blockdev-del", json!({"node-name": "n"})),
        ("query-block-exports", json!({})),
        ("blockdev-del", json!({"node-name": "f"})),
        ("blockdev-del", json!({"node-name": "f"})),
        ("query-named-block-nodes", json!({})),
    ]
}

#[test]
fn answers_like_qemu_storage_daemon() {
    if !require_tool("qemu-storage-daemon") || !require_tool("qemu-img") {
        return;
    }
    let mut answers = Vec::new();
    for flavor in [Flavor::Qsd, Flavor::Blockexportd] {
        let d = Daemon::start_flavor(flavor, &[]);
        let image = d.path("disk.raw");
        blockexportd_tests::qemu_img_create(&image, "raw", "1M");
        blockexportd_tests::qemu_img_create(&d.path("disk.raw.ro"), "raw", "1M");
        let mut q = d.qmp();
        let script = compat_script(image.to_str().unwrap());
        answers.push(
            script
                .iter()
                .map(|(cmd, args)| {
                    (
                        cmd.to_string(),
                        args.clone(),
                        comparable(&q.execute(cmd, args.clone())),
                    )
                })
                .collect::<Vec<_>>(),
        );
    }
    let (qsd, ours) = (&answers[0], &answers[1]);
    blockexportd_tests::assert_same_answers(qsd, ours);
}

#[test]
fn invalid_options_exit_before_starting() {
    for (args, needle) in [
        (vec!["--bogus"], "unrecognized option '--bogus'"),
        (
            vec!["--blockdev", "driver=file"],
            "--blockdev driver=file: Parameter 'filename' is missing",
        ),
        (
            vec!["--object", "iothread"],
            "--object iothread: Parameter 'id' is missing",
        ),
        (
            vec!["--monitor", "chardev=nope"],
            "--monitor chardev=nope: chardev \"nope\" not found",
        ),
        (
            vec![
                "--blockdev",
                "driver=null-co,node-name=n",
                "--export",
                "type=nbd,id=e,node-name=n",
            ],
            "--export type=nbd,id=e,node-name=n: NBD server not running",
        ),
    ] {
        let out = Command::new(daemon_binary()).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(stderr.starts_with("blockexportd: "), "{stderr}");
    }
    // A later invalid option stops startup before anything listens.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let out = Command::new(daemon_binary())
        .args([
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", sock.display()),
        ])
        .args(["--export", "type=nbd,id=e,node-name=missing"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        !sock.exists(),
        "the NBD socket must be gone after a failed startup"
    );
}

#[test]
fn help_and_version() {
    let out = Command::new(daemon_binary()).arg("-h").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--blockdev"));
    let out = Command::new(daemon_binary()).arg("-V").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("blockexportd "));
}

#[test]
fn quit_and_sigterm_shut_down_cleanly() {
    // The harness starts every daemon with `--pidfile DIR/daemon.pid`.
    let mut d = Daemon::start(&[]);
    let pidfile = d.path("daemon.pid");
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, d.child.as_ref().unwrap().id());
    let mut q = d.qmp();
    assert_eq!(q.ok("quit", json!({})), json!({}));
    let out = d.wait();
    assert!(out.status.success(), "{out:?}");
    assert!(!pidfile.exists(), "pidfile must be removed");

    let mut d = Daemon::start(&[]);
    let pidfile = d.path("daemon.pid");
    let out = d.terminate();
    assert!(out.status.success(), "{out:?}");
    assert!(!pidfile.exists(), "pidfile must be removed at SIGTERM");
}

#[test]
fn daemonize_returns_after_startup() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let sock = dir.path().join("qmp.sock");
    let status = Command::new(daemon_binary())
        .args([
            "--chardev",
            &format!("socket,id=m,path={},server=on,wait=off", sock.display()),
        ])
        .args([
            "--monitor",
            "m",
            "--daemonize",
            "--pidfile",
            pidfile.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    // The parent returned only once startup was complete: the monitor accepts right away.
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut q = Qmp::connect(&sock);
    q.ok("qmp_capabilities", json!({}));
    q.ok("quit", json!({}));
    drop(q);
    // Wait for the daemon (not our child) to go away: its pidfile is removed at exit.
    let start = std::time::Instant::now();
    while blockexportd_tests::process_exists(pid) {
        assert!(start.elapsed().as_secs() < 20, "daemon did not exit");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(!pidfile.exists());

    // A failing startup makes the parent fail too.
    let status = Command::new(daemon_binary())
        .args(["--daemonize", "--blockdev", "driver=file"])
        .status()
        .unwrap();
    assert!(!status.success());
}

#[test]
fn nodes_and_objects() {
    let d = Daemon::start(&[
        "--object",
        "iothread,id=io0",
        "--blockdev",
        "driver=null-co,node-name=n0,size=1048576",
    ]);
    let mut q = d.qmp();
    let nodes = q.ok("query-named-block-nodes", json!({"flat": true}));
    let n0 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "n0")
        .unwrap_or_else(|| panic!("{nodes}"));
    assert_eq!(n0["drv"], "null-co");
    assert_eq!(n0["image"]["virtual-size"], 1048576);
    let (_, desc) = q.err("block_resize", json!({"node-name": "n0", "size": 2097152}));
    assert_eq!(desc, "Image format driver does not support resize");
    let (_, desc) = q.err("object-add", json!({"qom-type": "iothread", "id": "io0"}));
    assert_eq!(
        desc,
        "attempt to add duplicate property 'io0' to object (type 'container')"
    );
    assert_eq!(
        q.ok("qom-list", json!({"path": "/objects"})),
        json!([{"name": "type", "type": "string"}, {"name": "io0", "type": "child<iothread>"}])
    );
    let props = q.ok("qom-list", json!({"path": "/objects/io0"}));
    assert_eq!(props.as_array().unwrap().len(), 7, "{props}");
    assert_eq!(
        q.ok(
            "qom-get",
            json!({"path": "/objects/io0", "property": "poll-max-ns"})
        ),
        32768
    );
    q.ok("object-del", json!({"id": "io0"}));
    q.ok(
        "object-add",
        json!({"qom-type": "iothread", "id": "io0", "poll-max-ns": 5}),
    );
    assert_eq!(
        q.ok(
            "qom-get",
            json!({"path": "/objects/io0", "property": "poll-max-ns"})
        ),
        5
    );
    q.ok("blockdev-del", json!({"node-name": "n0"}));
    assert_eq!(q.ok("query-named-block-nodes", json!({})), json!([]));
}

#[test]
fn monitor_on_stdio() {
    use std::io::{BufRead, BufReader, Write};
    let mut child = Command::new(daemon_binary())
        .args(["--chardev", "stdio,id=s", "--monitor", "s"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let greeting: Value = serde_json::from_str(&line).unwrap();
    assert!(greeting["QMP"]["version"].is_object(), "{line}");
    for (cmd, check) in [
        ("qmp_capabilities", json!({})),
        ("query-block-exports", json!([])),
        ("quit", json!({})),
    ] {
        writeln!(stdin, "{}", json!({"execute": cmd})).unwrap();
        line.clear();
        stdout.read_line(&mut line).unwrap();
        let reply: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(reply["return"], check, "{cmd}: {line}");
    }
    // stdin stays open: the daemon must exit after quit all the same.
    assert!(child.wait().unwrap().success());
    drop(stdin);
}

#[test]
fn chardev_wait_on_holds_startup_until_a_client_connects() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let pidfile = dir.path().join("pid");
    let mut child = Command::new(daemon_binary())
        // wait=on is QEMU's default for a server socket
        .args([
            "--chardev",
            &format!("socket,id=m,path={},server=on", sock.display()),
        ])
        .args(["--monitor", "m", "--pidfile", pidfile.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !sock.exists() {
        assert!(start.elapsed().as_secs() < 20, "no socket");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // The daemon now blocks in accept: startup is not complete.
    assert!(!pidfile.exists(), "startup must wait for the first client");
    let mut q = Qmp::connect(&sock);
    q.ok("qmp_capabilities", json!({}));
    while !pidfile.exists() {
        assert!(start.elapsed().as_secs() < 20, "startup never completed");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    q.ok("quit", json!({}));
    assert!(child.wait().unwrap().success());
}
