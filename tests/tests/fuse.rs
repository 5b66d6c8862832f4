//! FUSE exports of the real blockexportd binary, through the kernel's FUSE.

use blockexportd_tests::{
    flavors, pattern, qemu_img_create, require_tools, run_ok, under_ci, Daemon,
};
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
fn safe_removal_unmounts_while_the_file_is_open() {
    if !fuse_usable() {
        return;
    }
    let d = Daemon::start(&[]);
    let image = d.path("disk.raw");
    qemu_img_create(&image, "raw", "1M");
    let mountpoint = d.path("mnt");
    std::fs::write(&mountpoint, b"").unwrap();
    let mut q = d.qmp();
    q.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "f", "filename": image.to_str().unwrap()}),
    );
    q.ok(
        "block-export-add",
        json!({"type": "fuse", "id": "fx", "node-name": "f",
               "mountpoint": mountpoint.to_str().unwrap()}),
    );
    let (_, desc) = q.err("nbd-server-remove", json!({"name": "fx"}));
    assert_eq!(
        desc, "Block export 'fx' is not an NBD export",
        "QSD's answer"
    );
    let mut held = std::fs::File::open(&mountpoint).unwrap();
    let mut buf = [0u8; 512];
    held.read_exact(&mut buf).unwrap();
    // As QSD: an open file is no client, so `mode: safe` (the default) removes the export,
    // and the removal is over (event first) when the reply comes.
    q.ok("block-export-del", json!({"id": "fx"}));
    assert_eq!(
        q.events
            .iter()
            .filter(|e| e["event"] == "BLOCK_EXPORT_DELETED")
            .count(),
        1,
        "the event comes before the reply: {:?}",
        q.events
    );
    assert_eq!(q.ok("query-block-exports", json!({})), json!([]));
    assert_eq!(
        std::fs::metadata(&mountpoint).unwrap().len(),
        0,
        "unmounted"
    );
    let err = held.read(&mut buf).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    drop(held);
    // The id and the mountpoint are free again.
    q.ok(
        "block-export-add",
        json!({"type": "fuse", "id": "fx", "node-name": "f",
               "mountpoint": mountpoint.to_str().unwrap()}),
    );
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

/// Starts `flavor` exporting `image` (format `fmt`) over FUSE at `mountpoint`.
fn fuse_daemon(
    flavor: blockexportd_tests::Flavor,
    image: &std::path::Path,
    fmt: &str,
    mountpoint: &std::path::Path,
) -> Daemon {
    std::fs::write(mountpoint, b"").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(
        flavor,
        dir,
        &[
            "--blockdev",
            &format!("driver=file,filename={},node-name=f", image.display()),
            "--blockdev",
            &format!("driver={fmt},file=f,node-name=d"),
            "--export",
            &format!(
                "fuse,id=fx,node-name=d,writable=on,mountpoint={}",
                mountpoint.display()
            ),
        ],
    );
    assert_ne!(std::fs::metadata(mountpoint).unwrap().len(), 0, "mounted");
    d
}

/// The errno of a call that returns -1, or 0 when it succeeded.
fn errno_of(rc: libc::c_long) -> i32 {
    if rc < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    }
}

/// Requests QSD does not implement (xattrs, ioctls, poll, copy_file_range) get the same
/// answers from both daemons, and ours says nothing about them on stderr, as QSD.
#[test]
fn unimplemented_fuse_requests_are_answered_silently() {
    use std::os::fd::AsRawFd;
    if !fuse_usable() {
        return;
    }
    let mut answers = Vec::new();
    for flavor in flavors() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        qemu_img_create(&image, "raw", "1M");
        let mountpoint = dir.path().join("mnt");
        let mut d = fuse_daemon(flavor, &image, "raw", &mountpoint);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&mountpoint)
            .unwrap();
        let fd = f.as_raw_fd();
        let path = std::ffi::CString::new(mountpoint.to_str().unwrap()).unwrap();
        let name = c"user.test";
        let mut buf = [0u8; 256];
        let mut got = Vec::new();
        // SAFETY: valid C strings and buffers of the sizes given to each call; `fd` is open
        // for the whole block.
        unsafe {
            got.push(errno_of(libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            ) as libc::c_long));
            got.push(errno_of(
                libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) as libc::c_long,
            ));
            got.push(errno_of(libc::setxattr(
                path.as_ptr(),
                name.as_ptr(),
                b"x".as_ptr().cast(),
                1,
                0,
            ) as libc::c_long));
            got.push(errno_of(
                libc::removexattr(path.as_ptr(), name.as_ptr()) as libc::c_long
            ));
            // FS_IOC_GETFLAGS, what lsattr asks.
            let mut flags: libc::c_long = 0;
            got.push(errno_of(
                libc::ioctl(fd, 0x8008_6601, &mut flags as *mut libc::c_long) as libc::c_long,
            ));
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            got.push(errno_of(libc::poll(&mut pfd, 1, 0) as libc::c_long));
            let mut off_in: libc::loff_t = 0;
            let mut off_out: libc::loff_t = 4096;
            got.push(errno_of(
                libc::copy_file_range(fd, &mut off_in, fd, &mut off_out, 512, 0) as libc::c_long,
            ));
        }
        drop(f);
        let out = d.terminate();
        assert!(out.status.success(), "{flavor:?}: {out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "",
            "{flavor:?}: nothing on stderr"
        );
        answers.push(got);
    }
    let eop = libc::EOPNOTSUPP;
    assert_eq!(answers[0], [eop, eop, eop, eop, libc::ENOTTY, 0, 0]);
    if let Some(qsd) = answers.get(1) {
        assert_eq!(&answers[0], qsd, "the same answers as QSD's");
    }
}

/// `st_blocks` is what the image takes on the host, not its size: a 1 MiB image with 64 KiB
/// written shows what QSD shows (and `du` agrees), for raw and qcow2; an image that takes
/// nothing (all of a raw file a hole) counts its size, as in QSD.
#[test]
fn fuse_st_blocks_is_the_image_allocation() {
    use std::os::unix::fs::MetadataExt;
    if !fuse_usable() || !require_tools(&["qemu-io"]) {
        return;
    }
    for (fmt, write) in [("raw", true), ("qcow2", true), ("raw", false)] {
        let mut seen = Vec::new();
        for flavor in flavors() {
            let dir = tempfile::tempdir().unwrap();
            let image = dir.path().join("disk.img");
            qemu_img_create(&image, fmt, "1M");
            if write {
                blockexportd_tests::qemu_io(
                    &["-f", fmt, image.to_str().unwrap()],
                    &["write 0 64k"],
                );
            }
            let host_blocks = std::fs::metadata(&image).unwrap().blocks();
            let want = if host_blocks == 0 { 2048 } else { host_blocks };
            let mountpoint = dir.path().join("mnt");
            let mut d = fuse_daemon(flavor, &image, fmt, &mountpoint);
            let meta = std::fs::metadata(&mountpoint).unwrap();
            assert_eq!(meta.len(), 1 << 20);
            assert_eq!(
                meta.blocks(),
                want,
                "{flavor:?} {fmt} (image: {host_blocks})"
            );
            if write {
                assert!(meta.blocks() < 2048, "{flavor:?} {fmt}: sparse");
            }
            let du = run_ok(Command::new("du").arg("-k").arg(&mountpoint));
            let du = String::from_utf8_lossy(&du.stdout).to_string();
            assert_eq!(
                du.split_whitespace().next(),
                Some((want / 2).to_string().as_str()),
                "{flavor:?} {fmt}: du {du}"
            );
            seen.push(meta.blocks());
            d.terminate();
        }
        if seen.len() == 2 {
            assert_eq!(seen[0], seen[1], "{fmt}: as QSD");
        }
    }
}
