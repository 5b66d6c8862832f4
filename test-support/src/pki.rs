//! A test PKI made with `certtool` (gnutls-bin), in QEMU's `tls-creds-x509` file layout.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::run_ok;

/// The server key types and sizes QEMU takes, as `certtool --generate-privkey` arguments, by
/// name: RSA of several sizes (2432 bits included, which ring, rustls' former provider,
/// refused: not a multiple of 512), ECDSA P-256 and P-384, Ed25519.
pub const KEY_KINDS: &[(&str, &[&str])] = &[
    ("rsa2048", &["--bits", "2048"]),
    ("rsa2432", &["--bits", "2432"]),
    ("rsa3072", &["--bits", "3072"]),
    ("rsa4096", &["--bits", "4096"]),
    ("p256", &["--key-type", "ecdsa", "--curve", "secp256r1"]),
    ("p384", &["--key-type", "ecdsa", "--curve", "secp384r1"]),
    ("ed25519", &["--key-type", "ed25519"]),
];

/// A test PKI made with certtool, in QEMU's file layout.
pub struct Pki {
    /// Server directory: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`.
    pub server: PathBuf,
    /// A good client: `ca-cert.pem`, `client-cert.pem`, `client-key.pem`, DN
    /// `C=GB,O=Example,CN=client` (QEMU's order).
    pub client: PathBuf,
    /// A second client signed by the same CA, DN `C=GB,O=Example,CN=intruder`.
    pub other_client: PathBuf,
    /// A client whose certificate another CA signed.
    pub foreign_client: PathBuf,
}

fn certtool(args: &[&str], dir: &Path) {
    run_ok(Command::new("certtool").args(args).current_dir(dir));
}

/// Writes `NAME.info` (a certtool template) and makes the private key `NAME-key.pem`.
fn key_and_template(dir: &Path, name: &str, template: &str) {
    std::fs::write(dir.join(format!("{name}.info")), template).expect("write template");
    certtool(
        &[
            "--generate-privkey",
            "--outfile",
            &format!("{name}-key.pem"),
        ],
        dir,
    );
}

fn make_ca(dir: &Path, name: &str) {
    key_and_template(dir, name, &format!("cn = {name}\nca\ncert_signing_key\n"));
    certtool(
        &[
            "--generate-self-signed",
            "--load-privkey",
            &format!("{name}-key.pem"),
            "--template",
            &format!("{name}.info"),
            "--outfile",
            &format!("{name}-cert.pem"),
        ],
        dir,
    );
}

fn issue(dir: &Path, ca: &str, name: &str, template: &str) {
    key_and_template(dir, name, template);
    certtool(
        &[
            "--generate-certificate",
            "--load-privkey",
            &format!("{name}-key.pem"),
            "--load-ca-certificate",
            &format!("{ca}-cert.pem"),
            "--load-ca-privkey",
            &format!("{ca}-key.pem"),
            "--template",
            &format!("{name}.info"),
            "--outfile",
            &format!("{name}-cert.pem"),
        ],
        dir,
    );
}

impl Pki {
    /// Makes the PKI under `root`.
    pub fn create(root: &Path) -> Pki {
        let work = root.join("pki-work");
        std::fs::create_dir_all(&work).expect("mkdir");
        make_ca(&work, "ca");
        make_ca(&work, "otherca");
        let client_tpl = |cn: &str| {
            format!("country = GB\norganization = Example\ncn = {cn}\ntls_www_client\nencryption_key\nsigning_key\n")
        };
        issue(
            &work,
            "ca",
            "server",
            "organization = Example\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\n",
        );
        issue(&work, "ca", "client", &client_tpl("client"));
        issue(&work, "ca", "intruder", &client_tpl("intruder"));
        issue(&work, "otherca", "foreign", &client_tpl("client"));
        let layout = |dir: &str, files: &[(&str, &str)]| {
            let d = root.join(dir);
            std::fs::create_dir_all(&d).expect("mkdir");
            for (from, to) in files {
                std::fs::copy(work.join(from), d.join(to)).expect("copy");
            }
            d
        };
        let client_files = |name: &'static str| {
            [
                ("ca-cert.pem", "ca-cert.pem"),
                (
                    if name == "client" {
                        "client-cert.pem"
                    } else if name == "intruder" {
                        "intruder-cert.pem"
                    } else {
                        "foreign-cert.pem"
                    },
                    "client-cert.pem",
                ),
                (
                    if name == "client" {
                        "client-key.pem"
                    } else if name == "intruder" {
                        "intruder-key.pem"
                    } else {
                        "foreign-key.pem"
                    },
                    "client-key.pem",
                ),
            ]
        };
        Pki {
            server: layout(
                "server",
                &[
                    ("ca-cert.pem", "ca-cert.pem"),
                    ("server-cert.pem", "server-cert.pem"),
                    ("server-key.pem", "server-key.pem"),
                ],
            ),
            client: layout("client", &client_files("client")),
            other_client: layout("intruder", &client_files("intruder")),
            foreign_client: layout("foreign", &client_files("foreign")),
        }
    }
}
