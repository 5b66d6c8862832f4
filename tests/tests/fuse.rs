//! FUSE exports of the real blockexportd binary, through the kernel's FUSE.

use blockexportd_tests::{pattern, qemu_img_create, require_tools, run_ok, under_ci, Daemon};
use serde_json::json;
use std::io::{Read, Seek, SeekFrom, Write};
use std::process::Command;

fn fuse_usable() -> bool {
    let ok = std::path::Path::new("/dev/fuse").exists();
    if !ok {
        assert!(!under_ci(), "/dev/fuse is missing (CI=true)");
        eprintln!("skipping: /dev/fuse is missing");
    }
    ok && require_tools(&["qemu-img"])
}

#[test]
fn fuse_export_over_qmp_reads_writes_and_unmounts() {
    if !fuse_usable() {
        return;
    }
    let d = Daemon::start(&[]);
    let image = d.path("disk.raw");
    qemu_img_create(&image, "raw", "4M");
    let data = pattern(1 << 20, 7);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .write_all(&data)
        .unwrap();
    let mountpoint = d.path("mnt");
    std::fs::write(&mountpoint, b"").unwrap();
    let mut q = d.qmp();
    q.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "f", "filename": image.to_str().unwrap()}),
    );
    q.ok(
        "block-export-add",
        json!({"type": "fuse", "id": "fx", "node-name": "f", "writable": true,
               "mountpoint": mountpoint.to_str().unwrap()}),
    );
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&mountpoint)
        .unwrap();
    assert_eq!(f.metadata().unwrap().len(), 4 << 20);
    let mut head = vec![0; 1 << 20];
    f.read_exact(&mut head).unwrap();
    assert!(head == data, "the mounted file shows the image's bytes");
    let new = pattern(64 << 10, 9);
    f.seek(SeekFrom::Start(2 << 20)).unwrap();
    f.write_all(&new).unwrap();
    f.sync_all().unwrap();
    drop(f);
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&image)
            .arg(&mountpoint),
    );
    q.ok("block-export-del", json!({"id": "fx"}));
    q.wait_event("BLOCK_EXPORT_DELETED");
    // Unmounted: the mountpoint is the empty regular file again, and the write is in the image.
    assert_eq!(std::fs::metadata(&mountpoint).unwrap().len(), 0);
    let image_bytes = std::fs::read(&image).unwrap();
    assert!(image_bytes[2 << 20..(2 << 20) + (64 << 10)] == new[..]);
}

#[test]
fn fuse_export_on_command_line_is_unmounted_at_sigterm() {
    if !fuse_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    qemu_img_create(&image, "raw", "1M");
    let mountpoint = dir.path().join("mnt");
    std::fs::write(&mountpoint, b"").unwrap();
    let mut d = Daemon::start_in(
        blockexportd_tests::Flavor::Blockexportd,
        dir,
        &[
            "--blockdev",
            &format!("driver=file,filename={},node-name=f", image.display()),
            "--export",
            &format!("fuse,id=fx,node-name=f,mountpoint={}", mountpoint.display()),
        ],
    );
    let meta = std::fs::metadata(&mountpoint).unwrap();
    assert_eq!(meta.len(), 1 << 20);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o400,
        "read-only export is mode 400"
    );
    assert!(std::fs::OpenOptions::new()
        .write(true)
        .open(&mountpoint)
        .is_err());
    let out = d.terminate();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::metadata(&mountpoint).unwrap().len(),
        0,
        "unmounted at exit"
    );
}

#[test]
fn fuse_export_runs_in_its_iothread() {
    if !fuse_usable() {
        return;
    }
    let d = Daemon::start(&["--object", "iothread,id=io0"]);
    let image = d.path("disk.raw");
    qemu_img_create(&image, "raw", "1M");
    let mountpoint = d.path("mnt");
    std::fs::write(&mountpoint, b"").unwrap();
    let mut q = d.qmp();
    q.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "f", "filename": image.to_str().unwrap()}),
    );
    let (_, desc) = q.err(
        "block-export-add",
        json!({"type": "fuse", "id": "fx", "node-name": "f", "iothread": "nope",
               "mountpoint": mountpoint.to_str().unwrap()}),
    );
    assert_eq!(desc, "iothread \"nope\" not found");
    q.ok(
        "block-export-add",
        json!({"type": "fuse", "id": "fx", "node-name": "f", "iothread": "io0", "writable": true,
               "mountpoint": mountpoint.to_str().unwrap()}),
    );
    let data = pattern(4096, 3);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&mountpoint)
        .unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert!(std::fs::read(&mountpoint).unwrap()[..4096] == data[..]);
    let (_, desc) = q.err("object-del", json!({"id": "io0"}));
    assert!(desc.contains("in use"), "{desc}");
    q.ok("block-export-del", json!({"id": "fx"}));
    q.wait_event("BLOCK_EXPORT_DELETED");
    q.ok("object-del", json!({"id": "io0"}));
    assert!(std::fs::read(&image).unwrap()[..4096] == data[..]);
}
