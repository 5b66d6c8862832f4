//! Incremental backup over NBD, the way backup tools do it: a dirty bitmap records the
//! writes, a read-only export offers it with `qemu:dirty-bitmap:NAME` and
//! `qemu:allocation-depth`, and a client copies only the dirty extents.

use blockexportd_tests::{qemu_img_create, qemu_io, require_tools, run_ok, Daemon, Flavor};
use serde_json::{json, Value};
use std::process::Command;

/// Copies the dirty extents of `export` onto `target` (a raw file) with libnbd; returns the
/// dirty extents as (offset, length).
const BACKUP_CLIENT: &str = r#"
import nbd, sys, json
uri, ctx, target = sys.argv[1], sys.argv[2], sys.argv[3]
h = nbd.NBD()
h.add_meta_context(ctx)
h.connect_uri(uri)
size = h.get_size()
extents = []
offset = 0
while offset < size:
    seen = [offset]
    def cb(metacontext, start, entries, err):
        if metacontext == ctx:
            pos = start
            for i in range(0, len(entries), 2):
                length, flags = entries[i], entries[i + 1]
                if flags & 1:
                    extents.append((pos, length))
                pos += length
            seen[0] = pos
        return 0
    h.block_status(min(size - offset, 1 << 30), offset, cb)
    if seen[0] <= offset:
        raise SystemExit("block status made no progress")
    offset = seen[0]
with open(target, "r+b") as f:
    for off, length in extents:
        f.seek(off)
        f.write(h.pread(length, off))
print(json.dumps(extents))
"#;

fn dirty_extents_via_nbdinfo(uri: &str, ctx: &str) -> Vec<(u64, u64)> {
    let out = run_ok(Command::new("nbdinfo").args(["--json", &format!("--map={ctx}"), uri]));
    let map: Value = serde_json::from_slice(&out.stdout).unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"].as_u64().unwrap() & 1 == 1)
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

fn merge(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (o, l) in v {
        match out.last_mut() {
            Some((po, pl)) if *po + *pl == o => *pl += l,
            _ => out.push((o, l)),
        }
    }
    out
}

fn uri(d: &Daemon, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", d.path("nbd.sock").display())
}

#[test]
fn incremental_backup_copies_exactly_the_dirty_extents() {
    if !require_tools(&["qemu-img", "qemu-io", "nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img_create(&base, "qcow2", "32M");
    qemu_io(
        &["-f", "qcow2", base.to_str().unwrap()],
        &["write -P 0x11 0 8M"],
    );
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&base)
            .arg(&top),
    );
    qemu_io(
        &["-f", "qcow2", top.to_str().unwrap()],
        &["write -P 0x22 4M 1M"],
    );
    // The previous full backup.
    let backup = dir.path().join("backup.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&top)
            .arg(&backup),
    );

    let sock = dir.path().join("nbd.sock");
    let d = Daemon::start_in(
        Flavor::Blockexportd,
        dir,
        &[
            "--blockdev",
            &format!("driver=file,filename={},node-name=topf", top.display()),
            "--blockdev",
            "driver=qcow2,file=topf,node-name=top",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", sock.display()),
            "--export",
            "type=nbd,id=rw,node-name=top,name=rw,writable=on",
        ],
    );
    let mut q = d.qmp();
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "top", "name": "b0", "persistent": true}),
    );
    let writes = [
        (0u64, 4096u64),
        (5 << 20, 65536),
        (9 << 20, 3 * 65536 + 17),
        (31 << 20, 512),
    ];
    let cmds: Vec<String> = writes
        .iter()
        .enumerate()
        .map(|(i, (o, l))| format!("write -P {} {o} {l}", 0x40 + i))
        .collect();
    let cmd_refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&["-f", "raw", &uri(&d, "rw")], &cmd_refs);

    // QEMU refuses an enabled bitmap on a read-only export of a writable node.
    let (_, desc) = q.err(
        "block-export-add",
        json!({"type": "nbd", "id": "ro", "node-name": "top", "name": "ro", "bitmaps": ["b0"]}),
    );
    assert!(desc.contains("b0"), "{desc}");
    q.ok(
        "block-dirty-bitmap-disable",
        json!({"node": "top", "name": "b0"}),
    );
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "ro", "node-name": "top", "name": "ro",
               "bitmaps": ["b0"], "allocation-depth": true}),
    );
    // An exported bitmap is busy.
    let (_, desc) = q.err(
        "block-dirty-bitmap-remove",
        json!({"node": "top", "name": "b0"}),
    );
    assert!(desc.contains("in use"), "{desc}");
    let nodes = q.ok("query-named-block-nodes", json!({"flat": true}));
    let top_info = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "top")
        .unwrap();
    assert_eq!(top_info["dirty-bitmaps"][0]["busy"], true, "{top_info}");
    assert_eq!(top_info["dirty-bitmaps"][0]["recording"], false);

    // Which extents are dirty: the 64 KiB chunks the writes touched.
    let ro = uri(&d, "ro");
    let dirty = dirty_extents_via_nbdinfo(&ro, "qemu:dirty-bitmap:b0");
    let g = 65536;
    let expected = merge(
        writes
            .iter()
            .map(|(o, l)| (o / g * g, (o + l).div_ceil(g) * g - o / g * g))
            .collect(),
    );
    assert_eq!(merge(dirty.clone()), expected);

    // qemu-img map through the bitmap agrees.
    let out = run_ok(Command::new("qemu-img").args([
        "map",
        "--output=json",
        "--image-opts",
        &format!(
            "driver=nbd,server.type=unix,server.path={},export=ro,x-dirty-bitmap=qemu:dirty-bitmap:b0",
            sock.display()
        ),
    ]));
    let map: Value = serde_json::from_slice(&out.stdout).unwrap();
    // With x-dirty-bitmap, qemu-img reports dirty areas as "data": false.
    let from_qemu: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == false)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(merge(from_qemu), expected);

    // The backup client copies exactly the dirty extents onto the previous full backup.
    let out = run_ok(Command::new("/usr/bin/python3").args([
        "-c",
        BACKUP_CLIENT,
        &ro,
        "qemu:dirty-bitmap:b0",
        backup.to_str().unwrap(),
    ]));
    let copied: Vec<(u64, u64)> = serde_json::from_slice::<Vec<(u64, u64)>>(&out.stdout).unwrap();
    assert_eq!(merge(copied), expected);
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&backup)
            .arg(&ro),
    );

    // Allocation depth: 1 where the top layer allocates, 2 where only the base does, 0 else.
    let out = run_ok(Command::new("nbdinfo").args(["--json", "--map=qemu:allocation-depth", &ro]));
    let depth: Value = serde_json::from_slice(&out.stdout).unwrap();
    let depth_at = |off: u64| {
        depth
            .as_array()
            .unwrap()
            .iter()
            .find(|e| {
                let o = e["offset"].as_u64().unwrap();
                o <= off && off < o + e["length"].as_u64().unwrap()
            })
            .map(|e| e["type"].as_u64().unwrap())
            .unwrap()
    };
    assert_eq!(depth_at(4 << 20), 1);
    assert_eq!(depth_at(2 << 20), 2);
    assert_eq!(depth_at(20 << 20), 0);
    assert_eq!(depth_at(31 << 20), 1);
}

#[test]
fn persistent_bitmap_survives_a_restart_and_merges() {
    if !require_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    qemu_img_create(&image, "qcow2", "16M");
    let sock = dir.path().join("nbd.sock");
    let args = [
        "--blockdev".to_string(),
        format!("driver=file,filename={},node-name=f", image.display()),
        "--blockdev".to_string(),
        "driver=qcow2,file=f,node-name=q".to_string(),
        "--nbd-server".to_string(),
        format!("addr.type=unix,addr.path={}", sock.display()),
        "--export".to_string(),
        "type=nbd,id=e,node-name=q,name=disk,writable=on".to_string(),
    ];
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let nbd = format!("nbd+unix:///disk?socket={}", sock.display());
    let mut d = Daemon::start_in(Flavor::Blockexportd, dir, &argv);
    let mut q = d.qmp();
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "q", "name": "a", "persistent": true}),
    );
    qemu_io(&["-f", "raw", &nbd], &["write -P 1 0 64k"]);
    q.ok(
        "block-dirty-bitmap-disable",
        json!({"node": "q", "name": "a"}),
    );
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "q", "name": "b", "persistent": true, "granularity": 131072}),
    );
    qemu_io(&["-f", "raw", &nbd], &["write -P 2 1M 4k"]);
    let (_, desc) = q.err(
        "block-dirty-bitmap-add",
        json!({"node": "f", "name": "x", "persistent": true}),
    );
    assert_eq!(
        desc,
        "Can't store persistent bitmaps to f: Operation not supported"
    );
    q.ok("quit", json!({}));
    assert!(d.wait().status.success());

    // After a clean shutdown qemu-img sees both bitmaps and a consistent image.
    let info = run_ok(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&image),
    );
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    let bitmaps = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .unwrap_or_else(|| panic!("{info}"))
        .clone();
    let mut names: Vec<&str> = bitmaps
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b"], "{info}");
    run_ok(Command::new("qemu-img").arg("check").arg(&image));

    // A second run loads them with their bits; merging two gives the union.
    let dir = tempfile::tempdir().unwrap();
    let argv2: Vec<String> = args
        .iter()
        .map(|a| {
            a.replace(
                sock.to_str().unwrap(),
                dir.path().join("nbd.sock").to_str().unwrap(),
            )
        })
        .collect();
    let argv2: Vec<&str> = argv2.iter().map(String::as_str).collect();
    let d = Daemon::start_in(Flavor::Blockexportd, dir, &argv2);
    let mut q = d.qmp();
    let nodes = q.ok("query-named-block-nodes", json!({"flat": true}));
    let qnode = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "q")
        .unwrap();
    let count = |name: &str| {
        qnode["dirty-bitmaps"]
            .as_array()
            .unwrap_or_else(|| panic!("{qnode}"))
            .iter()
            .find(|b| b["name"] == name)
            .map(|b| {
                (
                    b["count"].as_u64().unwrap(),
                    b["recording"].as_bool().unwrap(),
                )
            })
            .unwrap_or_else(|| panic!("{qnode}"))
    };
    assert_eq!(count("a"), (65536, false));
    assert_eq!(count("b"), (131072, true));
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "q", "name": "m", "disabled": true}),
    );
    q.ok(
        "block-dirty-bitmap-merge",
        json!({"node": "q", "target": "m", "bitmaps": ["a", {"node": "q", "name": "b"}]}),
    );
    let nodes = q.ok("query-named-block-nodes", json!({"flat": true}));
    let m = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "q")
        .unwrap()["dirty-bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "m")
        .cloned()
        .unwrap();
    assert_eq!(m["count"], 65536 * 3, "{m}");
}

/// The depth of each byte range, as (start, end, depth) with depth 0 for unallocated.
fn depth_ranges(entries: &[(u64, u64, u64)]) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for &(start, len, depth) in entries {
        match out.last_mut() {
            Some(last) if last.1 == start && last.2 == depth => last.1 = start + len,
            _ => out.push((start, start + len, depth)),
        }
    }
    out
}

#[test]
fn allocation_depth_over_three_layers_matches_qemu_img_map() {
    if !require_tools(&["qemu-img", "qemu-io", "nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let layer = |name: &str| dir.path().join(name);
    qemu_img_create(&layer("base.qcow2"), "qcow2", "16M");
    for (upper, lower) in [("mid.qcow2", "base.qcow2"), ("top.qcow2", "mid.qcow2")] {
        run_ok(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(layer(lower))
                .arg(layer(upper)),
        );
    }
    qemu_io(
        &["-f", "qcow2", layer("base.qcow2").to_str().unwrap()],
        &["write 0 4M"],
    );
    qemu_io(
        &["-f", "qcow2", layer("mid.qcow2").to_str().unwrap()],
        &["write 2M 1M", "write 8M 1M"],
    );
    qemu_io(
        &["-f", "qcow2", layer("top.qcow2").to_str().unwrap()],
        &["write 8M 64k", "write -z 12M 64k"],
    );
    let out = run_ok(
        Command::new("qemu-img")
            .args(["map", "--output=json"])
            .arg(layer("top.qcow2")),
    );
    let qemu_map: Value = serde_json::from_slice(&out.stdout).unwrap();
    // qemu-img map: depth 0 is the top layer; unallocated ranges have "present": false.
    let expected = depth_ranges(
        &qemu_map
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let depth = if e["present"] == true {
                    e["depth"].as_u64().unwrap() + 1
                } else {
                    0
                };
                (
                    e["start"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    depth,
                )
            })
            .collect::<Vec<_>>(),
    );
    let top = layer("top.qcow2");
    let sock = dir.path().join("nbd.sock");
    let d = Daemon::start_in(
        Flavor::Blockexportd,
        dir,
        &[
            "--blockdev",
            &format!(
                "driver=file,filename={},node-name=tf,read-only=on",
                top.display()
            ),
            "--blockdev",
            "driver=qcow2,file=tf,node-name=top,read-only=on",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", sock.display()),
            "--export",
            "type=nbd,id=e,node-name=top,name=top,allocation-depth=on",
        ],
    );
    let out = run_ok(Command::new("nbdinfo").args([
        "--json",
        "--map=qemu:allocation-depth",
        &uri(&d, "top"),
    ]));
    let ours: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ours = depth_ranges(
        &ours
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["offset"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["type"].as_u64().unwrap(),
                )
            })
            .collect::<Vec<_>>(),
    );
    assert_eq!(ours, expected);
    assert!(
        ours.iter().any(|r| r.2 == 3)
            && ours.iter().any(|r| r.2 == 2)
            && ours.iter().any(|r| r.2 == 1)
    );
}
