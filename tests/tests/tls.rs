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
    for &(name, key_args) in test_support::KEY_KINDS {
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

/// `dir/keys.psk` with keys for `alice` and `bob`, made by GnuTLS's psktool.
fn psk_dir(root: &Path) -> std::path::PathBuf {
    let dir = root.join("psk");
    std::fs::create_dir_all(&dir).unwrap();
    for user in ["alice", "bob"] {
        run_ok(
            Command::new("psktool")
                .args(["-u", user, "-p"])
                .arg(dir.join("keys.psk")),
        );
    }
    dir
}

/// A daemon of `flavor` exporting a writable 1 MiB image over TLS-PSK with the keys in
/// `psk`, and `extra` arguments (objects, `tls-authz`).
fn start_psk(flavor: Flavor, psk: &Path, extra: &[&str], authz: bool) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    qemu_img_create(&image, "raw", "1M");
    let sock = dir.path().join("nbd.sock");
    let mut args = vec![
        "--object".to_string(),
        format!(
            "tls-creds-psk,id=tls0,endpoint=server,dir={}",
            psk.display()
        ),
        "--blockdev".to_string(),
        format!("driver=file,filename={},node-name=f", image.display()),
        "--nbd-server".to_string(),
        format!(
            "addr.type=unix,addr.path={},tls-creds=tls0{}",
            sock.display(),
            if authz { ",tls-authz=auth0" } else { "" }
        ),
        "--export".to_string(),
        "type=nbd,id=e,node-name=f,name=disk,writable=on".to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start_in(flavor, dir, &argv)
}

/// libnbd's URI for `user` with the PSK file `keys`.
fn psk_uri(d: &Daemon, user: &str, keys: &Path) -> String {
    format!(
        "nbds+unix://{user}@/disk?socket={}&tls-psk-file={}",
        d.path("nbd.sock").display(),
        keys.display()
    )
}

use test_support::nbdinfo_ok;

#[test]
fn psk_clients_read_and_write_like_qsd() {
    if !require_tools(&[
        "psktool",
        "nbdinfo",
        "nbdcopy",
        "qemu-img",
        "qemu-storage-daemon",
    ]) {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let psk = psk_dir(root.path());
    let keys = psk.join("keys.psk");
    // The same user with a wrong key.
    let wrong = root.path().join("wrong.psk");
    let text = std::fs::read_to_string(&keys).unwrap();
    let bob = text.lines().find(|l| l.starts_with("bob:")).unwrap();
    let flipped = if bob.ends_with('0') { '1' } else { '0' };
    std::fs::write(&wrong, format!("{}{flipped}\n", &bob[..bob.len() - 1])).unwrap();
    let data = root.path().join("data.raw");
    std::fs::write(&data, blockexportd_tests::pattern(1 << 20, 7)).unwrap();

    for flavor in [Flavor::Blockexportd, Flavor::Qsd] {
        let d = start_psk(flavor, &psk, &[], false);
        let uri = psk_uri(&d, "bob", &keys);
        let out = run_ok(Command::new("nbdinfo").args(["--size", &uri]));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "1048576",
            "{flavor:?}"
        );
        // Byte for byte, both ways, two connections.
        run_ok(
            Command::new("nbdcopy")
                .args(["--connections=2"])
                .arg(&data)
                .arg(&uri),
        );
        let copy = d.path("copy.raw");
        run_ok(Command::new("nbdcopy").arg(&uri).arg(&copy));
        assert!(
            std::fs::read(&copy).unwrap() == std::fs::read(&data).unwrap(),
            "{flavor:?}: the copy differs"
        );
        // QEMU's own client, with tls-creds-psk endpoint=client.
        run_ok(Command::new("qemu-img").args([
            "info",
            "--object",
            &format!(
                "tls-creds-psk,id=tls0,endpoint=client,dir={},username=alice",
                psk.display()
            ),
            "--image-opts",
            &format!(
                "driver=nbd,server.type=unix,server.path={},export=disk,tls-creds=tls0",
                d.path("nbd.sock").display()
            ),
        ]));
        // A wrong key, plaintext and x509-less TLS are refused.
        assert!(
            !nbdinfo_ok(&psk_uri(&d, "bob", &wrong)),
            "{flavor:?}: wrong key admitted"
        );
        let plain = format!("nbd+unix:///disk?socket={}", d.path("nbd.sock").display());
        assert!(!nbdinfo_ok(&plain), "{flavor:?}: plaintext admitted");
    }
}

/// QEMU 10.0 does not consult `tls-authz` for PSK clients (its TLS session checks nothing
/// for PSK credentials); blockexportd asks the authz object about the client's username.
#[test]
fn psk_username_is_the_tls_authz_identity() {
    if !require_tools(&["psktool", "nbdinfo", "qemu-storage-daemon"]) {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let psk = psk_dir(root.path());
    let keys = psk.join("keys.psk");
    let authz = ["--object", "authz-simple,id=auth0,identity=bob"];
    let d = start_psk(Flavor::Blockexportd, &psk, &authz, true);
    assert!(nbdinfo_ok(&psk_uri(&d, "bob", &keys)));
    assert!(
        !nbdinfo_ok(&psk_uri(&d, "alice", &keys)),
        "alice is not bob"
    );
    let q = start_psk(Flavor::Qsd, &psk, &authz, true);
    assert!(nbdinfo_ok(&psk_uri(&q, "bob", &keys)));
    assert!(
        nbdinfo_ok(&psk_uri(&q, "alice", &keys)),
        "QSD now checks tls-authz for PSK: drop the known difference"
    );
}

#[test]
fn tls_creds_psk_over_qmp_like_qsd() {
    if !require_tools(&["psktool", "nbdinfo", "qemu-storage-daemon"]) {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let psk = psk_dir(root.path());
    let dir = psk.to_str().unwrap();
    let mut answers = Vec::new();
    for flavor in [Flavor::Blockexportd, Flavor::Qsd] {
        let d = Daemon::start_flavor(flavor, &[]);
        let mut q = d.qmp();
        let add = |extra: serde_json::Value| {
            let mut args = json!({"qom-type": "tls-creds-psk", "id": "p"});
            args.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            args
        };
        let mut got = Vec::new();
        for extra in [
            json!({"endpoint": "server"}),
            json!({"endpoint": "server", "dir": "/nonexistent"}),
            json!({"endpoint": "server", "dir": dir, "username": "bob"}),
            json!({"endpoint": "client", "dir": dir}),
            json!({"endpoint": "server", "dir": dir, "bogus": 1}),
            json!({"endpoint": "nowhere", "dir": dir}),
        ] {
            got.push(q.err("object-add", add(extra)));
        }
        q.ok(
            "object-add",
            add(json!({"endpoint": "client", "dir": dir, "username": "bob"})),
        );
        got.push(q.err(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": d.path("n.sock").to_str().unwrap()}}, "tls-creds": "p"}),
        ));
        let list = q.ok("qom-list", json!({"path": "/objects/p"}));
        let user = q.ok(
            "qom-get",
            json!({"path": "/objects/p", "property": "username"}),
        );
        q.ok("object-del", json!({"id": "p"}));
        // A server object added over QMP serves PSK clients.
        q.ok("object-add", add(json!({"endpoint": "server", "dir": dir})));
        q.ok(
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "n", "size": 1048576}),
        );
        q.ok(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": d.path("nbd.sock").to_str().unwrap()}}, "tls-creds": "p"}),
        );
        q.ok(
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "n", "name": "disk"}),
        );
        assert!(
            nbdinfo_ok(&psk_uri(&d, "alice", &psk.join("keys.psk"))),
            "{flavor:?}"
        );
        answers.push((got, list, user));
    }
    assert_eq!(answers[0], answers[1], "blockexportd vs QSD");
    assert!(
        answers[1].0[3]
            .1
            .contains("Username qemu not found in PSK file"),
        "{:?}",
        answers[1].0
    );
}
