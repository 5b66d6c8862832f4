//! Scripts run against qemu-storage-daemon and blockexportd side by side: the same commands
//! must get the same answers (error class and text, or the shape of the return value), and
//! the same nodes must be left in the graph.

use blockexportd_tests::{comparable, qemu_img_create, require_tool, Daemon, Flavor, Qmp};
use serde_json::{json, Value};
use std::path::Path;

/// One step of a script: a command, or `nodes` (the sorted node names, generated names
/// made comparable), `active` (whether each named node is active), `exports` (the ids
/// `query-block-exports` lists, in its order), `qemu-io` (`{"export":
/// NAME, "command": COMMAND}`: qemu-io's answer over the `nbd.sock` NBD server).
type Step = (&'static str, Value);

/// The node names in the graph, sorted, with generated names (`#block123`) as `#block`.
fn node_names(q: &mut Qmp) -> Value {
    let nodes = q.ok("query-named-block-nodes", json!({}));
    let mut names: Vec<String> = nodes
        .as_array()
        .expect("a list")
        .iter()
        .map(|n| {
            let name = n["node-name"].as_str().expect("node-name");
            if name.starts_with("#block") {
                "#block".to_string()
            } else {
                name.to_string()
            }
        })
        .collect();
    names.sort();
    json!(names)
}

/// The ids of `query-block-exports`, in the order it lists them.
fn export_ids(q: &mut Qmp) -> Value {
    let exports = q.ok("query-block-exports", json!({}));
    let ids: Vec<Value> = exports
        .as_array()
        .expect("a list")
        .iter()
        .map(|e| e["id"].clone())
        .collect();
    json!(ids)
}

/// `{node name: active}` of the named nodes.
fn activity(q: &mut Qmp) -> Value {
    let nodes = q.ok("query-named-block-nodes", json!({}));
    let map: serde_json::Map<String, Value> = nodes
        .as_array()
        .expect("a list")
        .iter()
        .filter(|n| !n["node-name"].as_str().unwrap_or_default().starts_with('#'))
        .map(|n| {
            (
                n["node-name"].as_str().unwrap_or_default().to_string(),
                n["active"].clone(),
            )
        })
        .collect();
    Value::Object(map)
}

/// qemu-io's first line and exit status for one command on an NBD export of the daemon.
fn nbd_io(dir: &Path, args: &Value) -> Value {
    let uri = format!(
        "nbd+unix:///{}?socket={}",
        args["export"].as_str().expect("export"),
        path(dir, "nbd.sock")
    );
    let out = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            args["command"].as_str().expect("command"),
            &uri,
        ])
        .output()
        .expect("run qemu-io");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // The first line without its timing ("... bytes at offset 0" / "... failed: ...").
    json!({"output": text.lines().next().unwrap_or_default(), "status": out.status.code()})
}

/// Runs `script` (built for each daemon's directory by `make`) against QSD and ours, fails
/// with every difference, and returns QSD's answers.
fn compare(setup: impl Fn(&Path), make: impl Fn(&Path) -> Vec<Step>) -> Vec<Value> {
    let mut answers = Vec::new();
    for flavor in [Flavor::Qsd, Flavor::Blockexportd] {
        let d = Daemon::start_flavor(flavor, &[]);
        setup(d.dir.path());
        let mut q = d.qmp();
        let mut out = Vec::new();
        for (cmd, args) in make(d.dir.path()) {
            let answer = if cmd == "nodes" {
                node_names(&mut q)
            } else if cmd == "active" {
                activity(&mut q)
            } else if cmd == "exports" {
                export_ids(&mut q)
            } else if cmd == "qemu-io" {
                nbd_io(d.dir.path(), &args)
            } else {
                comparable(&q.execute(cmd, args.clone()))
            };
            out.push((cmd, args, answer));
        }
        answers.push(out);
    }
    blockexportd_tests::assert_same_answers(&answers[0], &answers[1]);
    answers
        .swap_remove(0)
        .into_iter()
        .map(|(_, _, a)| a)
        .collect()
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().expect("UTF-8 path").to_string()
}

#[test]
fn blockdev_del_takes_the_children_blockdev_add_opened() {
    if !require_tool("qemu-storage-daemon") || !require_tool("qemu-img") {
        return;
    }
    let setup = |dir: &Path| {
        qemu_img_create(&dir.join("a.raw"), "raw", "1M");
        qemu_img_create(&dir.join("base.raw"), "raw", "1M");
        blockexportd_tests::run_ok(
            std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(dir.join("base.raw"))
                .arg(dir.join("top.qcow2")),
        );
    };
    let script = |dir: &Path| {
        let a = path(dir, "a.raw");
        let top = path(dir, "top.qcow2");
        let inline = |name: Option<&str>| {
            let mut file = json!({"driver": "file", "filename": a});
            if let Some(name) = name {
                file["node-name"] = json!(name);
            }
            json!({"driver": "raw", "node-name": "r", "file": file})
        };
        vec![
            // An inline file without a node name.
            ("blockdev-add", inline(None)),
            ("nodes", json!({})),
            ("blockdev-del", json!({"node-name": "r"})),
            ("nodes", json!({})),
            // With a node name: it is not the monitor's to delete, and goes with its parent.
            ("blockdev-add", inline(Some("f"))),
            ("nodes", json!({})),
            ("blockdev-del", json!({"node-name": "f"})),
            ("blockdev-del", json!({"node-name": "r"})),
            ("nodes", json!({})),
            // A backing file opened from the image header, and its file.
            (
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": "t",
                       "file": {"driver": "file", "filename": top}}),
            ),
            ("nodes", json!({})),
            ("blockdev-del", json!({"node-name": "t"})),
            ("nodes", json!({})),
            // A child given by name stays, and may not go while its parent uses it.
            (
                "blockdev-add",
                json!({"driver": "file", "node-name": "f", "filename": a}),
            ),
            (
                "blockdev-add",
                json!({"driver": "raw", "node-name": "r", "file": "f"}),
            ),
            ("blockdev-del", json!({"node-name": "f"})),
            ("blockdev-del", json!({"node-name": "r"})),
            ("nodes", json!({})),
            ("blockdev-del", json!({"node-name": "f"})),
            ("nodes", json!({})),
            // An export keeps an inline child after its parent is gone, until it ends.
            (
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": path(dir, "nbd.sock")}}}),
            ),
            ("blockdev-add", inline(Some("f"))),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e", "node-name": "f"}),
            ),
            ("blockdev-del", json!({"node-name": "f"})),
            ("blockdev-del", json!({"node-name": "r"})),
            ("nodes", json!({})),
            ("blockdev-del", json!({"node-name": "f"})),
            ("block-export-del", json!({"id": "e"})),
            ("nodes", json!({})),
            // An exported node is in use.
            ("blockdev-add", inline(Some("f"))),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e", "node-name": "r"}),
            ),
            ("blockdev-del", json!({"node-name": "r"})),
            ("blockdev-del", json!({"node-name": "nonexistent"})),
            ("block-export-del", json!({"id": "e"})),
            ("nodes", json!({})),
            ("blockdev-del", json!({"node-name": "r"})),
            ("nodes", json!({})),
        ]
    };
    compare(setup, script);
}

#[test]
fn the_same_image_can_be_added_again_after_blockdev_del() {
    if !require_tool("qemu-img") {
        return;
    }
    // QEMU's graph-changes-while-io test adds and deletes the same image over and over:
    // the inline file node must go with its parent, and release its image lock.
    let d = Daemon::start(&[]);
    let image = d.path("a.qcow2");
    qemu_img_create(&image, "qcow2", "1M");
    let mut q = d.qmp();
    let options = json!({"driver": "qcow2", "node-name": "q",
                         "file": {"driver": "file", "filename": image}});
    for _ in 0..20 {
        q.ok("blockdev-add", options.clone());
        q.ok("blockdev-del", json!({"node-name": "q"}));
    }
    assert_eq!(q.ok("query-named-block-nodes", json!({})), json!([]));
}

/// Ids that QEMU's `id_wellformed` refuses, then ones it takes (a 32-byte one is too long
/// only for a node name).
const IDS: [&str; 16] = [
    "",
    "a b",
    "1abc",
    "#x",
    "é",
    "aé",
    "_a",
    "-a",
    ".a",
    "a/b",
    "a,b",
    "a:b",
    "a\n",
    "a",
    "A-b.c_d",
    "abcdefghijklmnopqrstuvwxyz012345",
];

#[test]
fn ids_and_names_are_checked_as_qsd_checks_them() {
    if !require_tool("qemu-storage-daemon") || !require_tool("qemu-img") {
        return;
    }
    let setup = |dir: &Path| qemu_img_create(&dir.join("q.qcow2"), "qcow2", "1M");
    let script = |dir: &Path| {
        let mut s: Vec<Step> = vec![
            // Before the server runs: the id is checked first.
            (
                "block-export-add",
                json!({"type": "nbd", "id": "1x", "node-name": "nx"}),
            ),
            (
                "block-export-add",
                json!({"type": "fuse", "id": "1x", "node-name": "nx", "mountpoint": "/nonexistent"}),
            ),
            (
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": "q",
                       "file": {"driver": "file", "filename": path(dir, "q.qcow2")}}),
            ),
            ("nbd-server-add", json!({"device": "q", "name": "1 x"})),
            ("nbd-server-add", json!({"device": "nx", "name": "1 x"})),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "x", "node-name": "nx"}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "x", "node-name": "q"}),
            ),
            (
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": path(dir, "nbd.sock")}}}),
            ),
            // Objects: their properties, then the id, then their files.
            (
                "object-add",
                json!({"qom-type": "iothread", "id": "1x", "bogus": 1}),
            ),
            (
                "object-add",
                json!({"qom-type": "tls-creds-x509", "id": "1x", "dir": "/nonexistent"}),
            ),
            (
                "object-add",
                json!({"qom-type": "authz-simple", "id": "1x", "identity": "a"}),
            ),
            // Bitmap names.
            (
                "block-dirty-bitmap-add",
                json!({"node": "nx", "name": "", "granularity": 3}),
            ),
            (
                "block-dirty-bitmap-add",
                json!({"node": "q", "name": "b".repeat(1024), "granularity": 3}),
            ),
            (
                "block-dirty-bitmap-add",
                json!({"node": "q", "name": "b".repeat(1024)}),
            ),
            (
                "block-dirty-bitmap-add",
                json!({"node": "q", "name": "b".repeat(1024), "persistent": true}),
            ),
            (
                "block-dirty-bitmap-add",
                json!({"node": "q", "name": "b".repeat(1023), "persistent": true}),
            ),
            ("block-dirty-bitmap-add", json!({"node": "q", "name": "x"})),
            (
                "block-dirty-bitmap-add",
                json!({"node": "q", "name": "x", "persistent": true}),
            ),
        ];
        for id in IDS {
            s.extend([
                (
                    "blockdev-add",
                    json!({"driver": "null-co", "node-name": id}),
                ),
                ("blockdev-del", json!({"node-name": id})),
                (
                    "block-export-add",
                    json!({"type": "nbd", "id": id, "node-name": "q", "name": "x"}),
                ),
                ("block-export-del", json!({"id": id})),
                ("nbd-server-add", json!({"device": "q", "name": id})),
                ("nbd-server-remove", json!({"name": id})),
                ("object-add", json!({"qom-type": "iothread", "id": id})),
                ("object-del", json!({"id": id})),
                ("block-dirty-bitmap-add", json!({"node": "q", "name": id})),
                (
                    "block-dirty-bitmap-remove",
                    json!({"node": "q", "name": id}),
                ),
            ]);
        }
        s
    };
    compare(setup, script);
}

#[test]
fn command_line_ids_are_checked_as_qsd_checks_them() {
    if !require_tool("qemu-storage-daemon") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = path(dir.path(), "s.sock");
    let cases: Vec<Vec<String>> = IDS[..13]
        .iter()
        .flat_map(|id| {
            [
                vec![
                    "--chardev".to_string(),
                    format!("socket,id={id},path={sock},server=on,wait=off"),
                ],
                vec!["--chardev".to_string(), format!("stdio,id={id}")],
                vec!["--object".to_string(), format!("iothread,id={id}")],
                vec![
                    "--blockdev".to_string(),
                    format!("driver=null-co,node-name={id}"),
                ],
                vec![
                    "--blockdev".to_string(),
                    "driver=null-co,node-name=n".to_string(),
                    "--export".to_string(),
                    format!("type=nbd,id={id},node-name=n"),
                ],
            ]
        })
        // keyval cannot carry a comma in a value unless doubled; those are other errors.
        .filter(|args| !args.iter().any(|a| a.contains("a,b")))
        .collect();
    for args in cases {
        assert_same_startup_error(&args);
    }
}

/// Runs QSD and ours with the command line `args`: both must exit with the same status and
/// the same first error line (after the program name).
fn assert_same_startup_error(args: &[String]) {
    let run = |program: &Path| {
        let out = std::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        // QSD adds a hint line; the error is the first line, after the program name.
        let first = stderr.lines().next().unwrap_or_default().to_string();
        let error = first.split_once(": ").map(|(_, e)| e.to_string());
        (out.status.code(), error)
    };
    let qsd = run(Path::new("qemu-storage-daemon"));
    let ours = run(&blockexportd_tests::daemon_binary());
    assert_eq!(qsd, ours, "{args:?}");
}

#[test]
fn quit_ends_every_export_before_its_reply() {
    if !require_tool("qemu-storage-daemon") {
        return;
    }
    let fuse = Path::new("/dev/fuse").exists();
    if !fuse {
        assert!(
            !blockexportd_tests::under_ci(),
            "/dev/fuse is missing (CI=true)"
        );
        eprintln!("/dev/fuse is missing: NBD exports only");
    }
    let mut transcripts = Vec::new();
    for flavor in [Flavor::Qsd, Flavor::Blockexportd] {
        let d = Daemon::start_flavor(flavor, &[]);
        let mut q = d.qmp();
        q.ok(
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "n"}),
        );
        q.ok(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": path(d.dir.path(), "nbd.sock")}}}),
        );
        // Created in this order; QSD ends them newest first.
        q.ok(
            "block-export-add",
            json!({"type": "nbd", "id": "e1", "node-name": "n"}),
        );
        if fuse {
            let mountpoint = d.path("mnt");
            std::fs::write(&mountpoint, b"").expect("mountpoint");
            q.ok(
                "block-export-add",
                json!({"type": "fuse", "id": "f0", "node-name": "n",
                       "mountpoint": mountpoint.to_str().expect("UTF-8")}),
            );
        }
        q.ok(
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "n", "name": "z"}),
        );
        q.send_raw("{\"execute\": \"quit\"}\n");
        let mut transcript = Vec::new();
        loop {
            let msg = q.read_message();
            if msg.get("event").is_some() {
                transcript.push(json!({"event": msg["event"], "data": msg["data"]}));
            } else {
                transcript.push(msg);
                break;
            }
        }
        let mut d = d;
        assert!(d.wait().status.success(), "{flavor:?} exit status");
        transcripts.push(transcript);
    }
    let deleted = |id: &str| json!({"event": "BLOCK_EXPORT_DELETED", "data": {"id": id}});
    let mut expected = vec![deleted("e0")];
    if fuse {
        expected.push(deleted("f0"));
    }
    expected.extend([deleted("e1"), json!({"return": {}})]);
    assert_eq!(transcripts[0], expected, "QSD");
    assert_eq!(transcripts[1], expected, "ours");
}

#[test]
fn a_long_run_of_nul_bytes_gets_one_parse_error_each() {
    if !require_tool("qemu-storage-daemon") {
        return;
    }
    const NULS: usize = 200_000;
    let mut answers = Vec::new();
    for flavor in [Flavor::Qsd, Flavor::Blockexportd] {
        use std::io::{BufRead, BufReader, Write};
        let d = Daemon::start_flavor(flavor, &[]);
        let stream = std::os::unix::net::UnixStream::connect(&d.qmp_path).expect("connect");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut read = || {
            let mut line = String::new();
            assert!(reader.read_line(&mut line).expect("read") > 0, "EOF");
            serde_json::from_str::<Value>(&line).expect("JSON")
        };
        assert!(read().get("QMP").is_some(), "greeting");
        let mut input = b"{\"execute\": \"qmp_capabilities\"}\n".to_vec();
        input.extend(std::iter::repeat_n(0u8, NULS));
        input.extend(b"{\"execute\": \"query-version\", \"id\": \"last\"}\n");
        let mut writer = stream;
        let sender = std::thread::spawn(move || writer.write_all(&input).expect("write"));
        assert_eq!(read(), json!({"return": {}}));
        let mut errors = std::collections::BTreeMap::<String, usize>::new();
        loop {
            let msg = read();
            if msg["id"] == "last" {
                assert!(msg["return"]["qemu"].is_object(), "{msg}");
                break;
            }
            *errors.entry(msg.to_string()).or_default() += 1;
        }
        sender.join().expect("sender");
        answers.push(errors);
    }
    let stray = json!({"error": {"class": "GenericError", "desc": "JSON parse error, stray ''"}});
    assert_eq!(answers[0], [(stray.to_string(), NULS)].into(), "QSD");
    assert_eq!(answers[1], answers[0], "ours");
}

#[test]
fn inactive_nodes_as_in_qsd_10() {
    if !require_tool("qemu-storage-daemon") || !require_tool("qemu-img") || !require_tool("qemu-io")
    {
        return;
    }
    let setup = |dir: &Path| qemu_img_create(&dir.join("q.qcow2"), "qcow2", "1M");
    let script = |dir: &Path| {
        let qcow2 = |active: bool| {
            json!({"driver": "qcow2", "node-name": "q", "active": active,
                   "file": {"driver": "file", "filename": path(dir, "q.qcow2"), "node-name": "f"}})
        };
        let set = |node: Option<&str>, active: bool| match node {
            Some(n) => (
                "blockdev-set-active",
                json!({"node-name": n, "active": active}),
            ),
            None => ("blockdev-set-active", json!({"active": active})),
        };
        let io = |export: &str, command: &str| {
            ("qemu-io", json!({"export": export, "command": command}))
        };
        vec![
            // Opened inactive: that node only.
            ("blockdev-add", qcow2(false)),
            ("active", json!({})),
            (
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": path(dir, "nbd.sock")}}}),
            ),
            // allow-inactive keeps it inactive; only NBD exports may.
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e0", "node-name": "q", "name": "wi",
                       "writable": true, "allow-inactive": true}),
            ),
            ("active", json!({})),
            (
                "block-export-add",
                json!({"type": "fuse", "id": "f0", "node-name": "q",
                       "mountpoint": path(dir, "mnt"), "allow-inactive": true}),
            ),
            // An inactive node serves reads only.
            io("wi", "read 0 512"),
            io("wi", "write 0 512"),
            io("wi", "write -z 0 65536"),
            io("wi", "discard 0 65536"),
            io("wi", "map"),
            ("block_resize", json!({"node-name": "q", "size": 2097152})),
            // Without allow-inactive, an export activates its node.
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e1", "node-name": "q", "name": "w", "writable": true}),
            ),
            ("active", json!({})),
            io("wi", "write 0 512"),
            // ... and a writable one keeps it active.
            set(Some("q"), false),
            set(None, false),
            ("active", json!({})),
            ("block-export-del", json!({"id": "e1"})),
            set(None, false),
            ("active", json!({})),
            set(Some("f"), true),
            ("active", json!({})),
            set(Some("q"), true),
            ("active", json!({})),
            set(Some("f"), false),
            set(Some("nonexistent"), true),
            set(Some("q"), false),
            ("active", json!({})),
            // A read-only export without allow-inactive does not keep it active.
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e2", "node-name": "q", "name": "r"}),
            ),
            set(Some("q"), false),
            ("active", json!({})),
            ("block-export-del", json!({"id": "e2"})),
            set(None, true),
            ("active", json!({})),
            ("blockdev-set-active", json!({})),
            ("blockdev-set-active", json!({"active": true, "bogus": 1})),
            (
                "blockdev-add",
                json!({"driver": "null-co", "node-name": "n", "active": 1}),
            ),
            ("block-export-del", json!({"id": "e0"})),
        ]
    };
    compare(setup, script);
}

#[test]
fn an_inactive_node_lets_another_process_take_its_image() {
    if !require_tool("qemu-storage-daemon") || !require_tool("qemu-img") || !require_tool("qemu-io")
    {
        return;
    }
    for flavor in [Flavor::Qsd, Flavor::Blockexportd] {
        let d = Daemon::start_flavor(flavor, &[]);
        let image = d.path("q.qcow2");
        qemu_img_create(&image, "qcow2", "1M");
        let mut q = d.qmp();
        q.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "q",
                   "file": {"driver": "file", "filename": image.to_str().expect("UTF-8")}}),
        );
        let write = || {
            std::process::Command::new("qemu-io")
                .args(["-c", "write -P 7 0 512"])
                .arg(&image)
                .output()
                .expect("run qemu-io")
                .status
                .success()
        };
        assert!(
            !write(),
            "{flavor:?}: the image is locked while the node is active"
        );
        // The migration hand-off: the node lets go of the image...
        q.ok("blockdev-set-active", json!({"active": false}));
        assert!(
            write(),
            "{flavor:?}: the image is free while the node is inactive"
        );
        // ... and takes it back.
        q.ok("blockdev-set-active", json!({"active": true}));
        assert!(!write(), "{flavor:?}: locked again");
        // Active again, the node reads the image as the other process left it (its qcow2
        // metadata is read again), and writes to it safely.
        q.ok(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": path(d.dir.path(), "nbd.sock")}}}),
        );
        q.ok(
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "q", "writable": true}),
        );
        for command in ["read -P 7 0 512", "write -P 9 65536 512"] {
            let io = nbd_io(d.dir.path(), &json!({"export": "q", "command": command}));
            assert_eq!(io["status"], 0, "{flavor:?}: {command}: {io}");
        }
        // The client has exited, but the server may not have seen its disconnection yet
        // (safe removal refuses while a client is connected): ask again until it has.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let r = q.execute("block-export-del", json!({"id": "e"}));
            if r.get("return").is_some() {
                break;
            }
            assert!(
                r["error"]["desc"] == "export 'e' still in use"
                    && std::time::Instant::now() < deadline,
                "{flavor:?}: block-export-del: {r}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        q.wait_event("BLOCK_EXPORT_DELETED");
        q.ok("blockdev-del", json!({"node-name": "q"}));
        blockexportd_tests::run_ok(
            std::process::Command::new("qemu-img")
                .arg("check")
                .arg(&image),
        );
        let out = blockexportd_tests::run_ok(
            std::process::Command::new("qemu-io")
                .args(["-c", "read -P 7 0 512", "-c", "read -P 9 65536 512"])
                .arg(&image),
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text.contains("Pattern verification failed"),
            "{flavor:?}: {text}"
        );
    }
}

#[test]
fn the_image_passes_from_an_active_node_to_one_opened_inactive() {
    if !require_tool("qemu-storage-daemon") || !require_tool("qemu-img") {
        return;
    }
    let mut answers = Vec::new();
    for flavor in [Flavor::Qsd, Flavor::Blockexportd] {
        let source = Daemon::start_flavor(flavor, &[]);
        let image = source.path("q.qcow2");
        qemu_img_create(&image, "qcow2", "1M");
        let options = |active: bool| {
            json!({"driver": "qcow2", "node-name": "q", "active": active,
                   "file": {"driver": "file", "filename": image.to_str().expect("UTF-8")}})
        };
        let destination = Daemon::start_flavor(flavor, &[]);
        let mut src = source.qmp();
        let mut dst = destination.qmp();
        let mut answer = Vec::new();
        let step = |q: &mut Qmp, cmd: &str, args: Value| comparable(&q.execute(cmd, args));
        answer.push(step(&mut src, "blockdev-add", options(true)));
        // The destination opens the image while the source holds it: inactive, it needs
        // no lock (QEMU gives its file child no permissions)...
        answer.push(step(&mut dst, "blockdev-add", options(false)));
        answer.push(step(
            &mut dst,
            "blockdev-set-active",
            json!({"active": true}),
        ));
        // ... and takes it once the source let go.
        answer.push(step(
            &mut src,
            "blockdev-set-active",
            json!({"active": false}),
        ));
        answer.push(step(
            &mut dst,
            "blockdev-set-active",
            json!({"active": true}),
        ));
        answer.push(step(
            &mut src,
            "blockdev-set-active",
            json!({"active": true}),
        ));
        answer.push(activity(&mut dst));
        answer.push(step(&mut dst, "blockdev-del", json!({"node-name": "q"})));
        answer.push(step(&mut src, "blockdev-del", json!({"node-name": "q"})));
        answers.push(answer);
    }
    assert_eq!(answers[1], answers[0], "ours, then QSD's");
}

#[test]
fn query_block_exports_lists_the_newest_first() {
    let answers = compare(
        |dir| std::fs::write(dir.join("a.raw"), vec![0u8; 1 << 20]).expect("image"),
        |dir| {
            let add = |id: &str| {
                (
                    "block-export-add",
                    json!({"type": "nbd", "id": id, "node-name": "f", "name": id}),
                )
            };
            vec![
                (
                    "blockdev-add",
                    json!({"driver": "file", "node-name": "f",
                           "filename": path(dir, "a.raw")}),
                ),
                (
                    "nbd-server-start",
                    json!({"addr": {"type": "unix", "data": {"path": path(dir, "nbd.sock")}}}),
                ),
                add("a"),
                add("c"),
                add("b"),
                ("exports", json!(null)),
                add("aa"),
                ("block-export-del", json!({"id": "c"})),
                ("exports", json!(null)),
            ]
        },
    );
    assert_eq!(answers[5], json!(["b", "c", "a"]), "QSD's order");
    assert_eq!(answers[8], json!(["aa", "b", "a"]), "QSD's order");
}

/// Runs `steps` against QSD started with `args`, then against ours, and fails with every
/// difference.
fn compare_with_args(args: &[&str], steps: &[Step]) {
    let mut answers = Vec::new();
    for flavor in [Flavor::Qsd, Flavor::Blockexportd] {
        let d = Daemon::start_flavor(flavor, args);
        let mut q = d.qmp();
        let out: Vec<Value> = steps
            .iter()
            .map(|(cmd, a)| comparable(&q.execute(cmd, a.clone())))
            .collect();
        answers.push(out);
    }
    let mismatches: Vec<String> = steps
        .iter()
        .zip(answers[0].iter().zip(&answers[1]))
        .filter(|(_, (a, b))| a != b)
        .map(|((cmd, args), (a, b))| format!("{cmd} {args}:\n  QSD:  {a}\n  ours: {b}"))
        .collect();
    assert!(
        mismatches.is_empty(),
        "differences from QSD:\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn qom_get_answers_typed_values_as_qsd() {
    if !require_tool("qemu-storage-daemon") {
        return;
    }
    let get = |path: &str, property: &str| ("qom-get", json!({"path": path, "property": property}));
    compare_with_args(
        &[
            "--object",
            "iothread,id=io0,poll-max-ns=10",
            "--object",
            "secret,id=s0,data=hello",
        ],
        &[
            get("/objects/io0", "poll-max-ns"),
            get("/objects/io0", "poll-grow"),
            get("/objects/io0", "thread-pool-max"),
            get("/objects/s0", "data"),
            get("/objects/s0", "format"),
            get("/objects/s0", "file"),
            get("/objects/s0", "keyid"),
            get("/objects/s0", "loaded"),
            ("qom-list", json!({"path": "/objects/s0"})),
            (
                "object-add",
                json!({"qom-type": "iothread", "id": "io1", "poll-max-ns": 20}),
            ),
            get("/objects/io1", "poll-max-ns"),
        ],
    );
}

#[test]
fn secrets_are_made_and_refused_as_qsd_does() {
    if !require_tool("qemu-storage-daemon") {
        return;
    }
    let add = |props: Value| {
        let mut args = json!({"qom-type": "secret", "id": "s"});
        args.as_object_mut()
            .expect("object")
            .extend(props.as_object().expect("object").clone());
        ("object-add", args)
    };
    let key = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
    compare_with_args(
        &["--object", "iothread,id=io0"],
        &[
            add(json!({})),
            add(json!({"data": "x", "file": "/x"})),
            add(json!({"file": "/nonexistent"})),
            add(json!({"data": "x", "format": "foo"})),
            add(json!({"data": 1})),
            add(json!({"data": "x", "bogus": 1})),
            add(json!({"data": "x", "loaded": true})),
            add(json!({"data": "x", "keyid": "nope"})),
            add(json!({"data": "x", "keyid": "io0"})),
            add(json!({"data": "a!b", "format": "base64"})),
            (
                "object-add",
                json!({"qom-type": "secret", "id": "k", "data": key, "format": "base64"}),
            ),
            add(json!({"data": "x", "keyid": "k"})),
            add(json!({"data": "x", "keyid": "k", "iv": "AAAA"})),
            add(
                json!({"data": "AAAA", "keyid": "k", "iv": "AAAAAAAAAAAAAAAAAAAAAA==", "format": "base64"}),
            ),
            add(
                json!({"data": "OEi5nfSjxlhfY9l4IyUSfQ==", "keyid": "k", "iv": "AAAAAAAAAAAAAAAAAAAAAA==", "format": "base64"}),
            ),
            (
                "qom-get",
                json!({"path": "/objects/s", "property": "keyid"}),
            ),
            add(json!({"data": "x"})),
        ],
    );
    // The same from the command line.
    same_command_line_errors(&[
        "secret,id=s",
        "secret,id=s,data=x,file=/x",
        "secret,id=s,file=/nonexistent",
        "secret,id=s,data=x,format=foo",
        "secret,id=s,data=x,keyid=nope",
        "secret,id=s,data=x,keyid=s,iv=AAAA",
        "secret,id=s,data=x,bogus=1",
    ]);
}

/// Each `--object` alone on the command line of QSD and ours: the same exit status and the
/// same error.
fn same_command_line_errors(objects: &[&str]) {
    for object in objects {
        let run = |program: &Path| {
            let out = std::process::Command::new(program)
                .args(["--object", object])
                .stdin(std::process::Stdio::null())
                .output()
                .expect("run");
            let stderr = String::from_utf8_lossy(&out.stderr).to_string();
            let first = stderr.lines().next().unwrap_or_default().to_string();
            (
                out.status.code(),
                first.split_once(": ").map(|(_, e)| e.to_string()),
            )
        };
        let qsd = run(Path::new("qemu-storage-daemon"));
        let ours = run(&blockexportd_tests::daemon_binary());
        assert_eq!(qsd, ours, "{object}");
    }
}

#[test]
fn object_types_and_keyval_properties_are_checked_as_qsd_checks_them() {
    if !require_tool("qemu-storage-daemon") {
        return;
    }
    same_command_line_errors(&[
        "authz-pam,id=a,service=x",
        "authz-pam,id=a",
        "nonsense,id=a",
        "iothread,id=i,poll-max-ns=x",
        "iothread,id=i,poll-max-ns=1,bogus=2",
        "authz-list,id=a,rules.0.match=x",
        "authz-list,id=a,rules.0.match=x,rules.0.policy=allow,rules.0.format=regex",
        "authz-list,id=a,policy=maybe",
        "authz-simple,id=a",
        "tls-creds-x509,id=t,dir=/x,verify-peer=maybe",
        "tls-creds-x509,id=t,endpoint=both",
    ]);
    let add = |args: Value| ("object-add", args);
    compare_with_args(
        &[],
        &[
            add(json!({"qom-type": "authz-pam", "id": "a", "service": "x"})),
            add(json!({"qom-type": "authz-pam", "id": "a", "bogus": 1})),
            add(json!({"qom-type": "nonsense", "id": "a"})),
            add(json!({"qom-type": "authz-listfile", "id": "a", "filename": "/x", "bogus": 1})),
            add(json!({"qom-type": "secret", "id": "s", "data": "x", "keyid": "s", "iv": "AAAA"})),
            add(json!({"qom-type": "iothread", "id": "i", "poll-max-ns": "10"})),
            add(json!({"qom-type": "authz-list", "id": "l", "rules": [{"match": "x"}]})),
            ("qom-list-types", json!({"implements": "secret"})),
        ],
    );
}

#[test]
fn qapi_type_names_and_paths_in_errors_are_qsds() {
    if !require_tool("qemu-storage-daemon") {
        return;
    }
    let script = |dir: &Path| -> Vec<Step> {
        vec![
            (
                "blockdev-add",
                json!({"driver": "null-co", "node-name": "n"}),
            ),
            // The alternate is named by its QAPI name (it was `BitmapRef` here).
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e", "node-name": "n", "bitmaps": [1]}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e", "node-name": "n", "bitmaps": ["b", []]}),
            ),
            (
                "block-export-add",
                json!({"type": "vhost-user-blk", "id": "e", "node-name": "n",
                       "addr": {"type": "unix", "path": path(dir, "v.sock")},
                       "logical-block-size": "4k"}),
            ),
            // A missing member is reported before an unexpected one, inside unions too.
            (
                "block-export-add",
                json!({"type": "vhost-user-blk", "id": "e", "node-name": "n",
                       "addr": {"type": "unix", "bogus": 1}}),
            ),
            (
                "block-export-add",
                json!({"type": "vhost-user-blk", "id": "e", "node-name": "n",
                       "addr": {"type": "unix", "path": 1}}),
            ),
            (
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"bogus": 1}}}),
            ),
            // JSON is typed: strings are not booleans or integers there (keyval's are).
            (
                "blockdev-add",
                json!({"driver": "null-co", "node-name": "m", "read-zeroes": "on"}),
            ),
            (
                "blockdev-add",
                json!({"driver": "null-co", "node-name": "m", "size": "1"}),
            ),
            (
                "blockdev-add",
                json!({"driver": "raw", "node-name": "m",
                       "file": {"driver": "null-co", "bogus": 1}, "offset": "x"}),
            ),
            (
                "blockdev-add",
                json!({"driver": "raw", "node-name": "m", "file": {"driver": "nope"}}),
            ),
            (
                "blockdev-add",
                json!({"driver": "raw", "node-name": "m", "file": 1}),
            ),
            ("nodes", json!(null)),
            // Missing members are reported before unexpected ones.
            (
                "block-export-add",
                json!({"type": "fuse", "id": "e", "node-name": "n", "bogus": 1}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "node-name": "n", "bogus": 1}),
            ),
            (
                "block-export-add",
                json!({"type": "vhost-user-blk", "id": "e", "node-name": "n", "bogus": 1}),
            ),
            ("block-export-del", json!({"bogus": 1})),
            ("blockdev-del", json!({"bogus": 1})),
        ]
    };
    compare(|_| {}, script);
}

#[test]
fn command_line_values_are_typed_as_qsd_types_them() {
    if !require_tool("qemu-storage-daemon") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = path(dir.path(), "s.sock");
    let nbd = |rest: &str| {
        vec![
            "--nbd-server".to_string(),
            format!("addr.type=unix,addr.path={sock},{rest}"),
        ]
    };
    let export = |rest: &str| {
        vec![
            "--blockdev".to_string(),
            "null-co,node-name=n".to_string(),
            "--export".to_string(),
            rest.to_string(),
        ]
    };
    let cases: Vec<Vec<String>> = vec![
        nbd("max-connections=abc"),
        nbd("max-connections=-1"),
        nbd("max-connections=0x1ffffffff"),
        nbd("max-connections.0=1"),
        nbd("addr.abstract=maybe"),
        nbd("addr.tight=n,max-connections=0x10"),
        vec!["--nbd-server".into(), "addr.type=unix,addr.bogus=1".into()],
        vec!["--nbd-server".into(), "addr.type=inet,addr.host=x,addr.port=1,addr.to=99999".into()],
        vec!["--nbd-server".into(), "addr.type=unix,addr.path.x=1".into()],
        vec!["--object".into(), "iothread,id=io,poll-max-ns=1k".into()],
        vec!["--object".into(), "iothread,id=io,poll-max-ns=99999999999999999999".into()],
        vec!["--monitor".into(), "chardev=c,pretty=x".into()],
        vec!["--blockdev".into(), "null-co,node-name=n,read-zeroes=x".into()],
        vec!["--blockdev".into(), "null-co,node-name=n,size=1.5k".into()],
        vec!["--blockdev".into(), "null-co,node-name=n,size=0x10,read-zeroes=y".into()],
        vec![
            "--blockdev".into(),
            "raw,node-name=r,file.driver=null-co,file.bogus=1,offset=x".into(),
        ],
        vec!["--blockdev".into(), "raw,node-name=r,file.driver=xyz".into()],
        vec!["--blockdev".into(), "null-co,node-name=n,cache.direct=maybe".into()],
        export("type=nbd,id=e,node-name=n,writable=maybe"),
        export("type=nbd,id=e,node-name=n,allocation-depth=1"),
        export(&format!("type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path={sock},logical-block-size=1q")),
        export(&format!("type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path={sock},num-queues=65536")),
        export(&format!("type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path={sock},addr.abstract=x")),
    ];
    for mut args in cases {
        // Ends a daemon that accepted everything.
        args.extend([
            "--object".to_string(),
            "no-such-object-type,id=end".to_string(),
        ]);
        assert_same_startup_error(&args);
    }
}
