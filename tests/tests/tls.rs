//! NBD over TLS with x509 client authorization, end to end: the real blockexportd binary,
//! certificates made by certtool, and qemu-img, qemu-io, nbdinfo and nbdcopy as clients.

use blockexportd_tests::{qemu_img_create, qemu_io, require_tools, run_ok, Daemon, Flavor, Pki};
use serde_json::json;
use std::path::Path;
use std::process::Command;

fn tls_image_opts(sock: &Path, export: &str) -> String {
    format!(
        "driver=nbd,server.type=unix,server.path={},export={export},tls-creds=tls0,tls-hostname=localhost",
        sock.display()
    )
}

fn client_object(dir: &Path) -> String {
    format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        dir.display()
    )
}

/// qemu-io over TLS with the client credentials in `dir`; returns (success, output).
fn qemu_io_tls(dir: &Path, sock: &Path, commands: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("qemu-io");
    cmd.args([
        "--object",
        &client_object(dir),
        "--image-opts",
        &tls_image_opts(sock, "disk"),
    ]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = cmd.output().expect("qemu-io");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (
        out.status.success() && !text.contains("failed") && !text.contains("Pattern verification"),
        text,
    )
}

fn start(pki: &Pki, dir: tempfile::TempDir, authz: &str) -> Daemon {
    let image = dir.path().join("disk.raw");
    qemu_img_create(&image, "raw", "8M");
    let sock = dir.path().join("nbd.sock");
    let args = [
        "--object".to_string(),
        format!(
            "tls-creds-x509,id=tls0,endpoint=server,dir={}",
            pki.server.display()
        ),
        "--object".to_string(),
        authz.to_string(),
        "--blockdev".to_string(),
        format!("driver=file,filename={},node-name=f", image.display()),
        "--nbd-server".to_string(),
        format!(
            "addr.type=unix,addr.path={},tls-creds=tls0,tls-authz=auth0",
            sock.display()
        ),
        "--export".to_string(),
        "type=nbd,id=e,node-name=f,name=disk,writable=on".to_string(),
    ];
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start_in(Flavor::Blockexportd, dir, &argv)
}

#[test]
fn tls_clients_are_authorized_by_distinguished_name() {
    if !require_tools(&["certtool", "qemu-io", "qemu-img", "nbdinfo", "nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(dir.path());
    // QSD's command-line form of the DN: commas inside the value doubled.
    let d = start(
        &pki,
        dir,
        "authz-simple,id=auth0,identity=C=GB,,O=Example,,CN=client",
    );
    let sock = d.path("nbd.sock");

    // The right client reads and writes byte for byte.
    let (ok, out) = qemu_io_tls(
        &pki.client,
        &sock,
        &[
            "write -P 0x6b 1M 512k",
            "read -P 0x6b 1M 512k",
            "read -P 0 0 64k",
        ],
    );
    assert!(ok, "authorized client: {out}");
    let uri = format!(
        "nbds+unix:///disk?socket={}&tls-certificates={}",
        sock.display(),
        pki.client.display()
    );
    let out = run_ok(Command::new("nbdinfo").args(["--size", &uri]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (8 << 20).to_string()
    );
    let copy = d.path("copy.raw");
    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=2", &uri])
            .arg(&copy),
    );
    qemu_io(
        &["-f", "raw", "-r", copy.to_str().unwrap()],
        &["read -P 0x6b 1M 512k"],
    );

    // A plaintext client is refused.
    let plain = format!("nbd+unix:///disk?socket={}", sock.display());
    let out = Command::new("qemu-img")
        .args(["info", "-f", "raw", &plain])
        .output()
        .unwrap();
    assert!(!out.status.success(), "plaintext client must be refused");
    assert!(!Command::new("nbdinfo")
        .arg(&plain)
        .output()
        .unwrap()
        .status
        .success());

    // A client whose certificate another CA signed is refused.
    let (ok, out) = qemu_io_tls(&pki.foreign_client, &sock, &["read 0 4k"]);
    assert!(!ok, "foreign CA must be refused: {out}");

    // A client of the right CA whose DN the authz object does not admit is refused.
    let (ok, out) = qemu_io_tls(&pki.other_client, &sock, &["read 0 4k"]);
    assert!(!ok, "unlisted DN must be refused: {out}");

    // A client without a certificate is refused (verify-peer defaults to on).
    let nocert = d.path("nocert");
    std::fs::create_dir_all(&nocert).unwrap();
    std::fs::copy(pki.client.join("ca-cert.pem"), nocert.join("ca-cert.pem")).unwrap();
    let (ok, out) = qemu_io_tls(&nocert, &sock, &["read 0 4k"]);
    assert!(!ok, "client without certificate must be refused: {out}");

    // The authz object is looked up at connection time: deleting it denies everyone,
    // recreating it admits again, without restarting the server.
    let mut q = d.qmp();
    q.ok("object-del", json!({"id": "auth0"}));
    let (ok, _) = qemu_io_tls(&pki.client, &sock, &["read 0 4k"]);
    assert!(!ok, "with the authz object gone everyone is denied");
    q.ok(
        "object-add",
        json!({"qom-type": "authz-list", "id": "auth0", "policy": "deny",
               "rules": [{"match": "*CN=intruder", "policy": "allow", "format": "glob"}]}),
    );
    let (ok, out) = qemu_io_tls(&pki.other_client, &sock, &["read -P 0 0 4k"]);
    assert!(ok, "the new authz-list admits the intruder DN: {out}");
    let (ok, _) = qemu_io_tls(&pki.client, &sock, &["read 0 4k"]);
    assert!(!ok, "and no longer the first client");
}

#[test]
fn authz_listfile_edits_take_effect_without_restart() {
    if !require_tools(&["certtool", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(dir.path());
    let rules = dir.path().join("rules.json");
    std::fs::write(&rules, r#"{"policy": "deny", "rules": [{"match": "C=GB,O=Example,CN=client", "policy": "allow"}]}"#).unwrap();
    let d = start(
        &pki,
        dir,
        &format!(
            "authz-listfile,id=auth0,filename={},refresh=on",
            rules.display()
        ),
    );
    let sock = d.path("nbd.sock");
    let (ok, out) = qemu_io_tls(&pki.client, &sock, &["read 0 4k"]);
    assert!(ok, "{out}");
    std::fs::write(&rules, r#"{"policy": "deny", "rules": []}"#).unwrap();
    let (ok, _) = qemu_io_tls(&pki.client, &sock, &["read 0 4k"]);
    assert!(!ok, "the edited file denies the client");
    std::fs::write(&rules, r#"{"policy": "allow", "rules": []}"#).unwrap();
    let (ok, out) = qemu_io_tls(&pki.other_client, &sock, &["read 0 4k"]);
    assert!(ok, "{out}");
}

#[test]
fn tls_creds_errors_match_qsd() {
    let d = Daemon::start(&[]);
    let mut q = d.qmp();
    let (_, desc) = q.err(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": d.path("n.sock").to_str().unwrap()}}, "tls-creds": "nope"}),
    );
    assert_eq!(desc, "No TLS credentials with id 'nope'");
    let (_, desc) = q.err(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "t", "dir": "/nonexistent", "endpoint": "server"}),
    );
    assert!(desc.contains("/nonexistent/ca-cert.pem"), "{desc}");
}

/// A server directory (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`) whose key
/// certtool made with `key_args`, and a client directory with the CA only.
fn certtool_server(root: &Path, key_args: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
    let certtool = |args: &[&str]| {
        run_ok(Command::new("certtool").args(args).current_dir(root));
    };
    std::fs::write(root.join("ca.info"), "cn = ca\nca\ncert_signing_key\n").unwrap();
    certtool(&["--generate-privkey", "--outfile", "ca-key.pem"]);
    certtool(&[
        "--generate-self-signed",
        "--load-privkey",
        "ca-key.pem",
        "--template",
        "ca.info",
        "--outfile",
        "ca-cert.pem",
    ]);
    let server = root.join("server");
    let client = root.join("client");
    for d in [&server, &client] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::copy(root.join("ca-cert.pem"), d.join("ca-cert.pem")).unwrap();
    }
    std::fs::write(
        root.join("server.info"),
        "organization = Example\ncn = localhost\ndns_name = localhost\ntls_www_server\nencryption_key\nsigning_key\n",
    )
    .unwrap();
    let mut args = vec!["--generate-privkey"];
    args.extend_from_slice(key_args);
    args.extend_from_slice(&["--outfile", "server/server-key.pem"]);
    certtool(&args);
    certtool(&[
        "--generate-certificate",
        "--load-privkey",
        "server/server-key.pem",
        "--load-ca-certificate",
        "ca-cert.pem",
        "--load-ca-privkey",
        "ca-key.pem",
        "--template",
        "server.info",
        "--outfile",
        "server/server-cert.pem",
    ]);
    (server, client)
}

#[test]
fn certtool_keys_qsd_takes_serve_nbd_over_tls() {
    if !require_tools(&["certtool", "nbdinfo", "qemu-storage-daemon"]) {
        return;
    }
    // ring, the former crypto provider, refused RSA moduli that are not a multiple of 512
    // bits, such as the 2432-bit server key of the NBD reference project's test PKI.
    for (name, key_args) in [
        ("rsa2048", &["--bits", "2048"][..]),
        ("rsa2432", &["--bits", "2432"]),
        ("rsa3072", &["--bits", "3072"]),
        ("rsa4096", &["--bits", "4096"]),
        ("p256", &["--key-type", "ecdsa", "--curve", "secp256r1"]),
        ("p384", &["--key-type", "ecdsa", "--curve", "secp384r1"]),
        ("ed25519", &["--key-type", "ed25519"]),
    ] {
        let root = tempfile::tempdir().unwrap();
        let (server, client) = certtool_server(root.path(), key_args);
        // certtool's ECDSA and EdDSA certificates have no key encipherment usage, which
        // QEMU's sanity check wants: QSD too loads them only with sanity-check=off.
        let sanity = if name.starts_with("rsa") { "on" } else { "off" };
        for flavor in [Flavor::Blockexportd, Flavor::Qsd] {
            let dir = tempfile::tempdir().unwrap();
            let image = dir.path().join("disk.raw");
            qemu_img_create(&image, "raw", "1M");
            let sock = dir.path().join("nbd.sock");
            let args = [
                "--object".to_string(),
                format!(
                    "tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,sanity-check={sanity},dir={}",
                    server.display()
                ),
                "--blockdev".to_string(),
                format!("driver=file,filename={},node-name=f", image.display()),
                "--nbd-server".to_string(),
                format!("addr.type=unix,addr.path={},tls-creds=tls0", sock.display()),
                "--export".to_string(),
                "type=nbd,id=e,node-name=f,name=disk".to_string(),
            ];
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let _d = Daemon::start_in(flavor, dir, &argv);
            let uri = format!(
                "nbds+unix:///disk?socket={}&tls-certificates={}",
                sock.display(),
                client.display()
            );
            let out = run_ok(Command::new("nbdinfo").args(["--size", &uri]));
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                "1048576",
                "{name} {flavor:?}"
            );
        }
    }
}
