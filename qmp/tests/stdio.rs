//! A monitor on stdin/stdout: this test binary re-runs itself as the daemon
//! (no libtest harness, so stdout carries only QMP).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use qmp_server::{MonitorOptions, QmpError, QmpServer, VersionInfo};
use serde_json::{json, Value};

const CHILD: &str = "QMP_SERVER_STDIO_TEST_CHILD";

fn child() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let server = QmpServer::new(VersionInfo {
            major: 1,
            minor: 2,
            micro: 3,
            package: "stdio".into(),
        });
        server.register("echo", |args| async move {
            Ok::<_, QmpError>(Value::Object(args))
        });
        tokio::select! {
            _ = server.serve_stdio(MonitorOptions::default()) => {}
            _ = server.quit_requested() => server.shutdown(),
        }
    });
    // Stdin is read by a blocking thread that only returns with input.
    rt.shutdown_background();
}

fn main() {
    if std::env::var_os(CHILD).is_some() {
        child();
        return;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut daemon = Command::new(exe)
        .env(CHILD, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let mut stdin = daemon.stdin.take().expect("stdin");
    let mut stdout = BufReader::new(daemon.stdout.take().expect("stdout"));
    let mut recv = || -> Value {
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).expect("read") > 0, "EOF");
        assert!(line.ends_with("\r\n"));
        serde_json::from_str(&line).expect("JSON")
    };
    assert_eq!(
        recv(),
        json!({"QMP": {"version": {"qemu": {"major": 1, "minor": 2, "micro": 3},
            "package": "stdio"}, "capabilities": ["oob"]}})
    );
    writeln!(stdin, r#"{{"execute": "qmp_capabilities"}}"#).expect("write");
    assert_eq!(recv(), json!({"return": {}}));
    writeln!(
        stdin,
        r#"{{"execute": "echo", "arguments": {{"a": [1]}}, "id": 1}}"#
    )
    .expect("write");
    assert_eq!(recv(), json!({"return": {"a": [1]}, "id": 1}));
    writeln!(stdin, r#"{{"execute": "quit"}}"#).expect("write");
    assert_eq!(recv(), json!({"return": {}}));
    // The daemon exits after quit although its stdin is still open.
    let status = daemon.wait().expect("wait");
    assert!(status.success(), "{status}");
    drop(stdin);
    println!("stdio monitor: ok");
}
