//! A small QAPI input visitor over JSON objects, with QEMU's error messages.
//!
//! Options may come from QMP (typed JSON) or from the command line's keyval syntax, where
//! every scalar is a string (`"on"`, `"1024"`). Both are accepted, as QEMU's keyval visitor
//! does; a string that does not parse gets the keyval visitor's message, a wrongly typed
//! JSON value gets the QMP one.

use serde_json::{Map, Value};

/// Why options were refused: the message QEMU gives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OptionError(pub String);

type Result<T> = std::result::Result<T, OptionError>;

fn fail<T>(msg: String) -> Result<T> {
    Err(OptionError(msg))
}

/// An integer as QEMU's keyval visitor reads it (`strtoll` with base 0: decimal, `0x` hex,
/// leading-`0` octal, optional sign).
fn parse_keyval_int(s: &str) -> Option<i128> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let value = if let Some(hex) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        i128::from_str_radix(hex, 16).ok()?
    } else if digits.len() > 1 && digits.starts_with('0') {
        i128::from_str_radix(&digits[1..], 8).ok()?
    } else {
        digits.parse::<i128>().ok()?
    };
    if digits.is_empty() || digits.starts_with(['+', '-']) {
        return None;
    }
    Some(if neg { -value } else { value })
}

/// A reference to a node: an existing node's name, an inline definition, or `null`.
#[derive(Debug, Clone, PartialEq)]
pub enum BlockRef {
    /// An existing node, by name.
    Name(String),
    /// A node defined inline (a nested `BlockdevOptions` object).
    Inline(Value),
    /// `null`: explicitly none (only where the schema allows it).
    Null,
}

/// The members of one QAPI object, consumed one by one.
#[derive(Debug)]
pub struct Opts {
    map: Map<String, Value>,
    prefix: String,
}

impl Opts {
    /// The members of `value`, which must be an object; `prefix` is its path for messages
    /// (empty at the top).
    pub fn new(value: Value, prefix: &str) -> Result<Opts> {
        match value {
            Value::Object(map) => Ok(Opts {
                map,
                prefix: prefix.to_string(),
            }),
            _ => fail(format!(
                "Invalid parameter type for '{}', expected: object",
                if prefix.is_empty() { "options" } else { prefix }
            )),
        }
    }

    /// The path of member `key` in messages (`cache.direct`).
    pub fn path(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    fn type_error<T>(&self, key: &str, expected: &str) -> Result<T> {
        fail(format!(
            "Invalid parameter type for '{}', expected: {expected}",
            self.path(key)
        ))
    }

    /// Whether the member is present.
    pub fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// An optional string member.
    pub fn str(&mut self, key: &str) -> Result<Option<String>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => self.type_error(key, "string"),
        }
    }

    /// A mandatory string member.
    pub fn req_str(&mut self, key: &str) -> Result<String> {
        match self.str(key)? {
            Some(s) => Ok(s),
            None => fail(format!("Parameter '{}' is missing", self.path(key))),
        }
    }

    /// An optional boolean member (`true`/`false`, or `"on"`/`"off"` from keyval).
    pub fn bool(&mut self, key: &str) -> Result<Option<bool>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(Value::String(s)) => match s.as_str() {
                "on" | "yes" | "true" | "y" => Ok(Some(true)),
                "off" | "no" | "false" | "n" => Ok(Some(false)),
                _ => fail(format!(
                    "Parameter '{}' expects 'on' or 'off'",
                    self.path(key)
                )),
            },
            Some(_) => self.type_error(key, "boolean"),
        }
    }

    /// An optional integer member that must not be negative.
    pub fn uint(&mut self, key: &str) -> Result<Option<u64>> {
        let value = match self.map.remove(key) {
            None => return Ok(None),
            Some(Value::Number(n)) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => i128::from(i),
                (None, Some(u)) => i128::from(u),
                _ => return self.type_error(key, "integer"),
            },
            Some(Value::String(s)) => match parse_keyval_int(&s) {
                Some(v) => v,
                None => return fail(format!("Parameter '{}' expects integer", self.path(key))),
            },
            Some(_) => return self.type_error(key, "integer"),
        };
        match u64::try_from(value) {
            Ok(v) if value <= i128::from(i64::MAX) => Ok(Some(v)),
            _ => fail(format!(
                "Value '{value}' is out of range for parameter '{}'",
                self.path(key)
            )),
        }
    }

    /// An optional enum member; `allowed` lists its values.
    pub fn enumeration(
        &mut self,
        key: &str,
        allowed: &[&'static str],
    ) -> Result<Option<&'static str>> {
        match self.str(key)? {
            None => Ok(None),
            Some(s) => match allowed.iter().find(|a| **a == s) {
                Some(a) => Ok(Some(*a)),
                None => fail(format!(
                    "Parameter '{}' does not accept value '{s}'",
                    self.path(key)
                )),
            },
        }
    }

    /// An optional nested object member.
    pub fn object(&mut self, key: &str) -> Result<Option<Opts>> {
        let path = self.path(key);
        match self.map.remove(key) {
            None => Ok(None),
            Some(v @ Value::Object(_)) => Opts::new(v, &path).map(Some),
            Some(_) => self.type_error(key, "object"),
        }
    }

    /// An optional node reference (`BlockdevRef`, or `BlockdevRefOrNull` with `nullable`).
    pub fn block_ref(&mut self, key: &str, nullable: bool) -> Result<Option<BlockRef>> {
        match self.map.remove(key) {
            None => Ok(None),
            // QEMU still takes "" for null (the only spelling keyval has), with a warning.
            Some(Value::String(s)) if nullable && s.is_empty() => {
                tracing::warn!(
                    "Use of \"{}\": \"\" is deprecated; use \"{}\": null instead",
                    self.path(key),
                    self.path(key)
                );
                Ok(Some(BlockRef::Null))
            }
            Some(Value::String(s)) => Ok(Some(BlockRef::Name(s))),
            Some(v @ Value::Object(_)) => Ok(Some(BlockRef::Inline(v))),
            Some(Value::Null) if nullable => Ok(Some(BlockRef::Null)),
            Some(_) if nullable => self.type_error(key, "BlockdevRefOrNull"),
            Some(_) => self.type_error(key, "BlockdevRef"),
        }
    }

    /// Removes a member without looking at it (options accepted and ignored).
    pub fn ignore(&mut self, key: &str) {
        self.map.remove(key);
    }

    /// Ends the visit: any member left is unexpected.
    pub fn finish(self) -> Result<()> {
        match self.map.keys().next() {
            Some(k) => fail(format!("Parameter '{}' is unexpected", self.path(k))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.expect_err("should fail").0
    }

    #[test]
    fn typed_and_keyval_scalars() {
        let mut o = Opts::new(
            json!({"a": true, "b": "off", "c": 12, "d": "34", "e": "x", "f": 1.5, "g": -1,
                   "h": "yes", "i": "0x100", "j": "010", "k": "1G"}),
            "",
        )
        .expect("object");
        assert_eq!(o.bool("a").expect("a"), Some(true));
        assert_eq!(o.bool("b").expect("b"), Some(false));
        assert_eq!(o.uint("c").expect("c"), Some(12));
        assert_eq!(o.uint("d").expect("d"), Some(34));
        assert_eq!(err(o.uint("e")), "Parameter 'e' expects integer");
        assert_eq!(
            err(o.uint("f")),
            "Invalid parameter type for 'f', expected: integer"
        );
        assert_eq!(
            err(o.uint("g")),
            "Value '-1' is out of range for parameter 'g'"
        );
        assert_eq!(o.uint("missing").expect("absent"), None);
        assert_eq!(o.bool("h").expect("h"), Some(true));
        assert_eq!(o.uint("i").expect("i"), Some(256));
        assert_eq!(o.uint("j").expect("j"), Some(8));
        assert_eq!(err(o.uint("k")), "Parameter 'k' expects integer");
        o.finish().expect("all consumed");
    }

    #[test]
    fn messages_follow_qapi() {
        let mut o = Opts::new(
            json!({"cache": {"direct": "maybe", "x": 1}, "s": 5, "e": "bad", "r": 5}),
            "",
        )
        .expect("object");
        let mut cache = o.object("cache").expect("cache").expect("present");
        assert_eq!(
            err(cache.bool("direct")),
            "Parameter 'cache.direct' expects 'on' or 'off'"
        );
        assert_eq!(err(cache.finish()), "Parameter 'cache.x' is unexpected");
        assert_eq!(
            err(o.str("s")),
            "Invalid parameter type for 's', expected: string"
        );
        assert_eq!(
            err(o.enumeration("e", &["on", "off"])),
            "Parameter 'e' does not accept value 'bad'"
        );
        assert_eq!(
            err(o.block_ref("r", false)),
            "Invalid parameter type for 'r', expected: BlockdevRef"
        );
        assert_eq!(err(o.req_str("driver")), "Parameter 'driver' is missing");
        let mut o = Opts::new(json!({"backing": "", "file": ""}), "").expect("object");
        assert_eq!(
            o.block_ref("backing", true).expect("b"),
            Some(BlockRef::Null)
        );
        assert_eq!(
            o.block_ref("file", false).expect("f"),
            Some(BlockRef::Name(String::new()))
        );
    }

    #[test]
    fn leftover_members_are_unexpected() {
        let mut o = Opts::new(json!({"driver": "file", "bogus": 1}), "file").expect("object");
        assert_eq!(o.req_str("driver").expect("driver"), "file");
        assert_eq!(err(o.finish()), "Parameter 'file.bogus' is unexpected");
        assert_eq!(
            err(Opts::new(json!(3), "").map(|_| ())),
            "Invalid parameter type for 'options', expected: object"
        );
    }

    proptest::proptest! {
        #[test]
        fn keyval_integers_never_panic_and_decimals_round_trip(s in "\\PC{0,24}", n in 0u64..=i64::MAX as u64) {
            let _ = parse_keyval_int(&s);
            let mut o = Opts::new(json!({"a": s, "b": n.to_string(), "c": n}), "").expect("object");
            let _ = o.uint("a");
            proptest::prop_assert_eq!(o.uint("b").expect("decimal"), Some(n));
            proptest::prop_assert_eq!(o.uint("c").expect("number"), Some(n));
        }
    }
}
