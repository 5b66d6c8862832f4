//! Reads a `--nbd-server`-style option given on the command line, in keyval or JSON
//! syntax, into a typed struct, and prints it or QEMU's error message.
//!
//! ```text
//! cargo run -p qsd-qapi --example parse-option -- 'addr.type=unix,addr.path=/tmp/nbd.sock'
//! cargo run -p qsd-qapi --example parse-option -- '{"addr": {"type": "unix", "path": 1}}'
//! ```

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
struct NbdServer {
    addr: Addr,
    max_connections: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct Addr {
    #[serde(rename = "type")]
    kind: String,
    path: String,
}

fn main() {
    let arg = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "addr.type=unix,addr.path=/tmp/nbd.sock".to_owned());
    let parsed = qsd_qapi::keyval::parse_json_or_keyval(&arg, None)
        .map_err(|e| e.to_string())
        .and_then(|map| {
            qsd_qapi::from_value::<NbdServer>(serde_json::Value::Object(map))
                .map_err(|e| e.to_string())
        });
    match parsed {
        Ok(opts) => println!("{opts:?}"),
        Err(e) => {
            eprintln!("--nbd-server {arg}: {e}");
            std::process::exit(1);
        }
    }
}
