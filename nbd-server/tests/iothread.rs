//! Exports with their own runtime (`ExportConfig::runtime`, QEMU's `iothread`): after the
//! handshake a client's connection moves there, and every call into the block layer runs on
//! that runtime's thread. The driver records the thread of each call; clients are a raw
//! client over unix and TCP sockets (in plaintext and TLS), a stream handed to
//! `serve_connection`, and qemu-io over TLS.

mod common;

use async_trait::async_trait;
use block_core::{BlockDriver, Extent, IoThread, Node, WriteFlags, ZeroFlags};
use common::*;
use nbd_server::{ExportConfig, NbdServer, RemoveMode, ServerConfig, TlsConfig};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MIB: u64 = 1 << 20;
/// The name of the export's runtime thread.
const IOTHREAD: &str = "iothread-test";
/// The name of the main runtime's threads (listeners, handshakes).
const MAIN: &str = "nbd-test-main";
/// A bound on waits that would otherwise hang a broken build forever (not a timing check).
const HANG: Duration = Duration::from_secs(20);

/// A [`MemDriver`] that reports the thread of every call.
#[derive(Debug)]
struct Recording {
    disk: Arc<MemDriver>,
    calls: Mutex<mpsc::Sender<String>>,
}

impl Recording {
    fn note(&self) {
        let name = std::thread::current()
            .name()
            .unwrap_or("<unnamed>")
            .to_string();
        let _ = self.calls.lock().unwrap().send(name);
    }
}

impl block_core::ImageFacts for Recording {
    fn driver_name(&self) -> &'static str {
        "recording"
    }
}

#[async_trait]
impl block_core::BlockIo for Recording {
    fn size(&self) -> u64 {
        self.disk.size()
    }

    fn read_only(&self) -> bool {
        self.disk.read_only()
    }

    async fn readv(&self, offset: u64, buf: &block_core::SgList) -> block_core::Result<()> {
        self.note();
        self.disk.readv(offset, buf).await
    }

    async fn writev(
        &self,
        offset: u64,
        buf: &block_core::SgList,
        flags: WriteFlags,
    ) -> block_core::Result<()> {
        self.note();
        self.disk.writev(offset, buf, flags).await
    }

    async fn flush(&self) -> block_core::Result<()> {
        self.note();
        self.disk.flush().await
    }

    async fn discard(&self, offset: u64, len: u64) -> block_core::Result<()> {
        self.note();
        self.disk.discard(offset, len).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> block_core::Result<()> {
        self.note();
        self.disk.write_zeroes(offset, len, flags).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> block_core::Result<Extent> {
        self.note();
        self.disk.block_status(offset, len).await
    }
}

#[async_trait]
impl BlockDriver for Recording {}

/// A server with one export `e` (4 MiB, writable), on a unix and a TCP listener, run by a
/// multi-thread runtime whose threads are named [`MAIN`]; with `on_iothread`, the export
/// runs in an [`IoThread`].
struct Fixture {
    server: NbdServer,
    disk: Arc<MemDriver>,
    node: Arc<Node>,
    calls: Mutex<mpsc::Receiver<String>>,
    socket: PathBuf,
    port: u16,
    // Dropped in this order: the iothread before the main runtime.
    iothread: Option<IoThread>,
    runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new(disk: MemDriver, on_iothread: bool, tls: Option<TlsConfig>) -> Fixture {
        Fixture::with_loops(disk, on_iothread, tls, 0)
    }

    /// As [`Fixture::new`], on a server with `event_loops` connection loops.
    fn with_loops(
        disk: MemDriver,
        on_iothread: bool,
        tls: Option<TlsConfig>,
        event_loops: usize,
    ) -> Fixture {
        let disk = Arc::new(disk);
        let (tx, calls) = mpsc::channel();
        let driver = Arc::new(Recording {
            disk: Arc::clone(&disk),
            calls: Mutex::new(tx),
        });
        let node = Node::new("n", driver as Arc<dyn BlockDriver>, Vec::new());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(MAIN)
            .enable_all()
            .build()
            .unwrap();
        let iothread = on_iothread.then(|| IoThread::spawn(IOTHREAD).unwrap());
        let server = NbdServer::new(ServerConfig::default().tls(tls).event_loops(event_loops));
        let mut export = ExportConfig::new("e", node.attach("export 'e'", true).unwrap());
        export.runtime = iothread.as_ref().map(|t| t.handle().clone());
        server.add_export(export).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let (unix, tcp) = {
            let _guard = runtime.enter();
            let unix = tokio::net::UnixListener::bind(&socket).unwrap();
            let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            tcp.set_nonblocking(true).unwrap();
            (unix, tokio::net::TcpListener::from_std(tcp).unwrap())
        };
        let port = tcp.local_addr().unwrap().port();
        let s = server.clone();
        runtime.spawn(async move { s.serve_unix(unix).await });
        let s = server.clone();
        runtime.spawn(async move { s.serve_tcp(tcp).await });
        Fixture {
            server,
            disk,
            node,
            calls: Mutex::new(calls),
            socket,
            port,
            iothread,
            runtime,
            _dir: dir,
        }
    }

    /// The threads of the driver calls since the last time asked.
    fn threads(&self) -> Vec<String> {
        self.calls.lock().unwrap().try_iter().collect()
    }

    /// A client socket (reads give up after [`HANG`] rather than block a broken test).
    fn unix(&self) -> std::os::unix::net::UnixStream {
        let s = std::os::unix::net::UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(HANG)).unwrap();
        s
    }

    /// A client socket (reads give up after [`HANG`]).
    fn tcp(&self) -> std::net::TcpStream {
        let s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(HANG)).unwrap();
        s
    }

    /// Shuts the main runtime down (listeners, handshakes, and everything still registered
    /// with its reactor), leaving a fresh one in its place.
    fn shut_main_down(&mut self) {
        let fresh = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        std::mem::replace(&mut self.runtime, fresh).shutdown_background();
    }

    /// Waits for `fut` on the main runtime, panicking if it never ends.
    fn wait<F: std::future::Future>(&self, fut: F) -> F::Output {
        self.runtime
            .block_on(async { tokio::time::timeout(HANG, fut).await })
            .expect("hung")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.server.stop();
    }
}

/// A minimal blocking NBD client on any byte stream: fixed newstyle, `NBD_OPT_GO`, simple
/// replies.
struct Client<S: Read + Write> {
    s: S,
}

impl<S: Read + Write> Client<S> {
    /// Greets, picks export `e`; returns the client and the export's size.
    fn connect(mut s: S) -> (Self, u64) {
        greet(&mut s);
        let size = go(&mut s);
        (Client { s }, size)
    }

    fn send(&mut self, ty: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut m = Vec::with_capacity(28 + payload.len());
        m.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&ty.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        self.s.write_all(&m).unwrap();
    }

    /// Reads a simple reply: (error, cookie).
    fn reply(&mut self) -> (u32, u64) {
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r).unwrap();
        assert_eq!(u32::from_be_bytes(r[..4].try_into().unwrap()), 0x6744_6698);
        (
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
            u64::from_be_bytes(r[8..16].try_into().unwrap()),
        )
    }

    /// Writes `data` at `offset` in 64 KiB requests, all sent before any reply is read.
    fn write(&mut self, offset: u64, data: &[u8]) {
        let chunks: Vec<_> = data.chunks(64 * 1024).collect();
        let mut at = offset;
        for (i, c) in chunks.iter().enumerate() {
            self.send(1, i as u64, at, c.len() as u32, c);
            at += c.len() as u64;
        }
        let mut cookies: Vec<u64> = (0..chunks.len())
            .map(|_| self.reply())
            .map(|(e, c)| {
                assert_eq!(e, 0, "write {c} failed");
                c
            })
            .collect();
        cookies.sort_unstable();
        assert_eq!(cookies, (0..chunks.len() as u64).collect::<Vec<_>>());
    }

    /// Reads `len` bytes at `offset` in one request.
    fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.send(0, 99, offset, len, &[]);
        assert_eq!(self.reply(), (0, 99));
        let mut data = vec![0; len as usize];
        self.s.read_exact(&mut data).unwrap();
        data
    }

    fn flush(&mut self) {
        self.send(3, 98, 0, 0, &[]);
        assert_eq!(self.reply(), (0, 98));
    }

    /// Sends `NBD_CMD_DISC` and checks that the server closes the connection.
    fn disconnect(mut self) {
        self.send(2, 97, 0, 0, &[]);
        self.expect_eof();
    }

    fn expect_eof(&mut self) {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("expected the connection closed, got {other:?}"),
        }
    }
}

/// Reads the greeting and sends the client flags.
fn greet(s: &mut (impl Read + Write)) {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    assert_eq!(
        u64::from_be_bytes(greeting[8..16].try_into().unwrap()),
        IHAVEOPT
    );
    // NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
    s.write_all(&3u32.to_be_bytes()).unwrap();
}

/// Sends option `opt` and reads its replies up to `NBD_REP_ACK`; returns the size of an
/// `NBD_INFO_EXPORT` reply if there was one.
fn option(s: &mut (impl Read + Write), opt: u32, data: &[u8]) -> Option<u64> {
    let mut m = Vec::new();
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).unwrap();
    let mut size = None;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            0x0003_e889_0455_65a9
        );
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut data = vec![0; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        s.read_exact(&mut data).unwrap();
        match ty {
            1 => return size, // NBD_REP_ACK
            3 if data[..2] == [0, 0] => {
                size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()))
            }
            3 => {}
            other => panic!("reply type {other:#x}: {}", String::from_utf8_lossy(&data)),
        }
    }
}

/// `NBD_OPT_GO` for export `e`; returns its size.
fn go(s: &mut (impl Read + Write)) -> u64 {
    // Name length, name, no information request.
    let mut data = 1u32.to_be_bytes().to_vec();
    data.extend_from_slice(b"e");
    data.extend_from_slice(&0u16.to_be_bytes());
    option(s, 7, &data).expect("no NBD_INFO_EXPORT")
}

/// Writes 1 MiB at 1 MiB, reads it back and flushes through `stream`; checks the data on the
/// wire and in the disk.
fn exchange<S: Read + Write>(f: &Fixture, stream: S, seed: u8) {
    let (mut c, size) = Client::connect(stream);
    assert_eq!(size, 4 * MIB);
    let data = pattern(MIB as usize, seed);
    c.write(MIB, &data);
    assert!(c.read(MIB, MIB as u32) == data, "read back differs");
    c.flush();
    c.disconnect();
    assert!(f.disk.contents()[MIB as usize..2 * MIB as usize] == data[..]);
}

/// Asserts that there were driver calls and that each ran on thread `name`.
fn assert_all_on(threads: &[String], name: &str) {
    assert!(!threads.is_empty(), "no driver call recorded");
    let elsewhere: Vec<_> = threads.iter().filter(|t| *t != name).collect();
    assert!(
        elsewhere.is_empty(),
        "{} of {} driver calls ran off {name}: {elsewhere:?}",
        elsewhere.len(),
        threads.len()
    );
}

#[test]
fn unix_and_tcp_clients_run_in_the_iothread() {
    let f = Fixture::new(MemDriver::new(4 * MIB), true, None);
    exchange(&f, f.unix(), 1);
    assert_all_on(&f.threads(), IOTHREAD);
    exchange(&f, f.tcp(), 2);
    assert_all_on(&f.threads(), IOTHREAD);
    assert!(f.node.users().len() == 1, "the export still holds the node");
}

#[test]
fn without_a_runtime_clients_run_where_they_were_accepted() {
    let f = Fixture::new(MemDriver::new(4 * MIB), false, None);
    exchange(&f, f.unix(), 3);
    assert_all_on(&f.threads(), MAIN);
    exchange(&f, f.tcp(), 4);
    assert_all_on(&f.threads(), MAIN);
}

#[test]
fn with_event_loops_clients_spread_over_them_unless_the_export_has_a_runtime() {
    let f = Fixture::with_loops(MemDriver::new(4 * MIB), false, None, 2);
    // Two clients at once: one on each loop, none on the accepting runtime.
    let (mut a, _) = Client::connect(f.unix());
    let (mut b, _) = Client::connect(f.tcp());
    let data = pattern(64 * 1024, 7);
    a.write(0, &data);
    let on_a = f.threads();
    assert!(b.read(0, data.len() as u32) == data);
    let on_b = f.threads();
    assert!(!on_a.is_empty() && !on_b.is_empty());
    assert!(
        on_a.iter().chain(&on_b).all(|t| t.starts_with("nbd-loop-")),
        "{on_a:?} {on_b:?}"
    );
    assert_ne!(on_a[0], on_b[0], "two connections, two loops");
    a.disconnect();
    b.disconnect();
    // An export's own runtime wins over the loops.
    let f = Fixture::with_loops(MemDriver::new(4 * MIB), true, None, 2);
    exchange(&f, f.unix(), 8);
    assert_all_on(&f.threads(), IOTHREAD);
}

#[test]
fn a_handed_over_stream_runs_in_the_iothread_too() {
    let f = Fixture::new(MemDriver::new(4 * MIB), true, None);
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(HANG)).unwrap();
    theirs.set_nonblocking(true).unwrap();
    let theirs = {
        let _guard = f.runtime.enter();
        tokio::net::UnixStream::from_std(theirs).unwrap()
    };
    let s = f.server.clone();
    let served = f
        .runtime
        .spawn(async move { s.serve_connection(theirs).await });
    exchange(&f, ours, 5);
    f.wait(served).unwrap();
    assert_all_on(&f.threads(), IOTHREAD);
}

#[test]
fn many_clients_at_once_in_the_iothread() {
    let f = Fixture::new(MemDriver::new(4 * MIB), true, None);
    std::thread::scope(|scope| {
        for i in 0..4u64 {
            let f = &f;
            scope.spawn(move || {
                let stream: Box<dyn ReadWrite> = if i % 2 == 0 {
                    Box::new(f.unix())
                } else {
                    Box::new(f.tcp())
                };
                let (mut c, _) = Client::connect(stream);
                let data = pattern(256 * 1024, i as u8);
                let at = i * MIB / 2;
                c.write(at, &data);
                assert!(c.read(at, data.len() as u32) == data);
                c.disconnect();
            });
        }
    });
    assert_all_on(&f.threads(), IOTHREAD);
}

/// A byte stream of any kind, for clients of mixed transports.
trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

#[test]
fn hard_removal_drops_a_moved_client_after_its_request() {
    let mut disk = MemDriver::new(4 * MIB);
    let gated = 2 * MIB;
    disk.gated_offset = Some(gated);
    disk.fill(gated, &[0x5a; 4096]);
    let f = Fixture::new(disk, true, None);
    let (mut c, _) = Client::connect(f.unix());
    c.send(0, 7, gated, 4096, &[]);
    // The read has reached the driver (in the iothread) and waits for the gate.
    assert_eq!(
        f.calls.lock().unwrap().recv_timeout(HANG).unwrap(),
        IOTHREAD
    );
    assert_eq!(f.server.client_count("e"), 1);
    let gone = f.server.remove_export("e", RemoveMode::Hard).unwrap();
    f.disk.gate.add_permits(1);
    // The request in flight is answered, then the connection ends.
    assert_eq!(c.reply(), (0, 7));
    let mut data = vec![0; 4096];
    c.s.read_exact(&mut data).unwrap();
    assert!(data.iter().all(|&b| b == 0x5a));
    c.expect_eof();
    f.wait(gone);
    assert!(f.node.users().is_empty(), "the export released the node");
    assert!(f.server.export_names().is_empty());
}

#[test]
fn safe_removal_is_refused_while_a_moved_client_is_connected() {
    let f = Fixture::new(MemDriver::new(4 * MIB), true, None);
    let (mut c, _) = Client::connect(f.tcp());
    assert_eq!(c.read(0, 512), vec![0; 512]);
    let refused = f.server.remove_export("e", RemoveMode::Safe).unwrap_err();
    assert_eq!(refused.to_string(), "export 'e' still in use");
    c.disconnect();
    // The lease is released by the iothread task once the connection ended; the removal
    // that follows resolves only when it is.
    let gone = loop {
        match f.server.remove_export("e", RemoveMode::Safe) {
            Ok(gone) => break gone,
            Err(nbd_server::NbdError::InUse(_)) => std::thread::yield_now(),
            Err(e) => panic!("{e}"),
        }
    };
    f.wait(gone);
    assert!(f.node.users().is_empty());
}

#[test]
fn server_stop_ends_moved_clients() {
    let f = Fixture::new(MemDriver::new(4 * MIB), true, None);
    let (mut unix, _) = Client::connect(f.unix());
    let (mut tcp, _) = Client::connect(f.tcp());
    assert_eq!(unix.read(0, 512), vec![0; 512]);
    assert_eq!(tcp.read(0, 512), vec![0; 512]);
    f.server.stop();
    unix.expect_eof();
    tcp.expect_eof();
    // Both connections are gone and their leases released: the export's removal completes.
    let gone = f.server.remove_export("e", RemoveMode::Hard).unwrap();
    f.wait(gone);
    assert!(f.node.users().is_empty());
    assert_all_on(&f.threads(), IOTHREAD);
}

#[test]
fn an_iothread_ending_drops_its_clients() {
    let mut f = Fixture::new(MemDriver::new(4 * MIB), true, None);
    let (mut c, _) = Client::connect(f.unix());
    assert_eq!(c.read(0, 512), vec![0; 512]);
    drop(f.iothread.take());
    c.expect_eof();
    let gone = f.server.remove_export("e", RemoveMode::Hard).unwrap();
    f.wait(gone);
    assert!(f.node.users().is_empty());
}

#[test]
fn a_moved_client_outlives_the_main_runtime() {
    let mut f = Fixture::new(MemDriver::new(4 * MIB), true, None);
    let unix: Box<dyn ReadWrite> = Box::new(f.unix());
    let tcp: Box<dyn ReadWrite> = Box::new(f.tcp());
    let mut clients: Vec<_> = [unix, tcp].map(|s| Client::connect(s).0).into();
    // Both are in transmission, so in the iothread.
    for c in &mut clients {
        assert_eq!(c.read(0, 512), vec![0; 512]);
    }
    // Without the main runtime's reactor, only sockets registered with the iothread's work.
    f.shut_main_down();
    for (i, c) in clients.iter_mut().enumerate() {
        let data = pattern(128 * 1024, 9 + i as u8);
        let at = i as u64 * MIB;
        c.write(at, &data);
        assert!(c.read(at, data.len() as u32) == data);
    }
    for c in clients {
        c.disconnect();
    }
    assert_all_on(&f.threads(), IOTHREAD);
}

// ---- TLS: qemu-io's client, the session moved with its socket ----

/// A CA and a server certificate for `localhost` made with certtool; `client/` holds the
/// CA certificate only (the server asks for no client certificate).
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
        let certtool = |args: &[&str]| {
            run_ok(Command::new("certtool").args(args));
        };
        for key in ["ca-key.pem", "server-key.pem"] {
            certtool(&[
                "--generate-privkey",
                "--key-type=rsa",
                "--bits=2048",
                "--outfile",
                &p(key),
            ]);
        }
        std::fs::write(
            p("ca.info"),
            "cn = Test CA\nca\ncert_signing_key\nexpiration_days = 2\n",
        )
        .unwrap();
        certtool(&[
            "--generate-self-signed",
            "--load-privkey",
            &p("ca-key.pem"),
            "--template",
            &p("ca.info"),
            "--outfile",
            &p("ca-cert.pem"),
        ]);
        std::fs::write(
            p("server.info"),
            "cn = localhost\ndns_name = localhost\ntls_www_server\nsigning_key\nencryption_key\nexpiration_days = 2\n",
        )
        .unwrap();
        certtool(&[
            "--generate-certificate",
            "--load-privkey",
            &p("server-key.pem"),
            "--load-ca-certificate",
            &p("ca-cert.pem"),
            "--load-ca-privkey",
            &p("ca-key.pem"),
            "--template",
            &p("server.info"),
            "--outfile",
            &p("server-cert.pem"),
        ]);
        std::fs::create_dir(p("client")).unwrap();
        std::fs::copy(p("ca-cert.pem"), p("client/ca-cert.pem")).unwrap();
        Pki { dir }
    }

    /// A rustls client trusting the CA, for an in-process TLS client.
    fn client(&self) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(self.dir.path().join("ca-cert.pem")).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(cfg)
    }

    fn config(&self) -> TlsConfig {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_file_iter(self.dir.path().join("server-cert.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(self.dir.path().join("server-key.pem")).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        TlsConfig::rustls(Arc::new(cfg))
    }
}

#[test]
fn tls_clients_run_in_the_iothread() {
    if !require_tool("certtool") || !require_tool("qemu-io") {
        return;
    }
    let pki = Pki::new();
    let f = Fixture::new(MemDriver::new(4 * MIB), true, Some(pki.config()));
    let server = |f: &Fixture, over_tcp: bool| {
        if over_tcp {
            format!(
                "server.type=inet,server.host=localhost,server.port={}",
                f.port
            )
        } else {
            format!("server.type=unix,server.path={}", f.socket.display())
        }
    };
    for (over_tcp, fill, at) in [(false, 0x5a, 0u64), (true, 0xa5, 2 * MIB)] {
        let out = run_ok(
            Command::new("qemu-io")
                .arg("-c")
                .arg(format!("write -P {fill} {at} 1M"))
                .arg("-c")
                .arg(format!("read -P {fill} {at} 1M"))
                .args(["-c", "flush"])
                .arg("--object")
                .arg(format!(
                    "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                    pki.dir.path().join("client").display()
                ))
                .arg("--image-opts")
                .arg(format!(
                    "driver=nbd,{},export=e,tls-creds=tls0,tls-hostname=localhost",
                    server(&f, over_tcp)
                )),
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(!text.contains("failed"), "{text}");
        let disk = f.disk.contents();
        assert!(
            disk[at as usize..(at + MIB) as usize]
                .iter()
                .all(|&b| b == fill),
            "the disk does not hold what qemu-io wrote"
        );
        assert_all_on(&f.threads(), IOTHREAD);
    }
}

/// STARTTLS then `NBD_OPT_GO` inside TLS, with rustls over a blocking socket.
fn tls_client<T: Read + Write>(
    mut sock: T,
    cfg: Arc<rustls::ClientConfig>,
) -> Client<rustls::StreamOwned<rustls::ClientConnection, T>> {
    greet(&mut sock);
    // NBD_OPT_STARTTLS: an ACK, then the TLS handshake on the same stream.
    assert_eq!(option(&mut sock, 5, &[]), None);
    let conn = rustls::ClientConnection::new(cfg, "localhost".try_into().unwrap()).unwrap();
    let mut s = rustls::StreamOwned::new(conn, sock);
    assert_eq!(go(&mut s), 4 * MIB);
    Client { s }
}

#[test]
fn a_moved_tls_client_outlives_the_main_runtime() {
    if !require_tool("certtool") {
        return;
    }
    let pki = Pki::new();
    let mut f = Fixture::new(MemDriver::new(4 * MIB), true, Some(pki.config()));
    let mut unix = tls_client(f.unix(), pki.client());
    let mut tcp = tls_client(f.tcp(), pki.client());
    assert_eq!(unix.read(0, 512), vec![0; 512]);
    assert_eq!(tcp.read(0, 512), vec![0; 512]);
    // The TLS session stays, the socket under it moved to the iothread's reactor.
    f.shut_main_down();
    let data = pattern(128 * 1024, 21);
    unix.write(0, &data);
    assert!(unix.read(0, data.len() as u32) == data);
    tcp.write(MIB, &data);
    assert!(tcp.read(MIB, data.len() as u32) == data);
    unix.disconnect();
    tcp.disconnect();
    assert_all_on(&f.threads(), IOTHREAD);
}
