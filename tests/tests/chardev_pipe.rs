//! The `pipe` chardev of the real binary beside qemu-storage-daemon's: a QMP monitor over
//! the FIFOs `P.in` (commands in) and `P.out` (replies and events out), over `P` itself when
//! either is missing (a pty here, as a serial line in a guest), and the startup errors.

use blockexportd_tests::{
    comparable, flavors, require_tools, run_failing, run_ok, shape, spawn, startup_message,
    wait_readable, Flavor, Qmp,
};
use serde_json::{json, Value};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

fn mkfifo(path: &Path) {
    run_ok(Command::new("mkfifo").arg(path));
}

/// `path` with `suffix` appended (`P` -> `P.in`).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// What a daemon with a null-co node exported over NBD needs, then `chardev` and its monitor.
fn daemon_args(dir: &Path, chardev: &str) -> Vec<String> {
    [
        "--blockdev",
        "driver=null-co,node-name=n0",
        "--nbd-server",
        &format!(
            "addr.type=unix,addr.path={}",
            dir.join("nbd.sock").display()
        ),
        "--export",
        "type=nbd,id=e0,node-name=n0",
        "--chardev",
        chardev,
        "--monitor",
        "chardev=m",
    ]
    .map(String::from)
    .to_vec()
}

fn start(flavor: Flavor, args: &[String]) -> Child {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn(flavor, &args)
}

/// Opens the peer's ends of `P.in` and `P.out` once the daemon has written its greeting.
/// `P.out` is opened non-blocking first, so that a daemon that never opens it fails the
/// test instead of hanging it; the blocking reader opened next does not wait, since the
/// daemon holds a writer.
fn connect_fifos(base: &Path, child: &mut Child) -> Qmp {
    let out = with_suffix(base, ".out");
    let probe = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&out)
        .expect("open P.out");
    wait_readable(&probe, child, "its greeting");
    let reader = File::open(&out).expect("open P.out");
    drop(probe);
    Qmp::from_parts(reader, open_input(base))
}

fn open_input(base: &Path) -> File {
    OpenOptions::new()
        .write(true)
        .open(with_suffix(base, ".in"))
        .expect("open P.in")
}

/// Runs `session` for every flavor (in a fresh directory, `mkfifo` required) and checks
/// that QSD's transcript is blockexportd's, which it returns (`None`: skipped).
fn same_for_every_flavor(session: impl Fn(Flavor, &Path) -> Vec<Value>) -> Option<Vec<Value>> {
    if !require_tools(&["mkfifo"]) {
        return None;
    }
    let mut transcripts = flavors().into_iter().map(|flavor| {
        let dir = tempfile::tempdir().unwrap();
        (flavor, session(flavor, dir.path()))
    });
    let (_, ours) = transcripts.next().expect("blockexportd runs");
    for (flavor, theirs) in transcripts {
        assert_eq!(theirs, ours, "{flavor:?} answers otherwise");
    }
    Some(ours)
}

/// `quit`, then the daemon's exit status must be success.
fn quit(mut child: Child, q: &mut Qmp) {
    assert_eq!(q.execute("quit", json!({})), json!({"return": {}}));
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}");
}

/// Over two FIFOs, both daemons greet, negotiate, answer commands and send events alike. The
/// peer closes `P.in` and opens it again in the middle: the daemon, holding a writer of its
/// own, sees no end-of-file, and the session goes on with its capabilities negotiated.
#[test]
fn fifos_serve_qmp_like_qsd() {
    let Some(t) = same_for_every_flavor(|flavor, dir| {
        let base = dir.join("qmp");
        mkfifo(&with_suffix(&base, ".in"));
        mkfifo(&with_suffix(&base, ".out"));
        let chardev = format!("pipe,id=m,path={}", base.display());
        let mut child = start(flavor, &daemon_args(dir, &chardev));
        let mut q = connect_fifos(&base, &mut child);
        let mut t = vec![shape(&q.greeting)];
        t.push(q.execute("query-block-exports", json!({})));
        t.push(q.execute("qmp_capabilities", json!({})));
        t.push(q.execute("query-block-exports", json!({})));
        let nodes = q.ok("query-named-block-nodes", json!({"flat": true}));
        let names: Vec<_> = nodes
            .as_array()
            .expect("a list")
            .iter()
            .map(|n| json!([n["node-name"], n["drv"]]))
            .collect();
        t.push(json!(names));

        q.replace_writer(open_input(&base));
        t.push(q.execute("query-block-exports", json!({})));
        t.push(q.execute("block-export-del", json!({"id": "e0"})));
        let event = q.wait_event("BLOCK_EXPORT_DELETED");
        t.push(json!([event["data"], shape(&event["timestamp"])]));
        t.push(comparable(&q.execute("query-block-exports", json!({}))));
        quit(child, &mut q);
        t
    }) else {
        return;
    };
    let exports = json!({"return": [
        {"type": "nbd", "id": "e0", "node-name": "n0", "shutting-down": false}
    ]});
    assert_eq!(t[1]["error"]["class"], "CommandNotFound", "{t:?}");
    assert_eq!(t[3], exports);
    assert_eq!(t[4], json!([["n0", "null-co"]]));
    assert_eq!(t[5], exports, "the session outlives the closed P.in");
    assert_eq!(
        t[7],
        json!([{"id": "e0"}, {"seconds": "number", "microseconds": "number"}])
    );
    assert_eq!(t[8], json!([]));
}

/// A pty the test holds the master of: the slave's path, in raw mode (no echo, no newline
/// translation), as a serial line under a guest's monitor would be set.
fn open_pty() -> (File, PathBuf) {
    let master = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/ptmx")
        .expect("open /dev/ptmx");
    let fd = master.as_raw_fd();
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `fd` is an open pty master; ptsname_r writes at most `name.len()` bytes.
    let ok = unsafe {
        libc::grantpt(fd) == 0
            && libc::unlockpt(fd) == 0
            && libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) == 0
    };
    assert!(ok, "setting up the pty failed");
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
    let slave = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_str()
        .expect("a UTF-8 path")
        .to_owned();
    // SAFETY: termios is plain data; tcgetattr fills it in before cfmakeraw and tcsetattr
    // read it, all on the open descriptor `fd`.
    let ok = unsafe {
        let mut t = std::mem::zeroed::<libc::termios>();
        let got = libc::tcgetattr(fd, &mut t) == 0;
        libc::cfmakeraw(&mut t);
        got && libc::tcsetattr(fd, libc::TCSANOW, &t) == 0
    };
    assert!(ok, "raw mode on the pty failed");
    (master, PathBuf::from(slave))
}

/// `P.in` is a FIFO but `P.out` is missing: the daemon closes `P.in` and opens `P` itself
/// (here a link to a pty) for both ways.
#[test]
fn one_missing_fifo_serves_both_ways_on_the_path() {
    let Some(t) = same_for_every_flavor(|flavor, dir| {
        let (master, slave) = open_pty();
        let base = dir.join("tty");
        std::os::unix::fs::symlink(&slave, &base).unwrap();
        mkfifo(&with_suffix(&base, ".in"));
        let chardev = format!("pipe,id=m,path={}", base.display());
        let mut child = start(flavor, &daemon_args(dir, &chardev));
        wait_readable(&master, &mut child, "its greeting");
        let mut q = Qmp::from_parts(master.try_clone().unwrap(), master);
        let mut t = vec![shape(&q.greeting)];
        t.push(q.execute("qmp_capabilities", json!({})));
        t.push(q.execute("query-block-exports", json!({})));
        quit(child, &mut q);
        t
    }) else {
        return;
    };
    assert_eq!(t[1], json!({"return": {}}));
    assert_eq!(t[2]["return"][0]["id"], "e0", "{t:?}");
}

/// Startup fails with QSD's words, and exit status 1.
#[test]
fn startup_errors_like_qsd() {
    if !require_tools(&["mkfifo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let good = dir.path().join("good");
    mkfifo(&with_suffix(&good, ".in"));
    mkfifo(&with_suffix(&good, ".out"));
    mkfifo(&dir.path().join("half.in"));
    let good = format!("pipe,id=m,path={}", good.display());
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec!["--chardev".into(), "pipe,id=m".into()],
            "--chardev pipe,id=m: chardev: pipe: no device path given\n".into(),
        ),
        (
            vec!["--chardev".into(), format!("pipe,id=m,path={d}/none")],
            format!(
                "--chardev pipe,id=m,path={d}/none: Could not open '{d}/none': \
                 No such file or directory\n"
            ),
        ),
        (
            vec!["--chardev".into(), format!("pipe,id=m,path={d}/half")],
            format!(
                "--chardev pipe,id=m,path={d}/half: Could not open '{d}/half': \
                 No such file or directory\n"
            ),
        ),
        (
            vec!["--chardev".into(), format!("pipe,id=m,path={d}")],
            format!("--chardev pipe,id=m,path={d}: Could not open '{d}': Is a directory\n"),
        ),
        (
            vec![
                "--chardev".into(),
                good.clone(),
                "--chardev".into(),
                good.clone(),
            ],
            format!(
                "--chardev {good}: attempt to add duplicate property 'm' to object \
                 (type 'container')\n"
            ),
        ),
        (
            ["--chardev", &good, "--monitor", "m", "--monitor", "m"]
                .map(String::from)
                .to_vec(),
            "--monitor m: chardev 'm' is already in use\n".into(),
        ),
    ];
    for flavor in flavors() {
        for (args, want) in &cases {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = run_failing(flavor, &args);
            assert_eq!(out.status.code(), Some(1), "{flavor:?} {args:?}");
            assert_eq!(&startup_message(&out), want, "{flavor:?} {args:?}");
        }
    }
}
