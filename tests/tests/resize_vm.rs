//! `block_resize` seen by real guests: a vhost-user-blk guest (QEMU, TCG) gets the new
//! capacity through `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` (written once over `Flavor`, run
//! against qemu-storage-daemon, the reference, and blockexportd); a VDUSE disk of the guest's
//! own kernel gets it through the config interrupt. Each guest waits for the size to change
//! (polling, with a limit), then writes in the new area; the image must hold the bytes.

use blockexportd_tests::guest::{self, Vm, VmConfig};
use blockexportd_tests::{pattern, Daemon, Flavor};
use serde_json::json;

const MIB: u64 = 1 << 20;

/// A guest command that waits (up to 30 s) until /sys/block/`dev`/size is no longer `old`
/// sectors, then reports it as `after`.
fn wait_size_change(dev: &str, old: u64) -> String {
    format!(
        "i=0; while [ \"$(cat /sys/block/{dev}/size)\" = {old} ] && [ $i -lt 300 ]; do \
         i=$((i+1)); usleep 100000; done\n\
         report after $(cat /sys/block/{dev}/size)\n"
    )
}

/// vhost-user-blk: the guest sees 32 MiB, the host resizes the node to 48 MiB over QMP, the
/// guest sees 48 MiB and writes 1 MiB at 40 MiB, which lands in the image.
fn vhost_user_blk_grows(flavor: Flavor) {
    if !guest::require_guest() {
        return;
    }
    let (old, new) = (32 * MIB, 48 * MIB);
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    let socket = dir.path().join("vub.sock");
    std::fs::write(&image, vec![0u8; old as usize]).expect("write the image");
    let blockdev = format!("driver=file,node-name=disk0,filename={}", image.display());
    let export = format!(
        "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on",
        socket.display()
    );
    let daemon = Daemon::start_in(flavor, dir, &["--blockdev", &blockdev, "--export", &export]);

    let tail = pattern(MIB as usize, 21);
    let at = 40 * MIB;
    let script = format!(
        "report before $(cat /sys/block/vda/size)\n\
         read -r go\n\
         {wait}\
         dd if=/data/tail of=/dev/vda bs=65536 seek={seek} oflag=direct 2>/dev/null; \
         report write $?\n\
         if dd if=/dev/vda bs=65536 skip={seek} count=16 iflag=direct 2>/dev/null \
         | cmp -s - /data/tail; then report reread match; else report reread differ; fi\n",
        wait = wait_size_change("vda", old / 512),
        seek = at / 65536,
    );
    let cfg = VmConfig::new(&socket, &script).file("/data/tail", &tail);
    let _vm = guest::vm_lock();
    let mut vm = Vm::boot(&cfg);
    assert_eq!(vm.result("before"), (old / 512).to_string(), "size at boot");
    let mut qmp = daemon.qmp();
    qmp.ok("block_resize", json!({"node-name": "disk0", "size": new}));
    vm.send_line("resized");
    assert_eq!(
        vm.result("after"),
        (new / 512).to_string(),
        "the guest sees the new size (512-byte sectors)"
    );
    assert_eq!(vm.result("write"), "0", "a write in the new area");
    assert_eq!(vm.result("reread"), "match", "reading it back");
    vm.finish();
    let bytes = std::fs::read(&image).expect("read the image");
    assert_eq!(bytes.len() as u64, new, "the image's size");
    assert!(
        bytes[at as usize..(at + MIB) as usize] == tail[..],
        "the image holds the guest's write in the new area"
    );
}

/// The guest's QMP helper ([`guest::qmp_over_pipe`]), with a daemon whose node `d0` is a file of
/// 16 MiB on the guest's tmpfs.
fn qmp_script() -> String {
    "dd if=/dev/zero of=/tmp/r.img bs=1M count=0 seek=16 2>/dev/null".to_string()
        + &guest::qmp_over_pipe("--blockdev driver=file,node-name=d0,filename=/tmp/r.img")
}

/// VDUSE: the bound /dev/vda (the guest has no other disk) of 16 MiB grows to 24 MiB when the node is resized over QMP;
/// a write at 20 MiB reaches the image.
#[test]
fn vduse_blk_grows() {
    if !guest::require_vduse_guest() {
        return;
    }
    let tail = pattern(MIB as usize, 22);
    let mut cfg = guest::vduse_config("").file("/data/tail", &tail);
    cfg.cpus = 2;
    cfg.script = qmp_script()
        + r#"
report add $(qmp '{"execute":"block-export-add","arguments":{"type":"vduse-blk","id":"e0","node-name":"d0","name":"vduse0","writable":true}}')
vdpa dev add name vduse0 mgmtdev vduse
report before $(cat /sys/block/vda/size)
report resize $(qmp '{"execute":"block_resize","arguments":{"node-name":"d0","size":25165824}}')
"# + &wait_size_change("vda", 16 * MIB / 512)
        + r#"
dd if=/data/tail of=/dev/vda bs=64k seek=320 conv=fsync 2>/dev/null; report write $?
if dd if=/tmp/r.img bs=64k skip=320 count=16 2>/dev/null | cmp -s - /data/tail; then report image same; else report image differ; fi
vdpa dev del vduse0
qmp '{"execute":"block-export-del","arguments":{"id":"e0"}}' >/dev/null
qmp '{"execute":"quit"}' >/dev/null
wait
report stderr "$(tr '\n' ' ' </tmp/daemon.err)"
"#;
    let _lock = guest::vm_lock();
    let mut vm = Vm::boot(&cfg);
    assert_eq!(vm.result("add"), r#"{"return": {}}"#);
    assert_eq!(vm.result("before"), (16 * MIB / 512).to_string());
    assert_eq!(vm.result("resize"), r#"{"return": {}}"#);
    assert_eq!(
        vm.result("after"),
        (24 * MIB / 512).to_string(),
        "the guest's kernel sees the new size (512-byte sectors)"
    );
    assert_eq!(vm.result("write"), "0", "a write in the new area");
    assert_eq!(vm.result("image"), "same", "the image holds it");
    assert_eq!(vm.result("stderr"), "", "the daemon is quiet");
    vm.finish();
}

macro_rules! per_flavor {
    ($($case:ident),* $(,)?) => {
        mod qsd {
            $(#[test] fn $case() { super::$case(blockexportd_tests::Flavor::Qsd) })*
        }
        mod blockexportd {
            $(#[test] fn $case() { super::$case(blockexportd_tests::Flavor::Blockexportd) })*
        }
    };
}

per_flavor!(vhost_user_blk_grows);
