//! Memory after bursts: once a burst of work is over, the daemon's resident memory goes back
//! near its idle value (it used to stay at the burst's level, held by the allocator).

use blockexportd_tests::{qemu_img_create, qemu_io, require_tools, under_ci, Daemon, Qmp};
use serde_json::json;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// A field of /proc/PID/status, in bytes ("VmRSS", "VmHWM", "RssAnon").
fn status(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Waits until `field` is at most `bound` bytes; panics with the last value after a generous
/// time. Returns the value reached.
fn wait_below(pid: u32, field: &str, bound: u64, what: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = status(pid, field);
        if v <= bound {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {field} stayed at {} MiB, above {} MiB",
            v / MIB,
            bound / MIB
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Bytes the process passed to write(2) and the like (/proc/PID/io).
fn wchar(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    let line = text.lines().find(|l| l.starts_with("wchar:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn pid(d: &Daemon) -> u32 {
    d.child.as_ref().expect("running").id()
}

/// Starts the daemon with a qcow2 image (reads of qcow2 are copied into buffers, never
/// spliced) exported over NBD as `disk`.
fn start_nbd() -> (Daemon, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    qemu_img_create(&image, "qcow2", "16M");
    qemu_io(
        &["-f", "qcow2", image.to_str().unwrap()],
        &["write -P 0x5a 0 16M"],
    );
    let sock = dir.path().join("nbd.sock");
    let d = Daemon::start_in(
        blockexportd_tests::Flavor::Blockexportd,
        dir,
        &[
            "--blockdev",
            &format!("driver=file,filename={},node-name=f0", image.display()),
            "--blockdev",
            "driver=qcow2,file=f0,node-name=q0",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", sock.display()),
            "--export",
            "type=nbd,id=e0,node-name=q0,name=disk",
        ],
    );
    (d, sock)
}

/// Connects and does the handshake by hand (fixed newstyle, `NBD_OPT_EXPORT_NAME`, so
/// simple replies).
fn handshake(sock: &Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    // NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES.
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let name = b"disk";
    let mut opt = Vec::new();
    opt.extend_from_slice(b"IHAVEOPT");
    opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name);
    s.write_all(&opt).unwrap();
    let mut info = [0u8; 10]; // size, transmission flags
    s.read_exact(&mut info).unwrap();
    s
}

/// Sends `reads` reads of `len` bytes.
fn send_reads(s: &mut UnixStream, reads: u64, len: u32) {
    let mut reqs = Vec::new();
    for i in 0..reads {
        reqs.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        reqs.extend_from_slice(&0u16.to_be_bytes()); // flags
        reqs.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
        reqs.extend_from_slice(&i.to_be_bytes()); // cookie
        reqs.extend_from_slice(&((i * u64::from(len)) % (16 * MIB)).to_be_bytes());
        reqs.extend_from_slice(&len.to_be_bytes());
    }
    s.write_all(&reqs).unwrap();
}

/// Reads one simple reply header (no error) and, if `len` > 0, its data.
fn read_reply(s: &mut UnixStream, len: u32) {
    let mut header = [0u8; 16];
    s.read_exact(&mut header).unwrap();
    assert_eq!(
        &header[..8],
        &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0],
        "{header:?}"
    );
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).unwrap();
    assert!(data.iter().all(|&b| b == 0x5a));
}

/// A client that sends `reads` reads of `len` bytes, takes the start of the first reply and
/// goes away without reading the rest.
fn abrupt_client(sock: &Path, reads: u64, len: u32) {
    let mut s = handshake(sock);
    send_reads(&mut s, reads, len);
    read_reply(&mut s, 0);
}

#[test]
fn memory_returns_after_a_burst_of_abrupt_nbd_clients() {
    if !require_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let (d, sock) = start_nbd();
    let pid = pid(&d);
    // Warm up (code paths faulted in), then the idle value.
    abrupt_client(&sock, 1, 4096);
    let idle = status(pid, "VmRSS");
    // Reads of the whole 16 MiB image: a qcow2 read goes straight into the reply buffer
    // (one buffer per read), so the burst needs large reads to load the daemon.
    let clients: Vec<_> = (0..64)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || abrupt_client(&sock, 4, 16 << 20))
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let peak = status(pid, "VmHWM");
    assert!(
        peak > idle + 64 * MIB,
        "the burst did not load the daemon: idle {} MiB, peak {} MiB",
        idle / MIB,
        peak / MIB
    );
    let after = wait_below(pid, "VmRSS", idle + 16 * MIB, "after 64 abrupt NBD clients");
    eprintln!(
        "NBD burst: idle {} MiB, peak {} MiB, after {} MiB",
        idle / MIB,
        peak / MIB,
        after / MIB
    );
    // Still serving.
    abrupt_client(&sock, 1, 4096);
}

#[test]
fn idle_nbd_clients_give_their_buffers_back() {
    if !require_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let (d, sock) = start_nbd();
    let pid = pid(&d);
    abrupt_client(&sock, 1, 4096);
    let idle = status(pid, "VmRSS");
    // 16 clients read 8 MiB each in 1 MiB reads, then stay connected without a request.
    let clients: Vec<UnixStream> = (0..16)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut s = handshake(&sock);
                send_reads(&mut s, 8, 1 << 20);
                for _ in 0..8 {
                    read_reply(&mut s, 1 << 20);
                }
                s
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let peak = status(pid, "VmHWM");
    assert!(
        peak > idle + 64 * MIB,
        "the reads did not load the daemon: idle {} MiB, peak {} MiB",
        idle / MIB,
        peak / MIB
    );
    let after = wait_below(pid, "VmRSS", idle + 16 * MIB, "with 16 idle NBD clients");
    eprintln!(
        "idle NBD clients: idle {} MiB, peak {} MiB, after {} MiB",
        idle / MIB,
        peak / MIB,
        after / MIB
    );
    // They are still served.
    for mut s in clients {
        send_reads(&mut s, 1, 1 << 20);
        read_reply(&mut s, 1 << 20);
    }
}

#[test]
fn memory_returns_after_100000_unread_qmp_replies() {
    let d = Daemon::start(&[]);
    let pid = pid(&d);
    // The monitor serves one client at a time (as QEMU's socket chardev): each session
    // here ends before the next one starts.
    d.qmp().ok("query-version", json!({}));
    let idle = status(pid, "VmRSS");
    let idle_anon = status(pid, "RssAnon");
    // A client that sends commands and never reads the replies, then goes away.
    let mut s = UnixStream::connect(&d.qmp_path).unwrap();
    // The monitor paces a client that does not read (it stops reading once half its output
    // limit is queued): a write that makes no progress for 5 s means it has.
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
        .unwrap();
    let batch = "{\"execute\": \"query-version\"}\n".repeat(1000);
    for _ in 0..100 {
        if s.write_all(batch.as_bytes()).is_err() {
            break;
        }
    }
    drop(s);
    // The next session starts once the daemon is done with that one.
    let mut q = d.qmp();
    let peak = status(pid, "VmHWM");
    assert!(
        peak > idle + 8 * MIB,
        "the burst did not load the daemon: idle {} MiB, peak {} MiB",
        idle / MIB,
        peak / MIB
    );
    let after = wait_below(
        pid,
        "RssAnon",
        idle_anon + 8 * MIB,
        "after 100,000 unread QMP replies",
    );
    eprintln!(
        "QMP burst: idle {} MiB, peak {} MiB, anonymous idle {} MiB, after {} MiB",
        idle / MIB,
        peak / MIB,
        idle_anon / MIB,
        after / MIB
    );
    q.ok("query-version", json!({}));
}

fn fuse_usable() -> bool {
    let ok = Path::new("/dev/fuse").exists();
    if !ok {
        assert!(!under_ci(), "/dev/fuse is missing (CI=true)");
        eprintln!("skipping: /dev/fuse is missing");
    }
    ok && require_tools(&["qemu-img", "fio"])
}

#[test]
fn memory_returns_after_a_fuse_export_is_deleted_under_four_readers() {
    if !fuse_usable() {
        return;
    }
    let d = Daemon::start(&[]);
    let pid = pid(&d);
    let image = d.path("disk.raw");
    qemu_img_create(&image, "raw", "64M");
    qemu_io(
        &["-f", "raw", image.to_str().unwrap()],
        &["write -P 0x5a 0 64M"],
    );
    let mnt = d.path("mnt");
    std::fs::File::create(&mnt).unwrap();
    let mut q: Qmp = d.qmp();
    q.ok(
        "blockdev-add",
        json!({"driver": "file", "filename": image.to_str().unwrap(), "node-name": "f0"}),
    );
    let add = json!({"type": "fuse", "id": "fx", "node-name": "f0",
                     "mountpoint": mnt.to_str().unwrap()});
    // A first export and its removal: the idle value with the FUSE code paths warm.
    q.ok("block-export-add", add.clone());
    q.ok("block-export-del", json!({"id": "fx"}));
    q.wait_event("BLOCK_EXPORT_DELETED");
    let idle = status(pid, "RssAnon");
    q.ok("block-export-add", add);
    let mut fio = Command::new("fio")
        .args([
            "--name=r",
            &format!("--filename={}", mnt.display()),
            "--rw=read",
            "--bs=1M",
            "--direct=1",
            "--numjobs=4",
            "--ioengine=libaio",
            "--iodepth=32",
            "--time_based",
            "--runtime=60",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the readers to be at work: 256 MiB of replies written to /dev/fuse.
    let deadline = Instant::now() + Duration::from_secs(30);
    let written = wchar(pid);
    while wchar(pid) < written + 256 * MIB {
        if let Ok(Some(_)) = fio.try_wait() {
            let out = fio.wait_with_output().unwrap();
            panic!(
                "fio ended early: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(Instant::now() < deadline, "the readers never got going");
        std::thread::sleep(Duration::from_millis(50));
    }
    q.ok("block-export-del", json!({"id": "fx"}));
    q.wait_event("BLOCK_EXPORT_DELETED");
    // The readers fail once the mount is gone.
    let _ = fio.kill();
    let _ = fio.wait();
    let after = wait_below(
        pid,
        "RssAnon",
        idle + 8 * MIB,
        "after a FUSE export deleted under four readers",
    );
    eprintln!(
        "FUSE burst: anonymous idle {} MiB, after {} MiB, peak RSS {} MiB",
        idle / MIB,
        after / MIB,
        status(pid, "VmHWM") / MIB
    );
}
