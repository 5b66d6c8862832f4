//! A throwaway one-node Ceph cluster for the rbd tests: one `ceph-mon` and one `ceph-osd`
//! (`osd objectstore = memstore`, pools of size 1, no `ceph-mgr`) on 127.0.0.1, everything
//! (configuration, keyring, monitor store, logs, sockets) under a temporary directory.
//!
//! Debian bookworm's ceph 16 packages (`ceph-mon ceph-osd ceph-common`, installed by
//! `.ci/run`). The monitor's `paxos propose interval` is lowered to 0.05 s (the default 1 s
//! makes the start take 10 to 12 s instead of 2 to 4). Every `ceph`/`rbd` call runs under
//! `timeout`: commands a manager would serve hang without one. Readiness is polled with
//! `ceph osd dump` until the OSD is up; `rbd pool init` waits for the placement groups.
//!
//! One cluster serves a whole test binary ([`Cluster::shared`]); it is killed and its
//! directory removed when the process exits (`atexit`: a `static` is never dropped). Its
//! daemons are started from a thread that lives as long as the test process, with
//! `PR_SET_PDEATHSIG` = SIGKILL, so that they die with the process even when it is killed; a
//! [`Cluster`] that is dropped kills them itself. The memstore OSD gets SIGKILL, never SIGTERM (it writes its whole store out then).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The tools the cluster needs, for the tool rule.
pub const TOOLS: [&str; 6] = [
    "ceph-mon",
    "ceph-osd",
    "ceph",
    "rbd",
    "ceph-authtool",
    "monmaptool",
];

/// The pool every test image lives in.
pub const POOL: &str = "rbd";

/// A running one-node cluster.
pub struct Cluster {
    dir: tempfile::TempDir,
    /// The cluster's configuration file (monitor address, admin keyring).
    pub conf: PathBuf,
    /// The monitor's port on 127.0.0.1 (msgr v2).
    pub port: u16,
    /// `client.admin`'s key, base64, as Ceph prints it.
    pub admin_key: String,
    daemons: Mutex<Vec<Child>>,
}

/// Runs `program` under `timeout` (60 s, then SIGKILL); returns its output.
fn timed(program: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .args(["-k", "5", "60", program])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

fn checked(program: &str, args: &[&str]) -> Output {
    let out = timed(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Spawns the daemons from one thread that lives as long as the process: a child with
/// `PR_SET_PDEATHSIG` gets its signal when the thread that forked it ends.
fn spawn_daemon(mut cmd: Command) -> Child {
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
            // The test process ends with this thread parked here: keep it alive.
            loop {
                std::thread::park();
            }
        });
        Mutex::new(tx)
    });
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches only the child's own state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, tx))
        .expect("the spawner thread lives");
    rx.recv()
        .expect("the spawner answers")
        .expect("start a ceph daemon")
}

impl Cluster {
    /// The cluster of this test binary, started on first use; `None` (the tool rule) when
    /// Ceph is not installed.
    pub fn shared() -> Option<&'static Cluster> {
        if !crate::require_tools(&TOOLS) {
            return None;
        }
        static CLUSTER: OnceLock<Cluster> = OnceLock::new();
        /// At the process's exit (a `static` is never dropped): the daemons killed and
        /// reaped, the directory removed.
        extern "C" fn cleanup() {
            if let Some(c) = CLUSTER.get() {
                c.kill();
                let _ = std::fs::remove_dir_all(c.dir());
            }
        }
        Some(CLUSTER.get_or_init(|| {
            let c = Cluster::start();
            // SAFETY: registers a plain function without arguments.
            unsafe { libc::atexit(cleanup) };
            c
        }))
    }

    /// Starts a new cluster (2 to 4 s).
    pub fn start() -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("ceph-test")
            .tempdir()
            .expect("tempdir");
        let d = dir.path().to_path_buf();
        for sub in ["run", "log", "mon", "osd/ceph-0"] {
            std::fs::create_dir_all(d.join(sub)).expect("mkdir");
        }
        let fsid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").expect("uuid");
        let fsid = fsid.trim();
        let port = crate::free_port();
        let conf = d.join("ceph.conf");
        let p = |s: &str| d.join(s).to_string_lossy().into_owned();
        std::fs::write(
            &conf,
            format!(
                "[global]\n\
                 fsid = {fsid}\n\
                 mon host = v2:127.0.0.1:{port}\n\
                 auth cluster required = cephx\n\
                 auth service required = cephx\n\
                 auth client required = cephx\n\
                 keyring = {keyring}\n\
                 run dir = {run}\n\
                 admin socket = {run}/$name.$pid.asok\n\
                 log file = {log}/$name.log\n\
                 log to stderr = false\n\
                 err to stderr = false\n\
                 mon data = {mon}/$cluster-$id\n\
                 osd data = {osd}/$cluster-$id\n\
                 osd objectstore = memstore\n\
                 memstore device bytes = 2147483648\n\
                 osd pool default size = 1\n\
                 osd pool default min size = 1\n\
                 osd pool default pg num = 8\n\
                 osd pool default pgp num = 8\n\
                 osd crush chooseleaf type = 0\n\
                 mon allow pool size one = true\n\
                 mon warn on pool no redundancy = false\n\
                 paxos propose interval = 0.05\n\
                 ms bind ipv6 = false\n\
                 osd max object name len = 256\n\
                 osd max object namespace len = 64\n\
                 [osd]\n\
                 keyring = {osd}/$cluster-$id/keyring\n",
                keyring = p("keyring"),
                run = p("run"),
                log = p("log"),
                mon = p("mon"),
                osd = p("osd"),
            ),
        )
        .expect("write ceph.conf");
        let c = conf.to_string_lossy().into_owned();
        let keyring = p("keyring");
        checked(
            "ceph-authtool",
            &[
                "--create-keyring",
                &keyring,
                "--gen-key",
                "-n",
                "mon.",
                "--cap",
                "mon",
                "allow *",
            ],
        );
        checked(
            "ceph-authtool",
            &[
                &keyring,
                "--gen-key",
                "-n",
                "client.admin",
                "--cap",
                "mon",
                "allow *",
                "--cap",
                "osd",
                "allow *",
                "--cap",
                "mgr",
                "allow *",
            ],
        );
        let monmap = p("monmap");
        checked(
            "monmaptool",
            &[
                "--create",
                "--addv",
                "a",
                &format!("[v2:127.0.0.1:{port}]"),
                "--fsid",
                fsid,
                &monmap,
            ],
        );
        checked(
            "ceph-mon",
            &[
                "-c",
                &c,
                "--mkfs",
                "-i",
                "a",
                "--monmap",
                &monmap,
                "--keyring",
                &keyring,
            ],
        );
        let cluster = Cluster {
            conf,
            port,
            admin_key: String::new(),
            daemons: Mutex::new(Vec::new()),
            dir,
        };
        cluster.spawn("ceph-mon", &["-c", &c, "-i", "a", "-f"]);
        let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").expect("uuid");
        let id = cluster.ceph(&["osd", "new", uuid.trim()]);
        assert_eq!(id.trim(), "0", "the first OSD's id");
        let osd_keyring = p("osd/ceph-0/keyring");
        cluster.ceph(&[
            "auth",
            "get-or-create",
            "osd.0",
            "mon",
            "allow profile osd",
            "osd",
            "allow *",
            "-o",
            &osd_keyring,
        ]);
        checked(
            "ceph-osd",
            &["-c", &c, "-i", "0", "--mkfs", "--osd-uuid", uuid.trim()],
        );
        cluster.spawn("ceph-osd", &["-c", &c, "-i", "0", "-f"]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cluster.ceph(&["osd", "dump"]).contains("\nosd.0 up") {
            assert!(Instant::now() < deadline, "the OSD never came up");
            // Between polls of the condition, not instead of it.
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster.ceph(&["osd", "pool", "create", POOL, "8"]);
        cluster.rbd(&["pool", "init", POOL]);
        let mut cluster = cluster;
        cluster.admin_key = cluster
            .ceph(&["auth", "print-key", "client.admin"])
            .trim()
            .to_string();
        cluster
    }

    fn spawn(&self, program: &str, args: &[&str]) {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = spawn_daemon(cmd);
        self.daemons
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child);
    }

    fn conf_str(&self) -> String {
        self.conf.to_string_lossy().into_owned()
    }

    /// Runs `ceph ARGS` (with this cluster's configuration and a timeout), which must
    /// succeed; returns its stdout.
    pub fn ceph(&self, args: &[&str]) -> String {
        let c = self.conf_str();
        let all: Vec<&str> = ["-c", c.as_str()]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        String::from_utf8_lossy(&checked("ceph", &all).stdout).into_owned()
    }

    /// Runs `rbd ARGS` (with this cluster's configuration and a timeout), which must
    /// succeed; returns its stdout.
    pub fn rbd(&self, args: &[&str]) -> String {
        let c = self.conf_str();
        let all: Vec<&str> = ["-c", c.as_str()]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        String::from_utf8_lossy(&checked("rbd", &all).stdout).into_owned()
    }

    /// Creates an image of `size` bytes with a name unique in this process, in [`POOL`];
    /// returns its name.
    pub fn create_image(&self, prefix: &str, size: u64) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.rbd(&[
            "create",
            "--size",
            &format!("{size}B"),
            &format!("{POOL}/{name}"),
        ]);
        name
    }

    /// The image's (or `image@snap`'s) bytes, by `rbd export`.
    pub fn export(&self, image: &str) -> Vec<u8> {
        let path = self.path(&format!("export-{}", image.replace('@', "-at-")));
        let _ = std::fs::remove_file(&path);
        let p = path.to_string_lossy().into_owned();
        self.rbd(&["export", "--no-progress", &format!("{POOL}/{image}"), &p]);
        let data = std::fs::read(&path).expect("read the export");
        let _ = std::fs::remove_file(&path);
        data
    }

    /// `rbd diff` of the image: the allocated extents as (offset, length), adjacent ones
    /// merged.
    pub fn diff(&self, image: &str) -> Vec<(u64, u64)> {
        let out = self.rbd(&["diff", "--format", "json", &format!("{POOL}/{image}")]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("rbd diff json");
        let mut extents: Vec<(u64, u64)> = Vec::new();
        for e in v.as_array().expect("a list") {
            if !(e["exists"] == "true" || e["exists"] == true) {
                continue;
            }
            let (off, len) = (
                e["offset"].as_u64().expect("offset"),
                e["length"].as_u64().expect("length"),
            );
            match extents.last_mut() {
                Some(last) if last.0 + last.1 == off => last.1 += len,
                _ => extents.push((off, len)),
            }
        }
        extents
    }

    /// The image's size by `rbd info`.
    pub fn size(&self, image: &str) -> u64 {
        let out = self.rbd(&["info", "--format", "json", &format!("{POOL}/{image}")]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("rbd info json");
        v["size"].as_u64().expect("size")
    }

    /// A path inside the cluster's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The cluster's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Cluster {
    /// Kills the daemons (SIGKILL: the memstore OSD writes its whole store out on SIGTERM)
    /// and reaps them: the cluster stops answering, as one that went away.
    pub fn kill(&self) {
        let mut daemons = self.daemons.lock().unwrap_or_else(|e| e.into_inner());
        for mut child in daemons.drain(..).rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill();
    }
}
