//! NBD over TLS with pre-shared keys (the `psk` feature, OpenSSL) against libnbd's GnuTLS
//! client: nbdinfo and nbdcopy with `tls-psk-file`.

mod common;

use common::*;
use nbd_server::{Peer, PskAcceptor, Refusal, ServerConfig, TlsAcceptor, TlsConfig};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

const ALICE_KEY: [u8; 32] = [0x5a; 32];

fn hex(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

fn uri(t: &TestServer, user: &str, keys: &Path) -> String {
    format!(
        "nbds+unix://{user}@/e?socket={}&tls-psk-file={}",
        t.socket.display(),
        keys.display()
    )
}

use test_support::nbdinfo_ok;

#[test]
fn psk_clients_are_served_and_authorized_by_identity() {
    if !require_tool("nbdinfo") || !require_tool("nbdcopy") {
        return;
    }
    let keys: HashMap<String, Vec<u8>> = [
        ("alice".to_string(), ALICE_KEY.to_vec()),
        ("bob".to_string(), vec![0x11; 16]),
    ]
    .into();
    let acceptor = PskAcceptor::new(Arc::new(move |user: &str| keys.get(user).cloned())).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hook = {
        let seen = Arc::clone(&seen);
        Arc::new(move |peer: Peer<'_>| {
            let Peer::PskIdentity(user) = peer else {
                return Err(Refusal::NoCertificate);
            };
            seen.lock().unwrap().push(user.to_string());
            if user == "bob" {
                Err(Refusal::Denied {
                    kind: peer.kind(),
                    identity: user.to_string(),
                })
            } else {
                Ok(user.to_string())
            }
        })
    };
    let config = ServerConfig::default()
        .tls(Some(TlsConfig {
            acceptor: TlsAcceptor::Psk(acceptor),
            authorize: Some(hook),
        }))
        // Connections move to these loops after the handshake, TLS state and all.
        .event_loops(2);
    let t = TestServer::start(MemDriver::new(4 << 20), config, true);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.psk");
    std::fs::write(
        &file,
        format!(
            "alice:{}\nbob:{}\nmallory:{}\n",
            hex(&ALICE_KEY),
            hex(&[0x11; 16]),
            hex(&ALICE_KEY)
        ),
    )
    .unwrap();
    let wrong = dir.path().join("wrong.psk");
    std::fs::write(&wrong, format!("alice:{}\n", hex(&[0x5b; 32]))).unwrap();

    // Byte for byte both ways, over two connections.
    let data = dir.path().join("data.raw");
    std::fs::write(&data, pattern(4 << 20, 3)).unwrap();
    run_ok(
        Command::new("nbdcopy")
            .arg("--connections=2")
            .arg(&data)
            .arg(uri(&t, "alice", &file)),
    );
    assert!(
        t.disk.contents() == pattern(4 << 20, 3),
        "the export differs"
    );
    let copy = dir.path().join("copy.raw");
    run_ok(
        Command::new("nbdcopy")
            .arg(uri(&t, "alice", &file))
            .arg(&copy),
    );
    assert!(
        std::fs::read(&copy).unwrap() == pattern(4 << 20, 3),
        "the copy differs"
    );

    // A wrong key, an unknown identity, a refused identity, plaintext: all refused.
    assert!(!nbdinfo_ok(&uri(&t, "alice", &wrong)), "wrong key admitted");
    assert!(
        !nbdinfo_ok(&uri(&t, "mallory", &file)),
        "unknown identity admitted"
    );
    assert!(!nbdinfo_ok(&uri(&t, "bob", &file)), "bob admitted");
    assert!(!nbdinfo_ok(&t.uri()), "plaintext admitted");
    let seen = seen.lock().unwrap();
    assert!(seen.iter().any(|u| u == "bob"), "{seen:?}");
    assert!(
        seen.iter().all(|u| u == "alice" || u == "bob"),
        "the hook saw an identity without its key: {seen:?}"
    );
}
