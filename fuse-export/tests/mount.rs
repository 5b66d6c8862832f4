//! The export mounted through the kernel's FUSE, driven by the programs users run (dd, cmp,
//! truncate, fallocate, cp, qemu-img) and by plain system calls.

mod common;

use common::{
    fuse_usable, is_mounted, pattern, require_tool, run_failing, run_stdout, Fixture, MemDriver,
};
use fuse_export::{AllowOther, FuseError, FuseExport, FuseExportConfig};
use nix::unistd::{lseek, Whence};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;

const MIB: u64 = 1 << 20;

#[test]
fn dd_reads_and_writes_the_node() {
    if !fuse_usable() || !require_tool("dd") || !require_tool("cmp") {
        return;
    }
    let driver = Arc::new(MemDriver::new(4 * MIB));
    let original = pattern(4 * MIB as usize, 7);
    driver.fill(0, &original);
    let fx = Fixture::mount(driver.clone(), true, false);
    let mp = fx.path();
    assert!(is_mounted(&mp));
    assert_eq!(std::fs::metadata(&mp).unwrap().len(), 4 * MIB);

    // Read everything with dd (1 MiB blocks) and compare with what the node holds.
    let expected = fx.file("expected");
    std::fs::write(&expected, &original).unwrap();
    let out = fx.file("out");
    run_stdout(
        Command::new("dd")
            .arg(format!("if={}", mp.display()))
            .arg(format!("of={}", out.display()))
            .arg("bs=1M"),
    );
    run_stdout(Command::new("cmp").arg(&out).arg(&expected));

    // Write 200 KiB at an unaligned offset with dd; the node must have exactly those bytes.
    let patch = pattern(200 * 1024, 99);
    let patch_file = fx.file("patch");
    std::fs::write(&patch_file, &patch).unwrap();
    run_stdout(
        Command::new("dd")
            .arg(format!("if={}", patch_file.display()))
            .arg(format!("of={}", mp.display()))
            .args(["bs=1000", "seek=1234", "conv=notrunc,fsync"]),
    );
    let mut want = original.clone();
    want[1_234_000..1_234_000 + patch.len()].copy_from_slice(&patch);
    assert!(
        fx.driver.contents() == want,
        "node content differs after dd write"
    );
    assert!(
        fx.driver.flush_count() >= 1,
        "conv=fsync must flush the node"
    );
    std::fs::write(&expected, &want).unwrap();
    run_stdout(Command::new("cmp").arg(&mp).arg(&expected));
    assert_eq!(std::fs::metadata(&mp).unwrap().len(), 4 * MIB);
    assert_eq!(fx.driver.fua_writes.load(Ordering::SeqCst), 0);

    // Large writes arrive in requests of 1 MiB (max_write).
    run_stdout(
        Command::new("dd")
            .arg(format!("if={}", expected.display()))
            .arg(format!("of={}", mp.display()))
            .args(["bs=4M", "count=1", "conv=notrunc"]),
    );
    assert_eq!(fx.driver.max_write.load(Ordering::SeqCst), MIB);
}

#[test]
fn writethrough_and_o_dsync_writes_are_fua() {
    if !fuse_usable() || !require_tool("dd") {
        return;
    }
    let fx = Fixture::mount_with(Arc::new(MemDriver::new(MIB)), true, false, true);
    run_stdout(
        Command::new("dd")
            .args(["if=/dev/zero", "bs=4096", "count=3", "conv=notrunc"])
            .arg(format!("of={}", fx.path().display())),
    );
    assert_eq!(fx.driver.fua_writes.load(Ordering::SeqCst), 3);

    let fx = Fixture::mount(Arc::new(MemDriver::new(MIB)), true, false);
    run_stdout(
        Command::new("dd")
            .args([
                "if=/dev/zero",
                "bs=4096",
                "count=2",
                "conv=notrunc",
                "oflag=dsync",
            ])
            .arg(format!("of={}", fx.path().display())),
    );
    assert_eq!(fx.driver.fua_writes.load(Ordering::SeqCst), 2);
    run_stdout(
        Command::new("dd")
            .args(["if=/dev/zero", "bs=4096", "count=2", "conv=notrunc"])
            .arg(format!("of={}", fx.path().display())),
    );
    assert_eq!(fx.driver.fua_writes.load(Ordering::SeqCst), 2);
}

#[test]
fn fio_verifies_with_many_requests_in_flight() {
    if !fuse_usable() || !require_tool("fio") {
        return;
    }
    let fx = Fixture::mount(Arc::new(MemDriver::new(8 * MIB)), true, false);
    run_stdout(
        Command::new("fio")
            .args([
                "--name=verify",
                "--rw=randwrite",
                "--bs=4k",
                "--size=8M",
                "--ioengine=libaio",
                "--iodepth=32",
                "--direct=1",
                "--verify=crc32c",
                "--do_verify=1",
                "--numjobs=1",
            ])
            .arg(format!("--filename={}", fx.path().display()))
            // fio leaves its verify state file in the working directory.
            .current_dir(
                fx.path()
                    .parent()
                    .expect("the image is in the fixture's directory"),
            ),
    );
}

#[test]
fn truncate_resizes_the_node_and_mode_follows_writable() {
    if !fuse_usable() || !require_tool("truncate") || !require_tool("touch") {
        return;
    }
    let fx = Fixture::mount(Arc::new(MemDriver::new(MIB)), true, false);
    let mp = fx.path();
    let meta = std::fs::metadata(&mp).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert!(meta.file_type().is_file());

    run_stdout(Command::new("truncate").args(["-s", "3M"]).arg(&mp));
    assert_eq!(fx.node.size(), 3 * MIB);
    assert_eq!(std::fs::metadata(&mp).unwrap().len(), 3 * MIB);
    run_stdout(Command::new("truncate").args(["-s", "100000"]).arg(&mp));
    assert_eq!(fx.node.size(), 100_000);
    assert_eq!(std::fs::metadata(&mp).unwrap().len(), 100_000);

    // chmod is kept in memory; group/other bits need allow_other (which root gets).
    std::fs::set_permissions(&mp, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(
        std::fs::metadata(&mp).unwrap().permissions().mode() & 0o7777,
        0o640
    );
    assert_eq!(fx.export.as_ref().unwrap().mode(), 0o640);
    // chown too (with allow_other, which root gets); root still reaches the file.
    nix::unistd::chown(
        &mp,
        Some(nix::unistd::Uid::from_raw(1000)),
        Some(nix::unistd::Gid::from_raw(1000)),
    )
    .unwrap();
    let meta = std::fs::metadata(&mp).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
    // Setting times is refused, as QSD does.
    let err = run_failing(Command::new("touch").arg(&mp));
    assert!(err.contains("Operation not supported"), "{err}");
}

#[test]
fn fallocate_punches_and_zeroes() {
    if !fuse_usable() || !require_tool("fallocate") {
        return;
    }
    let driver = Arc::new(MemDriver::new(MIB));
    driver.fill(0, &pattern(MIB as usize, 3));
    let fx = Fixture::mount(driver, true, false);
    let mp = fx.path();

    // Punch 64 KiB at 128 KiB: zeroes, and the blocks become holes in the node.
    run_stdout(
        Command::new("fallocate")
            .args(["-p", "-o", "131072", "-l", "65536"])
            .arg(&mp),
    );
    let data = fx.driver.contents();
    assert!(data[131_072..196_608].iter().all(|&b| b == 0));
    assert_eq!(data[131_071], pattern(MIB as usize, 3)[131_071]);
    assert!(!fx.driver.is_allocated(131_072) && !fx.driver.is_allocated(196_607));
    assert!(fx.driver.is_allocated(196_608));
    assert_eq!(data[196_608..], pattern(MIB as usize, 3)[196_608..]);

    // Plain fallocate (mode 0) allocates the hole again, still reading zeroes.
    run_stdout(
        Command::new("fallocate")
            .args(["-o", "131072", "-l", "4096"])
            .arg(&mp),
    );
    assert!(fx.driver.is_allocated(131_072) && !fx.driver.is_allocated(135_168));
    assert!(fx.driver.contents()[131_072..135_168]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(fx.node.size(), MIB);

    // Zero 10000 bytes at 300000: zeroes, still allocated.
    run_stdout(
        Command::new("fallocate")
            .args(["-z", "-o", "300000", "-l", "10000"])
            .arg(&mp),
    );
    let data = fx.driver.contents();
    assert!(data[300_000..310_000].iter().all(|&b| b == 0));
    assert_eq!(data[299_999], pattern(MIB as usize, 3)[299_999]);
    assert_eq!(data[310_000], pattern(MIB as usize, 3)[310_000]);
    assert!(fx.driver.is_allocated(300_000));
    assert_eq!(fx.node.size(), MIB);

    // Zero range past the end without --keep-size grows the node.
    run_stdout(
        Command::new("fallocate")
            .args(["-z", "-o", "1048576", "-l", "8192"])
            .arg(&mp),
    );
    assert_eq!(fx.node.size(), MIB + 8192);
    // Plain fallocate past the end grows and allocates.
    run_stdout(
        Command::new("fallocate")
            .args(["-o", "1052672", "-l", "4096"])
            .arg(&mp),
    );
    assert_eq!(fx.node.size(), MIB + 8192);
    run_stdout(
        Command::new("fallocate")
            .args(["-o", "1056768", "-l", "4096"])
            .arg(&mp),
    );
    assert_eq!(fx.node.size(), MIB + 12288);
    assert!(fx.driver.is_allocated(1_056_768));
    // With --keep-size it does not.
    run_stdout(
        Command::new("fallocate")
            .args(["-z", "-n", "-o", "1056768", "-l", "65536"])
            .arg(&mp),
    );
    assert_eq!(fx.node.size(), MIB + 12288);

    // A node that cannot deallocate refuses to punch holes rather than write zeroes.
    fx.driver.slow_zeroes.store(true, Ordering::SeqCst);
    let err = run_failing(
        Command::new("fallocate")
            .args(["-p", "-o", "0", "-l", "4096"])
            .arg(&mp),
    );
    // util-linux words EOPNOTSUPP with --keep-size (implied by -p) this way.
    assert!(err.contains("keep size mode is unsupported"), "{err}");
    assert_eq!(fx.driver.contents()[0], pattern(1, 3)[0]);

    // Collapse range is not something a disk image can do.
    let err = run_failing(
        Command::new("fallocate")
            .args(["-c", "-o", "0", "-l", "4096"])
            .arg(&mp),
    );
    assert!(err.contains("not supported"), "{err}");
}

/// Offsets of the holes of the file, found with SEEK_HOLE / SEEK_DATA.
fn holes(file: &File) -> Vec<(i64, i64)> {
    let size = file.metadata().unwrap().len() as i64;
    let mut holes = Vec::new();
    let mut offset = 0;
    while offset < size {
        let hole = lseek(file.as_raw_fd(), offset, Whence::SeekHole).unwrap();
        if hole >= size {
            break;
        }
        let data = match lseek(file.as_raw_fd(), hole, Whence::SeekData) {
            Ok(data) => data,
            Err(nix::errno::Errno::ENXIO) => size,
            Err(e) => panic!("SEEK_DATA: {e}"),
        };
        holes.push((hole, data));
        offset = data;
    }
    holes
}

#[test]
fn seek_hole_cp_sparse_and_qemu_img_see_the_holes() {
    if !fuse_usable() || !require_tool("cp") || !require_tool("qemu-img") || !require_tool("cmp") {
        return;
    }
    // 2 MiB: data at [0, 64K) and [1M, 1M+4K), holes elsewhere.
    let driver = Arc::new(MemDriver::new(2 * MIB));
    driver.fill(0, &pattern(65536, 1));
    driver.fill(MIB, &pattern(4096, 2));
    let fx = Fixture::mount(driver, false, false);
    let mp = fx.path();

    let file = File::open(&mp).unwrap();
    assert_eq!(
        holes(&file),
        vec![(65536, MIB as i64), (MIB as i64 + 4096, 2 * MIB as i64)]
    );
    assert_eq!(
        lseek(file.as_raw_fd(), 2 * MIB as i64, Whence::SeekData),
        Err(nix::errno::Errno::ENXIO)
    );

    // cp --sparse=always keeps the holes (its copy has the same hole layout).
    let copy = fx.file("copy.raw");
    run_stdout(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(&mp)
            .arg(&copy),
    );
    run_stdout(Command::new("cmp").arg(&mp).arg(&copy));
    let copy_file = File::open(&copy).unwrap();
    assert_eq!(holes(&copy_file), holes(&file));

    // qemu-img sees a raw image of the node's size with the same data and holes.
    let info = run_stdout(
        Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "raw"])
            .arg(&mp),
    );
    assert!(info.contains("\"virtual-size\": 2097152"), "{info}");
    run_stdout(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&mp)
            .arg(&copy),
    );
    let map = run_stdout(
        Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "raw"])
            .arg(&mp),
    );
    let data_extents: Vec<&str> = map
        .lines()
        .filter(|l| l.contains("\"data\": true"))
        .collect();
    assert_eq!(data_extents.len(), 2, "{map}");
    assert!(
        data_extents[0].contains("\"start\": 0, \"length\": 65536"),
        "{map}"
    );
    assert!(
        data_extents[1].contains("\"start\": 1048576, \"length\": 4096"),
        "{map}"
    );
}

#[test]
fn fixed_exports_refuse_writes_past_the_end() {
    if !fuse_usable() || !require_tool("dd") {
        return;
    }
    let fx = Fixture::mount(Arc::new(MemDriver::new(MIB)), true, false);
    let mp = fx.path();
    let file = OpenOptions::new().write(true).open(&mp).unwrap();
    let err = file.write_at(b"x", MIB).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    // A write across the end is cut at the end.
    assert_eq!(file.write_at(&[1u8; 8192], MIB - 4096).unwrap(), 4096);
    assert_eq!(fx.node.size(), MIB);
    assert_eq!(std::fs::metadata(&mp).unwrap().len(), MIB);
    // dd fails as with QSD, size unchanged.
    let err = run_failing(
        Command::new("dd")
            .args([
                "if=/dev/zero",
                "bs=4096",
                "count=1",
                "seek=256",
                "conv=notrunc",
            ])
            .arg(format!("of={}", mp.display())),
    );
    assert!(err.contains("Input/output error"), "{err}");
    assert_eq!(fx.node.size(), MIB);
}

#[test]
fn growable_exports_grow() {
    if !fuse_usable() || !require_tool("dd") {
        return;
    }
    let fx = Fixture::mount(Arc::new(MemDriver::new(MIB)), true, true);
    let mp = fx.path();
    run_stdout(
        Command::new("dd")
            .args([
                "if=/dev/urandom",
                "bs=4096",
                "count=3",
                "seek=300",
                "conv=notrunc",
            ])
            .arg(format!("of={}", mp.display())),
    );
    assert_eq!(fx.node.size(), 303 * 4096);
    assert_eq!(std::fs::metadata(&mp).unwrap().len(), 303 * 4096);
    let file = OpenOptions::new().read(true).write(true).open(&mp).unwrap();
    file.write_at(b"tail", 2 * MIB).unwrap();
    assert_eq!(fx.node.size(), 2 * MIB + 4);
    let mut buf = [0u8; 4];
    file.read_exact_at(&mut buf, 2 * MIB).unwrap();
    assert_eq!(&buf, b"tail");
    // The grown range between the old end and the write reads as zeroes.
    let mut gap = vec![1u8; 4096];
    file.read_exact_at(&mut gap, 303 * 4096).unwrap();
    assert!(gap.iter().all(|&b| b == 0));
}

#[test]
fn read_only_exports_refuse_writes() {
    if !fuse_usable() || !require_tool("truncate") || !require_tool("fallocate") {
        return;
    }
    let driver = Arc::new(MemDriver::new(MIB));
    driver.fill(0, &pattern(MIB as usize, 5));
    let fx = Fixture::mount(driver, false, false);
    let mp = fx.path();
    assert_eq!(
        std::fs::metadata(&mp).unwrap().permissions().mode() & 0o7777,
        0o400
    );
    for opts in [
        OpenOptions::new().write(true).clone(),
        OpenOptions::new().read(true).write(true).clone(),
    ] {
        let err = opts.open(&mp).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
    }
    let err = std::fs::set_permissions(&mp, std::fs::Permissions::from_mode(0o600)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let err = run_failing(Command::new("truncate").args(["-s", "2M"]).arg(&mp));
    assert!(err.contains("Permission denied"), "{err}");
    assert_eq!(fx.node.size(), MIB);
    assert_eq!(std::fs::read(&mp).unwrap(), pattern(MIB as usize, 5));
}

#[test]
fn bad_mountpoints_are_refused_like_qsd() {
    if !fuse_usable() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node = block_core::Node::new("mem0", Arc::new(MemDriver::new(MIB)), vec![]);
    let mount = |path: std::path::PathBuf| {
        let attachment = node.attach("export", false).unwrap();
        FuseExport::mount(FuseExportConfig::new(path), attachment, rt.handle().clone())
    };

    let err = mount(dir.path().to_path_buf()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("'{}' is not a regular file", dir.path().display())
    );
    let missing = dir.path().join("missing");
    let err = mount(missing.clone()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("Failed to stat '{}'", missing.display())
    );
    let cause = std::error::Error::source(&err).unwrap().to_string();
    assert!(cause.contains("No such file or directory"), "{cause}");

    let file = dir.path().join("disk.raw");
    std::fs::write(&file, b"").unwrap();
    let first = mount(file.clone()).unwrap();
    let err = mount(file.clone()).unwrap_err();
    assert!(matches!(err, FuseError::AlreadyExported(_)));
    assert_eq!(
        err.to_string(),
        format!("There already is a FUSE export on '{}'", file.display())
    );
    // Nothing was stacked by the refused attempt.
    first.unmount().unwrap();
    assert!(!is_mounted(&file));
    assert_eq!(node.users().len(), 0);
    // The path is free again.
    mount(file.clone()).unwrap().unmount().unwrap();
}

#[test]
fn two_exports_at_once() {
    if !fuse_usable() {
        return;
    }
    let a = Arc::new(MemDriver::new(MIB));
    a.fill(0, &pattern(MIB as usize, 11));
    let b = Arc::new(MemDriver::new(2 * MIB));
    b.fill(0, &pattern(2 * MIB as usize, 22));
    let fa = Fixture::mount(a, true, false);
    let fb = Fixture::mount(b, false, false);
    assert_eq!(std::fs::read(fa.path()).unwrap(), pattern(MIB as usize, 11));
    assert_eq!(
        std::fs::read(fb.path()).unwrap(),
        pattern(2 * MIB as usize, 22)
    );
    OpenOptions::new()
        .write(true)
        .open(fa.path())
        .unwrap()
        .write_all_at(b"A", 0)
        .unwrap();
    assert_eq!(fa.driver.contents()[0], b'A');
    assert_eq!(fb.driver.contents()[0], pattern(1, 22)[0]);
}

#[test]
fn reads_are_in_flight_together() {
    if !fuse_usable() {
        return;
    }
    const READERS: usize = 4;
    let driver = Arc::new(MemDriver::new(MIB));
    driver.fill(0, &pattern(MIB as usize, 9));
    let fx = Fixture::mount(driver, false, false);
    // Every read now waits in the driver until READERS reads are there at once: this only
    // completes if the export keeps several requests in flight.
    fx.driver.set_read_barrier(READERS);
    let mp = fx.path();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..READERS)
            .map(|i| {
                let mp = mp.clone();
                s.spawn(move || {
                    let file = File::open(&mp).unwrap();
                    let mut buf = vec![0u8; 4096];
                    file.read_exact_at(&mut buf, i as u64 * 65536).unwrap();
                    buf
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let start = i * 65536;
            assert_eq!(
                h.join().unwrap(),
                pattern(MIB as usize, 9)[start..start + 4096]
            );
        }
    });
}

#[test]
fn unmount_while_another_process_holds_the_file() {
    if !fuse_usable() || !require_tool("python3") {
        return;
    }
    let mut fx = Fixture::mount(Arc::new(MemDriver::new(MIB)), true, false);
    let mp = fx.path();
    // Another process opens the file read-write, writes through it, and then waits.
    let holder = r#"
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
os.pwrite(fd, b"before", 0)
print("ready", flush=True)
sys.stdin.readline()
try:
    os.pwrite(fd, b"after", 0)
    print("after-ok")
except OSError as e:
    print("after-failed", e.errno)
try:
    os.close(fd)
except OSError as e:
    print("close-failed", e.errno)
"#;
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(holder)
        .arg(&mp)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    let flushes = fx.driver.flush_count();

    // Unmounting succeeds at once although the descriptor is open...
    fx.unmount();
    assert!(!is_mounted(&mp));
    // ...the path shows the file below again...
    assert_eq!(std::fs::read(&mp).unwrap(), b"the file below the mount");
    // ...the write made before is in the node, flushed, and the node is released.
    assert_eq!(&fx.driver.contents()[..6], b"before");
    assert!(fx.driver.flush_count() > flushes);
    assert!(fx.node.users().is_empty());

    // The holder's later I/O fails (ENOTCONN, as with QSD) and it can close its descriptor.
    writeln!(child.stdin.take().unwrap()).unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert_eq!(
        rest.lines().next(),
        Some(format!("after-failed {}", libc::ENOTCONN).as_str())
    );
    assert!(child.wait().unwrap().success());
    assert_eq!(&fx.driver.contents()[..6], b"before");
}

#[test]
fn allow_other_off_and_drop_unmounts() {
    if !fuse_usable() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.raw");
    std::fs::write(&file, b"").unwrap();
    let node = block_core::Node::new("mem0", Arc::new(MemDriver::new(MIB)), vec![]);
    let mut cfg = FuseExportConfig::new(&file);
    cfg.allow_other = AllowOther::Off;
    let export = FuseExport::mount(
        cfg,
        node.attach("export", false).unwrap(),
        rt.handle().clone(),
    )
    .unwrap();
    assert!(!export.allow_other());
    assert!(is_mounted(&file));
    assert_eq!(std::fs::metadata(&file).unwrap().len(), MIB);
    // Without allow_other, group/other permissions are refused.
    let err = std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o444)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    assert_eq!(
        std::fs::metadata(&file).unwrap().uid(),
        nix::unistd::getuid().as_raw()
    );
    drop(export);
    assert!(!is_mounted(&file));
    assert!(node.users().is_empty());
}

#[test]
fn unmount_from_a_runtime_task_and_mmap() {
    if !fuse_usable() || !require_tool("python3") {
        return;
    }
    let driver = Arc::new(MemDriver::new(MIB));
    driver.fill(0, &pattern(MIB as usize, 42));
    let mut fx = Fixture::mount(driver, true, false);
    // mmap works on a direct-I/O file (FUSE_DIRECT_IO_ALLOW_MMAP), reading the node's bytes.
    let out = run_stdout(Command::new("python3")
        .arg("-c")
        .arg("import mmap,sys\nf=open(sys.argv[1],'rb')\nm=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)\nsys.stdout.write(m[4096:4104].hex())")
        .arg(fx.path()));
    let want: String = pattern(MIB as usize, 42)[4096..4104]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(out, want);

    // The binary calls unmount from its QMP handlers, i.e. on a runtime worker.
    let export = fx.export.take().unwrap();
    let path = fx.path();
    fx.rt
        .block_on(async move { tokio::spawn(async move { export.unmount() }).await })
        .unwrap()
        .unwrap();
    assert!(!is_mounted(&path));
    assert!(fx.node.users().is_empty(), "{:?}", fx.node.users());
}

/// Run by `unprivileged_export_through_fusermount3` as user `nobody`; not on its own.
#[test]
#[ignore = "run as an unprivileged user by unprivileged_export_through_fusermount3"]
fn unprivileged_child() {
    assert!(!nix::unistd::geteuid().is_root(), "must run unprivileged");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.raw");
    std::fs::write(&file, b"").unwrap();
    let driver = Arc::new(MemDriver::new(MIB));
    let node = block_core::Node::new("mem0", driver.clone(), vec![]);
    let mut cfg = FuseExportConfig::new(&file);
    cfg.writable = true;
    let export = FuseExport::mount(
        cfg,
        node.attach("export", true).unwrap(),
        rt.handle().clone(),
    )
    .unwrap();
    assert!(is_mounted(&file));
    println!("allow_other={}", export.allow_other());
    let handle = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    handle.write_all_at(b"unprivileged", 4096).unwrap();
    assert_eq!(&driver.contents()[4096..4108], b"unprivileged");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), MIB);
    drop(handle);
    export.unmount().unwrap();
    assert!(!is_mounted(&file));
    assert!(node.users().is_empty());
}

/// Ignored by default rather than passing silently: fusermount3 opens /dev/fuse with the
/// user's rights, and hosts (CI's included) that keep the device to root (mode 0600) allow no
/// unprivileged FUSE at all, QSD's included. Run it with `--ignored` where /dev/fuse is 0666.
#[test]
#[ignore = "needs /dev/fuse usable by unprivileged users (mode 0666)"]
fn unprivileged_export_through_fusermount3() {
    if !fuse_usable() || !require_tool("setpriv") || !require_tool("fusermount3") {
        return;
    }
    let mode = std::fs::metadata("/dev/fuse").unwrap().permissions().mode();
    assert_eq!(
        mode & 0o006,
        0o006,
        "/dev/fuse (mode {mode:o}) is not usable by unprivileged users here"
    );
    // The test binary itself, as nobody, running only the child test above.
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(exe)
        .args(["--ignored", "--exact", "unprivileged_child", "--nocapture"])
        .env("TMPDIR", "/tmp")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("test unprivileged_child ... ok"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn unmount_on_a_current_thread_runtime() {
    if !fuse_usable() {
        return;
    }
    let iothread = block_core::IoThread::spawn("fuse-test-loop").unwrap();
    let handle = iothread.handle().clone();
    let dir = tempfile::tempdir().unwrap();
    let driver = Arc::new(MemDriver::new(MIB));
    let node = block_core::Node::new("mem0", driver.clone(), vec![]);
    let mount = |name: &str| {
        let file = dir.path().join(name);
        std::fs::write(&file, b"").unwrap();
        let mut cfg = FuseExportConfig::new(&file);
        cfg.writable = true;
        let export =
            FuseExport::mount(cfg, node.attach("export", true).unwrap(), handle.clone()).unwrap();
        OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .write_all_at(name.as_bytes(), 0)
            .unwrap();
        (file, export)
    };

    // unmount_async, awaited on the export's own (current-thread) runtime, flushes and returns.
    let (file, export) = mount("a.raw");
    let flushes = driver.flush_count();
    let (tx, rx) = std::sync::mpsc::channel();
    handle.spawn(async move {
        let _ = tx.send(export.unmount_async().await);
    });
    rx.recv().unwrap().unwrap();
    assert!(driver.flush_count() > flushes);
    assert!(!is_mounted(&file));
    assert!(node.users().is_empty());

    // Dropped (or unmounted synchronously) on that runtime's thread, it does not deadlock: the
    // flush completes on a helper thread.
    let (file, export) = mount("b.raw");
    let flushes = driver.flush_count();
    let (tx, rx) = std::sync::mpsc::channel();
    handle.spawn(async move {
        drop(export);
        let _ = tx.send(());
    });
    rx.recv().unwrap();
    assert!(!is_mounted(&file));
    driver.wait_for_flushes(flushes + 1);
    assert_eq!(&driver.contents()[..5], b"b.raw");

    drop(iothread);
}
