//! The guest VDUSE tests run in (`guest::vduse_config`): its own kernel (built once per
//! machine, see `blockexportd_tests::kernel`) has VDUSE and sees both vCPUs, `vdpa` finds the
//! `vduse` management device over generic netlink, blockexportd and qemu-storage-daemon run in
//! it with their libraries, and a virtio-blk disk over a host image file carries data both
//! ways.

use blockexportd_tests::guest::{self, Vm};
use blockexportd_tests::{pattern, require_tool};
use serde_json::{json, Value};
use std::time::Instant;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

#[test]
fn vduse_guest_has_vduse_vdpa_and_the_daemons() {
    if !guest::require_vduse_guest() || !require_tool("qemu-storage-daemon") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    let mut expected = vec![0u8; 16 * MIB];
    let host_data = pattern(64 * KIB, 1);
    let guest_data = pattern(128 * KIB, 2);
    expected[..host_data.len()].copy_from_slice(&host_data);
    std::fs::write(&image, &expected).expect("write the image");
    expected[MIB..MIB + guest_data.len()].copy_from_slice(&guest_data);

    let mut cfg = guest::vduse_config("")
        .host_program("qemu-storage-daemon")
        .disk(&image)
        .file("/data/host", &host_data)
        .file("/data/guest", &guest_data);
    cfg.cpus = 2;
    let vda = cfg.disk_name(0);
    cfg.script = format!(
        "if [ -c /dev/vduse/control ]; then report control char; else report control missing; fi\n\
         report mgmtdev $(vdpa -j mgmtdev show 2>&1)\n\
         report blockexportd $(blockexportd --version 2>&1)\n\
         report qsd $(qemu-storage-daemon --version 2>&1 | head -n 1)\n\
         report cpus $(grep -c ^processor /proc/cpuinfo)\n\
         report tmpfs $(awk '$3 == \"tmpfs\" {{ print $2 }}' /proc/mounts | sort)\n\
         report serial $(cat /sys/block/{disk}/serial)\n\
         if dd if={vda} bs=4096 count=16 iflag=direct 2>/dev/null | cmp -s - /data/host; \
         then report read match; else report read differ; fi\n\
         dd if=/data/guest of={vda} bs=4096 seek=256 oflag=direct conv=fsync 2>/dev/null\n\
         report write $?\n",
        disk = vda.trim_start_matches("/dev/"),
    );

    let _vm = guest::vm_lock();
    let t0 = Instant::now();
    let mut vm = Vm::boot(&cfg);
    assert_eq!(vm.result("control"), "char", "/dev/vduse/control");
    let mgmtdev = vm.result("mgmtdev");
    let mgmtdev: Value = serde_json::from_str(&mgmtdev)
        .unwrap_or_else(|e| panic!("vdpa -j mgmtdev show: {e}: {mgmtdev}"));
    assert_eq!(
        mgmtdev["mgmtdev"]["vduse"]["supported_classes"],
        json!(["block"]),
        "vdpa mgmtdev show: {mgmtdev}"
    );
    let version = vm.result("blockexportd");
    assert!(version.starts_with("blockexportd "), "{version}");
    let qsd = vm.result("qsd");
    assert!(qsd.starts_with("qemu-storage-daemon version "), "{qsd}");
    for (key, want, what) in [
        ("cpus", "2", "vCPUs the guest sees (ACPI)"),
        ("tmpfs", "/dev/shm /tmp", "tmpfs mounts"),
        ("serial", "disk0", "the disk's serial"),
        ("read", "match", "the host's data, read in the guest"),
        ("write", "0", "the guest's write"),
    ] {
        assert_eq!(vm.result(key), want, "{what}");
    }
    vm.finish();
    let got = std::fs::read(&image).expect("read the image");
    assert!(
        got == expected,
        "the image after the guest's write differs from what the host expects"
    );
    eprintln!(
        "vduse_guest: booted, checked and powered off in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
