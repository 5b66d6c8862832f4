//! The `qemu:` metadata contexts (`qemu:dirty-bitmap:NAME`, `qemu:allocation-depth`)
//! against the real clients: nbdinfo --map, qemu-img map with `x-dirty-bitmap`, and the
//! libnbd python binding for LIST_META_CONTEXT and multi-context BLOCK_STATUS.

mod common;

use block_core::DirtyBitmap;
use common::*;
use nbd_server::{ExportConfig, ServerConfig};
use serde_json::Value;
use std::process::Command;
use std::sync::Arc;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const SIZE: u64 = 4 * MIB;

/// A server exporting a 4 MiB disk with allocation depth and two bitmaps:
/// - `b0` (64 KiB granularity) dirty at [0, 64K), [1M, 1M+192K) and [3M, 4M);
/// - `b1` (64 KiB granularity) all clean.
///
/// Disk: [0, 64K) written (depth 1), [1M, 2M) "in a backing file" (depth 2), the rest
/// unallocated (depth 0).
fn server() -> (TestServer, Arc<DirtyBitmap>) {
    let b0 = Arc::new(DirtyBitmap::new("b0", SIZE, 64 * KIB as u32, false));
    b0.set_range(0, 64 * KIB);
    b0.set_range(MIB, 192 * KIB);
    b0.set_range(3 * MIB, MIB);
    let b1 = Arc::new(DirtyBitmap::new("b1", SIZE, 64 * KIB as u32, false));
    let disk = MemDriver::new(SIZE);
    disk.fill(0, &vec![0x11; 64 * KIB as usize]);
    disk.set_depth(MIB, MIB, 2);
    let bitmaps = vec![Arc::clone(&b0), b1];
    let t = TestServer::start_with(disk, ServerConfig::default(), move |node| {
        let mut e = ExportConfig::new("e", node.attach("export 'e'", true).unwrap());
        e.bitmaps = bitmaps;
        e.allocation_depth = true;
        e
    });
    (t, b0)
}

/// `nbdinfo --map=CONTEXT --json`, as (offset, length, type).
fn nbdinfo_map(t: &TestServer, context: &str) -> Vec<(u64, u64, u64)> {
    let out = run_ok(
        Command::new("nbdinfo")
            .arg(format!("--map={context}"))
            .arg("--json")
            .arg(t.uri()),
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("nbdinfo --json output");
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn nbdinfo_maps_dirty_bitmaps_and_allocation_depth() {
    if !require_tool("nbdinfo") {
        return;
    }
    let (t, b0) = server();
    assert!(b0.busy(), "an exported bitmap is busy");
    assert_eq!(
        nbdinfo_map(&t, "qemu:dirty-bitmap:b0"),
        vec![
            (0, 64 * KIB, 1),
            (64 * KIB, MIB - 64 * KIB, 0),
            (MIB, 192 * KIB, 1),
            (MIB + 192 * KIB, 2 * MIB - 192 * KIB, 0),
            (3 * MIB, MIB, 1),
        ]
    );
    assert_eq!(nbdinfo_map(&t, "qemu:dirty-bitmap:b1"), vec![(0, SIZE, 0)]);
    assert_eq!(
        nbdinfo_map(&t, "qemu:allocation-depth"),
        vec![
            (0, 64 * KIB, 1),
            (64 * KIB, MIB - 64 * KIB, 0),
            (MIB, MIB, 2),
            (2 * MIB, 2 * MIB, 0),
        ]
    );
    // The map follows the bitmap as it changes.
    b0.clear();
    assert_eq!(nbdinfo_map(&t, "qemu:dirty-bitmap:b0"), vec![(0, SIZE, 0)]);
    // Removing the export frees the bitmap. Hard: nbdinfo has exited, but the server may not
    // have seen its connection end yet (a safe removal would be refused meanwhile); the
    // removal completes once it has.
    let gone = t
        .server
        .remove_export("e", nbd_server::RemoveMode::Hard)
        .unwrap();
    t.runtime.block_on(gone);
    assert!(!b0.busy(), "the bitmap stays busy after the export is gone");
}

#[test]
fn qemu_img_map_with_x_dirty_bitmap() {
    if !require_tool("qemu-img") {
        return;
    }
    let (t, _b0) = server();
    // QEMU's client reads the bitmap through base:allocation's bits: a dirty extent
    // (NBD_STATE_DIRTY = 1 = NBD_STATE_HOLE) shows as "data": false.
    let out = run_ok(Command::new("qemu-img").args([
        "map",
        "--output=json",
        "--image-opts",
        &format!(
            "driver=nbd,server.type=unix,server.path={},export=e,x-dirty-bitmap=qemu:dirty-bitmap:b0",
            t.socket.display()
        ),
    ]));
    let v: Value = serde_json::from_slice(&out.stdout).expect("qemu-img map JSON");
    let map: Vec<(u64, u64, bool)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        map,
        vec![
            (0, 64 * KIB, false),
            (64 * KIB, MIB - 64 * KIB, true),
            (MIB, 192 * KIB, false),
            (MIB + 192 * KIB, 2 * MIB - 192 * KIB, true),
            (3 * MIB, MIB, false),
        ],
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn libnbd_lists_and_reads_every_context() {
    if !require_python_nbd() {
        return;
    }
    let (t, _b0) = server();
    let script = r#"
import nbd, sys
uri = sys.argv[1]

def listed(queries):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri)
    h.clear_meta_contexts()
    for q in queries:
        h.add_meta_context(q)
    names = []
    h.opt_list_meta_context(lambda name: names.append(name) or 0)
    h.opt_abort()
    return names

assert listed([]) == ["base:allocation", "qemu:allocation-depth",
                      "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"], listed([])
assert listed(["qemu:"]) == ["qemu:allocation-depth", "qemu:dirty-bitmap:b0",
                             "qemu:dirty-bitmap:b1"], listed(["qemu:"])
assert listed(["qemu:dirty-bitmap:"]) == ["qemu:dirty-bitmap:b0",
                                          "qemu:dirty-bitmap:b1"]
assert listed(["qemu:dirty-bitmap:b1", "qemu:nosuch", "x:y"]) == ["qemu:dirty-bitmap:b1"]

h = nbd.NBD()
for c in ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"]:
    h.add_meta_context(c)
h.connect_uri(uri)
for c in ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"]:
    assert h.can_meta_context(c), c
assert not h.can_meta_context("qemu:dirty-bitmap:b1")

def status(offset, length, flags=0):
    got = {}
    def cb(ctx, off, entries, err):
        assert off == offset
        got[ctx] = list(zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(length, offset, cb, flags)
    return got

K, M = 1024, 1024 * 1024
# One request, every selected context in the reply.
got = status(0, 2 * M)
assert got["base:allocation"] == [(64 * K, 0), (M - 64 * K, 3), (M, 0)], got
assert got["qemu:allocation-depth"] == [(64 * K, 1), (M - 64 * K, 0), (M, 2)], got
assert got["qemu:dirty-bitmap:b0"] == [(64 * K, 1), (M - 64 * K, 0), (192 * K, 1),
                                       (M - 192 * K, 0)], got
# REQ_ONE: one extent per context.
got = status(M + 64 * K, 2 * M, nbd.CMD_FLAG_REQ_ONE)
assert got["base:allocation"] == [(M - 64 * K, 0)], got
assert got["qemu:allocation-depth"] == [(M - 64 * K, 2)], got
assert got["qemu:dirty-bitmap:b0"] == [(128 * K, 1)], got
h.shutdown()
print("ok")
"#;
    let out = run_ok(Command::new("/usr/bin/python3").args(["-c", script, &t.uri()]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

#[test]
fn exported_bitmaps_are_checked_as_qemu_does() {
    let (t, b0) = server();
    let attach = |writable: bool| t.node.attach("export 'x'", writable).unwrap();
    let with = |name: &str, writable: bool, bitmap: &Arc<DirtyBitmap>| {
        let mut e = ExportConfig::new(name, attach(writable));
        e.bitmaps = vec![Arc::clone(bitmap)];
        t.server.add_export(e)
    };
    // b0 is exported by "e": busy.
    assert_eq!(
        with("x", true, &b0).unwrap_err().to_string(),
        "Bitmap 'b0' is currently in use by another operation and cannot be used"
    );
    let bad = Arc::new(DirtyBitmap::new("bad", SIZE, 65536, true));
    bad.set_inconsistent(true);
    assert_eq!(
        with("x", true, &bad).unwrap_err().to_string(),
        "Bitmap 'bad' is inconsistent and cannot be used"
    );
    // An enabled bitmap under a read-only export of a writable node would keep changing.
    let live = Arc::new(DirtyBitmap::new("live", SIZE, 65536, false));
    assert_eq!(
        with("x", false, &live).unwrap_err().to_string(),
        "Enabled bitmap 'live' incompatible with readonly export"
    );
    assert!(!live.busy(), "a refused export leaves the bitmap alone");
    live.set_enabled(false);
    with("x", false, &live).unwrap();
    assert!(live.busy());
    assert_eq!(t.server.export_names(), ["e", "x"]);
}
