//! TLS credentials objects as qemu-storage-daemon creates them with `--object`/`object-add`:
//! `tls-creds-x509` and, with the `psk` feature, `tls-creds-psk` ([`psk`]); `tls-creds-anon`
//! is refused clearly.
//!
//! A `tls-creds-x509` object reads its PEM files from the directory `dir` at creation, checks
//! them as QEMU's `crypto/tlscredsx509.c` does (`sanity-check`), and keeps a ready
//! [`rustls::ServerConfig`] (endpoint `server`) or [`rustls::ClientConfig`] (endpoint
//! `client`). Files, by endpoint:
//!
//! | endpoint | required | optional |
//! |---|---|---|
//! | `server` | `ca-cert.pem`, `server-cert.pem`, `server-key.pem` | `ca-crl.pem`, `dh-params.pem` (ignored: rustls only does ECDHE) |
//! | `client` | `ca-cert.pem` | `client-cert.pem` + `client-key.pem` |
//!
//! Keys may be PKCS#1 (`RSA PRIVATE KEY`), PKCS#8 (`PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`)
//! PEM: RSA of 2048 to 8192 bits (any size, not only multiples of 512: the crypto provider is
//! aws-lc-rs), ECDSA on P-256, P-384 or P-521, or Ed25519. Another key is refused with what it
//! is and why (e.g. `RSA key of 1024 bits: RSA keys must have 2048 to 8192 bits`; GnuTLS would
//! take it). Encrypted keys (`passwordid`) are refused.
//!
//! Differences from QEMU, which uses GnuTLS:
//! - `priority` is accepted and ignored: rustls has no GnuTLS priority strings; it always
//!   offers TLS 1.3 and TLS 1.2 with its safe defaults (ECDHE, AEAD ciphers only).
//! - A server with `verify-peer=on` refuses a client without a certificate signed by the CA
//!   during the handshake; QEMU completes the handshake and then drops the client. Either
//!   way the client is refused before any NBD data. With `verify-peer=off` the server asks
//!   for no certificate (QEMU asks, but never looks at the answer).
//!
//! The client's identity for `tls-authz` is [`crate::distinguished_name`] of its certificate, in
//! GnuTLS's legacy order (as `gnutls_x509_crt_get_dn` gives it to QEMU), e.g.
//! `C=GB,O=Example,CN=client`.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::dn;
use crate::psk;

/// File names inside `dir`, as QEMU names them (`crypto/tlscredsx509.h`).
pub mod files {
    /// The CA certificate(s) that sign the peers' certificates.
    pub const CA_CERT: &str = "ca-cert.pem";
    /// An optional certificate revocation list (server endpoint).
    pub const CA_CRL: &str = "ca-crl.pem";
    /// The server's certificate (chain).
    pub const SERVER_CERT: &str = "server-cert.pem";
    /// The server's private key.
    pub const SERVER_KEY: &str = "server-key.pem";
    /// The client's certificate (chain).
    pub const CLIENT_CERT: &str = "client-cert.pem";
    /// The client's private key.
    pub const CLIENT_KEY: &str = "client-key.pem";
    /// Diffie-Hellman parameters: checked for access, otherwise ignored.
    pub const DH_PARAMS: &str = "dh-params.pem";
}

/// An error creating or using TLS credentials. Messages are QEMU's where QEMU has one; use
/// [`TlsError::qemu_message`] for the full text QEMU would print (cause included).
#[derive(Debug, Error)]
pub enum TlsError {
    /// No `dir` property.
    #[error("Missing 'dir' property value")]
    MissingDir,
    /// A credentials file cannot be stat'ed (required, or present but inaccessible).
    #[error("Unable to access credentials {}", path.display())]
    Access {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file could not be read.
    #[error("Cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The CA file holds no usable certificate.
    #[error("Unable to import CA certificate list {}", path.display())]
    CaList {
        /// The file.
        path: PathBuf,
        /// Why, if known.
        #[source]
        source: Option<PemError>,
    },
    /// A CA certificate that rustls does not accept as a trust anchor.
    #[error("Cannot load CA certificate '{}'", path.display())]
    CaCert {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// Our own certificate cannot be parsed.
    #[error("Unable to import {} certificate {}", if *server { "server" } else { "client" }, path.display())]
    CertImport {
        /// Whether it is a server certificate.
        server: bool,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: PemError,
    },
    /// A certificate failed QEMU's sanity checks (`sanity-check=on`).
    #[error("{0}")]
    Sanity(String),
    /// The certificate and key cannot be used together.
    #[error("Cannot load certificate '{}' & key '{}'", cert.display(), key.display())]
    CertKey {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why.
        #[source]
        source: CertKeyError,
    },
    /// The CRL file could not be used.
    #[error("Cannot load CRL '{}'", path.display())]
    Crl {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: CertKeyError,
    },
    /// `passwordid` (an encrypted private key) is not supported.
    #[error("tls-creds-x509 property 'passwordid' is not supported: encrypted private keys cannot be loaded, store '{}' decrypted", key.display())]
    PasswordUnsupported {
        /// The key file.
        key: PathBuf,
    },
    /// A credentials type that rustls cannot provide.
    #[error("{qom_type} is not supported: {why}; use tls-creds-x509")]
    UnsupportedType {
        /// The QOM type.
        qom_type: String,
        /// Why.
        why: &'static str,
    },
    /// The credentials are for the other endpoint (QEMU's `qcrypto_tls_creds_check_endpoint`).
    #[error("Expected TLS credentials for a {expected} endpoint")]
    WrongEndpoint {
        /// The endpoint the caller needs.
        expected: Endpoint,
    },
    /// A host name that is neither a DNS name nor an IP address.
    #[error("Invalid TLS hostname '{0}'")]
    BadHostname(String),
    /// rustls refused to build a configuration.
    #[error("Cannot set up TLS")]
    Config(#[source] rustls::Error),
    /// `tls-creds-psk` with endpoint `server` and a `username`.
    #[error("username should not be set when endpoint=server")]
    PskUsernameOnServer,
    /// A client's key cannot be taken from the PSK file.
    #[error(transparent)]
    PskKey(psk::LookupError),
    /// OpenSSL could not be set up for TLS-PSK.
    #[cfg(feature = "psk")]
    #[error("Cannot set up TLS-PSK")]
    PskSetup(#[source] nbd_server::PskError),
}

impl TlsError {
    /// The message as QEMU prints it: this error's text, then its causes, joined by `": "`,
    /// with operating-system errors worded as `strerror` words them (no "(os error N)").
    pub fn qemu_message(&self) -> String {
        qsd_qapi::error_text(self)
    }
}

/// A PEM file's contents could not be used.
#[derive(Debug, Error)]
pub enum PemError {
    /// Malformed PEM.
    #[error("{0}")]
    Pem(String),
    /// No section of the expected kind.
    #[error("No certificate was found")]
    NoCertificate,
    /// No private key section.
    #[error("No private key was found")]
    NoKey,
    /// The key is encrypted.
    #[error("The private key is encrypted (passwordid is not supported)")]
    EncryptedKey,
    /// The certificate is not valid X.509 DER.
    #[error("{0}")]
    X509(String),
}

impl From<rustls::Error> for CertKeyError {
    fn from(e: rustls::Error) -> Self {
        match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                CertKeyError::KeyMismatch
            }
            e => CertKeyError::Rustls(e),
        }
    }
}

impl From<pem::Error> for PemError {
    fn from(e: pem::Error) -> Self {
        PemError::Pem(format!("{e:?}"))
    }
}

/// Why a certificate and key (or a CRL) could not be used.
#[derive(Debug, Error)]
pub enum CertKeyError {
    /// The PEM files are unusable.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// The key is not the certificate's (GnuTLS's wording).
    #[error("The certificate and the given key do not match.")]
    KeyMismatch,
    /// rustls refused them.
    #[error("{0}")]
    Rustls(rustls::Error),
    /// The verifier could not be built.
    #[error("{0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The key is well-formed but of a kind or size the TLS library cannot sign with.
    #[error("{key}: {why}")]
    UnsupportedKey {
        /// What the key is, e.g. `RSA key of 1024 bits`.
        key: String,
        /// What the TLS library accepts instead.
        why: &'static str,
    },
    /// The key is not valid DER (GnuTLS's wording).
    #[error("ASN1 parser: Error in DER parsing.")]
    MalformedKey,
}

/// Which side of a TLS connection the credentials are for (`QCryptoTLSCredsEndpoint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    /// A TLS server (default).
    #[default]
    Server,
    /// A TLS client.
    Client,
}

impl Endpoint {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Server => "server",
            Endpoint::Client => "client",
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The properties of a `tls-creds-x509` object (`TlsCredsX509Properties` in QAPI), by their
/// QAPI names; the object's `id` is not one of them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TlsCredsX509Options {
    /// The directory holding the PEM files (required to load anything).
    pub dir: Option<PathBuf>,
    /// Server or client credentials.
    #[serde(default)]
    pub endpoint: Endpoint,
    /// Whether to verify the peer's certificate (default true).
    #[serde(default = "yes")]
    pub verify_peer: bool,
    /// A GnuTLS priority string: accepted and ignored.
    pub priority: Option<String>,
    /// Whether to run QEMU's checks on the certificates at creation (default true).
    #[serde(default = "yes")]
    pub sanity_check: bool,
    /// Id of a secret holding the key's password: refused.
    pub passwordid: Option<String>,
}

pub(crate) fn yes() -> bool {
    true
}

impl Default for TlsCredsX509Options {
    /// Endpoint server, verify-peer and sanity-check on, no `dir`.
    fn default() -> Self {
        TlsCredsX509Options {
            dir: None,
            endpoint: Endpoint::Server,
            verify_peer: true,
            priority: None,
            sanity_check: true,
            passwordid: None,
        }
    }
}

impl TlsCredsX509Options {
    /// The defaults with credentials from `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        TlsCredsX509Options {
            dir: Some(dir.into()),
            ..TlsCredsX509Options::default()
        }
    }
}

/// Refuses the TLS credentials types this build cannot provide; `Ok` for `tls-creds-x509`
/// (and `tls-creds-psk` with the `psk` feature).
pub fn check_creds_type(qom_type: &str) -> Result<(), TlsError> {
    let why = match qom_type {
        #[cfg(not(feature = "psk"))]
        "tls-creds-psk" => "this build has no TLS-PSK (the cargo feature 'psk', through OpenSSL)",
        "tls-creds-anon" => {
            "the TLS library (rustls) has no anonymous (certificate-less) cipher suites"
        }
        _ => return Ok(()),
    };
    Err(TlsError::UnsupportedType {
        qom_type: qom_type.to_string(),
        why,
    })
}

/// A loaded `tls-creds-x509` object.
pub struct TlsCredsX509 {
    id: String,
    options: TlsCredsX509Options,
    server: Option<Arc<ServerConfig>>,
    client: Option<Arc<ClientConfig>>,
    /// The client configuration that checks the server's chain but not its name.
    client_nameless: Option<Arc<ClientConfig>>,
}

impl fmt::Debug for TlsCredsX509 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCredsX509")
            .field("id", &self.id)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// The files of one endpoint, after QEMU's path checks.
struct Paths {
    ca_cert: PathBuf,
    ca_crl: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// QEMU's `qcrypto_tls_creds_get_path`: `dir/name`, which must exist if `required`; an
/// optional file that is absent is `None`, one that exists but cannot be stat'ed is an error.
pub(crate) fn creds_path(
    dir: &Path,
    name: &str,
    required: bool,
) -> Result<Option<PathBuf>, TlsError> {
    let path = PathBuf::from(format!("{}/{}", dir.display(), name));
    match std::fs::metadata(&path) {
        Ok(_) => Ok(Some(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound && !required => Ok(None),
        Err(source) => Err(TlsError::Access { path, source }),
    }
}

/// rustls with aws-lc-rs: unlike ring, it signs with RSA keys of any size from 2048 to 8192
/// bits (GnuTLS's `certtool` makes e.g. 2432-bit keys), ECDSA P-256/P-384/P-521 and Ed25519.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Checks that the provider can sign with `key`; if not, says what the key is and what the
/// provider accepts instead (rustls itself only says "failed to parse private key").
fn check_signing_key(
    provider: &CryptoProvider,
    key: &PrivateKeyDer<'_>,
) -> Result<(), CertKeyError> {
    match provider.key_provider.load_private_key(key.clone_key()) {
        Ok(_) => Ok(()),
        Err(e) => Err(keyinfo::refusal(key).unwrap_or(CertKeyError::Rustls(e))),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_certs(pem_data: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let mut certs = Vec::new();
    for item in CertificateDer::pem_slice_iter(pem_data) {
        certs.push(item?);
    }
    if certs.is_empty() {
        return Err(PemError::NoCertificate);
    }
    Ok(certs)
}

fn parse_key(pem_data: &[u8]) -> Result<PrivateKeyDer<'static>, PemError> {
    match PrivateKeyDer::from_pem_slice(pem_data) {
        Ok(key) => Ok(key),
        Err(pem::Error::NoItemsFound) => {
            // `ENCRYPTED PRIVATE KEY` (PKCS#8) or `Proc-Type: 4,ENCRYPTED` (legacy PEM).
            let encrypted = String::from_utf8_lossy(pem_data).contains("ENCRYPTED");
            Err(if encrypted {
                PemError::EncryptedKey
            } else {
                PemError::NoKey
            })
        }
        Err(e) => Err(e.into()),
    }
}

impl TlsCredsX509 {
    /// Loads and checks the credentials of object `id` as QEMU does at object creation.
    pub fn new(
        id: impl Into<String>,
        options: TlsCredsX509Options,
    ) -> Result<TlsCredsX509, TlsError> {
        let id = id.into();
        let dir = options.dir.as_deref().ok_or(TlsError::MissingDir)?;
        let server = options.endpoint == Endpoint::Server;
        let paths = if server {
            let ca_cert = creds_path(dir, files::CA_CERT, true)?;
            let ca_crl = creds_path(dir, files::CA_CRL, false)?;
            let cert = creds_path(dir, files::SERVER_CERT, true)?;
            let key = creds_path(dir, files::SERVER_KEY, true)?;
            if let Some(dh) = creds_path(dir, files::DH_PARAMS, false)? {
                tracing::debug!(%id, file = %dh.display(), "ignored: rustls only uses ECDHE");
            }
            Paths {
                ca_cert: ca_cert.unwrap_or_default(),
                ca_crl,
                cert,
                key,
            }
        } else {
            let ca_cert = creds_path(dir, files::CA_CERT, true)?;
            let cert = creds_path(dir, files::CLIENT_CERT, false)?;
            let key = creds_path(dir, files::CLIENT_KEY, false)?;
            Paths {
                ca_cert: ca_cert.unwrap_or_default(),
                ca_crl: None,
                cert,
                key,
            }
        };
        if options.passwordid.is_some() {
            return Err(TlsError::PasswordUnsupported {
                key: paths
                    .key
                    .clone()
                    .unwrap_or_else(|| dir.join(files::SERVER_KEY)),
            });
        }
        if let Some(priority) = &options.priority {
            tracing::debug!(%id, %priority, "TLS priority ignored: rustls uses its safe defaults");
        }
        if !options.verify_peer && !server {
            tracing::warn!(
                %id,
                "tls-creds-x509 with verify-peer=off: the server's certificate is not checked"
            );
        }

        // The own certificate and key, if both exist (always on a server). As in QEMU, the
        // certificate is read before the CA list.
        let own = match (&paths.cert, &paths.key) {
            (Some(cert_path), Some(key_path)) => {
                let cert_pem = read_file(cert_path)?;
                let chain = parse_certs(&cert_pem).map_err(|source| TlsError::CertImport {
                    server,
                    path: cert_path.clone(),
                    source,
                })?;
                Some((cert_path.clone(), key_path.clone(), chain))
            }
            _ => None,
        };

        let provider = provider();
        let ca_pem = read_file(&paths.ca_cert)?;
        let ca_certs = parse_certs(&ca_pem).map_err(|e| TlsError::CaList {
            path: paths.ca_cert.clone(),
            source: Some(e),
        })?;
        let mut roots = RootCertStore::empty();
        for c in &ca_certs {
            roots.add(c.clone()).map_err(|source| TlsError::CaCert {
                path: paths.ca_cert.clone(),
                source,
            })?;
        }
        let roots = Arc::new(roots);

        if options.sanity_check {
            sanity::check(
                server,
                &paths.ca_cert,
                &ca_certs,
                own.as_ref()
                    .map(|(p, _, chain)| (p.as_path(), chain.as_slice())),
                &roots,
                &provider,
            )?;
        }

        let cert_key = match own {
            Some((cert_path, key_path, chain)) => {
                let key_pem = read_file(&key_path)?;
                let key = parse_key(&key_pem).map_err(|e| TlsError::CertKey {
                    cert: cert_path.clone(),
                    key: key_path.clone(),
                    source: e.into(),
                })?;
                check_signing_key(&provider, &key).map_err(|source| TlsError::CertKey {
                    cert: cert_path.clone(),
                    key: key_path.clone(),
                    source,
                })?;
                Some((cert_path, key_path, chain, key))
            }
            None => None,
        };

        let versions = rustls::DEFAULT_VERSIONS;
        let (server_cfg, client_cfg) = if server {
            let Some((cert_path, key_path, chain, key)) = cert_key else {
                // Unreachable: a server's certificate and key are required files.
                return Err(TlsError::Config(rustls::Error::General(
                    "no server certificate".into(),
                )));
            };
            let builder = ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(versions)
                .map_err(TlsError::Config)?;
            let builder = if options.verify_peer {
                let verifier = client_verifier(&roots, paths.ca_crl.as_deref(), &provider)?;
                builder.with_client_cert_verifier(verifier)
            } else {
                builder.with_no_client_auth()
            };
            let cfg = builder
                .with_single_cert(chain, key)
                .map_err(|e| TlsError::CertKey {
                    cert: cert_path,
                    key: key_path,
                    source: e.into(),
                })?;
            (Some(Arc::new(cfg)), None)
        } else {
            // The verifiers: the chain and the name, or (no name to check, as QEMU's client
            // over a unix socket without tls-hostname) the chain alone; none with
            // verify-peer=off.
            let (named, nameless): (Arc<dyn ServerCertVerifier>, Arc<dyn ServerCertVerifier>) =
                if options.verify_peer {
                    let webpki = WebPkiServerVerifier::builder_with_provider(
                        roots.clone(),
                        provider.clone(),
                    )
                    .build()
                    .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
                    let nameless = NoServerVerification {
                        chain: Some(webpki.clone()),
                        provider: provider.clone(),
                    };
                    (webpki, Arc::new(nameless))
                } else {
                    let none = Arc::new(NoServerVerification {
                        chain: None,
                        provider: provider.clone(),
                    });
                    (none.clone(), none)
                };
            let mut configs = Vec::new();
            for verifier in [named, nameless] {
                let builder = ClientConfig::builder_with_provider(provider.clone())
                    .with_protocol_versions(versions)
                    .map_err(TlsError::Config)?
                    .dangerous()
                    .with_custom_certificate_verifier(verifier);
                let cfg = match &cert_key {
                    Some((cert_path, key_path, chain, key)) => builder
                        .with_client_auth_cert(chain.clone(), key.clone_key())
                        .map_err(|e| TlsError::CertKey {
                            cert: cert_path.clone(),
                            key: key_path.clone(),
                            source: e.into(),
                        })?,
                    None => builder.with_no_client_auth(),
                };
                configs.push(Arc::new(cfg));
            }
            let nameless = configs.pop();
            let named = configs.pop();
            return Ok(TlsCredsX509 {
                id,
                options,
                server: None,
                client: named,
                client_nameless: nameless,
            });
        };
        Ok(TlsCredsX509 {
            id,
            options,
            server: server_cfg,
            client: client_cfg,
            client_nameless: None,
        })
    }

    /// The object's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The properties it was created with.
    pub fn options(&self) -> &TlsCredsX509Options {
        &self.options
    }

    /// Server or client credentials.
    pub fn endpoint(&self) -> Endpoint {
        self.options.endpoint
    }

    /// Whether the peer's certificate is verified. A server with `verify-peer=off` must not
    /// run `tls-authz` either: QEMU only checks authorization when it verifies the peer.
    pub fn verify_peer(&self) -> bool {
        self.options.verify_peer
    }

    /// The configuration of a TLS server (for `tokio_rustls::TlsAcceptor`); fails with
    /// QEMU's message if these are client credentials.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.server.clone().ok_or(TlsError::WrongEndpoint {
            expected: Endpoint::Server,
        })
    }

    /// The configuration of a TLS client (for `tokio_rustls::TlsConnector`); fails with
    /// QEMU's message if these are server credentials. Connect with [`server_name`].
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        self.client.clone().ok_or(TlsError::WrongEndpoint {
            expected: Endpoint::Client,
        })
    }

    /// As [`client_config`](Self::client_config), for a connection with no host name to
    /// check the server's certificate against (QEMU's client over a unix socket without
    /// `tls-hostname`): the chain is verified, the name is not. Connect with any
    /// [`server_name`].
    pub fn client_config_without_hostname(&self) -> Result<Arc<ClientConfig>, TlsError> {
        self.client_nameless.clone().ok_or(TlsError::WrongEndpoint {
            expected: Endpoint::Client,
        })
    }
}

/// The name a client checks the server's certificate against (`tls-hostname`): a DNS name
/// or an IP address.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_string()).map_err(|_| TlsError::BadHostname(host.to_string()))
}

fn client_verifier(
    roots: &Arc<RootCertStore>,
    crl: Option<&Path>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut builder = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone());
    if let Some(path) = crl {
        let data = read_file(path)?;
        let mut crls = Vec::new();
        for item in CertificateRevocationListDer::pem_slice_iter(&data) {
            crls.push(item.map_err(|e| TlsError::Crl {
                path: path.to_path_buf(),
                source: PemError::from(e).into(),
            })?);
        }
        builder = builder.with_crls(crls);
    }
    builder.build().map_err(|e| match crl {
        Some(path) => TlsError::Crl {
            path: path.to_path_buf(),
            source: e.into(),
        },
        None => TlsError::Config(rustls::Error::General(e.to_string())),
    })
}

/// A client that checks less than webpki does: with `chain`, the server's certificate chain
/// but not its name (see [`TlsCredsX509::client_config_without_hostname`]); without,
/// nothing (`verify-peer=off`: QEMU skips the check entirely). Handshake signatures are
/// still verified, so the peer holds the certificate's key.
#[derive(Debug)]
struct NoServerVerification {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NoServerVerification {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// QEMU's `qcrypto_tls_creds_x509_sanity_check`, message for message.
mod sanity {
    use super::*;
    use x509_parser::oid_registry::{
        OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_EXTENDED_KEY_USAGE, OID_X509_EXT_KEY_USAGE,
    };

    fn fail(msg: String) -> TlsError {
        TlsError::Sanity(msg)
    }

    fn parse<'a>(
        der: &'a [u8],
        path: &Path,
        server: bool,
    ) -> Result<X509Certificate<'a>, TlsError> {
        X509Certificate::from_der(der)
            .map(|(_, c)| c)
            .map_err(|e| TlsError::CertImport {
                server,
                path: path.to_path_buf(),
                source: PemError::X509(e.to_string()),
            })
    }

    pub(super) fn check(
        server: bool,
        ca_path: &Path,
        ca_certs: &[CertificateDer<'static>],
        own: Option<(&Path, &[CertificateDer<'static>])>,
        roots: &Arc<RootCertStore>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<(), TlsError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        if let Some((path, chain)) = own {
            if let Some(leaf) = chain.first() {
                let cert = parse(leaf, path, server)?;
                check_cert(&cert, path, server, false, now)?;
            }
        }
        for der in ca_certs {
            let cert = X509Certificate::from_der(der)
                .map(|(_, c)| c)
                .map_err(|e| TlsError::CaList {
                    path: ca_path.to_path_buf(),
                    source: Some(PemError::X509(e.to_string())),
                })?;
            check_cert(&cert, ca_path, server, true, now)?;
        }
        if let Some((path, chain)) = own {
            check_pair(server, path, chain, ca_path, roots, provider)?;
        }
        Ok(())
    }

    fn check_cert(
        cert: &X509Certificate<'_>,
        file: &Path,
        server: bool,
        ca: bool,
        now: i64,
    ) -> Result<(), TlsError> {
        let file = file.display();
        let what = if ca {
            "CA"
        } else if server {
            "server"
        } else {
            "client"
        };
        let role = if server { "server" } else { "client" };
        // Times.
        if cert.validity().not_after.timestamp() < now {
            return Err(fail(format!("The {what} certificate {file} has expired")));
        }
        if cert.validity().not_before.timestamp() > now {
            return Err(fail(format!(
                "The {what} certificate {file} is not yet active"
            )));
        }
        // Basic constraints.
        let bc = cert
            .get_extension_unique(&OID_X509_EXT_BASIC_CONSTRAINTS)
            .map_err(|e| {
                fail(format!(
                    "Unable to query certificate {file} basic constraints: {e}"
                ))
            })?;
        match bc.map(|ext| ext.parsed_extension()) {
            Some(x509_parser::extensions::ParsedExtension::BasicConstraints(b)) => {
                if b.ca && !ca {
                    return Err(fail(format!(
                        "The certificate {file} basic constraints show a CA, but we need one for a {role}"
                    )));
                }
                if !b.ca && ca {
                    return Err(fail(format!(
                        "The certificate {file} basic constraints do not show a CA"
                    )));
                }
            }
            Some(_) => {
                return Err(fail(format!(
                    "Unable to query certificate {file} basic constraints: invalid extension"
                )))
            }
            None if ca => {
                return Err(fail(format!(
                    "The certificate {file} is missing basic constraints for a CA"
                )))
            }
            None => {}
        }
        // Key usage.
        let ku = cert
            .get_extension_unique(&OID_X509_EXT_KEY_USAGE)
            .map_err(|e| fail(format!("Unable to query certificate {file} key usage: {e}")))?;
        if let Some(ext) = ku {
            let critical = ext.critical;
            let x509_parser::extensions::ParsedExtension::KeyUsage(usage) = ext.parsed_extension()
            else {
                return Err(fail(format!(
                    "Unable to query certificate {file} key usage: invalid extension"
                )));
            };
            if ca {
                if !usage.key_cert_sign() && critical {
                    return Err(fail(format!(
                        "Certificate {file} usage does not permit certificate signing"
                    )));
                }
            } else {
                if !usage.digital_signature() && critical {
                    return Err(fail(format!(
                        "Certificate {file} usage does not permit digital signature"
                    )));
                }
                if !usage.key_encipherment() && critical {
                    return Err(fail(format!(
                        "Certificate {file} usage does not permit key encipherment"
                    )));
                }
            }
        }
        // Key purpose (not for CAs).
        if !ca {
            let eku = cert
                .get_extension_unique(&OID_X509_EXT_EXTENDED_KEY_USAGE)
                .map_err(|e| {
                    fail(format!(
                        "Unable to query certificate {file} key purpose: {e}"
                    ))
                })?;
            if let Some(ext) = eku {
                let critical = ext.critical;
                let x509_parser::extensions::ParsedExtension::ExtendedKeyUsage(p) =
                    ext.parsed_extension()
                else {
                    return Err(fail(format!(
                        "Unable to query certificate {file} key purpose: invalid extension"
                    )));
                };
                let allow_server = p.server_auth || p.any;
                let allow_client = p.client_auth || p.any;
                if server && !allow_server && critical {
                    return Err(fail(format!(
                        "Certificate {file} purpose does not allow use with a TLS server"
                    )));
                }
                if !server && !allow_client && critical {
                    return Err(fail(format!(
                        "Certificate {file} purpose does not allow use with a TLS client"
                    )));
                }
            }
        }
        Ok(())
    }

    fn check_pair(
        server: bool,
        path: &Path,
        chain: &[CertificateDer<'static>],
        ca_path: &Path,
        roots: &Arc<RootCertStore>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<(), TlsError> {
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Ok(());
        };
        let now = UnixTime::now();
        let result = if server {
            let verifier =
                WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                    .build()
                    .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
            // Only the chain is checked here, not the name: any name does.
            let name = server_name("name.invalid")?;
            verifier
                .verify_server_cert(leaf, intermediates, &name, &[], now)
                .map(|_| ())
        } else {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                    .build()
                    .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
            verifier
                .verify_client_cert(leaf, intermediates, now)
                .map(|_| ())
        };
        let reason = match result {
            Ok(()) => return Ok(()),
            Err(rustls::Error::InvalidCertificate(e)) => match e {
                // Name and purpose are not part of QEMU's pair check.
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. }
                | CertificateError::InvalidPurpose
                | CertificateError::InvalidPurposeContext { .. } => return Ok(()),
                CertificateError::UnknownIssuer => "The certificate hasn't got a known issuer",
                CertificateError::BadSignature => "The certificate is not trusted",
                CertificateError::Revoked => "The certificate has been revoked",
                CertificateError::UnsupportedSignatureAlgorithmContext { .. }
                | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
                    "The certificate uses an insecure algorithm"
                }
                _ => "Invalid certificate",
            },
            Err(_) => "Invalid certificate",
        };
        Err(fail(format!(
            "Our own certificate {} failed validation against {}: {reason}",
            path.display(),
            ca_path.display()
        )))
    }
}

/// What a private key is, for the message that refuses it.
mod keyinfo {
    use super::dn::{children, oid_string, read_tlv, Tlv};
    use super::CertKeyError;
    use rustls::pki_types::PrivateKeyDer;

    const SEQUENCE: u32 = 0x30;
    const INTEGER: u32 = 0x02;
    const OCTET_STRING: u32 = 0x04;
    const OID: u32 = 0x06;
    /// `[0]` EXPLICIT, the curve of a SEC1 key.
    const CONTEXT_0: u32 = 0xa0;

    const RSA_MIN_BITS: usize = 2048;
    const RSA_MAX_BITS: usize = 8192;

    fn seq(der: &[u8]) -> Option<Vec<Tlv<'_>>> {
        let (tlv, rest) = read_tlv(der).ok()?;
        (tlv.tag == SEQUENCE && rest.is_empty())
            .then(|| children(tlv.content).ok())
            .flatten()
    }

    /// Bits of a DER INTEGER's contents (a positive modulus).
    fn integer_bits(content: &[u8]) -> usize {
        let digits: Vec<u8> = content.iter().copied().skip_while(|&b| b == 0).collect();
        match digits.first() {
            Some(&top) => digits.len() * 8 - top.leading_zeros() as usize,
            None => 0,
        }
    }

    /// The modulus size of a PKCS#1 `RSAPrivateKey`.
    fn rsa_bits(der: &[u8]) -> Option<usize> {
        let fields = seq(der)?;
        match fields.as_slice() {
            [version, modulus, ..] if version.tag == INTEGER && modulus.tag == INTEGER => {
                Some(integer_bits(modulus.content))
            }
            _ => None,
        }
    }

    fn curve_name(oid: &str) -> String {
        match oid {
            "1.2.840.10045.3.1.7" => "P-256".into(),
            "1.3.132.0.34" => "P-384".into(),
            "1.3.132.0.35" => "P-521".into(),
            "1.3.132.0.10" => "secp256k1".into(),
            "1.2.840.10045.3.1.1" => "P-192".into(),
            "1.3.132.0.33" => "P-224".into(),
            other => format!("curve {other}"),
        }
    }

    fn rsa(bits: usize) -> Option<CertKeyError> {
        (!(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits)).then(|| CertKeyError::UnsupportedKey {
            key: format!("RSA key of {bits} bits"),
            why: "RSA keys must have 2048 to 8192 bits",
        })
    }

    fn ecdsa(curve: String) -> CertKeyError {
        CertKeyError::UnsupportedKey {
            key: format!("ECDSA key on {curve}"),
            why: "ECDSA keys must be on P-256, P-384 or P-521",
        }
    }

    fn other(what: String) -> CertKeyError {
        CertKeyError::UnsupportedKey {
            key: what,
            why: "keys must be RSA (2048 to 8192 bits), ECDSA (P-256, P-384, P-521) or Ed25519",
        }
    }

    /// Why the TLS library refuses `key`, from its own structure: its algorithm and size.
    /// `None` if the key looks like one it supports (then the library's own error stands).
    pub(super) fn refusal(key: &PrivateKeyDer<'_>) -> Option<CertKeyError> {
        match key {
            PrivateKeyDer::Pkcs1(k) => match rsa_bits(k.secret_pkcs1_der()) {
                Some(bits) => rsa(bits),
                None => Some(CertKeyError::MalformedKey),
            },
            PrivateKeyDer::Sec1(k) => {
                let Some(fields) = seq(k.secret_sec1_der()) else {
                    return Some(CertKeyError::MalformedKey);
                };
                let curve = fields.iter().find(|f| f.tag == CONTEXT_0).and_then(|f| {
                    let (oid, _) = read_tlv(f.content).ok()?;
                    (oid.tag == OID).then(|| oid_string(oid.content).ok())?
                });
                match curve.as_deref().map(curve_name) {
                    Some(c) if matches!(c.as_str(), "P-256" | "P-384" | "P-521") => None,
                    Some(c) => Some(ecdsa(c)),
                    None => Some(CertKeyError::MalformedKey),
                }
            }
            PrivateKeyDer::Pkcs8(k) => {
                let Some(fields) = seq(k.secret_pkcs8_der()) else {
                    return Some(CertKeyError::MalformedKey);
                };
                let [version, algorithm, private, ..] = fields.as_slice() else {
                    return Some(CertKeyError::MalformedKey);
                };
                if version.tag != INTEGER
                    || algorithm.tag != SEQUENCE
                    || private.tag != OCTET_STRING
                {
                    return Some(CertKeyError::MalformedKey);
                }
                let Ok(alg) = children(algorithm.content) else {
                    return Some(CertKeyError::MalformedKey);
                };
                let oid = match alg.first() {
                    Some(t) if t.tag == OID => oid_string(t.content).ok()?,
                    _ => return Some(CertKeyError::MalformedKey),
                };
                match oid.as_str() {
                    // rsaEncryption, RSASSA-PSS: the key is a PKCS#1 RSAPrivateKey.
                    "1.2.840.113549.1.1.1" | "1.2.840.113549.1.1.10" => {
                        match rsa_bits(private.content) {
                            Some(bits) => rsa(bits),
                            None => Some(CertKeyError::MalformedKey),
                        }
                    }
                    "1.2.840.10045.2.1" => {
                        let curve = match alg.get(1) {
                            Some(t) if t.tag == OID => curve_name(&oid_string(t.content).ok()?),
                            _ => return Some(CertKeyError::MalformedKey),
                        };
                        if matches!(curve.as_str(), "P-256" | "P-384" | "P-521") {
                            None
                        } else {
                            Some(ecdsa(curve))
                        }
                    }
                    "1.3.101.112" => None,
                    "1.3.101.113" => Some(other("Ed448 key".into())),
                    "1.2.840.10040.4.1" => Some(other("DSA key".into())),
                    "1.2.643.7.1.1.1.1" | "1.2.643.7.1.1.1.2" => Some(other("GOST key".into())),
                    other_oid => Some(other(format!("key of algorithm {other_oid}"))),
                }
            }
            _ => None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dn::distinguished_name;
    use std::process::{Command, Stdio};

    pub(crate) use test_support::{require_tool as have_tool, run_stdout as run};

    /// A temporary directory (removed at drop) with subdirectories made on demand.
    pub(crate) struct TempDir(tempfile::TempDir);

    impl TempDir {
        pub(crate) fn new() -> TempDir {
            TempDir(tempfile::tempdir().expect("temporary directory"))
        }

        pub(crate) fn path(&self) -> &Path {
            self.0.path()
        }

        pub(crate) fn sub(&self, name: &str) -> PathBuf {
            let p = self.0.path().join(name);
            std::fs::create_dir_all(&p).expect("mkdir");
            p
        }
    }

    /// Key types and PEM formats.
    #[derive(Clone, Copy, Debug)]
    pub(crate) enum KeyKind {
        /// RSA, PKCS#1 (`RSA PRIVATE KEY`), by certtool.
        RsaPkcs1,
        /// RSA, PKCS#8, by openssl (certtool's PKCS#8 is always encrypted).
        RsaPkcs8,
        /// ECDSA P-256, SEC1 (`EC PRIVATE KEY`), by openssl.
        EcSec1,
        /// ECDSA P-256, PKCS#8, by openssl.
        EcPkcs8,
    }

    pub(crate) fn gen_key(path: &Path, kind: KeyKind) {
        match kind {
            KeyKind::RsaPkcs1 => {
                // certtool writes `RSA PRIVATE KEY` after a text description.
                run(Command::new("certtool")
                    .args(["--generate-privkey", "--bits", "2048", "--outfile"])
                    .arg(path));
            }
            KeyKind::RsaPkcs8 => {
                run(Command::new("openssl")
                    .args([
                        "genpkey",
                        "-algorithm",
                        "RSA",
                        "-pkeyopt",
                        "rsa_keygen_bits:2048",
                        "-out",
                    ])
                    .arg(path));
            }
            KeyKind::EcSec1 => {
                run(Command::new("openssl")
                    .args([
                        "ecparam",
                        "-name",
                        "prime256v1",
                        "-genkey",
                        "-noout",
                        "-out",
                    ])
                    .arg(path));
            }
            KeyKind::EcPkcs8 => {
                run(Command::new("openssl")
                    .args([
                        "genpkey",
                        "-algorithm",
                        "EC",
                        "-pkeyopt",
                        "ec_paramgen_curve:P-256",
                        "-out",
                    ])
                    .arg(path));
            }
        }
    }

    /// A CA made by certtool: `dir/ca-key.pem`, `dir/ca-cert.pem`.
    pub(crate) struct Ca {
        pub(crate) key: PathBuf,
        pub(crate) cert: PathBuf,
    }

    pub(crate) fn make_ca(dir: &Path, cn: &str) -> Ca {
        let key = dir.join("ca-key.pem");
        let cert = dir.join("ca-cert.pem");
        let tmpl = dir.join("ca.info");
        std::fs::write(
            &tmpl,
            format!("cn = \"{cn}\"\nca\ncert_signing_key\nexpiration_days = 30\n"),
        )
        .unwrap();
        gen_key(&key, KeyKind::RsaPkcs1);
        run(Command::new("certtool")
            .arg("--generate-self-signed")
            .arg("--load-privkey")
            .arg(&key)
            .arg("--template")
            .arg(&tmpl)
            .arg("--outfile")
            .arg(&cert));
        Ca { key, cert }
    }

    /// Issues `out` for `key` with certtool and the template text `tmpl`.
    pub(crate) fn certtool_issue(ca: &Ca, key: &Path, tmpl: &str, out: &Path) {
        let t = out.with_extension("info");
        std::fs::write(&t, tmpl).unwrap();
        run(Command::new("certtool")
            .arg("--generate-certificate")
            .arg("--load-privkey")
            .arg(key)
            .arg("--load-ca-certificate")
            .arg(&ca.cert)
            .arg("--load-ca-privkey")
            .arg(&ca.key)
            .arg("--template")
            .arg(&t)
            .arg("--outfile")
            .arg(out));
    }

    /// Issues `out` for `key` with openssl, subject `subj` (openssl's `/A=b/C=d` form).
    pub(crate) fn openssl_issue(ca: &Ca, key: &Path, subj: &str, client: bool, out: &Path) {
        let csr = out.with_extension("csr");
        let ext = out.with_extension("ext");
        let (purpose, san) = if client {
            ("clientAuth", "")
        } else {
            ("serverAuth", "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        };
        std::fs::write(
            &ext,
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage={purpose}\n{san}"
            ),
        )
        .unwrap();
        run(Command::new("openssl")
            .args(["req", "-new", "-utf8", "-key"])
            .arg(key)
            .args(["-subj", subj, "-out"])
            .arg(&csr));
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "30", "-set_serial", "7", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(&ca.cert)
            .arg("-CAkey")
            .arg(&ca.key)
            .arg("-extfile")
            .arg(&ext)
            .arg("-out")
            .arg(out));
    }

    pub(crate) const SERVER_TMPL: &str = "organization = Example\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\nexpiration_days = 30\n";
    pub(crate) const CLIENT_TMPL: &str = "country = GB\nstate = London\nlocality = City Of London\norganization = \"Example, Inc.\"\nunit = Eng+Ops\ncn = \"client \\\"one\\\"\"\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 30\n";
    /// The DN of [`CLIENT_TMPL`], as qemu-storage-daemon 10.0 logs it when it refuses it.
    pub(crate) const CLIENT_DN: &str =
        "C=GB,ST=London,L=City Of London,O=Example\\, Inc.,OU=Eng\\+Ops,CN=client \\\"one\\\"";

    /// A CA, a server directory and a client directory, as QEMU wants them.
    pub(crate) struct Pki {
        pub(crate) tmp: TempDir,
        pub(crate) ca: Ca,
        pub(crate) server_dir: PathBuf,
        pub(crate) client_dir: PathBuf,
    }

    /// The subjects of [`SERVER_TMPL`] and [`CLIENT_TMPL`] in openssl's `-subj` form.
    const SERVER_SUBJ: &str = "/O=Example/CN=localhost";
    const CLIENT_SUBJ: &str =
        "/C=GB/ST=London/L=City Of London/O=Example, Inc./OU=Eng\\+Ops/CN=client \"one\"";

    /// Makes a PKI: a certtool CA, server and client keys of `kind`. RSA certificates are
    /// issued by certtool; ECDSA ones by openssl, because certtool leaves key encipherment
    /// out of an ECDSA certificate's critical key usage, which QEMU (and we) refuse.
    pub(crate) fn make_pki(kind: KeyKind) -> Pki {
        let tmp = TempDir::new();
        let ca = make_ca(&tmp.sub("ca"), "Test CA");
        let server_dir = tmp.sub("server");
        let client_dir = tmp.sub("client");
        std::fs::copy(&ca.cert, server_dir.join(files::CA_CERT)).unwrap();
        std::fs::copy(&ca.cert, client_dir.join(files::CA_CERT)).unwrap();
        let issue = |dir: &Path, key: &str, cert: &str, tmpl: &str, subj: &str, client: bool| {
            gen_key(&dir.join(key), kind);
            match kind {
                KeyKind::RsaPkcs1 | KeyKind::RsaPkcs8 => {
                    certtool_issue(&ca, &dir.join(key), tmpl, &dir.join(cert))
                }
                KeyKind::EcSec1 | KeyKind::EcPkcs8 => {
                    openssl_issue(&ca, &dir.join(key), subj, client, &dir.join(cert))
                }
            }
        };
        issue(
            &server_dir,
            files::SERVER_KEY,
            files::SERVER_CERT,
            SERVER_TMPL,
            SERVER_SUBJ,
            false,
        );
        issue(
            &client_dir,
            files::CLIENT_KEY,
            files::CLIENT_CERT,
            CLIENT_TMPL,
            CLIENT_SUBJ,
            true,
        );
        Pki {
            tmp,
            ca,
            server_dir,
            client_dir,
        }
    }

    /// Properties as the command line gives them (`on`/`off` for booleans), typed.
    pub(crate) fn options<T: serde::de::DeserializeOwned>(pairs: &[(&str, &str)]) -> T {
        let map: serde_json::Map<String, serde_json::Value> = pairs
            .iter()
            .map(|(k, v)| {
                let v = match *v {
                    "on" => serde_json::Value::Bool(true),
                    "off" => serde_json::Value::Bool(false),
                    v => serde_json::Value::from(v),
                };
                (k.to_string(), v)
            })
            .collect();
        serde_json::from_value(serde_json::Value::Object(map)).unwrap()
    }

    pub(crate) fn creds(
        dir: &Path,
        endpoint: &str,
        extra: &[(&str, &str)],
    ) -> Result<TlsCredsX509, TlsError> {
        let dir = dir.to_string_lossy();
        let mut p = vec![("dir", &*dir), ("endpoint", endpoint)];
        p.extend_from_slice(extra);
        TlsCredsX509::new("tls0", options(&p))
    }

    // ----- creation errors -----

    #[test]
    fn options_have_qemu_names_and_defaults() {
        assert_eq!(
            TlsCredsX509::new("t", TlsCredsX509Options::default())
                .unwrap_err()
                .qemu_message(),
            "Missing 'dir' property value"
        );
        let o: TlsCredsX509Options = options(&[
            ("dir", "/d"),
            ("endpoint", "client"),
            ("verify-peer", "off"),
            ("sanity-check", "off"),
            ("priority", "NORMAL:-VERS-TLS1.0"),
        ]);
        assert_eq!(o.endpoint, Endpoint::Client);
        assert!(!o.verify_peer && !o.sanity_check);
        assert_eq!(o.priority.as_deref(), Some("NORMAL:-VERS-TLS1.0"));
        let o: TlsCredsX509Options = options(&[("verify-peer", "off")]);
        assert!(!o.verify_peer && o.sanity_check && o.endpoint == Endpoint::Server);
        assert_eq!(
            o,
            TlsCredsX509Options {
                verify_peer: false,
                ..Default::default()
            }
        );
    }

    #[test]
    fn missing_files_are_named_as_qemu_names_them() {
        let e = |dir: &Path, ep: &str| creds(dir, ep, &[]).unwrap_err().qemu_message();
        assert_eq!(
            e(Path::new("/nonexistent"), "server"),
            "Unable to access credentials /nonexistent/ca-cert.pem: No such file or directory"
        );
        assert_eq!(
            e(Path::new("/nonexistent"), "client"),
            "Unable to access credentials /nonexistent/ca-cert.pem: No such file or directory"
        );
        let tmp = TempDir::new();
        std::fs::write(tmp.path().join(files::CA_CERT), "garbage\n").unwrap();
        let d = tmp.path().display().to_string();
        assert_eq!(
            e(tmp.path(), "server"),
            format!("Unable to access credentials {d}/server-cert.pem: No such file or directory")
        );
        std::fs::write(tmp.path().join(files::SERVER_CERT), "garbage\n").unwrap();
        assert_eq!(
            e(tmp.path(), "server"),
            format!("Unable to access credentials {d}/server-key.pem: No such file or directory")
        );
        std::fs::write(tmp.path().join(files::SERVER_KEY), "garbage\n").unwrap();
        // All there, all garbage: the own certificate is read first (QEMU's message, then
        // the cause).
        assert!(e(tmp.path(), "server").starts_with(&format!(
            "Unable to import server certificate {d}/server-cert.pem: "
        )));
        // A client's certificate is optional, and then the CA list is the first read.
        assert!(e(tmp.path(), "client").starts_with(&format!(
            "Unable to import CA certificate list {d}/ca-cert.pem"
        )));
        std::fs::write(tmp.path().join(files::CLIENT_CERT), "garbage\n").unwrap();
        std::fs::write(tmp.path().join(files::CLIENT_KEY), "garbage\n").unwrap();
        assert!(e(tmp.path(), "client").starts_with(&format!(
            "Unable to import client certificate {d}/client-cert.pem: "
        )));
    }

    #[test]
    fn anon_is_refused_clearly() {
        #[cfg(not(feature = "psk"))]
        {
            let e = check_creds_type("tls-creds-psk").unwrap_err().to_string();
            assert!(e.contains("tls-creds-psk is not supported"), "{e}");
        }
        #[cfg(feature = "psk")]
        assert!(check_creds_type("tls-creds-psk").is_ok());
        let e = check_creds_type("tls-creds-anon").unwrap_err().to_string();
        assert!(e.contains("anonymous"), "{e}");
        assert!(check_creds_type("tls-creds-x509").is_ok());
    }

    #[test]
    fn all_key_formats_load_and_serve() {
        if !have_tool("certtool") || !have_tool("openssl") {
            return;
        }
        for kind in [
            KeyKind::RsaPkcs1,
            KeyKind::RsaPkcs8,
            KeyKind::EcSec1,
            KeyKind::EcPkcs8,
        ] {
            let pki = make_pki(kind);
            let server = creds(&pki.server_dir, "server", &[])
                .unwrap_or_else(|e| panic!("{kind:?}: {}", e.qemu_message()));
            let client = creds(&pki.client_dir, "client", &[])
                .unwrap_or_else(|e| panic!("{kind:?}: {}", e.qemu_message()));
            assert_eq!(server.endpoint(), Endpoint::Server);
            let dn = rustls_handshake(&server, &client).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
            assert_eq!(dn.as_deref(), Some(CLIENT_DN), "{kind:?}");
        }
    }

    /// A server directory whose key certtool made with `key_args`, its certificate issued
    /// by certtool from [`SERVER_TMPL`].
    fn certtool_server_dir(tmp: &TempDir, name: &str, key_args: &[&str]) -> PathBuf {
        let ca = make_ca(&tmp.sub(&format!("{name}-ca")), "Test CA");
        let dir = tmp.sub(name);
        std::fs::copy(&ca.cert, dir.join(files::CA_CERT)).unwrap();
        let key = dir.join(files::SERVER_KEY);
        run(Command::new("certtool")
            .arg("--generate-privkey")
            .args(key_args)
            .arg("--outfile")
            .arg(&key));
        certtool_issue(&ca, &key, SERVER_TMPL, &dir.join(files::SERVER_CERT));
        dir
    }

    #[test]
    fn certtool_keys_of_every_size_and_type_qemu_takes_load() {
        if !have_tool("certtool") {
            return;
        }
        let tmp = TempDir::new();
        // ring refused RSA moduli that are not a multiple of 512 bits (2432 here).
        for &(name, args) in test_support::KEY_KINDS {
            let dir = certtool_server_dir(&tmp, name, args);
            // certtool's ECDSA and EdDSA certificates lack key encipherment, which QEMU's
            // sanity check wants: QSD too takes them only with sanity-check=off.
            let sanity = if name.starts_with("rsa") { "on" } else { "off" };
            let server = creds(
                &dir,
                "server",
                &[("verify-peer", "off"), ("sanity-check", sanity)],
            )
            .unwrap_or_else(|e| panic!("{name}: {}", e.qemu_message()));
            assert!(server.server_config().is_ok(), "{name}");
        }
    }

    #[test]
    fn refused_keys_say_what_they_are() {
        if !have_tool("certtool") {
            return;
        }
        let tmp = TempDir::new();
        let refusal = |dir: &Path| {
            let e = creds(
                dir,
                "server",
                &[("verify-peer", "off"), ("sanity-check", "off")],
            )
            .unwrap_err();
            assert!(matches!(e, TlsError::CertKey { .. }), "{e:?}");
            e.qemu_message()
        };
        let prefix = |dir: &Path| {
            format!(
                "Cannot load certificate '{0}/server-cert.pem' & key '{0}/server-key.pem': ",
                dir.display()
            )
        };
        // GnuTLS takes both; the TLS library here does not, and says why.
        let rsa1024 = certtool_server_dir(&tmp, "rsa1024", &["--bits", "1024"]);
        assert_eq!(
            refusal(&rsa1024),
            prefix(&rsa1024) + "RSA key of 1024 bits: RSA keys must have 2048 to 8192 bits"
        );
        let ed448 = certtool_server_dir(&tmp, "ed448", &["--key-type", "ed448"]);
        assert_eq!(
            refusal(&ed448),
            prefix(&ed448)
                + "Ed448 key: keys must be RSA (2048 to 8192 bits), ECDSA (P-256, P-384, P-521) or Ed25519"
        );
        // Not DER at all: GnuTLS's (and so QSD's) words.
        std::fs::write(
            rsa1024.join(files::SERVER_KEY),
            "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n",
        )
        .unwrap();
        assert_eq!(
            refusal(&rsa1024),
            prefix(&rsa1024) + "ASN1 parser: Error in DER parsing."
        );
    }

    #[test]
    fn wrong_endpoint_is_refused_with_qemu_message() {
        if !have_tool("certtool") || !have_tool("openssl") {
            return;
        }
        let pki = make_pki(KeyKind::EcSec1);
        let client = creds(&pki.client_dir, "client", &[]).unwrap();
        assert_eq!(
            client.server_config().unwrap_err().to_string(),
            "Expected TLS credentials for a server endpoint"
        );
        let server = creds(&pki.server_dir, "server", &[]).unwrap();
        assert_eq!(
            server.client_config().unwrap_err().to_string(),
            "Expected TLS credentials for a client endpoint"
        );
        // A client without its own certificate is fine (QEMU: optional files).
        std::fs::remove_file(pki.client_dir.join(files::CLIENT_CERT)).unwrap();
        assert!(creds(&pki.client_dir, "client", &[]).is_ok());
    }

    #[test]
    fn sanity_checks_match_qemu() {
        if !have_tool("certtool") || !have_tool("openssl") {
            return;
        }
        let pki = make_pki(KeyKind::RsaPkcs1);
        let dir = pki.tmp.sub("bad");
        let d = dir.display().to_string();
        let copy = |from: &Path, name: &str| std::fs::copy(from, dir.join(name)).unwrap();
        copy(&pki.ca.cert, files::CA_CERT);

        // A CA certificate as the server's.
        copy(&pki.ca.cert, files::SERVER_CERT);
        copy(&pki.ca.key, files::SERVER_KEY);
        assert_eq!(
            creds(&dir, "server", &[]).unwrap_err().qemu_message(),
            format!("The certificate {d}/server-cert.pem basic constraints show a CA, but we need one for a server")
        );

        // A server certificate from another CA.
        let other = make_ca(&pki.tmp.sub("other"), "Other CA");
        copy(&pki.server_dir.join(files::SERVER_KEY), files::SERVER_KEY);
        certtool_issue(
            &other,
            &dir.join(files::SERVER_KEY),
            SERVER_TMPL,
            &dir.join(files::SERVER_CERT),
        );
        assert_eq!(
            creds(&dir, "server", &[]).unwrap_err().qemu_message(),
            format!("Our own certificate {d}/server-cert.pem failed validation against {d}/ca-cert.pem: The certificate hasn't got a known issuer")
        );
        // Without sanity checks it loads (the clients will refuse it).
        assert!(creds(&dir, "server", &[("sanity-check", "off")]).is_ok());

        // A client certificate (critical purpose clientAuth) as the server's.
        certtool_issue(
            &pki.ca,
            &dir.join(files::SERVER_KEY),
            "cn = x\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 3\n",
            &dir.join(files::SERVER_CERT),
        );
        // certtool marks the purpose non-critical: QEMU accepts it, and so do we.
        assert!(creds(&dir, "server", &[]).is_ok());

        // certtool's ECDSA server certificate: critical key usage without key encipherment.
        gen_key(&dir.join(files::SERVER_KEY), KeyKind::EcSec1);
        certtool_issue(
            &pki.ca,
            &dir.join(files::SERVER_KEY),
            SERVER_TMPL,
            &dir.join(files::SERVER_CERT),
        );
        assert_eq!(
            creds(&dir, "server", &[]).unwrap_err().qemu_message(),
            format!("Certificate {d}/server-cert.pem usage does not permit key encipherment")
        );
        assert!(creds(&dir, "server", &[("sanity-check", "off")]).is_ok());

        // A key that is not the certificate's, with or without sanity checks.
        copy(&pki.server_dir.join(files::SERVER_CERT), files::SERVER_CERT);
        copy(&pki.client_dir.join(files::CLIENT_KEY), files::SERVER_KEY);
        for sanity in ["on", "off"] {
            assert_eq!(
                creds(&dir, "server", &[("sanity-check", sanity)]).unwrap_err().qemu_message(),
                format!("Cannot load certificate '{d}/server-cert.pem' & key '{d}/server-key.pem': The certificate and the given key do not match.")
            );
        }

        // An expired server certificate.
        copy(&pki.server_dir.join(files::SERVER_KEY), files::SERVER_KEY);
        certtool_issue(
            &pki.ca,
            &dir.join(files::SERVER_KEY),
            "cn = x\ntls_www_server\nencryption_key\nsigning_key\nactivation_date = \"2001-01-01 00:00:00 UTC\"\nexpiration_date = \"2002-01-01 00:00:00 UTC\"\n",
            &dir.join(files::SERVER_CERT),
        );
        assert_eq!(
            creds(&dir, "server", &[]).unwrap_err().qemu_message(),
            format!("The server certificate {d}/server-cert.pem has expired")
        );

        // An encrypted key (certtool's PKCS#8) is refused with a clear reason.
        run(Command::new("certtool")
            .args([
                "--generate-privkey",
                "--bits",
                "2048",
                "--pkcs8",
                "--empty-password",
                "--outfile",
            ])
            .arg(dir.join(files::SERVER_KEY)));
        let e = creds(&dir, "server", &[("sanity-check", "off")])
            .unwrap_err()
            .qemu_message();
        assert_eq!(e, format!("Cannot load certificate '{d}/server-cert.pem' & key '{d}/server-key.pem': The private key is encrypted (passwordid is not supported)"));

        // passwordid is refused, naming the key.
        copy(&pki.server_dir.join(files::SERVER_CERT), files::SERVER_CERT);
        let e = creds(&dir, "server", &[("passwordid", "sec0")])
            .unwrap_err()
            .qemu_message();
        assert!(
            e.contains("'passwordid' is not supported") && e.contains("server-key.pem"),
            "{e}"
        );
    }

    // ----- handshakes -----

    /// A TLS server on `listener` for one connection: on success, the client's DN (if it
    /// sent a certificate), after writing "OK\n" and closing.
    async fn serve_one<L, S>(
        acceptor: tokio_rustls::TlsAcceptor,
        accept: L,
    ) -> Result<Option<String>, String>
    where
        L: std::future::Future<Output = std::io::Result<S>>,
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        use tokio::io::AsyncWriteExt;
        let stream = accept.await.map_err(|e| e.to_string())?;
        let mut tls = acceptor.accept(stream).await.map_err(|e| e.to_string())?;
        let dn = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
            Some(cert) => Some(distinguished_name(cert).map_err(|e| e.to_string())?),
            None => None,
        };
        tls.write_all(b"OK\n").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok(dn)
    }

    /// Our server against our client, in process.
    fn rustls_handshake(
        server: &TlsCredsX509,
        client: &TlsCredsX509,
    ) -> Result<Option<String>, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use tokio::io::AsyncReadExt;
            let (a, b) = tokio::io::duplex(64 * 1024);
            let acceptor =
                tokio_rustls::TlsAcceptor::from(server.server_config().map_err(|e| e.to_string())?);
            let srv = tokio::spawn(serve_one(acceptor, async { Ok(a) }));
            let connector = tokio_rustls::TlsConnector::from(
                client.client_config().map_err(|e| e.to_string())?,
            );
            let mut c = connector
                .connect(server_name("localhost").map_err(|e| e.to_string())?, b)
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = String::new();
            let read = c.read_to_string(&mut buf).await;
            let dn = srv.await.map_err(|e| e.to_string())??;
            read.map_err(|e| e.to_string())?;
            assert_eq!(buf, "OK\n");
            Ok(dn)
        })
    }

    /// Runs our server on a loopback TCP port for one connection from `client` (a command
    /// to which the port is appended). Returns the server's result and the client's stdout.
    fn serve_tcp_to(
        creds: &TlsCredsX509,
        client: impl FnOnce(u16) -> Command,
    ) -> (Result<Option<String>, String>, String) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let acceptor = tokio_rustls::TlsAcceptor::from(creds.server_config().unwrap());
            let srv = tokio::spawn(async move {
                serve_one(acceptor, async { listener.accept().await.map(|(s, _)| s) }).await
            });
            let out = run_client(client(port)).await;
            (srv.await.unwrap(), out)
        })
    }

    /// Runs a TLS client program with its stdin open (so that it waits for the server),
    /// returns its stdout once it exits. A client that hangs is killed after 60 s.
    async fn run_client(mut cmd: Command) -> String {
        let mut child = tokio::process::Command::from({
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            cmd
        })
        .kill_on_drop(true)
        .spawn()
        .unwrap();
        let stdin = child.stdin.take();
        let out =
            tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
                .await
                .expect("TLS client program hung")
                .unwrap();
        drop(stdin);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn gnutls_cli(ca: &Path, cert_key: Option<(&Path, &Path)>) -> impl FnOnce(u16) -> Command {
        let ca = ca.to_path_buf();
        let ck = cert_key.map(|(c, k)| (c.to_path_buf(), k.to_path_buf()));
        move |port| {
            let mut c = Command::new("gnutls-cli");
            c.arg("--x509cafile").arg(&ca);
            if let Some((cert, key)) = &ck {
                c.arg("--x509certfile")
                    .arg(cert)
                    .arg("--x509keyfile")
                    .arg(key);
            }
            c.args(["-p", &port.to_string(), "127.0.0.1"]);
            c
        }
    }

    #[test]
    fn gnutls_client_with_good_certificate_is_accepted() {
        if !have_tool("certtool") || !have_tool("openssl") || !have_tool("gnutls-cli") {
            return;
        }
        for kind in [KeyKind::RsaPkcs1, KeyKind::EcSec1] {
            let pki = make_pki(kind);
            let server = creds(&pki.server_dir, "server", &[]).unwrap();
            let (res, out) = serve_tcp_to(
                &server,
                gnutls_cli(
                    &pki.client_dir.join(files::CA_CERT),
                    Some((
                        &pki.client_dir.join(files::CLIENT_CERT),
                        &pki.client_dir.join(files::CLIENT_KEY),
                    )),
                ),
            );
            assert_eq!(res, Ok(Some(CLIENT_DN.to_string())), "{kind:?}");
            assert!(out.lines().any(|l| l == "OK"), "{kind:?}: {out}");
        }
    }

    #[test]
    fn gnutls_client_without_certificate_is_refused_under_verify_peer() {
        if !have_tool("certtool") || !have_tool("openssl") || !have_tool("gnutls-cli") {
            return;
        }
        let pki = make_pki(KeyKind::EcSec1);
        let server = creds(&pki.server_dir, "server", &[]).unwrap();
        let (res, out) = serve_tcp_to(
            &server,
            gnutls_cli(&pki.client_dir.join(files::CA_CERT), None),
        );
        let err = res.unwrap_err();
        assert!(
            err.contains("certificate") || err.contains("Certificate"),
            "{err}"
        );
        assert!(!out.lines().any(|l| l == "OK"), "{out}");

        // verify-peer=off: no certificate asked, the client gets in.
        let server = creds(&pki.server_dir, "server", &[("verify-peer", "off")]).unwrap();
        assert!(!server.verify_peer());
        let (res, out) = serve_tcp_to(
            &server,
            gnutls_cli(&pki.client_dir.join(files::CA_CERT), None),
        );
        assert_eq!(res, Ok(None));
        assert!(out.lines().any(|l| l == "OK"), "{out}");
    }

    #[test]
    fn gnutls_client_with_certificate_of_another_ca_is_refused() {
        if !have_tool("certtool") || !have_tool("openssl") || !have_tool("gnutls-cli") {
            return;
        }
        let pki = make_pki(KeyKind::RsaPkcs8);
        let other = make_ca(&pki.tmp.sub("other"), "Other CA");
        let dir = pki.tmp.sub("rogue");
        gen_key(&dir.join(files::CLIENT_KEY), KeyKind::EcSec1);
        certtool_issue(
            &other,
            &dir.join(files::CLIENT_KEY),
            CLIENT_TMPL,
            &dir.join(files::CLIENT_CERT),
        );
        let server = creds(&pki.server_dir, "server", &[]).unwrap();
        let (res, out) = serve_tcp_to(
            &server,
            gnutls_cli(
                &pki.client_dir.join(files::CA_CERT),
                Some((&dir.join(files::CLIENT_CERT), &dir.join(files::CLIENT_KEY))),
            ),
        );
        let err = res.unwrap_err();
        assert!(
            err.contains("UnknownIssuer")
                || err.contains("unknown issuer")
                || err.contains("issuer"),
            "{err}"
        );
        assert!(!out.lines().any(|l| l == "OK"), "{out}");
    }

    #[test]
    fn openssl_client_over_unix_socket() {
        if !have_tool("certtool") || !have_tool("openssl") {
            return;
        }
        let pki = make_pki(KeyKind::EcPkcs8);
        let server = creds(&pki.server_dir, "server", &[]).unwrap();
        let sock = pki.tmp.path().join("tls.sock");
        let attempt = |with_cert: bool| {
            let _ = std::fs::remove_file(&sock);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let listener = tokio::net::UnixListener::bind(&sock).unwrap();
                let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config().unwrap());
                let srv = tokio::spawn(async move {
                    serve_one(acceptor, async { listener.accept().await.map(|(s, _)| s) }).await
                });
                let mut cmd = Command::new("openssl");
                cmd.args([
                    "s_client",
                    "-quiet",
                    "-verify_return_error",
                    "-verify_hostname",
                    "localhost",
                    "-unix",
                ])
                .arg(&sock)
                .arg("-CAfile")
                .arg(pki.client_dir.join(files::CA_CERT));
                if with_cert {
                    cmd.arg("-cert")
                        .arg(pki.client_dir.join(files::CLIENT_CERT))
                        .arg("-key")
                        .arg(pki.client_dir.join(files::CLIENT_KEY));
                }
                let out = run_client(cmd).await;
                (srv.await.unwrap(), out)
            })
        };
        let (res, out) = attempt(true);
        assert_eq!(res, Ok(Some(CLIENT_DN.to_string())));
        assert!(out.lines().any(|l| l == "OK"), "{out}");
        let (res, out) = attempt(false);
        assert!(res.is_err());
        assert!(!out.lines().any(|l| l == "OK"), "{out}");
    }

    #[test]
    fn client_credentials_verify_the_server_unless_told_not_to() {
        if !have_tool("certtool") || !have_tool("openssl") {
            return;
        }
        let pki = make_pki(KeyKind::EcSec1);
        let server = creds(&pki.server_dir, "server", &[("verify-peer", "off")]).unwrap();
        // A client trusting another CA refuses the server...
        let other = make_ca(&pki.tmp.sub("other"), "Other CA");
        let dir = pki.tmp.sub("c2");
        std::fs::copy(&other.cert, dir.join(files::CA_CERT)).unwrap();
        let strict = creds(&dir, "client", &[]).unwrap();
        let err = rustls_handshake(&server, &strict).unwrap_err();
        assert!(
            err.contains("UnknownIssuer") || err.contains("issuer"),
            "{err}"
        );
        // ... unless verify-peer=off.
        let lax = creds(&dir, "client", &[("verify-peer", "off")]).unwrap();
        assert_eq!(rustls_handshake(&server, &lax), Ok(None));
    }
}

/// The real NBD clients (QEMU's and libnbd's, both GnuTLS) against our server configuration,
/// through the NBD handshake up to `NBD_OPT_STARTTLS` (written here for the test only: the
/// NBD server proper lives in the `nbd-server` crate).
#[cfg(test)]
mod nbd_client_tests {
    use super::tests::{creds, have_tool, make_pki, KeyKind, CLIENT_DN};
    use super::*;
    use crate::dn::distinguished_name;
    use std::process::{Command, Stdio};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    const NBD_OPT_STARTTLS: u32 = 5;
    const NBD_REP_ACK: u32 = 1;

    /// Serves one client on `sock`: newstyle greeting, expects STARTTLS first, acks it and
    /// runs the TLS handshake. Returns the client's DN, or why it failed.
    async fn starttls_once(
        listener: tokio::net::UnixListener,
        config: Arc<ServerConfig>,
    ) -> Result<Option<String>, String> {
        let (mut s, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut greeting = Vec::new();
        greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
        greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
        greeting.extend_from_slice(&3u16.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
        s.write_all(&greeting).await.map_err(|e| e.to_string())?;
        let _client_flags = s.read_u32().await.map_err(|e| e.to_string())?;
        let magic = s.read_u64().await.map_err(|e| e.to_string())?;
        let option = s.read_u32().await.map_err(|e| e.to_string())?;
        let len = s.read_u32().await.map_err(|e| e.to_string())?;
        if magic != IHAVEOPT || option != NBD_OPT_STARTTLS || len != 0 {
            return Err(format!(
                "expected STARTTLS, got option {option} (magic {magic:#x}, len {len})"
            ));
        }
        let mut reply = Vec::new();
        reply.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
        reply.extend_from_slice(&NBD_OPT_STARTTLS.to_be_bytes());
        reply.extend_from_slice(&NBD_REP_ACK.to_be_bytes());
        reply.extend_from_slice(&0u32.to_be_bytes());
        s.write_all(&reply).await.map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsAcceptor::from(config)
            .accept(s)
            .await
            .map_err(|e| e.to_string())?;
        let dn = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
            Some(cert) => Some(distinguished_name(cert).map_err(|e| e.to_string())?),
            None => None,
        };
        Ok(dn)
    }

    /// Runs `client` (given the socket path) against [`starttls_once`].
    fn against(
        server: &TlsCredsX509,
        sock: &Path,
        client: impl FnOnce(&Path) -> Command,
    ) -> Result<Option<String>, String> {
        let _ = std::fs::remove_file(sock);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::UnixListener::bind(sock).unwrap();
            let srv = tokio::spawn(starttls_once(listener, server.server_config().unwrap()));
            let mut cmd = client(sock);
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let mut child = tokio::process::Command::from(cmd)
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            // The client fails once we close after the handshake; only the server's view counts.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait())
                .await
                .expect("NBD client hung");
            srv.await.unwrap()
        })
    }

    fn qemu_img(dir: &Path) -> impl FnOnce(&Path) -> Command {
        let dir = dir.display().to_string();
        move |sock| {
            let mut c = Command::new("qemu-img");
            c.arg("info")
                .arg("--object")
                .arg(format!("tls-creds-x509,id=tls0,endpoint=client,dir={dir}"))
                .arg("--image-opts")
                .arg(format!(
                    "driver=nbd,server.type=unix,server.path={},export=disk,tls-creds=tls0,tls-hostname=localhost",
                    sock.display()
                ));
            c
        }
    }

    #[test]
    fn qemu_img_handshakes_with_our_server() {
        if !have_tool("certtool") || !have_tool("openssl") || !have_tool("qemu-img") {
            return;
        }
        for kind in [KeyKind::RsaPkcs1, KeyKind::EcSec1] {
            let pki = make_pki(kind);
            let server = creds(&pki.server_dir, "server", &[]).unwrap();
            let sock = pki.tmp.path().join("nbd.sock");
            assert_eq!(
                against(&server, &sock, qemu_img(&pki.client_dir)),
                Ok(Some(CLIENT_DN.to_string())),
                "{kind:?}"
            );
            // Without a client certificate: refused under verify-peer, admitted without.
            std::fs::remove_file(pki.client_dir.join(files::CLIENT_CERT)).unwrap();
            assert!(
                against(&server, &sock, qemu_img(&pki.client_dir)).is_err(),
                "{kind:?}"
            );
            let lax = creds(&pki.server_dir, "server", &[("verify-peer", "off")]).unwrap();
            assert_eq!(
                against(&lax, &sock, qemu_img(&pki.client_dir)),
                Ok(None),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn nbdinfo_handshakes_with_our_server() {
        if !have_tool("certtool") || !have_tool("openssl") || !have_tool("nbdinfo") {
            return;
        }
        let pki = make_pki(KeyKind::RsaPkcs8);
        let server = creds(&pki.server_dir, "server", &[]).unwrap();
        let sock = pki.tmp.path().join("nbd.sock");
        let dir = pki.client_dir.display().to_string();
        let nbdinfo = |sock: &Path| {
            let mut c = Command::new("nbdinfo");
            c.arg(format!(
                "nbds+unix:///disk?socket={}&tls-certificates={dir}",
                sock.display()
            ));
            c
        };
        assert_eq!(
            against(&server, &sock, nbdinfo),
            Ok(Some(CLIENT_DN.to_string()))
        );
    }
}

/// The reference: which DN qemu-storage-daemon itself admits and logs, for the same
/// certificates, compared with [`distinguished_name`].
#[cfg(test)]
mod qsd_tests {
    use super::tests::{have_tool, make_pki, openssl_issue, KeyKind, CLIENT_DN};
    use super::*;
    use crate::dn::distinguished_name;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    #[test]
    fn qemu_storage_daemon_admits_and_logs_the_same_dn() {
        for tool in ["certtool", "openssl", "qemu-storage-daemon", "qemu-img"] {
            if !have_tool(tool) {
                return;
            }
        }
        let pki = make_pki(KeyKind::RsaPkcs1);
        // A second client with every kind of escape, multi-valued RDNs and a non-ASCII value.
        let special = pki.tmp.sub("special");
        std::fs::copy(&pki.ca.cert, special.join(files::CA_CERT)).unwrap();
        tests::gen_key(&special.join(files::CLIENT_KEY), KeyKind::EcSec1);
        openssl_issue(
            &pki.ca,
            &special.join(files::CLIENT_KEY),
            "/C=GB/title=Dr/O=\u{dc}n\u{ef}code Ltd/OU=\\ lead<>;trail\\ /emailAddress=a@b.c/DC=org/UID=u1+CN=multi/CN=#hash, \"q\" \\\\ x",
            true,
            &special.join(files::CLIENT_CERT),
        );
        let special_dn = distinguished_name(
            &CertificateDer::from_pem_file(special.join(files::CLIENT_CERT)).unwrap(),
        )
        .unwrap();
        assert_eq!(
            special_dn,
            "C=GB,title=Dr,O=\u{dc}n\u{ef}code Ltd,OU=\\ lead\\<\\>\\;trail\\ ,EMAIL=a@b.c,DC=org,CN=multi+UID=u1,CN=\\#hash\\, \\\"q\\\" \\\\ x"
        );

        // QSD admits exactly the special DN (keyval doubles commas) and denies the other.
        let sock = pki.tmp.path().join("nbd.sock");
        let mut qsd = Command::new("qemu-storage-daemon")
            .args(["--blockdev", "driver=null-co,node-name=n0,size=1048576"])
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,endpoint=server,dir={}",
                pki.server_dir.display()
            ))
            .arg("--object")
            .arg(format!(
                "authz-list,id=authz0,rules.0.match={},rules.0.policy=allow",
                special_dn.replace(',', ",,")
            ))
            .arg("--nbd-server")
            .arg(format!(
                "addr.type=unix,addr.path={},tls-creds=tls0,tls-authz=authz0",
                sock.display()
            ))
            .args(["--export", "nbd,id=e,node-name=n0,name=disk"])
            .args(["--chardev", "stdio,id=m", "--monitor", "m"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The QMP greeting comes once every option is set up: the socket listens.
        let mut greeting = String::new();
        BufReader::new(qsd.stdout.take().unwrap())
            .read_line(&mut greeting)
            .unwrap();
        let info = |dir: &Path| {
            Command::new("qemu-img")
                .arg("info")
                .arg("--object")
                .arg(format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", dir.display()))
                .arg("--image-opts")
                .arg(format!(
                    "driver=nbd,server.type=unix,server.path={},export=disk,tls-creds=tls0,tls-hostname=localhost",
                    sock.display()
                ))
                .output()
                .unwrap()
        };
        let admitted = info(&special);
        let denied = info(&pki.client_dir);
        let _ = qsd.kill();
        let out = qsd.wait_with_output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(
            greeting.contains("QMP"),
            "qemu-storage-daemon did not start: {log}"
        );
        assert!(
            admitted.status.success(),
            "QSD refused {special_dn}: {}\n{log}",
            String::from_utf8_lossy(&admitted.stderr)
        );
        assert!(!denied.status.success());
        assert!(
            log.contains(&format!("TLS x509 authz check for {CLIENT_DN} is denied")),
            "{log}"
        );
    }
}
