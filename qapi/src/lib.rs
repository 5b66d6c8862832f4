//! QEMU's QAPI input, as qemu-storage-daemon reads it, for Rust programs that want to
//! accept the same options and QMP arguments with the same error messages.
//!
//! - [`keyval`]: QEMU's `KEY=VALUE,...` option syntax (`keyval_parse()`), JSON-or-keyval
//!   option arguments, and the older QemuOpts syntax;
//! - [`json`]: QEMU's JSON dialect (single-quoted strings, `\'`), as a byte stream
//!   (QMP) or one value from a text (a command-line option), one grammar for both;
//! - [`de`]: one serde deserializer with QAPI's checks and messages, for JSON
//!   ([`from_value`]) and for keyval ([`from_keyval`]: strings become the scalars asked for);
//! - [`types`]: QAPI types several commands share (`SocketAddress`, ...);
//! - [`qdict`]: the order in which QEMU iterates an object, which decides which of
//!   several errors QEMU reports first.
//!
//! ```
//! #[derive(serde::Deserialize)]
//! #[serde(rename_all = "kebab-case")]
//! struct Export { id: String, node_name: String }
//!
//! let args = qsd_qapi::keyval::parse("id=e0,node-name=disk", None).unwrap();
//! let e: Export = qsd_qapi::from_value(serde_json::Value::Object(args)).unwrap();
//! assert_eq!((e.id.as_str(), e.node_name.as_str()), ("e0", "disk"));
//!
//! let err = qsd_qapi::from_value::<Export>(serde_json::json!({"id": 1})).err().unwrap();
//! assert_eq!(err.to_string(), "Invalid parameter type for 'id', expected: string");
//! ```

#![forbid(unsafe_code)]

pub mod de;
pub mod error;
pub mod json;
pub mod keyval;
pub mod qdict;
pub mod types;

pub use de::{
    from_keyval, from_value, from_value_at, from_value_in, parse_base, parse_base_in,
    ArgumentError, Size, Syntax,
};
pub use error::{error_text, strerror};
