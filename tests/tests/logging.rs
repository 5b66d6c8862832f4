//! The daemon's diagnostics: `RUST_LOG` (or `BLOCKEXPORTD_LOG`, which wins) opens them, and
//! they carry no colour codes when stderr is not a terminal.

use blockexportd_tests::{daemon_binary, signal};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Starts the daemon with an NBD server on a unix socket, the given environment, and stderr
/// a pipe; returns once its startup is over (the pidfile is written).
fn start(env: &[(&str, &str)], dir: &std::path::Path) -> (Child, std::path::PathBuf) {
    let sock = dir.join("nbd.sock");
    let pidfile = dir.join("daemon.pid");
    let mut cmd = Command::new(daemon_binary());
    cmd.arg("--pidfile")
        .arg(&pidfile)
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", sock.display()))
        .env_remove("RUST_LOG")
        .env_remove("BLOCKEXPORTD_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start the daemon");
    for _ in 0..2000 {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the daemon exited ({status})");
        }
        if pidfile.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    (child, sock)
}

/// A client that connects and hangs up at once: the server logs a failed handshake at
/// `info` level. Returns the first line the daemon writes.
fn first_line_after_a_failed_handshake(env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, sock) = start(env, dir.path());
    drop(UnixStream::connect(&sock).expect("connect"));
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut line = String::new();
        let _ = stderr.read_line(&mut line);
        let _ = tx.send(line);
        let mut rest = String::new();
        let _ = stderr.read_to_string(&mut rest);
    });
    let line = rx.recv_timeout(Duration::from_secs(20));
    signal(child.id(), libc::SIGTERM);
    let status = child.wait().unwrap();
    reader.join().unwrap();
    let line = line.expect("the daemon said nothing within 20 s");
    assert!(status.success(), "{status}");
    line
}

#[test]
fn rust_log_opens_the_diagnostics_without_colour_on_a_pipe() {
    let line = first_line_after_a_failed_handshake(&[("RUST_LOG", "info")]);
    assert!(line.contains("NBD handshake failed"), "{line:?}");
    assert!(
        !line.contains('\x1b'),
        "no ANSI escapes on a pipe: {line:?}"
    );
    assert!(line.contains(" INFO "), "{line:?}");
}

#[test]
fn blockexportd_log_wins_over_rust_log() {
    let line = first_line_after_a_failed_handshake(&[
        ("RUST_LOG", "off"),
        ("BLOCKEXPORTD_LOG", "nbd_server=info"),
    ]);
    assert!(line.contains("NBD handshake failed"), "{line:?}");
}

#[test]
fn a_bad_filter_is_reported_and_the_default_used() {
    let dir = tempfile::tempdir().unwrap();
    let (child, _sock) = start(&[("RUST_LOG", "x=nonsense")], dir.path());
    signal(child.id(), libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("blockexportd: RUST_LOG=x=nonsense: "),
        "{err:?}"
    );
    assert_eq!(err.lines().count(), 1, "{err:?}");
}
