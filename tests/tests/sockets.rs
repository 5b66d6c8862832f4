//! Sockets of the real binary, beside qemu-storage-daemon's: client chardevs (the daemon
//! connects out to its QMP client, as QEMU's test harness starts QSD), their reconnection,
//! and stale socket files at the paths it listens on.

use blockexportd_tests::{
    flavors, run_failing as run, signal, spawn, startup_message as message, wait_readable, Flavor,
    Qmp,
};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Output};
use std::time::Duration;

/// Accepts one connection, failing the test if none comes within 20 seconds (or the daemon
/// exits first).
fn accept(listener: &UnixListener, child: &mut Child) -> UnixStream {
    wait_readable(listener, child, "connecting");
    listener.accept().expect("accept").0
}

fn negotiate(q: &mut Qmp) {
    assert_eq!(
        q.execute("qmp_capabilities", json!({})),
        json!({"return": {}})
    );
}

fn quit(child: Child, q: &mut Qmp) -> Output {
    q.ok("quit", json!({}));
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{out:?}");
    out
}

/// QEMU's python harness (`python/qemu/machine`) listens on a socket and starts the daemon
/// with a client chardev to it; the monitor is the connection the daemon makes.
#[test]
fn client_chardev_connects_to_the_listening_harness() {
    for flavor in flavors() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let chardev = format!("socket,id=mon,path={}", sock.display());
        let mut child = spawn(flavor, &["--chardev", &chardev, "--monitor", "chardev=mon"]);
        let mut q = Qmp::from_stream(accept(&listener, &mut child));
        assert_eq!(
            q.greeting["QMP"]["version"]["qemu"]["major"], 10,
            "{flavor:?}"
        );
        negotiate(&mut q);
        assert_eq!(q.ok("query-block-exports", json!({})), json!([]));
        let out = quit(child, &mut q);
        assert_eq!(String::from_utf8_lossy(&out.stderr), "", "{flavor:?}");
    }
}

/// With `reconnect-ms`, the daemon connects again after the client hangs up: a new monitor
/// with a new greeting. It also waits for a client that is not there yet, saying so once.
#[test]
fn client_chardev_reconnects_after_hang_up() {
    for flavor in flavors() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let chardev = format!("socket,id=mon,path={},reconnect-ms=50", sock.display());
        let mut child = spawn(flavor, &["--chardev", &chardev, "--monitor", "chardev=mon"]);
        // Nobody listens yet: the daemon reports its first failed attempt and keeps trying.
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        let line = line
            .trim_start_matches("qemu-storage-daemon: ")
            .trim_start_matches("blockexportd: ");
        assert_eq!(
            line,
            format!(
                "Unable to connect character device mon: Failed to connect to '{}': \
                 No such file or directory\n",
                sock.display()
            ),
            "{flavor:?}"
        );
        let listener = UnixListener::bind(&sock).unwrap();
        let mut q = Qmp::from_stream(accept(&listener, &mut child));
        negotiate(&mut q);
        drop(q);
        let mut q = Qmp::from_stream(accept(&listener, &mut child));
        assert!(
            q.greeting.get("QMP").is_some(),
            "{flavor:?}: {}",
            q.greeting
        );
        // A new session: commands need negotiation again.
        let r = q.execute("query-block-exports", json!({}));
        assert_eq!(r["error"]["class"], "CommandNotFound", "{flavor:?}: {r}");
        negotiate(&mut q);
        q.ok("quit", json!({}));
        let status = child.wait().unwrap();
        assert!(status.success(), "{flavor:?}");
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
        assert_eq!(rest, "", "{flavor:?}: nothing more on stderr");
    }
}

/// Without reconnect a peer that is not there ends startup, with QSD's message.
#[test]
fn client_chardev_without_peer_fails_startup_like_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let unix = format!("socket,id=c,path={}", sock.display());
    let tcp = format!("socket,id=c,host=127.0.0.1,port={port}");
    let cases = [
        (
            unix.clone(),
            format!(
                "--chardev {unix}: Failed to connect to '{}': No such file or directory\n",
                sock.display()
            ),
        ),
        (
            tcp.clone(),
            format!("--chardev {tcp}: Failed to connect to '127.0.0.1:{port}': Connection refused\n"),
        ),
        (
            format!("{unix},server=off"),
            format!(
                "--chardev {unix},server=off: Failed to connect to '{}': No such file or directory\n",
                sock.display()
            ),
        ),
        (
            format!("{unix},wait=off"),
            format!(
                "--chardev {unix},wait=off: 'wait' option is incompatible with socket in client \
                 connect mode\n"
            ),
        ),
        (
            format!("{unix},server=on,wait=off,reconnect=1"),
            format!(
                "--chardev {unix},server=on,wait=off,reconnect=1: 'reconnect' option is \
                 incompatible with socket in server listen mode\n"
            ),
        ),
        (
            format!("{unix},reconnect=1,reconnect-ms=100"),
            format!(
                "--chardev {unix},reconnect=1,reconnect-ms=100: 'reconnect' and 'reconnect-ms' \
                 are mutually exclusive\n"
            ),
        ),
    ];
    for flavor in flavors() {
        for (arg, want) in &cases {
            let out = run(flavor, &["--chardev", arg, "--monitor", "chardev=c"]);
            assert_eq!(out.status.code(), Some(1), "{flavor:?} {arg}");
            assert_eq!(&message(&out), want, "{flavor:?}");
        }
    }
}

/// Leaves a socket file at `path` whose listener is gone, as a killed daemon leaves it.
fn stale_socket(path: &Path) {
    let _ = std::fs::remove_file(path);
    drop(UnixListener::bind(path).unwrap());
    assert!(UnixListener::bind(path).is_err(), "the file is in the way");
}

/// Starts a daemon listening on `path` (NBD server or chardev) and checks that it accepts.
fn listens(flavor: Flavor, args: &[&str], path: &Path) {
    let mut child = spawn(flavor, args);
    let mut connected = false;
    for _ in 0..2000 {
        if let Ok(Some(status)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            panic!("{flavor:?} {args:?} exited ({status}): {}", message(&out));
        }
        if UnixStream::connect(path).is_ok() {
            connected = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(child.id(), libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    assert!(connected, "{flavor:?} {args:?} never listened on {path:?}");
    assert_eq!(message(&out), "", "{flavor:?} {args:?}");
}

/// A stale socket file or a regular file at a path the daemon listens on is replaced, as
/// QEMU unlinks whatever is there before binding; a directory fails with QEMU's message.
#[test]
fn stale_socket_files_do_not_stop_startup() {
    for flavor in flavors() {
        let dir = tempfile::tempdir().unwrap();
        let nbd = dir.path().join("nbd.sock");
        let mon = dir.path().join("qmp.sock");
        let nbd_arg = format!("addr.type=unix,addr.path={}", nbd.display());
        let mon_arg = format!("socket,id=m,path={},server=on,wait=off", mon.display());
        let args = [
            "--chardev",
            &mon_arg,
            "--monitor",
            "chardev=m",
            "--nbd-server",
            &nbd_arg,
        ];
        stale_socket(&nbd);
        listens(flavor, &args, &nbd);
        stale_socket(&nbd);
        stale_socket(&mon);
        listens(flavor, &args, &mon);
        std::fs::remove_file(&nbd).ok();
        std::fs::write(&nbd, b"not a socket").unwrap();
        listens(flavor, &args[4..], &nbd);

        std::fs::remove_file(&nbd).ok();
        std::fs::create_dir(&nbd).unwrap();
        let out = run(flavor, &args[4..]);
        assert_eq!(
            message(&out),
            format!(
                "--nbd-server {nbd_arg}: Failed to unlink socket {}: Is a directory\n",
                nbd.display()
            ),
            "{flavor:?}"
        );
        std::fs::remove_dir(&nbd).unwrap();
    }
}

/// `nbd-server-start` over QMP replaces a stale socket file too.
#[test]
fn nbd_server_start_replaces_a_stale_socket() {
    for flavor in flavors() {
        let d = blockexportd_tests::Daemon::start_flavor(flavor, &[]);
        let nbd = d.path("nbd.sock");
        stale_socket(&nbd);
        let mut q = d.qmp();
        q.ok(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": nbd.to_str().unwrap()}}}),
        );
        UnixStream::connect(&nbd).expect("the NBD server listens");
        q.ok("nbd-server-stop", json!({}));
    }
}

/// An inet client chardev, with `reconnect` in seconds: the daemon connects to the test's TCP
/// listener and serves QMP there.
#[test]
fn inet_client_chardev_serves_qmp() {
    use std::io::Write;
    for flavor in flavors() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let chardev = format!("socket,id=mon,host=127.0.0.1,port={port},reconnect=1");
        let child = spawn(flavor, &["--chardev", &chardev, "--monitor", "chardev=mon"]);
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1, for up to 20 s.
        let n = unsafe { libc::poll(&mut pfd, 1, 20_000) };
        assert_eq!(n, 1, "{flavor:?}: the daemon connects");
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut w = stream.try_clone().unwrap();
        let mut r = BufReader::new(stream);
        let mut line = String::new();
        let mut next = || {
            line.clear();
            r.read_line(&mut line).unwrap();
            serde_json::from_str::<serde_json::Value>(&line).unwrap()
        };
        assert!(next().get("QMP").is_some(), "{flavor:?}: greeting");
        w.write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
            .unwrap();
        assert_eq!(next(), json!({"return": {}}), "{flavor:?}");
        w.write_all(b"{\"execute\": \"quit\"}\n").unwrap();
        assert_eq!(next(), json!({"return": {}}), "{flavor:?}");
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{flavor:?}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "", "{flavor:?}");
    }
}
