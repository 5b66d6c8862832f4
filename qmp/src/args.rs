//! Command arguments checked the way QAPI checks them, with QAPI's wording: the
//! deserializer of [`qsd_qapi::de`], with errors as [`QmpError`]s (class
//! `GenericError`). See that module for the checks and messages.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

pub use qsd_qapi::de::{from_value, from_value_at, ArgumentError};

use crate::error::QmpError;

impl From<ArgumentError> for QmpError {
    fn from(e: ArgumentError) -> Self {
        QmpError::generic(e.to_string())
    }
}

/// Deserialises a command's `arguments` into `T`, with QAPI's checks and
/// error messages ([`qsd_qapi::de`]). Errors have class `GenericError`.
///
/// ```
/// # use qmp_server::parse_arguments;
/// #[derive(serde::Deserialize)]
/// struct Del { id: String, mode: Option<Mode> }
/// #[derive(serde::Deserialize)]
/// #[serde(rename_all = "kebab-case")]
/// enum Mode { Safe, Hard }
///
/// let args = serde_json::json!({"id": 1});
/// let serde_json::Value::Object(args) = args else { unreachable!() };
/// let err = parse_arguments::<Del>(args).err().unwrap();
/// assert_eq!(err.desc, "Invalid parameter type for 'id', expected: string");
/// ```
pub fn parse_arguments<T: DeserializeOwned>(args: Map<String, Value>) -> Result<T, QmpError> {
    from_value(Value::Object(args)).map_err(QmpError::from)
}

/// Deserialises the base of a QAPI flat union and returns it with the members
/// it does not declare ([`qsd_qapi::parse_base`]), errors as [`QmpError`]s.
pub fn parse_base<B: DeserializeOwned>(
    args: Map<String, Value>,
) -> Result<(B, Map<String, Value>), QmpError> {
    qsd_qapi::parse_base(args).map_err(QmpError::from)
}
