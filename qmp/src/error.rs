//! QMP error classes and the error a command returns.

use std::borrow::Cow;
use std::fmt;

/// A QMP error class: the `class` member of an error response.
///
/// The set is open: QEMU's classes are named constants, and any other class a
/// daemon needs can be made with [`ErrorClass::new`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ErrorClass(Cow<'static, str>);

impl ErrorClass {
    /// `GenericError`: the class of almost every QMP error.
    pub const GENERIC_ERROR: Self = Self(Cow::Borrowed("GenericError"));
    /// `CommandNotFound`: the command does not exist or cannot run yet.
    pub const COMMAND_NOT_FOUND: Self = Self(Cow::Borrowed("CommandNotFound"));
    /// `DeviceNotActive`: the device exists but is not active.
    pub const DEVICE_NOT_ACTIVE: Self = Self(Cow::Borrowed("DeviceNotActive"));
    /// `DeviceNotFound`: the named device (or node) does not exist.
    pub const DEVICE_NOT_FOUND: Self = Self(Cow::Borrowed("DeviceNotFound"));
    /// `KVMMissingCap`: a KVM capability is missing.
    pub const KVM_MISSING_CAP: Self = Self(Cow::Borrowed("KVMMissingCap"));

    /// A class by name (for classes without a constant here).
    pub fn new(name: impl Into<Cow<'static, str>>) -> Self {
        Self(name.into())
    }

    /// The class name as sent on the wire.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The error a QMP command returns: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// The human-readable description.
    pub desc: String,
}

impl QmpError {
    /// An error of any class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        Self {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GENERIC_ERROR, desc)
    }

    /// A `CommandNotFound` error.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::COMMAND_NOT_FOUND, desc)
    }

    /// A `DeviceNotFound` error.
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DEVICE_NOT_FOUND, desc)
    }

    /// A `DeviceNotActive` error.
    pub fn device_not_active(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DEVICE_NOT_ACTIVE, desc)
    }

    /// A `KVMMissingCap` error.
    pub fn kvm_missing_cap(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::KVM_MISSING_CAP, desc)
    }

    /// The `error` member of a response: `{"class": ..., "desc": ...}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("class".into(), self.class.as_str().into());
        m.insert("desc".into(), self.desc.clone().into());
        serde_json::Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_set_the_class() {
        assert_eq!(QmpError::generic("x").class.as_str(), "GenericError");
        assert_eq!(
            QmpError::command_not_found("x").class.as_str(),
            "CommandNotFound"
        );
        assert_eq!(
            QmpError::device_not_found("x").class.as_str(),
            "DeviceNotFound"
        );
        assert_eq!(
            QmpError::device_not_active("x").class.as_str(),
            "DeviceNotActive"
        );
        assert_eq!(
            QmpError::kvm_missing_cap("x").class.as_str(),
            "KVMMissingCap"
        );
        assert_eq!(ErrorClass::new("Custom").to_string(), "Custom");
    }

    #[test]
    fn to_json_has_class_and_desc() {
        let e = QmpError::device_not_found("Node 'x' not found");
        assert_eq!(
            e.to_json(),
            serde_json::json!({"class": "DeviceNotFound", "desc": "Node 'x' not found"})
        );
        assert_eq!(e.to_string(), "Node 'x' not found");
    }
}
