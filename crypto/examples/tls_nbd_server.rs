//! An NBD server with QEMU's `tls-creds-x509` and `tls-authz` (an `authz-list`): the same as
//! `qemu-storage-daemon --object tls-creds-x509,id=tls0,dir=DIR,endpoint=server
//! --object authz-list,id=auth0,rules.0.match=GLOB,rules.0.policy=allow,rules.0.format=glob
//! --nbd-server addr.type=unix,addr.path=SOCKET,tls-creds=tls0,tls-authz=auth0`, serving a
//! 64 MiB `null-co` disk.
//!
//! `cargo run -p qsd-crypto --example tls_nbd_server -- DIR SOCKET 'C=GB,*,CN=client'`
//!
//! `DIR` holds `ca-cert.pem`, `server-cert.pem` and `server-key.pem`; a client connects with
//! `qemu-img info --image-opts driver=nbd,path=SOCKET,tls-creds=...`, or `nbdinfo` with
//! `tls-certificates=`, and is admitted if its certificate's DN matches the glob.

use std::sync::Arc;

use nbd_server::{ExportConfig, NbdServer, ServerConfig, TlsAcceptor, TlsConfig};
use qsd_crypto::{AuthzList, Format, Policy, Rule, RuleSet, TlsCredsX509, TlsCredsX509Options};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, socket, glob] = args.as_slice() else {
        return Err("usage: tls_nbd_server DIR SOCKET DN-GLOB".into());
    };
    // QEMU's file layout and sanity checks; errors are QEMU's texts.
    let creds =
        TlsCredsX509::new("tls0", TlsCredsX509Options::new(dir)).map_err(|e| e.qemu_message())?;
    let authz = AuthzList::new(
        "auth0",
        RuleSet {
            policy: Policy::Deny,
            rules: vec![Rule {
                matches: glob.clone(),
                policy: Policy::Allow,
                format: Format::Glob,
            }],
        },
    );
    let config = ServerConfig::default().tls(Some(TlsConfig {
        acceptor: TlsAcceptor::Rustls(creds.server_config()?),
        authorize: Some(Arc::new(authz)),
    }));

    let graph = block_core::NodeGraph::new();
    let node = block_core::open::blockdev_add(
        &graph,
        block_core::BlockdevOptions::from_json(
            serde_json::json!({"driver": "null-co", "node-name": "n", "size": 64 << 20}),
        )?,
    )
    .await?;
    let server = NbdServer::new(config);
    server.add_export(ExportConfig::new(
        "disk",
        node.attach("export 'disk'", false)?,
    ))?;
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket)?;
    let s = server.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        s.stop();
    });
    server.serve_unix(listener).await;
    Ok(())
}
