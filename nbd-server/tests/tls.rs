//! NBD over TLS against the real clients: qemu-img, qemu-io (QEMU's gnutls client), nbdinfo
//! and nbdcopy (libnbd). Certificates are made with `certtool` in a temp dir, in QEMU's
//! layout; the rustls server configuration is built here (a client verifier over the CA, as
//! QEMU's `verify-peer=on`).

mod common;

use common::*;
use nbd_server::{Authorize, Peer, PeerKind, Refusal, ServerConfig, TlsAcceptor, TlsConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const MIB: u64 = 1 << 20;

/// The tools every test here needs.
fn have_tools() -> bool {
    ["certtool", "qemu-img", "qemu-io", "nbdinfo", "nbdcopy"]
        .iter()
        .all(|t| require_tool(t))
}

/// test-support's PKI (certtool, QEMU's layout) in a temp dir, its directories by role:
/// `server/`, clients `good/` (CN=client), `denied/` (CN=intruder), `rogue/` (a client
/// certificate signed by a foreign CA) and `nocert/` (only the CA certificate). Every client
/// trusts the real CA, so that only the server's decision matters.
struct Pki {
    dirs: test_support::Pki,
    nocert: PathBuf,
    _dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let dirs = test_support::Pki::create(dir.path());
        let nocert = dir.path().join("nocert");
        std::fs::create_dir(&nocert).unwrap();
        std::fs::copy(dirs.server.join("ca-cert.pem"), nocert.join("ca-cert.pem")).unwrap();
        Pki {
            dirs,
            nocert,
            _dir: dir,
        }
    }

    fn path(&self, role: &str) -> PathBuf {
        match role {
            "server" => self.dirs.server.clone(),
            "good" => self.dirs.client.clone(),
            "denied" => self.dirs.other_client.clone(),
            "rogue" => self.dirs.foreign_client.clone(),
            "nocert" => self.nocert.clone(),
            _ => panic!("no PKI directory for {role}"),
        }
    }

    /// The server's rustls configuration: its certificate, client certificates required and
    /// verified against the CA.
    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(self.path("server").join("ca-cert.pem")).unwrap()
        {
            roots.add(cert.unwrap()).unwrap();
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .build()
                .unwrap();
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(self.path("server").join("server-cert.pem"))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_file(self.path("server").join("server-key.pem")).unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        Arc::new(cfg)
    }

    fn server(&self, authorize: Option<Arc<dyn Authorize>>) -> TestServer {
        let config = ServerConfig::default().tls(Some(TlsConfig {
            acceptor: TlsAcceptor::Rustls(self.server_config()),
            authorize,
        }));
        TestServer::start(MemDriver::new(4 * MIB), config, true)
    }
}

fn tls_uri(t: &TestServer, certs: &Path) -> String {
    format!(
        "nbds+unix:///e?socket={}&tls-certificates={}",
        t.socket.display(),
        certs.display()
    )
}

fn output(cmd: &mut Command) -> Output {
    cmd.output().expect("failed to spawn")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `qemu-img`/`qemu-io` arguments for the export through QEMU's TLS client.
fn qemu_tls_args(t: &TestServer, certs: &Path) -> Vec<String> {
    vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            certs.display()
        ),
        "--image-opts".into(),
        format!(
            "driver=nbd,server.type=unix,server.path={},export=e,tls-creds=tls0,tls-hostname=localhost",
            t.socket.display()
        ),
    ]
}

fn qemu_img_info(t: &TestServer, certs: &Path) -> Output {
    let mut cmd = Command::new("qemu-img");
    cmd.arg("info").args(qemu_tls_args(t, certs));
    output(&mut cmd)
}

/// Whether libnbd can read the export's size over TLS with the certificates in `certs`.
fn nbdinfo_size(t: &TestServer, certs: &Path) -> Output {
    output(Command::new("nbdinfo").arg("--size").arg(tls_uri(t, certs)))
}

/// An authorization hook that refuses certificates whose DER holds the common name `cn`
/// (the `denied` client's `CN=intruder`), as a `tls-authz` list would by DN.
fn deny_cn(cn: &'static str) -> Arc<dyn Authorize> {
    Arc::new(move |peer: Peer<'_>| {
        let Peer::Certificate(Some(der)) = peer else {
            return Err(Refusal::NoCertificate);
        };
        if der.windows(cn.len()).any(|w| w == cn.as_bytes()) {
            Err(Refusal::Denied {
                kind: PeerKind::X509,
                identity: format!("CN={cn}"),
            })
        } else {
            Ok("allowed".to_string())
        }
    })
}

#[test]
fn tls_clients_read_and_write_byte_for_byte() {
    if !have_tools() {
        return;
    }
    let pki = Pki::new();
    let t = pki.server(None);
    let good = pki.path("good");
    // qemu-io writes and reads back through QEMU's TLS client.
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-c", "write -P 0x5a 0 64k", "-c", "write -P 0xa5 1M 4k"])
        .args(["-c", "read -P 0x5a 0 64k", "-c", "read -P 0xa5 1M 4k"])
        .args(qemu_tls_args(&t, &good));
    let out = run_ok(&mut cmd);
    let out = text(&out);
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io: {out}"
    );
    let data = t.disk.contents();
    assert!(data[..65536].iter().all(|&b| b == 0x5a));
    assert!(data[MIB as usize..MIB as usize + 4096]
        .iter()
        .all(|&b| b == 0xa5));
    assert!(data[65536..MIB as usize].iter().all(|&b| b == 0));

    // qemu-img info sees the size; qemu-img compare matches a local copy byte for byte.
    let info = qemu_img_info(&t, &good);
    assert!(info.status.success(), "qemu-img info: {}", text(&info));
    assert!(text(&info).contains("4 MiB"), "{}", text(&info));
    let local = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(local.path(), &data).unwrap();
    let mut cmd = Command::new("qemu-img");
    cmd.arg("compare")
        .args(qemu_tls_args(&t, &good))
        .arg(format!(
            "driver=raw,file.driver=file,file.filename={}",
            local.path().display()
        ));
    run_ok(&mut cmd);

    // nbdcopy writes a new pattern over TLS and copies it back out.
    let pattern = pattern(4 * MIB as usize, 7);
    let src = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(src.path(), &pattern).unwrap();
    run_ok(
        Command::new("nbdcopy")
            .arg(src.path())
            .arg(tls_uri(&t, &good)),
    );
    assert!(t.disk.contents() == pattern, "nbdcopy upload differs");
    let dst = tempfile::tempdir().unwrap();
    let back = dst.path().join("back.img");
    run_ok(Command::new("nbdcopy").arg(tls_uri(&t, &good)).arg(&back));
    assert!(
        std::fs::read(&back).unwrap() == pattern,
        "nbdcopy download differs"
    );
    let size = nbdinfo_size(&t, &good);
    assert!(size.status.success(), "nbdinfo: {}", text(&size));
    assert_eq!(text(&size).trim(), (4 * MIB).to_string());
}

#[test]
fn plaintext_clients_are_refused() {
    if !have_tools() {
        return;
    }
    let pki = Pki::new();
    let t = pki.server(None);
    // On the wire: NBD_OPT_GO before TLS gets NBD_REP_ERR_TLS_REQD (and the connection
    // lives on: NBD_OPT_LIST gets the same).
    let mut s = t.connect();
    raw_greet(&mut s);
    let mut go = Vec::new();
    go.extend_from_slice(&1u32.to_be_bytes());
    go.extend_from_slice(b"e");
    go.extend_from_slice(&0u16.to_be_bytes());
    send_option(&mut s, 7, &go);
    let (opt, ty, _) = read_option_reply(&mut s);
    assert_eq!((opt, ty), (7, (1 << 31) + 5));
    send_option(&mut s, 3, &[]);
    let (opt, ty, _) = read_option_reply(&mut s);
    assert_eq!((opt, ty), (3, (1 << 31) + 5));
    // NBD_OPT_EXPORT_NAME cannot be refused with a reply: the server hangs up.
    send_option(&mut s, 1, b"e");
    let mut buf = [0u8; 1];
    use std::io::Read;
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0, "connection not closed");

    // The real clients without TLS are refused.
    let plain = output(Command::new("nbdinfo").arg("--size").arg(t.uri()));
    assert!(!plain.status.success(), "nbdinfo without TLS succeeded");
    let out = output(
        Command::new("qemu-img")
            .arg("info")
            .arg(format!("nbd+unix:///e?socket={}", t.socket.display())),
    );
    assert!(!out.status.success(), "qemu-img without TLS succeeded");
    assert!(text(&out).contains("TLS"), "{}", text(&out));
    // The same server still serves a TLS client.
    let ok = nbdinfo_size(&t, &pki.path("good"));
    assert!(ok.status.success(), "{}", text(&ok));
}

#[test]
fn clients_with_foreign_or_no_certificate_are_refused() {
    if !have_tools() {
        return;
    }
    let pki = Pki::new();
    let t = pki.server(None);
    for dir in ["rogue", "nocert"] {
        let out = qemu_img_info(&t, &pki.path(dir));
        assert!(!out.status.success(), "{dir}: qemu-img info succeeded");
        let out = nbdinfo_size(&t, &pki.path(dir));
        assert!(!out.status.success(), "{dir}: nbdinfo succeeded");
    }
    let ok = qemu_img_info(&t, &pki.path("good"));
    assert!(ok.status.success(), "{}", text(&ok));
}

#[test]
fn authorization_refuses_one_client_and_admits_another() {
    if !have_tools() {
        return;
    }
    let pki = Pki::new();
    let t = pki.server(Some(deny_cn("intruder")));
    let denied = qemu_img_info(&t, &pki.path("denied"));
    assert!(!denied.status.success(), "denied client got in");
    let denied = nbdinfo_size(&t, &pki.path("denied"));
    assert!(!denied.status.success(), "denied client got in");
    let ok = qemu_img_info(&t, &pki.path("good"));
    assert!(ok.status.success(), "{}", text(&ok));
    let ok = nbdinfo_size(&t, &pki.path("good"));
    assert!(ok.status.success(), "{}", text(&ok));
}

#[test]
fn authorization_is_asked_at_each_connection() {
    if !have_tools() {
        return;
    }
    let pki = Pki::new();
    let allow = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(std::sync::Mutex::new(Vec::<bool>::new()));
    let hook: Arc<dyn Authorize> = {
        let (allow, seen) = (Arc::clone(&allow), Arc::clone(&seen));
        Arc::new(move |peer: Peer<'_>| {
            seen.lock()
                .unwrap()
                .push(matches!(peer, Peer::Certificate(Some(_))));
            if allow.load(Ordering::SeqCst) {
                Ok("CN=client".to_string())
            } else {
                Err(Refusal::Denied {
                    kind: PeerKind::X509,
                    identity: "CN=client".into(),
                })
            }
        })
    };
    let t = pki.server(Some(hook));
    let out = qemu_img_info(&t, &pki.path("good"));
    assert!(!out.status.success(), "client admitted while denied");
    allow.store(true, Ordering::SeqCst);
    let out = qemu_img_info(&t, &pki.path("good"));
    assert!(out.status.success(), "{}", text(&out));
    // The hook saw the client's certificate each time.
    let seen = seen.lock().unwrap();
    assert!(seen.len() >= 2 && seen.iter().all(|&c| c), "{seen:?}");
}

#[test]
fn handshake_deadline_covers_the_tls_handshake() {
    if !require_tool("certtool") {
        return;
    }
    let pki = Pki::new();
    let config = ServerConfig::default()
        .handshake_max(Some(std::time::Duration::from_millis(300)))
        .tls(Some(TlsConfig::rustls(pki.server_config())));
    let t = TestServer::start(MemDriver::new(MIB), config, true);
    let mut s = t.connect();
    raw_greet(&mut s);
    // STARTTLS is acknowledged; the client then never starts the TLS handshake.
    send_option(&mut s, 5, &[]);
    let (opt, ty, data) = read_option_reply(&mut s);
    assert_eq!((opt, ty, data.len()), (5, 1, 0));
    let mut buf = [0u8; 1];
    use std::io::Read;
    assert_eq!(
        s.read(&mut buf).unwrap_or(0),
        0,
        "the server kept a client stuck before its TLS handshake"
    );
}

#[test]
fn tls_over_tcp() {
    if !have_tools() {
        return;
    }
    let pki = Pki::new();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let disk = Arc::new(MemDriver::new(MIB));
    disk.fill(4096, &[0x77; 4096]);
    let node = block_core::Node::new("n", disk as Arc<dyn block_core::BlockDriver>, Vec::new());
    let server = nbd_server::NbdServer::new(ServerConfig::default().tls(Some(TlsConfig {
        acceptor: TlsAcceptor::Rustls(pki.server_config()),
        authorize: Some(deny_cn("intruder")),
    })));
    server
        .add_export(nbd_server::ExportConfig::new(
            "e",
            node.attach("export 'e'", false).unwrap(),
        ))
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let s = server.clone();
    runtime.spawn(async move { s.serve_tcp(listener).await });
    let uri = |dir: &str| {
        format!(
            "nbds://localhost:{port}/e?tls-certificates={}",
            pki.path(dir).display()
        )
    };
    let out = run_ok(Command::new("nbdinfo").arg("--size").arg(uri("good")));
    assert_eq!(text(&out).trim(), MIB.to_string());
    let denied = output(Command::new("nbdinfo").arg("--size").arg(uri("denied")));
    assert!(!denied.status.success(), "denied client got in over TCP");
    // QEMU's client over TCP checks the server's certificate against the host name.
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-r", "-c", "read -P 0x77 4k 4k", "-c", "read -P 0 8k 4k"])
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            pki.path("good").display()
        ))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,server.type=inet,server.host=localhost,server.port={port},export=e,tls-creds=tls0"
        ));
    let out = text(&run_ok(&mut cmd));
    assert!(!out.contains("failed") && !out.contains("error"), "{out}");
    server.stop();
}
