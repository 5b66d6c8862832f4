//! What drivers find by id when they open: `secret` objects (RBD's `key-secret`) and TLS
//! credentials (NBD's `tls-creds`).
//!
//! The objects themselves belong to the program that composes the graph (blockexportd's
//! `--object`/`object-add`); it lends the graph a lookup with
//! [`NodeGraph::set_objects`](crate::NodeGraph::set_objects). Without one, every lookup fails
//! with QEMU's "not found" message.

use std::error::Error;
use std::fmt::Debug;

/// Why an object could not be used, with QEMU's message (`No secret with id 'sec0'`).
pub type ObjectError = Box<dyn Error + Send + Sync>;

/// Objects a driver may need while it opens.
pub trait ObjectLookup: Send + Sync + Debug {
    /// The bytes of `secret` object `id`.
    fn secret(&self, id: &str) -> Result<Vec<u8>, ObjectError> {
        Err(format!("No secret with id '{id}'").into())
    }

    /// The TLS client configuration of `tls-creds-*` object `id`, which must have the
    /// `client` endpoint. With `check_hostname` false (no host name to check, as over a
    /// unix socket without `tls-hostname`), the server's certificate chain is verified but
    /// not its name, as QEMU's client does.
    #[cfg(feature = "nbd")]
    fn tls_client(
        &self,
        id: &str,
        check_hostname: bool,
    ) -> Result<std::sync::Arc<rustls::ClientConfig>, ObjectError> {
        let _ = check_hostname;
        Err(format!("No TLS credentials with id '{id}'").into())
    }
}

/// No objects at all.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObjects;

impl ObjectLookup for NoObjects {}
