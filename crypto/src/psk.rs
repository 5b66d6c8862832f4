//! The `tls-creds-psk` object: TLS with pre-shared keys, as QEMU's `crypto/tlscredspsk.c`
//! creates it (`--object tls-creds-psk,id=ID,endpoint=server,dir=DIR`).
//!
//! `dir` holds `keys.psk`, GnuTLS's PSK file: one `username:hexkey` line per client (as
//! `psktool -u USER -p DIR/keys.psk` writes it). A server reads the file at each client's
//! handshake, as GnuTLS does, so that keys can be added or revoked while it runs; a client
//! (endpoint `client`) takes the key of `username` (default `qemu`) at creation. The client's
//! username is its identity for `tls-authz`. `priority` is accepted and ignored (OpenSSL
//! offers TLS 1.3 and TLS 1.2 PSK suites with ECDHE first); `verify-peer` is accepted and, as
//! in QEMU, means nothing for PSK. `dh-params.pem` is ignored: OpenSSL uses ECDHE.

use crate::x509::{creds_path, files, yes, Endpoint, TlsError};
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};

/// The PSK file inside `dir` (QEMU's `QCRYPTO_TLS_CREDS_PSKFILE`).
pub const PSK_FILE: &str = "keys.psk";

/// The username a client uses when `username` is not set (QEMU's default).
pub const DEFAULT_USERNAME: &str = "qemu";

/// The properties of a `tls-creds-psk` object (`TlsCredsPskProperties` in QAPI), by their
/// QAPI names; the object's `id` is not one of them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TlsCredsPskOptions {
    /// The directory holding `keys.psk` (required).
    pub dir: Option<PathBuf>,
    /// Server or client credentials.
    #[serde(default)]
    pub endpoint: Endpoint,
    /// The client's username (client endpoint only).
    pub username: Option<String>,
    /// A GnuTLS priority string: accepted and ignored.
    pub priority: Option<String>,
    /// Accepted and ignored, as in QEMU (default true).
    #[serde(default = "yes")]
    pub verify_peer: bool,
}

impl TlsCredsPskOptions {
    /// Server credentials from `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        TlsCredsPskOptions {
            dir: Some(dir.into()),
            endpoint: Endpoint::Server,
            username: None,
            priority: None,
            verify_peer: true,
        }
    }
}

/// A loaded `tls-creds-psk` object.
#[derive(Debug)]
pub struct TlsCredsPsk {
    id: String,
    options: TlsCredsPskOptions,
    /// `dir/keys.psk`.
    file: PathBuf,
    /// The client's username and key (client endpoint).
    client_key: Option<(String, Vec<u8>)>,
}

/// Hex digits to bytes; `None` unless every pair is hex.
fn hex_decode(text: &str) -> Option<Vec<u8>> {
    let digits = text.as_bytes();
    if digits.is_empty() || digits.len() % 2 != 0 {
        return None;
    }
    digits
        .chunks(2)
        .map(|pair| {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            u8::try_from(hi * 16 + lo).ok()
        })
        .collect()
}

/// The text after `username:` on the first line of `content` that starts so (QEMU's and
/// GnuTLS's lookup), without a trailing carriage return.
fn find_entry<'a>(content: &'a str, username: &str) -> Option<&'a str> {
    content.split('\n').find_map(|line| {
        line.strip_prefix(username)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(|key| key.strip_suffix('\r').unwrap_or(key))
    })
}

/// Why a client's key could not be found at its handshake.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// The PSK file cannot be read.
    #[error("Cannot read PSK file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No line for the username.
    #[error("Username {username} not found in PSK file {}", path.display())]
    NotFound {
        /// The client's username.
        username: String,
        /// The file.
        path: PathBuf,
    },
    /// The key is not an even number of hex digits.
    #[error("The key of username {username} in PSK file {} is not hexadecimal", path.display())]
    NotHex {
        /// The client's username.
        username: String,
        /// The file.
        path: PathBuf,
    },
}

/// The key of `username` in the PSK file `path`, hex-decoded.
pub fn lookup_key(path: &Path, username: &str) -> Result<Vec<u8>, LookupError> {
    let content = std::fs::read(path).map_err(|source| LookupError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let content = String::from_utf8_lossy(&content);
    let hex = find_entry(&content, username).ok_or_else(|| LookupError::NotFound {
        username: username.to_string(),
        path: path.to_path_buf(),
    })?;
    hex_decode(hex).ok_or_else(|| LookupError::NotHex {
        username: username.to_string(),
        path: path.to_path_buf(),
    })
}

impl TlsCredsPsk {
    /// Checks the credentials as QEMU does at object creation: `dir/keys.psk` must exist;
    /// a server takes no `username`; a client's username must be in the file.
    pub fn new(
        id: impl Into<String>,
        options: TlsCredsPskOptions,
    ) -> Result<TlsCredsPsk, TlsError> {
        let id = id.into();
        let dir = options.dir.as_deref().ok_or(TlsError::MissingDir)?;
        let server = options.endpoint == Endpoint::Server;
        if server && options.username.is_some() {
            return Err(TlsError::PskUsernameOnServer);
        }
        if server {
            if let Some(dh) = creds_path(dir, files::DH_PARAMS, false)? {
                tracing::debug!(%id, file = %dh.display(), "ignored: OpenSSL uses ECDHE");
            }
        }
        let file = creds_path(dir, PSK_FILE, true)?.unwrap_or_default();
        if let Some(priority) = &options.priority {
            tracing::debug!(%id, %priority, "TLS priority ignored");
        }
        let client_key = if server {
            None
        } else {
            let username = options.username.as_deref().unwrap_or(DEFAULT_USERNAME);
            let key = lookup_key(&file, username).map_err(TlsError::PskKey)?;
            Some((username.to_string(), key))
        };
        Ok(TlsCredsPsk {
            id,
            options,
            file,
            client_key,
        })
    }

    /// The object's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The properties it was created with.
    pub fn options(&self) -> &TlsCredsPskOptions {
        &self.options
    }

    /// Server or client credentials.
    pub fn endpoint(&self) -> Endpoint {
        self.options.endpoint
    }

    /// The PSK file, `dir/keys.psk`.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// A client's username and key (`None` for server credentials).
    pub fn client_key(&self) -> Option<(&str, &[u8])> {
        self.client_key
            .as_ref()
            .map(|(user, key)| (user.as_str(), key.as_slice()))
    }

    /// The NBD server's TLS handshake with these credentials: each client's key is looked
    /// up in the PSK file at its handshake. Fails with QEMU's message for client credentials.
    #[cfg(feature = "psk")]
    pub fn acceptor(&self) -> Result<nbd_server::PskAcceptor, TlsError> {
        if self.options.endpoint != Endpoint::Server {
            return Err(TlsError::WrongEndpoint {
                expected: Endpoint::Server,
            });
        }
        let file = self.file.clone();
        let lookup = move |username: &str| match lookup_key(&file, username) {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::warn!("TLS-PSK client refused: {}", qsd_qapi::error_text(&e));
                None
            }
        };
        nbd_server::PskAcceptor::new(std::sync::Arc::new(lookup)).map_err(TlsError::PskSetup)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_found_as_gnutls_finds_them() {
        let file = "alice:00ff\nal:0102\r\nbob:zz\n";
        assert_eq!(find_entry(file, "alice"), Some("00ff"));
        assert_eq!(find_entry(file, "al"), Some("0102"));
        assert_eq!(find_entry(file, "a"), None);
        assert_eq!(find_entry(file, "bob"), Some("zz"));
        assert_eq!(hex_decode("00ff"), Some(vec![0, 255]));
        assert_eq!(hex_decode("0fF"), None);
        assert_eq!(hex_decode("zz"), None);
        assert_eq!(hex_decode(""), None);
    }
}
