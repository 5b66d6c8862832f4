//! NBD exports with `iothread=`: the daemon's `iothread-<id>` thread does the exports' work
//! (seen in `/proc/<pid>/task/*/stat`), data moves byte for byte, and the iothread cannot be
//! deleted while an export runs in it.

use blockexportd_tests::{
    qemu_img_create, qemu_io, require_python_nbd, require_tools, run_ok, Daemon, Flavor,
};
use serde_json::json;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};

const MIB: u64 = 1 << 20;
/// What each client copies in and out of an export.
const COPY: u64 = 512 * MIB;

/// The threads of process `pid`: (tid, name).
fn threads(pid: u32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                comm.trim().to_string(),
            ))
        })
        .collect()
}

/// The CPU time (utime + stime, in clock ticks) of the thread named `name` in `pid`.
fn cpu_ticks(pid: u32, name: &str) -> u64 {
    let (tid, _) = threads(pid)
        .into_iter()
        .find(|(_, comm)| comm == name)
        .unwrap_or_else(|| panic!("no thread named {name} in {:?}", threads(pid)));
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
    // Fields after the name (which is in parentheses and may hold spaces): state is field 3,
    // utime field 14, stime field 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields[11].parse().unwrap();
    let stime: u64 = fields[12].parse().unwrap();
    utime + stime
}

/// Whether two files hold the same bytes (read in 1 MiB pieces).
fn same_bytes(a: &Path, b: &Path) -> bool {
    let (mut a, mut b) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (mut x, mut y) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    loop {
        let n = read_full(&mut a, &mut x);
        let m = read_full(&mut b, &mut y);
        if n != m || x[..n] != y[..m] {
            return false;
        }
        if n == 0 {
            return true;
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match f.read(&mut buf[done..]).unwrap() {
            0 => break,
            n => done += n,
        }
    }
    done
}

/// Copies `src` into the export with nbdcopy, then the export into `back`; checks that
/// `back` and the image hold `src` byte for byte.
fn copy_through(uri: &str, src: &Path, back: &Path, image: &Path) {
    run_ok(Command::new("nbdcopy").arg("--flush").arg(src).arg(uri));
    run_ok(Command::new("nbdcopy").arg(uri).arg(back));
    assert!(same_bytes(src, back), "{uri}: what came back differs");
    assert!(same_bytes(src, image), "{uri}: the image differs");
    std::fs::remove_file(back).unwrap();
}

#[test]
fn nbd_export_work_runs_in_its_iothread() {
    if !require_tools(&["qemu-img", "qemu-io", "nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let (io_img, main_img) = (p("io.img"), p("main.img"));
    qemu_img_create(&io_img, "raw", &COPY.to_string());
    qemu_img_create(&main_img, "raw", &COPY.to_string());
    let src = p("src.bin");
    std::io::copy(
        &mut File::open("/dev/urandom").unwrap().take(COPY),
        &mut File::create(&src).unwrap(),
    )
    .unwrap();
    let sock = p("nbd.sock");
    let args = [
        "--object".to_string(),
        "iothread,id=io0".into(),
        "--blockdev".into(),
        format!("driver=file,filename={},node-name=f-io", io_img.display()),
        "--blockdev".into(),
        format!(
            "driver=file,filename={},node-name=f-main",
            main_img.display()
        ),
        "--nbd-server".into(),
        format!("addr.type=unix,addr.path={}", sock.display()),
        "--export".into(),
        "type=nbd,id=e-io,node-name=f-io,name=io,writable=on,iothread=io0".into(),
        "--export".into(),
        "type=nbd,id=e-main,node-name=f-main,name=main,writable=on".into(),
    ];
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start_in(Flavor::Blockexportd, tempfile::tempdir().unwrap(), &argv);
    let pid = d.child.as_ref().unwrap().id();
    let uri = |name: &str| format!("nbd+unix:///{name}?socket={}", sock.display());

    // The export without an iothread: the iothread stays idle.
    let before = cpu_ticks(pid, "iothread-io0");
    copy_through(&uri("main"), &src, &p("back-main.bin"), &main_img);
    let idle = cpu_ticks(pid, "iothread-io0") - before;

    // The export in the iothread: its thread does the socket I/O, decoding and block calls.
    let before = cpu_ticks(pid, "iothread-io0");
    copy_through(&uri("io"), &src, &p("back-io.bin"), &io_img);
    let busy = cpu_ticks(pid, "iothread-io0") - before;
    eprintln!("iothread-io0 CPU ticks: {idle} copying through 'main', {busy} through 'io'");
    assert!(
        busy >= 10,
        "copying {COPY} bytes in and out through the iothread's export took only {busy} ticks of its CPU"
    );
    assert!(
        idle * 10 <= busy,
        "the iothread worked ({idle} ticks) for an export that does not run in it ({busy} for its own)"
    );

    // Requests of every kind through the iothread, QEMU's client.
    qemu_io(
        &["-f", "raw", &uri("io")],
        &[
            "write -P 0x11 1M 256k",
            "write -z 2M 64k",
            "discard 3M 64k",
            "flush",
            "read -P 0x11 1M 256k",
            "read -P 0 2M 64k",
            "read 3M 64k",
        ],
    );
}

#[test]
fn an_iothread_in_use_by_an_nbd_export_is_not_deleted() {
    if !require_tools(&["qemu-img", "qemu-io"]) || !require_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    qemu_img_create(&image, "raw", "16M");
    let sock = dir.path().join("nbd.sock");
    let d = Daemon::start(&[
        "--object",
        "iothread,id=io0",
        "--blockdev",
        &format!("driver=file,filename={},node-name=f0", image.display()),
    ]);
    let pid = d.child.as_ref().unwrap().id();
    let mut q = d.qmp();
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock.to_str().unwrap()}}}),
    );
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "f0", "writable": true,
               "iothread": "io0", "fixed-iothread": true}),
    );
    let uri = format!("nbd+unix:///f0?socket={}", sock.display());
    qemu_io(
        &["-f", "raw", &uri],
        &["write -P 0x5a 0 1M", "read -P 0x5a 0 1M"],
    );

    // QSD 10 deletes it, and crashes at the next client: refuse, as for any object in use.
    let (class, desc) = q.err("object-del", json!({"id": "io0"}));
    assert_eq!(class, "GenericError");
    assert!(desc.contains("'io0'") && desc.contains("in use"), "{desc}");
    assert!(threads(pid).iter().any(|(_, n)| n == "iothread-io0"));
    qemu_io(&["-r", "-f", "raw", &uri], &["read -P 0x5a 0 1M"]);

    // A client connected in the iothread: safe removal refused, hard removal drops it.
    let mut client = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import nbd,sys\n\
             h=nbd.NBD(); h.connect_uri(sys.argv[1])\n\
             assert h.pread(4096, 0) == b'\\x5a' * 4096\n\
             print('connected', flush=True); sys.stdin.read()\n\
             try:\n    h.pread(4096, 0); print('still connected')\n\
             except nbd.Error:\n    print('disconnected')",
            &uri,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "connected", "libnbd client failed");
    let (_, desc) = q.err("block-export-del", json!({"id": "e0"}));
    assert_eq!(desc, "export 'e0' still in use");
    q.ok("block-export-del", json!({"id": "e0", "mode": "hard"}));
    let ev = q.wait_event("BLOCK_EXPORT_DELETED");
    assert_eq!(ev["data"], json!({"id": "e0"}));
    drop(client.stdin.take());
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "disconnected");
    assert!(client.wait().unwrap().success());

    // The export is gone: the iothread may go, and its thread ends.
    q.ok("object-del", json!({"id": "io0"}));
    assert!(
        !threads(pid).iter().any(|(_, n)| n == "iothread-io0"),
        "{:?}",
        threads(pid)
    );
    let (_, desc) = q.err(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "f0", "iothread": "io0"}),
    );
    // QSD's wording.
    assert_eq!(desc, "iothread \"io0\" not found");
}
