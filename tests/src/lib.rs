//! Support for the end-to-end tests of blockexportd: start the real binary (or
//! qemu-storage-daemon, for comparison), talk QMP to it, and find the real client tools.

#![allow(missing_docs)]

pub mod ceph;
pub mod guest;
pub mod kernel;
pub mod model;
pub mod vhost_client;

use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use test_support::{require_python_nbd, require_tool, require_tools, run_ok, under_ci, Pki};

/// The part of a QMP reply that two daemons must agree on: the error class and text, or the
/// shape of the return value (its keys and value types).
pub fn comparable(r: &Value) -> Value {
    match r.get("error") {
        Some(e) => json!({"class": e["class"], "desc": e["desc"]}),
        None => shape(&r["return"]),
    }
}

/// Fails listing every step (command, arguments, answer) where ours answered otherwise than
/// QSD; the two runs went through the same steps in the same order.
pub fn assert_same_answers<C: std::fmt::Display>(
    qsd: &[(C, Value, Value)],
    ours: &[(C, Value, Value)],
) {
    let mismatches: Vec<String> = qsd
        .iter()
        .zip(ours)
        .filter(|(a, b)| a.2 != b.2)
        .map(|(a, b)| format!("{} {}:\n  QSD:  {}\n  ours: {}", a.0, a.1, a.2, b.2))
        .collect();
    assert!(
        mismatches.is_empty(),
        "differences from QSD:\n{}",
        mismatches.join("\n")
    );
}

/// A JSON value with every scalar replaced by its type's name.
pub fn shape(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
        Value::Array(a) => Value::Array(a.iter().map(shape).collect()),
        Value::String(_) => json!("string"),
        Value::Number(_) => json!("number"),
        Value::Bool(_) => json!("bool"),
        Value::Null => Value::Null,
    }
}

/// The blockexportd binary of this workspace, built (once per test process) with the same
/// profile as the tests.
pub fn daemon_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        // target/<profile>/deps/<test> -> target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in target/<profile>/deps")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-q", "-p", "blockexportd", "--bin", "blockexportd"])
            .arg("--target-dir")
            .arg(&target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building blockexportd failed");
        profile_dir.join("blockexportd")
    })
    .clone()
}

/// Which daemon a test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// This project's daemon.
    Blockexportd,
    /// QEMU's qemu-storage-daemon, the reference.
    Qsd,
}

impl Flavor {
    /// The program to run.
    pub fn program(self) -> PathBuf {
        match self {
            Flavor::Blockexportd => daemon_binary(),
            Flavor::Qsd => PathBuf::from("qemu-storage-daemon"),
        }
    }
}

/// The daemons to compare: blockexportd, and qemu-storage-daemon when it is installed (under
/// CI it must be).
pub fn flavors() -> Vec<Flavor> {
    let mut v = vec![Flavor::Blockexportd];
    if require_tools(&["qemu-storage-daemon"]) {
        v.push(Flavor::Qsd);
    }
    v
}

/// Starts a daemon with `args` only (no monitor of ours), its stdin null and its output
/// piped.
pub fn spawn(flavor: Flavor, args: &[&str]) -> Child {
    Command::new(flavor.program())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the daemon")
}

/// Runs a daemon that must fail at startup; returns its output.
pub fn run_failing(flavor: Flavor, args: &[&str]) -> Output {
    let out = spawn(flavor, args).wait_with_output().expect("wait");
    assert!(
        !out.status.success(),
        "{flavor:?} {args:?} should fail: {out:?}"
    );
    out
}

/// A daemon's stderr with the program's name taken off (`--chardev ...: MESSAGE\n`).
pub fn startup_message(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    text.trim_start_matches("qemu-storage-daemon: ")
        .trim_start_matches("blockexportd: ")
        .to_string()
}

/// Waits until `fd` is readable (a listener with a connection to accept, a pipe with data),
/// failing the test if `child` exits first or 20 seconds pass; `what` names the awaited
/// event in the failure (`"its greeting"`).
pub fn wait_readable(fd: &impl AsRawFd, child: &mut Child, what: &str) {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    for _ in 0..200 {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the daemon exited ({status}) before {what}");
        }
        // SAFETY: one valid pollfd, count 1, for up to 100 ms.
        if unsafe { libc::poll(&mut pfd, 1, 100) } > 0 {
            return;
        }
    }
    panic!("{what} never came");
}

/// A running daemon with a QMP monitor on a unix socket; killed (SIGTERM) when dropped.
pub struct Daemon {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub qmp_path: PathBuf,
    pub flavor: Flavor,
}

impl Daemon {
    /// Starts blockexportd with a QMP monitor and `args`, and waits until the monitor accepts.
    pub fn start(args: &[&str]) -> Daemon {
        Daemon::start_flavor(Flavor::Blockexportd, args)
    }

    /// Starts the given daemon with a QMP monitor and `args`.
    pub fn start_flavor(flavor: Flavor, args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        Daemon::start_in(flavor, dir, args)
    }

    /// Starts the daemon with its QMP socket in `dir`.
    pub fn start_in(flavor: Flavor, dir: tempfile::TempDir, args: &[&str]) -> Daemon {
        let qmp_path = dir.path().join("qmp.sock");
        let chardev = format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            qmp_path.display()
        );
        // The pidfile is written once startup is complete (both daemons): the tests wait for
        // it, since the monitor, being first on the command line, accepts earlier.
        let pidfile = dir.path().join("daemon.pid");
        let child = Command::new(flavor.program())
            .args(["--chardev", &chardev, "--monitor", "chardev=qmp0"])
            .arg("--pidfile")
            .arg(&pidfile)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the daemon");
        let mut d = Daemon {
            child: Some(child),
            dir,
            qmp_path,
            flavor,
        };
        d.wait_for_socket();
        d
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let out = self.child.take().map(|c| c.wait_with_output());
                    let stderr = match out {
                        Some(Ok(o)) => String::from_utf8_lossy(&o.stderr).to_string(),
                        _ => String::new(),
                    };
                    panic!("daemon exited during startup ({status}): {stderr}");
                }
            }
            if self.path("daemon.pid").exists() && UnixStream::connect(&self.qmp_path).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon never finished its startup"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A new QMP session, capabilities negotiated.
    pub fn qmp(&self) -> Qmp {
        let mut q = Qmp::connect(&self.qmp_path);
        let r = q.execute("qmp_capabilities", json!({}));
        assert_eq!(r, json!({"return": {}}), "qmp_capabilities");
        q
    }

    /// A path inside the daemon's temporary directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Sends SIGTERM and waits for the exit; returns its output.
    pub fn terminate(&mut self) -> Output {
        let child = self.child.take().expect("running");
        signal(child.id(), libc::SIGTERM);
        child.wait_with_output().expect("wait")
    }

    /// Waits for the daemon to exit by itself (after `quit`).
    pub fn wait(&mut self) -> Output {
        self.child
            .take()
            .expect("running")
            .wait_with_output()
            .expect("wait")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGTERM);
            let _ = child.wait();
        }
    }
}

/// Sends a signal to a process.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Lets a descriptor be inherited by the processes this test starts.
pub fn clear_cloexec(fd: i32) {
    // SAFETY: fcntl on a descriptor the caller owns; no memory is involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    assert!(flags >= 0, "F_GETFD");
    // SAFETY: as above.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) };
    assert_eq!(rc, 0, "F_SETFD");
}

/// Whether a process with this pid exists (it may be a zombie).
pub fn process_exists(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only probes for the process; no memory is involved.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// A QMP client.
pub struct Qmp {
    reader: BufReader<Box<dyn Read + Send>>,
    writer: Box<dyn Write + Send>,
    pub greeting: Value,
    pub events: VecDeque<Value>,
}

impl Qmp {
    /// Connects and reads the greeting (capabilities not negotiated).
    pub fn connect(path: &Path) -> Qmp {
        Qmp::from_stream(UnixStream::connect(path).expect("connect to QMP"))
    }

    /// Reads the greeting on a connection made some other way (a daemon that connected to a
    /// socket the test listens on).
    pub fn from_stream(stream: UnixStream) -> Qmp {
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let writer = stream.try_clone().expect("clone");
        Qmp::from_parts(stream, writer)
    }

    /// Reads the greeting on a monitor reached through a separate reader and writer (the two
    /// FIFOs of a `pipe` chardev, say).
    pub fn from_parts(
        reader: impl Read + Send + 'static,
        writer: impl Write + Send + 'static,
    ) -> Qmp {
        let mut q = Qmp {
            reader: BufReader::new(Box::new(reader)),
            writer: Box::new(writer),
            greeting: Value::Null,
            events: VecDeque::new(),
        };
        q.greeting = q.read_message();
        q
    }

    /// Writes from now on to `writer`, closing the one written to until now.
    pub fn replace_writer(&mut self, writer: impl Write + Send + 'static) {
        self.writer = Box::new(writer);
    }

    /// Reads one message.
    pub fn read_message(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read QMP");
        assert!(n > 0, "QMP connection closed");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad QMP line {line:?}: {e}"))
    }

    /// Sends raw text.
    pub fn send_raw(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).expect("write QMP");
    }

    /// Reads until a reply (not an event) arrives; events are queued.
    pub fn reply(&mut self) -> Value {
        loop {
            let msg = self.read_message();
            if msg.get("event").is_some() {
                self.events.push_back(msg);
            } else {
                return msg;
            }
        }
    }

    /// Executes a command and returns the whole reply (`{"return": ...}` or `{"error": ...}`).
    pub fn execute(&mut self, command: &str, arguments: Value) -> Value {
        let msg = if arguments == json!({}) {
            json!({"execute": command})
        } else {
            json!({"execute": command, "arguments": arguments})
        };
        self.send_raw(&format!("{msg}\n"));
        self.reply()
    }

    /// Executes a command that must succeed, returning its `return` value.
    pub fn ok(&mut self, command: &str, arguments: Value) -> Value {
        let r = self.execute(command, arguments.clone());
        match r.get("return") {
            Some(v) => v.clone(),
            None => panic!("{command} {arguments} failed: {r}"),
        }
    }

    /// Executes a command that must fail, returning (class, desc).
    pub fn err(&mut self, command: &str, arguments: Value) -> (String, String) {
        let r = self.execute(command, arguments.clone());
        let e = r
            .get("error")
            .unwrap_or_else(|| panic!("{command} {arguments} should fail: {r}"));
        (
            e["class"].as_str().unwrap_or_default().to_string(),
            e["desc"].as_str().unwrap_or_default().to_string(),
        )
    }

    /// Waits for the event `name` (queued or arriving).
    pub fn wait_event(&mut self, name: &str) -> Value {
        if let Some(pos) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(pos).unwrap_or_default();
        }
        loop {
            let msg = self.read_message();
            if msg["event"] == name {
                return msg;
            }
            if msg.get("event").is_some() {
                self.events.push_back(msg);
            }
        }
    }
}

/// Runs a command and returns its output, panicking with its stderr if it fails.
/// Runs `program` (called `name` in its messages) with `args`, which it must refuse at
/// startup; returns its one error message without the program's name.
pub fn startup_error(program: &Path, name: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().expect("run");
    assert!(!out.status.success(), "{name} accepted {args:?}");
    String::from_utf8_lossy(&out.stderr)
        .trim_end()
        .rsplit('\n')
        .next()
        .and_then(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("{name}: {}", String::from_utf8_lossy(&out.stderr)))
        .to_string()
}

/// Asserts that blockexportd refuses `args` at startup with qemu-storage-daemon's message.
pub fn assert_startup_error_as_qsd(args: &[&str]) {
    assert_eq!(
        startup_error(&daemon_binary(), "blockexportd", args),
        startup_error(
            Path::new("qemu-storage-daemon"),
            "qemu-storage-daemon",
            args
        ),
        "{args:?}"
    );
}

/// Creates an image with qemu-img.
pub fn qemu_img_create(path: &Path, format: &str, size: &str) {
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", format])
            .arg(path)
            .arg(size),
    );
}

/// Runs qemu-io with `-c` commands on an image or URI and returns stdout.
pub fn qemu_io(args: &[&str], commands: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(args);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = run_ok(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        !stdout.contains("Pattern verification failed") && !stdout.contains("failed:"),
        "qemu-io {args:?} {commands:?}: {stdout}"
    );
    stdout
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
