//! The QMP protocol state of one monitor, without I/O: which phase it is in,
//! how an input message becomes a request or an error, and what a response
//! looks like.
//!
//! ```text
//!            greeting sent
//!                 |
//!                 v
//!   +------ Negotiating ------+  any command but qmp_capabilities:
//!   |                         |  CommandNotFound "Expecting capabilities
//!   | qmp_capabilities ok     |  negotiation with 'qmp_capabilities'"
//!   v                         |
//!  Commands { oob }  <--------+
//!   qmp_capabilities again: CommandNotFound "Capabilities negotiation is
//!   already complete, command ignored"
//! ```
//!
//! qmp-spec.rst, "Capabilities Negotiation": "In this mode only the
//! `qmp_capabilities` command is allowed to run; all other commands will
//! return the `CommandNotFound` error. Asynchronous messages are not
//! delivered either." ... "When the `qmp_capabilities` command is issued,
//! and if it does not return an error, the Server enters Command mode where
//! capabilities changes take effect, all commands (except
//! `qmp_capabilities`) are allowed and asynchronous messages are delivered."
//!
//! "Error": "Some errors can occur before the Server is able to read the
//! `id` member; in these cases the `id` member will not be part of the error
//! response" (parse errors and non-object input, here).

use serde_json::{Map, Value};

use crate::error::{ErrorClass, QmpError};
use crate::stream::StreamError;
use qsd_qapi::qdict::keys as qdict_keys;

/// The phase of one monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// After the greeting, before a successful `qmp_capabilities`.
    Negotiating,
    /// Commands accepted; `oob` says whether the client enabled out-of-band
    /// execution (which makes `exec-oob` a known member).
    Commands {
        /// The `oob` capability was enabled.
        oob: bool,
    },
}

impl Phase {
    pub(crate) fn oob(self) -> bool {
        matches!(self, Phase::Commands { oob: true })
    }
}

/// A well-formed request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Request {
    pub(crate) command: String,
    /// Sent with `exec-oob` rather than `execute`.
    pub(crate) oob: bool,
    pub(crate) args: Map<String, Value>,
}

/// The description QEMU gives to any `CommandNotFound` before negotiation.
pub(crate) const EXPECTING_NEGOTIATION: &str =
    "Expecting capabilities negotiation with 'qmp_capabilities'";

/// Checks one input message as QEMU's `qmp_dispatch_check_obj` does (members
/// visited in QEMU's order, so that the first problem reported is QEMU's).
/// Returns the `id` to echo (any JSON value, verbatim) and the request.
pub(crate) fn check_request(
    msg: Result<Value, StreamError>,
    phase: Phase,
) -> (Option<Value>, Result<Request, QmpError>) {
    let map = match msg {
        Err(e) => return (None, Err(QmpError::generic(e.to_string()))),
        Ok(Value::Object(map)) => map,
        Ok(_) => {
            return (
                None,
                Err(QmpError::generic("QMP input must be a JSON object")),
            )
        }
    };
    let id = map.get("id").cloned();
    let checked = check_members(&map, phase.oob());
    (
        id,
        checked.map(|(exec_key, command)| {
            let args = match map.get("arguments") {
                Some(Value::Object(a)) => a.clone(),
                _ => Map::new(),
            };
            Request {
                command,
                oob: exec_key == "exec-oob",
                args,
            }
        }),
    )
}

fn check_members(map: &Map<String, Value>, allow_oob: bool) -> Result<(String, String), QmpError> {
    let mut exec: Option<(&str, &str)> = None;
    for key in qdict_keys(map) {
        let value = &map[key];
        match key.as_str() {
            "execute" | "exec-oob" if key == "execute" || allow_oob => {
                let Value::String(name) = value else {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{key}' must be a string"
                    )));
                };
                if let Some((prev, _)) = exec {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{key}' clashes with '{prev}'"
                    )));
                }
                exec = Some((key, name));
            }
            "arguments" => {
                if !value.is_object() {
                    return Err(QmpError::generic(
                        "QMP input member 'arguments' must be an object",
                    ));
                }
            }
            "id" => {}
            _ => {
                return Err(QmpError::generic(format!(
                    "QMP input member '{key}' is unexpected"
                )))
            }
        }
    }
    let (key, name) = exec.ok_or_else(|| QmpError::generic("QMP input lacks member 'execute'"))?;
    Ok((key.to_string(), name.to_string()))
}

/// Before negotiation every `CommandNotFound` gets QEMU's more helpful text.
pub(crate) fn negotiation_rewrite(
    phase: Phase,
    result: Result<Value, QmpError>,
) -> Result<Value, QmpError> {
    match result {
        Err(e) if phase == Phase::Negotiating && e.class == ErrorClass::COMMAND_NOT_FOUND => {
            Err(QmpError::command_not_found(EXPECTING_NEGOTIATION))
        }
        other => other,
    }
}

/// `{"return": ...}` or `{"error": ...}`, with `id` if the request had one.
/// A command that returns `null` returns `{}` on the wire (QMP commands
/// without data return an empty object).
pub(crate) fn response(id: Option<Value>, result: Result<Value, QmpError>) -> Value {
    let mut m = Map::new();
    match result {
        Ok(Value::Null) => {
            m.insert("return".into(), Value::Object(Map::new()));
        }
        Ok(v) => {
            m.insert("return".into(), v);
        }
        Err(e) => {
            m.insert("error".into(), e.to_json());
        }
    }
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::ParseError;
    use serde_json::json;

    const CMD: Phase = Phase::Commands { oob: false };
    const OOB: Phase = Phase::Commands { oob: true };

    fn desc(v: Value, phase: Phase) -> (Option<Value>, String) {
        let (id, r) = check_request(Ok(v), phase);
        (id, r.unwrap_err().desc)
    }

    #[test]
    fn well_formed_requests() {
        let (id, r) = check_request(
            Ok(json!({"execute": "x", "arguments": {"a": 1}, "id": {"k": [1]}})),
            CMD,
        );
        assert_eq!(id, Some(json!({"k": [1]})));
        let r = r.unwrap();
        assert_eq!(r.command, "x");
        assert!(!r.oob);
        assert_eq!(Value::Object(r.args), json!({"a": 1}));
        let (_, r) = check_request(Ok(json!({"exec-oob": "y"})), OOB);
        assert!(r.unwrap().oob);
    }

    // Texts observed from qemu-storage-daemon 10.0.
    #[test]
    fn malformed_requests_get_qemu_errors() {
        assert_eq!(
            desc(json!([1]), CMD),
            (None, "QMP input must be a JSON object".into())
        );
        assert_eq!(
            desc(json!({"a": 1}), CMD).1,
            "QMP input member 'a' is unexpected"
        );
        assert_eq!(
            desc(json!({"execute": "foo", "bar": 1}), CMD).1,
            "QMP input member 'bar' is unexpected"
        );
        assert_eq!(desc(json!({}), CMD).1, "QMP input lacks member 'execute'");
        assert_eq!(
            desc(json!({"id": 1}), CMD),
            (Some(json!(1)), "QMP input lacks member 'execute'".into())
        );
        assert_eq!(
            desc(json!({"execute": 1}), CMD).1,
            "QMP input member 'execute' must be a string"
        );
        assert_eq!(
            desc(json!({"execute": "x", "arguments": []}), CMD).1,
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            desc(json!({"execute": "x", "arguments": null}), CMD).1,
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            desc(json!({"exec-oob": "x"}), CMD).1,
            "QMP input member 'exec-oob' is unexpected"
        );
        assert_eq!(
            desc(json!({"exec-oob": "x"}), Phase::Negotiating).1,
            "QMP input member 'exec-oob' is unexpected"
        );
        assert_eq!(
            desc(json!({"execute": "x", "exec-oob": "x"}), OOB).1,
            "QMP input member 'execute' clashes with 'exec-oob'"
        );
        let (id, r) = check_request(Err(StreamError::Parse(ParseError::ExpectingValue)), CMD);
        assert_eq!(id, None);
        assert_eq!(r.unwrap_err().desc, "JSON parse error, expecting value");
    }

    #[test]
    fn negotiation_rewrites_command_not_found_only() {
        let nf = Err(QmpError::command_not_found(
            "The command x has not been found",
        ));
        assert_eq!(
            negotiation_rewrite(Phase::Negotiating, nf.clone())
                .unwrap_err()
                .desc,
            EXPECTING_NEGOTIATION
        );
        assert_eq!(
            negotiation_rewrite(CMD, nf).unwrap_err().desc,
            "The command x has not been found"
        );
        let g = Err(QmpError::generic("g"));
        assert_eq!(
            negotiation_rewrite(Phase::Negotiating, g).unwrap_err().desc,
            "g"
        );
    }

    #[test]
    fn responses() {
        assert_eq!(response(None, Ok(Value::Null)), json!({"return": {}}));
        assert_eq!(
            response(Some(json!("a")), Ok(json!([1]))),
            json!({"return": [1], "id": "a"})
        );
        assert_eq!(
            response(Some(json!(null)), Err(QmpError::generic("e"))),
            json!({"error": {"class": "GenericError", "desc": "e"}, "id": null})
        );
    }
}
