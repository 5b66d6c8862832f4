//! vhost-user-blk exports seen by a real Linux guest (QEMU, TCG) through the harness in
//! `blockexportd_tests::guest`. Each case is written once over `Flavor` and runs against
//! qemu-storage-daemon, the reference, and blockexportd.

use blockexportd_tests::guest::{self, Vm, VmConfig, DEFAULT_TIMEOUT};
use blockexportd_tests::{pattern, process_exists, Daemon, Flavor};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// A daemon with one `file` node `disk0` over `image` and (unless `export` is None) a
/// vhost-user-blk export `exp0` of it on `socket`.
struct Setup {
    daemon: Daemon,
    image: PathBuf,
    socket: PathBuf,
}

/// `contents` is the image; `file_opts` extends the `file` node's options, `export` the
/// export's (`writable=on,num-queues=2`).
fn start(flavor: Flavor, contents: &[u8], file_opts: &str, export: Option<&str>) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    let socket = dir.path().join("vub.sock");
    std::fs::write(&image, contents).expect("write the image");
    let mut blockdev = format!("driver=file,node-name=disk0,filename={}", image.display());
    if !file_opts.is_empty() {
        blockdev.push(',');
        blockdev.push_str(file_opts);
    }
    let mut args = vec!["--blockdev".to_string(), blockdev];
    if let Some(opts) = export {
        args.push("--export".to_string());
        args.push(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},{opts}",
            socket.display()
        ));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let daemon = Daemon::start_in(flavor, dir, &args);
    Setup {
        daemon,
        image,
        socket,
    }
}

/// A guest command that reads `len` bytes at `off` of /dev/vda (O_DIRECT, blocks of `bs`)
/// and reports `KEY match` if they equal the guest file `file`.
fn read_check(key: &str, file: &str, off: u64, len: u64, bs: u64) -> String {
    assert!(off.is_multiple_of(bs) && len.is_multiple_of(bs));
    format!(
        "if dd if=/dev/vda bs={bs} skip={} count={} iflag=direct 2>/dev/null | cmp -s - {file}; \
         then report {key} match; else report {key} differ; fi\n",
        off / bs,
        len / bs
    )
}

/// A guest command that writes the guest file `file` at `off` of /dev/vda (O_DIRECT, blocks
/// of `bs`) and reports dd's status as `KEY`.
fn write_cmd(key: &str, file: &str, off: u64, bs: u64, extra: &str) -> String {
    assert!(off.is_multiple_of(bs));
    format!(
        "dd if={file} of=/dev/vda bs={bs} seek={} oflag=direct {extra} 2>/dev/null; report {key} $?\n",
        off / bs
    )
}

fn read_image(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read the image")
}

/// Panics at the first byte where `image` and `expected` differ.
fn assert_same(image: &[u8], expected: &[u8], what: &str) {
    assert_eq!(image.len(), expected.len(), "{what}: image size");
    if let Some(at) = image.iter().zip(expected).position(|(a, b)| a != b) {
        let n = image[at..]
            .iter()
            .zip(&expected[at..])
            .take_while(|(a, b)| a != b)
            .count();
        panic!(
            "{what}: the image differs from the expected bytes at offset {at} ({n} bytes from there differ; image {:02x?}, expected {:02x?})",
            &image[at..(at + 8).min(image.len())],
            &expected[at..(at + 8).min(expected.len())]
        );
    }
}

fn put(buf: &mut [u8], off: u64, data: &[u8]) {
    buf[off as usize..off as usize + data.len()].copy_from_slice(data);
}

fn repeat(pat: &[u8], len: u64) -> Vec<u8> {
    pat.iter().copied().cycle().take(len as usize).collect()
}

fn report_time(case: &str, flavor: Flavor, t0: Instant) {
    eprintln!(
        "vhost_user_blk_vm {case} {flavor:?}: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// (a) Writable export: the guest writes patterns at several offsets and sizes (dd O_DIRECT,
/// and fio randwrite QD16 with verification), reads back what the host wrote before boot;
/// the host then compares the whole image byte for byte.
fn read_write_patterns(flavor: Flavor) {
    if !guest::require_guest() {
        return;
    }
    let size = 64 * MIB;
    let mut expected = vec![0u8; size as usize];
    // Written by the host before boot: (offset, length).
    let host = [
        (MIB, 64 * KIB),
        (20 * MIB + 4 * KIB, 12 * KIB),
        (size - 32 * KIB, 32 * KIB),
    ];
    for (i, (off, len)) in host.iter().enumerate() {
        put(&mut expected, *off, &pattern(*len as usize, 100 + i as u64));
    }
    let s = start(flavor, &expected, "", Some("writable=on"));

    // Written by the guest: (offset, length, dd block size); one at sector 20001 of 7
    // sectors, one of 1 MiB at the last MiB but 1 (the guest splits it as it likes).
    let writes = [
        (0, 4 * KIB, 4 * KIB),
        (7 * MIB + 12 * KIB, 256 * KIB, 4 * KIB),
        (20001 * 512, 7 * 512, 512),
        (62 * MIB, MIB, MIB),
    ];
    let fio_off = 32 * MIB;
    let fio_len = 8 * MIB;
    let mut script = String::new();
    let mut cfg = VmConfig::new(&s.socket, "");
    for (i, (off, len)) in host.iter().enumerate() {
        let file = format!("/data/h{i}");
        cfg = cfg.file(&file, &pattern(*len as usize, 100 + i as u64));
        script += &read_check(&format!("read_h{i}"), &file, *off, *len, 4 * KIB);
    }
    for (i, (off, len, bs)) in writes.iter().enumerate() {
        let file = format!("/data/g{i}");
        let data = pattern(*len as usize, 200 + i as u64);
        put(&mut expected, *off, &data);
        cfg = cfg.file(&file, &data);
        script += &write_cmd(&format!("write_g{i}"), &file, *off, *bs, "");
    }
    script += &format!(
        "fio --name=pat --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 \
         --rw=randwrite --bs=4k --offset={fio_off} --size={fio_len} --verify=pattern \
         --verify_pattern=0x5a17c0de --do_verify=1 --output-format=terse > /tmp/fio.out 2>&1; \
         report fio $?\n"
    );
    put(
        &mut expected,
        fio_off,
        &repeat(&[0x5a, 0x17, 0xc0, 0xde], fio_len),
    );
    // The guest reads back its own writes too, through the device, after fio.
    for (i, (off, len, bs)) in writes.iter().enumerate() {
        script += &read_check(
            &format!("reread_g{i}"),
            &format!("/data/g{i}"),
            *off,
            *len,
            *bs,
        );
    }
    cfg.script = script;

    // One guest at a time, taken once the daemon runs (a daemon that cannot start fails at
    // once); the case's time counts from here.
    let _vm = guest::vm_lock();
    let t0 = Instant::now();
    let mut vm = Vm::boot(&cfg);
    for i in 0..host.len() {
        assert_eq!(
            vm.result(&format!("read_h{i}")),
            "match",
            "host pattern {i}"
        );
    }
    for i in 0..writes.len() {
        assert_eq!(vm.result(&format!("write_g{i}")), "0", "guest write {i}");
    }
    assert_eq!(vm.result("fio"), "0", "fio randwrite with verify");
    for i in 0..writes.len() {
        assert_eq!(
            vm.result(&format!("reread_g{i}")),
            "match",
            "guest reread {i}"
        );
    }
    vm.finish();
    assert_same(&read_image(&s.image), &expected, "after the guest's writes");
    drop(s);
    report_time("read_write_patterns", flavor, t0);
}

/// (b) `num-queues=2`: the guest (2 vCPUs) has two hardware queues, one per CPU, and I/O
/// issued from each CPU goes through its own queue and completes.
fn two_queues(flavor: Flavor) {
    if !guest::require_guest() {
        return;
    }
    let size = 16 * MIB;
    let s = start(
        flavor,
        &vec![0u8; size as usize],
        "",
        Some("writable=on,num-queues=2"),
    );
    let p0 = pattern(64 * KIB as usize, 1);
    let p1 = pattern(64 * KIB as usize, 2);
    let mut cfg = VmConfig::new(&s.socket, "")
        .file("/data/p0", &p0)
        .file("/data/p1", &p1);
    cfg.num_queues = 2;
    cfg.cpus = 2;
    // Completions per virtqueue: the interrupt count of each queue's MSI-X vector.
    cfg.script = "irqs() { awk '/virtio[0-9]+-req[.]/ { s = 0; \
                    for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) s += $i; printf \"%s \", s }' \
                    /proc/interrupts; }\n\
         report mq_count $(ls /sys/block/vda/mq | wc -l)\n\
         report cpus0 $(cat /sys/block/vda/mq/0/cpu_list)\n\
         report cpus1 $(cat /sys/block/vda/mq/1/cpu_list)\n\
         report before $(irqs)\n\
         taskset -c 0 dd if=/data/p0 of=/dev/vda bs=4096 seek=256 oflag=direct 2>/dev/null; report w0 $?\n\
         taskset -c 1 dd if=/data/p1 of=/dev/vda bs=4096 seek=512 oflag=direct 2>/dev/null; report w1 $?\n\
         if taskset -c 1 dd if=/dev/vda bs=4096 skip=256 count=16 iflag=direct 2>/dev/null | cmp -s - /data/p0; \
         then report r0 match; else report r0 differ; fi\n\
         if taskset -c 0 dd if=/dev/vda bs=4096 skip=512 count=16 iflag=direct 2>/dev/null | cmp -s - /data/p1; \
         then report r1 match; else report r1 differ; fi\n\
         report after $(irqs)\n"
        .to_string();
    // One guest at a time, taken once the daemon runs (a daemon that cannot start fails at
    // once); the case's time counts from here.
    let _vm = guest::vm_lock();
    let t0 = Instant::now();
    let mut vm = Vm::boot(&cfg);
    assert_eq!(
        vm.result("mq_count"),
        "2",
        "hardware queues in /sys/block/vda/mq"
    );
    assert_eq!(vm.result("cpus0"), "0", "queue 0's CPUs");
    assert_eq!(vm.result("cpus1"), "1", "queue 1's CPUs");
    let counts = |v: String| -> Vec<u64> {
        v.split_whitespace()
            .map(|n| n.parse().expect("an interrupt count"))
            .collect()
    };
    let before = counts(vm.result("before"));
    assert_eq!(before.len(), 2, "two request queue vectors: {before:?}");
    assert_eq!(vm.result("w0"), "0");
    assert_eq!(vm.result("w1"), "0");
    assert_eq!(vm.result("r0"), "match");
    assert_eq!(vm.result("r1"), "match");
    let after = counts(vm.result("after"));
    for q in 0..2 {
        // A write and a read went through each queue, one after the other: two completions
        // at least, each signalled on that queue's vector.
        assert!(
            after[q] >= before[q] + 2,
            "queue {q} completed too few requests: {before:?} -> {after:?}"
        );
    }
    vm.finish();
    let img = read_image(&s.image);
    assert_eq!(&img[MIB as usize..MIB as usize + p0.len()], &p0[..]);
    assert_eq!(&img[2 * MIB as usize..2 * MIB as usize + p1.len()], &p1[..]);
    drop(s);
    report_time("two_queues", flavor, t0);
}

/// (c) `logical-block-size=4096`, the export added over QMP (`block-export-add`): the guest's
/// logical block size is 4096, its capacity the image's, its serial QSD's; a 4 KiB O_DIRECT
/// write lands, and so does a 512-byte buffered one (the guest reads and writes the whole
/// 4 KiB block around it); the export is deleted after the guest left.
fn logical_block_size_4096(flavor: Flavor) {
    if !guest::require_guest() {
        return;
    }
    let size = 16 * MIB;
    let s = start(flavor, &vec![0u8; size as usize], "", None);
    let mut qmp = s.daemon.qmp();
    qmp.ok(
        "block-export-add",
        json!({
            "type": "vhost-user-blk", "id": "exp0", "node-name": "disk0",
            "addr": {"type": "unix", "path": s.socket.to_str().expect("utf-8 path")},
            "writable": true, "logical-block-size": 4096
        }),
    );
    let exports = qmp.ok("query-block-exports", json!({}));
    assert_eq!(exports[0]["type"], "vhost-user-blk", "{exports}");
    assert_eq!(exports[0]["node-name"], "disk0", "{exports}");

    let data = pattern(4096, 7);
    let cfg = VmConfig::new(
        &s.socket,
        "report lbs $(cat /sys/block/vda/queue/logical_block_size)\n\
         report sectors $(cat /sys/block/vda/size)\n\
         dd if=/data/p of=/dev/vda bs=4096 seek=3 oflag=direct 2>/dev/null; report w4096 $?\n\
         dd if=/data/small of=/dev/vda bs=512 seek=17 conv=fsync 2>/dev/null; report w512 $?\n\
         report serial $(cat /sys/block/vda/serial)\n",
    )
    .file("/data/p", &data)
    .file("/data/small", &data[..512]);
    // One guest at a time, taken once the daemon runs (a daemon that cannot start fails at
    // once); the case's time counts from here.
    let _vm = guest::vm_lock();
    let t0 = Instant::now();
    let mut vm = Vm::boot(&cfg);
    assert_eq!(vm.result("lbs"), "4096", "logical_block_size");
    assert_eq!(vm.result("sectors"), (size / 512).to_string(), "capacity");
    assert_eq!(vm.result("w4096"), "0", "a 4 KiB O_DIRECT write");
    assert_eq!(vm.result("w512"), "0", "a 512-byte buffered write");
    // GET_ID, what QSD answers (guests name the disk by it: /dev/disk/by-id/virtio-...). The
    // guest's read waits for the request's interrupt: a device that completes it without
    // signalling the queue hangs it, hence the shorter wait (a GET_ID takes milliseconds).
    assert_eq!(
        vm.result_within("serial", Duration::from_secs(60)),
        "vhost_user_blk",
        "the disk's serial"
    );
    vm.finish();
    let mut expected = vec![0u8; size as usize];
    put(&mut expected, 3 * 4096, &data);
    put(&mut expected, 17 * 512, &data[..512]);
    assert_same(&read_image(&s.image), &expected, "after the writes");

    qmp.ok("block-export-del", json!({"id": "exp0"}));
    let ev = qmp.wait_event("BLOCK_EXPORT_DELETED");
    assert_eq!(ev["data"]["id"], "exp0", "{ev}");
    assert_eq!(qmp.ok("query-block-exports", json!({})), json!([]));
    report_time("logical_block_size_4096", flavor, t0);
}

/// (d) `writable=off`: the guest sees a read-only disk, reads it, and a write fails; the image
/// is unchanged.
fn read_only(flavor: Flavor) {
    if !guest::require_guest() {
        return;
    }
    let size = 16 * MIB;
    let mut contents = vec![0u8; size as usize];
    let h = pattern(MIB as usize, 3);
    put(&mut contents, 0, &h);
    let s = start(flavor, &contents, "", Some("writable=off"));
    let mut cfg = VmConfig::new(&s.socket, "")
        .file("/data/h", &h)
        .file("/data/g", &pattern(64 * KIB as usize, 4));
    cfg.script = String::from("report ro $(cat /sys/block/vda/ro)\n")
        + &read_check("read", "/data/h", 0, MIB, 64 * KIB)
        + &write_cmd("write", "/data/g", 0, 4096, "")
        + "dd if=/data/g of=/dev/vda bs=4096 seek=1024 conv=fsync 2>/dev/null; report buffered $?\n";
    // One guest at a time, taken once the daemon runs (a daemon that cannot start fails at
    // once); the case's time counts from here.
    let _vm = guest::vm_lock();
    let t0 = Instant::now();
    let mut vm = Vm::boot(&cfg);
    assert_eq!(vm.result("ro"), "1", "/sys/block/vda/ro");
    assert_eq!(vm.result("read"), "match", "reading the read-only disk");
    assert_ne!(
        vm.result("write"),
        "0",
        "an O_DIRECT write to a read-only disk"
    );
    assert_ne!(
        vm.result("buffered"),
        "0",
        "a buffered write to a read-only disk"
    );
    vm.finish();
    assert_same(&read_image(&s.image), &contents, "a read-only export");
    drop(s);
    report_time("read_only", flavor, t0);
}

fn seek(fd: &std::fs::File, off: u64, whence: i32) -> u64 {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on a descriptor the File owns; no memory is involved.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off as libc::off_t, whence) };
    assert!(r >= 0, "lseek: {}", std::io::Error::last_os_error());
    r as u64
}

/// (e) `blkdiscard` of a range on a `file` node with `discard=unmap` punches a hole in the
/// image (SEEK_HOLE finds it), the range reads as zeros in the guest and on the host, and the
/// data around it is untouched.
fn discard_unmap(flavor: Flavor) {
    if !guest::require_guest() {
        return;
    }
    let size = 16 * MIB;
    let contents = pattern(size as usize, 5);
    let s = start(flavor, &contents, "discard=unmap", Some("writable=on"));
    {
        let f = std::fs::File::open(&s.image).expect("open");
        assert_eq!(
            seek(&f, 0, libc::SEEK_HOLE),
            size,
            "the image starts fully allocated"
        );
    }
    let (off, len) = (4 * MIB, 4 * MIB);
    let cfg = VmConfig::new(
        &s.socket,
        &format!(
            "report discard_max $(cat /sys/block/vda/queue/discard_max_bytes)\n\
             blkdiscard -o {off} -l {len} /dev/vda; report blkdiscard $?\n\
             report nonzero $(dd if=/dev/vda bs=1M skip=4 count=4 iflag=direct 2>/dev/null | tr -d '\\000' | wc -c)\n{}{}",
            read_check("before", "/data/before", 3 * MIB, MIB, 64 * KIB),
            read_check("after", "/data/after", 8 * MIB, MIB, 64 * KIB)
        ),
    )
    .file("/data/before", &contents[3 * MIB as usize..4 * MIB as usize])
    .file("/data/after", &contents[8 * MIB as usize..9 * MIB as usize]);
    // One guest at a time, taken once the daemon runs (a daemon that cannot start fails at
    // once); the case's time counts from here.
    let _vm = guest::vm_lock();
    let t0 = Instant::now();
    let mut vm = Vm::boot(&cfg);
    let max: u64 = vm.result("discard_max").parse().expect("discard_max_bytes");
    assert!(max > 0, "the guest sees no discard support");
    assert_eq!(vm.result("blkdiscard"), "0", "blkdiscard");
    assert_eq!(
        vm.result("nonzero"),
        "0",
        "non-zero bytes left in the discarded range"
    );
    assert_eq!(vm.result("before"), "match");
    assert_eq!(vm.result("after"), "match");
    vm.finish();

    let f = std::fs::File::open(&s.image).expect("open");
    assert_eq!(
        seek(&f, off, libc::SEEK_HOLE),
        off,
        "no hole at the discarded range"
    );
    assert_eq!(
        seek(&f, off, libc::SEEK_DATA),
        off + len,
        "data inside the discarded range"
    );
    let mut expected = contents.clone();
    put(&mut expected, off, &vec![0u8; len as usize]);
    assert_same(&read_image(&s.image), &expected, "after the discard");
    drop(s);
    report_time("discard_unmap", flavor, t0);
}

/// (f) Flush: the guest switches the write cache to write-back (a config write, which QEMU
/// passes on as VHOST_USER_SET_CONFIG; QSD starts write-through), so that it flushes; it
/// writes through its page cache and `sync`s, and fio writes with an fsync after every write;
/// while the guest is still running, the data is on the image.
fn flush_reaches_image(flavor: Flavor) {
    if !guest::require_guest() {
        return;
    }
    let size = 16 * MIB;
    let s = start(flavor, &vec![0u8; size as usize], "", Some("writable=on"));
    let data = pattern(2 * MIB as usize, 6);
    let cfg = VmConfig::new(
        &s.socket,
        "report initial $(cat /sys/block/vda/queue/write_cache)\n\
         echo 'write back' > /sys/block/vda/cache_type; report set $?\n\
         report write_cache $(cat /sys/block/vda/queue/write_cache)\n\
         dd if=/data/f of=/dev/vda bs=65536 seek=32 2>/dev/null; report write $?\n\
         sync; report sync $?\n\
         fio --name=fs --filename=/dev/vda --ioengine=psync --rw=write --bs=4k --offset=8m \
         --size=1m --fsync=1 --buffer_pattern=0x0f1e2d3c --output-format=terse > /tmp/fio.out 2>&1; \
         report fio $?\n\
         read -r go; report go $go\n",
    )
    .file("/data/f", &data);
    // One guest at a time, taken once the daemon runs (a daemon that cannot start fails at
    // once); the case's time counts from here.
    let _vm = guest::vm_lock();
    let t0 = Instant::now();
    let mut vm = Vm::boot(&cfg);
    // QSD starts with `wce` 0 (every write made stable, the guest sends no flushes);
    // blockexportd with the cache on unless the export is `writethrough`, as the libblkio
    // tests (tests/tests/vhost_user_blk.rs) assert too.
    let initial = match flavor {
        Flavor::Qsd => "write through",
        Flavor::Blockexportd => "write back",
    };
    assert_eq!(
        vm.result("initial"),
        initial,
        "the export's initial write cache"
    );
    assert_eq!(vm.result("set"), "0", "switching the cache to write back");
    assert_eq!(
        vm.result("write_cache"),
        "write back",
        "with a volatile cache the guest sends flushes"
    );
    assert_eq!(vm.result("write"), "0");
    assert_eq!(vm.result("sync"), "0");
    assert_eq!(vm.result("fio"), "0", "fio with fsync");
    // The guest now waits on its console: what it wrote must be on the image already.
    let mut expected = vec![0u8; size as usize];
    put(&mut expected, 2 * MIB, &data);
    put(
        &mut expected,
        8 * MIB,
        &repeat(&[0x0f, 0x1e, 0x2d, 0x3c], MIB),
    );
    assert_same(
        &read_image(&s.image),
        &expected,
        "after the guest's sync, guest running",
    );
    vm.send_line("now");
    assert_eq!(vm.result("go"), "now");
    vm.finish();
    let stderr = vm.stderr();
    assert!(
        !stderr.contains("config"),
        "QEMU failed to pass on the config write: {stderr}"
    );
    assert_same(&read_image(&s.image), &expected, "after power-off");
    drop(s);
    report_time("flush_reaches_image", flavor, t0);
}

/// (g) The guest reboots (`reboot -f`, which restarts the machine), then is reset over QEMU's
/// QMP (`system_reset`); each time it comes back, it reads what the boot before wrote and
/// writes again, on the same export, never re-added.
fn guest_reboot(flavor: Flavor) {
    if !guest::require_guest() {
        return;
    }
    let size = 16 * MIB;
    let s = start(flavor, &vec![0u8; size as usize], "", Some("writable=on"));
    let (a, b, c) = (
        pattern(64 * KIB as usize, 11),
        pattern(64 * KIB as usize, 12),
        pattern(64 * KIB as usize, 13),
    );
    let stage = |n: u8| {
        let mut v = format!("stage{n}").into_bytes();
        v.resize(512, 0);
        v
    };
    let (a_off, b_off, c_off) = (MIB, 2 * MIB, 3 * MIB);
    let script = format!(
        "stage=$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | tr -d '\\000')\n\
         report stage x$stage\n\
         case \"$stage\" in\n\
         '')\n{}{}  reboot -f ;;\n\
         stage1)\n{}{}{}  report waiting yes\n  read -r never ;;\n\
         stage2)\n{}{}{}{} ;;\n\
         esac\n",
        write_cmd("write_a", "/data/a", a_off, 4096, ""),
        write_cmd("stage_1", "/data/stage1", 0, 512, ""),
        read_check("read_a", "/data/a", a_off, 64 * KIB, 4096),
        write_cmd("write_b", "/data/b", b_off, 4096, ""),
        write_cmd("stage_2", "/data/stage2", 0, 512, ""),
        read_check("read_a", "/data/a", a_off, 64 * KIB, 4096),
        read_check("read_b", "/data/b", b_off, 64 * KIB, 4096),
        write_cmd("write_c", "/data/c", c_off, 4096, ""),
        read_check("read_c", "/data/c", c_off, 64 * KIB, 4096),
    );
    let mut cfg = VmConfig::new(&s.socket, &script)
        .file("/data/a", &a)
        .file("/data/b", &b)
        .file("/data/c", &c)
        .file("/data/stage1", &stage(1))
        .file("/data/stage2", &stage(2));
    cfg.allow_reboot = true;
    // One guest at a time, taken once the daemon runs (a daemon that cannot start fails at
    // once); the case's time counts from here.
    let _vm = guest::vm_lock();
    let t0 = Instant::now();
    let mut vm = Vm::boot(&cfg);
    let boot = Instant::now();
    assert_eq!(vm.result("stage"), "x", "first boot");
    assert_eq!(vm.result("write_a"), "0");
    assert_eq!(vm.result("stage_1"), "0");
    let first = boot.elapsed();

    // reboot -f: the machine restarts, the guest boots again on the same export.
    assert_eq!(vm.result("stage"), "xstage1", "after reboot -f");
    assert_eq!(vm.boots, 2, "the guest booted twice");
    assert_eq!(vm.result("read_a"), "match", "after reboot -f");
    assert_eq!(vm.result("write_b"), "0");
    assert_eq!(vm.result("stage_2"), "0");
    assert_eq!(vm.result("waiting"), "yes");
    let second = boot.elapsed();

    // A reset from outside, while the guest waits.
    vm.qmp().ok("system_reset", json!({}));
    assert_eq!(vm.result("stage"), "xstage2", "after system_reset");
    assert_eq!(vm.boots, 3, "the guest booted three times");
    assert_eq!(vm.result("read_a"), "match", "after system_reset");
    assert_eq!(vm.result("read_b"), "match", "after system_reset");
    assert_eq!(vm.result("write_c"), "0");
    assert_eq!(vm.result("read_c"), "match");
    vm.finish();
    eprintln!(
        "guest_reboot: first boot done at {:.1} s, second at {:.1} s, third at {:.1} s",
        first.as_secs_f64(),
        second.as_secs_f64(),
        boot.elapsed().as_secs_f64()
    );

    let mut expected = vec![0u8; size as usize];
    put(&mut expected, 0, &stage(2));
    put(&mut expected, a_off, &a);
    put(&mut expected, b_off, &b);
    put(&mut expected, c_off, &c);
    assert_same(&read_image(&s.image), &expected, "after three boots");
    drop(s);
    report_time("guest_reboot", flavor, t0);
}

/// Terse fio status line (version 3): the written KiB so far (field 48, 1-based).
fn fio_written_kib(line: &str) -> Option<u64> {
    let at = line.find("3;fio-")?;
    line[at..].split(';').nth(47)?.parse().ok()
}

/// (h) The frontend is SIGKILLed while the guest's fio writes at QD16; the daemon stays up,
/// a new QEMU attaches to the same socket and works, and what the first guest had written
/// with fsync before is on the disk.
fn frontend_killed_mid_io(flavor: Flavor) {
    if !guest::require_guest() {
        return;
    }
    let size = 64 * MIB;
    let mut s = start(flavor, &vec![0u8; size as usize], "", Some("writable=on"));
    let a = pattern(256 * KIB as usize, 21);
    let b = pattern(256 * KIB as usize, 22);
    let (a_off, b_off) = (MIB, 2 * MIB);
    let cfg = VmConfig::new(
        &s.socket,
        &(write_cmd("a_synced", "/data/a", a_off, 4096, "conv=fsync")
            + "fio --name=bg --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 \
               --rw=randwrite --bs=4k --offset=16m --size=32m --time_based --runtime=600 \
               --status-interval=1 --output-format=terse\n\
               report fio_ended $?\n"),
    )
    .file("/data/a", &a);
    // One guest at a time, taken once the daemon runs (a daemon that cannot start fails at
    // once); the case's time counts from here.
    let _vm = guest::vm_lock();
    let t0 = Instant::now();
    let mut vm = Vm::boot(&cfg);
    assert_eq!(vm.result("a_synced"), "0", "write with fsync");
    // Kill once fio's status says it has written (and so has requests in flight, QD16).
    let line = vm.wait_line("fio writing", DEFAULT_TIMEOUT, |l| {
        fio_written_kib(l).is_some_and(|kib| kib > 0)
    });
    let status = vm.kill();
    eprintln!(
        "killed QEMU ({status}) at fio status {:?}",
        fio_written_kib(&line)
    );
    drop(vm);

    let pid = s.daemon.child.as_ref().expect("daemon").id();
    assert!(
        s.daemon
            .child
            .as_mut()
            .expect("daemon")
            .try_wait()
            .expect("try_wait")
            .is_none()
            && process_exists(pid as i32),
        "the daemon exited when its frontend was killed"
    );
    let mut qmp = s.daemon.qmp();
    let exports = qmp.ok("query-block-exports", json!({}));
    assert_eq!(exports[0]["id"], "exp0", "{exports}");

    // A new frontend on the same socket, the export untouched. QEMU retries the connection
    // (reconnect-ms) in case the daemon has not yet seen the old one go.
    let mut cfg2 = VmConfig::new(
        &s.socket,
        &(read_check("read_a", "/data/a", a_off, 256 * KIB, 4096)
            + &write_cmd("b_synced", "/data/b", b_off, 4096, "conv=fsync")
            + &read_check("read_b", "/data/b", b_off, 256 * KIB, 4096)
            + "fio --name=v --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 \
               --rw=randwrite --bs=4k --offset=16m --size=4m --verify=crc32c --do_verify=1 \
               --output-format=terse > /tmp/fio.out 2>&1; report fio $?\n"),
    )
    .file("/data/a", &a)
    .file("/data/b", &b);
    cfg2.reconnect_ms = Some(100);
    let mut vm2 = Vm::boot(&cfg2);
    assert_eq!(
        vm2.result("read_a"),
        "match",
        "the first guest's fsynced data"
    );
    assert_eq!(vm2.result("b_synced"), "0");
    assert_eq!(vm2.result("read_b"), "match");
    assert_eq!(
        vm2.result("fio"),
        "0",
        "fio with verify on the second frontend"
    );
    vm2.finish();

    let img = read_image(&s.image);
    assert_eq!(&img[a_off as usize..a_off as usize + a.len()], &a[..], "a");
    assert_eq!(&img[b_off as usize..b_off as usize + b.len()], &b[..], "b");
    drop(s);
    report_time("frontend_killed_mid_io", flavor, t0);
}

/// (i) The daemon is SIGKILLed while the guest's fio writes at QD16 and a new daemon is
/// started on the same socket; QEMU (`reconnect-ms`) reconnects and hands it the in-flight
/// log (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`), the requests the first daemon had taken and
/// not completed are resubmitted, and the guest sees no error: fio's verification of
/// everything it wrote passes and the kernel logged no I/O error. QSD's export offers no
/// in-flight log, so this runs on blockexportd only.
fn daemon_killed_under_load(flavor: Flavor) {
    if !guest::require_guest() {
        return;
    }
    // A qcow2 image: writes that allocate clusters take longer than writes to allocated
    // ones, so requests complete out of order and the used ring's index alone cannot tell
    // a new daemon which requests were done. `writethrough`: a write completes once it is
    // stable, so every write the guest saw complete must survive the kill (with a write-back
    // cache and no flush from the guest, a qcow2 node's metadata may die with the daemon).
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.qcow2");
    let socket = dir.path().join("vub.sock");
    blockexportd_tests::qemu_img_create(&image, "qcow2", "64M");
    let args = [
        "--blockdev".to_string(),
        format!("driver=file,node-name=file0,filename={}", image.display()),
        "--blockdev".to_string(),
        "driver=qcow2,node-name=disk0,file=file0".to_string(),
        "--export".to_string(),
        format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,writethrough=on",
            socket.display()
        ),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start_in(flavor, dir, &args);
    let mut cfg = VmConfig::new(
        &socket,
        "fio --name=w --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 \
         --rw=randwrite --bs=4k --offset=16m --size=16m --verify=crc32c --do_verify=1 \
         --status-interval=1 --output-format=terse 2>&1; report fio $?\n\
         report ioerrors $(dmesg | grep -c -i -e 'I/O error' -e 'not a head' -e 'broken')\n",
    );
    cfg.reconnect_ms = Some(100);
    let _vm = guest::vm_lock();
    let t0 = Instant::now();
    let mut vm = Vm::boot(&cfg);
    // Kill the daemon once fio's status says it has written (and so has requests in
    // flight, QD16).
    vm.wait_line("fio writing", DEFAULT_TIMEOUT, |l| {
        fio_written_kib(l).is_some_and(|kib| kib > 256)
    });
    let mut child = daemon.child.take().expect("daemon");
    child.kill().expect("SIGKILL the daemon");
    child.wait().expect("reap the daemon");
    // A new daemon with the same command line, in the same directory, on the same socket.
    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().expect("tempdir"));
    drop(daemon);
    for stale in ["daemon.pid", "qmp.sock"] {
        let _ = std::fs::remove_file(dir.path().join(stale));
    }
    let daemon = Daemon::start_in(flavor, dir, &args);
    assert_eq!(
        vm.result("fio"),
        "0",
        "fio's verification after the daemon's restart"
    );
    assert_eq!(
        vm.result("ioerrors"),
        "0",
        "errors in the guest's kernel log"
    );
    vm.finish();
    drop(daemon);
    report_time("daemon_killed_under_load", flavor, t0);
}

mod inflight {
    #[test]
    fn daemon_killed_under_load() {
        super::daemon_killed_under_load(blockexportd_tests::Flavor::Blockexportd)
    }
}

/// The harness's own cpio writer, read back by GNU cpio: the names the guest needs are there,
/// and `/init` is what the harness wrote.
#[test]
fn initramfs_reads_back_with_cpio() {
    if !guest::require_guest() || !blockexportd_tests::require_tool("cpio") {
        return;
    }
    let base = guest::base_initramfs().expect("the initramfs");
    let cpio = |args: &[&str]| -> Vec<u8> {
        let mut child = Command::new("cpio")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cpio");
        let mut stdin = child.stdin.take().expect("stdin");
        let writer = std::thread::spawn(move || stdin.write_all(base));
        let out = child.wait_with_output().expect("cpio");
        writer.join().expect("writer").expect("write to cpio");
        assert!(
            out.status.success(),
            "cpio {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let list = String::from_utf8(cpio(&["-it", "--quiet"])).expect("utf-8 names");
    let names: Vec<&str> = list.lines().collect();
    for want in [
        "init",
        "bin/busybox",
        "bin/sh",
        "sbin/insmod",
        "sbin/poweroff",
        "usr/bin/fio",
        "usr/sbin/blkdiscard",
        "lib/modules/virtio_blk.ko",
        "lib/modules/virtio_pci.ko",
        "dev/console",
    ] {
        assert!(names.contains(&want), "{want} is not in the initramfs");
    }
    let init = cpio(&["-i", "--quiet", "--to-stdout", "init"]);
    let init = String::from_utf8(init).expect("utf-8 init");
    assert!(init.starts_with("#!/bin/sh\n"), "{init}");
    assert!(init.contains("insmod /lib/modules/virtio_blk.ko"), "{init}");
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

per_flavor!(
    read_write_patterns,
    two_queues,
    logical_block_size_4096,
    read_only,
    discard_unmap,
    flush_reaches_image,
    guest_reboot,
    frontend_killed_mid_io,
);
