//! QEMU's crypto and authorization objects as a library: what `qemu-storage-daemon
//! --object` creates for TLS, with QEMU's file layout, checks and error messages, on rustls.
//!
//! - [`TlsCredsX509`] (`tls-creds-x509`): PEM files from QEMU's directory layout
//!   (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, ...), QEMU's sanity checks,
//!   `verify-peer`, `endpoint`; a ready [`rustls::ServerConfig`] or [`rustls::ClientConfig`].
//! - [`TlsCredsPsk`] (`tls-creds-psk`): GnuTLS's `keys.psk`; with the `psk` feature, an
//!   NBD server's TLS-PSK handshake.
//! - [`AuthzSimple`], [`AuthzList`], [`AuthzListFile`] (`authz-simple`, `authz-list`,
//!   `authz-list-file`): the identity checks of `tls-authz`; with the `nbd` feature (default)
//!   each is an [`nbd_server::Authorize`], checking the client certificate's distinguished
//!   name as QEMU does.
//! - [`distinguished_name`]: a certificate's subject DN in GnuTLS's legacy order, the
//!   identity QEMU checks (`C=GB,O=Example,CN=client`).
//! - [`Secret`] (`secret`): `data` or `file`, `raw` or `base64`, optionally AES-256-CBC
//!   encrypted with another secret (`keyid`, `iv`).
//!
//! Each object is built from its QAPI properties, a plain struct with QAPI's member names that
//! implements [`serde::Deserialize`] ([`TlsCredsX509Options`], [`AuthzListOptions`], ...):
//! deserialize them with a QAPI-checking deserializer to get QEMU's messages for missing,
//! unexpected or mistyped properties; the objects' own errors already use QEMU's words
//! (`qemu_message()` gives the text with its causes).
//!
//! ```
//! use qsd_crypto::{AuthzList, Authz, RuleSet};
//!
//! let rules: RuleSet = serde_json::from_str(
//!     r#"{"policy": "deny", "rules": [{"match": "C=GB,*", "policy": "allow", "format": "glob"}]}"#,
//! )?;
//! let authz = AuthzList::new("authz0", rules);
//! assert!(authz.is_allowed("C=GB,O=Example,CN=client")?);
//! assert!(!authz.is_allowed("C=FR,CN=client")?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod authz;
pub mod dn;
pub mod psk;
pub mod secret;
pub mod x509;

#[cfg(feature = "nbd")]
pub use authz::authorize;
pub use authz::{
    glob_match, Authz, AuthzError, AuthzList, AuthzListFile, AuthzListFileOptions,
    AuthzListOptions, AuthzSimple, AuthzSimpleOptions, Format, Policy, Rule, RuleSet,
};
pub use dn::{distinguished_name, DnError};
pub use psk::{TlsCredsPsk, TlsCredsPskOptions};
pub use secret::{NoSecrets, Secret, SecretError, SecretFormat, SecretOptions, Secrets};
pub use x509::{
    check_creds_type, files, server_name, Endpoint, TlsCredsX509, TlsCredsX509Options, TlsError,
};

/// The README's examples, compiled and run as doctests.
#[cfg(all(doctest, feature = "nbd"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
