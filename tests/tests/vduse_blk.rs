//! The vduse-blk export on the host: what can be checked without a kernel that has VDUSE
//! (the option checks against qemu-storage-daemon's, the plain error where /dev/vduse is
//! missing, nothing lost on a refusal). The device itself is tested in a guest whose kernel
//! has VDUSE: `vduse_blk_vm.rs`.

use blockexportd_tests::{assert_startup_error_as_qsd, require_tools, startup_error, Daemon};
use serde_json::json;
use std::path::Path;

/// Bad options get QSD's messages, word for word, in QSD's order (num-queues, queue-size,
/// then logical-block-size), before anything is asked of the kernel.
#[test]
fn bad_options_get_qsds_messages() {
    if !require_tools(&["qemu-storage-daemon"]) {
        return;
    }
    for extra in [
        "name=v,num-queues=0",
        "name=v,queue-size=2",
        "name=v,queue-size=100",
        "name=v,queue-size=2048",
        "name=v,logical-block-size=1000",
        "name=v,logical-block-size=256",
        "name=v,logical-block-size=4M",
        "name=v,num-queues=0,queue-size=3,logical-block-size=3",
        "name=v,queue-size=4,logical-block-size=3",
        "name=v,queue-size=-1",
        "name=v,bogus=1",
        "logical-block-size=512",
    ] {
        let export = format!("type=vduse-blk,id=e,node-name=n,{extra}");
        let args = [
            "--blockdev",
            "driver=null-co,node-name=n",
            "--export",
            &export,
        ];
        assert_startup_error_as_qsd(&args);
    }
}

/// QSD takes a block size above the page size and the kernel then refuses the disk; we
/// refuse it at once.
#[test]
fn a_block_size_above_the_page_size_is_refused() {
    let export = "type=vduse-blk,id=e,node-name=n,name=v,logical-block-size=8192";
    let args = [
        "--blockdev",
        "driver=null-co,node-name=n",
        "--export",
        export,
    ];
    let msg = startup_error(&blockexportd_tests::daemon_binary(), "blockexportd", &args);
    assert!(
        msg.contains("between 512 and 4096 (the page size)"),
        "{export}: {msg}"
    );
}

/// Where the host has no VDUSE, `block-export-add` says so and what to do, and the node is
/// free again afterwards.
#[test]
fn without_vduse_the_export_says_so_and_keeps_the_node_free() {
    if Path::new("/dev/vduse/control").exists() {
        eprintln!("this host has VDUSE: the test of its absence does not apply");
        return;
    }
    let d = Daemon::start(&["--blockdev", "driver=null-co,node-name=n,size=1048576"]);
    let mut q = d.qmp();
    let (class, desc) = q.err(
        "block-export-add",
        json!({"type": "vduse-blk", "id": "e", "node-name": "n", "name": "v", "writable": true}),
    );
    assert_eq!(class, "GenericError");
    assert!(
        desc.starts_with("failed to create vduse device: /dev/vduse/control: No such file")
            && desc.contains("modprobe vduse"),
        "{desc}"
    );
    assert_eq!(q.ok("query-block-exports", json!({})), json!([]));
    q.ok("blockdev-del", json!({"node-name": "n"}));
}
