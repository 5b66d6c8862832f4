//! The `nbd` driver, end to end: blockexportd as a gateway in front of a real NBD server
//! (qemu-nbd, nbdkit's `memory` and `file` plugins, qemu-storage-daemon, and blockexportd
//! itself), re-serving the remote export over its own NBD server. Real clients (libnbd
//! through `random_ops.py`, qemu-io, qemu-img) check every byte through the gateway against
//! a model and against the origin server; block status, TLS with x509 certificates,
//! reconnection and QSD's options and errors are checked too.

use blockexportd_tests::{
    qemu_img_create, qemu_io, require_python_nbd, require_tools, run_ok, Daemon, Flavor, Pki,
};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Not a multiple of 4 KiB: the tail is reached through the gateway too.
const SIZE: u64 = (4 << 20) - 3584;

/// Waits until a unix socket accepts connections (the server is up), failing after 20 s or
/// when `child` exits.
fn wait_for_socket(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the server exited ({status}) before listening on {}",
                path.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} never listened",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// An NBD server that the gateway connects to.
struct Origin {
    child: Option<Child>,
    daemon: Option<Daemon>,
    sock: PathBuf,
    export: &'static str,
}

impl Origin {
    fn uri(&self) -> String {
        format!("nbd+unix:///{}?socket={}", self.export, self.sock.display())
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_server(mut cmd: Command, sock: &Path) -> Child {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the NBD server");
    wait_for_socket(sock, &mut child);
    child
}

fn qemu_nbd(image: &Path, sock: &Path, extra: &[&str]) -> Child {
    let mut cmd = Command::new("qemu-nbd");
    cmd.args([
        "-t",
        "--shared=16",
        "-f",
        "raw",
        "-x",
        "disk",
        "--cache=writeback",
        "--discard=unmap",
    ])
    .args(extra)
    .arg("-k")
    .arg(sock)
    .arg(image);
    spawn_server(cmd, sock)
}

/// qemu-nbd serving `image` as `disk` on `sock`.
fn qemu_nbd_origin(image: &Path, sock: &Path, extra: &[&str]) -> Origin {
    Origin {
        child: Some(qemu_nbd(image, sock, extra)),
        daemon: None,
        sock: sock.to_path_buf(),
        export: "disk",
    }
}

/// The origins: which server, over a raw image (or nbdkit's memory) of [`SIZE`] bytes.
#[derive(Debug, Clone, Copy)]
enum Server {
    QemuNbd,
    NbdkitMemory,
    NbdkitFile,
    Qsd,
    Ours,
}

const SERVERS: [Server; 5] = [
    Server::QemuNbd,
    Server::NbdkitMemory,
    Server::NbdkitFile,
    Server::Qsd,
    Server::Ours,
];

fn start_origin(server: Server, dir: &Path) -> Origin {
    let image = dir.join("origin.raw");
    qemu_img_create(&image, "raw", &SIZE.to_string());
    let sock = dir.join("origin.sock");
    let mut origin = Origin {
        child: None,
        daemon: None,
        sock: sock.clone(),
        export: "disk",
    };
    match server {
        Server::QemuNbd => origin.child = Some(qemu_nbd(&image, &sock, &[])),
        Server::NbdkitMemory | Server::NbdkitFile => {
            let mut cmd = Command::new("nbdkit");
            cmd.args(["--foreground", "--exit-with-parent", "-e", "disk", "-U"])
                .arg(&sock);
            match server {
                Server::NbdkitMemory => cmd.args(["memory", &format!("size={SIZE}")]),
                _ => cmd.arg("file").arg(&image),
            };
            origin.child = Some(spawn_server(cmd, &sock));
        }
        Server::Qsd | Server::Ours => {
            let flavor = if matches!(server, Server::Qsd) {
                Flavor::Qsd
            } else {
                Flavor::Blockexportd
            };
            let blockdev = format!("driver=file,filename={},node-name=f", image.display());
            let nbd = format!("addr.type=unix,addr.path={}", sock.display());
            origin.daemon = Some(Daemon::start_flavor(
                flavor,
                &[
                    "--blockdev",
                    &blockdev,
                    "--nbd-server",
                    &nbd,
                    "--export",
                    "type=nbd,id=e,node-name=f,name=disk,writable=on",
                ],
            ));
        }
    }
    origin
}

/// The gateway: blockexportd with an `nbd` node on `origin`, exported again as `gw` on its
/// own socket. `extra` adds options to the node.
fn gateway(origin: &Origin, extra: &str, args: &[&str]) -> (Daemon, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = dir.path().join("gw.sock");
    let blockdev = format!(
        "driver=nbd,node-name=remote,server.type=unix,server.path={},export={}{extra}",
        origin.sock.display(),
        origin.export
    );
    let nbd = format!("addr.type=unix,addr.path={}", gw.display());
    let mut argv = args.to_vec();
    argv.extend([
        "--blockdev",
        &blockdev,
        "--nbd-server",
        &nbd,
        "--export",
        "type=nbd,id=gw,node-name=remote,name=gw,writable=on",
    ]);
    let d = Daemon::start_in(Flavor::Blockexportd, dir, &argv);
    let uri = format!("nbd+unix:///gw?socket={}", gw.display());
    (d, uri)
}

/// Starts `d`'s NBD server on a unix socket in its directory and exports `node` as `g`;
/// returns the export's URI.
fn serve(q: &mut blockexportd_tests::Qmp, d: &Daemon, node: &str, writable: bool) -> String {
    let sock = d.path("g.sock");
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock.display().to_string()}}}),
    );
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "g", "node-name": node, "name": "g", "writable": writable}),
    );
    format!("nbd+unix:///g?socket={}", sock.display())
}

/// libnbd's random batches (writes, write-zeroes with and without fast-zero, trims, reads,
/// flushes, all in flight at once) through the gateway, every read checked against the
/// model, then the origin's content compared with the model: on every server.
#[test]
fn random_ops_through_the_gateway_match_the_model_on_every_server() {
    if !require_tools(&["qemu-img", "qemu-nbd", "nbdkit", "qemu-storage-daemon"])
        || !require_python_nbd()
    {
        return;
    }
    let seed = blockexportd_tests::model::seed_from_env("NBD_CLIENT_SEED");
    let batches = blockexportd_tests::model::count_from_env("NBD_CLIENT_BATCHES", 40);
    eprintln!("nbd client random ops: NBD_CLIENT_SEED={seed}");
    for (i, server) in SERVERS.into_iter().enumerate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let origin = start_origin(server, dir.path());
        let (mut gw, uri) = gateway(&origin, "", &[]);
        let model_in = dir.path().join("model-in.raw");
        let model_out = dir.path().join("model-out.raw");
        std::fs::write(&model_in, vec![0u8; SIZE as usize]).expect("model");
        let run_seed = seed.wrapping_add(i as u64);
        let out = Command::new("/usr/bin/python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("random_ops.py"))
            .arg(&uri)
            .arg(run_seed.to_string())
            .arg(batches.to_string())
            .arg("4096")
            .arg(&model_in)
            .arg(&model_out)
            .output()
            .expect("run random_ops.py");
        assert!(
            out.status.success(),
            "{server:?} (NBD_CLIENT_SEED={run_seed}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let exit = gw.terminate();
        assert!(exit.status.success(), "{server:?}: gateway exit {exit:?}");
        assert!(
            exit.stderr.is_empty(),
            "{server:?}: the gateway printed {}",
            String::from_utf8_lossy(&exit.stderr)
        );
        // What reached the origin, read straight from it.
        let out = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&model_out)
            .arg(origin.uri())
            .output()
            .expect("qemu-img compare");
        assert!(
            out.status.success(),
            "{server:?}: the origin differs from the model: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn map(uri: &str) -> Vec<(u64, u64, bool, bool)> {
    let out = run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", uri]));
    let v: Value = serde_json::from_slice(&out.stdout).expect("map json");
    // Merge neighbours with the same status (servers split extents differently).
    let mut extents: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in v.as_array().expect("array") {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let (data, zero) = (e["data"].as_bool().unwrap(), e["zero"].as_bool().unwrap());
        match extents.last_mut() {
            Some(last) if last.2 == data && last.3 == zero && last.0 + last.1 == start => {
                last.1 += len
            }
            _ => extents.push((start, len, data, zero)),
        }
    }
    extents
}

/// A server that allows multi-conn gets several connections, and the data is right
/// whichever carries it (a flush on one covers the writes of all: the multi-conn promise).
#[test]
fn several_connections_to_a_multi_conn_server() {
    if !require_tools(&["nbdkit", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("origin.sock");
    let log = dir.path().join("nbdkit.log");
    let mut cmd = Command::new("nbdkit");
    cmd.args(["--foreground", "--exit-with-parent", "-e", "disk", "-U"])
        .arg(&sock)
        .args(["--filter=log", "memory", "size=16M"])
        .arg(format!("logfile={}", log.display()));
    let origin = Origin {
        child: Some(spawn_server(cmd, &sock)),
        daemon: None,
        sock,
        export: "disk",
    };
    let (gw, uri) = gateway(&origin, "", &[]);
    qemu_io(
        &["-f", "raw", &uri],
        &[
            "aio_write -P 0x21 0 1M",
            "aio_write -P 0x22 1M 1M",
            "aio_write -P 0x23 2M 1M",
            "aio_write -P 0x24 3M 1M",
            "aio_flush",
            "read -P 0x21 0 1M",
            "read -P 0x22 1M 1M",
            "read -P 0x23 2M 1M",
            "read -P 0x24 3M 1M",
        ],
    );
    let text = std::fs::read_to_string(&log).expect("nbdkit's log");
    let connects = text.lines().filter(|l| l.contains(" Connect ")).count();
    // qemu-io's own connection to the gateway is not nbdkit's: these are the gateway's.
    assert_eq!(connects, 4, "the gateway opened 4 connections: {text}");
    let used = (1..=4)
        .filter(|i| text.contains(&format!("connection={i} Write")))
        .count();
    assert!(used > 1, "writes went over several connections: {text}");
    drop(gw);
    qemu_io(&["-f", "raw", "-r", &origin.uri()], &["read -P 0x24 3M 1M"]);
}

/// Block status through the gateway is the origin's: data, holes and zeroes where they are;
/// discard and write-zeroes through the gateway reach the origin's file.
#[test]
fn block_status_and_holes_pass_through() {
    if !require_tools(&["qemu-img", "qemu-io", "qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("origin.raw");
    qemu_img_create(&image, "raw", "8M");
    qemu_io(
        &["-f", "raw", image.to_str().unwrap()],
        &["write -P 0x5a 1M 64k", "write -P 0x33 5M 1M"],
    );
    let sock = dir.path().join("origin.sock");
    let origin = qemu_nbd_origin(&image, &sock, &[]);
    let (gw, uri) = gateway(&origin, ",discard=unmap", &[]);
    assert_eq!(
        map(&uri),
        map(&origin.uri()),
        "block status through the gateway"
    );
    assert!(map(&uri).iter().any(|e| e.2), "some data");
    assert!(map(&uri).iter().any(|e| !e.2), "some holes");

    // Discard and write-zeroes that may unmap punch holes in the origin's file; a
    // write-zeroes without unmap leaves zeroes that read back.
    qemu_io(
        &["-f", "raw", &uri],
        &[
            "discard 5M 512k",
            "write -z -u 5632k 256k",
            "write -z 1M 4k",
            "read -P 0 1M 4k",
            "read -P 0x5a 1028k 60k",
            "read -P 0x33 5888k 256k",
        ],
    );
    drop(gw);
    let file_map = map(image.to_str().unwrap());
    let data_at = |off: u64| {
        file_map
            .iter()
            .find(|e| e.0 <= off && off < e.0 + e.1)
            .map(|e| e.2)
            .expect("covered")
    };
    assert!(!data_at(5 << 20), "discard reached the file: {file_map:?}");
    assert!(
        !data_at(5632 << 10),
        "write-zeroes with unmap punched: {file_map:?}"
    );
    assert!(data_at(5888 << 10), "the rest stays: {file_map:?}");
    qemu_io(
        &["-f", "raw", "-r", image.to_str().unwrap()],
        &[
            "read -P 0 1M 4k",
            "read -P 0x5a 1028k 60k",
            "read -P 0 5M 768k",
        ],
    );
}

/// TLS with x509 certificates: the gateway is a TLS client of qemu-nbd; the wrong CA is
/// refused with a clear error.
#[test]
fn tls_to_the_origin_with_x509_certificates() {
    if !require_tools(&["certtool", "qemu-img", "qemu-io", "qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::create(dir.path());
    let image = dir.path().join("origin.raw");
    qemu_img_create(&image, "raw", "8M");
    qemu_io(
        &["-f", "raw", image.to_str().unwrap()],
        &["write -P 0x71 2M 1M"],
    );
    let port = blockexportd_tests::free_port().to_string();
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=server,dir={}",
        pki.server.display()
    );
    let mut cmd = Command::new("qemu-nbd");
    cmd.args([
        "-t",
        "--shared=16",
        "-f",
        "raw",
        "-x",
        "disk",
        "--object",
        &object,
        "--tls-creds",
        "tls0",
    ])
    .args(["-b", "127.0.0.1", "-p", &port])
    .arg(&image);
    let mut child = cmd.stdin(Stdio::null()).spawn().expect("qemu-nbd");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "qemu-nbd exited");
        assert!(Instant::now() < deadline, "qemu-nbd never listened");
        std::thread::sleep(Duration::from_millis(5));
    }
    let _origin = Origin {
        child: Some(child),
        daemon: None,
        sock: PathBuf::new(),
        export: "disk",
    };

    let gw_dir = tempfile::tempdir().expect("tempdir");
    let gw_sock = gw_dir.path().join("gw.sock");
    let client = format!(
        "tls-creds-x509,id=c0,endpoint=client,dir={}",
        pki.client.display()
    );
    let blockdev = format!(
        "driver=nbd,node-name=remote,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk,tls-creds=c0"
    );
    let nbd = format!("addr.type=unix,addr.path={}", gw_sock.display());
    let d = Daemon::start_in(
        Flavor::Blockexportd,
        gw_dir,
        &[
            "--object",
            &client,
            "--blockdev",
            &blockdev,
            "--nbd-server",
            &nbd,
            "--export",
            "type=nbd,id=gw,node-name=remote,name=gw,writable=on",
        ],
    );
    let uri = format!("nbd+unix:///gw?socket={}", gw_sock.display());
    qemu_io(
        &["-f", "raw", &uri],
        &[
            "read -P 0x71 2M 1M",
            "read -P 0 0 2M",
            "write -P 0x72 7M 512k",
            "flush",
        ],
    );
    drop(d);
    qemu_io(
        &["-f", "raw", "-r", image.to_str().unwrap()],
        &["read -P 0x72 7M 512k", "read -P 0x71 2M 1M"],
    );

    // Our own server and QSD over TLS on unix sockets, without tls-hostname: the chain is
    // checked (the name is not, as QEMU's client does), the data goes through.
    for flavor in [Flavor::Blockexportd, Flavor::Qsd] {
        let odir = tempfile::tempdir().expect("tempdir");
        let oimage = odir.path().join("o.raw");
        qemu_img_create(&oimage, "raw", "4M");
        let osock = odir.path().join("o.sock");
        let server_obj = format!(
            "tls-creds-x509,id=t,endpoint=server,dir={}",
            pki.server.display()
        );
        let blockdev = format!("driver=file,filename={},node-name=f", oimage.display());
        let nbd = format!("addr.type=unix,addr.path={},tls-creds=t", osock.display());
        let o = Daemon::start_in(
            flavor,
            odir,
            &[
                "--object",
                &server_obj,
                "--blockdev",
                &blockdev,
                "--nbd-server",
                &nbd,
                "--export",
                "type=nbd,id=e,node-name=f,name=disk,writable=on",
            ],
        );
        let gw = Daemon::start(&["--object", &client]);
        let mut q = gw.qmp();
        q.ok(
            "blockdev-add",
            json!({"driver": "nbd", "node-name": "r", "export": "disk", "tls-creds": "c0",
                   "server": {"type": "unix", "path": osock.display().to_string()}}),
        );
        let guri = serve(&mut q, &gw, "r", true);
        qemu_io(
            &["-f", "raw", &guri],
            &[
                "write -P 0x5c 1M 256k",
                "read -P 0x5c 1M 256k",
                "read -P 0 0 1M",
            ],
        );
        // Plaintext to a TLS server: the server's refusal, in QEMU's words.
        let (_, desc) = q.err(
            "blockdev-add",
            json!({"driver": "nbd", "node-name": "p", "export": "disk",
                   "server": {"type": "unix", "path": osock.display().to_string()}}),
        );
        assert!(
            desc.starts_with("TLS negotiation required before option"),
            "{desc}"
        );
        drop(gw);
        qemu_io(
            &["-f", "raw", "-r", "-U", oimage.to_str().unwrap()],
            &["read -P 0x5c 1M 256k"],
        );
        drop(o);
    }

    // A client that trusts another CA: the server's certificate is refused.
    let wrong = dir.path().join("wrong-ca");
    std::fs::create_dir_all(&wrong).unwrap();
    std::fs::copy(
        dir.path().join("pki-work/otherca-cert.pem"),
        wrong.join("ca-cert.pem"),
    )
    .unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(pki.foreign_client.join(f), wrong.join(f)).unwrap();
    }
    let d = Daemon::start(&[]);
    let mut q = d.qmp();
    let foreign = format!("{}", wrong.display());
    q.ok(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "bad", "endpoint": "client", "dir": foreign}),
    );
    let (class, desc) = q.err(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "n", "export": "disk", "tls-creds": "bad",
               "server": {"type": "inet", "host": "127.0.0.1", "port": port}}),
    );
    assert_eq!(class, "GenericError");
    assert!(desc.contains("TLS handshake failed"), "{desc}");
    // A server name the certificate does not carry.
    q.ok(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "good", "endpoint": "client",
               "dir": pki.client.display().to_string()}),
    );
    let (_, desc) = q.err(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "n", "export": "disk", "tls-creds": "good",
               "tls-hostname": "elsewhere.example",
               "server": {"type": "inet", "host": "127.0.0.1", "port": port}}),
    );
    assert!(desc.contains("TLS handshake failed"), "{desc}");
    // Server credentials where client ones are needed, and a missing object: QEMU's words.
    let (_, desc) = q.err(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "n", "tls-creds": "nope",
               "server": {"type": "inet", "host": "127.0.0.1", "port": port}}),
    );
    assert_eq!(desc, "No TLS credentials with id 'nope'");
}

/// The origin goes away and comes back: within `reconnect-delay` the gateway's clients see
/// nothing but a pause (their requests are sent again on the new connection); after it,
/// requests fail with EIO until the server is back, and then work again.
#[test]
fn reconnects_within_the_delay_and_fails_after_it() {
    if !require_tools(&["qemu-img", "qemu-io", "qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("origin.raw");
    qemu_img_create(&image, "raw", "8M");
    qemu_io(
        &["-f", "raw", image.to_str().unwrap()],
        &["write -P 0x44 0 1M"],
    );
    let sock = dir.path().join("origin.sock");
    let mut origin = qemu_nbd_origin(&image, &sock, &[]);
    let (gw, uri) = gateway(&origin, ",reconnect-delay=30", &[]);
    qemu_io(&["-f", "raw", &uri], &["read -P 0x44 0 1M"]);

    // The server dies; a client of the gateway reads and writes meanwhile.
    let mut c = origin.child.take().unwrap();
    c.kill().unwrap();
    c.wait().unwrap();
    let _ = std::fs::remove_file(&sock);
    let client = {
        let uri = uri.clone();
        std::thread::spawn(move || {
            qemu_io(
                &["-f", "raw", &uri],
                &[
                    "write -P 0x45 2M 64k",
                    "read -P 0x44 0 1M",
                    "read -P 0x45 2M 64k",
                ],
            )
        })
    };
    // The client waits (its requests pause); the server comes back on the same socket.
    origin.child = Some(qemu_nbd(&image, &sock, &[]));
    client
        .join()
        .expect("the client got its data after the reconnection");
    qemu_io(
        &["-f", "raw", "-r", image.to_str().unwrap()],
        &["read -P 0x45 2M 64k"],
    );
    drop(gw);

    // reconnect-delay=1: after a second, requests fail at once; the node recovers when the
    // server is back.
    let (gw, uri) = gateway(&origin, ",reconnect-delay=1", &[]);
    let mut c = origin.child.take().unwrap();
    c.kill().unwrap();
    c.wait().unwrap();
    let _ = std::fs::remove_file(&sock);
    let started = Instant::now();
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "read 0 4k"])
        .output()
        .expect("qemu-io");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("Input/output error"),
        "a read with the server gone past the delay fails with EIO: {text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "bounded by the delay"
    );
    origin.child = Some(qemu_nbd(&image, &sock, &[]));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new("qemu-io")
            .args(["-f", "raw", &uri, "-c", "read -P 0x44 0 64k"])
            .output()
            .expect("qemu-io");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && !text.contains("failed") && !text.contains("error") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node never recovered: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(gw);
}

/// `open-timeout`: the server may come up after the node is added.
#[test]
fn open_timeout_waits_for_the_server() {
    if !require_tools(&["qemu-img", "qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("origin.raw");
    qemu_img_create(&image, "raw", "1M");
    let sock = dir.path().join("late.sock");
    let d = Daemon::start(&[]);
    let qmp_path = d.qmp_path.clone();
    let args = json!({"driver": "nbd", "node-name": "late", "export": "disk", "open-timeout": 30,
                      "server": {"type": "unix", "path": sock.display().to_string()}});
    let adder = std::thread::spawn(move || {
        let mut q = blockexportd_tests::Qmp::connect(&qmp_path);
        q.ok("qmp_capabilities", json!({}));
        q.execute("blockdev-add", args)
    });
    // The command waits for the server; start it, then the node opens.
    let child = qemu_nbd(&image, &sock, &[]);
    let _origin = Origin {
        child: Some(child),
        daemon: None,
        sock,
        export: "disk",
    };
    let r = adder.join().unwrap();
    assert_eq!(r, json!({"return": {}}));
    let mut q = d.qmp();
    let nodes = q.ok("query-named-block-nodes", json!({"flat": true}));
    let node = &nodes.as_array().unwrap()[0];
    assert_eq!(node["drv"], "nbd");
    assert_eq!(node["image"]["virtual-size"], 1 << 20);
    // NBD cannot resize: as QSD, a smaller size is taken and changes nothing, a larger one
    // is refused.
    q.ok("block_resize", json!({"node-name": "late", "size": 65536}));
    let (_, desc) = q.err(
        "block_resize",
        json!({"node-name": "late", "size": 2 << 20}),
    );
    assert_eq!(desc, "Cannot grow NBD nodes");
    let nodes = q.ok("query-named-block-nodes", json!({"flat": true}));
    assert_eq!(nodes[0]["image"]["virtual-size"], 1 << 20);
}

/// QSD's options and messages: the same answers for the same mistakes, and the same node
/// facts.
#[test]
fn options_errors_and_node_facts_as_qsd() {
    if !require_tools(&["qemu-img", "qemu-nbd", "qemu-storage-daemon"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("origin.raw");
    qemu_img_create(&image, "raw", "1M");
    let sock = dir.path().join("origin.sock");
    let _origin = qemu_nbd_origin(&image, &sock, &[]);
    let ro_sock = dir.path().join("ro.sock");
    let _ro = qemu_nbd_origin(&image, &ro_sock, &["-r"]);
    let path = sock.display().to_string();
    let ro_path = ro_sock.display().to_string();
    let cases: Vec<(&str, Value)> = vec![
        (
            "good",
            json!({"server": {"type": "unix", "path": path}, "export": "disk"}),
        ),
        (
            "missing socket",
            json!({"server": {"type": "unix", "path": "/nonexistent/nbd.sock"}}),
        ),
        (
            "refused port",
            json!({"server": {"type": "inet", "host": "127.0.0.1", "port": "1"}}),
        ),
        (
            "missing export",
            json!({"server": {"type": "unix", "path": path}, "export": "nope"}),
        ),
        ("no server", json!({"export": "disk"})),
        (
            "bad delay",
            json!({"server": {"type": "unix", "path": path}, "reconnect-delay": -1}),
        ),
        (
            "unknown member",
            json!({"server": {"type": "unix", "path": path}, "exprot": "disk"}),
        ),
        (
            "auto-read-only",
            json!({"server": {"type": "unix", "path": ro_path}, "export": "disk",
                                   "auto-read-only": true}),
        ),
        (
            "read-only",
            json!({"server": {"type": "unix", "path": ro_path}, "export": "disk",
                              "read-only": true}),
        ),
    ];
    let mut answers: Vec<Vec<Value>> = Vec::new();
    for flavor in [Flavor::Blockexportd, Flavor::Qsd] {
        let d = Daemon::start_flavor(flavor, &[]);
        let mut q = d.qmp();
        let mut mine = Vec::new();
        for (i, (what, args)) in cases.iter().enumerate() {
            let mut args = args.clone();
            args["driver"] = json!("nbd");
            args["node-name"] = json!(format!("n{i}"));
            let r = q.execute("blockdev-add", args);
            let r = match r.get("error") {
                Some(e) => json!({"case": what, "error": e["desc"]}),
                None => {
                    let nodes = q.ok("query-named-block-nodes", json!({"flat": true}));
                    let node = nodes
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|n| n["node-name"] == format!("n{i}"))
                        .cloned()
                        .expect("the node");
                    json!({"case": what, "drv": node["drv"], "ro": node["ro"], "file": node["file"],
                           "size": node["image"]["virtual-size"], "format": node["image"]["format"]})
                }
            };
            mine.push(r);
        }
        answers.push(mine);
    }
    for (ours, qsd) in answers[0].iter().zip(&answers[1]) {
        assert_eq!(
            ours, qsd,
            "blockexportd and qemu-storage-daemon answer alike"
        );
    }

    // A read-only export opened writable: QSD says "Could not open image: Permission
    // denied"; the reason is ours.
    let d = Daemon::start(&[]);
    let mut q = d.qmp();
    let (class, desc) = q.err(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "w", "export": "disk",
               "server": {"type": "unix", "path": ro_path}}),
    );
    assert_eq!(
        (class.as_str(), desc.as_str()),
        ("GenericError", "NBD export is read-only")
    );
}

/// `x-dirty-bitmap`: block status reports the named bitmap in place of allocation, as QEMU's
/// client does (dirty regions read as "not data"): the gateway answers as QSD's does.
#[test]
fn x_dirty_bitmap_reads_a_bitmap_as_qsd() {
    if !require_tools(&["qemu-img", "qemu-io", "qemu-storage-daemon"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("origin.qcow2");
    qemu_img_create(&image, "qcow2", "8M");
    let sock = dir.path().join("origin.sock");
    let blockdev = format!(
        "driver=qcow2,node-name=q,file.driver=file,file.filename={}",
        image.display()
    );
    let nbd = format!("addr.type=unix,addr.path={}", sock.display());
    let o = Daemon::start(&["--blockdev", &blockdev, "--nbd-server", &nbd]);
    let mut q = o.qmp();
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "q", "name": "b0", "granularity": 65536}),
    );
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "w", "node-name": "q", "name": "w", "writable": true}),
    );
    let wuri = format!("nbd+unix:///w?socket={}", sock.display());
    qemu_io(
        &["-f", "raw", &wuri],
        &["write -P 1 1M 64k", "write -P 2 5M 128k"],
    );
    q.ok(
        "block-dirty-bitmap-disable",
        json!({"node": "q", "name": "b0"}),
    );
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "q", "name": "disk", "bitmaps": ["b0"]}),
    );
    let origin = Origin {
        child: None,
        daemon: Some(o),
        sock,
        export: "disk",
    };
    let mut maps = Vec::new();
    for flavor in [Flavor::Blockexportd, Flavor::Qsd] {
        let gdir = tempfile::tempdir().expect("tempdir");
        let gsock = gdir.path().join("g.sock");
        let blockdev = format!(
            "driver=nbd,node-name=r,server.type=unix,server.path={},export=disk,read-only=on,x-dirty-bitmap=qemu:dirty-bitmap:b0",
            origin.sock.display()
        );
        let nbd = format!("addr.type=unix,addr.path={}", gsock.display());
        let g = Daemon::start_in(
            flavor,
            gdir,
            &[
                "--blockdev",
                &blockdev,
                "--nbd-server",
                &nbd,
                "--export",
                "type=nbd,id=g,node-name=r,name=g",
            ],
        );
        maps.push(map(&format!("nbd+unix:///g?socket={}", gsock.display())));
        drop(g);
    }
    assert_eq!(maps[0], maps[1], "our gateway's map and QSD's");
    let dirty: Vec<_> = maps[0]
        .iter()
        .filter(|e| !e.2)
        .map(|e| (e.0, e.1))
        .collect();
    assert_eq!(
        dirty,
        [(1 << 20, 65536), (5 << 20, 131072)],
        "{:?}",
        maps[0]
    );
}

/// A server that breaks the protocol (a reply with a cookie never sent): the request fails
/// with EIO, the daemon lives on and says why, and the node is not reconnected to it.
#[test]
fn a_server_breaking_the_protocol_fails_requests_not_the_daemon() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("bad.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut hello = Vec::new();
        hello.extend_from_slice(b"NBDMAGIC");
        hello.extend_from_slice(b"IHAVEOPT");
        hello.extend_from_slice(&3u16.to_be_bytes()); // fixed newstyle, no zeroes
        s.write_all(&hello).unwrap();
        let mut flags = [0u8; 4];
        s.read_exact(&mut flags).unwrap();
        let reply = |s: &mut std::os::unix::net::UnixStream, opt: u32, ty: u32, data: &[u8]| {
            let mut r = Vec::new();
            r.extend_from_slice(&0x0003_e889_0455_65a9u64.to_be_bytes());
            r.extend_from_slice(&opt.to_be_bytes());
            r.extend_from_slice(&ty.to_be_bytes());
            r.extend_from_slice(&(data.len() as u32).to_be_bytes());
            r.extend_from_slice(data);
            s.write_all(&r).unwrap();
        };
        loop {
            let mut h = [0u8; 16];
            s.read_exact(&mut h).unwrap();
            let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).unwrap();
            if opt == 7 {
                // NBD_OPT_GO: NBD_INFO_EXPORT (1 MiB, HAS_FLAGS | SEND_FLUSH), then ACK.
                let mut info = 0u16.to_be_bytes().to_vec();
                info.extend_from_slice(&(1u64 << 20).to_be_bytes());
                info.extend_from_slice(&5u16.to_be_bytes());
                reply(&mut s, 7, 3, &info);
                reply(&mut s, 7, 1, &[]);
                break;
            }
            reply(&mut s, opt, (1 << 31) + 1, &[]); // NBD_REP_ERR_UNSUP
        }
        // The first request gets a simple reply with a cookie it never had.
        let mut req = [0u8; 28];
        s.read_exact(&mut req).unwrap();
        let mut r = 0x6744_6698u32.to_be_bytes().to_vec();
        r.extend_from_slice(&0u32.to_be_bytes());
        r.extend_from_slice(&0xdead_beefu64.to_be_bytes());
        s.write_all(&r).unwrap();
        // The client hangs up.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    let mut d = Daemon::start(&[]);
    let mut q = d.qmp();
    q.ok(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "bad", "reconnect-delay": 30,
               "server": {"type": "unix", "path": sock.display().to_string()}}),
    );
    let guri = serve(&mut q, &d, "bad", false);
    for _ in 0..2 {
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-r", &guri, "-c", "read 0 4k"])
            .output()
            .expect("qemu-io");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(text.contains("Input/output error"), "{text}");
    }
    server.join().expect("the bad server");
    assert!(
        q.ok("query-version", json!({}))["qemu"].is_object(),
        "the daemon lives on"
    );
    let out = d.terminate();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("NBD server broke the protocol: reply with unexpected cookie"),
        "{stderr}"
    );
}
