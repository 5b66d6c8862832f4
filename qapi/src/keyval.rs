//! QEMU's `KEY=VALUE,...` ("keyval") command-line syntax.
//!
//! qemu-storage-daemon reads the arguments of `--blockdev`, `--export`, `--object`,
//! `--nbd-server` and `--monitor` with QEMU's `keyval_parse()` (`util/keyval.c`), or as
//! JSON when the argument starts with `{`, and `--chardev` with the older QemuOpts
//! parser. This module reproduces all three, error messages included, so that a
//! command line written for QSD behaves the same here. The tests check it against the
//! real `qemu-storage-daemon` and `qemu-img`.
//!
//! # Grammar (from `util/keyval.c`)
//!
//! ```text
//! key-vals     = [ key-val { ',' key-val } [ ',' ] ]
//! key-val      = key '=' val | help
//! key          = key-fragment { '.' key-fragment }
//! key-fragment = qapi-name | index
//! qapi-name    = [ '__' / [a-z0-9.-]+ / '_' ] / [A-Za-z][A-Za-z0-9_-]* /
//! index        = / [0-9]+ /
//! val          = { / [^,]+ / | ',,' }
//! help         = 'help' | '?'
//! ```
//!
//! With an implied key, the first element may be a bare value (`/[^=,]+/`, no `,,`
//! escape) that stands for `implied-key=value`. The first fragment of a key must be a
//! QAPI name, later ones may be list indexes; a fragment is 1 to 127 characters long.
//!
//! # Semantics
//!
//! The result is a JSON object whose leaves are all strings. Dotted keys make nested
//! objects (`addr.type=unix` → `{"addr": {"type": "unix"}}`); an object whose keys are all
//! indexes becomes an array, and the indexes must be exactly `0..n` (in any order, with
//! leading zeros allowed). When several key-vals name the same leaf, the last one wins
//! (`id=a,id=b` → `"b"`). A trailing comma is ignored. Typing happens later:
//! [`crate::from_keyval`] converts the strings to what a type asks for, as QEMU's keyval
//! input visitor does, with the `parse_*` scalar parsers here.
//!
//! Where QEMU reports one of several errors depending on the iteration order of its
//! hash table (`QDict`), this module iterates in the same order, so the same error is
//! reported.
//!
//! # Which QSD option uses what (checked against qemu-storage-daemon 10.0)
//!
//! | option | parser | implied key | `help` |
//! |---|---|---|---|
//! | `--blockdev` | [`parse_json_or_keyval`] | `driver` | error |
//! | `--export` | [`parse_json_or_keyval`] | `type` | error |
//! | `--object` | JSON or [`parse_with_help`] | `qom-type` | lists types / properties |
//! | `--nbd-server` | [`parse_json_or_keyval`] | none | error |
//! | `--monitor` | [`parse_json_or_keyval`] | `chardev` | error |
//! | `--chardev` | [`parse_opts`] (QemuOpts, no JSON) | `backend` | lists options |
//!
//! JSON is recognised only when the argument's very first character is `{` (a leading
//! space makes it keyval, as in QEMU). The values of a keyval argument are strings;
//! [`crate::from_keyval`] and the `parse_*` helpers type them as QEMU's keyval
//! visitor does (`on`/`yes`/`true`/`y` for booleans, `0x` integers, `64k` sizes).
//!
//! # Known differences from QEMU
//!
//! Only for inputs no real command line contains:
//!
//! - keyval keys nest at most 1024 levels ([`KeyvalError::TooDeep`]; QEMU has no
//!   limit and recurses);
//! - JSON is read by [`crate::json::from_str`], QMP's parser, with its differences;
//! - [`parse_number`] knows no C hexadecimal floats;
//! - [`parse_opts`] does not know the option names, so it goes on (and collects
//!   warnings) past a name QEMU would already have rejected.
//!
//! # Example
//!
//! ```
//! use qsd_qapi::keyval;
//! use serde_json::json;
//!
//! let map = keyval::parse("nbd,id=e0,node-name=n,bitmaps.0=b0,bitmaps.1=b1", Some("type"))?;
//! assert_eq!(
//!     serde_json::Value::Object(map),
//!     json!({"type": "nbd", "id": "e0", "node-name": "n", "bitmaps": ["b0", "b1"]})
//! );
//!
//! let err = keyval::parse("addr.type=unix,addr=x", None).unwrap_err();
//! assert_eq!(err.to_string(), "Parameters 'addr.*' used inconsistently");
//! # Ok::<(), keyval::KeyvalError>(())
//! ```

#![forbid(unsafe_code)]

use std::collections::HashMap;

use serde_json::{Map, Value};

/// A parsed argument: a JSON object.
pub type Object = Map<String, Value>;

/// Longest key fragment QEMU accepts (its buffer is 128 bytes with the NUL).
const MAX_FRAGMENT_LEN: usize = 127;

/// Deepest nesting accepted in keyval keys. QEMU's JSON parser has the same limit;
/// its keyval parser has none, but real keys nest a handful of levels and
/// a limit keeps recursion bounded for any input.
const MAX_NESTING: usize = 1024;

/// Everything that can go wrong in this module. Messages are QEMU's, word for word
/// (QSD prints them as `qemu-storage-daemon: --blockdev ARG: MESSAGE`), except for
/// [`KeyvalError::TooDeep`] and [`KeyvalError::Unrepresentable`], which QEMU has no
/// counterpart for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyvalError {
    /// A key, or one of its fragments, is not a QAPI name or list index.
    #[error("Invalid parameter '{0}'")]
    InvalidParameter(String),
    /// A key made of a single fragment is longer than 127 characters.
    #[error("Parameter '{0}' is too long")]
    ParameterTooLong(String),
    /// One fragment of a dotted key is longer than 127 characters.
    #[error("Parameter fragment '{0}' is too long")]
    FragmentTooLong(String),
    /// An element without `=` where no implied key applies.
    #[error("Expected '=' after parameter '{0}'")]
    ExpectedEquals(String),
    /// The same key prefix is used both as a scalar and as an object, or both as an
    /// object and as a list. Holds the prefix, without the trailing `.*`.
    #[error("Parameters '{0}.*' used inconsistently")]
    Inconsistent(String),
    /// A list index is missing (`a.1=x` without `a.0`). Holds the full key.
    #[error("Parameter '{0}' missing")]
    Missing(String),
    /// `help` or `?` was given where the caller offers no help (see
    /// [`parse_with_help`]).
    #[error("Help is not available for this option")]
    HelpNotAvailable,
    /// A key nests deeper than this implementation supports (1024 levels; QEMU has no
    /// such limit for keyval, no real option comes close).
    #[error("Parameter '{0}' is nested too deeply")]
    TooDeep(String),
    /// A JSON argument that is not one JSON value (QEMU's JSON parser's messages).
    #[error(transparent)]
    Json(#[from] crate::json::JsonError),
    /// A value that is not acceptable (QemuOpts: `Parameter 'id' expects an
    /// identifier`).
    #[error("Parameter '{name}' expects {expected}")]
    InvalidValue {
        /// The parameter's name as QEMU prints it.
        name: String,
        /// What the parameter expects.
        expected: &'static str,
    },
    /// [`render`] was given something keyval syntax cannot express: an invalid key, a
    /// non-string scalar, or an empty nested object or list.
    #[error("Parameter '{0}' cannot be expressed in keyval syntax")]
    Unrepresentable(String),
}

// ---------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------

/// Parses `input` in keyval syntax. `implied_key` names the key of a first element
/// given without `=` (QSD: `driver` for `--blockdev`, `type` for `--export`, `qom-type`
/// for `--object`, `chardev` for `--monitor`, none for `--nbd-server`).
///
/// `help` or `?` anywhere fails with [`KeyvalError::HelpNotAvailable`], as QEMU's
/// `keyval_parse()` does when the caller does not ask for help; use
/// [`parse_with_help`] to detect it instead.
pub fn parse(input: &str, implied_key: Option<&str>) -> Result<Object, KeyvalError> {
    let (root, help) = parse_elements(input, implied_key)?;
    if help {
        return Err(KeyvalError::HelpNotAvailable);
    }
    listify_root(root)
}

/// Like [`parse`], but reports a `help` or `?` element in the returned flag instead
/// of failing (QEMU's `keyval_parse()` with a non-null `p_help`).
pub fn parse_with_help(
    input: &str,
    implied_key: Option<&str>,
) -> Result<(Object, bool), KeyvalError> {
    let (root, help) = parse_elements(input, implied_key)?;
    Ok((listify_root(root)?, help))
}

/// Parses a QSD option argument: JSON when it starts with `{` (values keep their JSON
/// types), keyval syntax otherwise (all leaves are strings). This is QEMU's
/// `qobject_input_visitor_new_str()`.
pub fn parse_json_or_keyval(input: &str, implied_key: Option<&str>) -> Result<Object, KeyvalError> {
    if input.starts_with('{') {
        match crate::json::from_str(input)? {
            Value::Object(map) => Ok(map),
            // The input starts with '{', so a value is an object (or an error).
            _ => Err(crate::json::JsonError::Empty.into()),
        }
    } else {
        parse(input, implied_key)
    }
}

/// A tree as built during parsing: strings and objects only, in insertion order.
enum Node {
    Str(String),
    Dict(Dict),
}

/// An object that remembers insertion order, so that QEMU's hash order can be derived.
#[derive(Default)]
struct Dict {
    entries: Vec<(String, Node)>,
    index: HashMap<String, usize>,
}

impl Dict {
    /// Ensures `key` maps to an object and returns it; `None` if it maps to a string.
    fn put_dict(&mut self, key: &str) -> Option<&mut Dict> {
        let i = match self.index.get(key) {
            Some(&i) => i,
            None => {
                self.entries
                    .push((key.to_owned(), Node::Dict(Dict::default())));
                self.index.insert(key.to_owned(), self.entries.len() - 1);
                self.entries.len() - 1
            }
        };
        match self.entries.get_mut(i) {
            Some((_, Node::Dict(d))) => Some(d),
            _ => None,
        }
    }

    /// Maps `key` to the string `value`, replacing an earlier string; `false` if
    /// `key` maps to an object.
    fn put_str(&mut self, key: &str, value: String) -> bool {
        match self.index.get(key) {
            Some(&i) => match self.entries.get_mut(i) {
                Some((_, node @ Node::Str(_))) => {
                    *node = Node::Str(value);
                    true
                }
                _ => false,
            },
            None => {
                self.entries.push((key.to_owned(), Node::Str(value)));
                self.index.insert(key.to_owned(), self.entries.len() - 1);
                true
            }
        }
    }

    /// The order in which QEMU's `qdict_first()`/`qdict_next()` visit the entries:
    /// by bucket, and within a bucket the most recently inserted first.
    fn qemu_order(&self) -> Vec<usize> {
        let mut order: Vec<(u32, usize)> = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (crate::qdict::bucket(k), i))
            .collect();
        order.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        order.into_iter().map(|(_, i)| i).collect()
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Length of the QAPI name at the start of `s` (QEMU's `parse_qapi_name(s, false)`),
/// 0 if there is none.
fn qapi_name_len(s: &[u8]) -> usize {
    let mut p = 0;
    if s.first() == Some(&b'_') {
        // Downstream extension prefix __RFQDN_
        if s.get(1) != Some(&b'_') {
            return 0;
        }
        p = 2;
        while s
            .get(p)
            .is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.')
        {
            p += 1;
        }
        if s.get(p) != Some(&b'_') {
            return 0;
        }
        p += 1;
    }
    if !s.get(p).is_some_and(u8::is_ascii_alphabetic) {
        return 0;
    }
    p += 1;
    while s
        .get(p)
        .is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    {
        p += 1;
    }
    p
}

/// QEMU's `key_to_index(key, NULL)`: the list index a whole key denotes (capped at
/// `INT_MAX`), or `None` if the key is not all digits.
fn key_to_index(key: &str) -> Option<u64> {
    if key.is_empty() || !key.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let mut index: u64 = 0;
    for c in key.bytes() {
        index = index * 10 + u64::from(c - b'0');
        if index > i32::MAX as u64 {
            return Some(i32::MAX as u64);
        }
    }
    Some(index)
}

/// Splits `input` into its elements and builds the tree (QEMU's loop over
/// `keyval_parse_one()`). Returns the tree and whether help was requested.
fn parse_elements(input: &str, implied_key: Option<&str>) -> Result<(Dict, bool), KeyvalError> {
    let bytes = input.as_bytes();
    let mut root = Dict::default();
    let mut help = false;
    let mut pos = 0;
    let mut implied_key = implied_key;
    while pos < bytes.len() {
        pos = parse_one(&mut root, bytes, pos, implied_key, &mut help)?;
        implied_key = None;
    }
    Ok((root, help))
}

/// Parses one `key=value` (or implied value, or help) starting at `pos`; returns the
/// position of the next element.
fn parse_one(
    root: &mut Dict,
    input: &[u8],
    pos: usize,
    implied_key: Option<&str>,
    help: &mut bool,
) -> Result<usize, KeyvalError> {
    let params = input.get(pos..).unwrap_or_default();
    let len = params
        .iter()
        .position(|&c| c == b'=' || c == b',')
        .unwrap_or(params.len());
    let after_key = params.get(len).copied();

    // Where an implied value ends, if this element is one.
    let mut implied_value_end = None;
    let mut key: &[u8] = params.get(..len).unwrap_or_default();
    if len > 0 && after_key != Some(b'=') {
        if key == b"help" || key == b"?" {
            *help = true;
            let next = pos + len;
            return Ok(if after_key == Some(b',') {
                next + 1
            } else {
                next
            });
        }
        if let Some(implied) = implied_key {
            implied_value_end = Some(len);
            key = implied.as_bytes();
        }
    }
    let key_end = key.len();

    // Walk the fragments; `prev` is the previous one, `cur` the object it applies to.
    let mut cur = root;
    let mut s = 0;
    let mut prev: &[u8] = &[];
    let mut depth = 0;
    loop {
        let rest = key.get(s..).unwrap_or_default();
        let flen = if s != 0 && rest.first().is_some_and(u8::is_ascii_digit) {
            rest.iter().take_while(|c| c.is_ascii_digit()).count()
        } else {
            qapi_name_len(rest)
        };
        if flen == 0 || (s + flen < key_end && key.get(s + flen) != Some(&b'.')) {
            return Err(KeyvalError::InvalidParameter(lossy(key)));
        }
        let fragment = rest.get(..flen).unwrap_or_default();
        if flen > MAX_FRAGMENT_LEN {
            return Err(if s != 0 || s + flen != key_end {
                KeyvalError::FragmentTooLong(lossy(fragment))
            } else {
                KeyvalError::ParameterTooLong(lossy(fragment))
            });
        }
        if s != 0 {
            depth += 1;
            if depth >= MAX_NESTING {
                return Err(KeyvalError::TooDeep(lossy(key)));
            }
            let prefix = key.get(..s - 1).unwrap_or_default();
            cur = cur
                .put_dict(&lossy(prev))
                .ok_or_else(|| KeyvalError::Inconsistent(lossy(prefix)))?;
        }
        prev = fragment;
        s += flen;
        if key.get(s) != Some(&b'.') {
            break;
        }
        s += 1;
    }

    let (value, next) = match implied_value_end {
        Some(end) => {
            let value = lossy(params.get(..end).unwrap_or_default());
            let next = pos + end;
            (
                value,
                if input.get(next) == Some(&b',') {
                    next + 1
                } else {
                    next
                },
            )
        }
        None => {
            if after_key != Some(b'=') {
                return Err(KeyvalError::ExpectedEquals(lossy(key)));
            }
            let mut i = pos + len + 1;
            let mut value = Vec::new();
            // A value ends at a single ','; ",," stands for one comma.
            while let Some(&c) = input.get(i) {
                if c == b',' {
                    i += 1;
                    if input.get(i) != Some(&b',') {
                        break;
                    }
                }
                value.push(c);
                i += 1;
            }
            (lossy(&value), i)
        }
    };

    if !cur.put_str(&lossy(prev), value) {
        return Err(KeyvalError::Inconsistent(lossy(key)));
    }
    Ok(next)
}

fn listify_root(root: Dict) -> Result<Object, KeyvalError> {
    match listify(root, &mut Vec::new())? {
        Value::Object(map) => Ok(map),
        // The root's keys are QAPI names, never indexes, so it stays an object.
        _ => Err(KeyvalError::Inconsistent(String::new())),
    }
}

/// QEMU's `keyval_listify()`: turns objects whose keys are all indexes into arrays,
/// recursively, visiting entries in QEMU's order so that the same error wins.
fn listify(dict: Dict, path: &mut Vec<String>) -> Result<Value, KeyvalError> {
    let order = dict.qemu_order();
    let mut slots: Vec<Option<(String, Node)>> = dict.entries.into_iter().map(Some).collect();
    let mut has_index = false;
    let mut has_member = false;
    let mut done: Vec<(String, Value)> = Vec::with_capacity(slots.len());
    for i in order {
        let Some((key, node)) = slots.get_mut(i).and_then(Option::take) else {
            continue;
        };
        if key_to_index(&key).is_some() {
            has_index = true;
        } else {
            has_member = true;
        }
        let value = match node {
            Node::Str(s) => Value::String(s),
            Node::Dict(d) => {
                path.push(key.clone());
                let v = listify(d, path);
                path.pop();
                v?
            }
        };
        done.push((key, value));
    }

    if has_index && has_member {
        return Err(KeyvalError::Inconsistent(path.join(".")));
    }
    if !has_index {
        return Ok(Value::Object(done.into_iter().collect()));
    }

    // One slot more than entries: an index beyond that means a gap.
    let nelt = done.len() + 1;
    let mut elt: Vec<Option<Value>> = vec![None; nelt];
    let mut max_index: u64 = 0;
    for (key, value) in done {
        let index = key_to_index(&key).unwrap_or(0);
        max_index = max_index.max(index);
        if let Some(slot) = usize::try_from(index)
            .ok()
            .filter(|&i| i < nelt - 1)
            .and_then(|i| elt.get_mut(i))
        {
            // Several keys may denote one index ("1", "01"): the one visited last wins.
            *slot = Some(value);
        }
    }
    let count = usize::try_from(max_index + 1).map_or(nelt, |m| m.min(nelt));
    let mut list = Vec::with_capacity(count);
    for (i, slot) in elt.into_iter().take(count).enumerate() {
        match slot {
            Some(v) => list.push(v),
            None => return Err(KeyvalError::Missing(format!("{}.{i}", path.join(".")))),
        }
    }
    Ok(Value::Array(list))
}

// ---------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------

/// Renders an object in keyval syntax, the inverse of [`parse`]: commas in values are
/// doubled, nested objects and arrays become dotted keys. Fails for what keyval cannot
/// express: keys that are not QAPI names, non-string scalars, empty nested objects or
/// arrays.
pub fn render(map: &Object) -> Result<String, KeyvalError> {
    let mut out = String::new();
    let mut path = Vec::new();
    render_object(map, &mut path, &mut out)?;
    Ok(out)
}

fn render_object(
    map: &Object,
    path: &mut Vec<String>,
    out: &mut String,
) -> Result<(), KeyvalError> {
    for (key, value) in map {
        if key.len() > MAX_FRAGMENT_LEN || qapi_name_len(key.as_bytes()) != key.len() {
            path.push(key.clone());
            return Err(KeyvalError::Unrepresentable(path.join(".")));
        }
        path.push(key.clone());
        render_value(value, path, out)?;
        path.pop();
    }
    Ok(())
}

fn render_value(
    value: &Value,
    path: &mut Vec<String>,
    out: &mut String,
) -> Result<(), KeyvalError> {
    match value {
        Value::String(s) => {
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(&path.join("."));
            out.push('=');
            out.push_str(&s.replace(',', ",,"));
            Ok(())
        }
        Value::Object(map) if !map.is_empty() => render_object(map, path, out),
        Value::Array(list) if !list.is_empty() => {
            for (i, v) in list.iter().enumerate() {
                path.push(i.to_string());
                render_value(v, path, out)?;
                path.pop();
            }
            Ok(())
        }
        _ => Err(KeyvalError::Unrepresentable(path.join("."))),
    }
}

// ---------------------------------------------------------------------------------------
// QemuOpts syntax (--chardev)
// ---------------------------------------------------------------------------------------

/// The result of [`parse_opts`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Opts {
    /// The options, flat (QemuOpts has no nesting: `a.b` is just a name), every value a
    /// string. When a name repeats, the last value wins, except for `id`, where QEMU
    /// takes the first.
    pub values: Object,
    /// `help` or `?` was given (not as the first, implied, element): QEMU prints the
    /// option's help and exits instead of using the options.
    pub help: bool,
    /// Deprecation warnings QEMU prints for short-form booleans (`server`, `nowait`).
    /// Each is two lines: the warning, then the advice. QSD prints them as
    /// `qemu-storage-daemon: --chardev ARG: warning: LINE1\nLINE2`.
    pub warnings: Vec<String>,
}

/// One element of QemuOpts syntax: `(name, value, position of the next element)`,
/// QEMU's `get_opt_name_value()`. `firstname` is the implied name for a first element
/// without `=`; a value-less element otherwise is a flag: `name` means `name=on`,
/// `noname` means `name=off`. Returns whether the element was a flag (and its `no`
/// prefix) for the deprecation warning.
fn opt_name_value(
    input: &[u8],
    pos: usize,
    firstname: Option<&str>,
) -> (String, String, usize, Option<&'static str>) {
    let params = input.get(pos..).unwrap_or_default();
    let len = params
        .iter()
        .position(|&c| c == b'=' || c == b',')
        .unwrap_or(params.len());
    // A value ends at a single ','; ",," stands for one comma.
    let value_at = |mut i: usize| {
        let mut value = Vec::new();
        while let Some(&c) = input.get(i) {
            if c == b',' {
                if input.get(i + 1) != Some(&b',') {
                    break;
                }
                i += 1;
            }
            value.push(c);
            i += 1;
        }
        (lossy(&value), i)
    };
    let (name, value, mut next, flag) = if params.get(len) != Some(&b'=') {
        if let Some(first) = firstname {
            let (value, next) = value_at(pos);
            (first.to_owned(), value, next, None)
        } else {
            let word = lossy(params.get(..len).unwrap_or_default());
            let next = pos + len;
            match word.strip_prefix("no") {
                Some(rest) => (rest.to_owned(), "off".to_owned(), next, Some("no")),
                None => (word, "on".to_owned(), next, Some("")),
            }
        }
    } else {
        let name = lossy(params.get(..len).unwrap_or_default());
        let (value, next) = value_at(pos + len + 1);
        (name, value, next, None)
    };
    if input.get(next) == Some(&b',') {
        next += 1;
    }
    (name, value, next, flag)
}

/// QEMU's `id_wellformed()`: a letter, then letters, digits, `-`, `.`, `_`.
fn id_wellformed(id: &str) -> bool {
    let mut chars = id.bytes();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_'))
}

/// Parses `input` in QEMU's older QemuOpts syntax, which qemu-storage-daemon uses for
/// `--chardev` (implied name `backend`; no JSON form), unlike keyval:
///
/// - no nesting and no lists: names are flat (`addr.type` is one name);
/// - the implied first value may contain `,,` (`socket,,x` means `socket,x`);
/// - a later element without `=` is a boolean flag: `server` means `server=on`,
///   `nowait` means `wait=off` (deprecated; see [`Opts::warnings`]);
/// - `help` or `?` as such a flag requests help ([`Opts::help`]);
/// - `id` is looked up first, with QEMU's quirks, and must be an identifier
///   (`Parameter 'id' expects an identifier`).
///
/// Whether names are known and values well typed is for the caller to check against
/// the option's own list (QEMU: `Invalid parameter 'x'`, `Parameter 'x' expects 'on'
/// or 'off'`); [`crate::from_keyval`] does the latter.
pub fn parse_opts(input: &str, implied_name: Option<&str>) -> Result<Opts, KeyvalError> {
    let bytes = input.as_bytes();

    // QEMU finds the id first, reading every element as a name=value or a flag
    // (never as an implied value), and takes the first one.
    let mut pos = 0;
    let mut id = None;
    while pos < bytes.len() {
        let (name, value, next, _) = opt_name_value(bytes, pos, None);
        pos = next;
        if name == "id" {
            id = Some(value);
            break;
        }
    }
    if let Some(id) = &id {
        if !id_wellformed(id) {
            return Err(KeyvalError::InvalidValue {
                name: "id".to_owned(),
                expected: "an identifier",
            });
        }
    }

    let mut opts = Opts::default();
    let mut firstname = implied_name;
    let mut pos = 0;
    while pos < bytes.len() {
        let (name, value, next, flag) = opt_name_value(bytes, pos, firstname);
        pos = next;
        firstname = None;
        if let Some(prefix) = flag {
            if prefix.is_empty() && (name == "help" || name == "?") {
                opts.help = true;
                return Ok(opts);
            }
            let advice = if name == "delay" {
                format!(
                    "Please use nodelay={} instead",
                    if prefix.is_empty() { "off" } else { "on" }
                )
            } else {
                format!("Please use {name}={value} instead")
            };
            opts.warnings.push(format!(
                "short-form boolean option '{prefix}{name}' deprecated\n{advice}"
            ));
        }
        if name != "id" {
            opts.values.insert(name, Value::String(value));
        }
    }
    if let Some(id) = id {
        opts.values.insert("id".to_owned(), Value::String(id));
    }
    Ok(opts)
}

// ---------------------------------------------------------------------------------------
// Typing
// ---------------------------------------------------------------------------------------

/// A keyval boolean (QEMU's `qapi_bool_parse()`, which its keyval visitor uses):
/// `on`, `yes`, `true`, `y` or `off`, `no`, `false`, `n`, case-sensitive. The error
/// message names only `'on' or 'off'`.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// C's `isspace()` in the C locale.
fn is_c_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// The core of C's `strtoull()`/`strtoll()` with base 0 on the whole string: returns
/// whether a '-' was seen and the magnitude (`None` on overflow of `u64`), or `None`
/// when the string is not entirely a number.
fn strto_base0(s: &str) -> Option<(bool, Option<u64>)> {
    let b = s.as_bytes();
    let mut i = b.iter().take_while(|&&c| is_c_space(c)).count();
    let negative = match b.get(i) {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    let rest = b.get(i..).unwrap_or_default();
    let (radix, digits) = match rest {
        [b'0', b'x' | b'X', c, ..] if c.is_ascii_hexdigit() => (16, rest.get(2..)?),
        [b'0', ..] => (8, rest),
        _ => (10, rest),
    };
    if digits.is_empty() {
        return None;
    }
    let mut magnitude: Option<u64> = Some(0);
    for &c in digits {
        let d = char::from(c).to_digit(radix)?;
        magnitude = magnitude
            .and_then(|m| m.checked_mul(u64::from(radix)))
            .and_then(|m| m.checked_add(u64::from(d)));
    }
    Some((negative, magnitude))
}

/// A keyval `int`: C `strtoll()` with base 0, the whole string (QEMU's
/// `qemu_strtoi64(str, NULL, 0, ...)`): optional leading white space and sign, then
/// decimal, `0x` hexadecimal or `0` octal digits.
pub fn parse_int64(s: &str) -> Option<i64> {
    let (negative, magnitude) = strto_base0(s)?;
    let magnitude = magnitude?;
    if negative {
        0_i64.checked_sub_unsigned(magnitude)
    } else {
        i64::try_from(magnitude).ok()
    }
}

/// A keyval `uint64`: C `strtoull()` with base 0, the whole string (QEMU's
/// `qemu_strtou64(str, NULL, 0, ...)`). Like C, `-1` is accepted and wraps to
/// `u64::MAX`.
pub fn parse_uint64(s: &str) -> Option<u64> {
    let (negative, magnitude) = strto_base0(s)?;
    let magnitude = magnitude?;
    Some(if negative {
        magnitude.wrapping_neg()
    } else {
        magnitude
    })
}

/// The multiplier of a size suffix (`qemu_strtosz()`'s `suffix_mul()`, unit 1024).
fn suffix_mul(c: u8) -> Option<u64> {
    Some(match c.to_ascii_uppercase() {
        b'B' => 1,
        b'K' => 1 << 10,
        b'M' => 1 << 20,
        b'G' => 1 << 30,
        b'T' => 1 << 40,
        b'P' => 1 << 50,
        b'E' => 1 << 60,
        _ => return None,
    })
}

/// A keyval `size` (QEMU's `qemu_strtosz(str, NULL, ...)`, QEMU 8.1 and later):
///
/// - `12345`, `12345B`: bytes; `12345k`, `12345M`, ... up to `E`: times 1024^n,
///   suffixes in either case;
/// - `1.5G`, `.5k`, `1.k`: a fraction needs a suffix other than `B`, and the result
///   is rounded to the nearest byte;
/// - `0x1000`: hexadecimal, without fraction or suffix;
/// - leading white space and a `+` are accepted; negative values, exponents, trailing
///   characters and values beyond `u64::MAX` are not.
pub fn parse_size(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let ws = b.iter().take_while(|&&c| is_c_space(c)).count();
    let signed = b.get(ws..).unwrap_or_default();
    if signed.first() == Some(&b'-') {
        return None;
    }
    let unsigned = match signed.first() {
        Some(b'+') => signed.get(1..).unwrap_or_default(),
        _ => signed,
    };
    let int_len = unsigned.iter().take_while(|c| c.is_ascii_digit()).count();
    let int_digits = unsigned.get(..int_len).unwrap_or_default();
    let mut rest = unsigned.get(int_len..).unwrap_or_default();

    // The integral part, as decimal (even with leading zeros).
    let mut val: u64 = 0;
    for &c in int_digits {
        val = val.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }

    if int_len > 0 && val == 0 && matches!(rest.first(), Some(b'x' | b'X')) {
        // Hexadecimal: the whole input must be 0x followed by hex digits, with no
        // fraction and no suffix.
        if int_len != 1 {
            return None;
        }
        let hex = rest.get(1..).unwrap_or_default();
        if hex.is_empty() || !hex.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let mut v: u64 = 0;
        for &c in hex {
            v = v
                .checked_mul(16)?
                .checked_add(u64::from(char::from(c).to_digit(16)?))?;
        }
        return Some(v);
    }

    // A fraction, as a 64-bit binary fixed-point number.
    let mut frac: u64 = 0;
    if rest.first() == Some(&b'.') {
        let fdigits = rest
            .get(1..)
            .unwrap_or_default()
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if int_len == 0 && fdigits == 0 {
            return None;
        }
        if fdigits > 0 {
            let text = std::str::from_utf8(rest.get(..=fdigits)?).ok()?;
            let f: f64 = format!("0{text}").parse().ok()?;
            if f >= 1.0 {
                val = val.checked_add(1)?;
            } else {
                // Any non-zero fraction leaves a non-zero trace.
                frac = (f * 18_446_744_073_709_551_616.0) as u64;
                if frac == 0 && text.bytes().any(|c| (b'1'..=b'9').contains(&c)) {
                    frac = 1;
                }
            }
        }
        rest = rest.get(1 + fdigits..).unwrap_or_default();
    } else if int_len == 0 {
        return None;
    }

    let mul = match rest.first().and_then(|&c| suffix_mul(c)) {
        Some(m) => {
            rest = rest.get(1..).unwrap_or_default();
            m
        }
        None => 1,
    };
    if !rest.is_empty() {
        return None;
    }
    if mul == 1 {
        return if frac != 0 { None } else { Some(val) };
    }
    // val * mul + frac * mul / 2^64, rounding half up.
    let whole = u64::try_from(u128::from(val) * u128::from(mul)).ok()?;
    let exact = (u128::from(whole) << 64) + u128::from(frac) * u128::from(mul);
    let rounded = (exact >> 64) + ((exact >> 63) & 1);
    u64::try_from(rounded).ok()
}

/// A keyval `number`: a finite decimal floating-point number, the whole string
/// (QEMU's `qemu_strtod_finite()`; C's hexadecimal floats are not supported here).
pub fn parse_number(s: &str) -> Option<f64> {
    let t = s.trim_start_matches(|c: char| c.is_ascii() && is_c_space(c as u8));
    let body = t.strip_prefix(['+', '-']).unwrap_or(t);
    // Only the decimal form: Rust would also accept "inf" and "nan", C hex floats.
    if !body.starts_with(|c: char| c.is_ascii_digit() || c == '.')
        || !body
            .bytes()
            .all(|c| c.is_ascii_digit() || matches!(c, b'.' | b'e' | b'E' | b'+' | b'-'))
    {
        return None;
    }
    let v: f64 = t.parse().ok()?;
    if !v.is_finite() {
        return None;
    }
    // C reports underflow (ERANGE), which QEMU rejects.
    let mantissa = body.split(['e', 'E']).next().unwrap_or_default();
    if (v == 0.0 && mantissa.bytes().any(|c| (b'1'..=b'9').contains(&c))) || v.is_subnormal() {
        return None;
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(input: &str, implied: Option<&str>) -> Value {
        match parse(input, implied) {
            Ok(m) => Value::Object(m),
            Err(e) => panic!("{input:?} failed: {e}"),
        }
    }

    fn fails(input: &str, implied: Option<&str>) -> String {
        match parse(input, implied) {
            Ok(m) => panic!("{input:?} parsed as {m:?}"),
            Err(e) => e.to_string(),
        }
    }

    // Cases from QEMU's tests/unit/test-keyval.c, test_keyval_parse().
    #[test]
    fn qemu_basic_cases() {
        assert_eq!(ok("", None), json!({}));
        assert_eq!(fails("=val", None), "Invalid parameter ''");
        assert_eq!(fails(".", None), "Invalid parameter '.'");
        assert_eq!(fails("key.", None), "Invalid parameter 'key.'");
        assert_eq!(fails("7up=val", None), "Invalid parameter '7up'");
        assert_eq!(fails("key[0]=val", None), "Invalid parameter 'key[0]'");
        assert_eq!(ok("a=1,b=2,,x,a=3", None), json!({"a": "3", "b": "2,x"}));
        assert_eq!(ok("id=foo,id=bar", None), json!({"id": "bar"}));
        assert_eq!(
            ok("a.b.c=1,a.b.c=2,d=3", None),
            json!({"a": {"b": {"c": "2"}}, "d": "3"})
        );
        assert_eq!(
            fails("a.b=1,a=2", None),
            "Parameters 'a.*' used inconsistently"
        );
        assert_eq!(
            fails("a.b=1,a.b.c=2", None),
            "Parameters 'a.b.*' used inconsistently"
        );
        assert_eq!(
            fails("a=2,a.b=1", None),
            "Parameters 'a.*' used inconsistently"
        );
        assert_eq!(ok("x=y,", None), json!({"x": "y"}));
        assert_eq!(fails(",", None), "Invalid parameter ''");
        assert_eq!(ok("x=,,id=bar", None), json!({"x": ",id=bar"}));
        assert_eq!(ok("id=666", None), json!({"id": "666"}));
        assert_eq!(
            fails("an,noaus,noaus=", None),
            "Expected '=' after parameter 'an'"
        );
        assert_eq!(fails("no", None), "Expected '=' after parameter 'no'");
    }

    #[test]
    fn qemu_long_keys() {
        let long = format!("{}z", "a".repeat(127));
        assert_eq!(
            fails(&format!("{long}=v"), None),
            format!("Parameter '{long}' is too long")
        );
        assert_eq!(
            fails(&format!("k.{long}=v"), None),
            format!("Parameter fragment '{long}' is too long")
        );
        let fits = &long[1..];
        assert_eq!(ok(&format!("{fits}=v"), None), json!({ fits: "v" }));
        assert_eq!(
            ok(&format!("k.{fits}=v"), None),
            json!({"k": { fits: "v" }})
        );
    }

    #[test]
    fn qemu_implied_key() {
        assert_eq!(
            ok("an,aus=off,noaus=", Some("implied")),
            json!({"implied": "an", "aus": "off", "noaus": ""})
        );
        assert_eq!(
            ok("val", Some("eins.zwei")),
            json!({"eins": {"zwei": "val"}})
        );
        assert_eq!(fails(",", Some("implied")), "Invalid parameter ''");
        assert_eq!(fails(",,,a=1", Some("implied")), "Invalid parameter ''");
        assert_eq!(fails("val,,ue", Some("implied")), "Invalid parameter ''");
        assert_eq!(fails("=val", Some("implied")), "Invalid parameter ''");
        // Only the first element can use the implied key.
        assert_eq!(
            fails("a,b", Some("driver")),
            "Expected '=' after parameter 'b'"
        );
        assert_eq!(fails("unix", None), "Expected '=' after parameter 'unix'");
    }

    #[test]
    fn qemu_help() {
        assert_eq!(parse_with_help("help", None), Ok((Map::new(), true)));
        assert_eq!(
            parse_with_help("help", Some("implied")),
            Ok((Map::new(), true))
        );
        assert_eq!(parse_with_help("?", None), Ok((Map::new(), true)));
        assert_eq!(fails("help", None), "Help is not available for this option");
        assert_eq!(
            fails("help", Some("implied")),
            "Help is not available for this option"
        );
        assert_eq!(
            parse_with_help("help=on", None),
            Ok((
                json!({"help": "on"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                false
            ))
        );
        assert_eq!(
            parse_with_help("help.abc", None),
            Err(KeyvalError::ExpectedEquals("help.abc".into()))
        );
        assert_eq!(
            ok("help.abc", Some("implied")),
            json!({"implied": "help.abc"})
        );
        let (m, help) = parse_with_help("number=42,help,foo=bar", None).expect("parses");
        assert!(help);
        assert_eq!(Value::Object(m), json!({"number": "42", "foo": "bar"}));
        let (m, help) = parse_with_help("val,help,foo=bar", Some("implied")).expect("parses");
        assert!(help);
        assert_eq!(Value::Object(m), json!({"implied": "val", "foo": "bar"}));
        assert_eq!(
            fails("addr.type=unix,help", None),
            "Help is not available for this option"
        );
    }

    // test_keyval_parse_list()
    #[test]
    fn qemu_lists() {
        assert_eq!(fails("0=1", None), "Invalid parameter '0'");
        assert_eq!(
            ok("list.0=null,list.2=zwei,list.1=eins", None),
            json!({"list": ["null", "eins", "zwei"]})
        );
        assert_eq!(
            ok("list.1=goner,list.0=null,list.01=eins,list.2=zwei", None),
            json!({"list": ["null", "eins", "zwei"]})
        );
        assert_eq!(
            ok("a.list.1=eins,a.list.00=null,a.list.2=zwei", None),
            json!({"a": {"list": ["null", "eins", "zwei"]}})
        );
        assert_eq!(
            fails("a.b.c=1,a.b.0=2", None),
            "Parameters 'a.b.*' used inconsistently"
        );
        assert_eq!(
            fails("a.0.c=1,a.b.c=2", None),
            "Parameters 'a.*' used inconsistently"
        );
        assert_eq!(fails("list.1=lonely", None), "Parameter 'list.0' missing");
        assert_eq!(
            fails("list.0=null,list.2=eins,list.02=zwei", None),
            "Parameter 'list.1' missing"
        );
        assert_eq!(
            fails("a.99999999999999999999=x", None),
            "Parameter 'a.0' missing"
        );
        assert_eq!(
            ok("rules.0.match=a,rules.1.match=b,rules.1.policy=deny", None),
            json!({"rules": [{"match": "a"}, {"match": "b", "policy": "deny"}]})
        );
    }

    // Observed with qemu-storage-daemon 10.0.
    #[test]
    fn qsd_observed() {
        assert_eq!(
            fails("a.0=1,a.b=2", None),
            "Parameters 'a.*' used inconsistently"
        );
        assert_eq!(fails("a.1=1,a.2=2", None), "Parameter 'a.0' missing");
        assert_eq!(
            fails("a,b=1,c", Some("driver")),
            "Expected '=' after parameter 'c'"
        );
        assert_eq!(fails("a..b=1", None), "Invalid parameter 'a..b'");
        assert_eq!(fails(".a=1", None), "Invalid parameter '.a'");
        assert_eq!(fails("a.0x=1", None), "Invalid parameter 'a.0x'");
        assert_eq!(fails("é=1", None), "Invalid parameter 'é'");
        assert_eq!(fails("null-co,,x", Some("driver")), "Invalid parameter ''");
        assert_eq!(fails("a.1=x,b.1=y", None), "Parameter 'a.0' missing");
        assert_eq!(fails("b.1=y,a.1=x", None), "Parameter 'a.0' missing");
        assert_eq!(ok("driver=file,,x", None), json!({"driver": "file,x"}));
        assert_eq!(
            ok("a.__com.redhat_x=1,__org.example_y-z=2", None),
            json!({"a": {"__com.redhat_x": "1"}, "__org.example_y-z": "2"})
        );
    }

    #[test]
    fn tdb_hash_matches_qemu_order_for_duplicate_indexes() {
        // "1" and "01" both denote index 1; QEMU visits "01" last (its bucket comes
        // later), so "01" wins whatever the input order.
        assert_eq!(ok("l.01=a,l.1=b,l.0=z", None), json!({"l": ["z", "a"]}));
    }

    #[test]
    fn too_deep() {
        let deep = format!("{}=x", vec!["a"; MAX_NESTING + 1].join("."));
        assert!(matches!(parse(&deep, None), Err(KeyvalError::TooDeep(_))));
        let ok_depth = format!("{}=x", vec!["a"; 100].join("."));
        assert!(parse(&ok_depth, None).is_ok());
    }

    #[test]
    fn render_round_trip_and_errors() {
        let v = json!({"a": {"b": ["x,y", "", "=,,"]}, "c": "d"});
        let map = v.as_object().cloned().unwrap_or_default();
        let text = render(&map).expect("renders");
        assert_eq!(text, "a.b.0=x,,y,a.b.1=,a.b.2==,,,,,c=d");
        assert_eq!(parse(&text, None), Ok(map));
        for bad in [
            json!({"a": {}}),
            json!({"a": []}),
            json!({"a": 1}),
            json!({"1a": "x"}),
            json!({"a.b": "x"}),
        ] {
            let map = bad.as_object().cloned().unwrap_or_default();
            assert!(
                matches!(render(&map), Err(KeyvalError::Unrepresentable(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn json_or_keyval() {
        assert_eq!(
            parse_json_or_keyval(
                r#"{"driver": "null-co", "size": 1, "ro": true}"#,
                Some("driver")
            ),
            Ok(json!({"driver": "null-co", "size": 1, "ro": true})
                .as_object()
                .cloned()
                .unwrap_or_default())
        );
        assert_eq!(
            parse_json_or_keyval("{'a': 'it\\'s', \"b\": [1, -2, 1.5, null]}", None)
                .map(Value::Object),
            Ok(json!({"a": "it's", "b": [1, -2, 1.5, null]}))
        );
        assert_eq!(
            parse_json_or_keyval("null-co,node-name=x", Some("driver")).map(Value::Object),
            Ok(json!({"driver": "null-co", "node-name": "x"}))
        );
        let cases = [
            ("{\"driver\":1", "JSON parse error, premature EOI"),
            ("{", "JSON parse error, premature EOI"),
            (
                "{\"driver\":\"null-co\"} x",
                "Expecting at most one JSON value",
            ),
            (
                "{\"driver\":\"null-co\"}}",
                "Expecting at most one JSON value",
            ),
            (
                "{\"driver\":\"null-co\",}",
                "JSON parse error, expecting value",
            ),
            ("{\"a\":1, \"a\":2}", "JSON parse error, duplicate key"),
            (
                "{\"x\": [1,2}",
                "JSON parse error, expected separator in list",
            ),
            ("{\"x\": tru}", "JSON parse error, invalid keyword 'tru'"),
            (
                "{\"d\": \"n\" \"x\": 1}",
                "JSON parse error, expected separator in dict",
            ),
            (
                "{\"d\": \"n\", 1: 1}",
                "JSON parse error, key is not a string in object",
            ),
            ("{\"x\" 1}", "JSON parse error, missing : in object pair"),
            (
                "{\"x\": \"\\q\"}",
                "JSON parse error, invalid escape sequence in string",
            ),
            (
                "{\"x\": \"\\u12\"}",
                "JSON parse error, \\u12\" is not a valid Unicode character",
            ),
            (
                "{\"x\": \"\\ud800\"}",
                "JSON parse error, \\ud800 is not a valid Unicode character",
            ),
            ("{\"x\": 01}", "JSON parse error, stray '01'"),
            ("{\"x\": @}", "JSON parse error, stray '@'"),
            ("{\"x\": 1.}", "JSON parse error, stray '1.}'"),
            ("{\"x\": 1e}", "JSON parse error, stray '1e}'"),
            ("{\"x\": [1,]}", "JSON parse error, expecting value"),
            // Lexer errors win over parser errors in the same value.
            ("{\"a\" 1 @}", "JSON parse error, stray '@'"),
            ("{\"a\": True}", "JSON parse error, stray 'T'"),
            ("{\"a\": -}", "JSON parse error, stray '-}'"),
            ("{\"a\": \"abc", "JSON parse error, stray '\"abc'"),
            ("{\"a\": 1.", "JSON parse error, stray '1.'"),
            ("{\"a\": \"a\nb\"}", "JSON parse error, stray '\"a\n'"),
            // "0" takes no exponent: "0", then the keyword "e", then 5.
            (
                "{\"a\": 0e5}",
                "JSON parse error, expected separator in dict",
            ),
            ("{\"a\": ]}", "JSON parse error, expecting value"),
            ("{\"a\": [}", "JSON parse error, expecting value"),
            (
                "{\"a\": \"x\", \"a\": [}",
                "JSON parse error, expecting value",
            ),
            (
                "{\"a\": \"\\u1\\\"x\"}",
                "JSON parse error, \\u1\\\"x is not a valid Unicode character",
            ),
            (
                "{\"a\": \"\\udc00\"}",
                "JSON parse error, \\udc00 is not a valid Unicode character",
            ),
            (
                "{\"driver\": \"null-co\"} @",
                "Expecting at most one JSON value",
            ),
        ];
        for (input, msg) in cases {
            match parse_json_or_keyval(input, None) {
                Ok(v) => panic!("{input:?} parsed as {v:?}"),
                Err(e) => assert_eq!(e.to_string(), msg, "{input:?}"),
            }
        }
        let nested = |n: usize| format!("{{\"a\":{}{}}}", "[".repeat(n), "]".repeat(n));
        assert_eq!(
            parse_json_or_keyval(&nested(1024), None),
            Err(KeyvalError::Json(crate::json::JsonError::Stream(
                crate::json::StreamError::TooDeep
            )))
        );
        assert!(parse_json_or_keyval(&nested(1023), None).is_ok());
        assert_eq!(
            parse_json_or_keyval("{\"x\": \"\\ud83d\\ude00\\u00e9\"}", None).map(Value::Object),
            Ok(json!({"x": "😀é"}))
        );
    }

    #[test]
    fn opts_syntax() {
        let o = parse_opts(
            "socket,id=c,path=/tmp/x.sock,server,nowait",
            Some("backend"),
        )
        .expect("parses");
        assert_eq!(
            Value::Object(o.values),
            json!({"backend": "socket", "id": "c", "path": "/tmp/x.sock", "server": "on", "wait": "off"})
        );
        assert!(!o.help);
        assert_eq!(
            o.warnings,
            vec![
                "short-form boolean option 'server' deprecated\nPlease use server=on instead",
                "short-form boolean option 'nowait' deprecated\nPlease use wait=off instead",
            ]
        );
        let o = parse_opts("socket,,x,id=c,nodelay,delay", Some("backend")).expect("parses");
        assert_eq!(o.values.get("backend"), Some(&json!("socket,x")));
        assert_eq!(o.values.get("delay"), Some(&json!("on")));
        assert_eq!(
            o.warnings,
            vec![
                "short-form boolean option 'nodelay' deprecated\nPlease use nodelay=on instead",
                "short-form boolean option 'delay' deprecated\nPlease use nodelay=off instead",
            ]
        );
        // The first id wins; flat names; a doubled comma in a value.
        let o = parse_opts("socket,id=c,id=d,a.b=1,wait=off,,", Some("backend")).expect("parses");
        assert_eq!(
            Value::Object(o.values),
            json!({"backend": "socket", "id": "c", "a.b": "1", "wait": "off,"})
        );
        // QEMU's id pre-pass does not know about the implied value.
        let o = parse_opts("a,,id=x", Some("backend")).expect("parses");
        assert_eq!(
            Value::Object(o.values),
            json!({"backend": "a,id=x", "id": "x"})
        );
        assert!(parse_opts("socket,id=c,help", Some("backend")).is_ok_and(|o| o.help));
        assert!(parse_opts("socket,id=c,?", Some("backend")).is_ok_and(|o| o.help));
        // A first "help" is the implied value.
        assert!(parse_opts("help", Some("backend")).is_ok_and(|o| !o.help));
        assert_eq!(
            parse_opts("socket,id=1c", Some("backend")).map_err(|e| e.to_string()),
            Err("Parameter 'id' expects an identifier".to_owned())
        );
        assert_eq!(
            parse_opts("c0", Some("chardev")).map(|o| Value::Object(o.values)),
            Ok(json!({"chardev": "c0"}))
        );
        assert_eq!(
            parse_opts("=1,,", None).map(|o| Value::Object(o.values)),
            Ok(json!({"": "1,"}))
        );
    }

    #[test]
    fn bools() {
        for s in ["on", "yes", "true", "y"] {
            assert_eq!(parse_bool(s), Some(true), "{s}");
        }
        for s in ["off", "no", "false", "n"] {
            assert_eq!(parse_bool(s), Some(false), "{s}");
        }
        for s in ["offer", "", "ON", "TRUE", "On", "1", "0"] {
            assert_eq!(parse_bool(s), None, "{s}");
        }
    }

    // test_keyval_visit_number()
    #[test]
    fn integers() {
        assert_eq!(parse_uint64("0"), Some(0));
        assert_eq!(parse_uint64("18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_uint64("-1"), Some(u64::MAX));
        assert_eq!(parse_uint64("18446744073709551616"), None);
        assert_eq!(parse_uint64("-18446744073709551616"), None);
        assert_eq!(parse_uint64("0x2a"), Some(42));
        assert_eq!(parse_uint64("052"), Some(42));
        assert_eq!(parse_uint64("3.14"), None);
        assert_eq!(parse_uint64("08"), None);
        assert_eq!(parse_int64(" -0x10"), Some(-16));
        assert_eq!(parse_int64("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_int64("9223372036854775808"), None);
        assert_eq!(parse_int64("+7"), Some(7));
        for s in ["", "-", "0x", "1 ", "x", "1x", "0xg"] {
            assert_eq!(parse_int64(s), None, "{s:?}");
        }
        assert_eq!(parse_int64("0"), Some(0));
    }

    // test_keyval_visit_size() and qemu-img's acceptance of size strings.
    #[test]
    fn sizes() {
        let cases: &[(&str, Option<u64>)] = &[
            ("0", Some(0)),
            ("9007199254740991", Some(9007199254740991)),
            ("9007199254740993", Some(9007199254740993)),
            ("18446744073709550591", Some(18446744073709550591)),
            ("18446744073709551615", Some(u64::MAX)),
            ("18446744073709551616", None),
            ("8P", Some(8 << 50)),
            ("16E", None),
            ("15E", Some(15 << 60)),
            ("1.0005k", Some(1025)),
            ("1.0015k", Some(1026)),
            ("0.5k", Some(512)),
            (".5k", Some(512)),
            ("+.5k", Some(512)),
            (" 1k", Some(1024)),
            ("1.k", Some(1024)),
            ("1.", Some(1)),
            ("1.5", None),
            ("1.5b", None),
            ("0x10", Some(16)),
            ("0x1b", Some(27)),
            ("0x20M", None),
            ("0x1p3", None),
            ("0x1.8", None),
            ("0x", None),
            ("1e3", None),
            ("1E", Some(1 << 60)),
            ("1.5E", Some(3 << 59)),
            ("08", Some(8)),
            ("1k ", None),
            ("1b", Some(1)),
            ("1B", Some(1)),
            ("64k", Some(65536)),
            ("1G", Some(1 << 30)),
            ("-0", None),
            ("-1", None),
            ("", None),
            (".", None),
            (".k", None),
            ("k", None),
            (
                "15.9999999999999999999999999999999999999999999999999999E",
                None,
            ),
            ("1.5e1k", None),
        ];
        for &(s, want) in cases {
            assert_eq!(parse_size(s), want, "{s:?}");
        }
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_number("1.5"), Some(1.5));
        assert_eq!(parse_number(" -2e3"), Some(-2000.0));
        assert_eq!(parse_number(".5"), Some(0.5));
        for s in ["inf", "nan", "1e999", "1e-400", "", "1.5x", "0x10", "+-1"] {
            assert_eq!(parse_number(s), None, "{s:?}");
        }
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn arb_key() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => "[a-zA-Z][a-zA-Z0-9_-]{0,6}",
                1 => "__[a-z0-9.-]{1,4}_[a-z][a-z0-9_-]{0,3}",
            ]
        }

        fn arb_value() -> impl Strategy<Value = Value> {
            any::<String>()
                .prop_map(Value::String)
                .prop_recursive(4, 48, 4, |inner| {
                    prop_oneof![
                        prop::collection::btree_map(arb_key(), inner.clone(), 1..4)
                            .prop_map(|m| Value::Object(m.into_iter().collect())),
                        prop::collection::vec(inner, 1..4).prop_map(Value::Array),
                    ]
                })
        }

        fn arb_object() -> impl Strategy<Value = Object> {
            prop::collection::btree_map(arb_key(), arb_value(), 0..5)
                .prop_map(|m| m.into_iter().collect())
        }

        /// Strings made mostly of keyval's own syntax, so that many of them parse.
        fn keyval_like() -> impl Strategy<Value = String> {
            "[ab0-2_.,=?x-]{0,24}"
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn any_string_ok_or_err(input in any::<String>(), implied in proptest::option::of("[a-z.]{0,6}")) {
                let _ = parse(&input, implied.as_deref());
                let _ = parse_with_help(&input, implied.as_deref());
                let _ = parse_json_or_keyval(&input, implied.as_deref());
                let _ = parse_opts(&input, implied.as_deref());
                let _ = parse_size(&input);
                let _ = parse_int64(&input);
                let _ = parse_uint64(&input);
                let _ = parse_number(&input);
            }

            #[test]
            fn json_like_ok_or_err(input in "\\{[\"'a-z0-9:,{}\\[\\] .eE+\\\\u-]{0,30}") {
                let _ = parse_json_or_keyval(&input, None);
            }

            #[test]
            fn generated_maps_round_trip(map in arb_object()) {
                let text = render(&map).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(parse(&text, None), Ok(map));
            }

            #[test]
            fn parsed_maps_round_trip(input in keyval_like(), implied in proptest::option::of("[a-z]{1,3}")) {
                if let Ok(map) = parse(&input, implied.as_deref()) {
                    let text = render(&map).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(parse(&text, None), Ok(map));
                }
            }

            #[test]
            fn json_text_of_generated_maps_parses_back(map in arb_object()) {
                let text = serde_json::to_string(&map).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(parse_json_or_keyval(&text, None), Ok(map));
            }

            #[test]
            fn sizes_with_suffix(v in 0u64..(1 << 40), s in 0usize..5) {
                let suffix = ["", "k", "M", "G", "T"][s];
                let text = format!("{v}{suffix}");
                prop_assert_eq!(parse_size(&text), v.checked_mul(1 << (10 * s)));
            }

            #[test]
            fn integers_round_trip(v in any::<i64>()) {
                prop_assert_eq!(parse_int64(&v.to_string()), Some(v));
                prop_assert_eq!(parse_int64(&format!("{:#x}", v.unsigned_abs())).map(i128::from),
                    i64::try_from(v.unsigned_abs()).ok().map(i128::from));
            }
        }
    }
}
