//! The vduse-blk export in a guest whose kernel has VDUSE (`guest::vduse_config`): the guest
//! runs blockexportd over its own virtio disk (a host image), creates the export over QMP
//! (through a pipe chardev: busybox has no unix-socket client), binds it with `vdpa dev add`,
//! and uses the /dev/vdX that appears; the host checks the image afterwards.

use blockexportd_tests::guest::{self, Vm};
use blockexportd_tests::model::{count_from_env, seed_from_env};
use blockexportd_tests::{pattern, require_tool, run_ok};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const MIB: usize = 1 << 20;

/// The daemon over the guest disk `disk`, with further options `more`, and its QMP helper.
fn qmp_script(disk: &str, more: &str) -> String {
    guest::qmp_over_pipe(&format!(
        "--blockdev driver=host_device,node-name=d0,filename={disk} {more}"
    ))
}

#[test]
fn a_vduse_export_is_a_host_disk_with_the_right_geometry_and_data() {
    if !guest::require_vduse_guest() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    let mut expected = pattern(32 * MIB, 7);
    std::fs::write(&image, &expected).expect("write the image");
    let written = pattern(MIB, 8);
    expected[4 * MIB..5 * MIB].copy_from_slice(&written);

    let mut cfg = guest::vduse_config("")
        .disk(&image)
        .file("/data/written", &written)
        .file("/data/original", &expected[..MIB]);
    cfg.cpus = 2;
    let vda = cfg.disk_name(0);
    cfg.script = qmp_script(&vda, "")
        + r#"
report add $(qmp '{"execute":"block-export-add","arguments":{"type":"vduse-blk","id":"e0","node-name":"d0","name":"vduse0","writable":true,"serial":"bexp-0123","logical-block-size":4096,"num-queues":2}}')
vdpa dev add name vduse0 mgmtdev vduse
report size $(cat /sys/block/vdb/size)
report lbs $(cat /sys/block/vdb/queue/logical_block_size)
report serial $(cat /sys/block/vdb/serial)
report ro $(cat /sys/block/vdb/ro)
dd if=/dev/vdb of=/tmp/first bs=64k count=16 2>/dev/null
cmp /tmp/first /data/original && report read same
dd if=/data/written of=/dev/vdb bs=64k seek=64 conv=fsync 2>/dev/null
blockdev --flushbufs /dev/vdb
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vdb of=/tmp/back bs=64k skip=64 count=16 2>/dev/null
cmp /tmp/back /data/written && report write same
vdpa dev del vduse0
report del $(qmp '{"execute":"block-export-del","arguments":{"id":"e0"}}')
i=0; while [ -e /dev/vduse/vduse0 ] && [ $i -lt 50 ]; do i=$((i+1)); usleep 100000; done
if [ -e /dev/vduse/vduse0 ]; then report gone no; else report gone yes; fi
report addro $(qmp '{"execute":"block-export-add","arguments":{"type":"vduse-blk","id":"e1","node-name":"d0","name":"vduse1"}}')
vdpa dev add name vduse1 mgmtdev vduse
report ro1 $(cat /sys/block/vdb/ro)
if dd if=/data/written of=/dev/vdb bs=64k seek=128 conv=fsync 2>/dev/null; then report rowrite accepted; else report rowrite refused; fi
vdpa dev del vduse1
qmp '{"execute":"block-export-del","arguments":{"id":"e1"}}' >/dev/null
qmp '{"execute":"quit"}' >/dev/null
wait
report stderr "$(tr '\n' ' ' </tmp/daemon.err)"
"#;
    let _lock = guest::vm_lock();
    let mut vm = Vm::boot(&cfg);
    assert_eq!(vm.result("add"), r#"{"return": {}}"#);
    assert_eq!(vm.result("size"), (32 * MIB / 512).to_string());
    assert_eq!(vm.result("lbs"), "4096");
    assert_eq!(vm.result("serial"), "bexp-0123");
    assert_eq!(vm.result("ro"), "0");
    assert_eq!(vm.result("read"), "same");
    assert_eq!(vm.result("write"), "same");
    assert_eq!(vm.result("del"), r#"{"return": {}}"#);
    assert_eq!(
        vm.result("gone"),
        "yes",
        "block-export-del destroys the unbound device"
    );
    assert_eq!(vm.result("addro"), r#"{"return": {}}"#);
    assert_eq!(vm.result("ro1"), "1");
    assert_eq!(vm.result("rowrite"), "refused");
    assert_eq!(vm.result("stderr"), "", "the daemon is quiet");
    vm.finish();
    let image_now = std::fs::read(&image).expect("read the image");
    assert!(
        image_now == expected,
        "the image holds the original data and the guest's write"
    );
}

/// Reconnection as QSD offers it: the daemon is killed while the guest writes to the bound
/// device; the kernel device stays and its I/O waits; a new daemon exporting the same name
/// takes it over (resubmitting what the dead one had in flight, from the reconnect log in
/// /tmp) and the write completes with every byte in the image.
#[test]
fn a_new_daemon_takes_over_a_bound_device_and_the_waiting_io_completes() {
    if !guest::require_vduse_guest() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    let mut expected = vec![0u8; 32 * MIB];
    std::fs::write(&image, &expected).expect("write the image");
    let written = pattern(8 * MIB, 9);
    expected[MIB..9 * MIB].copy_from_slice(&written);

    let mut cfg = guest::vduse_config("")
        .disk(&image)
        .file("/data/written", &written);
    cfg.cpus = 2;
    let vda = cfg.disk_name(0);
    let add = r#"'{"execute":"block-export-add","arguments":{"type":"vduse-blk","id":"e0","node-name":"d0","name":"vduse0","writable":true}}'"#;
    cfg.script = qmp_script(&vda, "")
        + &format!(
            r#"
report add $(qmp {add})
vdpa dev add name vduse0 mgmtdev vduse
dd if=/data/written of=/dev/vdb bs=64k seek=16 conv=fsync 2>/tmp/dd.err &
writer=$!
head -c 65536 /dev/vdb >/dev/null
kill -9 $(pidof blockexportd)
exec 3>&- 4<&-
report log $(if [ -e /tmp/vduse-blk-vduse0 ]; then echo kept; else echo missing; fi)
rm -f /tmp/qmp.in /tmp/qmp.out
"#
        )
        + &qmp_script(&vda, "")
        + &format!(
            r#"
report again $(qmp {add})
wait $writer
report dd $?
blockdev --flushbufs /dev/vdb
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vdb of=/tmp/back bs=64k skip=16 count=128 2>/dev/null
cmp /tmp/back /data/written && report back same
vdpa dev del vduse0
qmp '{{"execute":"quit"}}' >/dev/null
"#
        );
    let _lock = guest::vm_lock();
    let mut vm = Vm::boot(&cfg);
    assert_eq!(vm.result("add"), r#"{"return": {}}"#);
    assert_eq!(
        vm.result("log"),
        "kept",
        "the reconnect log is where QSD keeps it"
    );
    assert_eq!(
        vm.result("again"),
        r#"{"return": {}}"#,
        "the device is taken over"
    );
    assert_eq!(vm.result("dd"), "0", "the waiting write completed");
    assert_eq!(vm.result("back"), "same");
    vm.finish();
    let image_now = std::fs::read(&image).expect("read the image");
    assert!(
        image_now == expected,
        "every byte of the write is in the image"
    );
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Raw,
    Qcow2,
}

/// Random requests on the VDUSE disk in the guest (`guest-random-ops`: many in flight from
/// several threads, over two queues, each read checked against a model), then the model,
/// written by the guest to a second disk, compared with the image on the host by
/// `qemu-img compare`, and a qcow2 image checked by `qemu-img check`. Both nodes have
/// `discard=unmap`.
/// `VDUSE_RANDOM_SEED=N` replays a run, `VDUSE_RANDOM_BATCHES=N` makes it longer.
fn random_ops_case(format: Format) {
    if !guest::require_vduse_guest() || !require_tool("qemu-img") {
        return;
    }
    let seed = seed_from_env("VDUSE_RANDOM_SEED");
    let batches = count_from_env("VDUSE_RANDOM_BATCHES", 150);
    eprintln!("random ops over VDUSE, {format:?}: VDUSE_RANDOM_SEED={seed}");
    let size = 16 * MIB;
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, pattern(size, seed)).expect("write the image");
    let (image, fmt, more, node) = match format {
        Format::Raw => (raw.clone(), "raw", "", "d0"),
        Format::Qcow2 => {
            let q = dir.path().join("disk.qcow2");
            run_ok(
                Command::new("qemu-img")
                    .args(["convert", "-f", "raw", "-O", "qcow2"])
                    .arg(&raw)
                    .arg(&q),
            );
            (
                q,
                "qcow2",
                "--blockdev driver=qcow2,node-name=q0,file=d0,discard=unmap",
                "q0",
            )
        }
    };
    let model = dir.path().join("model.raw");
    std::fs::write(&model, vec![0u8; size]).expect("write the model disk");

    let mut cfg = guest::vduse_config("")
        .program(
            Path::new(env!("CARGO_BIN_EXE_guest-random-ops")),
            "/usr/bin/guest-random-ops",
        )
        .disk(&image)
        .disk(&model);
    cfg.cpus = 2;
    let (disk, model_disk) = (cfg.disk_name(0), cfg.disk_name(1));
    // The VDUSE disk is probed after the guest's two PCI disks.
    let vdev = cfg.disk_name(2);
    // Discards go down to the guest's disk (and, on qcow2, free clusters).
    cfg.script = qmp_script(&format!("{disk},discard=unmap"), more)
        + &format!(
            r#"
report add $(qmp '{{"execute":"block-export-add","arguments":{{"type":"vduse-blk","id":"e0","node-name":"{node}","name":"vduse0","writable":true,"num-queues":2}}}}')
vdpa dev add name vduse0 mgmtdev vduse
report queues $(ls /sys/block/{vname}/mq | wc -l)
report random "$(guest-random-ops {vdev} {model_disk} {seed} {batches} 8 2>&1 | tail -n 3 | tr '\n' ' ')"
vdpa dev del vduse0
report del $(qmp '{{"execute":"block-export-del","arguments":{{"id":"e0"}}}}')
qmp '{{"execute":"quit"}}' >/dev/null
wait
report stderr "$(tr '\n' ' ' </tmp/daemon.err)"
"#,
            vname = vdev.trim_start_matches("/dev/"),
        );
    let _lock = guest::vm_lock();
    let mut vm = Vm::boot(&cfg);
    assert_eq!(vm.result("add"), r#"{"return": {}}"#);
    assert_eq!(vm.result("queues"), "2", "the guest uses both queues");
    let random = vm.result_within("random", Duration::from_secs(600));
    eprintln!("{random}");
    assert!(random.starts_with("ok "), "seed {seed}: {random}");
    assert_eq!(vm.result("del"), r#"{"return": {}}"#);
    assert_eq!(vm.result("stderr"), "", "the daemon is quiet");
    vm.finish();
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", fmt, "-F", "raw"])
            .arg(&image)
            .arg(&model),
    );
    if format == Format::Qcow2 {
        run_ok(
            Command::new("qemu-img")
                .args(["check", "-f", "qcow2"])
                .arg(&image),
        );
    }
}

#[test]
fn random_ops_over_vduse_raw() {
    random_ops_case(Format::Raw);
}

#[test]
fn random_ops_over_vduse_qcow2() {
    random_ops_case(Format::Qcow2);
}
