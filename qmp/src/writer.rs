//! JSON output laid out byte for byte as QEMU's monitor writes it.
//!
//! - compact: `{"return": {}, "id": 1}` (`", "` and `": "` separators);
//! - pretty: four-space indentation, an empty object is `{` newline `}`;
//! - object members in QEMU's `QDict` order: by `tdb_hash(key) % 512`
//!   (QEMU iterates its hash buckets in order). Within a bucket QEMU shows
//!   the last-inserted key first; we do not know insertion order and sort such
//!   keys by name instead;
//! - strings: `"`, `\`, `\b`, `\f`, `\n`, `\r`, `\t` escaped by name, other
//!   control characters and everything outside printable ASCII as `\uXXXX`
//!   (upper-case hex, surrogate pairs beyond the BMP); `/` is not escaped;
//! - doubles as C's `%.17g` (`1500`, `0.10000000000000001`, `1e+300`);
//! - every `\n` the monitor writes becomes `\r\n` (QEMU's `monitor_puts`),
//!   done when a message is sent, not by [`to_qemu_json`].

use serde_json::{Number, Value};
use std::fmt::Write as _;

use qsd_qapi::qdict;

/// Formats a double as C's `printf("%.17g")`.
fn format_g17(v: f64) -> String {
    const P: i32 = 17;
    if v == 0.0 {
        return if v.is_sign_negative() { "-0" } else { "0" }.to_string();
    }
    let e_form = format!("{:.*e}", (P - 1) as usize, v);
    let (mantissa, exp) = e_form.split_once('e').unwrap_or((&e_form, "0"));
    let x: i32 = exp.parse().unwrap_or(0);
    let strip = |s: &str| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    if (-4..P).contains(&x) {
        strip(&format!("{:.*}", (P - 1 - x) as usize, v))
    } else {
        let sign = if x < 0 { '-' } else { '+' };
        format!("{}e{}{:02}", strip(mantissa), sign, x.abs())
    }
}

fn write_number(out: &mut String, n: &Number) {
    if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else {
        out.push_str(&format_g17(n.as_f64().unwrap_or(0.0)));
    }
}

fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{:04X}", u);
                }
            }
        }
    }
    out.push('"');
}

struct Writer {
    out: String,
    pretty: bool,
    depth: usize,
}

impl Writer {
    fn newline(&mut self) {
        if self.pretty {
            self.out.push('\n');
            for _ in 0..self.depth {
                self.out.push_str("    ");
            }
        }
    }

    fn separator(&mut self, first: bool) {
        if first {
            self.newline();
        } else {
            self.out.push(',');
            if self.pretty {
                self.newline();
            } else {
                self.out.push(' ');
            }
        }
    }

    fn value(&mut self, v: &Value) {
        match v {
            Value::Null => self.out.push_str("null"),
            Value::Bool(b) => self.out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => write_number(&mut self.out, n),
            Value::String(s) => write_str(&mut self.out, s),
            Value::Array(list) => {
                self.out.push('[');
                self.depth += 1;
                for (i, item) in list.iter().enumerate() {
                    self.separator(i == 0);
                    self.value(item);
                }
                self.depth -= 1;
                self.newline();
                self.out.push(']');
            }
            Value::Object(map) => {
                self.out.push('{');
                self.depth += 1;
                for (i, (k, item)) in qdict::order(map).into_iter().enumerate() {
                    self.separator(i == 0);
                    write_str(&mut self.out, k);
                    self.out.push_str(": ");
                    self.value(item);
                }
                self.depth -= 1;
                self.newline();
                self.out.push('}');
            }
        }
    }
}

/// Serialises a value as QEMU would (no trailing newline, `\n` line breaks).
pub fn to_qemu_json(v: &Value, pretty: bool) -> String {
    let mut w = Writer {
        out: String::new(),
        pretty,
        depth: 0,
    };
    w.value(v);
    w.out
}

/// One monitor message as sent: QEMU's layout, a final newline, and every
/// newline as CR LF.
pub(crate) fn to_wire(v: &Value, pretty: bool) -> Vec<u8> {
    let mut s = to_qemu_json(v, pretty);
    s.push('\n');
    s.replace('\n', "\r\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_order_matches_qsd() {
        // All these orders were observed from qemu-storage-daemon 10.0.
        let greeting = json!({"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2},
            "package": "p"}, "capabilities": ["oob"]}});
        assert_eq!(
            to_qemu_json(&greeting, false),
            r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "p"}, "capabilities": ["oob"]}}"#
        );
        assert_eq!(
            to_qemu_json(&json!({"id": 5, "return": {}}), false),
            r#"{"return": {}, "id": 5}"#
        );
        assert_eq!(
            to_qemu_json(
                &json!({"id": 5, "error": {"desc": "d", "class": "c"}}),
                false
            ),
            r#"{"id": 5, "error": {"class": "c", "desc": "d"}}"#
        );
        assert_eq!(
            to_qemu_json(
                &json!({"event": "E", "data": {"id": "e0"},
                    "timestamp": {"seconds": 1, "microseconds": 2}}),
                false
            ),
            r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "E", "data": {"id": "e0"}}"#
        );
    }

    #[test]
    fn pretty_layout_matches_qsd() {
        let v = json!({"return": {}, "id": [1, {"a": []}]});
        assert_eq!(
            to_qemu_json(&v, true),
            "{\n    \"return\": {\n    },\n    \"id\": [\n        1,\n        {\n            \"a\": [\n            ]\n        }\n    ]\n}"
        );
        assert_eq!(to_wire(&json!({}), true), b"{\r\n}\r\n");
        assert_eq!(to_wire(&json!([]), false), b"[]\r\n");
    }

    #[test]
    fn strings_are_escaped_like_qemu() {
        assert_eq!(
            to_qemu_json(&json!("é\u{7f}😀\u{0}/\"\\\n\t\u{1}"), false),
            r#""\u00E9\u007F\uD83D\uDE00\u0000/\"\\\n\t\u0001""#
        );
    }

    #[test]
    fn numbers_print_like_qemu() {
        let n = |v: Value| to_qemu_json(&v, false);
        assert_eq!(n(json!(1500.0)), "1500");
        assert_eq!(n(json!(0.1)), "0.10000000000000001");
        assert_eq!(n(json!(1.8446744073709552e19)), "1.8446744073709552e+19");
        assert_eq!(
            n(json!(-9_223_372_036_854_775_809.0_f64)),
            "-9.2233720368547758e+18"
        );
        assert_eq!(n(json!(2.5e-7)), "2.4999999999999999e-07");
        assert_eq!(n(json!(0.0001)), "0.0001");
        assert_eq!(n(json!(-0.0)), "-0");
        assert_eq!(n(json!(u64::MAX)), "18446744073709551615");
        assert_eq!(n(json!(i64::MIN)), "-9223372036854775808");
    }
}
